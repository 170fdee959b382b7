"""Which rows of which HF tensor each of the model's parameters holds (DESIGN §5.6).

With ``ModelConfig.fuse_projections`` a block has one q/k/v projection and one gate/up projection, each one
GEMM that reads its input once:

    self_attn.qkv_proj.weight  [q_dim + 2 kv_dim, D]  = rows of q_proj | k_proj | v_proj   (biases likewise)
    mlp.gate_up_proj.weight    [2 F, D]               = rows of gate_proj | up_proj

Concatenating along dim 0 (the output features) is what makes the fused GEMM exact: every output column is the
same dot product over D as in the separate GEMM. FSDP2 shards dim 0 too, so a rank's rows of a fused parameter
are a few contiguous row ranges of the HF tensors, and loading reads exactly those (``HFReader.rows``), never a
whole tensor. Every HF file a run reads or writes keeps transformers' per-module names; only the parameters in
memory (and the resumable checkpoints written from them) use the fused names.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttrain.model.config import ModelConfig

_FUSED_NAME = re.compile(r"^(?P<layer>model\.layers\.\d+)\.(?P<module>self_attn\.qkv_proj|mlp\.gate_up_proj)"
                         r"\.(?P<kind>weight|bias)$")


def block_linears(cfg: ModelConfig) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """A block's linear layers as the model holds them -> (input features, the HF layers each computes as
    (HF module name, output rows), in row order). The one map of which HF layer is where: loading, saving and
    LoRA's adapters all read it."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    qkv = [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    gate_up = [("gate_proj", F), ("up_proj", F)]
    if cfg.fuse_projections:
        linears = {"self_attn.qkv_proj": (D, qkv), "mlp.gate_up_proj": (D, gate_up)}
    else:
        linears = {f"self_attn.{n}": (D, [(n, rows)]) for n, rows in qkv}
        linears |= {f"mlp.{n}": (D, [(n, rows)]) for n, rows in gate_up}
    return linears | {"self_attn.o_proj": (q, [("o_proj", D)]), "mlp.down_proj": (F, [("down_proj", D)])}


@dataclass(frozen=True)
class Piece:
    """Rows [start, end) of a model parameter are the whole HF tensor ``hf_name``."""
    hf_name: str
    start: int
    end: int


def hf_pieces(cfg: ModelConfig, name: str, rows: int) -> tuple[Piece, ...]:
    """The HF tensors that make up parameter ``name`` (``rows`` long in dim 0), in row order."""
    m = _FUSED_NAME.match(name)
    if m is None:
        return (Piece(name, 0, rows),)
    owner = m["module"].split(".")[0]
    pieces, start = [], 0
    for hf_module, n in block_linears(cfg)[m["module"]][1]:
        pieces.append(Piece(f"{m['layer']}.{owner}.{hf_module}.{m['kind']}", start, start + n))
        start += n
    if start != rows:
        raise ValueError(f"parameter {name!r} has {rows} rows; the config's projections add up to {start}")
    return tuple(pieces)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full state dict with transformers' names: fused tensors split into row views (no copy)."""
    out = {}
    for name, t in state.items():
        for piece in hf_pieces(cfg, name, t.shape[0] if t.dim() else 1):
            out[piece.hf_name] = t if piece.hf_name == name else t[piece.start:piece.end]
    return out


class HFReader:
    """Reads rows of the model's parameters out of an HF checkpoint's safetensors files, opening each file once.

    ``files``: HF tensor name -> file (hf_checkpoint.checkpoint_tensor_files); ``open_file``: opens one file
    (with errors that name it)."""

    def __init__(self, files: dict[str, Path], open_file) -> None:
        self.files = files
        self._open_file = open_file
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def slice(self, hf_name: str):
        """safetensors' lazy slice of one HF tensor (KeyError naming the file if the index lies)."""
        from safetensors import SafetensorError

        path = self.files[hf_name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._stack.enter_context(self._open_file(path))
        try:
            return handle.get_slice(hf_name)
        except SafetensorError as e:  # the index lists a tensor that its shard lacks
            raise KeyError(f"{path}: tensor {hf_name!r} not found in this file ({e})") from None

    def rows(self, pieces: tuple[Piece, ...], start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the parameter made of ``pieces`` (as stored: the file's dtype)."""
        parts = []
        for p in pieces:
            lo, hi = max(start, p.start), min(end, p.end)
            if hi > lo:
                parts.append(self.slice(p.hf_name)[lo - p.start:hi - p.start])
        return parts[0] if len(parts) == 1 else torch.cat(parts)
