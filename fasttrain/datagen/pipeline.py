"""The paper's three data-generation stages and the resumable driver.

1. :func:`collect_errors` -- sample ``samples`` solutions per problem (assistant prefilled with
   ``"Let's think step by step.\\nStep 1:"``, temperature 0.8, top_p 0.95) and keep the distinct
   ones whose extracted final answer is wrong. A text without an explicit final answer (``\\boxed``,
   "answer is", ``####``) -- typically cut off by ``max_new_tokens`` -- is "unfinished": neither an error
   nor a success, in all three stages (``--allow-unfinished`` turns this off).
2. step localization -- a :class:`~fasttrain.datagen.judge.StepJudge` (default: rollouts, see
   :mod:`fasttrain.datagen.judge` for the rule) names the first wrong step ``k``.
3. :func:`rectify` -- from the correct prefix (``"...Step k:"``) sample ``rectify`` continuations; those
   reaching the right answer give ``chosen`` = their first step; ``rejected`` = the wrong step ``k``.

:func:`run_datagen` writes ``OUT/records.jsonl`` (Step-DPO records, DESIGN §2 fields plus provenance,
deduplicated by (prompt, initial_reason_steps, chosen, rejected)), ``OUT/progress.jsonl`` (one line per
finished problem), ``OUT/config.json`` and ``OUT/summary.json``. Both JSONL files are append-only; a
rerun with the same ``OUT`` skips finished problems and never writes a record already present (a torn
last line from a crash is cut off). Seeds are derived per problem from (seed, problem idx), so a
problem's samples do not depend on which other problems ran before it.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from fasttrain.data.templates import render_prompt
from fasttrain.datagen.judge import FINAL_ANSWER_RE, RolloutJudge, StepJudge
from fasttrain.datagen.steps import SplitSolution, first_step, split_steps
from fasttrain.eval.evaluate import DEFAULT_PREFILL, Problem, grade

__all__ = [
    "DatagenConfig",
    "WrongSolution",
    "collect_errors",
    "problem_seed",
    "process_problem",
    "rectify",
    "run_datagen",
]


@dataclass
class DatagenConfig:
    template: str = "qwen2-boxed"
    prefill: str = DEFAULT_PREFILL
    samples: int = 8
    rollouts: int = 4
    rectify: int = 20
    threshold: float = 0.0
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    max_wrong_per_problem: int = 4
    max_steps: int = 12
    require_final_answer: bool = True
    seed: int = 0
    source_model: str = ""


@dataclass
class WrongSolution:
    sample_id: int
    text: str           # prefill + completion
    extracted: str | None


def solved(text: str, problem: Problem, cfg: DatagenConfig) -> tuple[str | None, bool, bool]:
    """(extracted answer, has an explicit final answer, correct). With ``cfg.require_final_answer`` a text
    counts as finished only with an explicit final answer (``\\boxed``, "answer is", ``####``): a
    solution cut off by ``max_new_tokens`` is neither a wrong solution nor a success, so the last-number
    fallback of ``extract_answer`` cannot turn a truncated text into an "error" or a lucky success."""
    pred, ok = grade(text, problem.answers)
    final = bool(FINAL_ANSWER_RE.search(text)) or not cfg.require_final_answer
    return pred, final, ok and final


def problem_seed(seed: int, idx: str, stage: str, i: int = 0) -> int:
    return zlib.crc32(f"{seed}|{idx}|{stage}|{i}".encode()) & 0x7FFFFFFF


def collect_errors(generator, problem: Problem, cfg: DatagenConfig,
                   tokenizer=None) -> tuple[list[WrongSolution], int, int]:
    """Stage 1: (distinct wrong solutions in sample order, number of correct samples, number of samples
    without an explicit final answer -- see :func:`solved`)."""
    prompt = render_prompt(cfg.template, problem.question, cfg.prefill, tokenizer=tokenizer)
    outs = generator.generate([prompt], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, n=cfg.samples, seed=problem_seed(cfg.seed, problem.idx, "collect"))[0]
    wrong, seen, n_ok, n_unfinished = [], set(), 0, 0
    for i, c in enumerate(outs):
        text = cfg.prefill + c
        pred, final, ok = solved(text, problem, cfg)
        if ok:
            n_ok += 1
        elif not final:
            n_unfinished += 1
        elif text not in seen:
            seen.add(text)
            wrong.append(WrongSolution(i, text, pred))
    return wrong, n_ok, n_unfinished


def rectify(generator, problem: Problem, solution: SplitSolution, k: int, cfg: DatagenConfig, seed: int,
            tokenizer=None) -> list[tuple[int, str, str]]:
    """Stage 3: [(rectify sample id, chosen step, full continuation)] for continuations from ``"...Step k:"``
    that reach a right answer, with a non-empty first step different from the rejected one."""
    prefix = solution.prefix_through_label(k)
    rejected = solution.step(k)
    prompt = render_prompt(cfg.template, problem.question, prefix, tokenizer=tokenizer)
    outs = generator.generate([prompt], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, n=cfg.rectify, seed=seed)[0]
    res = []
    for j, c in enumerate(outs):
        if not solved(prefix + c, problem, cfg)[2]:
            continue
        chosen = first_step(c)
        if not chosen.strip() or chosen.strip() == rejected.strip():
            continue
        res.append((j, chosen, c.rstrip()))
    return res


def process_problem(generator, judge: StepJudge, problem: Problem, cfg: DatagenConfig, tokenizer=None):
    """All three stages for one problem: (records, stats). Records are deduplicated within the problem."""
    st = {"samples": cfg.samples, "wrong": 0, "correct": 0, "localized": 0, "dropped_no_success": 0,
          "dropped_too_many_steps": 0, "dropped_judge": 0, "rectified": 0, "pairs": 0,
          "unfinished": 0}
    wrong, st["correct"], st["unfinished"] = collect_errors(generator, problem, cfg, tokenizer)
    st["wrong"] = len(wrong)

    records, keys = [], set()
    for w in wrong[: cfg.max_wrong_per_problem]:
        sol = split_steps(w.text)
        if sol.n_steps == 0 or sol.n_steps > cfg.max_steps:
            st["dropped_too_many_steps"] += 1
            continue
        loc = judge.locate(problem, sol, problem_seed(cfg.seed, problem.idx, "locate", w.sample_id))
        if loc.first_wrong_step is None:
            st["dropped_no_success" if loc.reason == "no_success" else "dropped_judge"] += 1
            continue
        k = loc.first_wrong_step
        rejected = sol.step(k)
        if not rejected.strip():
            st["dropped_judge"] += 1
            continue
        st["localized"] += 1
        rseed = problem_seed(cfg.seed, problem.idx, "rectify", w.sample_id)
        fixes = rectify(generator, problem, sol, k, cfg, rseed, tokenizer)
        st["rectified"] += bool(fixes)
        for j, chosen, full in fixes:
            rec = {
                "id": f"{problem.idx}-s{w.sample_id}-step{k}-r{j}",
                "prompt": problem.question,
                "initial_reason_steps": sol.prefix_through_label(k),
                "chosen": chosen,
                "rejected": rejected,
                "full_chosen": full,
                "full_rejected": sol.rest_from(k),
                "answer": problem.answers[0],
                "dataset": problem.source,
                "source_model": cfg.source_model,
                "problem_idx": problem.idx,
                "sample_id": w.sample_id,
                "rectify_sample_id": j,
                "first_wrong_step": k,
                "rollout_success_rates": loc.success_rates,
                "seed": cfg.seed,
                "locate_seed": problem_seed(cfg.seed, problem.idx, "locate", w.sample_id),
                "rectify_seed": rseed,
            }
            key = record_key(rec)
            if key not in keys:
                keys.add(key)
                records.append(rec)
    st["pairs"] = len(records)
    return records, st


def record_key(rec: dict) -> tuple:
    return (rec["prompt"], rec["initial_reason_steps"], rec["chosen"], rec["rejected"])


def _read_jsonl(path: Path) -> list[dict]:
    """Read an append-only JSONL file; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        print(f"[fasttrain.datagen] {path}: cutting a torn last line ({len(data) - good} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(good)
    rows = []
    for lineno, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
    return rows


RESUME_KEYS = ("template", "prefill", "samples", "rollouts", "rectify", "threshold", "temperature", "top_p",
               "max_new_tokens", "max_wrong_per_problem", "max_steps", "require_final_answer", "seed")


def run_datagen(generator, problems: list[Problem], out_dir, cfg: DatagenConfig, judge: StepJudge | None = None,
                tokenizer=None, progress: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = [k for k in RESUME_KEYS if k in old and old[k] != asdict(cfg)[k]]
        if diff:
            raise ValueError(f"{out} was started with different settings ({', '.join(f'{k}: {old[k]!r}' for k in diff)}); "
                             "use the same settings to resume, or another --out")
    else:
        cfg_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if judge is None:
        judge = RolloutJudge(generator, cfg.template, cfg.rollouts, cfg.threshold, cfg.max_new_tokens,
                             cfg.temperature, cfg.top_p, tokenizer, require_final_answer=cfg.require_final_answer)
    rec_path, prog_path = out / "records.jsonl", out / "progress.jsonl"
    rec_path.touch()
    prog_path.touch()
    keys = {record_key(r) for r in _read_jsonl(rec_path)}
    done = {str(r["problem_idx"]) for r in _read_jsonl(prog_path)}
    todo = [p for p in problems if p.idx not in done]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="problems", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    t0 = time.perf_counter()
    for p in todo:
        recs, st = process_problem(generator, judge, p, cfg, tokenizer)
        new = [r for r in recs if record_key(r) not in keys]
        st["duplicates_skipped"] = len(recs) - len(new)
        if new:
            with open(rec_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
                f.flush()
                os.fsync(f.fileno())
            keys.update(record_key(r) for r in new)
        with open(prog_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"problem_idx": p.idx, "written": len(new), **st}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    prog = _read_jsonl(prog_path)
    totals: dict = {"problems_total": len(problems), "problems_done": len(prog),
                    "problems_this_run": len(todo), "records": len(keys), "seconds_this_run": time.perf_counter() - t0}
    for r in prog:
        for k, v in r.items():
            if k not in ("problem_idx",) and isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    (out / "summary.json").write_text(json.dumps(totals, indent=2) + "\n")
    return totals
