"""The export is the trained model: the dtype choice (train.save_dtype=auto) measured against the fp32 master
weights, a bf16 export losing an lr-5e-7 update and auto keeping it, the metrics of the weights that were
exported, and restarts that rewrite their own exports instead of crashing on them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import DEMO, run_fasttrain
from safetensors.torch import load_file

from fasttrain.export import MAX_UPDATE_ERROR, choose_export_dtype, measure_update_error, weights_as_exported
from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import load_hf_weights

DEMO_MODEL = DEMO / "model"  # stored in bfloat16, like most released checkpoints


def _demo_model() -> torch.nn.Module:
    model = build_model(ModelConfig.from_model_dir(DEMO_MODEL), device="cpu", dtype=torch.float32)
    load_hf_weights(model, DEMO_MODEL)
    return model


@pytest.mark.parametrize("seed,relative_step", [(1, 1e-5), (2, 3e-2)])
def test_measured_update_error_is_the_relative_l2_error_of_the_exported_update(seed, relative_step):
    model = _demo_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # an update of a given size relative to each weight, as AdamW's is
            p.add_(relative_step * p.abs().mean() * torch.randn(p.shape, generator=gen))
    norm, errors, source = measure_update_error(model, str(DEMO_MODEL))

    model.requires_grad_(False)
    update_sq = sum((p.double() - initial[n].double()).square().sum() for n, p in model.named_parameters())
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        lost_sq = sum((p.to(dtype).double() - p.double()).square().sum() for p in model.parameters())
        assert errors[name] == pytest.approx(math.sqrt(lost_sq / update_sq), rel=1e-9)
    assert norm == pytest.approx(math.sqrt(update_sq), rel=1e-9)
    assert errors["float32"] == 0.0 and source == torch.bfloat16
    if relative_step == 1e-5:  # an lr-5e-7-sized update: bf16 rounds (nearly) all of it away
        assert errors["bfloat16"] > 0.9
    else:  # a large update survives bf16 to within its rounding unit (2^-9 relative)
        assert errors["bfloat16"] < 0.1


def test_choose_export_dtype():
    small = {"float32": 0.0, "bfloat16": MAX_UPDATE_ERROR / 2, "float16": 0.0}
    large = {"float32": 0.0, "bfloat16": 0.7, "float16": 0.01}
    assert choose_export_dtype("auto", small, torch.bfloat16)[0] == "bfloat16"
    dtype, why = choose_export_dtype("auto", large, torch.bfloat16)
    assert dtype == "float32" and "70.0%" in why
    assert choose_export_dtype("auto", small, torch.float32)[0] == "float32"
    assert choose_export_dtype("bfloat16", large, torch.bfloat16) == ("bfloat16", "train.save_dtype=bfloat16")


def test_weights_as_exported_rounds_then_restores_bitwise():
    model = _demo_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 1e-4)  # off the bf16 grid
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with weights_as_exported(model, "bfloat16"):
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n].to(torch.bfloat16).float()), n
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------------------------------------- end to end
def _recipe_run(tmp_path: Path, out: str, *extra: str) -> dict:
    """Step-DPO at the recipe's lr 5e-7 and beta 0.4 on the demo model (bf16 on disk), one process."""
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("\n".join((DEMO / "data" / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    result = run_fasttrain([
        "--demo", f"data.train={data}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / out}", "train.max_steps=3", "train.global_batch_pairs=12", "train.lr=5e-7",
        "loss.beta=0.4", "train.warmup_ratio=0", "train.progress_bar=false", "train.plot=false", *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / out / "summary.json").read_text())


def test_bf16_export_loses_an_lr_5e_7_update_and_auto_keeps_it(tmp_path):
    initial = load_file(DEMO_MODEL / "model.safetensors")

    auto = _recipe_run(tmp_path, "auto")  # save_dtype=auto is the default
    assert auto["export"]["dtype"] == "float32" and "would lose" in auto["export"]["reason"]
    assert "after_exported_weights" not in auto  # the export is the master weights, "after" is theirs
    master = load_file(tmp_path / "auto" / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in master.values())
    update_sq = sum((master[n].double() - initial[n].double()).square().sum() for n in initial)
    assert auto["export"]["update_norm"] > 0
    assert math.sqrt(update_sq) == pytest.approx(auto["export"]["update_norm"], rel=1e-6)
    config = json.loads((tmp_path / "auto" / "final" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["Qwen2ForCausalLM"]

    # The same run (same data order, one process: the same arithmetic) exported in bf16.
    forced = _recipe_run(tmp_path, "bf16", "train.save_dtype=bfloat16")
    assert forced["after"] == auto["after"]
    assert forced["export"]["dtype"] == "bfloat16" and forced["export"]["update_error"]["bfloat16"] > 0.9
    exported = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    changed = back = 0
    for n in initial:
        trained = master[n] != initial[n].float()
        changed += int(trained.sum())
        back += int((trained & (exported[n] == initial[n])).sum())
    assert changed > 0 and back / changed > 0.9, (back, changed)  # most trained weights rounded back
    # summary.json reports what the exported weights score next to what training reached
    gap = abs(forced["after_exported_weights"]["train_subset"]["loss"] - forced["after"]["train_subset"]["loss"])
    assert gap > 0, forced


def test_restart_between_export_and_checkpoint_then_relaunch_of_the_finished_run(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((DEMO / "data" / "train.jsonl").read_text().splitlines()[:40]) + "\n")
    out = tmp_path / "run"
    args = ["--demo", f"data.train={data}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={out}", "train.epochs=4", "train.max_steps=7", "train.global_batch_pairs=6",
            "train.tokens_per_micro_batch=1024", "train.export_every=1", "train.checkpoint_every=3",
            "train.keep_checkpoints=5", "train.log_every=1", "train.resume=auto", "train.progress_bar=false",
            "train.plot=false"]
    # Rank 1 dies in step 5: exports 1-4 exist, the newest checkpoint is step 3. torchrun restarts the job, which
    # resumes from step 3 and writes step 4's export again (it used to stop at FileExistsError every time).
    result = run_fasttrain(args, nproc=2, max_restarts=2, env_extra={"FASTTRAIN_FAULT": "kill:rank=1:step=5"})
    assert result.returncode == 0, result.stderr[-5000:]
    assert "step-00000003" in result.stderr and "resumed from" in result.stderr
    assert sorted(p.name for p in (out / "exports").iterdir()) == [f"step-{s:08d}" for s in range(1, 7)]
    assert (out / "final" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 8))

    # Relaunching the finished run (a scheduler's retry, torchrun after the last step) is a no-op.
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    again = run_fasttrain(args, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run finished" in again.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    # ... but not with settings that would have trained something else
    changed = run_fasttrain(args + ["train.lr=1e-3"], nproc=1)
    assert changed.returncode == 2 and "train.lr was" in changed.stderr, changed.stderr[-3000:]
