"""LoRA adapters on the decoder's linear layers, named so that PEFT maps them onto the base model (DESIGN §5.7).

For a targeted HF linear layer with weight W [O, I] (q_proj, ..., down_proj), LoRA adds

    y = x W^T + scale * (dropout(x) A^T) B^T,      A [r, I], B [O, r], scale = lora_alpha / r

with A drawn like nn.Linear's weight (uniform, bound 1/sqrt(I): PEFT's kaiming_uniform(a=sqrt(5))) and B = 0, so
the adapted model starts as the base model exactly. Our fused projections (hf_layout.py) compute several HF
layers in one GEMM; their adapters stay one (A, B) per HF layer, so the saved adapter has PEFT's per-module
names. Without dropout the pieces' A's run as one GEMM (they read the same x); with dropout each piece draws its
own mask, as PEFT's separate modules do.

Parameter names: ``model.layers.{i}.self_attn.lora.{our linear}.pairs.{hf module}.A`` (and ``.B``); PEFT's:
``base_model.model.model.layers.{i}.self_attn.{hf module}.lora_A.weight`` (``peft_name``).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# HF linear layers of a block, in the order PEFT lists them; the config's "all" means every one.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_OURS = re.compile(r"^(?P<block>model\.layers\.\d+\.(?:self_attn|mlp))\.lora\.\w+\.pairs\.(?P<hf>\w+)\.(?P<ab>[AB])$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``model.lora_targets``: "all" or a comma list of LORA_TARGETS (ValueError naming the bad one)."""
    if text.strip() == "all":
        return LORA_TARGETS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"{unknown[0] if unknown else text!r} matches no linear layer of the decoder blocks; "
                         f"expected 'all' or a comma list of {LORA_TARGETS}")
    return tuple(n for n in LORA_TARGETS if n in names)


class LoraPair(nn.Module):
    """One HF linear layer's adapter."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))


class LoraAdapters(nn.Module):
    """The adapters of one of our linear layers: ``pieces`` = its HF layers in row order, (name, rows); those
    not targeted contribute zeros."""

    def __init__(self, in_features: int, pieces: list[tuple[str, int]], spec: LoraSpec) -> None:
        super().__init__()
        self.pieces = pieces
        self.pairs = nn.ModuleDict({name: LoraPair(in_features, rows, spec.rank)
                                    for name, rows in pieces if name in spec.targets})
        self.rank, self.scale, self.dropout = spec.rank, spec.scale, spec.dropout
        self.enabled = True

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        """delta_TO to add to the base layer's output."""
        names, pairs = list(self.pairs.keys()), list(self.pairs.values())
        if self.dropout and self.training:  # a mask per HF layer, as PEFT draws them
            u = [F.dropout(x_TI, self.dropout, True) @ p.A.T for p in pairs]
        else:  # one GEMM for every piece's A: they read the same x
            u = (x_TI @ torch.cat([p.A for p in pairs]).T).split(self.rank, dim=-1)
        deltas = {name: u_Tr @ p.B.T for name, u_Tr, p in zip(names, u, pairs)}
        parts = [deltas[name] if name in deltas else x_TI.new_zeros(x_TI.shape[0], rows)
                 for name, rows in self.pieces]
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return delta * self.scale


def adapted(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``module.<name>(x)`` plus its adapters' delta when it has enabled ones."""
    y = getattr(module, name)(x)
    if module.lora is not None and name in module.lora and module.lora[name].enabled:
        y = y + module.lora[name](x)
    return y


def _targeted_linears(model: nn.Module, spec: LoraSpec):
    """(owner module name, our linear name, in features, its HF pieces) for every linear of a block that has a
    targeted HF layer (hf_layout.block_linears)."""
    from fasttrain.model.hf_layout import block_linears

    for path, (in_features, pieces) in block_linears(model.config).items():
        if any(name in spec.targets for name, _ in pieces):
            owner, linear = path.split(".")
            yield owner, linear, in_features, pieces


def add_adapters(model: nn.Module, spec: LoraSpec) -> None:
    """Attach adapters to every block of ``model`` (a CausalLM; on any device, meta included) and freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    targeted = list(_targeted_linears(model, spec))
    for layer in model.model.layers:
        for owner_name in dict.fromkeys(owner for owner, *_ in targeted):
            owner = getattr(layer, owner_name)
            adapters = nn.ModuleDict({linear: LoraAdapters(in_features, pieces, spec)
                                      for o, linear, in_features, pieces in targeted if o == owner_name})
            owner.lora = adapters.to(device=next(owner.parameters()).device, dtype=torch.float32)


def check_rank(model: nn.Module, spec: LoraSpec) -> None:
    """A rank above a targeted layer's width adds nothing a full-rank update would not: refused."""
    for _, _, in_features, pieces in _targeted_linears(model, spec):
        for name, rows in pieces:
            if name in spec.targets and spec.rank > min(in_features, rows):
                raise ValueError(f"model.lora_rank={spec.rank} is larger than {name}'s width {min(in_features, rows)} "
                                 f"({in_features} in, {rows} out)")


def adapter_params_per_block(model_cfg, spec: LoraSpec) -> int:
    """rank x (in + out) summed over a block's targeted HF layers (the memory plan's count)."""
    from fasttrain.model.hf_layout import block_linears

    return sum(spec.rank * (in_features + rows) for in_features, pieces in block_linears(model_cfg).values()
               for name, rows in pieces if name in spec.targets)


def is_adapter(name: str) -> bool:
    return _OURS.match(name) is not None


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if _OURS.match(n)}


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A uniform in +-1/sqrt(in_features), B = 0; each full A drawn on the CPU from one generator in parameter order
    and its local rows copied in, so the result is the same for any FSDP world size."""
    from fasttrain.model.shards import local_shard

    generator = torch.Generator().manual_seed(seed)
    for name, param in adapter_parameters(model).items():
        local, start, end = local_shard(param, name)
        if name.endswith(".B"):
            local.zero_()
            continue
        bound = 1.0 / math.sqrt(param.shape[1])
        full = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        local.copy_(full[start:end])


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter off (a live reference with LoRA is the policy under this)."""
    modules = [m for m in model.modules() if isinstance(m, LoraAdapters)]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def peft_name(name: str) -> str:
    m = _OURS.match(name)
    if m is None:
        raise KeyError(f"{name!r} is not an adapter parameter")
    return f"base_model.model.{m['block']}.{m['hf']}.lora_{m['ab']}.weight"


def peft_config(spec: LoraSpec, base_model: str) -> dict:
    """adapter_config.json as peft.LoraConfig reads it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": list(spec.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None}


def adapter_deltas(state: dict[str, torch.Tensor], spec: LoraSpec):
    """(HF weight name, scale * B A in fp32) for every adapter in a full state dict (ours)."""
    for name, a in state.items():
        m = _OURS.match(name)
        if m is not None and m["ab"] == "A":
            yield f"{m['block']}.{m['hf']}.weight", spec.scale * (state[name[:-1] + "B"].float() @ a.float())


def merged_state_dict(state: dict[str, torch.Tensor], cfg, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A full state dict (ours, base + adapters) as HF tensors with every adapter merged in fp32:
    W + scale * B A."""
    from fasttrain.model.hf_layout import to_hf_state_dict

    base = to_hf_state_dict({n: t for n, t in state.items() if not _OURS.match(n)}, cfg)
    out = {n: t.float() for n, t in base.items()}
    for hf_name, delta in adapter_deltas(state, spec):
        out[hf_name] = out[hf_name] + delta
    return out


@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir) -> None:
    """Copy a PEFT LoRA adapter directory (``adapter_model.safetensors``) into ``model``'s adapters, each rank its
    own rows; errors name the file and the tensor."""
    from pathlib import Path

    from safetensors import safe_open

    from fasttrain.model.shards import local_shard

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a PEFT adapter directory holds adapter_model.safetensors")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = set(f.keys())
        for name, param in adapter_parameters(model).items():
            key = peft_name(name)
            if key not in stored:
                raise KeyError(f"{path}: missing tensor {key!r} that the model's adapters need")
            sl = f.get_slice(key)
            if tuple(sl.get_shape()) != tuple(param.shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(sl.get_shape())}, the adapter expects "
                                 f"{tuple(param.shape)}")
            local, start, end = local_shard(param, name)
            if end > start:
                local.copy_(sl[start:end])
