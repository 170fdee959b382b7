"""The GPU check: every open GPU question answered by one prepared command that fits one device window.

    python benchmarks/gpu_check.py --out $OUT --commit abc1234    # one H200 or H100: done within ~8 min
    python benchmarks/gpu_check.py --cpu-rehearsal                # the same stages on a CPU, tiny shapes, < 3 min

Stages, in priority order (benchmarks/gpu_check_stages.py; each calls into the benchmark scripts and GPU tests):
  0 env          card, driver, versions, commit; the measured bf16 GEMM TFLOP/s and device-copy GB/s, which
                 every MFU and "% of ceiling" after it divides by
  1 correctness  the `gpu` tests, run by pytest: bf16 at real sizes, each error over the plain reference's own
                 (attention backends vs the dense truth, LM head at N=8192 D=4096 V=152064, whole model packed
                 vs unpacked, compact AdamW, LoRA); the optimizer step's time
  2 lm_head      LM-head benchmark at 8192x4096 and 2048x8192 (V=152064): eager, torch.compile, chunked,
                 triton, Liger where importable
  3 step_1p5b    training step at the Qwen2-1.5B shape: precomputed / live reference, activation
                 checkpointing on / off, pairs/s, tokens/s, MFU, peak memory, top-15 kernels of a profiled step
  4 step_8b      the Llama-3-8B shape with as many layers as fit: MFU
  5 trl          TRL's DPOTrainer vs fasttrain at the 1.5B shape (when trl imports: carried wheels)
  6 demo         fasttrain/run.py --demo on the device for a few steps: first loss ln 2, finishes, exports

Time. A global deadline (--budget-s, 480 s by default on a GPU, leaving a minute of the device's 9-minute
command limit for start-up) is split into the per-stage budgets of STAGES. Each stage runs in its own
subprocess (own process group) whose hard limit is its budget plus whatever the earlier stages left unused,
never the budgets kept for the stages after it. A stage that hangs is killed at its limit and reported as
"timed out after N s" with what it measured until then; one that crashes (OOM, a kernel error, a segfault) as
"failed: <first error line>"; either way the next stage runs. Stages can also read their own time left and
skip optional work, saying so.

Output. At most 8 files come back from the device; this writes 4 into --out (which must hold nothing else):
gpu_check.md (a section ready for benchmarks/RESULTS.md: card, date, commit, command, each stage's tables),
gpu_check.json (the same, machine-readable), gpu_check.log (everything printed, the stages' output
included) and gpu_check_profile.txt (the profiled step's top kernels). They are rewritten after every stage,
so a run cut short from outside keeps what it measured. The compact table of all stages prints last (only the
last 12,000 characters of output come back).

Commit: --commit, else the file benchmarks/COMMIT, else git (no .git travels to the device: pass --commit
there; the rehearsal prints the exact device command). The device image has torch, triton and
transformers but not this package: stages run from the tree through PYTHONPATH; trl / datasets / liger
come as wheels in .whl/ (benchmarks/fetch_wheels.sh, carried), installed into /tmp by the stages that use them.

--cpu-rehearsal: the same stages and code paths on the CPU (Triton kernels under TRITON_INTERPRET=1 in
fp32/fp16, since the interpreter's bf16 tl.dot is broken; CUDA hidden), tiny shapes, a 170 s budget; CI runs
it (tests/test_gpu_check.py), so a typo, a missing import or a wrong file count never costs device time.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib

REPO = benchlib.REPO
STAGES_FILE = Path(__file__).resolve().parent / "gpu_check_stages.py"
OUT_FILES = ("gpu_check.md", "gpu_check.json", "gpu_check.log", "gpu_check_profile.txt")
MAX_OUT_FILES = 8  # what the device returns from $OUT
DEFAULT_BUDGET_S = {"gpu": 480.0, "rehearsal": 170.0}
REPORT_RESERVE_S = 10.0  # kept back from the stages for writing the report at the end
MIN_STAGE_S = 5.0  # a stage with less than this (or half its budget, if smaller) left is skipped, not started


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    target: str  # "file.py:function", run in the stage's subprocess
    gpu_s: float  # budget at the default 480 s deadline (scaled with --budget-s)
    rehearsal_s: float  # budget in the 170 s rehearsal


# GPU budgets are estimates (no stage has run on a GPU yet): process start + imports ~10 s each; stage 1's float64
# truths and Triton compiles; stage 2's two torch.compile builds (~20 s each); stage 5 writes a 1.5B model and
# starts a worker process per variant (~40 s each, bench_vs_trl's estimate); they sum to 470 = 480 - reserve.
# Rehearsal budgets: ~3x what each stage took alone on a 2-core machine (3, 6, 8, 6, 4, 16, 13 s), room for a
# machine shared with other work.
STAGES = (
    Stage("env", "0. environment and ceilings", f"{STAGES_FILE}:stage_env", 25, 9),
    Stage("correctness", "1. bf16 correctness at real sizes", f"{STAGES_FILE}:stage_correctness", 70, 17),
    Stage("lm_head", "2. LM-head benchmark", f"{STAGES_FILE}:stage_lm_head", 85, 23),
    Stage("step_1p5b", "3. training step, Qwen2-1.5B shape", f"{STAGES_FILE}:stage_step_1p5b", 90, 17),
    Stage("step_8b", "4. training step, Llama-3-8B shape", f"{STAGES_FILE}:stage_step_8b", 50, 11),
    Stage("trl", "5. TRL DPOTrainer side by side, 1.5B shape", f"{STAGES_FILE}:stage_trl", 110, 46),
    Stage("demo", "6. fasttrain/run.py --demo", f"{STAGES_FILE}:stage_demo", 40, 37),
)


# ----------------------------------------------------------------------------------------------
# Child side: what a stage function gets
# ----------------------------------------------------------------------------------------------
class StageSkipped(Exception):
    """Raised through ``ctx.skip(reason)``: the stage cannot run here, reported as "skipped: <reason>"."""


class Table:
    def __init__(self, ctx: StageContext, spec: dict):
        self._ctx, self._spec = ctx, spec

    def add(self, *cells) -> None:
        """One row; saved at once, so a stage killed later keeps it."""
        if len(cells) != len(self._spec["columns"]):
            raise ValueError(f"table {self._spec['title']!r}: {len(cells)} cells for columns {self._spec['columns']}")
        self._spec["rows"].append([c if isinstance(c, (int, float)) or c is None else str(c) for c in cells])
        self._ctx.save()


class StageContext:
    """A stage's handle: tables, notes, checks, machine-readable data, artifacts, its time left. Everything is
    written to the result file as it is added (atomically), for the orchestrator to read even after a kill."""

    def __init__(self, result_path: Path, context: dict, deadline: float):
        self.result_path = result_path
        self.context = context  # from the orchestrator: rehearsal, commit, peak (stage 0's ceilings), ...
        self.rehearsal: bool = context["rehearsal"]
        self.deadline = deadline
        self.workdir = result_path.parent / result_path.stem  # scratch space, removed with the run's temp dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.failures: list[str] = []
        self.result = {"status": "running", "reason": "", "summary": "", "tables": [], "notes": [], "data": {},
                       "artifacts": {}}
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def table(self, title: str, columns: list[str]) -> Table:
        spec = {"title": title, "columns": list(columns), "rows": []}
        self.result["tables"].append(spec)
        self.save()
        return Table(self, spec)

    def note(self, text: str) -> None:
        print(f"[note] {text}", flush=True)
        self.result["notes"].append(text)
        self.save()

    def check(self, ok: bool, what: str) -> bool:
        """A correctness condition: a false one fails the stage (after it has run to the end)."""
        if not ok:
            print(f"[check failed] {what}", flush=True)
            self.failures.append(what)
        return ok

    def summary(self, text: str) -> None:
        self.result["summary"] = text
        self.save()

    def set(self, **values) -> None:
        self.result["data"].update(values)
        self.save()

    def artifact(self, name: str) -> Path:
        """A file the orchestrator copies into --out (only the names it knows: 'profile')."""
        path = self.workdir / f"{name}.txt"
        self.result["artifacts"][name] = str(path)
        self.save()
        return path

    def skip(self, reason: str):
        raise StageSkipped(reason)

    def finish(self, status: str | None = None, reason: str = "") -> None:
        if status is None:
            status = "failed" if self.failures else "ok"
            if self.failures:
                reason = f"{len(self.failures)} check(s) failed; first: {self.failures[0]}"
        self.result["status"], self.result["reason"] = status, reason
        self.save()

    def save(self) -> None:
        write_atomic(self.result_path, json.dumps(self.result, indent=1))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_target(target: str):
    file, func = target.rsplit(":", 1)
    name = Path(file).stem
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up there
    spec.loader.exec_module(module)
    return getattr(module, func)


def child_main(target: str, result_path: str, context_path: str, deadline: float) -> int:
    ctx = StageContext(Path(result_path), json.loads(Path(context_path).read_text()), deadline)
    try:
        load_target(target)(ctx)
    except StageSkipped as e:
        ctx.finish("skipped", str(e))
        return 0
    except BaseException as e:  # noqa: BLE001 -- any failure is the stage's result, reported by the orchestrator
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        ctx.finish("failed", benchlib.first_line(e))
        return 1
    ctx.finish()
    return 0 if ctx.result["status"] == "ok" else 1


# ----------------------------------------------------------------------------------------------
# Orchestrator side
# ----------------------------------------------------------------------------------------------
class Log:
    """Everything printed goes to stdout and to gpu_check.log."""

    def __init__(self, path: Path | None):
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if self._file:
                self._file.write(text)
                self._file.flush()

    def say(self, line: str = "") -> None:
        self.write(line + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()


def stage_budgets(stages, total_s: float, rehearsal: bool) -> list[float]:
    base = [s.rehearsal_s if rehearsal else s.gpu_s for s in stages]
    scale = max(total_s - REPORT_RESERVE_S, 0.0) / sum(base)
    return [b * scale for b in base]


def child_env(rehearsal: bool) -> dict:
    """Every stage is its own one-process run of this tree (the device image has no fasttrain installed); the
    rehearsal runs the kernels interpreted (TRITON_INTERPRET before anything imports triton) on the CPU even
    on a machine with a GPU."""
    env = benchlib.one_process_env(**({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""} if rehearsal else {}))
    if not rehearsal:
        env.pop("TRITON_INTERPRET", None)
    return env


def _error_line(lines) -> str:
    """The output's last line that names an error (a traceback's final line), else its last non-empty line."""
    lines = [line.rstrip() for line in lines if line.strip()]
    pattern = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt)|Killed|Segmentation fault)\b")
    for line in reversed(lines):
        if pattern.match(line):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def run_stage(stage: Stage, limit_s: float, context_path: Path, workdir: Path, log: Log, env: dict) -> dict:
    """Runs one stage in its own process group, kills the group at ``limit_s``; returns its result dict."""
    result_path = workdir / f"{stage.key}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage.target, "--result", str(result_path),
           "--context", str(context_path), "--deadline", repr(time.time() + limit_s)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)  # its own process group: a kill takes its children too
    tail: collections.deque[str] = collections.deque(maxlen=200)

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            tail.append(line)
            log.write(f"  | {line}" if line.endswith("\n") else f"  | {line}\n")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a hung CUDA call ignores SIGTERM; the group holds its workers
        except ProcessLookupError:
            pass
        rc = proc.wait()
    reader.join(timeout=10)  # a grandchild that left the group may hold the pipe: do not wait for it
    seconds = time.time() - t0
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"tables": [], "notes": [], "data": {}, "artifacts": {}, "summary": "", "status": "", "reason": ""}
    if timed_out:
        result["status"], result["reason"] = "timed out", f"timed out after {limit_s:.0f} s"
    elif result.get("status") in ("", "running"):  # died without reporting: OOM kill, segfault, os._exit
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        result["status"], result["reason"] = "failed", f"{how}; {_error_line(tail)}"
    result.update(key=stage.key, title=stage.title, seconds=round(seconds, 1), limit_s=round(limit_s, 1))
    return result


def run_stages(stages, budget_s: float, rehearsal: bool, context: dict, workdir: Path, log: Log,
               on_stage_done=None) -> list[dict]:
    """Runs the stages in order within ``budget_s`` wall seconds from now. A stage's limit is what is left of
    the deadline minus the budgets kept for the stages after it: its own budget plus what earlier ones left."""
    deadline = time.time() + budget_s
    budgets = stage_budgets(stages, budget_s, rehearsal)
    env = child_env(rehearsal)
    context_path = workdir / "context.json"
    results = []
    for i, stage in enumerate(stages):
        limit = deadline - time.time() - REPORT_RESERVE_S - sum(budgets[i + 1:])
        if limit <= 0 or limit < min(MIN_STAGE_S, budgets[i] / 2):
            result = {"key": stage.key, "title": stage.title, "status": "skipped", "seconds": 0.0, "limit_s": 0.0,
                      "reason": f"global deadline: {max(limit, 0):.0f} s left for it", "tables": [], "notes": [],
                      "data": {}, "artifacts": {}, "summary": ""}
        else:
            log.say(f"\n=== stage {stage.title}: limit {limit:.0f} s (budget {budgets[i]:.0f} s) ===")
            write_atomic(context_path, json.dumps(context))
            result = run_stage(stage, limit, context_path, workdir, log, env)
        log.say(f"=== stage {stage.title}: {status_text(result)} in {result['seconds']:.0f} s ===")
        results.append(result)
        if stage.key == "env" and result["status"] == "ok":
            context.update(result["data"].get("context_for_later_stages", {}))
        if on_stage_done:
            on_stage_done(results)
    return results


def status_text(result: dict) -> str:
    if result["status"] in ("ok",):
        return "ok"
    if result["status"] == "timed out":
        return result["reason"]
    return f"{result['status']}: {result['reason']}"


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def summary_rows(results: list[dict]) -> list[list[str]]:
    """stage, short status, time, and the summary (or, for a stage that did not finish well, why)."""
    rows = []
    for r in results:
        short = r["reason"] if r["status"] == "timed out" else r["status"]
        why = r.get("summary", "") if r["status"] == "ok" else r["reason"]
        rows.append([r["title"], short, f"{r['seconds']:.0f} / {r['limit_s']:.0f} s",
                     why if len(why) <= 200 else why[:197] + "..."])
    return rows


def header_lines(meta: dict, results: list[dict]) -> list[str]:
    env = next((r["data"] for r in results if r["key"] == "env" and r["status"] == "ok"), None)
    lines = [f"- date: {meta['date']}", f"- commit: {meta['commit']} ({meta['commit_source']})",
             f"- command: `{meta['command']}`"]
    if env:
        lines[0:0] = [f"- card: {env.get('card_line', '?')}", f"- software: {env.get('software_line', '?')}"]
        lines.append(f"- ceilings (stage 0): {env.get('ceilings_line', '?')}")
    else:
        lines.insert(0, "- card: unknown (stage 0 did not finish)")
    lines.append(f"- time: {meta['wall_s']:.0f} s of the {meta['budget_s']:.0f} s budget"
                 + ("" if meta.get("finished") else " (still running when this was written)"))
    return lines


def render_markdown(meta: dict, results: list[dict]) -> str:
    env = next((r["data"] for r in results if r["key"] == "env" and r["status"] == "ok"), {})
    title = "CPU rehearsal" if meta["rehearsal"] else env.get("card", "GPU")
    md = [f"### gpu_check: {title}, {meta['date'][:10]}", ""] + header_lines(meta, results) + [""]
    md += [benchlib.markdown_table([["stage", "status", "time / limit", "result"]] + summary_rows(results))]
    for r in results:
        md += ["", f"#### {r['title']}", "", f"status: {status_text(r)}"]
        for table in r.get("tables", []):
            md += ["", f"{table['title']}:", "", benchlib.markdown_table([table["columns"]] + table["rows"])]
        if r.get("notes"):
            md += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(md) + "\n"


def write_report(out: Path, meta: dict, results: list[dict]) -> None:
    write_atomic(out / "gpu_check.md", render_markdown(meta, results))
    write_atomic(out / "gpu_check.json", json.dumps({**meta, "stages": results}, indent=1))
    profiles = [(r["title"], Path(r["artifacts"]["profile"])) for r in results
                if r.get("artifacts", {}).get("profile") and Path(r["artifacts"]["profile"]).is_file()]
    if profiles:
        write_atomic(out / "gpu_check_profile.txt",
                     "\n\n".join(f"== {title}\n{path.read_text()}" for title, path in profiles))


def check_out_dir(out: Path) -> None:
    """--out may hold only this script's own files: the device returns at most 8."""
    out.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
    if others:
        raise SystemExit(f"gpu_check: --out {out} holds other files ({', '.join(others[:5])}); the device returns "
                         f"at most {MAX_OUT_FILES} files: use an empty folder")
    for name in OUT_FILES:
        (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="folder for the 4 result files (default: $OUT; the rehearsal: a temp folder)")
    ap.add_argument("--commit", help="the commit being checked (no .git on the device); else benchmarks/COMMIT, "
                                     "else git")
    ap.add_argument("--budget-s", type=float, help="global deadline in seconds (default 480 on a GPU, 170 for "
                                                   "the rehearsal); stage budgets scale with it")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="same stages on the CPU, tiny shapes")
    ap.add_argument("--stages", help="comma list of stage keys to run (default: all, in order)")
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)  # child mode: FILE:FUNCTION
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--context", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_stage:
        return child_main(args.run_stage, args.result, args.context, args.deadline)
    t0 = time.time()
    rehearsal = args.cpu_rehearsal
    budget = args.budget_s or DEFAULT_BUDGET_S["rehearsal" if rehearsal else "gpu"]
    stages = list(STAGES)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.key for s in STAGES})
        if unknown:
            print(f"gpu_check: unknown stage(s) {unknown}; have {[s.key for s in STAGES]}", file=sys.stderr)
            return 2
        stages = [s for s in STAGES if s.key in wanted]
    commit = benchlib.resolve_commit(args.commit)
    if commit is None:
        print("gpu_check: no commit: pass --commit HASH or write it to benchmarks/COMMIT (no .git travels to the "
              "device)", file=sys.stderr)
        return 2
    if not rehearsal:
        import torch  # only to refuse early: the stages import it in their own processes

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU here; on a CPU run --cpu-rehearsal", file=sys.stderr)
            return 2
    out_arg = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="gpu_check-rehearsal-") if rehearsal
                                                    else None)
    if not out_arg:
        print("gpu_check: pass --out DIR (or set $OUT)", file=sys.stderr)
        return 2
    out = Path(out_arg).resolve()
    check_out_dir(out)
    command = "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    meta = {"rehearsal": rehearsal, "commit": commit[0], "commit_source": commit[1], "command": command.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "budget_s": budget, "wall_s": 0.0, "finished": False}
    context = {"rehearsal": rehearsal, "commit": commit[0], "peak_tflops": None, "peak_source": None}
    log = Log(out / "gpu_check.log")
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-work-"))
    try:
        log.say(f"gpu_check{' --cpu-rehearsal' if rehearsal else ''}: {len(stages)} stages, budget {budget:.0f} s, "
                f"commit {commit[0]} ({commit[1]}), out {out}")

        def progress(results):
            meta["wall_s"] = time.time() - t0
            write_report(out, meta, results)

        results = run_stages(stages, budget - (time.time() - t0), rehearsal, context, workdir, log, progress)
        meta.update(wall_s=time.time() - t0, finished=True)
        write_report(out, meta, results)
        log.say("\n" + render_markdown(meta, results))
        files = sorted(p.name for p in out.iterdir())
        if len(files) > MAX_OUT_FILES:  # cannot happen with check_out_dir; a regression must not go unseen
            raise SystemExit(f"gpu_check: {len(files)} files in {out}, more than the {MAX_OUT_FILES} that come back")
        bad = [r["key"] for r in results if r["status"] in ("failed", "timed out")]
        # the compact table last: the device returns only the last 12,000 characters of output
        log.say(f"\n== gpu_check {'CPU rehearsal' if rehearsal else 'GPU'}: {meta['wall_s']:.0f} s of {budget:.0f} s, "
                f"commit {commit[0]}, files in {out}: {', '.join(files)}")
        if rehearsal and commit[1] == "git":
            log.say(f"== on the device (no git there): python3 benchmarks/gpu_check.py --out $OUT --commit {commit[0]}"
                    + ("   (carry .whl)" if (REPO / ".whl").is_dir() else ""))
        log.say(benchlib.text_table([["stage", "status", "time / limit", "result"]] + summary_rows(results)))
        log.say(f"== {'all stages ok or skipped' if not bad else 'failed or timed out: ' + ', '.join(bad)}")
        return 1 if bad else 0
    finally:
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
