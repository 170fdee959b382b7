"""Resumable training checkpoints: FSDP-sharded model + optimizer state via torch.distributed.checkpoint,
plus the scheduler, the position in the data order, RNG states and counters.

Layout under ``<output_dir>/checkpoints/``::

    step-00000040/            a complete checkpoint (the rename is the commit point)
        .metadata, *.distcp   DCP shards: model and AdamW state, each rank writes its own
        rng-rank<r>.pt        every rank's RNG states
        trainer_state.json    step, scheduler, counters, the before-training evaluation
        run_info.json         resolved config, package versions, model/data fingerprints
    step-00000050.tmp/        being written (or left by a crash): ignored on resume, with a warning

The directory must be on a filesystem every rank sees (multi-node: a shared one).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from fasttrain import distributed as fdist
from fasttrain.config import ModelSection
from fasttrain.errors import UserError

log = logging.getLogger("fasttrain")

STEP_PREFIX = "step-"
TMP_SUFFIX = ".tmp"

# Settings that define the run's math and data order: resuming with any of them changed would
# silently train something else, so it is refused. Everything else (logging, eval and checkpoint
# cadence, output paths, the attention backend) may change between attempts.
MUST_MATCH = {
    "data": ("template", "mode", "max_length", "max_prompt_length", "skip_bad_rows"),
    "loss": ("beta", "loss_type", "label_smoothing", "reference"),
    "train": ("epochs", "max_steps", "global_batch_pairs", "tokens_per_micro_batch", "lr", "weight_decay",
              "adam_beta1", "adam_beta2", "adam_eps", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "seed",
              "optimizer_state"),
    "model": ("compute_dtype", "lm_head_impl", "fuse_projections", "lora_rank", "lora_alpha", "lora_dropout",
              "lora_targets"),
}

# Keys added to MUST_MATCH after checkpoints were written without them: a missing value means this (the
# behaviour before the key existed), so those checkpoints still resume.
ADDED_LATER = {("train", "optimizer_state"): "fp32", ("model", "fuse_projections"): False,
               # LoRA's keys: their defaults are full fine-tuning, what every earlier checkpoint did
               **{("model", key): getattr(ModelSection(), key)
                  for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}}


def package_versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def run_info(cfg_dict: dict, model_fp: str, data_fp: str, world_size: int) -> dict:
    return {"config": cfg_dict, "versions": package_versions(), "model_fingerprint": model_fp,
            "data_fingerprint": data_fp, "world_size": world_size}


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash while writing) are named and skipped."""
    if not root.is_dir():
        return None
    complete = []
    for path in root.iterdir():
        if not path.name.startswith(STEP_PREFIX):
            continue
        if path.name.endswith(TMP_SUFFIX) or not (path / "trainer_state.json").exists():
            log.warning("ignoring incomplete checkpoint %s (a run stopped while writing it)", path)
            continue
        complete.append(path)
    return max(complete, key=lambda p: p.name) if complete else None


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    problems = []
    if saved["model_fingerprint"] != current["model_fingerprint"]:
        problems.append("the model files (model.path) differ")
    if saved["data_fingerprint"] != current["data_fingerprint"]:
        problems.append("the tokenized training data differ (data file, tokenizer or template)")
    for section, keys in MUST_MATCH.items():
        for key in keys:
            predates = key not in saved["config"].get(section, {})
            old = saved["config"].get(section, {}).get(key, ADDED_LATER.get((section, key)))
            new = current["config"][section][key]
            if old != new:
                note = " (the checkpoint predates the setting)" if predates else ""
                problems.append(f"{section}.{key} was {old!r}{note}, now {new!r}")
    if problems:
        raise UserError(
            f"cannot resume from {path}: " + "; ".join(problems)
            + ". Resume with the original settings, or start a new run in another train.output_dir."
        )
    if saved["world_size"] != current["world_size"]:
        log.warning("resuming %s on %d ranks (saved on %d): the sharded state is re-split; the data order is "
                    "the same, micro-batch composition per rank differs", path, current["world_size"],
                    saved["world_size"])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, model, optimizer, trainer_state: dict, info: dict, keep: int,
         dist_info: fdist.DistInfo) -> Path:
    final = step_dir(root, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    with fdist.all_ranks_agree():  # a full disk on rank 0 stops every rank with its message
        if dist_info.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by an earlier crash at this very step
                shutil.rmtree(tmp)
            tmp.mkdir()
    model_sd, optim_sd, _, _ = _state_dicts(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{dist_info.rank}.pt")
    fdist.barrier()
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            (tmp / "run_info.json").write_text(json.dumps(info, indent=2))
            # trainer_state.json is written last: its presence marks the directory complete.
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(root, keep)
            log.info("checkpoint: %s", final)
    return final


def _state_dicts(model, optimizer) -> tuple[dict, dict, StateDictOptions, set[str]]:
    """get_state_dict without frozen parameters (LoRA's base, reloaded from model.path on resume), the options
    that go with it, and the frozen parameters' names. ignore_frozen_params drops each frozen parameter under its
    first name only: a tied LM head would still be saved as ``lm_head.weight`` (the whole embedding), so every
    name of a frozen parameter is dropped here. Without frozen parameters nothing changes and loading stays
    strict."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    options = StateDictOptions(ignore_frozen_params=True, strict=not frozen)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd, options, frozen


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and not p.name.endswith(TMP_SUFFIX))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, model, optimizer, current_info: dict, dist_info: fdist.DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns its trainer_state."""
    with fdist.all_ranks_agree():
        try:
            saved_info = json.loads((path / "run_info.json").read_text())
            trainer_state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read checkpoint {path}: {e}") from None
        check_compatible(saved_info, current_info, path)
    model_sd, optim_sd, options, frozen = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    keys = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                          options=options)
    if keys is not None and (set(keys.missing_keys) - frozen or keys.unexpected_keys):
        raise UserError(f"cannot resume from {path}: the checkpoint lacks {sorted(set(keys.missing_keys) - frozen)} "
                        f"and has {sorted(keys.unexpected_keys)} that the model does not")
    rng_file = path / f"rng-rank{dist_info.rank}.pt"
    if rng_file.exists():  # absent when the world size grew
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
