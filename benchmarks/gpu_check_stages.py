"""The stages of benchmarks/gpu_check.py. Each ``stage_*(ctx)`` runs in its own process and calls into the
benchmark scripts and the GPU tests (imported, not copied); ``ctx.rehearsal`` picks the CPU rehearsal's tiny
shapes, everything else is the same code. ``ctx`` is gpu_check.StageContext: tables, notes, checks (a false
check fails the stage once it has run to the end), ``ctx.skip(reason)``, ``ctx.time_left()``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import torch
from benchlib import GIB, first_line, fmt, pct

REPO = benchlib.REPO
# benchmarks/ and tests/ are not packages: their modules are imported by name (tests/ last: its helpers'
# names, e.g. "weights", must not shadow anything installed)
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.append(str(REPO / "tests"))
WHEEL_TARGET = Path("/tmp/fasttrain-wheels")
LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def get_device(ctx):
    if ctx.rehearsal:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device in this stage's process (torch.cuda.is_available() is False)")
    return torch.device("cuda", 0)


def peak_args(ctx) -> list[str]:
    """The MFU denominator for the benchmark scripts: stage 0's measured ceiling when it ran."""
    peak = ctx.context.get("peak_tflops")
    return ["--peak-tflops", repr(peak)] if peak else []


def peak_note(ctx) -> str:
    if ctx.rehearsal:
        return "MFU: n/a on the CPU"
    if ctx.context.get("peak_tflops"):
        return f"MFU = model FLOPs / (time x {ctx.context['peak_tflops']:.0f} TFLOP/s, {ctx.context['peak_source']})"
    return "MFU against fasttrain.flops.peak_bf16_tflops' value for the card (stage 0 did not measure a ceiling)"


def ensure_wheels(ctx) -> None:
    """trl / datasets / liger-kernel from the carried .whl/ (benchmarks/fetch_wheels.sh), installed once per
    machine into /tmp and put on this process's path and its children's."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        ctx.note("no wheels in .whl/: trl, datasets and liger-kernel come only from the image "
                 "(run benchmarks/fetch_wheels.sh and carry .whl)")
        return
    marker = WHEEL_TARGET / ".installed"
    names = "\n".join(w.name for w in wheels)
    if not (marker.is_file() and marker.read_text() == names):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(WHEEL_TARGET), *map(str, wheels)], check=True)
        marker.write_text(names)
        ctx.note(f"installed {len(wheels)} carried wheels into {WHEEL_TARGET}")
    if str(WHEEL_TARGET) not in sys.path:
        sys.path.insert(0, str(WHEEL_TARGET))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WHEEL_TARGET), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()


# ----------------------------------------------------------------------------------------------
# 0. Environment and ceilings
# ----------------------------------------------------------------------------------------------
def driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown (no nvidia-smi)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else \
        f"unknown (nvidia-smi: {out.stderr.strip()[:80]})"


def time_gemm(dev, n: int, reps: int) -> float:
    """Median seconds of an n x n x n bf16 matmul on random data (3 warm-ups)."""
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    return benchlib.median_seconds(lambda: torch.matmul(a, b, out=c), dev, 3, reps)


def time_copy(dev, nbytes: int, reps: int) -> float:
    """Median seconds of copying an ``nbytes`` tensor into another on the device (3 warm-ups)."""
    src = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return benchlib.median_seconds(lambda: dst.copy_(src), dev, 3, reps)


def stage_env(ctx) -> None:
    from fasttrain.flops import peak_bf16_tflops

    dev = get_device(ctx)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "CUDA (torch build)": torch.version.cuda or "none (CPU build)",
                **benchlib.versions("triton", "transformers", "numpy", "flash-attn", check_import=True)}
    table = ctx.table("software", ["package", "version"])
    for name, v in versions.items():
        table.add(name, v)

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        card = props.name
        card_info = {"card": card, "memory": f"{props.total_memory / GIB:.1f} GiB",
                     "multiprocessors": props.multi_processor_count,
                     "compute capability": f"{props.major}.{props.minor}", "driver": driver_version()}
    else:
        card = benchlib.device_name(dev)
        card_info = {"card": card, "driver": "none (CPU rehearsal)"}
    card_info["commit"] = ctx.context["commit"]
    table = ctx.table("machine", ["what", "value"])
    for k, v in card_info.items():
        table.add(k, v)

    # Ceilings: an 8192^3 bf16 GEMM (as DESIGN §6 measured the H100) and a 2 GiB device-to-device copy
    n, copy_bytes, reps = (512, 64 * 2**20, 3) if ctx.rehearsal else (8192, 2 * GIB, 20)
    gemm_s, copy_s = time_gemm(dev, n, reps), time_copy(dev, copy_bytes, reps)
    tflops = 2 * n**3 / gemm_s / 1e12
    gbps = 2 * copy_bytes / copy_s / 1e9  # bytes read + written
    listed = peak_bf16_tflops(card) if dev.type == "cuda" else None
    table = ctx.table("ceilings (measured here; every MFU and % of ceiling after this divides by them)",
                      ["what", "size", "median", "measured", "fasttrain.flops table for this card"])
    table.add("bf16 GEMM", f"{n}x{n}x{n}", f"{gemm_s * 1e3:.3f} ms", f"{tflops:.1f} TFLOP/s",
              "n/a (CPU)" if listed is None else f"{fmt(listed.tflops, 'g', 'none')} ({listed.source})")
    table.add("device copy", f"{copy_bytes / 2**20:.0f} MiB", f"{copy_s * 1e3:.3f} ms",
              f"{gbps:.0f} GB/s (read + write)", "–")
    ctx.check(tflops > 0 and gbps > 0, "ceilings measured as zero")
    on_gpu = dev.type == "cuda"
    source = f"measured in stage 0 ({n}^3 bf16 GEMM, median of {reps})"
    details = ", ".join(f"{k} {v}" for k, v in card_info.items() if k not in ("card", "commit"))
    ctx.set(card=card, card_line=f"{card} ({details})",
            software_line=", ".join(f"{k} {v}" for k, v in versions.items()),
            ceilings_line=f"bf16 GEMM {tflops:.1f} TFLOP/s, device copy {gbps:.0f} GB/s (read + write)",
            bf16_tflops=tflops, copy_gbps=gbps, table_tflops=listed.tflops if listed else None,
            table_source=listed.source if listed else None,
            # CPU numbers are no MFU denominator: the benchmark scripts report MFU on CUDA only
            context_for_later_stages={"peak_tflops": tflops if on_gpu else None,
                                      "peak_source": source if on_gpu else None, "copy_gbps": gbps, "card": card})
    vs = (f" ({tflops / listed.tflops:.2f}x the table's {listed.tflops:g}, {listed.source.split(':')[0]})"
          if listed and listed.tflops else "")
    ctx.summary(f"{card}: bf16 GEMM {tflops:.3g} TFLOP/s{vs}, copy {gbps:.3g} GB/s")


# ----------------------------------------------------------------------------------------------
# 1. bf16 correctness at real sizes: the GPU tests themselves
# ----------------------------------------------------------------------------------------------
# The quick checks first and the attention grid (the longest, ~35 s) last, so a short budget cuts attention cases
GPU_TESTS = ["tests/test_lm_head_kernel.py::test_gpu_bf16_realistic",
             "tests/test_attention_gpu.py::test_whole_model_packed_logps_bf16_cuda",
             "tests/test_compact_adamw.py::test_compact_adamw_on_cuda_rounds_like_the_cpu_and_matches_torch_adamw",
             "tests/test_lora.py::test_lora_bf16_cuda",
             "tests/test_attention_gpu.py::test_prefix_shared_attention_bf16_against_float64_truth"]
# The rehearsal: the same tests (skipped without CUDA) and one attention case that runs on the CPU
REHEARSAL_TESTS = GPU_TESTS[:-1] + [f"{GPU_TESTS[-1]}[random_groups-8-64-{b}]" for b in ("reference", "torch_varlen")]


class TestsToTable:
    """A pytest plugin: every test's outcome and what it recorded (``record_property``: its error over the
    reference's) as a row of the stage's table the moment it ends; stops the session when the stage's time runs
    out, so the rows measured so far are kept."""

    def __init__(self, ctx, table, reserve_s: float):
        self.ctx, self.table, self.reserve_s = ctx, table, reserve_s
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}
        self.session, self.collected = None, 0

    def pytest_collection_finish(self, session):
        self.session, self.collected = session, len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if report.skipped:
                detail = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            else:
                crash = getattr(report.longrepr, "reprcrash", None)
                detail = first_line(crash.message) if crash else ""
            self.counts[report.outcome] += 1
            name, recorded = report.nodeid.split("::", 1)[1], "; ".join(f"{k} {v}" for k, v in report.user_properties)
            self.table.add(name, report.outcome, recorded or "–", detail.removeprefix("Skipped: "))
            self.ctx.check(not report.failed, f"{name}: {detail}")
        if report.when == "teardown" and self.ctx.time_left() < self.reserve_s:
            self.session.shouldstop = "the stage's time is out"


def stage_correctness(ctx) -> None:
    import pytest

    table = ctx.table("the GPU tests in bf16 (tests/*: each error over the plain reference's own in the same dtype; "
                      "the tolerance rule is the test's)", ["test", "outcome", "recorded", "detail"])
    plugin = TestsToTable(ctx, table, reserve_s=3 if ctx.rehearsal else 25)  # the optimizer timing below
    args = [str(REPO / t) for t in (REHEARSAL_TESTS if ctx.rehearsal else GPU_TESTS)]
    args += ["-q", "-p", "no:cacheprovider", "--rootdir", str(REPO)] + ([] if ctx.rehearsal else ["-m", "gpu"])
    rc = pytest.main(args, plugins=[plugin])
    ctx.check(rc in (0, 1, 2), f"pytest exit code {rc} (3: internal error, 4: a test id not found, 5: none ran)")
    not_run = plugin.collected - sum(plugin.counts.values())
    if not_run > 0:
        ctx.note(f"{not_run} of {plugin.collected} tests not run (stage budget)")
    import bench_optimizer

    shapes = bench_optimizer.parameter_shapes(**(bench_optimizer.SMOKE if ctx.rehearsal else bench_optimizer.HUNDRED_M))
    rows = bench_optimizer.measure(shapes, get_device(ctx), 1, 3)
    timing = ctx.table("one optimizer step on this device (benchmarks/bench_optimizer.py)",
                       ["variant", "step ms", "x fused fp32", "B/param"])
    for r in rows:
        timing.add(r["variant"], f"{r['step_s'] * 1e3:.2f}", f"{r['step_s'] / rows[1]['step_s']:.2f}",
                   f"{r['bytes_per_param']:.2f}")
    ctx.summary(", ".join(f"{n} {k}" for k, n in plugin.counts.items())
                + (f", {not_run} not run (budget)" if not_run > 0 else ""))


# ----------------------------------------------------------------------------------------------
# 2. LM-head benchmark
# ----------------------------------------------------------------------------------------------
def stage_lm_head(ctx) -> None:
    ensure_wheels(ctx)  # Liger's row needs liger-kernel
    import bench_logprob as B

    dev = get_device(ctx)
    if ctx.rehearsal:  # interpreter, fp32; torch.compile with dynamo's eager backend (no C++ build on the CPU)
        shapes, V, dtype, warmup, reps = ((37, 48), (16, 64)), 203, torch.float32, 1, 2
    else:
        shapes, V, dtype, warmup, reps = ((8192, 4096), (2048, 8192)), 152064, torch.bfloat16, 2, 5
    compile_backend = "eager" if ctx.rehearsal else "inductor"
    impls, notes = B.make_impls(compile_backend)
    for note in notes:
        ctx.note(note)
    peak = ctx.context.get("peak_tflops")
    table = ctx.table(f"logp = log_softmax(h @ W.T)[t], forward + backward, V={V}, {str(dtype).removeprefix('torch.')}"
                      f", median of {reps} after {warmup} warm-up; TFLOP/s counted as 8·N·V·D (issue 3); extra = "
                      f"peak memory minus inputs and dh/dW; err = max relative error vs eager (logp, dh, dW); "
                      f"compile backend {compile_backend}",
                      ["N", "D", "impl", "ms", "TFLOP/s", "% of ceiling", "extra GiB", "x eager", "err", "note"])
    def skip(name: str) -> str | None:
        if name not in impls:  # make_impls said why (liger: not importable)
            return next((n for n in notes if n.startswith(name)), "not available")
        need = 30 if name == "compile" and not ctx.rehearsal else 5  # inductor builds the kernels first
        return f"skipped: {ctx.time_left():.0f} s of the stage budget left" if ctx.time_left() < need else None

    best = {}
    for N, D in shapes:
        names = ("eager", "chunked", "triton", "liger", "compile")
        for r in B.bench_shape(impls, names, N, D, V, dtype, dev.type, warmup, reps, skip):
            name = r["name"]
            if "note" in r:
                table.add(N, D, name, *("–",) * 6, r["note"])
                ctx.check(not (r["note"] == "OOM" and name in ("chunked", "triton")) and "FAILED" not in r["note"],
                          f"LM head {name} at N={N} D={D}: {r['note']}")
                continue
            tflops = B.counted_flops(N, D, V) / r["sec"] / 1e12
            table.add(N, D, name, f"{r['sec'] * 1e3:.2f}", f"{tflops:.1f}",
                      f"{100 * tflops / peak:.0f}%" if peak else "–",
                      f"{r['extra'] / GIB:.2f}" if dev.type == "cuda" else "–", fmt(r["x_eager"], ".2f"),
                      fmt(r["err"], ".1e"), "")
            best.setdefault((N, D), []).append((tflops, name))
    ctx.summary("; ".join(f"{N}x{D}: " + ", ".join(f"{n} {tf:.3g}" for tf, n in sorted(v, reverse=True)[:3])
                          + " TFLOP/s" for (N, D), v in best.items()))


# ----------------------------------------------------------------------------------------------
# 3 and 4. Training steps (benchmarks/bench_step.py)
# ----------------------------------------------------------------------------------------------
STEP_COLUMNS = ["reference", "act. ckpt", "layers", "step s", "pairs/s", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
                "loss", "precompute s"]


def run_bench_step(ctx, argv: list[str], tag: str) -> tuple[int, list[dict]]:
    """bench_step.main with ``argv``: (exit code, its RESULT records)."""
    import bench_step

    out = ctx.workdir / f"bench_step-{tag}.json"
    print(f"bench_step.py {' '.join(argv)}", flush=True)
    rc = bench_step.main(argv + ["--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.is_file() else [])


def add_step_rows(ctx, table, records: list[dict]) -> None:
    for r in records:
        table.add(r["reference"], r["activation_checkpointing"], r["layers"],
                  f"{r['seconds'] / r['timed_steps']:.3f}", f"{r['pairs_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                  f"{r['flops'] / r['seconds'] / 1e12:.1f}", pct(r["mfu"]), fmt(r["peak_mem_gib"], ".1f"),
                  f"{r['loss']:.4f}", fmt(r["precompute_seconds"], ".1f"))
        ctx.check(math.isfinite(r["loss"]), f"{r['shape']} {r['reference']}: loss {r['loss']}")


def add_component_rows(ctx, records: list[dict]) -> None:
    """bench_step --profile's measured seconds per component beside roofline.py's prediction for the same work."""
    profiled = [r for r in records if r.get("components_per_step")]
    if not profiled:
        return
    table = ctx.table("per component, one profiled step: measured (profiler self time) / PREDICTED (roofline.py)",
                      ["reference", "component", "measured ms", "predicted ms", "measured / predicted"])
    for r in profiled:
        for group, c in r["components_per_step"].items():
            m, p = c["measured_s"], c["predicted_s"]
            table.add(r["reference"], group, f"{m * 1e3:.3g}", fmt(p * 1e3 if p else None, ".3g"),
                      f"{m / p:.2f}" if p else "-")


def stage_step_1p5b(ctx) -> None:
    base = ["--smoke"] if ctx.rehearsal else ["--shape", "qwen2-1.5b", "--warmup", "1", "--steps", "3"]
    base += peak_args(ctx)
    profile = ctx.artifact("profile")
    profiled = ["--reference", "both", "--profile", "--profile-steps", "1", "--profile-out", str(profile)]
    if ctx.rehearsal:  # the prediction's code path, for a card this CPU is not
        profiled += ["--predict-for", "h100"]
    runs = [("ac_on", profiled),
            ("ac_off", ["--reference", "precomputed", "--no-activation-checkpointing"])]
    shape = ("tiny shape (bench_step --smoke: 4 pairs/step, 2048 tokens/micro-batch, short sequences)"
             if ctx.rehearsal else "Qwen2-1.5B shape, 128 pairs/step, 8192 tokens/micro-batch, design lengths")
    table = ctx.table(f"{shape}, 1 warm-up + {2 if ctx.rehearsal else 3} timed steps; {peak_note(ctx)}", STEP_COLUMNS)
    measured = []
    for tag, extra in runs:
        if ctx.time_left() < (2 if ctx.rehearsal else 10):
            ctx.note(f"{tag}: not run ({ctx.time_left():.0f} s of the stage budget left)")
            continue
        rc, records = run_bench_step(ctx, base + extra, tag)
        add_step_rows(ctx, table, records)
        measured += records
        ctx.check(rc == 0 and bool(records), f"bench_step {tag}: exit code {rc} (3: out of memory)")
    add_component_rows(ctx, measured)
    if profile.is_file():
        ctx.note("top-15 kernels of one profiled step per reference: gpu_check_profile.txt")
    ctx.summary(", ".join(f"{r['reference']}/ckpt {r['activation_checkpointing']} "
                          f"{r['pairs_per_s']:.1f} pairs/s MFU {pct(r['mfu'])}" for r in measured))


def stage_step_8b(ctx) -> None:
    import bench_step

    fits = ctx.table("Llama-3-8B layers that fit one card (bench_step.auto_layers, the trainer's memory plan: "
                     "precomputed reference, full checkpointing, 8192 tokens/micro-batch)",
                     ["card memory", "layers of 32"])
    for label, gib in (("80 GB (H100): 79.6 GiB", 79.6), ("141 GB (H200): 139.8 GiB", 139.8)):
        fits.add(label, bench_step.auto_layers("llama3-8b", ["full"], False, 8192, int(gib * GIB)))
    if ctx.rehearsal:  # the Llama code path (untied head) at a CPU size
        layers = None
        argv = ["--shape", "tiny-llama", "--global-batch-pairs", "4", "--tokens-per-micro-batch", "2048",
                "--warmup", "1", "--steps", "1", "--lengths", "smoke"]
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        layers = bench_step.auto_layers("llama3-8b", ["full"], False, 8192, total)
        argv = ["--shape", "llama3-8b", "--warmup", "1", "--steps", "2"]
    shape = ("tiny Llama shape, 4 pairs/step, 2048 tokens/micro-batch, 1 warm-up + 1 timed step" if ctx.rehearsal
             else "Llama-3-8B shape, as many layers as fit, 128 pairs/step, 1 warm-up + 2 timed steps")
    table = ctx.table(f"{shape}; {peak_note(ctx)}", STEP_COLUMNS)
    argv += ["--reference", "precomputed"] + peak_args(ctx)
    while True:
        rc, records = run_bench_step(ctx, argv + (["--layers", str(layers)] if layers else []), f"8b-{layers}")
        add_step_rows(ctx, table, records)
        if rc == 3 and layers and layers > 1 and ctx.time_left() > 25:  # the estimate was too high: fewer layers
            ctx.note(f"{layers} layers ran out of memory; again with {layers * 3 // 4}")
            layers = max(1, layers * 3 // 4)
            continue
        break
    ctx.check(rc == 0 and bool(records), f"bench_step 8B: exit code {rc} (3: out of memory)")
    if records:
        r = records[0]
        ctx.summary(f"{r['layers']} layers: {r['pairs_per_s']:.1f} pairs/s, MFU {pct(r['mfu'])}, "
                    f"{fmt(r['peak_mem_gib'], '.1f')} GiB")


# ----------------------------------------------------------------------------------------------
# 5. TRL side by side (benchmarks/bench_vs_trl.py)
# ----------------------------------------------------------------------------------------------
TRL_VARIANTS = "trl_default,fasttrain_live"  # TRL as it comes vs fasttrain with the same (live) reference kind


def stage_trl(ctx) -> None:
    ensure_wheels(ctx)
    if importlib.util.find_spec("trl") is None:
        ctx.skip("trl is not importable (carry .whl from benchmarks/fetch_wheels.sh)")
    import bench_vs_trl

    out = ctx.workdir / "bench_vs_trl.json"
    # each variant in its own worker process, as on the GPU (peak memory of its own); 1 warm-up + 4 timed
    # steps of 16 pairs: the start-up of a worker (~40 s) dominates, more steps would not fit the budget
    argv = ["--variants", TRL_VARIANTS, "--json-out", str(out)] + peak_args(ctx)
    argv += ["--smoke"] if ctx.rehearsal else ["--warmup-steps", "1", "--steps", "4"]
    print(f"bench_vs_trl.py {' '.join(argv)}", flush=True)
    rc = bench_vs_trl.main(argv)
    ctx.check(out.is_file(), f"bench_vs_trl wrote no results (exit code {rc})")
    if not out.is_file():
        return
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    table = ctx.table(f"{'tiny (rehearsal)' if ctx.rehearsal else 'Qwen2-1.5B'} shape, same model, data, batch, lr, "
                      f"precision; {peak_note(ctx)}",
                      ["variant", "status", "pairs/s", "seq tok/s", "proc tok/s", "MFU", "peak GiB", "first loss",
                       "sane"])
    for name, r in results.items():
        table.add(name, r["status"] + (f": {r['reason']}" if r.get("reason") else ""), fmt(r["pairs_per_s"], ".2f"),
                  fmt(r["seq_tokens_per_s"], ".0f"), fmt(r["processed_tokens_per_s"], ".0f"),
                  pct(r["mfu"]), fmt(r["peak_gib"], ".1f"), fmt(r["first_loss"], ".4f"),
                  {True: "yes", False: "NO", None: "–"}[r["sane"]])
        ctx.check(r["status"] == "ok" and r["sane"], f"{name}: {r['status']} {r.get('reason', '')}, sane {r['sane']}")
    fast, trl = results.get("fasttrain_live", {}), results.get("trl_default", {})
    if fast.get("pairs_per_s") and trl.get("pairs_per_s"):
        ratio = fast["pairs_per_s"] / trl["pairs_per_s"]
        ctx.set(ratio_live=ratio)
        ctx.summary(f"fasttrain_live / trl_default: {ratio:.2f}x pairs/s")


# ----------------------------------------------------------------------------------------------
# 6. The demo through fasttrain/run.py
# ----------------------------------------------------------------------------------------------
def stage_demo(ctx) -> None:
    demo = REPO / "fasttrain" / "demo"
    run_dir = ctx.workdir / "demo-run"
    steps = 2 if ctx.rehearsal else 4
    overrides = [f"train.output_dir={run_dir}", f"data.cache_dir={ctx.workdir / 'demo-cache'}",
                 f"train.max_steps={steps}", "train.log_every=1", "train.progress_bar=false", "train.plot=false",
                 "train.tensorboard=false"]
    if ctx.rehearsal:  # the whole demo set's reference pass and evaluations take a minute on the CPU: a slice
        for split, n in (("train", 64), ("eval", 32)):
            lines = (demo / "data" / f"{split}.jsonl").read_text().splitlines()[:n]
            path = ctx.workdir / f"demo-{split}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            overrides.append(f"data.{split}={path}")
    cmd = [sys.executable, str(REPO / "fasttrain" / "run.py"), "--demo", *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    limit = max(ctx.time_left() - 3, 1)  # the checks below need a moment after it
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.output or b""  # bytes even with text=True (subprocess's timeout path)
        print(out.decode(errors="replace") if isinstance(out, bytes) else out, flush=True)
        ctx.check(False, f"run.py --demo did not finish within the stage's {limit:.0f} s")
        return
    wall = time.time() - t0
    print(proc.stdout, flush=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    table = ctx.table(f"fasttrain/run.py --demo, {steps} steps" + (" on slices of its data" if ctx.rehearsal else ""),
                      ["check", "value", "verdict"])
    table.add("exit code", proc.returncode, "ok" if proc.returncode == 0 else "FAIL")
    ctx.check(proc.returncode == 0, f"run.py --demo exited {proc.returncode}: {last}")
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    first_ok = bool(losses) and abs(losses[0] - LN2) <= 2e-3  # policy == reference at step 1
    table.add("first loss (ln 2 = 0.6931)", fmt(losses[0] if losses else None, ".4f"), "ok" if first_ok else "FAIL")
    ctx.check(first_ok, f"first demo loss {losses[:1]} is not ln 2 within 2e-3")
    table.add("train steps logged", len(losses), "ok" if len(losses) == steps else "FAIL")
    ctx.check(len(losses) == steps and all(math.isfinite(x) for x in losses), f"demo losses {losses}")
    exported = check_export(run_dir / "final")
    table.add("export final/ loads in transformers", exported, "ok" if exported == "finite logits" else "FAIL")
    ctx.check(exported == "finite logits", f"demo export: {exported}")
    ctx.summary(f"{len(losses)} steps, first loss {fmt(losses[0] if losses else None, '.4f')}, export {exported}, "
                f"{wall:.0f} s")


def check_export(final: Path) -> str:
    """'finite logits' when the exported HF checkpoint loads in transformers and runs; else what is wrong."""
    if not (final / "config.json").is_file() or not list(final.glob("*.safetensors")):
        return f"no config.json / *.safetensors in {final.name}/"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    return "finite logits" if torch.isfinite(logits).all() else "non-finite logits"
