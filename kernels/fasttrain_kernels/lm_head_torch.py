"""impl="torch": plain PyTorch LM-head log-probs, the reference every fused kernel is compared against.

Shapes: h_ND [N, D] hidden rows that predict step tokens, w_VD [V, D] LM-head (or tied embedding)
weight, targets_N [N] token ids. Returns logp_N [N] float32.

It materialises logits only for the N selected rows ([N, V] in fp32), never for the whole stream.
"""
from __future__ import annotations

import torch


def lm_head_logprobs_torch(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    # Matmul in the compute dtype (bf16 on GPU, as the model runs), softmax statistics in fp32.
    acc = torch.promote_types(h_ND.dtype, torch.float32)
    logits_NV = (h_ND @ w_VD.t()).to(acc)
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    target_logit_N = logits_NV.gather(1, targets_N[:, None]).squeeze(1)
    return target_logit_N - lse_N
