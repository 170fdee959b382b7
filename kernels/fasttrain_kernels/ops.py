"""PyTorch ops around the Triton LM-head kernels (DESIGN §4).

Two implementations of one contract, each a pair of ``torch.library.custom_op``s (opaque to torch.compile,
with fake impls and autograd):

* ``torch.ops.fasttrain.lm_head_logprobs(h_ND, w_VD, targets_N) -> (logp_N, lse_N)`` (+ ``..._backward``):
  fully fused Triton kernels (``lm_head_triton``);
* ``torch.ops.fasttrain.lm_head_logprobs_chunked`` (+ ``..._backward``): cuBLAS GEMMs on vocabulary chunks
  with fused Triton epilogues (``lm_head_chunked``).

``lm_head_logprobs_triton`` / ``lm_head_logprobs_chunked`` are the friendly entry points returning ``logp_N``
(fp32), drop-ins for ``fasttrain_kernels.lm_head_torch.lm_head_logprobs_torch``.

Triton is imported lazily (first call), so importing this module never decorates the kernels: on CPU they run
only under the Triton interpreter, and ``TRITON_INTERPRET=1`` must be set before the kernels module is first
imported. Under FSDP2 the op runs inside the module's forward, where W is the plain gathered tensor.
"""
from __future__ import annotations

import os

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _kernels(module: str):
    import importlib

    return importlib.import_module(f"fasttrain_kernels.{module}")


def _check(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> None:
    if h_ND.dim() != 2 or w_VD.dim() != 2 or targets_N.dim() != 1:
        raise ValueError(f"lm_head_logprobs: expected h [N, D], w [V, D], targets [N]; got shapes "
                         f"{tuple(h_ND.shape)}, {tuple(w_VD.shape)}, {tuple(targets_N.shape)}")
    if h_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"lm_head_logprobs: hidden size mismatch, h {tuple(h_ND.shape)} vs w {tuple(w_VD.shape)}")
    if targets_N.shape[0] != h_ND.shape[0]:
        raise ValueError(f"lm_head_logprobs: {targets_N.shape[0]} targets for {h_ND.shape[0]} rows")
    if w_VD.shape[0] == 0:
        raise ValueError("lm_head_logprobs: empty vocabulary")
    if h_ND.dtype != w_VD.dtype or h_ND.dtype not in _DTYPES:
        raise TypeError(f"lm_head_logprobs: h and w must share one dtype of {_DTYPES}; got {h_ND.dtype}, {w_VD.dtype}")
    if targets_N.dtype not in _INDEX_DTYPES:
        raise TypeError(f"lm_head_logprobs: targets must be int64 or int32, got {targets_N.dtype}")
    if not (h_ND.device == w_VD.device == targets_N.device):
        raise ValueError(f"lm_head_logprobs: tensors on different devices: {h_ND.device}, {w_VD.device}, "
                         f"{targets_N.device}")
    for name, x in (("h", h_ND), ("w", w_VD), ("targets", targets_N)):
        if not x.is_contiguous():
            raise ValueError(f"lm_head_logprobs: {name} must be contiguous (call .contiguous() first)")


def _check_runtime(x: torch.Tensor, targets_N: torch.Tensor, V: int, module: str):
    """Imports the kernels and refuses to run them where they cannot (CPU without the interpreter)."""
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton LM head runs on CPU only under the Triton interpreter: set "
                               f"TRITON_INTERPRET=1 before fasttrain_kernels.{module} is imported "
                               "(or use lm_head_impl='torch')")
        K = _kernels(module)
        if not K.INTERPRETED:
            raise RuntimeError(f"fasttrain_kernels.{module} was imported without TRITON_INTERPRET=1, so its "
                               "kernels cannot run on CPU; set it before the first import")
        # cheap here (the interpreter is slow anyway); on GPU this would cost a host sync, so it is skipped
        if targets_N.numel() and (int(targets_N.min()) < 0 or int(targets_N.max()) >= V):
            raise IndexError(f"lm_head_logprobs: targets out of range [0, {V})")
        return K
    if x.device.type != "cuda":
        raise RuntimeError(f"the Triton LM head needs CUDA tensors (or CPU + TRITON_INTERPRET=1), got {x.device}")
    return _kernels(module)


def _register(name: str, module: str):
    """Registers ``fasttrain::<name>`` (forward: logp_N, lse_N) and ``fasttrain::<name>_backward`` for the
    launchers ``lm_head_fwd`` / ``lm_head_bwd`` of ``fasttrain_kernels.<module>``, with fake impls and autograd."""

    def fwd_impl(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(h_ND, w_VD, targets_N)
        K = _check_runtime(h_ND, targets_N, w_VD.shape[0], module)
        return K.lm_head_fwd(h_ND, w_VD, targets_N)

    def bwd_impl(g_N: torch.Tensor, glse_N: torch.Tensor, h_ND: torch.Tensor, w_VD: torch.Tensor,
                 targets_N: torch.Tensor, lse_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = _check_runtime(h_ND, targets_N[:0], w_VD.shape[0], module)
        def f32(x):
            return x.to(torch.float32).contiguous()

        return K.lm_head_bwd(f32(g_N), f32(glse_N), h_ND, w_VD, targets_N, f32(lse_N))

    fwd_op = torch.library.custom_op(f"fasttrain::{name}", fwd_impl, mutates_args=())
    bwd_op = torch.library.custom_op(f"fasttrain::{name}_backward", bwd_impl, mutates_args=())

    @fwd_op.register_fake
    def _(h_ND, w_VD, targets_N):
        _check(h_ND, w_VD, targets_N)
        N = h_ND.shape[0]
        return h_ND.new_empty(N, dtype=torch.float32), h_ND.new_empty(N, dtype=torch.float32)

    @bwd_op.register_fake
    def _(g_N, glse_N, h_ND, w_VD, targets_N, lse_N):
        return torch.empty_like(h_ND), torch.empty_like(w_VD)

    def setup_context(ctx, inputs, output):
        h_ND, w_VD, targets_N = inputs
        ctx.save_for_backward(h_ND, w_VD, targets_N, output[1])

    def backward(ctx, grad_logp, grad_lse):
        h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse_N)
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse_N)
        dh, dw = bwd_op(grad_logp, grad_lse, h_ND, w_VD, targets_N, lse_N)
        return dh, dw, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


# "triton": one fused Triton kernel per pass (tl.dot tiles, online softmax); "chunked": cuBLAS GEMMs on
# vocabulary chunks with fused Triton softmax / gradient epilogues. Same contract, same tests.
lm_head_logprobs_op, lm_head_logprobs_backward_op = _register("lm_head_logprobs", "lm_head_triton")
lm_head_logprobs_chunked_op, lm_head_logprobs_chunked_backward_op = _register("lm_head_logprobs_chunked",
                                                                              "lm_head_chunked")


def lm_head_logprobs_triton(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """logp_N (fp32) = log_softmax(h_ND @ w_VD.T)[n, targets_N[n]] without materialising [N, V].

    Same contract as ``fasttrain_kernels.lm_head_torch.lm_head_logprobs_torch``. Differentiable in h and w."""
    _check(h_ND, w_VD, targets_N)
    return lm_head_logprobs_op(h_ND, w_VD, targets_N)[0]


def lm_head_logprobs_chunked(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """As ``lm_head_logprobs_triton``, computed by cuBLAS GEMMs on vocabulary chunks + Triton epilogues."""
    _check(h_ND, w_VD, targets_N)
    return lm_head_logprobs_chunked_op(h_ND, w_VD, targets_N)[0]
