"""Assemble what a run needs: output directory, tokenizer, tokenized data, FSDP-sharded models and
the reference log-probs. Every user-facing failure here is a UserError with one clear message."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fasttrain_kernels import resolve_lm_head

from fasttrain import distributed as fdist
from fasttrain.config import RunConfig
from fasttrain.errors import UserError
from fasttrain.packing import PromptGroup, build_groups
from fasttrain.reference_logps import (
    LiveReference,
    PrecomputedReference,
    compute_pair_logps,
    load_or_compute_table,
)
from fasttrain.plan import plan_inference

log = logging.getLogger("fasttrain")


# What fasttrain writes into train.output_dir; train.overwrite=true replaces these and nothing else.
OWN_OUTPUTS = ("config.json", "metrics.jsonl", "curves.png", "summary.json", "summary.json.tmp", "tensorboard",
               "checkpoints", "exports", "final")


def check_output_dir(cfg: RunConfig) -> None:
    """Rank 0, before anything is read or written: never overwrite what is there unless asked. A non-empty
    output directory needs train.overwrite=true (replaces fasttrain's own files only) or train.resume."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.train.overwrite or cfg.train.resume):
        raise UserError(
            f"output directory {out} exists and is not empty; pass train.resume=auto to continue that run, "
            "train.overwrite=true to replace its contents, or choose another train.output_dir"
        )


def create_output_dir(cfg: RunConfig) -> Path:
    """Rank 0, once every input has been checked: create the output directory (replacing fasttrain's own
    files when train.overwrite=true starts a fresh run there) and record the resolved config."""
    out = Path(cfg.train.output_dir)
    if out.exists() and cfg.train.overwrite and not cfg.train.resume:
        for name in OWN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here; the user needs the path and cause
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot load a tokenizer from {path}: {first_line}") from None


def load_datasets(cfg: RunConfig, dist_info: fdist.DistInfo, tokenizer):
    """(train, eval or None) as TokenizedPairs. Rank 0 tokenizes and fills the cache; the others
    then read the cache, so N ranks never tokenize (or write the cache) concurrently. A bad record stops
    every rank with rank 0's message (fasttrain.distributed.main_first)."""
    from fasttrain.data import prepare_dataset

    kwargs = dict(template=cfg.data.template, max_length=cfg.data.max_length,
                  max_prompt_length=cfg.data.max_prompt_length, mode=cfg.data.mode,
                  skip_bad_rows=cfg.data.skip_bad_rows, cache_dir=cfg.data.cache_dir)

    def prepare(path: str):
        t0 = time.perf_counter()
        data = fdist.main_first(lambda: prepare_dataset(path, tokenizer, **kwargs), dist_info.is_main)
        log.info("data %s: %d pairs in %.1fs; %s", path, len(data), time.perf_counter() - t0, data.stats.summary())
        return data

    return prepare(cfg.data.train), (prepare(cfg.data.eval) if cfg.data.eval else None)


def tokenized_fingerprint(data) -> str:
    h = hashlib.sha256()
    for seqs in (data.prompts, data.chosens, data.rejecteds):
        h.update(np.concatenate(seqs).astype(np.int64).tobytes() if seqs else b"")
        h.update(np.asarray([len(s) for s in seqs], dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def groups_of(data, num_pairs: int | None = None) -> list[PromptGroup]:
    n = len(data.record_ids) if num_pairs is None else min(num_pairs, len(data.record_ids))
    return build_groups(data.prompts[:n], data.chosens[:n], data.rejecteds[:n], data.record_ids[:n], range(n))


def check_model_source(path: str):
    """The model directory's config, read and checked (files present and readable, supported architecture)."""
    from fasttrain.model.hf_checkpoint import check_model_files
    from fasttrain.model.config import ModelConfig

    try:
        check_model_files(path)
        return ModelConfig.from_model_dir(path)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def build_sharded_model(cfg: RunConfig, dist_info: fdist.DistInfo, backend: str, trainable: bool,
                        model_cfg=None, init_weights: Callable[[torch.nn.Module], None] | None = None):
    """The FSDP2-sharded model of ``cfg.model.path`` (or of ``model_cfg`` with weights from ``init_weights``,
    for benchmarks on random models), on ``dist_info.device``.

    Trainable: fp32 master weights (the optimizer's), gathered in the compute dtype. Frozen (a live
    reference): stored in the compute dtype, which is what FSDP would gather anyway, at half the memory.
    """
    from fasttrain.model.hf_checkpoint import load_hf_weights
    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model

    with fdist.all_ranks_agree():  # the same files and card on every rank, but a rank may still fail alone
        if model_cfg is None:
            try:
                model_cfg = ModelConfig.from_model_dir(cfg.model.path)
            except (OSError, ValueError) as e:
                raise UserError(str(e)) from None
        try:
            model_cfg.check_max_length(cfg.data.max_length)
        except ValueError as e:
            raise UserError(str(e)) from None
        if trainable:  # the plan covers a live reference too, so building the reference repeats nothing
            check_memory_plan(model_cfg, cfg, dist_info)
    compute_dtype = getattr(torch, cfg.model.compute_dtype)
    model = build_model(model_cfg, device="meta", dtype=torch.float32 if trainable else compute_dtype)
    model.set_attention_backend(backend)
    model.lm_head_impl = resolve_lm_head(cfg.model.lm_head_impl, dist_info.device)
    model.activation_checkpointing = cfg.model.activation_checkpointing and trainable
    # Set before fully_shard like torchtitan's per-block compile; the compiled regions run inside the
    # block's forward, so FSDP2's hooks and the checkpointing stay outside them.
    model.compile_blocks = cfg.model.compile
    if cfg.model.compile and trainable:  # logged once per run (a live reference shares the graphs)
        log.info("model.compile: torch.compile per decoder block (norm, q/k/v, RoPE | o_proj, norm, SwiGLU; "
                 "attention eager); the first micro-batches compile")
    offload = cfg.model.cpu_offload and trainable
    fdist.shard_model(model, compute_dtype, frozen=not trainable, cpu_offload=offload)
    # With CPU offload the sharded parameters live in host memory, and FSDP2 checks that they were
    # materialised there at the first forward ("FSDP parameters should be materialized on CPU when enabling CPU
    # offloading"): to_empty(cuda) would leave each DTensor on cuda even after FSDP2 moves its local shard.
    # The model has no buffers (RoPE tables are cached per device at first use), so nothing else must follow.
    model.to_empty(device=torch.device("cpu") if offload else dist_info.device)
    model.reset_buffers()
    if init_weights is not None:
        init_weights(model)
    else:
        # Each rank reads its own rows: a truncated file can fail on the ranks that read its end only.
        with fdist.all_ranks_agree():
            try:
                load_hf_weights(model, cfg.model.path)
            except (OSError, ValueError, KeyError) as e:
                raise UserError(_message(e)) from None
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _message(error: BaseException) -> str:
    """A KeyError's str() is its repr ("'...'"); the others' str() is the message."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def check_memory_plan(model_cfg, cfg: RunConfig, dist_info: fdist.DistInfo) -> None:
    """Fail before allocating anything when the sharded state cannot fit the GPU (DESIGN §6).

    Both models of a run count: the trainable one's fp32 params + fp32 grads +
    AdamW m, v = 16 bytes/param (host memory instead with model.cpu_offload), and a live reference's frozen
    compute-dtype shards (2 bytes/param in bf16), all sharded over every rank. Activations and the gathered
    bf16 blocks come on top, so at most 85% of the card is planned.
    """
    if dist_info.device.type != "cuda":
        return
    from fasttrain.model.config import num_params

    n = num_params(model_cfg)
    policy_bytes = 0 if cfg.model.cpu_offload else 16
    reference_bytes = (torch.finfo(getattr(torch, cfg.model.compute_dtype)).bits // 8
                       if cfg.loss.reference == "live" else 0)
    bytes_per_param = policy_bytes + reference_bytes
    need = n * bytes_per_param / dist_info.world_size
    have = torch.cuda.get_device_properties(dist_info.device).total_memory
    if need > 0.85 * have:
        parts = [f"{policy_bytes} bytes/param training state"]
        if reference_bytes:
            parts.append(f"{reference_bytes} bytes/param live reference")
        raise UserError(
            f"the sharded state of {n / 1e9:.1f}B params needs {need / 2**30:.1f} GiB per GPU on "
            f"{dist_info.world_size} GPU(s) ({' + '.join(parts)}), more than 85% of this card's "
            f"{have / 2**30:.0f} GiB. Use more GPUs (nodes), model.cpu_offload=true, or loss.reference=precompute."
        )


@dataclass
class References:
    """The reference used by training steps, and the one for each evaluation set."""

    train: object
    by_eval_set: dict[str, object]
    all_cached: bool = True  # precompute: every table came from the on-disk cache


def build_references(cfg: RunConfig, dist_info: fdist.DistInfo, backend: str, policy, train_data, eval_data,
                     eval_sets: dict[str, list[PromptGroup]], model_fp: str) -> References:
    """Live: a frozen sharded copy. Precompute: one pass of the (still initial) policy over the train
    and eval sets, cached on disk under a key of model files, tokens, compute dtype and LM head."""
    if cfg.loss.reference == "live":
        live = LiveReference(build_sharded_model(cfg, dist_info, backend, trainable=False))
        return References(live, {name: live for name in eval_sets})
    world, budget = dist_info.world_size, cfg.train.tokens_per_micro_batch
    tables = {}
    all_cached = True
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is None:
            continue
        groups = groups_of(data)
        key = {"model": model_fp, "tokens": tokenized_fingerprint(data), "dtype": cfg.model.compute_dtype,
               "lm_head": policy.lm_head_impl}
        if cfg.model.compile:  # fused kernels round differently; only set when on, so eager keys are unchanged
            key["compile"] = True
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        t0 = time.perf_counter()
        table, cached = load_or_compute_table(
            Path(cfg.data.cache_dir) / "reference" / f"{digest}.pt", key,
            lambda: compute_pair_logps(policy, plan_inference(groups, world, budget)[dist_info.rank], len(data),
                                       dist_info.device),
            dist_info.is_main, dist_info.device,
        )
        log.info("reference log-probs (%s): %s in %.1fs", name, "cache hit" if cached else "precomputed",
                 time.perf_counter() - t0)
        tables[name] = PrecomputedReference(table)
        all_cached &= cached
    by_eval = {"train_subset": tables["train"]}
    if "eval" in tables:
        by_eval["eval"] = tables["eval"]
    return References(tables["train"], by_eval, all_cached)
