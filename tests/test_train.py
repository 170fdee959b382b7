"""End-to-end runs of ``fasttrain/run.py`` on CPU: FSDP2 on 2 gloo ranks equals one process, the first
step of policy == reference is ln 2, live == precomputed reference, the demo learns, bad input is named."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import DEMO, run_fasttrain
from safetensors.torch import load_file


def small_train_file(tmp_path: Path, n: int) -> Path:
    lines = (DEMO / "data" / "train.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "train_small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def common_overrides(tmp_path: Path, out: str, train_file: Path) -> list[str]:
    return [
        "--config", str(DEMO / "demo.yaml"),
        f"data.train={train_file}", "data.eval=", f"data.cache_dir={tmp_path / ('cache-' + out)}",
        f"train.output_dir={tmp_path / out}", "train.max_steps=3", "train.global_batch_pairs=10",
        "train.tokens_per_micro_batch=1024", "train.log_every=1", "train.eval_every=0",
        "train.save_dtype=float32", "train.plot=false", "train.warmup_ratio=0", "train.lr=2e-3",
    ]


def read_metrics(out_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def check(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("pairs_per_step,optimizer_state", [(10, "fp32"), (1, "fp32"), (10, "compact")])
def test_two_ranks_equal_one_process_and_first_loss_is_ln2(tmp_path, pairs_per_step, optimizer_state):
    data = small_train_file(tmp_path, 40)
    # AdamW's first update is ~lr * sign(g): for the few weights whose gradient is ~1e-10 (float32
    # summation-order noise is ~1e-12) the sign is noise and one run moves them +lr, the other -lr.
    # eps = 1e-6 makes the update continuous in g there (|update| <= lr * |g| / eps) and leaves the
    # real gradients (|g| ~ 1e-5..1e-3) unaffected, so weights can be compared at float32 tolerance.
    geometry = [f"train.global_batch_pairs={pairs_per_step}", "train.adam_eps=1e-6",
                f"train.optimizer_state={optimizer_state}"]
    # Compact state keeps bf16 gradients, and FSDP2 sums a rank's micro-batches in the gradient's dtype: where
    # micro-batch gradients nearly cancel, the sum keeps bf16 precision of the terms, and AdamW's first,
    # sign-like steps then move such weights by up to +-lr differently for other micro-batch splits (seen:
    # 2.7e-3 at lr 2e-3 with 2 micro-batches per rank vs 4 in one process). One micro-batch per rank per step
    # rounds each gradient once, after the fp32 reduce-scatter, as one process does (DESIGN §6.9).
    budget = 1024 if optimizer_state == "fp32" else 8192
    geometry.append(f"train.tokens_per_micro_batch={budget}")
    one = run_fasttrain(common_overrides(tmp_path, "one", data) + geometry, nproc=1)
    check(one)
    two = run_fasttrain(common_overrides(tmp_path, "two", data) + geometry, nproc=2)
    check(two)

    # Uneven micro-batches: with 10 pairs every rank runs 2 micro-batches of different token counts;
    # with 1 pair per step rank 1 runs only the dummy micro-batch.
    from fasttrain.assembly import groups_of, load_tokenizer
    from fasttrain.data import prepare_dataset
    from fasttrain.plan import plan_steps

    tok = load_tokenizer(str(DEMO / "model"))
    pairs = prepare_dataset(str(data), tok, "qwen2-boxed", 512, 384)
    plans = plan_steps(groups_of(pairs), pairs_per_step, 2, budget, seed=42, epochs=4.0, max_steps=3)
    tokens = [[sum(g.num_tokens for g in mb) for mb in plan.micro_batches[r]] for plan in plans for r in range(2)]
    if pairs_per_step == 1:
        assert all(t == [0] for t in tokens[1::2])
    elif optimizer_state == "fp32":
        assert len({t for per_rank in tokens for t in per_rank}) > 2
    else:
        assert all(len(per_rank) == 1 for per_rank in tokens)

    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [1, 2, 3] == [r["step"] for r in m2]
    # Compact state: the forward reads bf16 weights, so a master that summation-order noise moves across a bf16
    # rounding boundary on one side only changes that weight by a bf16 unit (2^-8 relative), and the
    # metrics after it by up to ~1e-3 relative (seen: 1.1e-4); fp32 masters differ by float32 noise only.
    rel = 1e-4 if optimizer_state == "fp32" else 2**-9
    for a, b in zip(m1, m2):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (key, a, b)
    # policy == reference at step 1 (precomputed by the same weights) -> loss = ln 2. The packing of the
    # precompute pass differs from the training step's, so allow float32 rounding of ~250-nat sums:
    # |d(pi - ref)| ~ 250 * 6e-8 * few -> beta * that / 2 << 1e-5.
    assert m1[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert m1[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert m1[-1]["loss"] != pytest.approx(math.log(2.0), abs=1e-5)  # it did train

    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    w0 = load_file(DEMO / "model" / "model.safetensors")
    for name in w1:
        moved = (w1[name] - w0[name].float()).abs().max().item()
        # Three AdamW steps at lr 2e-3 move weights by up to 6e-3. AdamW divides each update by the
        # weight's own gradient scale, so float32 summation-order noise in small gradients shows up
        # amplified (seen: 4e-6 at most); 1e-5 is 0.25% of the update, while a wrong gradient (e.g. a
        # missing rank's contribution or a 2x normalisation error) moves weights by ~1e-3.
        # Compact: the forward reads bf16 weights, whose rounding flips add a little (seen: 8.6e-6).
        atol = 1e-5 if optimizer_state == "fp32" else 2e-5
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=atol, msg=f"{name} (moved {moved:.2e})")


def test_live_reference_equals_precomputed(tmp_path):
    data = small_train_file(tmp_path, 30)
    pre = run_fasttrain(common_overrides(tmp_path, "pre", data) + ["train.max_steps=2", "train.save_final=false"])
    check(pre)
    live = run_fasttrain(
        common_overrides(tmp_path, "live", data) + ["train.max_steps=2", "train.save_final=false", "loss.reference=live"]
    )
    check(live)
    for a, b in zip(read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "live")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], abs=1e-4)


def test_lm_head_choice_reaches_the_run(tmp_path):
    """model.lm_head_impl is resolved once and logged; a Triton head on a CPU run is refused with the reason.
    (The kernels' numerics inside CausalLM are tested in test_lm_head_kernel.py, where they run interpreted.)"""
    data = small_train_file(tmp_path, 4)
    common = ["train.max_steps=1", "train.save_final=false", "train.global_batch_pairs=2"]
    auto = run_fasttrain(common_overrides(tmp_path, "auto", data) + common)
    check(auto)
    assert "LM head torch" in auto.stderr  # auto on the CPU
    for impl in ("triton", "chunked"):
        refused = run_fasttrain(common_overrides(tmp_path, impl, data) + common + [f"model.lm_head_impl={impl}"])
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "needs a CUDA device" in refused.stderr and "Traceback" not in refused.stderr


def test_demo_learns_on_two_ranks(tmp_path):
    """A short real run of the demo: reward accuracy and margins rise, on train and held-out pairs."""
    result = run_fasttrain(
        ["--demo", f"train.output_dir={tmp_path / 'demo'}", f"data.cache_dir={tmp_path / 'cache'}",
         "train.epochs=0.5", "train.eval_every=0", "train.plot=false"],
        nproc=2,
    )
    check(result)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for split in ("train_subset", "eval"):
        before, after = summary["before"][split], summary["after"][split]
        assert before["rewards/accuracies"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert after["rewards/accuracies"] > 0.55, (split, after)
        assert after["rewards/margins"] > 0.0 and after["loss"] < before["loss"]
    assert (tmp_path / "demo" / "final" / "config.json").exists()


def test_bad_data_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (DEMO / "data" / "train.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join(good) + '\n{"prompt": "x", "initial_reason_steps": "", "chosen": "a"}\n')
    result = run_fasttrain(common_overrides(tmp_path, "bad", bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.jsonl" in result.stderr and "line 4" in result.stderr and "rejected" in result.stderr
    assert not (tmp_path / "bad" / "final").exists()


def test_existing_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    data = small_train_file(tmp_path, 12)
    args = common_overrides(tmp_path, "keep", data)
    result = run_fasttrain(args)
    assert result.returncode == 2 and "train.overwrite=true" in result.stderr
    assert (out / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "override,needle",
    [("train.lr=fast", "train.lr"), ("train.bogus=1", "unknown key train.bogus"), ("loss.reference=maybe", "loss.reference"),
     ("data.max_prompt_length=600", "data.max_prompt_length"), ("model.cpu_offload=true", "model.cpu_offload")],
)
def test_bad_config_is_named(tmp_path, override, needle):
    result = run_fasttrain(["--config", str(DEMO / "demo.yaml"), f"train.output_dir={tmp_path / 'o'}", override])
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_small_model_recipe_runs_on_cpu(tmp_path):
    """fasttrain/configs/stepdpo_small.yaml as the README shows it, pointed at the demo model: compute_dtype=auto
    resolves to float32 on a CPU, and the run trains and exports."""
    data = small_train_file(tmp_path, 24)
    out = tmp_path / "small"
    result = run_fasttrain([
        "--config", str(DEMO.parent / "configs" / "stepdpo_small.yaml"), f"model.path={DEMO / 'model'}",
        f"data.train={data}", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}",
        "train.max_steps=2", "train.global_batch_pairs=8", "train.progress_bar=false", "train.plot=false"])
    check(result)
    assert "compute float32" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["run_info"]["config"]["model"]["compute_dtype"] == "float32"
    assert (out / "final" / "model.safetensors").is_file()
