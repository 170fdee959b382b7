"""Model FLOPs actually needed for a packed batch (DESIGN §7), for MFU.

  dense layers   6 · P_blocks · T          (2 · for forward-only: the live reference)
  attention      4 · L · (H · d_head) · A  ×3 for train, A = attended keys summed over queries
  LM head        6 · N · V · D             only the N rows that predict step tokens
P_blocks = parameters of the decoder blocks (embedding lookups cost no FLOPs). Padding never
exists, and the duplicated prompt K/V rows are not counted (they are not needed work).
MFU divides by the card's dense bf16 ceiling: measured on the card (benchmarks/gpu_check.py), else
``peak_bf16_tflops``'s per-card value, which names its source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class FlopModel:
    block_params: int
    layers: int
    attn_width: int  # n_heads * head_dim
    vocab: int
    hidden: int

    @staticmethod
    def of(cfg) -> FlopModel:
        """From a ModelConfig: decoder-block parameters (plus the final norm, negligible)."""
        from fasttrain.model.config import num_params

        return FlopModel(num_params(cfg, include_embeddings=False), cfg.num_hidden_layers, cfg.q_dim,
                         cfg.vocab_size, cfg.hidden_size)

    def batch(self, tokens: int, attended: int, lm_rows: int, train: bool) -> float:
        mult = 3 if train else 1
        return float(
            2 * mult * self.block_params * tokens
            + 4 * mult * self.layers * self.attn_width * attended
            + 2 * mult * lm_rows * self.vocab * self.hidden
        )


class PeakFlops(NamedTuple):
    """A card's dense bf16 matmul ceiling, the MFU denominator, and where the number comes from."""

    tflops: float | None  # None: no number known for the card (MFU is then not reported)
    source: str


# DESIGN §6: an 8192³ bf16 GEMM on an H100 SXM ran at 785 TFLOP/s with torch 2.11 (the datasheet's 989 is not
# reached by a real GEMM, so datasheet values overstate the denominator and understate MFU).
_H100_SXM_MEASURED = 785.0


def peak_bf16_tflops(device_name: str) -> PeakFlops:
    """The dense bf16 ceiling for a card named as ``torch.cuda.get_device_name()`` names it.

    Only the H100 SXM value was measured by this project; the others say what they rest on. A number measured
    on the card in hand (``benchmarks/gpu_check.py``, stage 0) beats every value here. Cards not listed get
    ``tflops=None`` and a source saying so, never another card's number.
    """
    words = device_name.upper().replace("-", " ").split()
    if "H200" in words and "NVL" not in words:  # "NVIDIA H200" (SXM); not GH200 (another word), not the 600 W NVL
        return PeakFlops(_H100_SXM_MEASURED, "predicted: the H200 is the H100 SXM's GH100 chip at the same clocks, "
                                             "measured at 785 TFLOP/s on an H100 SXM (DESIGN §6); not yet measured "
                                             "on an H200")
    if "H100" in words and ("HBM3" in words or "SXM" in words or "SXM5" in words):  # "NVIDIA H100 80GB HBM3"
        return PeakFlops(_H100_SXM_MEASURED, "measured: H100 SXM, 8192³ bf16 GEMM, torch 2.11 (DESIGN §6)")
    if "H100" in words and "PCIE" in words:
        return PeakFlops(756.0, "datasheet: H100 PCIe dense bf16 (1,513 TFLOP/s with sparsity, halved); not measured")
    if "A100" in words:  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe": the same dense bf16 rate
        return PeakFlops(312.0, "datasheet: A100 dense bf16; not measured")
    return PeakFlops(None, f"no bf16 ceiling known for {device_name!r} (fasttrain/flops.py lists H100, H200, "
                           "A100): measure it with benchmarks/gpu_check.py")
