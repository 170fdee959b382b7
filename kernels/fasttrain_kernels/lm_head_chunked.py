"""LM-head log-probs on vocabulary chunks: cuBLAS GEMMs + two fused Triton epilogues (DESIGN §4).

    logp[n] = h[n] . W[t[n]] - logsumexp_v(h[n] . W[v])      h: [N, D], W: [V, D], t: [N]

Same math as ``lm_head_triton`` (one kernel per pass, tiles through ``tl.dot``) with another split of the
work: the three matmuls (8·N·V·D FLOPs with the backward's recompute) go to cuBLAS, which runs them near
the card's matmul rate, and Triton does the row-wise softmax work that would otherwise take several
memory-bound PyTorch passes. The vocabulary is streamed in chunks of C rows of W, so the largest temporary is
one ``[N, C]`` logits chunk (C picked so that it is at most ``CHUNK_BYTES``), never ``[N, V]``.

Shape legend: N = rows (LM-head rows that predict step tokens), D = hidden, V = vocabulary, C = chunk of V.

* forward, per chunk ``W_c = W[v0:v0+C]``:
    ``z_NC = h_ND @ W_c.T`` (cuBLAS, input dtype: eager PyTorch rounds its logits the same way), then
    ``_lse_chunk_kernel`` reads z once: running max / sum-exp per row, and the target logit when the target
    falls in this chunk. Saves ``lse_N`` (fp32) only.
* backward with upstream ``g`` = dL/dlogp and ``g_lse`` = dL/dlse, per chunk:
    ``z_NC = h_ND @ W_c.T`` (recompute), ``_dlogits_chunk_kernel`` overwrites z in place with
    ``dlogits = g * onehot(t) - (g - g_lse) * exp(z - lse)`` in the input dtype (as eager autograd's logits
    gradient is), then ``dW[v0:v0+C] = dlogits.T @ h`` straight into the output rows (one GEMM over all N:
    a single rounding, as eager) and ``dh_acc += dlogits @ W_c`` with an fp32 result, summed over chunks in an
    fp32 ``[N, D]`` buffer and rounded once at the end.
* Extra memory beyond inputs and outputs: one z chunk (<= CHUNK_BYTES), the fp32 dh accumulator (N·D·4)
  and its same-size per-chunk addend. At N = 8192, D = 4096: 256 MiB + 2 x 128 MiB, against eager's [N, V]
  logits (2.3 GiB in bf16, plus its fp32 softmax copies).

On CPU (tests) the epilogues run under the Triton interpreter (``TRITON_INTERPRET=1`` set before import) and
the fp32-result GEMM is an fp32 matmul of the upcast operands: the same products (exact in fp32) and fp32
accumulation as cuBLAS's ``out_dtype=float32`` path, which exists only on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fasttrain_kernels.interpreter import is_interpreted

# 256 MiB bounds the z chunk: large enough that every GEMM is big (at N = 8192 bf16, C = 16384 columns:
# an 8192 x 16384 x D GEMM), small enough to be noise next to eager's [N, V] (2.3 GiB bf16 at N = 8192).
CHUNK_BYTES = 256 * 2**20
# Columns are a multiple of 128 so every chunk's GEMM stays on cuBLAS's aligned tile sizes.
CHUNK_ALIGN = 128
# CPU / interpreter: tiny chunks so that small test shapes cross several chunks and epilogue tiles.
CPU_CHUNK_COLS = 48
GPU_EPILOGUE = dict(BLOCK_N=4, BLOCK_C=1024, num_warps=4)
CPU_EPILOGUE = dict(BLOCK_N=16, BLOCK_C=32, num_warps=1)


@triton.jit
def _lse_chunk_kernel(z_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N, C, v0, stride_z,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Updates the running (max m, sum-exp s, target logit) of BLOCK_N rows with one chunk z [N, C]."""
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    col_t = tl.load(t_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - v0  # target column in this chunk
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z = tl.load(z_ptr + offs_n[:, None] * stride_z + offs_c[None, :],
                    mask=mask_n[:, None] & mask_c[None, :], other=float("-inf")).to(tl.float32)
        # a target in a later chunk can alias a padded column past C: mask it (z = -inf there)
        hit = (offs_c[None, :] == col_t[:, None]) & mask_c[None, :]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # masked rows stay finite: all their z are -inf, so keep m and add nothing
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_new = tl.where(mask_n, m_new, 0.0)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + offs_n, m, mask=mask_n)
    tl.store(s_ptr + offs_n, s, mask=mask_n)
    tl.store(tgt_ptr + offs_n, tgt, mask=mask_n)


@triton.jit
def _dlogits_chunk_kernel(z_ptr, t_ptr, g_ptr, gp_ptr, lse_ptr, N, C, v0, stride_z,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place: z [N, C] (logits chunk) <- g * onehot(t) - gp * exp(z - lse), in z's dtype."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_c < C)[None, :]
    col_t = tl.load(t_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - v0
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    gp = tl.load(gp_ptr + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    ptrs = z_ptr + offs_n[:, None] * stride_z + offs_c[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    dl = tl.where(offs_c[None, :] == col_t[:, None], g[:, None], 0.0) - gp[:, None] * tl.exp(z - lse[:, None])
    tl.store(ptrs, dl.to(z_ptr.dtype.element_ty), mask=mask)


INTERPRETED = is_interpreted(_lse_chunk_kernel)


def chunk_cols(N: int, V: int, element_size: int, device: torch.device, chunk_cols_override: int | None = None) -> int:
    """Vocabulary rows per chunk: the z chunk [N, C] stays within CHUNK_BYTES (CPU: small, see above)."""
    if chunk_cols_override is not None:
        if chunk_cols_override < 1:
            raise ValueError(f"chunk_cols={chunk_cols_override}: must be >= 1")
        return min(chunk_cols_override, V)
    if device.type == "cpu":
        return min(CPU_CHUNK_COLS, V)
    cols = CHUNK_BYTES // (max(N, 1) * element_size)
    cols = max(CHUNK_ALIGN, cols // CHUNK_ALIGN * CHUNK_ALIGN)
    return min(cols, V)


def _epilogue(device: torch.device) -> dict:
    cfg = dict(CPU_EPILOGUE if device.type == "cpu" else GPU_EPILOGUE)
    if INTERPRETED:
        cfg.pop("num_warps")
    return cfg


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (no rounding to the 16-bit input dtype)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: 16-bit inputs, fp32 output
    return a.float() @ b.float()  # CPU has no out_dtype mm: the same exact products and fp32 sums


def lm_head_fwd(h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor, chunk_cols_override: int | None = None):
    """(logp_N fp32, lse_N fp32). Inputs are assumed checked (contiguous, same device, matching dtypes)."""
    N, V = h_ND.shape[0], w_VD.shape[0]
    dev = h_ND.device
    m = torch.full((N,), float("-inf"), device=dev, dtype=torch.float32)
    s = torch.zeros(N, device=dev, dtype=torch.float32)
    tgt = torch.zeros(N, device=dev, dtype=torch.float32)
    if N == 0:
        return tgt, s
    C = chunk_cols(N, V, h_ND.element_size(), dev, chunk_cols_override)
    ep = _epilogue(dev)
    grid = (triton.cdiv(N, ep["BLOCK_N"]),)
    for v0 in range(0, V, C):
        z_NC = h_ND @ w_VD[v0:v0 + C].t()
        _lse_chunk_kernel[grid](z_NC, t_N, m, s, tgt, N, z_NC.shape[1], v0, z_NC.stride(0), **ep)
    lse = m + torch.log(s)
    return tgt - lse, lse


def lm_head_bwd(g_N: torch.Tensor, glse_N: torch.Tensor, h_ND: torch.Tensor, w_VD: torch.Tensor,
                t_N: torch.Tensor, lse_N: torch.Tensor, chunk_cols_override: int | None = None):
    """(dh_ND, dW_VD) in the input dtype. g_N, glse_N, lse_N: fp32 contiguous [N]."""
    N, D = h_ND.shape
    V = w_VD.shape[0]
    dw = torch.empty_like(w_VD)
    if N == 0:
        return torch.zeros_like(h_ND), dw.zero_()
    dev = h_ND.device
    dh_acc = torch.zeros(N, D, device=dev, dtype=torch.float32)
    gp_N = g_N - glse_N
    C = chunk_cols(N, V, h_ND.element_size(), dev, chunk_cols_override)
    ep = _epilogue(dev)
    for v0 in range(0, V, C):
        w_CD = w_VD[v0:v0 + C]
        dl_NC = h_ND @ w_CD.t()  # recomputed logits; overwritten in place by their gradient
        grid = (triton.cdiv(N, ep["BLOCK_N"]), triton.cdiv(dl_NC.shape[1], ep["BLOCK_C"]))
        _dlogits_chunk_kernel[grid](dl_NC, t_N, g_N, gp_N, lse_N, N, dl_NC.shape[1], v0, dl_NC.stride(0), **ep)
        torch.mm(dl_NC.t(), h_ND, out=dw[v0:v0 + C])
        dh_acc += _mm_f32(dl_NC, w_CD)
    return dh_acc.to(h_ND.dtype), dw
