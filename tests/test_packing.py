"""Prefix-shared packing: layout invariants, attention equivalence with unshared sequences, scheduling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttrain.attention import reference_attention, varlen_attention
from fasttrain.packing import (
    AttentionMeta,
    PairRef,
    PromptGroup,
    bin_groups,
    build_groups,
    pack_groups,
    pack_unshared,
    split_group,
)
from fasttrain.plan import plan_steps


def random_groups(rng: np.random.Generator, n_groups: int, vocab: int = 50, max_conts: int = 4) -> list[PromptGroup]:
    groups = []
    pair_index = 0
    for g in range(n_groups):
        p = int(rng.integers(1, 12))
        n_cont = int(rng.integers(2, max_conts + 1))
        # one-token continuations are included on purpose (length 1 is the edge of the row index)
        conts = [rng.integers(0, vocab, size=int(rng.choice([1, rng.integers(1, 9)]))) for _ in range(n_cont)]
        pairs = []
        for j in range(1, n_cont):
            pairs.append(PairRef(pair_index, f"g{g}:p{j}", 0, j))
            pair_index += 1
        groups.append(PromptGroup(rng.integers(0, vocab, size=p), conts, pairs))
    return groups


def unshared_sequences(groups):
    seqs, plens = [], []
    for g in groups:
        for c in g.continuations:
            seqs.append(np.concatenate([g.prompt_ids, c]))
            plens.append(len(g.prompt_ids))
    return seqs, plens


class TokenPositionQKV(torch.nn.Module):
    """q/k/v that depend on (token, position) only, as in a real first layer: packing must not change them."""

    def __init__(self, vocab=50, max_pos=64, heads=4, kv_heads=2, dim=8, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = torch.nn.Parameter(torch.randn(vocab, (heads + 2 * kv_heads) * dim, generator=g, dtype=dtype))
        self.pos = torch.nn.Parameter(torch.randn(max_pos, (heads + 2 * kv_heads) * dim, generator=g, dtype=dtype))
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim

    def forward(self, ids_T, pos_T):
        x = self.tok[ids_T] + self.pos[pos_T]
        h, kv, d = self.heads, self.kv_heads, self.dim
        q, k, v = x.split([h * d, kv * d, kv * d], dim=-1)
        return q.view(-1, h, d), k.view(-1, kv, d), v.view(-1, kv, d)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prefix_shared_attention_equals_unshared(seed):
    rng = np.random.default_rng(seed)
    groups = random_groups(rng, n_groups=5)
    shared = pack_groups(groups)
    seqs, plens = unshared_sequences(groups)
    alone = pack_unshared(seqs, plens)
    qkv = TokenPositionQKV()

    q, k, v = qkv(shared.input_ids_T, shared.position_ids_T)
    o_shared = varlen_attention(q, k, v, shared.attn, "reference")
    q2, k2, v2 = qkv(alone.input_ids_T, alone.position_ids_T)
    o_alone = varlen_attention(q2, k2, v2, alone.attn, "reference")
    # The rows that predict step tokens and their targets line up one to one, in the same order.
    assert torch.equal(shared.lp_targets_N, alone.lp_targets_N)
    assert torch.equal(shared.lp_cont_N, alone.lp_cont_N)
    torch.testing.assert_close(o_shared[shared.lp_rows_N], o_alone[alone.lp_rows_N], rtol=1e-12, atol=1e-12)

    # Gradients flow back into the shared prompt rows from every continuation (gather backward).
    w = torch.randn_like(o_alone[alone.lp_rows_N])
    (o_shared[shared.lp_rows_N] * w).sum().backward()
    g_shared = qkv.tok.grad.clone()
    qkv.zero_grad()
    (o_alone[alone.lp_rows_N] * w).sum().backward()
    torch.testing.assert_close(g_shared, qkv.tok.grad, rtol=1e-10, atol=1e-10)


def test_layout_of_one_group():
    # P = [10, 11, 12], X1 = [20, 21], X2 = [30]
    g = PromptGroup(np.array([10, 11, 12]), [np.array([20, 21]), np.array([30])], [PairRef(0, "r0", 0, 1)])
    b = pack_groups([g])
    assert b.input_ids_T.tolist() == [10, 11, 12, 20, 21, 30]
    assert b.position_ids_T.tolist() == [0, 1, 2, 3, 4, 3]  # X2 restarts after the prompt
    assert b.attn.cu_seqlens_q.tolist() == [0, 5, 6]
    assert b.attn.cu_seqlens_k.tolist() == [0, 5, 9]
    assert b.attn.kv_index_K.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5]
    assert b.lp_rows_N.tolist() == [2, 3, 2]  # last prompt row predicts both X1[0] and X2[0]
    assert b.lp_targets_N.tolist() == [20, 21, 30]
    assert b.chosen_cont_B.tolist() == [0] and b.rejected_cont_B.tolist() == [1]
    assert b.attn.max_seqlen_q == 5 and b.attn.max_seqlen_k == 5
    mask = b.attn.dense_mask()
    # the single X2 query sees the three prompt keys and itself, not X1
    assert mask[5].tolist() == [False] * 5 + [True, True, True, True]


def test_build_groups_dedups_shared_prompt_and_rejected():
    p = np.array([1, 2, 3])
    r = np.array([9, 9])
    groups = build_groups(
        [p, p, np.array([4])], [np.array([5]), np.array([6, 7]), np.array([5])], [r, r, r], ["a", "b", "c"]
    )
    assert len(groups) == 2
    g = groups[0]
    assert len(g.continuations) == 3  # chosen 5, rejected 9 9, chosen 6 7: the rejected step is stored once
    assert [(pr.chosen, pr.rejected) for pr in g.pairs] == [(0, 1), (2, 1)]


def test_split_and_bin_respect_budget():
    rng = np.random.default_rng(7)
    groups = random_groups(rng, n_groups=30, max_conts=6)
    budget = 40
    bins = bin_groups(groups, budget)
    assert all(sum(g.num_tokens for g in b) <= budget for b in bins)
    pairs_in = sorted(pr.pair_index for g in groups for pr in g.pairs)
    pairs_out = sorted(pr.pair_index for b in bins for g in b for pr in g.pairs)
    assert pairs_in == pairs_out
    big = PromptGroup(np.arange(10), [np.arange(30), np.arange(30)], [PairRef(0, "huge", 0, 1)])
    with pytest.raises(ValueError, match="huge"):
        split_group(big, 50)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_steps_exact_batches_and_coverage(world):
    rng = np.random.default_rng(world)
    groups = random_groups(rng, n_groups=23)
    total = sum(g.num_pairs for g in groups)
    B = 7
    plans = plan_steps(groups, B, world, 48, seed=3, epochs=2.0)
    assert len(plans) == (2 * total) // B
    seen = []
    for plan in plans:
        assert len(plan.micro_batches) == world
        assert len({len(mb) for mb in plan.micro_batches}) == 1  # same micro-batch count on every rank
        pairs = [pr.pair_index for rank in plan.micro_batches for mb in rank for g in mb for pr in g.pairs]
        assert len(pairs) == B
        for rank in plan.micro_batches:
            for mb in rank:
                assert sum(g.num_tokens for g in mb) <= 48
        seen += pairs
    # Steps wholly inside epoch 1 never repeat a pair; over both epochs no pair is used more than twice.
    within_first = seen[: (total // B) * B]
    assert len(set(within_first)) == len(within_first)
    assert max(np.bincount(seen)) <= 2 and len(set(seen)) == total
    again = plan_steps(groups, B, world, 48, seed=3, epochs=2.0)
    assert [p.micro_batches.__repr__() for p in again] == [p.micro_batches.__repr__() for p in plans]


def test_for_sequences_is_plain_causal():
    meta = AttentionMeta.for_sequences([3, 2])
    mask = meta.dense_mask()
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_reference_attention_matches_sdpa_single_sequence():
    torch.manual_seed(0)
    q = torch.randn(7, 4, 8, dtype=torch.float64)
    k = torch.randn(7, 2, 8, dtype=torch.float64)
    v = torch.randn(7, 2, 8, dtype=torch.float64)
    out = reference_attention(q, k, v, AttentionMeta.for_sequences([7]))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref)
