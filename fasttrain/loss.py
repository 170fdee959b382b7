"""Step-DPO / DPO losses and the TRL-named metrics (DESIGN §1, §6).

Shapes: N = LM-head rows (step tokens), M = continuations in the micro-batch, B = pairs.
Log-probs of a continuation are *summed* over its tokens (Step-DPO and TRL's sigmoid DPO); IPO uses
the per-token mean, as TRL does for ``loss_type="ipo"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PairLogps:
    """Per-pair sums for one micro-batch, all float32 [B]."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def continuation_logps(logp_N: torch.Tensor, cont_N: torch.Tensor, num_continuations: int) -> torch.Tensor:
    """Segment-sum token log-probs into one sum per continuation: [M], float32 (float64 stays float64)."""
    acc = torch.promote_types(logp_N.dtype, torch.float32)
    out_M = torch.zeros(num_continuations, dtype=acc, device=logp_N.device)
    return out_M.index_add(0, cont_N, logp_N.to(acc))


def pair_logps(cont_logp_M: torch.Tensor, chosen_B: torch.Tensor, rejected_B: torch.Tensor):
    return cont_logp_M.index_select(0, chosen_B), cont_logp_M.index_select(0, rejected_B)


def dpo_pair_losses(
    logps: PairLogps, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Loss per pair [B] (not reduced, so the caller normalises over the global batch)."""
    pi_logratio = logps.policy_chosen - logps.policy_rejected
    ref_logratio = logps.ref_chosen - logps.ref_rejected
    logits = pi_logratio - ref_logratio
    if loss_type == "sigmoid":
        # Conservative DPO (label smoothing eps): the preference label is flipped with probability eps.
        return (
            -F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


@dataclass
class MetricSums:
    """Sums over pairs (so they add across micro-batches and ranks); divide by count to report."""

    count: torch.Tensor  # [] float32
    loss: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    logp_chosen: torch.Tensor
    logp_rejected: torch.Tensor

    FIELDS = ("count", "loss", "reward_chosen", "reward_rejected", "accuracy", "margin", "logp_chosen", "logp_rejected")

    def as_vector(self) -> torch.Tensor:
        return torch.stack([getattr(self, f) for f in self.FIELDS])

    @staticmethod
    def names() -> tuple[str, ...]:
        return MetricSums.FIELDS

    @staticmethod
    def report(vector: torch.Tensor) -> dict[str, float]:
        """Turn a (possibly all-reduced) sum vector into the TRL-named means."""
        values = dict(zip(MetricSums.FIELDS, vector.tolist()))
        n = max(values["count"], 1.0)
        return {
            "loss": values["loss"] / n,
            "rewards/chosen": values["reward_chosen"] / n,
            "rewards/rejected": values["reward_rejected"] / n,
            "rewards/accuracies": values["accuracy"] / n,
            "rewards/margins": values["margin"] / n,
            "logps/chosen": values["logp_chosen"] / n,
            "logps/rejected": values["logp_rejected"] / n,
            "pairs": values["count"],
        }


def metric_sums(logps: PairLogps, pair_losses: torch.Tensor, beta: float) -> MetricSums:
    with torch.no_grad():
        reward_chosen = beta * (logps.policy_chosen - logps.ref_chosen)
        reward_rejected = beta * (logps.policy_rejected - logps.ref_rejected)
        return MetricSums(
            # a fill kernel, not torch.tensor(x, device=cuda): a pageable host copy would wait for the GPU
            count=torch.full((), float(pair_losses.numel()), device=pair_losses.device),
            loss=pair_losses.detach().sum(),
            reward_chosen=reward_chosen.sum(),
            reward_rejected=reward_rejected.sum(),
            accuracy=(reward_chosen > reward_rejected).float().sum(),
            margin=(reward_chosen - reward_rejected).sum(),
            logp_chosen=logps.policy_chosen.detach().sum(),
            logp_rejected=logps.policy_rejected.detach().sum(),
        )
