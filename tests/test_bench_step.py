"""benchmarks/bench_step.py: the smoke run goes end to end on the CPU through the real trainer step,
and the pieces that decide what a GPU run measures (synthetic data, layer count) are sane."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from cli_runner import load_benchmark

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_step.py"


def load_bench():
    return load_benchmark("bench_step")


def test_smoke_run_on_cpu():
    # A subprocess: the benchmark starts a (one-rank) process group, which must not leak into this one.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["reference"] for r in records] == ["precomputed", "live"], proc.stdout
    for r in records:
        assert r["shape"] == "tiny" and r["timed_steps"] == 2 and r["pairs"] == 2 * r["global_batch_pairs"]
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["flops"] > 0
        # policy == reference at the start and the LR is still warming up: the DPO loss is ln 2
        assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(2)) < 1e-2, r
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: n/a
    live, pre = records[1], records[0]
    assert live["flops"] > pre["flops"]  # the live reference's forward is counted
    assert "MFU = FlopModel FLOPs" in proc.stdout and "n/a" in proc.stdout


def test_synthetic_data_has_step_dpo_shape():
    lib = load_bench().benchlib  # benchmarks/benchlib.py: the synthetic data every benchmark uses
    groups = lib.synthetic_groups(400, 1000, lib.LENGTHS["design"], share=0.25, seed=0)
    assert sum(g.num_pairs for g in groups) == 400
    prompts = np.array([len(g.prompt_ids) for g in groups])
    steps = np.array([len(c) for g in groups for c in g.continuations])
    assert 96 <= prompts.min() and prompts.max() <= 512 and 250 < prompts.mean() < 360
    assert 16 <= steps.min() and steps.max() <= 128 and 55 < steps.mean() < 90
    assert any(len(g.continuations) > 2 for g in groups)  # --share: prompts with several chosen steps
    real = lib.synthetic_groups(2000, 1000, lib.LENGTHS["real-estimate"], share=0.0, seed=0)
    assert 200 < np.mean([len(g.prompt_ids) for g in real]) < 320
    assert 30 < np.mean([len(c) for g in real for c in g.continuations]) < 60


def test_auto_layers_is_the_trainers_memory_plan():
    from fasttrain import activation_memory
    from fasttrain.model.config import num_params

    bench = load_bench()
    h100, h200 = 79 * 2**30, int(139.8 * 2**30)
    # Qwen2-1.5B: 1.5B params x 18 B is ~27 GB: every layer fits, with a live reference too.
    assert bench.auto_layers("qwen2-1.5b", ["full"], True, 8192, h100) == 28
    # Llama-3-8B does not fit one card: fewer layers the more a mode keeps, fewer with a live reference.
    full = bench.auto_layers("llama3-8b", ["full"], False, 8192, h200)
    selective = bench.auto_layers("llama3-8b", ["selective"], False, 8192, h200)
    none = bench.auto_layers("llama3-8b", ["none"], False, 8192, h200)
    live = bench.auto_layers("llama3-8b", ["full"], True, 8192, h200)
    assert none < selective < full < 32 and live < full
    assert bench.auto_layers("llama3-8b", ["none", "full"], False, 8192, h200) == none  # the hungriest mode
    # the trainer's own plan (activation_checkpointing=auto's) agrees: full fits at that depth, not one deeper
    for layers, fits in ((full, True), (full + 1, False)):
        model = bench.benchlib.model_config("llama3-8b", num_hidden_layers=layers)
        choice = activation_memory.choose(model, 8192, 2, h200, 16 * num_params(model))
        assert (choice.needs_bytes["full"] <= choice.budget_bytes) == fits, (layers, choice.explain())


def test_checkpointing_modes_and_projection_layouts_side_by_side_in_one_run():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--reference", "precomputed",
                           "--checkpointing", "none,selective,full", "--projections", "fused,separate"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [(r["fuse_projections"], r["activation_checkpointing"]) for r in records] == [
        (fused, mode) for fused in (True, False) for mode in ("none", "selective", "full")]
    # the same data, the same start: the same loss whatever is recomputed or fused (fp32: to rounding)
    assert max(r["loss"] for r in records) - min(r["loss"] for r in records) <= 1e-5 * abs(records[0]["loss"])
    assert "vs first" in proc.stdout and "1.00x" in proc.stdout
    bad = subprocess.run([sys.executable, str(BENCH), "--smoke", "--checkpointing", "some"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=REPO, check=False)
    assert bad.returncode == 2 and "--checkpointing 'some'" in bad.stderr
