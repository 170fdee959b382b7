"""Where a rank's rows of a (possibly FSDP2-sharded) parameter are: loading, initialising and measuring weights
all write or read a parameter's local shard in place, never a gathered copy (DESIGN §5.3)."""
from __future__ import annotations

import math

import torch


def local_shard(param: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """(local tensor to write in place, start, end): the rows [start, end) of dim 0 of the full
    tensor that this rank holds. A plain tensor holds all rows.

    FSDP2 (``fully_shard``) shards dim 0 like ``torch.chunk``: chunk = ceil(rows / world), rank r holds
    [r*chunk, min((r+1)*chunk, rows)), possibly nothing. Nested Shard(0) over several mesh dims
    (and Replicate, as in HSDP) compose left to right.
    """
    from torch.distributed.tensor import DTensor  # torch.distributed is optional at import time

    if not isinstance(param, DTensor):
        return param, 0, (param.shape[0] if param.dim() else 1)
    start, end = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not (placement.is_shard() and placement.dim == 0):
            raise ValueError(f"parameter {name!r}: placement {placement} is not supported (only Shard(0)/Replicate)")
        world = param.device_mesh.size(mesh_dim)
        rank = param.device_mesh.get_local_rank(mesh_dim)
        chunk = math.ceil((end - start) / world)
        start, end = min(start + rank * chunk, end), min(start + (rank + 1) * chunk, end)
    local = param.to_local()
    expected = (end - start, *param.shape[1:])
    if tuple(local.shape) != expected:
        raise RuntimeError(
            f"parameter {name!r}: local shard has shape {tuple(local.shape)}, expected {expected} for rows "
            f"[{start}, {end}) of {tuple(param.shape)}; the sharding is not the torch.chunk layout assumed here"
        )
    return local, start, end


def check_writable_sharding(model: torch.nn.Module) -> None:
    """Refuse to write weights into an FSDP2 module whose parameters are currently unsharded (e.g. the
    root after a forward): those are all-gathered copies that the next reshard() would discard."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed has no FSDP modules either
        return
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        if plain:
            raise RuntimeError(
                f"parameter {plain[0]!r} of an FSDP2 model is unsharded right now; call model.reshard() "
                "before loading or initialising weights"
            )
