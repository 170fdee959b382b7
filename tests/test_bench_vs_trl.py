"""benchmarks/bench_vs_trl.py end to end at its --smoke size on a CPU (in process, to spare the start-up of a
worker process per variant): fasttrain's variants always, TRL's where trl is installed (the `bench` extra)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from cli_runner import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    return load_benchmark("bench_vs_trl")


bench = _load_bench()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    """One run of every variant (the model and data are made once): TRL's are skipped without trl."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    argv = ["--smoke", "--in-process", "--work-dir", str(tmp / "work"), "--json-out", str(out),
            "--md-out", str(tmp / "results.md")]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = bench.main(argv)
    printed = buffer.getvalue()
    assert code == 0, printed
    assert not (tmp / "work").exists()  # removed without --keep-work-dir
    data = json.loads(out.read_text())
    return {r["name"]: r for r in data["results"]}, printed, tmp


def _check_trained(result: dict) -> None:
    assert result["status"] == "ok", result
    assert result["sane"] and result["all_finite"]
    assert abs(result["first_loss"] - math.log(2)) < 1e-3
    assert result["pairs_per_s"] > 0 and result["seq_tokens_per_s"] > 0 and result["processed_tokens_per_s"] > 0
    assert result["timed_steps"] == 2 and result["timed_pairs"] == 16  # --smoke: 1 + 2 steps of 4 x 2 pairs
    assert result["mfu"] is None and result["peak_gib"] is None  # CPU: n/a
    assert result["amortised_pairs_per_s"] <= result["pairs_per_s"]


def test_fasttrain_variants_smoke(smoke):
    results, printed, tmp = smoke
    for name in ("fasttrain_precompute", "fasttrain_live"):
        _check_trained(results[name])
        # The shared prompt is run once: fewer processed tokens than the pairs' two sequences hold.
        assert results[name]["processed_tokens_per_s"] < results[name]["seq_tokens_per_s"]
    assert results["fasttrain_precompute"]["precompute_s"] > 0
    assert results["fasttrain_precompute"]["precompute_pairs"] == 24
    assert results["fasttrain_live"]["precompute_s"] is None
    assert results["trl_liger"]["status"] == "skipped" and results["trl_liger"]["reason"]  # no CUDA here
    assert "trl_liger             skipped: " in printed and "fasttrain_live" in printed
    assert (tmp / "results.md").read_text().startswith("### fasttrain vs TRL DPOTrainer")


def test_trl_variants_smoke(smoke):
    results, printed, _ = smoke
    if importlib.util.find_spec("trl") is None:
        assert all(results[n]["status"] == "skipped" for n in ("trl_default", "trl_precompute", "trl_bf16"))
        pytest.skip("trl is not installed (the bench extra): its variants were reported as skipped")
    for name in ("trl_default", "trl_precompute", "trl_bf16"):
        _check_trained(results[name])
        # TRL runs both sequences of a pair in full, padded: processed = sequence tokens, and some padding.
        assert results[name]["processed_tokens_per_s"] == pytest.approx(results[name]["seq_tokens_per_s"])
        assert 0 < results[name]["padding_fraction"] < 1
    assert results["trl_precompute"]["precompute_s"] > 0 and results["trl_precompute"]["precompute_pairs"] == 24
    assert results["trl_default"]["settings"]["weights"] == "float32"
    assert results["trl_bf16"]["settings"]["weights"] == "bfloat16"
    assert "fasttrain / TRL" in printed  # the ratio table


def test_bad_variant_is_a_usage_error(tmp_path, capsys):
    assert bench.main(["--smoke", "--in-process", "--variants", "trl_fast", "--work-dir", str(tmp_path / "w")]) == 2
    assert "unknown ['trl_fast']" in capsys.readouterr().err


def test_amortised_rate_charges_the_precompute_to_the_recipe_epochs():
    spec = bench.BenchSpec(model_dir="", tokenizer_dir="", data_path="", template="", num_pairs=100, batch=5,
                           grad_accum=2, lr=1e-6, beta=0.4, max_length=64, max_prompt_length=32, warmup_steps=1,
                           total_steps=10, precision="fp32", seed=0, tokens_per_micro_batch=128,
                           fasttrain_overrides=[], recipe_epochs=4.0, loss_tol=1e-3,
                           work_dir="")
    result = bench.VariantResult("x", "ok", precompute_s=10.0, precompute_pairs=100)
    work = bench.WorkCount(pairs=90, seq_tokens=900, processed_tokens=600, flops=1.0)
    import torch

    out = bench.finish_result(result, spec, work, timed_s=9.0, device=torch.device("cpu"),
                              losses=[math.log(2), 0.69], grad_norms=[1.0, 1.0], peak_gib=None)
    assert out.pairs_per_s == pytest.approx(10.0)
    # 1 / (1/10 + 10 s / 100 pairs / 4 epochs) = 1 / (0.1 + 0.025)
    assert out.amortised_pairs_per_s == pytest.approx(8.0)
    assert out.sane
