"""Greedy math evaluation: ``python -m fasttrain.eval --model DIR --data FILE.jsonl --out DIR``.

Input records (JSON Lines): the question in ``instruction`` (or ``prompt`` / ``question``), the
reference in ``answer`` (a string or a list of acceptable strings, as in the GSM8K / MATH test files
of Step-DPO), an optional ``idx`` and an optional source tag ``dataset`` (or ``type``); without a tag
the source is the data file's stem.

Each item's prompt is ``render_prompt(template, question, prefill)`` with the paper's prefill
``"Let's think step by step.\\nStep 1:"``; the answer is ``extract_answer(prefill + completion)``,
correct when ``is_equiv`` holds against any acceptable reference.

Writes ``outputs.jsonl`` (idx, prompt, completion, extracted, reference, correct, source) and
``summary.json`` (accuracy overall and per source, counts, generated tokens/s, wall time).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from fasttrain.data.templates import render_prompt
from fasttrain.errors import DataError
from fasttrain.eval.answers import extract_answer, is_equiv

__all__ = ["DEFAULT_PREFILL", "Problem", "evaluate", "grade", "load_problems", "prepare_out_dir"]

DEFAULT_PREFILL = "Let's think step by step.\nStep 1:"
QUESTION_FIELDS = ("instruction", "prompt", "question")


@dataclass
class Problem:
    idx: str
    question: str
    answers: list[str]
    source: str
    line: int = 0
    extra: dict = field(default_factory=dict)


def load_problems(path, limit: int | None = None) -> list[Problem]:
    """Read a JSONL problem file; a bad record raises :class:`DataError` naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    default_source = path.stem
    out: list[Problem] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            qf = next((k for k in QUESTION_FIELDS if k in rec), None)
            if qf is None:
                raise DataError(f"{path}:{lineno}: missing field 'instruction' (or 'prompt' / 'question')")
            q = rec[qf]
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{path}:{lineno}: field {qf!r} must be a non-empty string")
            if "answer" not in rec:
                raise DataError(f"{path}:{lineno}: missing field 'answer'")
            a = rec["answer"]
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                a = [str(a)]
            elif isinstance(a, str):
                a = [a]
            if (not isinstance(a, list) or not a
                    or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in a)):
                raise DataError(f"{path}:{lineno}: field 'answer' must be a string or a non-empty list of strings")
            a = [str(x) for x in a]
            src = rec.get("dataset", rec.get("type", default_source))
            if not isinstance(src, str) or not src:
                raise DataError(f"{path}:{lineno}: field 'dataset'/'type' must be a non-empty string")
            idx = rec.get("idx", rec.get("id", len(out)))
            idx = str(idx)
            if idx in seen:
                raise DataError(f"{path}:{lineno}: duplicate idx {idx!r} (first on line {seen[idx]})")
            seen[idx] = lineno
            out.append(Problem(idx=idx, question=q, answers=a, source=src, line=lineno))
    return out


_STEP_LABEL_RE = re.compile(r"(?<![A-Za-z0-9])Step[ \t]*\d+[ \t]*:")


def grade(text: str, answers: list[str]) -> tuple[str | None, bool]:
    """(extracted answer, correct?) for a full solution text.

    ``Step k:`` labels are blanked before extraction: their numbers are never the answer, and
    otherwise a solution without any answer would "answer" its last step number through
    ``extract_answer``'s last-number fallback (the prefill alone contains ``Step 1:``).
    """
    pred = extract_answer(_STEP_LABEL_RE.sub(" ", text))
    return pred, pred is not None and any(is_equiv(pred, a) for a in answers)


def check_out_dir(out, overwrite: bool) -> Path:
    """The output directory may be written (checked before anything is loaded); creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite or choose another directory")
    return out


def prepare_out_dir(out, overwrite: bool) -> Path:
    out = check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(generator, problems: list[Problem], out_dir, template: str = "qwen2-boxed",
             prefill: str = DEFAULT_PREFILL, max_new_tokens: int = 512, meta: dict | None = None) -> dict:
    """Generate greedily for every problem, grade, write ``outputs.jsonl`` + ``summary.json``; return the summary."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tok = getattr(generator, "tokenizer", None)
    prompts = [render_prompt(template, p.question, prefill, tokenizer=tok) for p in problems]
    stats = getattr(generator, "stats", None)
    tok0, sec0 = (stats.generated_tokens, stats.seconds) if stats is not None else (0, 0.0)
    completions = generator.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0)
    if len(completions) != len(prompts):
        raise RuntimeError(f"generator returned {len(completions)} results for {len(prompts)} prompts")
    per_source: dict[str, dict] = OrderedDict()
    n_correct = n_none = 0
    tmp = out_dir / "outputs.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p, prompt, comps in zip(problems, prompts, completions):
            completion = comps[0]
            pred, ok = grade(prefill + completion, p.answers)
            n_correct += ok
            n_none += pred is None
            s = per_source.setdefault(p.source, {"correct": 0, "total": 0})
            s["correct"] += ok
            s["total"] += 1
            row = {"idx": p.idx, "prompt": prompt, "completion": completion, "extracted": pred,
                   "reference": p.answers, "correct": bool(ok), "source": p.source}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / "outputs.jsonl")
    for s in per_source.values():
        s["accuracy"] = s["correct"] / s["total"]
    gen_tokens = (stats.generated_tokens - tok0) if stats is not None else None
    gen_secs = (stats.seconds - sec0) if stats is not None else None
    n = len(problems)
    summary = {
        "accuracy": n_correct / n if n else 0.0,
        "correct": n_correct,
        "total": n,
        "no_answer": n_none,
        "per_source": per_source,
        "generated_tokens": gen_tokens,
        "generation_seconds": gen_secs,
        "generation_tokens_per_s": (gen_tokens / gen_secs) if gen_secs else None,
        "wall_seconds": None,
        "template": template,
        "prefill": prefill,
        "max_new_tokens": max_new_tokens,
        "backend": getattr(generator, "backend", type(generator).__name__),
    }
    summary.update(meta or {})
    summary["wall_seconds"] = time.perf_counter() - t0 + float((meta or {}).get("load_seconds", 0.0))
    with open(out_dir / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return summary
