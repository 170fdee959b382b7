"""HF exports of the trained weights, in a dtype that keeps what training changed.

The run trains fp32 master weights. Writing them in bf16 rounds each weight to 8 significant bits (relative
unit 2^-8 = 3.9e-3), while a Step-DPO update is far smaller (lr 5e-7: ~1e-5 of a weight): a bf16 export
rounds most trained weights back to their initial bf16 values. Seen on a 135M model after 24 steps at lr
1e-5: 93.6% of the changed weights rounded back, the exported model's reward margin was 0.99 where the run
reported 5.97.

So before writing, every export measures, for each candidate dtype, how much of the update it would lose:

    update_error(dtype) = ||cast(master) - master|| / ||master - initial||      (L2 over all weights)

which is the relative L2 error of the exported update ``exported - initial`` against the trained update
``master - initial`` ("initial" = the weights in ``model.path``). ``train.save_dtype=auto`` writes the source
checkpoint's own 16-bit dtype when that error is at most MAX_UPDATE_ERROR, else float32. An explicit
``bfloat16``/``float32`` is honoured; the measurement is logged and recorded either way.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fasttrain import distributed as fdist

log = logging.getLogger("fasttrain")

# A 16-bit export may lose at most 1% (relative L2) of the trained update: the exported model then differs
# from the trained one by less than the update's own step-to-step change at the end of a cosine schedule.
MAX_UPDATE_ERROR = 0.01

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class ExportReport:
    path: str
    dtype: str  # what was written
    reason: str
    update_norm: float  # ||master - initial||
    update_error: dict[str, float]  # candidate dtype -> relative L2 error of the exported update (float32: 0)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_update_error(model: torch.nn.Module, initial_dir: str, optimizer: torch.optim.Optimizer | None = None
                         ) -> tuple[float, dict[str, float], torch.dtype]:
    """Collective: (||master - initial||, {dtype: update_error}, the initial checkpoint's floating dtype).

    Each rank reads only its own rows of the initial weights (as loading does) and compares them with its
    local shard's fp32 master (with train.optimizer_state=compact: rebuilt from the bf16 weight and the
    optimizer's low bits); one all-reduce sums the squares. The candidates are bfloat16 and, when different, the
    checkpoint's own 16-bit dtype.
    """
    from fasttrain.compact_adamw import master_local
    from fasttrain.model.hf_checkpoint import hf_reader, param_pieces
    from fasttrain.model.shards import local_shard

    fdist.reshard_all(model)  # weights are read from the sharded DTensors, never a gathered copy
    params = dict(model.named_parameters())  # a tied LM head is the embedding's parameter and appears once
    stored = set()
    device = next(iter(params.values())).device
    candidates = [torch.bfloat16, torch.float16]
    sums_C = torch.zeros(1 + len(candidates), dtype=torch.float64, device=device)  # update^2, lost^2 per dtype
    with hf_reader(initial_dir) as reader:
        for name, param in params.items():
            pieces = param_pieces(model, name, param)
            stored |= {reader.slice(p.hf_name).get_dtype() for p in pieces}
            _, start, end = local_shard(param, name)
            if end <= start:
                continue
            master = master_local(optimizer, param, name)
            initial = reader.rows(pieces, start, end).to(device=master.device, dtype=torch.float32)
            sums_C[0] += (master - initial).double().square().sum()
            for i, dtype in enumerate(candidates):
                sums_C[1 + i] += (master.to(dtype).float() - master).double().square().sum()
    fdist.all_reduce_sum(sums_C)
    update_sq, *lost_sq = sums_C.tolist()
    errors = {"float32": 0.0}
    for dtype, lost in zip(candidates, lost_sq):
        name = str(dtype).removeprefix("torch.")
        errors[name] = math.sqrt(lost / update_sq) if update_sq > 0 else (0.0 if lost == 0 else math.inf)
    source = {_SAFETENSORS_DTYPES.get(s, torch.float32) for s in stored}
    # Every rank must pick the same dtype: the stored dtypes are the same files on every rank.
    source_dtype = source.pop() if len(source) == 1 else torch.float32
    return math.sqrt(update_sq), errors, source_dtype


def choose_export_dtype(setting: str, errors: dict[str, float], source_dtype: torch.dtype) -> tuple[str, str]:
    """(dtype name, why) for ``train.save_dtype`` = ``setting``."""
    if setting != "auto":
        return setting, "train.save_dtype=" + setting
    source = str(source_dtype).removeprefix("torch.")
    if source not in ("bfloat16", "float16"):
        return "float32", f"the initial checkpoint is {source}"
    if errors[source] <= MAX_UPDATE_ERROR:
        return source, (f"{source}, the initial checkpoint's dtype, keeps the trained update to "
                        f"{errors[source]:.2%} relative L2 error (<= {MAX_UPDATE_ERROR:.0%})")
    return "float32", (f"{source}, the initial checkpoint's dtype, would lose {errors[source]:.1%} of the trained "
                       f"update (relative L2 error > {MAX_UPDATE_ERROR:.0%})")


def export_hf(model, cfg, out: Path, dist_info: fdist.DistInfo, replace: bool,
              optimizer: torch.optim.Optimizer | None = None) -> ExportReport:
    """Collective: measure, choose the dtype, gather the full fp32 master weights to rank 0's host memory, write
    the HF checkpoint there (atomically). ``replace``: an existing ``out`` was written by this run and is
    replaced. ``optimizer``: the run's, whose state holds the masters' low bits with optimizer_state=compact."""
    from fasttrain.model.hf_checkpoint import save_hf_checkpoint

    if cfg.model.lora_rank > 0:
        return export_lora(model, cfg, out, dist_info, replace)
    update_norm, errors, source_dtype = measure_update_error(model, cfg.model.path, optimizer)
    dtype, reason = choose_export_dtype(cfg.train.save_dtype, errors, source_dtype)
    report = ExportReport(str(out), dtype, reason, update_norm, errors)
    if dtype != "float32" and errors[dtype] > MAX_UPDATE_ERROR:
        log.warning("export %s in %s loses %.1f%% of the trained update (relative L2 error of exported - initial "
                    "vs master - initial); train.save_dtype=auto would write float32", out, dtype,
                    100 * errors[dtype])
    state = gather_master_weights(model, optimizer, dist_info.is_main)
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            save_hf_checkpoint(state, model.config, out, tokenizer_dir=cfg.model.tokenizer or cfg.model.path,
                               dtype=getattr(torch, dtype), overwrite=replace)
            log.info("exported %s (HF format) in %s: %s", out, dtype, reason)
    return report


def export_lora(model, cfg, out: Path, dist_info: fdist.DistInfo, replace: bool) -> ExportReport:
    """Collective: the adapters (fp32, a few hundred MB at most) gathered to rank 0's host memory and written as a
    PEFT adapter directory at ``out``; with train.merge_lora also the base with the adapters merged in fp32, a
    plain HF checkpoint at ``<out>_merged`` (every rank joins the base's gathers then)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fasttrain.assembly import lora_spec
    from fasttrain.model.hf_checkpoint import save_hf_checkpoint, save_peft_adapter
    from fasttrain.model.lora import adapter_deltas, is_adapter, merged_state_dict, peft_config, peft_name

    spec = lora_spec(cfg)
    fdist.reshard_all(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not cfg.train.merge_lora)
    state = get_model_state_dict(model, options=options)
    tokenizer_dir = cfg.model.tokenizer or cfg.model.path
    update_sq = 0.0
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            adapters = {peft_name(n): t.float() for n, t in state.items() if is_adapter(n)}
            # ||scale B A||^2 summed over the adapted layers: the update of the weights
            update_sq = sum(float(delta.square().sum()) for _, delta in adapter_deltas(state, spec))
            save_peft_adapter(adapters, peft_config(spec, str(cfg.model.path)), out, tokenizer_dir, overwrite=replace)
            log.info("exported %s (PEFT LoRA adapter, %d tensors, float32)", out, len(adapters))
            if cfg.train.merge_lora:
                merged = out.with_name(out.name + "_merged")
                save_hf_checkpoint(merged_state_dict(state, model.config, spec), model.config, merged,
                                   tokenizer_dir=tokenizer_dir, dtype=torch.float32, overwrite=replace)
                log.info("exported %s (the base with the adapters merged, HF format, float32)", merged)
    return ExportReport(str(out), "float32", "LoRA adapters in PEFT format (fp32: a few hundred MB at most)",
                        math.sqrt(update_sq), {"float32": 0.0})


def gather_master_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, is_main: bool
                          ) -> dict:
    """Collective: the full fp32 master weights in rank 0's host memory ({} on the other ranks). With compact
    optimizer state the gathered bf16 weights are joined with their gathered low bits, parameter by parameter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fasttrain.compact_adamw import CompactAdamW, join_fp32

    fdist.reshard_all(model)
    # Every rank takes part in the gathers; only rank 0 holds (on CPU) the full weights.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if isinstance(optimizer, CompactAdamW):
        for name, param in model.named_parameters():
            low = optimizer.low_bits(param)
            if low is None:  # no step yet: the master is the bf16 weight itself
                continue
            if hasattr(low, "full_tensor"):
                # Gathered as bf16, the same 2 bytes: neither gloo nor NCCL all-gathers int16.
                from torch.distributed.tensor import DTensor

                as_bf16 = DTensor.from_local(low.to_local().view(torch.bfloat16), low.device_mesh, low.placements,
                                             shape=low.shape, stride=low.stride())
                low = as_bf16.full_tensor().view(torch.int16)
            if is_main:
                state[name] = join_fp32(state[name], low.cpu())
    return state


@contextmanager
def weights_as_exported(model: torch.nn.Module, dtype_name: str) -> Iterator[None]:
    """Within the block, every local shard holds its value rounded to ``dtype_name`` (what the export holds);
    the fp32 values are kept in host memory and restored after. A no-op for float32."""
    if dtype_name == "float32":
        yield
        return
    from fasttrain.model.shards import local_shard

    fdist.reshard_all(model)
    dtype = getattr(torch, dtype_name)
    saved = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, _, _ = local_shard(param, name)
            saved.append((local, local.detach().to("cpu", copy=True)))
            local.copy_(local.to(dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for local, original in saved:
                local.copy_(original)
