"""The logged peak memory (``peak_mem_gib``) is each interval's training peak: not the process's all-time
peak, and not an evaluation's or checkpoint's. CUDA's allocator statistics are replaced by a stand-in that
follows the same rules (a high-water mark since the last reset), so this runs on the CPU."""
from __future__ import annotations

import torch

from fasttrain.reporting import TrainingPeakMemory

GIB = 2**30


class FakeAllocatorStats:
    """torch.cuda's max_memory_allocated / reset_peak_memory_stats semantics over a scripted allocation."""

    def __init__(self):
        self.allocated = 0
        self.high_water = 0

    def use(self, gib: float) -> None:  # memory in use rises to `gib`, then falls back
        self.high_water = max(self.high_water, int(gib * GIB))

    def max_memory_allocated(self, device=None) -> int:
        return self.high_water

    def reset_peak_memory_stats(self, device=None) -> None:
        self.high_water = self.allocated


def test_each_interval_reports_its_own_training_peak():
    stats = FakeAllocatorStats()
    stats.allocated = 2 * GIB  # weights and optimizer state stay allocated
    stats.use(30)  # the reference precompute, before training
    peak = TrainingPeakMemory(torch.device("cuda"), cuda=stats)
    peak.start()
    stats.use(10)  # step 1
    stats.use(12)  # step 2
    assert peak.report() == 12  # not the precompute's 30
    stats.use(9)  # step 3
    peak.pause()
    stats.use(40)  # an evaluation with a big batch
    peak.start()
    stats.use(8)  # step 4
    assert peak.report() == 9  # step 3's peak, kept across the pause; the evaluation's 40 not counted
    stats.use(7)
    assert peak.report() == 7  # it can go down


def test_not_on_cuda_is_none():
    peak = TrainingPeakMemory(torch.device("cpu"))
    peak.start()
    peak.pause()
    assert peak.report() is None


def test_a_span_keeps_the_training_peak_across_the_loops_own_resets():
    """What benchmarks read: the loop resets CUDA's counter per interval, the span remembers the maximum."""
    stats = FakeAllocatorStats()
    stats.allocated = 1 * GIB
    peak = TrainingPeakMemory(torch.device("cuda"), cuda=stats)
    stats.use(50)  # warmup steps, before the span
    peak.start_span()
    stats.use(11)
    assert peak.report() == 11
    stats.use(13)
    peak.report()
    stats.use(6)
    assert peak.span_peak_gib() == 13
    assert peak.span_peak_bytes() == 13 * GIB
