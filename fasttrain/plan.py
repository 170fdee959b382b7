"""Which pairs go into which optimizer step, rank and micro-batch.

The plan is a pure function of (groups, seed, batch geometry), computed identically on every rank,
so no rank ever waits on another to learn its work and a resumed run replays the same order.

Epochs are a continuous stream: epoch e is a seeded permutation of the prompt groups, the streams
are concatenated, and every optimizer step takes exactly ``global_batch_pairs`` pairs from it (a group
cut by a step boundary continues in the next step). ``epochs`` may be fractional.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fasttrain.packing import PromptGroup, bin_groups, split_group, subgroup


@dataclass
class StepPlan:
    step: int  # 0-based optimizer step
    epoch: float  # fractional epoch reached at the end of this step
    micro_batches: list[list[list[PromptGroup]]]  # [rank][micro-batch] -> groups; [] = dummy
    num_pairs: int

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0])


def assign_to_ranks(groups: list[PromptGroup], world_size: int, token_budget: int) -> list[list[list[PromptGroup]]]:
    """Balance groups over ranks by tokens (longest first to the lightest rank), then bin each
    rank's groups into micro-batches; every rank gets the same number of micro-batches (padded with
    empty ones that run a dummy forward/backward so FSDP collectives stay matched)."""
    pieces = [piece for g in groups for piece in split_group(g, token_budget)]
    loads = [0] * world_size
    per_rank: list[list[PromptGroup]] = [[] for _ in range(world_size)]
    for piece in sorted(pieces, key=lambda g: -g.num_tokens):
        r = int(np.argmin(loads))
        per_rank[r].append(piece)
        loads[r] += piece.num_tokens
    binned = [bin_groups(gs, token_budget) for gs in per_rank]
    n_micro = max(1, max(len(b) for b in binned))
    return [b + [[] for _ in range(n_micro - len(b))] for b in binned]


def plan_steps(
    groups: list[PromptGroup],
    global_batch_pairs: int,
    world_size: int,
    token_budget: int,
    seed: int,
    epochs: float,
    max_steps: int = 0,
) -> list[StepPlan]:
    total_pairs = sum(g.num_pairs for g in groups)
    if total_pairs == 0:
        raise ValueError("the training set has no pairs")
    num_steps = int(epochs * total_pairs) // global_batch_pairs if epochs > 0 else max_steps
    if max_steps > 0:
        num_steps = min(num_steps, max_steps) if epochs > 0 else max_steps
    if num_steps == 0:
        raise ValueError(
            f"{epochs} epoch(s) of {total_pairs} pairs is less than one optimizer step of "
            f"train.global_batch_pairs={global_batch_pairs}; lower the batch or raise train.epochs"
        )
    plans: list[StepPlan] = []
    epoch = 0
    order: list[int] = []
    cursor = 0  # next group in `order`
    pair_cursor = 0  # pairs of order[cursor] already used by an earlier step
    consumed = 0
    for step in range(num_steps):
        need = global_batch_pairs
        chosen: list[PromptGroup] = []
        while need > 0:
            if cursor >= len(order):
                order = list(np.random.default_rng([seed, epoch]).permutation(len(groups)))
                epoch += 1
                cursor, pair_cursor = 0, 0
            g = groups[order[cursor]]
            take = g.pairs[pair_cursor : pair_cursor + need]
            chosen.append(g if len(take) == g.num_pairs else subgroup(g, take))
            need -= len(take)
            pair_cursor += len(take)
            if pair_cursor >= g.num_pairs:
                cursor, pair_cursor = cursor + 1, 0
        consumed += global_batch_pairs
        plans.append(
            StepPlan(step, consumed / total_pairs, assign_to_ranks(chosen, world_size, token_budget),
                     global_batch_pairs)
        )
    return plans


def plan_inference(groups: list[PromptGroup], world_size: int, token_budget: int) -> list[list[list[PromptGroup]]]:
    """Every group once (reference precompute, evaluation): [rank][micro-batch] -> groups."""
    return assign_to_ranks(groups, world_size, token_budget)
