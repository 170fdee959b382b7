"""Assemble what a run needs: output directory, tokenizer, tokenized data, FSDP-sharded models and
the reference log-probs. Every user-facing failure here is a UserError with one clear message."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fasttrain import distributed as fdist
from fasttrain import resume_checkpoint
from fasttrain.config import RunConfig
from fasttrain.errors import UserError
from fasttrain.flops import FlopModel
from fasttrain.packing import PromptGroup, build_groups
from fasttrain.plan import plan_inference, plan_steps
from fasttrain.reference_logps import (
    AdaptersOffReference,
    LiveReference,
    PrecomputedReference,
    compute_pair_logps,
    load_or_compute_table,
    model_fingerprint,
)
from fasttrain_kernels import resolve_lm_head

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
    from fasttrain.model.config import ModelConfig
    from fasttrain.model.hf_checkpoint import check_model_files

    try:
        check_model_files(path)
        return ModelConfig.from_model_dir(path)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def build_sharded_model(cfg: RunConfig, dist_info: fdist.DistInfo, backend: str, trainable: bool,
                        model_cfg=None, init_weights: Callable[[torch.nn.Module], None] | None = None):
    """The FSDP2-sharded model of ``cfg.model.path`` (or of ``model_cfg`` with weights from ``init_weights``,
    for benchmarks on random models), on ``dist_info.device``.

    Trainable: the optimizer's master weights, fp32 (train.optimizer_state=fp32) or their bf16 high half
    (compact), gathered in the compute dtype. Frozen (a live reference): stored in the compute dtype, which is
    what FSDP would gather anyway, at half the memory.
    """
    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model
    from fasttrain.model.hf_checkpoint import load_hf_weights

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
    model_cfg = dataclasses.replace(model_cfg, fuse_projections=cfg.model.fuse_projections)
    compute_dtype = getattr(torch, cfg.model.compute_dtype)
    compact = cfg.train.optimizer_state == "compact"
    lora = lora_spec(cfg) if trainable else None
    master_dtype = torch.bfloat16 if compact else torch.float32
    # LoRA: the base is frozen and held in the compute dtype; the fp32 adapters are the trained parameters
    model = build_model(model_cfg, device="meta", dtype=master_dtype if trainable and not lora else compute_dtype)
    if lora is not None:
        from fasttrain.model.lora import add_adapters, check_rank

        try:
            check_rank(model, lora)
        except ValueError as e:
            raise UserError(str(e)) from None
        add_adapters(model, lora)
    model.set_attention_backend(backend)
    model.lm_head_impl = resolve_lm_head(cfg.model.lm_head_impl, dist_info.device)
    model.activation_checkpointing = resolve_checkpointing(cfg, model_cfg, dist_info) if trainable else "none"
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
        init_lora(model, lora, cfg.train.seed)
    else:
        # Each rank reads its own rows: a truncated file can fail on the ranks that read its end only.
        with fdist.all_ranks_agree():
            try:
                load_hf_weights(model, cfg.model.path)
            except (OSError, ValueError, KeyError) as e:
                raise UserError(_message(e)) from None
        init_lora(model, lora, cfg.train.seed)
        if compact and trainable and dist_info.is_main:
            warn_compact_rounding(cfg.model.path)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def init_lora(model, lora, seed: int) -> None:
    if lora is not None:
        from fasttrain.model.lora import adapter_parameters, init_adapters

        init_adapters(model, seed)
        n = sum(p.numel() for p in adapter_parameters(model).values())
        log.info("LoRA: rank %d, alpha %g (scale %g), dropout %g on %s: %.2fM adapter parameters trained, the "
                 "base frozen in %s", lora.rank, lora.alpha, lora.scale, lora.dropout, ",".join(lora.targets),
                 n / 1e6, next(p for p in model.parameters() if not p.requires_grad).dtype)


def warn_compact_rounding(model_dir: str) -> None:
    """Compact state starts its fp32 master at the bf16 weight: exact for bf16 checkpoints (every Qwen2 release),
    a rounding of wider ones, which is said once."""
    from safetensors import safe_open

    from fasttrain.model.hf_checkpoint import checkpoint_tensor_files

    stored = set()
    for path in set(checkpoint_tensor_files(model_dir).values()):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored |= {f.get_slice(name).get_dtype() for name in f.keys()}
    wider = sorted(stored - {"BF16"})
    if wider:
        log.warning("train.optimizer_state=compact: %s holds %s weights; training starts from them rounded to "
                    "bfloat16 (the compact master's first value)", model_dir, "/".join(wider))


def _message(error: BaseException) -> str:
    """A KeyError's str() is its repr ("'...'"); the others' str() is the message."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def check_memory_plan(model_cfg, cfg: RunConfig, dist_info: fdist.DistInfo) -> None:
    """Fail before allocating anything when the sharded state cannot fit the GPU (DESIGN §6).

    Both models of a run count: the trainable one's weights + grads + AdamW m, v (16 bytes/param with
    train.optimizer_state=fp32, 10 with compact; host memory instead with model.cpu_offload), and a live
    reference's frozen compute-dtype shards (2 bytes/param in bf16), all sharded over every rank. With LoRA the
    base is frozen in the compute dtype and only the adapters carry training state; the live reference is the same
    model. Activations and the gathered bf16 blocks come on top, so at most 85% of the card is planned.
    """
    if dist_info.device.type != "cuda":
        return
    from fasttrain.model.config import num_params

    n = num_params(model_cfg)
    policy, reference, what = state_bytes(model_cfg, cfg)
    need = (policy + reference) / dist_info.world_size
    have = torch.cuda.get_device_properties(dist_info.device).total_memory
    if need > 0.85 * have:
        raise UserError(
            f"the sharded state of {n / 1e9:.1f}B params needs {need / 2**30:.1f} GiB per GPU on "
            f"{dist_info.world_size} GPU(s) ({what}), more than 85% of this card's "
            f"{have / 2**30:.0f} GiB. Use more GPUs (nodes), train.optimizer_state=compact, model.cpu_offload=true, "
            "model.lora_rank > 0, or loss.reference=precompute."
        )


def state_bytes(model_cfg, cfg: RunConfig) -> tuple[float, float, str]:
    """(training state, live reference) bytes on the GPUs, all ranks together, and how they are made up."""
    from fasttrain.compact_adamw import STATE_BYTES_PER_PARAM
    from fasttrain.model.config import num_params

    n = num_params(model_cfg)
    if cfg.model.lora_rank > 0:
        adapters = lora_params(model_cfg, cfg)
        # with model.cpu_offload FSDP2 keeps every sharded parameter in host memory, the frozen base included
        per_adapter = 0 if cfg.model.cpu_offload else STATE_BYTES_PER_PARAM["fp32"]
        base = 0 if cfg.model.cpu_offload else compute_dtype_bytes(cfg)
        return (n * base + adapters * per_adapter, 0.0,
                f"frozen base {base} bytes/param + {adapters / 1e6:.1f}M adapter params x {per_adapter} bytes")
    policy_bytes = 0 if cfg.model.cpu_offload else STATE_BYTES_PER_PARAM[cfg.train.optimizer_state]
    reference_bytes = compute_dtype_bytes(cfg) if cfg.loss.reference == "live" else 0
    what = f"{policy_bytes} bytes/param training state (train.optimizer_state={cfg.train.optimizer_state})"
    if reference_bytes:
        what += f" + {reference_bytes} bytes/param live reference"
    return n * policy_bytes, n * reference_bytes, what


def lora_params(model_cfg, cfg: RunConfig) -> int:
    """Adapter parameters of the whole model: rank x (in + out) for every targeted HF layer of every block."""
    from fasttrain.model.lora import adapter_params_per_block

    return adapter_params_per_block(model_cfg, lora_spec(cfg)) * model_cfg.num_hidden_layers


def lora_spec(cfg: RunConfig):
    """model.lora_* as a LoraSpec, or None for full fine-tuning."""
    from fasttrain.model.lora import LoraSpec, parse_targets

    m = cfg.model
    if m.lora_rank <= 0:
        return None
    return LoraSpec(m.lora_rank, m.lora_alpha, m.lora_dropout, parse_targets(m.lora_targets))


def compute_dtype_bytes(cfg: RunConfig) -> int:
    return torch.finfo(getattr(torch, cfg.model.compute_dtype)).bits // 8


def resolve_checkpointing(cfg: RunConfig, model_cfg, dist_info: fdist.DistInfo) -> str:
    """model.activation_checkpointing as a mode; ``auto`` resolved once from the memory model (DESIGN §6.10) and
    logged with the numbers that decided it."""
    from fasttrain.model.decoder import checkpointing_mode

    setting = cfg.model.activation_checkpointing
    if setting != "auto":
        return checkpointing_mode(setting)
    if dist_info.device.type != "cuda":
        log.info("model.activation_checkpointing=auto -> none: on a CPU activations live in host memory, which "
                 "nothing plans")
        return "none"
    from fasttrain import activation_memory

    policy, reference, _ = state_bytes(model_cfg, cfg)
    state = (policy + reference) / dist_info.world_size
    choice = activation_memory.choose(model_cfg, cfg.train.tokens_per_micro_batch, compute_dtype_bytes(cfg),
                                      torch.cuda.get_device_properties(dist_info.device).total_memory, state)
    if dist_info.is_main:
        log.info("%s", choice.explain())
    if choice.mode == "selective" and cfg.model.compile:
        if dist_info.is_main:
            log.info("model.compile=true is not supported with selective checkpointing yet: full instead")
        return "full"
    return choice.mode


@dataclass
class References:
    """The reference used by training steps, and the one for each evaluation set."""

    train: object
    by_eval_set: dict[str, object]
    all_cached: bool = True  # precompute: every table came from the on-disk cache


@dataclass
class ReferenceSet:
    """Pairs whose reference log-probs a run needs: ``cache_tokens`` (the tokenized data's fingerprint) keys the
    on-disk cache; None (synthetic data in benchmarks) computes the table without caching it."""

    groups: list[PromptGroup]
    num_pairs: int
    cache_tokens: str | None = None


def build_references(cfg: RunConfig, dist_info: fdist.DistInfo, backend: str, policy,
                     sets: dict[str, ReferenceSet], model_fp: str, model_cfg=None,
                     init_weights: Callable[[torch.nn.Module], None] | None = None) -> References:
    """Live: a frozen sharded copy (of ``cfg.model.path``, or ``model_cfg`` + ``init_weights`` like the policy).
    Precompute: one pass of the (still initial) policy over each set ("train", and "eval" when there is one),
    cached on disk under a key of model files, tokens, compute dtype and LM head."""
    if cfg.loss.reference == "live" and cfg.model.lora_rank > 0:  # the policy with its adapters off
        live = AdaptersOffReference(policy)
        return References(live, {"train_subset": live, **({"eval": live} if "eval" in sets else {})})
    if cfg.loss.reference == "live":
        live = LiveReference(build_sharded_model(cfg, dist_info, backend, trainable=False, model_cfg=model_cfg,
                                                 init_weights=init_weights))
        return References(live, {"train_subset": live, **({"eval": live} if "eval" in sets else {})})
    world, budget = dist_info.world_size, cfg.train.tokens_per_micro_batch
    tables = {}
    all_cached = True
    for name, ref_set in sets.items():
        def compute(ref_set=ref_set):
            from fasttrain.model.lora import adapters_disabled

            with adapters_disabled(policy):  # LoRA: the base (its adapters start at B = 0, so the same numbers)
                return compute_pair_logps(policy, plan_inference(ref_set.groups, world, budget)[dist_info.rank],
                                          ref_set.num_pairs, dist_info.device)

        t0 = time.perf_counter()
        if ref_set.cache_tokens is None:
            table, cached = compute(), False
        else:
            key = {"model": model_fp, "tokens": ref_set.cache_tokens, "dtype": cfg.model.compute_dtype,
                   "lm_head": policy.lm_head_impl}
            if cfg.model.compile:  # fused kernels round differently; only set when on, so eager keys are unchanged
                key["compile"] = True
            if cfg.train.optimizer_state == "compact":  # the policy starts from bf16 weights (an fp32 source rounded)
                key["optimizer_state"] = "compact"
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            table, cached = load_or_compute_table(Path(cfg.data.cache_dir) / "reference" / f"{digest}.pt", key,
                                                  compute, dist_info.is_main, dist_info.device)
        log.info("reference log-probs (%s): %s in %.1fs", name, "cache hit" if cached else "precomputed",
                 time.perf_counter() - t0)
        tables[name] = PrecomputedReference(table)
        all_cached &= cached
    by_eval = {"train_subset": tables["train"]}
    if "eval" in tables:
        by_eval["eval"] = tables["eval"]
    return References(tables["train"], by_eval, all_cached)


# ----------------------------------------------------------------------------------------------
# A run: its checked inputs, then everything built from them
# ----------------------------------------------------------------------------------------------
@dataclass
class RunInputs:
    """What a run reads, checked on every rank; nothing built, nothing written. ``train_data`` is None for
    synthetic groups (benchmarks)."""

    backend: str  # attention backend
    lm_head: str  # resolved LM-head implementation
    train_groups: list[PromptGroup]
    plans: list  # StepPlans, one per optimizer step
    train_data: object = None  # TokenizedPairs
    eval_data: object = None
    info: dict | None = None  # config, versions, model/data fingerprints (resume checks, summary.json)
    resume_from: Path | None = None
    model_fp: str = ""


@dataclass
class Run:
    """Everything a run trains with. Built by build_run; trainer.train and every benchmark use the same one."""

    cfg: RunConfig
    dist: fdist.DistInfo
    inputs: RunInputs
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    flop_model: object
    refs: References
    eval_plans: dict  # evaluation set name -> per-rank micro-batches


def check_inputs(cfg: RunConfig, dist_info: fdist.DistInfo) -> RunInputs:
    """Check everything a run reads (output directory, backends, model files, tokenizer, data, the plan, the
    checkpoint to resume from) on every rank, agreeing on any failure (DESIGN §8.2-8.3); writes nothing."""
    device = dist_info.device
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            check_output_dir(cfg)
        resume_from = resume_source(cfg)
        backend, lm_head = resolve_backends(cfg, device)
        model_cfg = check_model_source(cfg.model.path)  # fail fast, before tokenizing anything
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        if len(tokenizer) > model_cfg.vocab_size:
            raise UserError(f"the tokenizer ({cfg.model.tokenizer or cfg.model.path}) has {len(tokenizer)} tokens "
                            f"but the model's vocab_size is {model_cfg.vocab_size}: they do not belong together")
    log.info("world size %d on %s; attention backend %s; LM head %s; compute %s; optimizer state %s (%s)",
             dist_info.world_size, device, backend, lm_head, cfg.model.compute_dtype, cfg.train.optimizer_state,
             OPTIMIZER_STATE_NAMES[cfg.train.optimizer_state])
    train_data, eval_data = load_datasets(cfg, dist_info, tokenizer)
    train_groups = groups_of(train_data)
    with fdist.all_ranks_agree():
        try:
            plans = plan_steps(train_groups, cfg.train.global_batch_pairs, dist_info.world_size,
                               cfg.train.tokens_per_micro_batch, cfg.train.seed, cfg.train.epochs, cfg.train.max_steps)
        except ValueError as e:
            raise UserError(f"{cfg.data.train}: {e}") from None
    warn_offload_accumulation(cfg, plans)
    n_shared = sum(len(g.continuations) > 2 for g in train_groups)
    log.info("%d pairs in %d prompt groups (%d with >2 continuations); %d optimizer steps of %d pairs",
             len(train_data), len(train_groups), n_shared, len(plans), cfg.train.global_batch_pairs)
    model_fp = model_fingerprint(cfg.model.path)
    info = resume_checkpoint.run_info(cfg.to_dict(), model_fp, tokenized_fingerprint(train_data),
                                      dist_info.world_size)
    return RunInputs(backend, lm_head, train_groups, plans, train_data, eval_data, info, resume_from, model_fp)


def synthetic_inputs(cfg: RunConfig, dist_info: fdist.DistInfo, groups: list[PromptGroup], num_steps: int
                     ) -> RunInputs:
    """RunInputs for ready-made prompt groups (benchmarks): no files read, ``num_steps`` optimizer steps."""
    backend, lm_head = resolve_backends(cfg, dist_info.device)
    plans = plan_steps(groups, cfg.train.global_batch_pairs, dist_info.world_size, cfg.train.tokens_per_micro_batch,
                       cfg.train.seed, 0, num_steps)
    return RunInputs(backend, lm_head, groups, plans)


def build_run(cfg: RunConfig, dist_info: fdist.DistInfo, inputs: RunInputs, model_cfg=None,
              init_weights: Callable[[torch.nn.Module], None] | None = None) -> Run:
    """The sharded model (weights from ``cfg.model.path``, or ``model_cfg`` + ``init_weights`` for benchmarks'
    random models), its AdamW and schedule, the references (from the initial weights) and the evaluation
    plans. A checkpoint to resume from is loaded by the trainer afterwards (trainer.restore)."""
    model = build_sharded_model(cfg, dist_info, inputs.backend, trainable=True, model_cfg=model_cfg,
                                init_weights=init_weights)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params, len(inputs.plans))
    world, budget = dist_info.world_size, cfg.train.tokens_per_micro_batch
    if inputs.train_data is not None:
        eval_sets = {"train_subset": groups_of(inputs.train_data, 256)}  # the same pairs every time
        ref_sets = {"train": ReferenceSet(inputs.train_groups, len(inputs.train_data),
                                          tokenized_fingerprint(inputs.train_data))}
        if inputs.eval_data is not None:
            eval_sets["eval"] = groups_of(inputs.eval_data)
            ref_sets["eval"] = ReferenceSet(eval_sets["eval"], len(inputs.eval_data),
                                            tokenized_fingerprint(inputs.eval_data))
    else:  # synthetic groups: the pairs are numbered 0..n-1 across the groups
        n_pairs = sum(g.num_pairs for g in inputs.train_groups)
        eval_sets = {}
        ref_sets = {"train": ReferenceSet(inputs.train_groups, n_pairs)}
    refs = build_references(cfg, dist_info, inputs.backend, model, ref_sets, inputs.model_fp, model_cfg, init_weights)
    if cfg.loss.reference == "precompute" and inputs.resume_from is not None and not refs.all_cached:
        log.warning("the reference log-prob cache was missing on resume; it was recomputed from model.path")
    eval_plans = {name: plan_inference(gs, world, budget) for name, gs in eval_sets.items()}
    return Run(cfg, dist_info, inputs, model, optimizer, scheduler, params, FlopModel.of(model.config), refs,
               eval_plans)


OPTIMIZER_STATE_NAMES = {
    "fp32": "fp32 master weights, grads and AdamW moments: 16 bytes/param",
    "compact": "bf16 weights + fp32-master low bits, bf16 grads and AdamW moments: 10 bytes/param",
}


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter], total_steps: int):
    """(AdamW, LambdaLR with linear warmup + cosine decay) over the sharded master parameters."""
    if cfg.train.optimizer_state == "compact":
        from fasttrain.compact_adamw import CompactAdamW

        optimizer = CompactAdamW(params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                 eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay, seed=cfg.train.seed)
    else:
        optimizer = torch.optim.AdamW(
            params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
            weight_decay=cfg.train.weight_decay,
            # Fused: one pass over each fp32 param / grad / moment (torchtitan's default with FSDP2). On CUDA, and
            # on the host for CPU-offloaded state (torch's vectorised, multithreaded CPU kernel: the 72B recipe's
            # optimizer step is memory-bound there). CPU-only runs keep the for-each path the equality tests pin.
            fused=bool(params) and (params[0].device.type == "cuda" or cfg.model.cpu_offload),
        )
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.train.min_lr_ratio)
    )
    return optimizer, scheduler


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resolve_backends(cfg: RunConfig, device: torch.device) -> tuple[str, str]:
    """(attention backend, LM-head implementation) for this run, each resolved once (DESIGN §3.3, §4.2)."""
    from fasttrain.attention import resolve_backend

    if cfg.model.cpu_offload and device.type != "cuda":
        raise UserError("model.cpu_offload=true moves the sharded training state from GPU memory to host "
                        f"memory; this run is on {device.type}, where it already lives in host memory: set it "
                        "to false")
    try:
        return (resolve_backend(cfg.model.attention_backend, device, getattr(torch, cfg.model.compute_dtype)),
                resolve_lm_head(cfg.model.lm_head_impl, device))
    except RuntimeError as e:
        raise UserError(str(e)) from None


def resume_source(cfg: RunConfig) -> Path | None:
    """The checkpoint train.resume names: ``auto`` = the newest complete one in output_dir, if any."""
    if cfg.train.resume == "":
        return None
    if cfg.train.resume == "auto":
        root = Path(cfg.train.output_dir) / "checkpoints"
        latest = resume_checkpoint.find_latest(root)
        if latest is None:
            log.info("train.resume=auto: no complete checkpoint in %s; starting from the beginning", root)
        return latest
    return Path(cfg.train.resume)


def warn_offload_accumulation(cfg: RunConfig, plans) -> None:
    if not cfg.model.cpu_offload:
        return
    most = max(len(mbs) for plan in plans for mbs in plan.micro_batches)
    if most > 1:
        # FSDP2 copies a gradient to host memory asynchronously only when none is being accumulated:
        # from a step's second micro-batch on, every block's copy blocks the host and adds on the CPU.
        log.warning("model.cpu_offload with up to %d micro-batches per rank per step: from the second one on, "
                    "each block's gradient copy to host memory blocks and is summed on the CPU. One "
                    "micro-batch per step (train.tokens_per_micro_batch >= the tokens of "
                    "global_batch_pairs / world size pairs, or more GPUs) keeps the copies asynchronous", most)
