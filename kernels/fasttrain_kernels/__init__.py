"""fasttrain's kernels: the step-token LM head (DESIGN §4) and its implementations.

One public entry point::

    logp_N = lm_head_logprobs(h_ND, w_VD, targets_N, impl="chunked")   # log_softmax(h @ w.T)[n, targets[n]]

with one file per implementation, named after its ``impl`` value:

  "torch"    lm_head_torch.py    plain PyTorch: logits for the selected rows only, [N, V] in fp32 (the reference).
  "triton"   lm_head_triton.py   fully fused Triton kernels: no [N, V] buffer.
  "chunked"  lm_head_chunked.py  cuBLAS GEMMs on vocabulary chunks + fused Triton epilogues: one [N, C] chunk at
                                 a time.

(ops.py wraps the two Triton ones as torch.library custom ops: opaque to torch.compile, with autograd.)
``resolve_lm_head(requested, device)`` turns a config value, "auto" included, into one of these, once per run:
"auto" is "chunked" on CUDA (its matmuls run on cuBLAS), "torch" elsewhere. Asking for a kernel where it cannot
run fails with the reason instead of falling back.

Installed under the import name ``fasttrain_kernels`` (source in the repository's ``kernels/`` folder) so that
Hugging Face's ``kernels`` distribution is never shadowed.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fasttrain_kernels.lm_head_torch import lm_head_logprobs_torch
from fasttrain_kernels.ops import lm_head_logprobs_chunked, lm_head_logprobs_triton

LM_HEAD_FUNCTIONS = {"torch": lm_head_logprobs_torch, "triton": lm_head_logprobs_triton,
                     "chunked": lm_head_logprobs_chunked}
LM_HEAD_IMPLS = tuple(LM_HEAD_FUNCTIONS)  # what resolve_lm_head returns
LM_HEAD_CHOICES = ("auto", *LM_HEAD_IMPLS)  # what a config may ask for


def lm_head_logprobs(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                     impl: str = "torch") -> torch.Tensor:
    """logp_N (fp32) of ``targets_N`` under the rows ``h_ND`` [N, D] and the LM-head weight ``w_VD`` [V, D];
    differentiable in h and w. ``impl``: one of LM_HEAD_IMPLS (resolve "auto" first, once)."""
    fn = LM_HEAD_FUNCTIONS.get(impl)
    if fn is None:
        raise ValueError(f"lm_head_logprobs: impl={impl!r}; expected one of {LM_HEAD_IMPLS} (resolve 'auto' with "
                         "resolve_lm_head)")
    return fn(h_ND, w_VD, targets_N)


def resolve_lm_head(requested: str, device: torch.device) -> str:
    if requested not in LM_HEAD_CHOICES:
        raise ValueError(f"model.lm_head_impl={requested!r}: expected one of {LM_HEAD_CHOICES}")
    has_triton = importlib.util.find_spec("triton") is not None
    if requested == "auto":
        return "chunked" if device.type == "cuda" and has_triton else "torch"
    if requested == "torch":
        return requested
    if not has_triton:
        raise RuntimeError(f"model.lm_head_impl={requested!r} needs the triton package, which is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"model.lm_head_impl={requested!r} runs Triton kernels: it needs a CUDA device (this run "
                           "is on the CPU; the kernels run there only under TRITON_INTERPRET=1, for tests). "
                           "Use model.lm_head_impl=auto or torch.")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"model.lm_head_impl={requested!r} needs a CUDA device, this run is on {device}")
    return requested
