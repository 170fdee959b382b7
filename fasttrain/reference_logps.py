"""Reference log-probs: precomputed once (cached on disk) or computed live by a frozen copy.

Both give, for a packed micro-batch, the reference per-pair sums (ref_chosen_B, ref_rejected_B).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fasttrain.distributed import all_reduce_sum, broadcast_object, reshard_all
from fasttrain.loss import continuation_logps, pair_logps
from fasttrain.packing import PromptGroup, pack_groups

# Weight files up to this size are hashed whole for the cache key; larger ones by their safetensors
# header (names, shapes, dtypes, offsets) + size + mtime, since hashing 145 GB of a 72B model would
# take minutes on every start.
_HASH_WHOLE_FILE_BYTES = 2 << 30


def model_fingerprint(model_dir: str) -> str:
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(root.iterdir()):
        if path.name == "config.json" or path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            h.update(path.name.encode())
            size = path.stat().st_size
            h.update(str(size).encode())
            with open(path, "rb") as f:
                if size <= _HASH_WHOLE_FILE_BYTES:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
                else:
                    header_len = int.from_bytes(f.read(8), "little")
                    h.update(f.read(header_len))
                    h.update(str(path.stat().st_mtime_ns).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_pair_logps(
    model: torch.nn.Module,
    micro_batches: list[list[PromptGroup]],
    num_pairs: int,
    device: torch.device,
) -> torch.Tensor:
    """Sum log-probs of (chosen, rejected) for every pair: [num_pairs, 2] float32 on ``device``.

    ``micro_batches`` are this rank's share (every rank has the same count; [] is a dummy), each pair
    on exactly one rank, so a sum all-reduce assembles the table.
    """
    table_P2 = torch.zeros(num_pairs, 2, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    for groups in micro_batches:
        batch = pack_groups(groups).to(device)
        logp_N = model(batch)
        cont_M = continuation_logps(logp_N, batch.lp_cont_N, batch.num_continuations)
        chosen_B, rejected_B = pair_logps(cont_M, batch.chosen_cont_B, batch.rejected_cont_B)
        table_P2[batch.pair_index_B, 0] = chosen_B
        table_P2[batch.pair_index_B, 1] = rejected_B
    reshard_all(model)
    model.train(was_training)
    return all_reduce_sum(table_P2)


class PrecomputedReference:
    """Table lookup by dataset pair index (no host sync, no extra forward)."""

    kind = "precompute"

    def __init__(self, table_P2: torch.Tensor):
        self.table_P2 = table_P2

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rows_B2 = self.table_P2.index_select(0, batch.pair_index_B)
        return rows_B2[:, 0], rows_B2[:, 1]


class LiveReference:
    """A frozen FSDP-sharded copy of the initial weights run on the same packed batch."""

    kind = "live"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logp_N = self.model(batch)
        cont_M = continuation_logps(logp_N, batch.lp_cont_N, batch.num_continuations)
        return pair_logps(cont_M, batch.chosen_cont_B, batch.rejected_cont_B)


class AdaptersOffReference(LiveReference):
    """With LoRA: the policy itself with every adapter switched off, i.e. the frozen base (no second model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model  # the policy: neither frozen nor put in eval mode here

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from fasttrain.model.lora import adapters_disabled

        with adapters_disabled(self.model):
            return super().__call__(batch)


def load_or_compute_table(
    cache_path: Path,
    key: dict,
    compute,
    is_main: bool,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """Return (table, was_cached). The cache file holds the key it was made for; a mismatch recomputes.

    Written to a temporary name and renamed, so a crash never leaves a truncated table behind.
    """
    # Rank 0 decides hit or miss for everyone, so all ranks either load or run the same collectives.
    blob = None
    if is_main and cache_path.exists():
        blob = torch.load(cache_path, map_location="cpu", weights_only=True)
        if json.loads(blob["key"]) != key:
            blob = None
    if broadcast_object(blob is not None):
        # Rank 0 sends the table (8 bytes per pair: ~86 KB for 10,795 pairs) rather than every rank reading the
        # file: data.cache_dir may be node-local, and on a multi-node run the other nodes would not have it.
        table = broadcast_object(blob["table"] if is_main else None)
        return table.to(device), True
    table = compute()
    if is_main:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp-{os.getpid()}")
        torch.save({"key": json.dumps(key, sort_keys=True), "table": table.cpu()}, tmp)
        os.replace(tmp, cache_path)
    return table, False
