"""Varlen causal attention over a prefix-shared packed batch, behind one function, three backends.

Shapes: q_TNH [T, n_heads, head_dim]; k_TMH / v_TMH [T, n_kv_heads, head_dim] in the query stream's
row order; K = gathered key rows (see packing.AttentionMeta). Output o_TNH [T, n_heads, head_dim].

Backends (DESIGN §3):
  "flash_attn"  flash-attn package's flash_attn_varlen_func(causal=True)
  "torch_varlen" torch.nn.attention.varlen.varlen_attn(window_size=(-1, 0)) — PyTorch's built-in
                 flash kernel, CUDA only; (-1, 0) is causal with bottom-right alignment.
  "reference"   pure PyTorch with an explicit bottom-right causal mask (CPU, tests).
  "auto"        on CUDA in fp16/bf16: flash_attn if it imports, else torch_varlen; otherwise reference
                (the flash kernels take no fp32).
The choice is resolved once (resolve_backend) and logged by the caller; asking for a backend that
is missing raises instead of falling back silently.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from fasttrain.packing import AttentionMeta

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch_varlen", "reference")
# Both flash kernels (the flash-attn package's and PyTorch's, which has no other varlen kernel in 2.11)
# refuse anything else: "FlashAttention only support fp16 and bf16 data type".
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _flash_attn_import_error(installed: bool) -> str | None:
    """None when flash-attn imports; otherwise why not. Imported, not just found: a wheel built for another
    torch or CUDA is found by importlib but fails to load its extension."""
    if not installed:
        return "the flash-attn package is not installed (pip install 'fasttrain[flash]')"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401 - imported only to see that it loads
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (undefined symbol), ...
        return f"the flash-attn package is installed but does not import: {type(e).__name__}: {e}"
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend for a run on ``device`` computing in ``dtype`` (model.compute_dtype).

    auto: flash_attn where it imports, else torch_varlen, on CUDA in fp16/bf16; the reference everywhere
    else, including CUDA in fp32 (both flash kernels are 16-bit only)."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attention_backend={requested!r}: expected one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    has_torch_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if not (on_cuda and dtype in FLASH_DTYPES):
            return "reference"
        reason = _flash_attn_import_error(has_flash_attn)
        if reason is None:
            return "flash_attn"
        if has_flash_attn:  # installed but broken: say why it is not used
            log.warning("attention backend auto: not flash_attn, because %s", reason)
        return "torch_varlen" if has_torch_varlen else "reference"
    if requested == "reference":
        return requested
    if not on_cuda:
        raise RuntimeError(f"attention backend {requested!r} needs a CUDA device, and this run is on {device}")
    if dtype not in FLASH_DTYPES:
        raise RuntimeError(f"attention backend {requested!r} runs flash attention, which takes only float16 or "
                           f"bfloat16; this run computes in {dtype} (set model.compute_dtype=bfloat16, or "
                           "model.attention_backend=reference)")
    if requested == "flash_attn":
        reason = _flash_attn_import_error(has_flash_attn)
        if reason:
            raise RuntimeError(f"attention backend 'flash_attn' was asked for but {reason}")
    if requested == "torch_varlen" and not has_torch_varlen:
        raise RuntimeError("attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch >= 2.10); "
                           f"this is torch {torch.__version__}")
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
    """Segment by segment, each with an explicit bottom-right causal mask; fp32 (or fp64) softmax.

    Looping over segments keeps the work proportional to the real (segment-local) scores: one dense
    [T, K] masked matmul spent ~85% of a CPU step on scores that are masked anyway (7 groups per batch).
    """
    n_heads, n_kv = q_TNH.shape[1], k_KMH.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    rep = n_heads // n_kv
    acc = torch.promote_types(q_TNH.dtype, torch.float32)  # fp32 softmax for bf16/fp16, fp64 stays fp64
    cu_q, cu_k = attn.host_cu_seqlens()
    outs = []
    for s in range(len(cu_q) - 1):
        q_NQH = q_TNH[cu_q[s] : cu_q[s + 1]].transpose(0, 1).to(acc)
        k_NKH = k_KMH[cu_k[s] : cu_k[s + 1]].repeat_interleave(rep, dim=1).transpose(0, 1).to(acc)
        v_NKH = v_KMH[cu_k[s] : cu_k[s + 1]].repeat_interleave(rep, dim=1).transpose(0, 1).to(acc)
        len_q, len_k = q_NQH.shape[1], k_NKH.shape[1]
        # Bottom-right alignment: query i sees keys j <= i + (len_k - len_q).
        mask_QK = torch.ones(len_q, len_k, dtype=torch.bool, device=q_TNH.device).tril(len_k - len_q)
        o_NQH = F.scaled_dot_product_attention(q_NQH, k_NKH, v_NKH, attn_mask=mask_QK)
        outs.append(o_NQH.transpose(0, 1))
    return torch.cat(outs, dim=0).to(q_TNH.dtype)
