"""Test helper: random weights that exercise every parameter (a dropped norm weight or bias shows)."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08, noise_dtype=torch.float32) -> None:
    """Norm weights 1 + 0.2 N(0, 1), biases 0.2 N(0, 1), every other weight ``std`` N(0, 1), drawn in
    named_parameters() order from one generator."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=noise_dtype)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.2 * noise)
        else:
            p.copy_(std * noise)
