"""Which LM-head implementation computes the step-token log-probs (DESIGN §4), chosen once per run.

  "torch"    plain PyTorch (fasttrain_kernels.reference): logits for the selected rows only, [N, V] in fp32.
  "triton"   fully fused Triton kernels (fasttrain_kernels.lm_head_triton): no [N, V] buffer.
  "chunked"  cuBLAS GEMMs on vocabulary chunks + fused Triton epilogues (fasttrain_kernels.lm_head_chunked):
             no [N, V] buffer, one [N, C] chunk at a time.
  "auto"     "chunked" on CUDA, "torch" elsewhere. The GEMM-based kernel is the CUDA default because its
             matmuls run on cuBLAS; which kernel is faster on the H100 is measured by
             benchmarks/bench_logprob.py (see benchmarks/RESULTS.md).
Asking for a kernel where it cannot run fails with the reason instead of falling back.
"""
from __future__ import annotations

import importlib.util
import os

import torch

LM_HEAD_IMPLS = ("auto", "torch", "triton", "chunked")


def resolve_lm_head(requested: str, device: torch.device) -> str:
    if requested not in LM_HEAD_IMPLS:
        raise ValueError(f"model.lm_head_impl={requested!r}: expected one of {LM_HEAD_IMPLS}")
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
