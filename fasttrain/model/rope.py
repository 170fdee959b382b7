"""Rotary position embeddings, numerically the same as transformers' Llama-family code.

Shape legend: T = tokens in the packed stream, N = heads, H = head_dim, F = H/2 frequencies.

Convention: HF's "rotate half" (the first and second halves of the head dim form the rotated pairs),
not the interleaved (even, odd) convention of the original Meta checkpoints; HF checkpoints are
already permuted for it.
"""
from __future__ import annotations

import math

import torch

from fasttrain.model.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """inv_freq_F in fp32 on the CPU, with the exact op order of transformers' rope init functions
    (so the frequencies are bit-identical to theirs)."""
    exponent_F = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq_F = 1.0 / (rope.theta ** exponent_F)
    if rope.rope_type == "default":
        return inv_freq_F
    if rope.rope_type != "llama3":
        raise ValueError(f"rope_type {rope.rope_type!r} is not implemented")
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between
    # interpolated smoothly.
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen_F = 2 * math.pi / inv_freq_F
    scaled_F = torch.where(wavelen_F > low_freq_wavelen, inv_freq_F / factor, inv_freq_F)
    smooth_F = (old_context_len / wavelen_F - low) / (high - low)
    smoothed_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
    is_medium_F = ~(wavelen_F < high_freq_wavelen) * ~(wavelen_F > low_freq_wavelen)
    return torch.where(is_medium_F, smoothed_F, scaled_F)


def rope_cos_sin(
    inv_freq_F: torch.Tensor, position_ids_T: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_TH, sin_TH computed in fp32 from integer positions, then cast to the activation dtype
    (as transformers does, so bf16 runs round the same way). Computed once per forward."""
    freqs_TF = position_ids_T[:, None].float() * inv_freq_F.to(device=position_ids_T.device, dtype=torch.float)
    emb_TH = torch.cat((freqs_TF, freqs_TF), dim=-1)
    return emb_TH.cos().to(dtype), emb_TH.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_TNH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    cos_T1H, sin_T1H = cos_TH[:, None, :], sin_TH[:, None, :]
    return x_TNH * cos_T1H + rotate_half(x_TNH) * sin_T1H
