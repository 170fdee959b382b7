"""Varlen causal attention over a prefix-shared packed batch, behind one function, three backends.

Shapes: q_TNH [T, n_heads, head_dim]; k_TMH / v_TMH [T, n_kv_heads, head_dim] in the query stream's
row order; K = gathered key rows (see packing.AttentionMeta). Output o_TNH [T, n_heads, head_dim].

Backends (DESIGN §3):
  "flash_attn"  flash-attn package's flash_attn_varlen_func(causal=True)
  "torch_varlen" torch.nn.attention.varlen.varlen_attn(window_size=(-1, 0)) — PyTorch's built-in
                 flash kernel, CUDA only; (-1, 0) is causal with bottom-right alignment.
  "reference"   pure PyTorch with an explicit bottom-right causal mask (CPU, tests).
  "auto"        flash_attn if importable and on CUDA, else torch_varlen on CUDA, else reference.
The choice is resolved once (resolve_backend) and logged by the caller; asking for a backend that
is missing raises instead of falling back silently.
"""
from __future__ import annotations

import importlib.util
import inspect
import math

import torch
import torch.nn.functional as F

from fasttrain.packing import AttentionMeta

BACKENDS = ("auto", "flash_attn", "torch_varlen", "reference")


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"model.attention_backend={requested!r}: expected one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    has_torch_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if requested == "auto":
        if on_cuda and has_flash_attn:
            return "flash_attn"
        if on_cuda and has_torch_varlen:
            return "torch_varlen"
        return "reference"
    if requested == "flash_attn" and not (on_cuda and has_flash_attn):
        raise RuntimeError(
            "attention backend 'flash_attn' was asked for but "
            + ("the flash-attn package is not installed (pip install 'fasttrain[flash]')" if not has_flash_attn
               else f"it needs a CUDA device, and this run is on {device}")
        )
    if requested == "torch_varlen" and not (on_cuda and has_torch_varlen):
        raise RuntimeError(
            "attention backend 'torch_varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.10); "
            f"this run is on {device} with torch {torch.__version__}"
        )
    return requested


def varlen_attention(
    q_TNH: torch.Tensor, k_TMH: torch.Tensor, v_TMH: torch.Tensor, attn: AttentionMeta, backend: str
) -> torch.Tensor:
    if attn.kv_is_identity:
        k_KMH, v_KMH = k_TMH, v_TMH
    else:
        # One gather per layer with an index built once per batch; its backward scatter-adds both
        # segments' gradients into the shared prompt rows.
        k_KMH = k_TMH.index_select(0, attn.kv_index_K)
        v_KMH = v_TMH.index_select(0, attn.kv_index_K)
    if backend == "reference":
        return reference_attention(q_TNH, k_KMH, v_KMH, attn)
    if backend == "torch_varlen":
        return _torch_varlen(q_TNH, k_KMH, v_KMH, attn)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q_TNH, k_KMH, v_KMH, attn.cu_seqlens_q, attn.cu_seqlens_k,
            attn.max_seqlen_q, attn.max_seqlen_k, causal=True,
        )
    raise ValueError(f"unresolved attention backend {backend!r}; call resolve_backend first")


_VARLEN_HAS_GQA = None


def _torch_varlen(q_TNH, k_KMH, v_KMH, attn: AttentionMeta) -> torch.Tensor:
    global _VARLEN_HAS_GQA
    from torch.nn.attention.varlen import varlen_attn

    if _VARLEN_HAS_GQA is None:
        _VARLEN_HAS_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)}
    if _VARLEN_HAS_GQA and q_TNH.shape[1] != k_KMH.shape[1]:
        kwargs["enable_gqa"] = True
    return varlen_attn(
        q_TNH, k_KMH, v_KMH, attn.cu_seqlens_q, attn.cu_seqlens_k, attn.max_seqlen_q, attn.max_seqlen_k, **kwargs
    )


def reference_attention(q_TNH, k_KMH, v_KMH, attn: AttentionMeta) -> torch.Tensor:
    """Dense masked attention in the inputs' dtype with fp32 softmax; the ground truth for tests."""
    n_heads, n_kv = q_TNH.shape[1], k_KMH.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    rep = n_heads // n_kv
    k_KNH = k_KMH.repeat_interleave(rep, dim=1)
    v_KNH = v_KMH.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q_TNH.shape[-1])
    acc = torch.promote_types(q_TNH.dtype, torch.float32)  # fp32 softmax for bf16/fp16, fp64 stays fp64
    scores_NTK = torch.einsum("tnh,knh->ntk", q_TNH.to(acc), k_KNH.to(acc)) * scale
    mask_TK = attn.dense_mask()
    scores_NTK = scores_NTK.masked_fill(~mask_TK, float("-inf"))
    probs_NTK = F.softmax(scores_NTK, dim=-1)
    o_TNH = torch.einsum("ntk,knh->tnh", probs_NTK, v_KNH.to(acc))
    return o_TNH.to(q_TNH.dtype)
