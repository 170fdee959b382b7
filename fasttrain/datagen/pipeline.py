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
last line from a crash is cut off).

Batching across problems: ``problems_per_call`` problems (consecutive in the problem file) form a chunk,
and each stage is ONE ``generate`` call for the whole chunk (stage 1: every problem's samples; stage 2:
every kept wrong solution's prefixes, when the judge is a
:class:`~fasttrain.datagen.judge.BatchStepJudge`; stage 3: every localized solution's rectifications),
so the generator gets batches of hundreds of sequences instead of one problem's 8-20. A chunk's
records and progress lines are written when the whole chunk is done (a crash loses at most one chunk).
Seeds: each call's seed is derived from (seed, stage, the problem idx / sample ids it covers) -- with one
problem and one solution per call that is (seed, problem idx, stage, sample id) -- and chunks are cut
from the whole problem list, not from what is left to do, so a resumed run makes the same calls as an
uninterrupted one (except for a chunk that was partly written when the crash came).
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
from fasttrain.datagen.judge import (
    FINAL_ANSWER_RE,
    BatchStepJudge,
    Localization,
    RolloutJudge,
    StepJudge,
)
from fasttrain.datagen.steps import SplitSolution, first_step, split_steps
from fasttrain.eval.evaluate import DEFAULT_PREFILL, Problem, grade

__all__ = [
    "DatagenConfig",
    "WrongSolution",
    "call_seed",
    "collect_errors",
    "problem_seed",
    "process_problem",
    "process_problems",
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
    problems_per_call: int = 1  # problems whose sampling shares one generate call per stage (module doc)

    def __post_init__(self):
        # named as the field and as the datagen command's flag, which builds this config before any work
        for name in ("samples", "rollouts", "rectify", "max_new_tokens", "max_wrong_per_problem", "max_steps",
                     "problems_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold (--threshold) must be in [0, 1), got {self.threshold}")


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


def call_seed(seed: int, stage: str, keys: list[tuple[str, int]]) -> int:
    """The seed of one ``generate`` call covering ``keys`` = [(problem idx, sample id)]: the per-problem
    :func:`problem_seed` when the call covers one item, else a hash of all of them."""
    if len(keys) == 1:
        return problem_seed(seed, keys[0][0], stage, keys[0][1])
    return zlib.crc32(f"{seed}|{stage}|{','.join(f'{idx}#{i}' for idx, i in keys)}".encode()) & 0x7FFFFFFF


def _wrong_solutions(outs: list[str], problem: Problem, cfg: DatagenConfig) -> tuple[list[WrongSolution], int, int]:
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


def collect_errors_many(generator, problems: list[Problem], cfg: DatagenConfig,
                        tokenizer=None) -> list[tuple[list[WrongSolution], int, int]]:
    """Stage 1 for several problems in one ``generate`` call; per problem as :func:`collect_errors`."""
    prompts = [render_prompt(cfg.template, p.question, cfg.prefill, tokenizer=tokenizer) for p in problems]
    seed = call_seed(cfg.seed, "collect", [(p.idx, 0) for p in problems])
    outs = generator.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, n=cfg.samples, seed=seed)
    return [_wrong_solutions(o, p, cfg) for p, o in zip(problems, outs)]


def collect_errors(generator, problem: Problem, cfg: DatagenConfig,
                   tokenizer=None) -> tuple[list[WrongSolution], int, int]:
    """Stage 1: (distinct wrong solutions in sample order, number of correct samples, number of samples
    without an explicit final answer -- see :func:`solved`)."""
    return collect_errors_many(generator, [problem], cfg, tokenizer)[0]


def _fixes(outs: list[str], problem: Problem, solution: SplitSolution, k: int,
           cfg: DatagenConfig) -> list[tuple[int, str, str]]:
    prefix, rejected = solution.prefix_through_label(k), solution.step(k)
    res = []
    for j, c in enumerate(outs):
        if not solved(prefix + c, problem, cfg)[2]:
            continue
        chosen = first_step(c)
        if not chosen.strip() or chosen.strip() == rejected.strip():
            continue
        res.append((j, chosen, c.rstrip()))
    return res


def rectify_many(generator, items: list[tuple[Problem, SplitSolution, int]], cfg: DatagenConfig, seed: int,
                 tokenizer=None) -> list[list[tuple[int, str, str]]]:
    """Stage 3 for several (problem, solution, first wrong step k) in one ``generate`` call."""
    if not items:
        return []
    prompts = [render_prompt(cfg.template, p.question, sol.prefix_through_label(k), tokenizer=tokenizer)
               for p, sol, k in items]
    outs = generator.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, n=cfg.rectify, seed=seed)
    return [_fixes(o, p, sol, k, cfg) for (p, sol, k), o in zip(items, outs)]


def rectify(generator, problem: Problem, solution: SplitSolution, k: int, cfg: DatagenConfig, seed: int,
            tokenizer=None) -> list[tuple[int, str, str]]:
    """Stage 3: [(rectify sample id, chosen step, full continuation)] for continuations from ``"...Step k:"``
    that reach a right answer, with a non-empty first step different from the rejected one."""
    return rectify_many(generator, [(problem, solution, k)], cfg, seed, tokenizer)[0]


def _locate(judge: StepJudge, cands: list[tuple[Problem, WrongSolution, SplitSolution]],
            cfg: DatagenConfig) -> list[tuple[Localization, int]]:
    """(localization, the seed it was made with) per candidate: one call for a :class:`BatchStepJudge`,
    else one ``locate`` per candidate with its own per-problem seed."""
    if not cands:
        return []
    if isinstance(judge, BatchStepJudge):
        seed = call_seed(cfg.seed, "locate", [(p.idx, w.sample_id) for p, w, _ in cands])
        return [(loc, seed) for loc in judge.locate_many([(p, sol) for p, _, sol in cands], seed)]
    out = []
    for p, w, sol in cands:
        seed = problem_seed(cfg.seed, p.idx, "locate", w.sample_id)
        out.append((judge.locate(p, sol, seed), seed))
    return out


def _new_stats(cfg: DatagenConfig) -> dict:
    return {"samples": cfg.samples, "wrong": 0, "correct": 0, "localized": 0, "dropped_no_success": 0,
            "dropped_too_many_steps": 0, "dropped_judge": 0, "rectified": 0, "pairs": 0, "unfinished": 0}


def _record(problem: Problem, w: WrongSolution, sol: SplitSolution, k: int, loc: Localization, locate_seed: int,
            rectify_seed: int, fix: tuple[int, str, str], cfg: DatagenConfig) -> dict:
    j, chosen, full = fix
    return {
        "id": f"{problem.idx}-s{w.sample_id}-step{k}-r{j}",
        "prompt": problem.question,
        "initial_reason_steps": sol.prefix_through_label(k),
        "chosen": chosen,
        "rejected": sol.step(k),
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
        "locate_seed": locate_seed,
        "rectify_seed": rectify_seed,
    }


def process_problems(generator, judge: StepJudge, problems: list[Problem], cfg: DatagenConfig,
                     tokenizer=None) -> list[tuple[list[dict], dict]]:
    """All three stages for a chunk of problems, one ``generate`` call per stage (module doc):
    (records, stats) per problem, in order. Records are deduplicated within each problem."""
    stats = [_new_stats(cfg) for _ in problems]
    cands: list[tuple[int, WrongSolution, SplitSolution]] = []  # (problem index, wrong solution, its steps)
    for pi, (wrong, n_ok, n_unfinished) in enumerate(collect_errors_many(generator, problems, cfg, tokenizer)):
        st = stats[pi]
        st["correct"], st["unfinished"], st["wrong"] = n_ok, n_unfinished, len(wrong)
        for w in wrong[: cfg.max_wrong_per_problem]:
            sol = split_steps(w.text)
            if sol.n_steps == 0 or sol.n_steps > cfg.max_steps:
                st["dropped_too_many_steps"] += 1
                continue
            cands.append((pi, w, sol))

    located = []  # (problem index, wrong solution, steps, k, localization, locate seed)
    locs = _locate(judge, [(problems[pi], w, sol) for pi, w, sol in cands], cfg)
    for (pi, w, sol), (loc, lseed) in zip(cands, locs):
        st = stats[pi]
        k = loc.first_wrong_step
        if k is None:
            st["dropped_no_success" if loc.reason == "no_success" else "dropped_judge"] += 1
            continue
        if not sol.step(k).strip():
            st["dropped_judge"] += 1
            continue
        st["localized"] += 1
        located.append((pi, w, sol, k, loc, lseed))

    rseed = call_seed(cfg.seed, "rectify", [(problems[pi].idx, w.sample_id) for pi, w, *_ in located])
    fixes = rectify_many(generator, [(problems[pi], sol, k) for pi, _, sol, k, _, _ in located], cfg, rseed,
                         tokenizer)
    records: list[list[dict]] = [[] for _ in problems]
    keys: list[set] = [set() for _ in problems]
    for (pi, w, sol, k, loc, lseed), fx in zip(located, fixes):
        stats[pi]["rectified"] += bool(fx)
        for fix in fx:
            rec = _record(problems[pi], w, sol, k, loc, lseed, rseed, fix, cfg)
            key = record_key(rec)
            if key not in keys[pi]:
                keys[pi].add(key)
                records[pi].append(rec)
    for st, recs in zip(stats, records):
        st["pairs"] = len(recs)
    return list(zip(records, stats))


def process_problem(generator, judge: StepJudge, problem: Problem, cfg: DatagenConfig, tokenizer=None):
    """All three stages for one problem: (records, stats). Records are deduplicated within the problem."""
    return process_problems(generator, judge, [problem], cfg, tokenizer)[0]


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


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _chunks(problems: list[Problem], done: set[str], size: int) -> list[list[Problem]]:
    """Consecutive chunks of the WHOLE problem list (so a resume makes the same chunks), minus finished problems."""
    chunks = ([p for p in problems[s:s + size] if p.idx not in done] for s in range(0, len(problems), size))
    return [c for c in chunks if c]


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
            changed = ", ".join(f"{k}: {old[k]!r}" for k in diff)
            raise ValueError(f"{out} was started with different settings ({changed}); "
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
    for chunk in _chunks(problems, done, cfg.problems_per_call):
        new_all, lines = [], []
        for p, (recs, st) in zip(chunk, process_problems(generator, judge, chunk, cfg, tokenizer)):
            new = [r for r in recs if record_key(r) not in keys]
            st["duplicates_skipped"] = len(recs) - len(new)
            keys.update(record_key(r) for r in new)
            new_all.extend(new)
            lines.append({"problem_idx": p.idx, "written": len(new), **st})
        # records before progress: a crash in between redoes the chunk and the dedup drops the repeats
        _append_jsonl(rec_path, new_all)
        _append_jsonl(prog_path, lines)
        if bar is not None:
            bar.update(len(chunk))
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
