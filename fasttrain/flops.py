"""Model FLOPs actually needed for a packed batch (DESIGN §7), for MFU.

  dense layers   6 · P_blocks · T          (2 · for forward-only: the live reference)
  attention      4 · L · (H · d_head) · A  ×3 for train, A = attended keys summed over queries
  LM head        6 · N · V · D             only the N rows that predict step tokens
P_blocks = parameters of the decoder blocks (embedding lookups cost no FLOPs). Padding never
exists, and the duplicated prompt K/V rows are not counted (they are not needed work).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopModel:
    block_params: int
    layers: int
    attn_width: int  # n_heads * head_dim
    vocab: int
    hidden: int

    @staticmethod
    def of(cfg) -> "FlopModel":
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
