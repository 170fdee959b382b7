"""Fault injection for the reliability tests, driven by the FASTTRAIN_FAULT environment variable.

    FASTTRAIN_FAULT="kill:rank=1:step=6"   rank 1 SIGKILLs itself in the middle of step 6 (after its
                                           first micro-batch), on the first attempt only (torchrun
                                           restarts set TORCHELASTIC_RESTART_COUNT > 0)
    FASTTRAIN_FAULT="nan:steps=3,4"        the loss of steps 3 and 4 becomes NaN on rank 0

Unset (the normal case), every check is a cheap no-op.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Faults:
    kill_rank: int | None = None
    kill_step: int | None = None
    nan_steps: frozenset[int] = field(default_factory=frozenset)

    @staticmethod
    def from_env() -> Faults:
        spec = os.environ.get("FASTTRAIN_FAULT", "")
        if not spec:
            return Faults()
        kind, *parts = spec.split(":")
        args = dict(p.split("=", 1) for p in parts)
        if kind == "kill":
            return Faults(kill_rank=int(args["rank"]), kill_step=int(args["step"]))
        if kind == "nan":
            return Faults(nan_steps=frozenset(int(s) for s in args["steps"].split(",")))
        raise ValueError(f"FASTTRAIN_FAULT={spec!r}: expected kill:rank=R:step=S or nan:steps=S1,S2")

    def maybe_kill(self, step: int, rank: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if self.kill_step == step and self.kill_rank == rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss_scale(self, step: int, rank: int, micro_batch: int) -> float | None:
        return float("nan") if step in self.nan_steps and rank == 0 and micro_batch == 0 else None
