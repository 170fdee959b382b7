"""Process group setup and FSDP2 wrapping.

One code path for every world size: without torchrun we start a one-rank gloo group, so the model
is always an FSDP2 module (same dtype handling, same state-dict code) and tests of "N ranks equal one
process" compare like with like.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fasttrain.errors import PeerFailed, UserError

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend(cpu_offload: bool) -> str:
    """NCCL on GPUs; with CPU offload also gloo, because the offloaded gradients live on the CPU and
    clip_grad_norm_'s all-reduce of their norms is a CPU collective (torchtitan does the same)."""
    if not torch.cuda.is_available():
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def init_distributed(timeout_minutes: float = 30.0, cpu_offload: bool = False) -> DistInfo:
    """The process group and this rank's device. ``cpu_offload``: the optimizer will run on the CPU (FSDP2
    CPUOffloadPolicy), which needs CPU collectives and this rank's share of the cores."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = _backend(cpu_offload)
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        rank, world, local = 0, 1, 0
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(_backend(cpu_offload), store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" or cpu_offload:
        # N ranks on one CPU: give each its share of the cores; oversubscribed OpenMP threads spin
        # (we saw sys time near user time with 2 ranks x 2 threads on 2 cores). With CPU offload on GPUs
        # the AdamW step runs here, and torchrun's OMP_NUM_THREADS=1 would leave it on one core per rank.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, device)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys scoped to this torchrun attempt.

    After a torchrun restart (--max-restarts) the workers of the new attempt rendezvous again through
    the same agent store; we saw a restarted gloo worker read its peer's address from the previous
    attempt and fail with "connection refused". A prefix per attempt keeps the attempts apart.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent_hosts_store), timeout=timeout)
    return dist.PrefixStore(f"fasttrain/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shard_model(
    model: torch.nn.Module, compute_dtype: torch.dtype, frozen: bool = False, cpu_offload: bool = False
) -> None:
    """fully_shard every decoder block, then the root (embedding, final norm, LM head).

    A trainable model's parameters stay fp32 (the master copy the optimizer updates; a frozen one is stored
    in ``compute_dtype`` already); FSDP casts the gathered copy to ``compute_dtype`` and reduces gradients in fp32
    (DESIGN §6.3: bf16 masters would drop lr-5e-7 updates).
    A trainable model keeps the root and the last block gathered after forward: backward needs them first,
    so gathering them twice would be wasted communication. A ``frozen`` model (the live reference) never runs
    backward, and only backward frees what forward keeps (FSDP2's root reshards in backward alone), so
    every module of it reshards after its forward: otherwise each GPU would hold a gathered copy of the
    embedding, LM head and last block for the whole run (~6.7 GB in bf16 at 72B).
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    extra = {}
    if cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        extra["offload_policy"] = CPUOffloadPolicy()
    layers = model.model.layers
    for i, block in enumerate(layers):
        keep = i == len(layers) - 1 and not frozen
        fully_shard(block, mp_policy=policy, reshard_after_forward=not keep, **extra)
    # None: FSDP2's root default (kept after forward); True: resharded as soon as forward is done.
    fully_shard(model, mp_policy=policy, reshard_after_forward=True if frozen else None, **extra)


def reshard_all(model: torch.nn.Module) -> None:
    """Free the gathered parameters that a forward without backward leaves behind.

    The root and the last block keep their unsharded parameters after forward (backward would need
    them first). After a no-grad pass (reference precompute, evaluation) nothing will free them,
    and while they are held ``model.parameters()`` yields those plain tensors, not the sharded
    DTensors the optimizer must update.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Failing together
# ----------------------------------------------------------------------------------------------
# A rank that raises while the others wait in a collective leaves them to die at that collective with
# "Connection closed by peer" and a traceback each (gloo), or to hang until the timeout (NCCL). So every
# stretch of work that can fail on some ranks only (rank 0 checks the output directory, tokenizes first,
# writes an export; each rank reads its own rows of the weights) ends in ``agree``: one small all-gather in
# which each rank says whether it failed, after which every rank raises, or none does. Such a stretch must
# itself contain no collective, or a failing rank would skip it and the others would wait there.
def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank passes an error, else return on every rank.

    The failing rank re-raises its own error (a UserError is printed by rank 0 as one line; anything else
    keeps its traceback); the others raise PeerFailed with the lowest failing rank's message.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    mine = None if error is None else (dist.get_rank(), isinstance(error, UserError), _one_line(error))
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    failures = [r for r in reports if r is not None]
    if error is not None:
        error.agreed_by_all_ranks = True  # fasttrain.cli: every rank knows, so only rank 0 prints it
        raise error
    if failures:
        rank, is_user_error, message = failures[0]
        if is_user_error:
            raise PeerFailed(message, exit_code=2)
        raise PeerFailed(f"rank {rank} failed: {message}", exit_code=1)


@contextmanager
def all_ranks_agree() -> Iterator[None]:
    """``with all_ranks_agree(): ...``: the block's failure on any rank is raised on every rank (see agree)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks, then it is re-raised
        agree(e)
    else:
        agree(None)


def main_first(fn: Callable[[], T], is_main: bool) -> T:
    """Run ``fn`` on rank 0, then (when it succeeded everywhere) on the other ranks; a failure on rank 0 stops
    every rank at once. For work whose first run fills a cache that the others then read."""
    result = None
    with all_ranks_agree():
        if is_main:
            result = fn()
    with all_ranks_agree():
        if not is_main:
            result = fn()
    return result


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
