"""Triton kernels for the fused LM-head log-probs (DESIGN §4).

    logp[n] = h[n] . W[t[n]] - logsumexp_v(h[n] . W[v])      h: [N, D], W: [V, D], t: [N]

No [N, V] tensor is ever allocated: logits are computed tile by tile ([BLOCK_N, BLOCK_V], fp32 accumulators
from ``tl.dot`` over BLOCK_D slices of D) and reduced on the fly.

* forward (grid: row blocks): loop over vocab tiles with an online max / sum-exp per row and pick the target
  logit; writes ``logp`` [N] fp32 and ``lse`` [N] fp32 (saved for backward).
* backward, with upstream ``g`` = dL/dlogp and ``g_lse`` = dL/dlse (zeros in the usual case):
  ``dlogits = g * onehot(t) - (g - g_lse) * exp(logit - lse)`` recomputed tile by tile, then
  - ``dh = dlogits @ W``  (grid: row blocks, loop over vocab tiles),
  - ``dW = dlogits.T @ h`` (grid: vocab tiles, loop over row blocks) -- each program owns its output rows, so no
    atomics. The output rows (all of D) are too large to keep in registers, so they are accumulated in an fp32
    global buffer that the owning program reads, adds to and writes back per D slice (``tl.debug_barrier``
    orders the write before the next tile's read across the program's threads); the caller casts the buffer to
    the input dtype.
* The dlogits tile is cast to the input dtype before the ``tl.dot`` (as the plain PyTorch reference's
  autograd does: its logits grad is in the compute dtype); all accumulation is fp32. fp32 inputs use IEEE dots
  (no TF32), so the fp32 path matches PyTorch's default fp32 matmul precision.

Known limit (static, not yet measured): the forward and dh grids have one program per BLOCK_N = 64 rows. With
the trainer's default 8192 tokens per micro-batch and DESIGN §7's lengths (prompt ~304 + two steps ~72 tokens
each), a micro-batch holds ~18 pairs, so N ~ 2.6k rows: ~41 programs for the H100's 132 SMs, one program per
SM at 172-221 registers x 256 threads (benchmarks/kernel_resources.py). Most of the card would idle in those
two kernels; splitting the vocabulary across programs (partial max / sum-exp per split, combined after, as
flash-decoding splits keys) would fill it. This is one reason the trainer's CUDA default is the chunked head,
whose GEMMs cuBLAS parallelises over N x V.

On CPU these kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before this
module is imported (``triton.jit`` picks the interpreter when it decorates). ``INTERPRETED`` records which.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fasttrain_kernels.interpreter import is_interpreted

# Default tiles: GPU sizes are a plain, reasonable starting point (not tuned for speed: that needs a GPU
# session). Compiled for sm_90 by benchmarks/kernel_resources.py, 16-bit inputs use 100-222 registers and no
# local memory with them; fp32 inputs (IEEE dots, no tensor-core MMA) spilled 104 B (dh) and 464 B (dW) per
# thread with the same tiles, so fp32 gets 32 x 64 x 32 tiles with 8 warps: no larger tile of the 36 settings
# swept (`kernel_resources.py --sweep --dtype fp32` and variations) spills nothing (78-110 registers).
# CPU (interpreter) sizes are small so that tests with tiny odd shapes still cross several tiles.
GPU_BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2)
GPU_BLOCKS_FP32 = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2)
CPU_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1)


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] = h[offs_n] @ W[offs_v].T (masked rows/cols are 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_h + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, logp_ptr, lse_ptr, N, V, D, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    t = tl.load(t_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        logits = _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        tgt += tl.sum(tl.where(offs_v[None, :] == t[:, None], logits, 0.0), axis=1)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        # every tile holds at least one valid column, so m_new is finite and exp(m - m_new) is well defined
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(logp_ptr + offs_n, tgt - lse, mask=mask_n)


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, t, g, gp, lse, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] dlogits = g * onehot(t) - gp * softmax, gp = g - g_lse (0 off the masks)."""
    logits = _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    p = tl.exp(logits - lse[:, None])
    dl = tl.where(offs_v[None, :] == t[:, None], g[:, None], 0.0) - gp[:, None] * p
    return tl.where(mask_n[:, None] & mask_v[None, :], dl, 0.0)


@triton.jit
def _load_row_terms(t_ptr, g_ptr, glse_ptr, lse_ptr, offs_n, mask_n):
    """Per row: target, g = dL/dlogp, gp = g - dL/dlse (the softmax term's weight) and the saved lse."""
    t = tl.load(t_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    gp = g - tl.load(glse_ptr + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    return t, g, gp, lse


@triton.jit
def _accumulate_dot(a, b_ptr, b_rows, b_mask, stride_b, out_ptr, out_rows, out_mask, D,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[out_rows, :] += a @ b[b_rows, :] over all D in BLOCK_D slices; ``out`` is an fp32 [*, D] contiguous
    buffer that this program alone writes (read-modify-write, no atomics). ``a``: [len(out_rows), len(b_rows)]."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_d[None, :],
                    mask=b_mask[:, None] & mask_d[None, :], other=0.0)
        ptrs = out_ptr + out_rows[:, None] * D + offs_d[None, :]
        mask = out_mask[:, None] & mask_d[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, tl.dot(a, b, acc, input_precision=DOT_PRECISION), mask=mask)
    tl.debug_barrier()  # this tile's writes are visible to the next tile's reads (other threads)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, t_ptr, g_ptr, glse_ptr, lse_ptr, dh_ptr, N, V, D, stride_h, stride_w,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dh (fp32 buffer, zero-initialised, [N, D] contiguous) += dlogits @ W, one program per row block."""
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    t, g, gp, lse = _load_row_terms(t_ptr, g_ptr, glse_ptr, lse_ptr, offs_n, mask_n)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        dl = _dlogits_tile(h_ptr, w_ptr, t, g, gp, lse, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        _accumulate_dot(dl.to(w_ptr.dtype.element_ty), w_ptr, offs_v, mask_v, stride_w,
                        dh_ptr, offs_n, mask_n, D, BLOCK_D, DOT_PRECISION)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, t_ptr, g_ptr, glse_ptr, lse_ptr, dw_ptr, N, V, D, stride_h, stride_w,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dW (fp32 buffer, zero-initialised, [V, D] contiguous) += dlogits.T @ h, one program per vocab tile."""
    pid = tl.program_id(0)
    offs_v = (pid * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        t, g, gp, lse = _load_row_terms(t_ptr, g_ptr, glse_ptr, lse_ptr, offs_n, mask_n)
        dl = _dlogits_tile(h_ptr, w_ptr, t, g, gp, lse, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        _accumulate_dot(tl.trans(dl.to(h_ptr.dtype.element_ty)), h_ptr, offs_n, mask_n, stride_h,
                        dw_ptr, offs_v, mask_v, D, BLOCK_D, DOT_PRECISION)


INTERPRETED = is_interpreted(_fwd_kernel)


def default_blocks(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cpu":
        return dict(CPU_BLOCKS)
    return dict(GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS)


def _blocks(device: torch.device, dtype: torch.dtype, blocks: dict | None) -> dict:
    out = default_blocks(device, dtype)
    if blocks:
        unknown = set(blocks) - set(out)
        if unknown:
            raise ValueError(f"unknown block settings {sorted(unknown)}; expected some of {sorted(out)}")
        out.update(blocks)
    for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
        b = out[k]
        if b < 16 or b & (b - 1):
            raise ValueError(f"{k}={b}: must be a power of two >= 16 (tl.dot)")
    return out


def _launch_opts(cfg: dict, dtype: torch.dtype) -> dict:
    opts = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if not INTERPRETED:
        opts.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return opts


def lm_head_fwd(h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor, blocks: dict | None = None):
    """(logp_N fp32, lse_N fp32). Inputs are assumed checked (contiguous, same device, matching dtypes)."""
    N, D = h_ND.shape
    V = w_VD.shape[0]
    logp = torch.empty(N, device=h_ND.device, dtype=torch.float32)
    lse = torch.empty(N, device=h_ND.device, dtype=torch.float32)
    if N == 0:
        return logp, lse
    cfg = _blocks(h_ND.device, h_ND.dtype, blocks)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _fwd_kernel[grid](h_ND, w_VD, t_N, logp, lse, N, V, D, h_ND.stride(0), w_VD.stride(0),
                      **_launch_opts(cfg, h_ND.dtype))
    return logp, lse


def lm_head_bwd(g_N: torch.Tensor, glse_N: torch.Tensor, h_ND: torch.Tensor, w_VD: torch.Tensor,
                t_N: torch.Tensor, lse_N: torch.Tensor, blocks: dict | None = None):
    """(dh_ND, dW_VD) in the input dtype. g_N, glse_N, lse_N: fp32 contiguous [N]."""
    N, D = h_ND.shape
    V = w_VD.shape[0]
    dh = torch.zeros(N, D, device=h_ND.device, dtype=torch.float32)
    dw = torch.zeros(V, D, device=h_ND.device, dtype=torch.float32)
    if N > 0:
        cfg = _blocks(h_ND.device, h_ND.dtype, blocks)
        opts = _launch_opts(cfg, h_ND.dtype)
        args = (h_ND, w_VD, t_N, g_N, glse_N, lse_N)
        _bwd_dh_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](*args, dh, N, V, D, h_ND.stride(0), w_VD.stride(0),
                                                          **opts)
        _bwd_dw_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](*args, dw, N, V, D, h_ND.stride(0), w_VD.stride(0),
                                                          **opts)
    return dh.to(h_ND.dtype), dw.to(w_VD.dtype)
