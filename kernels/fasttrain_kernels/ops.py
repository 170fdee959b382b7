"""PyTorch ops around the Triton LM-head kernels (DESIGN §4).

``torch.ops.fasttrain.lm_head_logprobs(h_ND, w_VD, targets_N) -> (logp_N, lse_N)`` is a
``torch.library.custom_op`` (opaque to torch.compile, with a fake impl and autograd), backed by
``torch.ops.fasttrain.lm_head_logprobs_backward``. ``lm_head_logprobs_triton`` is the friendly entry point
returning ``logp_N`` (fp32), a drop-in for ``fasttrain_kernels.reference.lm_head_logprobs``.

Triton is imported lazily (first call), so importing this module never decorates the kernels: on CPU they run
only under the Triton interpreter, and ``TRITON_INTERPRET=1`` must be set before the kernels module is first
imported. Under FSDP2 the op runs inside the module's forward, where W is the plain gathered tensor.
"""
from __future__ import annotations

import os

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _kernels():
    from fasttrain_kernels import lm_head_triton

    return lm_head_triton


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


def _check_runtime(x: torch.Tensor, targets_N: torch.Tensor, V: int):
    """Imports the kernels and refuses to run them where they cannot (CPU without the interpreter)."""
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton LM head runs on CPU only under the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before fasttrain_kernels.lm_head_triton is imported "
                               "(or use lm_head_impl='torch')")
        K = _kernels()
        if not K.INTERPRETED:
            raise RuntimeError("fasttrain_kernels.lm_head_triton was imported without TRITON_INTERPRET=1, so its "
                               "kernels cannot run on CPU; set it before the first import")
        # cheap here (the interpreter is slow anyway); on GPU this would cost a host sync, so it is skipped
        if targets_N.numel() and (int(targets_N.min()) < 0 or int(targets_N.max()) >= V):
            raise IndexError(f"lm_head_logprobs: targets out of range [0, {V})")
        return K
    if x.device.type != "cuda":
        raise RuntimeError(f"the Triton LM head needs CUDA tensors (or CPU + TRITON_INTERPRET=1), got {x.device}")
    return _kernels()


@torch.library.custom_op("fasttrain::lm_head_logprobs", mutates_args=())
def lm_head_logprobs_op(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(h_ND, w_VD, targets_N)
    K = _check_runtime(h_ND, targets_N, w_VD.shape[0])
    return K.lm_head_fwd(h_ND, w_VD, targets_N)


@lm_head_logprobs_op.register_fake
def _(h_ND, w_VD, targets_N):
    _check(h_ND, w_VD, targets_N)
    N = h_ND.shape[0]
    return h_ND.new_empty(N, dtype=torch.float32), h_ND.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("fasttrain::lm_head_logprobs_backward", mutates_args=())
def lm_head_logprobs_backward_op(g_N: torch.Tensor, glse_N: torch.Tensor, h_ND: torch.Tensor,
                                 w_VD: torch.Tensor, targets_N: torch.Tensor, lse_N: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    K = _check_runtime(h_ND, targets_N[:0], w_VD.shape[0])
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    return K.lm_head_bwd(f32(g_N), f32(glse_N), h_ND, w_VD, targets_N, f32(lse_N))


@lm_head_logprobs_backward_op.register_fake
def _(g_N, glse_N, h_ND, w_VD, targets_N, lse_N):
    return torch.empty_like(h_ND), torch.empty_like(w_VD)


def _setup_context(ctx, inputs, output):
    h_ND, w_VD, targets_N = inputs
    _, lse_N = output
    ctx.save_for_backward(h_ND, w_VD, targets_N, lse_N)


def _backward(ctx, grad_logp, grad_lse):
    h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse_N)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse_N)
    dh, dw = lm_head_logprobs_backward_op(grad_logp, grad_lse, h_ND, w_VD, targets_N, lse_N)
    return dh, dw, None


lm_head_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def lm_head_logprobs_triton(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """logp_N (fp32) = log_softmax(h_ND @ w_VD.T)[n, targets_N[n]] without materialising [N, V].

    Same contract as ``fasttrain_kernels.reference.lm_head_logprobs``. Differentiable in h and w."""
    _check(h_ND, w_VD, targets_N)
    return lm_head_logprobs_op(h_ND, w_VD, targets_N)[0]
