"""Rank-0 reporting: a progress bar with ETA, the JSONL metrics log (+ TensorBoard), and curve plots."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("fasttrain")


class TrainingPeakMemory:
    """Peak allocated GPU memory of training steps only: per log interval (``peak_mem_gib``) and over a span.

    torch.cuda.max_memory_allocated is the peak since the last reset: read alone, every row would show the
    process's all-time peak (reference precompute and evaluations included) and could never go down. This
    resets it when training starts, after each report and after each pause (evaluation, checkpoint), and
    keeps the larger of the readings taken at pause and at report. Because it resets the process-wide counter,
    code timing a TrainLoop reads the loop's training peak here (``span_peak_gib``), not from torch.cuda.
    None on devices other than CUDA.
    """

    def __init__(self, device, cuda=None):
        self.device = device
        self.cuda = cuda if cuda is not None else torch.cuda  # a stand-in in tests
        self.on = device.type == "cuda"
        self.interval_bytes = 0
        self.span_bytes = 0

    def start(self) -> None:
        """Training (re)starts: what ran before does not count."""
        if self.on:
            self.cuda.reset_peak_memory_stats(self.device)

    def pause(self) -> None:
        """Training pauses (an evaluation or a checkpoint follows): keep the training peak so far."""
        if self.on:
            reading = self.cuda.max_memory_allocated(self.device)
            self.interval_bytes = max(self.interval_bytes, reading)
            self.span_bytes = max(self.span_bytes, reading)

    def report(self) -> float | None:
        """The interval's training peak in GiB; the next interval starts from zero."""
        if not self.on:
            return None
        self.pause()
        peak, self.interval_bytes = self.interval_bytes, 0
        self.start()
        return peak / 2**30

    def start_span(self) -> None:
        """Benchmarks: start measuring the training peak over the steps that follow."""
        self.span_bytes = 0
        self.start()

    def span_peak_bytes(self) -> int | None:
        """The training peak since ``start_span`` (or since this object was made)."""
        if not self.on:
            return None
        self.pause()
        return self.span_bytes

    def span_peak_gib(self) -> float | None:
        peak = self.span_peak_bytes()
        return None if peak is None else peak / 2**30


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="[fasttrain %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """One line redrawn in place on a terminal; on a pipe (CI, log files) one line per update."""

    def __init__(self, total: int, enabled: bool, width: int = 24):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, info: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        filled = int(self.width * done / max(self.total, 1))
        line = (
            f"step {done}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{_fmt_seconds(elapsed)}<{_fmt_seconds(eta)} {info}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to TensorBoard if asked
    for and installed (said once either way)."""

    def __init__(self, path: Path, tensorboard: bool):
        self.path = path
        self.file = open(path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
                log.info("TensorBoard logs in %s", path.parent / "tensorboard")
            else:
                log.info("tensorboard is not installed; metrics go to %s only", path)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: Path, png_path: Path) -> bool:
    """Loss, reward accuracy and margin vs step (train and eval); False if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("matplotlib is not installed; skipping %s", png_path.name)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(
        axes, ("loss", "rewards/accuracies", "rewards/margins"), ("loss", "reward accuracy", "reward margin")
    ):
        if train:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1)
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label="held-out", lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True
