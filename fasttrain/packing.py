"""Prefix-shared packing of Step-DPO pairs into varlen micro-batches (DESIGN §3).

Shape legend used in names: T = tokens in the packed query stream, K = gathered key/value rows,
S = attention segments, N = LM-head rows (one per predicted continuation token), M = distinct
continuations in the batch, B = pairs in the batch.

One prompt group is laid out as ``[P | X1 | X2 | ...]`` in the stream. Attention segments:
  segment 1: queries P∪X1, keys P∪X1
  segment j: queries Xj,   keys P then Xj   (the prompt's K/V rows are gathered again)
With ``causal=True`` and the bottom-right alignment of flash-attention >= 2.1, query i of Xj sees
all of P and Xj[0..i] — exactly the unshared sequence P+Xj. RoPE positions restart at p for every
continuation, so each continuation sees the same positions as it would alone.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# Host-side description of what goes into a batch
# ----------------------------------------------------------------------------------------------
def to_device(t: torch.Tensor, device: torch.device | str, non_blocking: bool = True) -> torch.Tensor:
    """Host batch tensor -> device. To CUDA through pinned memory: a copy from pageable memory first waits
    for the GPU's queued work (a host sync per micro-batch); a pinned one is queued behind it."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and non_blocking:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=non_blocking)


@dataclass
class PairRef:
    """One preference pair inside a prompt group: indices into the group's continuations."""

    pair_index: int  # index of the pair in the dataset (keys precomputed reference log-probs)
    record_id: str  # human-readable origin ("file:row"), for logs
    chosen: int
    rejected: int


@dataclass
class PromptGroup:
    """A prompt and every distinct continuation of it that some pair in the batch uses."""

    prompt_ids: np.ndarray  # [p] int64
    continuations: list[np.ndarray]  # each [c] int64, distinct
    pairs: list[PairRef]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(c) for c in self.continuations)

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)


def _key(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype=np.int64).tobytes()


def build_groups(
    prompts: Sequence[np.ndarray],
    chosens: Sequence[np.ndarray],
    rejecteds: Sequence[np.ndarray],
    record_ids: Sequence[str],
    pair_indices: Sequence[int] | None = None,
) -> list[PromptGroup]:
    """Group pairs with identical prompt tokens; deduplicate identical continuations inside a group.

    The public Math-Step-DPO-10K set has rows that share prompt, prefix and rejected step with
    different chosen steps, so the shared rejected step is computed once.
    Order is deterministic: groups in order of first appearance.
    """
    if pair_indices is None:
        pair_indices = range(len(prompts))
    by_prompt: dict[bytes, PromptGroup] = {}
    cont_index: dict[bytes, dict[bytes, int]] = {}
    for p, c, r, rid, idx in zip(prompts, chosens, rejecteds, record_ids, pair_indices):
        pk = _key(p)
        group = by_prompt.get(pk)
        if group is None:
            group = PromptGroup(np.asarray(p, dtype=np.int64), [], [])
            by_prompt[pk] = group
            cont_index[pk] = {}
        conts = cont_index[pk]
        ids = []
        for seq in (c, r):
            sk = _key(seq)
            if sk not in conts:
                conts[sk] = len(group.continuations)
                group.continuations.append(np.asarray(seq, dtype=np.int64))
            ids.append(conts[sk])
        group.pairs.append(PairRef(int(idx), str(rid), ids[0], ids[1]))
    return list(by_prompt.values())


def subgroup(group: PromptGroup, pairs: Sequence[PairRef]) -> PromptGroup:
    """The same prompt with only ``pairs`` and the continuations they use (renumbered)."""
    used = sorted({i for pr in pairs for i in (pr.chosen, pr.rejected)})
    remap = {old: new for new, old in enumerate(used)}
    return PromptGroup(
        group.prompt_ids,
        [group.continuations[i] for i in used],
        [PairRef(pr.pair_index, pr.record_id, remap[pr.chosen], remap[pr.rejected]) for pr in pairs],
    )


def split_group(group: PromptGroup, token_budget: int) -> list[PromptGroup]:
    """Split a group whose tokens exceed the budget into sub-groups (same prompt, fewer pairs)."""
    if group.num_tokens <= token_budget:
        return [group]
    out: list[PromptGroup] = []
    current: list[PairRef] = []

    for pr in group.pairs:
        trial = current + [pr]
        used = {i for q in trial for i in (q.chosen, q.rejected)}
        tokens = len(group.prompt_ids) + sum(len(group.continuations[i]) for i in used)
        if current and tokens > token_budget:
            out.append(subgroup(group, current))
            trial = [pr]
            used = {pr.chosen, pr.rejected}
            tokens = len(group.prompt_ids) + sum(len(group.continuations[i]) for i in used)
        if tokens > token_budget:
            raise ValueError(
                f"record {pr.record_id}: prompt + chosen + rejected is {tokens} tokens, more than the "
                f"micro-batch token budget {token_budget}; raise train.tokens_per_micro_batch "
                f"(it must be >= 2 * data.max_length)"
            )
        current = trial
    if current:
        out.append(subgroup(group, current))
    return out


# ----------------------------------------------------------------------------------------------
# Device-side packed batch
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionMeta:
    """Everything a varlen attention call needs; built once per batch and reused by every layer.

    kv_index_K: rows of the query stream whose K/V form the key stream (prompt rows appear once
    per continuation that attends to them). cu_seqlens_* are int32 as flash-attention wants.
    max_seqlen_* are Python ints computed on the host, so no device->host sync in the step.
    """

    kv_index_K: torch.Tensor  # [K] int64
    cu_seqlens_q: torch.Tensor  # [S+1] int32
    cu_seqlens_k: torch.Tensor  # [S+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    kv_is_identity: bool = False  # plain packed sequences: no gather needed
    _dense_mask: torch.Tensor | None = field(default=None, repr=False)
    _host_cu: tuple[list[int], list[int]] | None = field(default=None, repr=False)

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = True) -> AttentionMeta:
        host_cu = self._host_cu
        if host_cu is None and self.cu_seqlens_q.device.type == "cpu":  # free here, a sync once on the GPU
            host_cu = (self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist())
        return AttentionMeta(
            to_device(self.kv_index_K, device, non_blocking),
            to_device(self.cu_seqlens_q, device, non_blocking),
            to_device(self.cu_seqlens_k, device, non_blocking),
            self.max_seqlen_q,
            self.max_seqlen_k,
            self.kv_is_identity,
            _host_cu=host_cu,
        )

    def host_cu_seqlens(self) -> tuple[list[int], list[int]]:
        """cu_seqlens as Python lists (reference backend only). Taken from the host copy in ``to()``, so a
        batch moved to the GPU needs no device->host sync for them. The copy is a dataclass field, so it also
        survives FSDP2, which rebuilds every dataclass input of every block (dataclasses.replace) to cast its
        tensors: a cache filled on one block's copy would be lost to the next block."""
        if self._host_cu is None:
            self._host_cu = (self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist())
        return self._host_cu

    def dense_mask(self) -> torch.Tensor:
        """[T, K] bool, True where query t may attend key k (bottom-right causal per segment).

        A whole-batch picture of the mask, for tests and debugging.
        """
        if self._dense_mask is None:
            cu_q = self.cu_seqlens_q.long()
            cu_k = self.cu_seqlens_k.long()
            len_q = cu_q[1:] - cu_q[:-1]
            len_k = cu_k[1:] - cu_k[:-1]
            seg_q = torch.repeat_interleave(torch.arange(len(len_q), device=cu_q.device), len_q)
            seg_k = torch.repeat_interleave(torch.arange(len(len_k), device=cu_k.device), len_k)
            local_q = torch.arange(len(seg_q), device=cu_q.device) - cu_q[seg_q]
            local_k = torch.arange(len(seg_k), device=cu_k.device) - cu_k[seg_k]
            # Bottom-right alignment: query i of a segment sees keys j <= i + (len_k - len_q).
            limit_q = local_q + (len_k - len_q)[seg_q]
            self._dense_mask = (seg_q[:, None] == seg_k[None, :]) & (local_k[None, :] <= limit_q[:, None])
        return self._dense_mask

    @staticmethod
    def for_sequences(lengths: Sequence[int], device: torch.device | str = "cpu") -> AttentionMeta:
        """Plain causal packing of independent sequences (no prefix sharing)."""
        cu = np.zeros(len(lengths) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(lengths)
        cu_t = torch.from_numpy(cu).to(device)
        total = int(cu[-1])
        return AttentionMeta(
            torch.arange(total, device=device), cu_t, cu_t.clone(), int(max(lengths)), int(max(lengths)), True
        )


@dataclass
class PackedBatch:
    """One micro-batch: token stream, attention layout, LM-head rows and pair bookkeeping."""

    input_ids_T: torch.Tensor  # [T] int64
    position_ids_T: torch.Tensor  # [T] int64
    attn: AttentionMeta
    lp_rows_N: torch.Tensor  # [N] int64: hidden row that predicts each continuation token
    lp_targets_N: torch.Tensor  # [N] int64: the token it predicts
    lp_cont_N: torch.Tensor  # [N] int64: which continuation the token belongs to (0..M-1)
    cont_lengths_M: torch.Tensor  # [M] int64
    chosen_cont_B: torch.Tensor  # [B] int64
    rejected_cont_B: torch.Tensor  # [B] int64
    pair_index_B: torch.Tensor  # [B] int64: dataset pair indices
    record_ids: list[str]
    num_tokens: int  # T, real tokens (no padding exists)
    num_attended_keys: int  # sum over queries of keys attended (for MFU's attention term)

    @property
    def num_pairs(self) -> int:
        return len(self.record_ids)

    @property
    def num_continuations(self) -> int:
        return int(self.cont_lengths_M.numel())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        def mv(t):
            return to_device(t, device, non_blocking)

        return PackedBatch(
            mv(self.input_ids_T), mv(self.position_ids_T), self.attn.to(device, non_blocking),
            mv(self.lp_rows_N), mv(self.lp_targets_N), mv(self.lp_cont_N), mv(self.cont_lengths_M),
            mv(self.chosen_cont_B), mv(self.rejected_cont_B), mv(self.pair_index_B),
            self.record_ids, self.num_tokens, self.num_attended_keys,
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.input_ids_T, self.attn.cu_seqlens_q, self.attn.cu_seqlens_k, self.attn.kv_index_K):
            h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def pack_groups(groups: Sequence[PromptGroup]) -> PackedBatch:
    """Lay out prompt groups as one prefix-shared varlen batch (host work, numpy, no per-token loops).

    An empty list gives a two-token dummy batch with no pairs; ranks that run out of work in a step
    run it so that every rank issues the same FSDP collectives.
    """
    if len(groups) == 0:
        return _dummy_batch()
    ids, pos, kv, cu_q, cu_k = [], [], [], [0], [0]
    rows, targets, cont_of_row, cont_lengths = [], [], [], []
    chosen, rejected, pair_index, record_ids = [], [], [], []
    offset = 0  # start of the current group in the stream
    n_cont = 0  # continuations laid out so far (batch-wide index)
    attended = 0
    max_q = max_k = 0
    for g in groups:
        p = len(g.prompt_ids)
        if p == 0:
            raise ValueError("a prompt group has an empty prompt; every prompt has at least its template")
        if not g.continuations:
            raise ValueError("a prompt group has no continuations")
        ids.append(g.prompt_ids)
        pos.append(np.arange(p))
        cursor = offset + p
        for j, cont in enumerate(g.continuations):
            c = len(cont)
            if c == 0:
                raise ValueError(f"record {g.pairs[0].record_id}: empty continuation cannot be packed")
            ids.append(cont)
            pos.append(np.arange(p, p + c))
            if j == 0:  # segment P∪X1: keys are the same rows as the queries
                kv.append(np.arange(offset, cursor + c))
                seg_q, seg_k = p + c, p + c
                attended += (p + c) * (p + c + 1) // 2
            else:  # segment Xj: keys are P (gathered again) then Xj
                kv.append(np.arange(offset, offset + p))
                kv.append(np.arange(cursor, cursor + c))
                seg_q, seg_k = c, p + c
                attended += c * p + c * (c + 1) // 2
            cu_q.append(cu_q[-1] + seg_q)
            cu_k.append(cu_k[-1] + seg_k)
            max_q, max_k = max(max_q, seg_q), max(max_k, seg_k)
            # LM-head rows: the last prompt row predicts cont[0]; cont[i] predicts cont[i+1].
            rows.append(np.concatenate(([offset + p - 1], np.arange(cursor, cursor + c - 1))))
            targets.append(cont)
            cont_of_row.append(np.full(c, n_cont + j))
            cont_lengths.append(c)
            cursor += c
        for pr in g.pairs:
            chosen.append(n_cont + pr.chosen)
            rejected.append(n_cont + pr.rejected)
            pair_index.append(pr.pair_index)
            record_ids.append(pr.record_id)
        n_cont += len(g.continuations)
        offset = cursor
    as_long = _as_long
    return PackedBatch(
        input_ids_T=as_long(ids),
        position_ids_T=as_long(pos),
        attn=AttentionMeta(
            kv_index_K=as_long(kv),
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
        ),
        lp_rows_N=as_long(rows),
        lp_targets_N=as_long(targets),
        lp_cont_N=as_long(cont_of_row),
        cont_lengths_M=torch.tensor(cont_lengths, dtype=torch.int64),
        chosen_cont_B=torch.tensor(chosen, dtype=torch.int64),
        rejected_cont_B=torch.tensor(rejected, dtype=torch.int64),
        pair_index_B=torch.tensor(pair_index, dtype=torch.int64),
        record_ids=record_ids,
        num_tokens=offset,
        num_attended_keys=attended,
    )


def _dummy_batch() -> PackedBatch:
    # Two tokens, not one: torch.compile specialises size-1 dimensions, so a 1-token dummy would cost
    # model.compile an extra graph per mode on every rank that runs one.
    one = torch.zeros(1, dtype=torch.int64)
    two = torch.zeros(2, dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    return PackedBatch(
        input_ids_T=two.clone(), position_ids_T=torch.arange(2, dtype=torch.int64),
        attn=AttentionMeta(torch.arange(2, dtype=torch.int64), cu, cu.clone(), 2, 2, True),
        lp_rows_N=one.clone(), lp_targets_N=one.clone(), lp_cont_N=one.clone(),
        cont_lengths_M=torch.ones(1, dtype=torch.int64),
        chosen_cont_B=empty, rejected_cont_B=empty.clone(), pair_index_B=empty.clone(),
        record_ids=[], num_tokens=0, num_attended_keys=0,
    )


def pack_unshared(sequences: Sequence[np.ndarray], prompt_lengths: Sequence[int]) -> PackedBatch:
    """Each full sequence (prompt+continuation) as its own segment, no sharing: the reference layout
    that tests compare the prefix-shared layout against. Continuation m is sequence m; no pairs."""
    ids, pos, rows, targets, cont_of_row, lens = [], [], [], [], [], []
    offset = 0
    for m, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        n = len(seq)
        ids.append(np.asarray(seq))
        pos.append(np.arange(n))
        rows.append(np.arange(offset + p - 1, offset + n - 1))
        targets.append(np.asarray(seq)[p:])
        cont_of_row.append(np.full(n - p, m))
        lens.append(n - p)
        offset += n
    as_long = _as_long
    empty = torch.zeros(0, dtype=torch.int64)
    return PackedBatch(
        as_long(ids), as_long(pos), AttentionMeta.for_sequences([len(s) for s in sequences]),
        as_long(rows), as_long(targets), as_long(cont_of_row), torch.tensor(lens, dtype=torch.int64),
        empty, empty.clone(), empty.clone(), [], offset,
        sum(len(s) * (len(s) + 1) // 2 for s in sequences),
    )


# ----------------------------------------------------------------------------------------------
# Micro-batches to a token budget
# ----------------------------------------------------------------------------------------------
def bin_groups(groups: Sequence[PromptGroup], token_budget: int) -> list[list[PromptGroup]]:
    """First-fit decreasing into bins of at most ``token_budget`` tokens (budgets fill, order stable)."""
    pieces = [piece for g in groups for piece in split_group(g, token_budget)]
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].num_tokens)
    bins: list[list[PromptGroup]] = []
    loads: list[int] = []
    for i in order:
        t = pieces[i].num_tokens
        for b, load in enumerate(loads):
            if load + t <= token_budget:
                bins[b].append(pieces[i])
                loads[b] += t
                break
        else:
            bins.append([pieces[i]])
            loads.append(t)
    return bins


def _as_long(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))
