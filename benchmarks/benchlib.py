"""The parts every benchmark script shares, once: model shapes, the random HF model writer, synthetic
Step-DPO data, device helpers (sync, name, timing, peak memory, MFU's denominator), versions and commit,
text and Markdown tables, and the trainer's loop timed over a run.

``benchmarks/`` is not a package: a script run from it finds this module by name (its folder is first on
``sys.path``; tests/cli_runner.load_benchmark and gpu_check_stages.py put it there). Every script imports it before
``fasttrain`` (isort keeps it there: a third-party name sorts before first-party ones), and importing it puts this
checkout's ``fasttrain`` and ``fasttrain_kernels`` first on ``sys.path`` (the GPU machine has no install), so every
benchmark measures the code next to it.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "kernels", REPO):  # before any script imports fasttrain: this checkout's, not an install
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
GIB = 2**30
# AdamW + clip_grad_norm_ memory traffic per parameter, the optimizer step's cost model (project_72b, roofline):
# fused fp32 AdamW reads p, g, m, v and writes p, m, v (28 B) + clip 12 B; torch's for-each update 72 B + 12;
# compact state (fasttrain.compact_adamw, eager ops counted per element in DESIGN §6.9) 442 B + clip on bf16
# grads 6; a fused kernel would move ~24.
OPTIMIZER_BYTES = {"fused": 40.0, "foreach": 84.0, "compact": 448.0}
# The cards the projections know: (name, GiB the driver reports, device-to-device copy GB/s). H100: copy measured
# on the H100 (DESIGN §6.8); H200: 143,771 MiB and ~4.3 TB/s copy (device library KINDS.md, 2026-10-28).
CARDS = {"h100": ("H100", 79.6, 3000.0), "h200": ("H200", 140.4, 4300.0)}
DEMO = REPO / "fasttrain" / "demo"
DEMO_TOKENIZER = DEMO / "model"  # 1,024 tokens: a random model's vocabulary may be larger, never smaller
# Nothing a benchmark runs may reach the network (the GPU machine has none: a hub lookup only waits for a
# timeout); progress bars and tokenizer threads would only add noise to the logs.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# Model shapes: HF config.json fields (random weights: only the shapes matter)
# ----------------------------------------------------------------------------------------------
def _shape(model_type, vocab, hidden, ffn, layers, heads, kv_heads, eps, rope_theta, tied, max_positions) -> dict:
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "rms_norm_eps": eps, "rope_theta": rope_theta, "tie_word_embeddings": tied,
            "max_position_embeddings": max_positions}


SHAPES = {
    "qwen2-1.5b": _shape("qwen2", 151936, 1536, 8960, 28, 12, 2, 1e-6, 1e6, True, 32768),
    "llama3-8b": _shape("llama", 128256, 4096, 14336, 32, 32, 8, 1e-5, 5e5, False, 8192),
    "qwen2-72b": _shape("qwen2", 152064, 8192, 29568, 80, 64, 8, 1e-6, 1e6, False, 32768),
    # --smoke sizes (the demo tokenizer's 1,024 tokens); tiny-llama: the Llama path (untied head, Llama RoPE)
    "tiny": _shape("qwen2", 1024, 128, 384, 2, 4, 2, 1e-6, 1e4, True, 2048),
    "tiny-llama": _shape("llama", 1024, 128, 384, 2, 4, 2, 1e-5, 5e5, False, 2048),
}


def model_config(shape: str, **fields):
    """fasttrain's ModelConfig of ``SHAPES[shape]``, with ``fields`` replaced (e.g. num_hidden_layers)."""
    from fasttrain.model.config import ModelConfig

    return ModelConfig.from_hf_dict({**SHAPES[shape], **fields}, f"{shape} (built in)")


def describe_shape(shape: str) -> str:
    s = SHAPES[shape]
    return (f"{shape} shape ({s['model_type']}: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, "
            f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} KV, FFN {s['intermediate_size']}, vocab "
            f"{s['vocab_size']}{', tied' if s['tie_word_embeddings'] else ''})")


def write_random_model(out: Path, shape: str, seed: int, tokenizer=None, device="cpu",
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """A model of ``SHAPES[shape]`` with transformers' own random init (seeded), saved in ``dtype`` with its
    config.json and the tokenizer (default: the demo tokenizer), so that every trainer loads the same initial
    weights from disk. ``device``: where the weights are drawn (a 1.5B init takes minutes on a CPU). Returns
    the parameter count, checked against fasttrain's count of the shape."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fasttrain.model.config import num_params

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    fields = dict(SHAPES[shape])
    if len(tokenizer) > fields["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the {shape} vocab "
                         f"{fields['vocab_size']}")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != num_params(model_config(shape)):
        raise RuntimeError(f"built {n_params} parameters, fasttrain counts {num_params(model_config(shape))} "
                           f"for the {shape} shape")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return n_params


# ----------------------------------------------------------------------------------------------
# Synthetic Step-DPO data (DESIGN §7.5)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lengths:
    """Token lengths of synthetic pairs: templated prompt ~U[prompt], chosen and rejected step ~U[step] each;
    ``real_estimate``: log-normal with the real set's estimated means (~260 / ~45 tokens), clipped to
    [8, max_prompt] / [1, 256]. ``max_length`` (data.max_length) caps prompt + step."""

    prompt: tuple[int, int] = (96, 512)
    step: tuple[int, int] = (16, 128)
    real_estimate: bool = False
    max_prompt: int = 512
    max_length: int | None = None

    def draw_prompt(self, rng: np.random.Generator) -> int:
        if self.real_estimate:
            return int(np.clip(rng.lognormal(math.log(230), 0.5), 8, self.max_prompt))
        return int(rng.integers(self.prompt[0], self.prompt[1] + 1))

    def draw_step(self, rng: np.random.Generator, prompt_len: int = 0) -> int:
        if self.real_estimate:
            n = int(np.clip(rng.lognormal(math.log(36), 0.65), 1, 256))
        else:
            n = int(rng.integers(self.step[0], self.step[1] + 1))
        return n if self.max_length is None else min(n, self.max_length - prompt_len)


LENGTHS = {  # bench_step's --lengths
    "design": Lengths(max_length=1024),
    "real-estimate": Lengths(real_estimate=True, max_length=1024),
    "smoke": Lengths((24, 128), (4, 32), max_length=1024),  # a quarter of the design: the CPU attention is slow
}


def synthetic_groups(n_pairs: int, vocab: int, lengths: Lengths, share: float = 0.0, seed: int = 0):
    """``n_pairs`` pairs of random token ids as prompt groups (records ``synthetic:i``). With probability
    ``share`` a pair reuses the previous pair's prompt and rejected step with another chosen step, as rows of
    the real set do; 0: every pair is its own prompt group."""
    from fasttrain.packing import build_groups

    rng = np.random.default_rng(seed)
    prompts, chosens, rejecteds = [], [], []
    for i in range(n_pairs):
        if i and rng.random() < share:
            prompts.append(prompts[-1])
            rejecteds.append(rejecteds[-1])
        else:
            prompts.append(rng.integers(0, vocab, size=lengths.draw_prompt(rng), dtype=np.int64))
            rejecteds.append(rng.integers(0, vocab, size=lengths.draw_step(rng, len(prompts[-1])), dtype=np.int64))
        chosens.append(rng.integers(0, vocab, size=lengths.draw_step(rng, len(prompts[-1])), dtype=np.int64))
    return build_groups(prompts, chosens, rejecteds, [f"synthetic:{i}" for i in range(n_pairs)], range(n_pairs))


def synthetic_records(tokenizer, template: str, n: int, lengths: Lengths, seed: int) -> list[dict]:
    """``n`` Step-DPO records (text) whose templated prompt and steps have ``lengths`` in tokens: the text is
    made of words the tokenizer encodes as one token each."""
    from fasttrain.data import render_prompt

    words = single_token_words(tokenizer, seed)
    rng = np.random.default_rng([seed, 1])
    head, tail = "Let's think step by step.\nStep 1:", "\nStep 2:"
    overhead = len(tokenizer.encode(render_prompt(template, "", head + tail, tokenizer), add_special_tokens=False))

    def text(k: int) -> str:
        return "".join(words[j] for j in rng.integers(0, len(words), size=k))

    records = []
    for i in range(n):
        body = max(2, lengths.draw_prompt(rng) - overhead)
        problem = int(body * 0.6)
        chosen = rejected = ""
        while chosen == rejected:
            chosen, rejected = text(lengths.draw_step(rng)), text(lengths.draw_step(rng))
        records.append({"id": f"synthetic-{i}", "prompt": text(problem).lstrip(),
                        "initial_reason_steps": head + text(body - problem) + tail,
                        "chosen": chosen, "rejected": rejected})
    return records


def single_token_words(tokenizer, seed: int, want: int = 2000) -> list[str]:
    """Words ' abc' that the tokenizer encodes as exactly one token."""
    words: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(tokenizer)).tolist():
        text = tokenizer.decode([i])
        body = text[1:]
        if (len(text) >= 3 and text[0] == " " and body.isascii() and body.isalpha()
                and tokenizer.encode(text, add_special_tokens=False) == [i]):
            words.append(text)
            if len(words) >= want:
                break
    if len(words) < 50:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words (' abc'); synthetic data needs "
                         "at least 50: pass --data")
    return words


# ----------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def reset_peak_memory(device) -> None:
    """Starts CUDA's peak-memory counter afresh (initialising CUDA first: before that, resetting raises)."""
    if torch.device(device).type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    """torch.cuda.max_memory_allocated in GiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / GIB if torch.device(device).type == "cuda" else None


class Clock:
    """CUDA events on a GPU, perf_counter on a CPU; elapsed() after sync()."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def time_phases(run: Callable[[Callable[[], None]], None], clock: Clock, warmup: int, reps: int,
                n_phases: int) -> list[float]:
    """Median seconds of each phase; ``run(mark)`` calls mark() before the first and after every phase."""
    samples: list[list[float]] = [[] for _ in range(n_phases)]
    for i in range(warmup + reps):
        marks: list = []
        run(lambda marks=marks: marks.append(clock.mark()))
        clock.sync()
        if len(marks) != n_phases + 1:
            raise RuntimeError(f"expected {n_phases + 1} marks, got {len(marks)}")
        if i >= warmup:
            for k in range(n_phases):
                samples[k].append(clock.elapsed(marks[k], marks[k + 1]))
    return [statistics.median(s) for s in samples]


def median_seconds(fn: Callable[[], object], device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls (CUDA events on a GPU, wall clock on a CPU)."""
    def run(mark):
        mark()
        fn()
        mark()

    return time_phases(run, Clock(device), warmup, reps, 1)[0]


def mfu_peak(device, tflops: float | None = None):
    """The MFU denominator (fasttrain.flops.PeakFlops): ``tflops`` (--peak-tflops, e.g. the ceiling gpu_check.py
    measured on the card), else fasttrain.flops' value for the card; None off CUDA (no MFU on a CPU)."""
    from fasttrain.flops import PeakFlops, peak_bf16_tflops

    if torch.device(device).type != "cuda":
        return None
    return PeakFlops(tflops, "--peak-tflops") if tflops else peak_bf16_tflops(torch.cuda.get_device_name(device))


def add_peak_tflops_flag(parser) -> None:
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator in TFLOP/s, e.g. the ceiling measured on this card (default: "
                             "fasttrain.flops.peak_bf16_tflops for the card)")


# ----------------------------------------------------------------------------------------------
# The trainer's loop, timed
# ----------------------------------------------------------------------------------------------
class CountingFlops:
    """The run's FlopModel, also summing what the trainer asks it for: FLOPs (a live reference's forward
    included); tokens, LM-head rows, attended keys and micro-batches of the training passes."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.flops, self.tokens, self.micro_batches, self.rows, self.attended = 0.0, 0, 0, 0, 0

    def batch(self, tokens: int, attended: int, lm_rows: int, train: bool) -> float:
        flops = self.inner.batch(tokens, attended, lm_rows, train)
        self.flops += flops
        if train:
            self.tokens += tokens
            self.micro_batches += 1
            self.rows += lm_rows
            self.attended += attended
        return flops


class Rows:
    """The loop's metrics logger: its training rows, kept in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        if row["split"] == "train":
            self.rows.append(row)


def build_run(cfg, dist_info, groups, num_steps: int, load_weights: Callable, model_cfg=None):
    """The trainer's assembly (fasttrain.assembly.synthetic_inputs + build_run) over ready-made prompt groups and
    ``num_steps`` optimizer steps; ``load_weights(model)`` puts the initial weights in place (random ones for
    ``model_cfg``, or a checkpoint's). Returns (the run, seconds of its reference precompute or None for a
    live reference): the clock starts once the policy's weights are in place and one untimed no-grad pass over
    the precompute's first micro-batch has run (CUDA context, cuBLAS handles, Triton compilation), so the timed
    precompute is the steady pass."""
    from fasttrain import assembly
    from fasttrain.plan import plan_inference
    from fasttrain.reference_logps import compute_pair_logps

    device, precompute = dist_info.device, cfg.loss.reference == "precompute"
    inputs = assembly.synthetic_inputs(cfg, dist_info, groups, num_steps)
    n_pairs = sum(g.num_pairs for g in groups)
    t0 = []

    def init_weights(model) -> None:
        load_weights(model)
        if precompute:
            first = plan_inference(groups, 1, cfg.train.tokens_per_micro_batch)[0][:1]
            compute_pair_logps(model, first, n_pairs, device)
        sync(device)
        t0.append(time.perf_counter())

    run = assembly.build_run(cfg, dist_info, inputs, model_cfg, init_weights)  # a live copy gets the same weights
    sync(device)
    return run, (time.perf_counter() - t0[0] if precompute else None)


@dataclass
class TimedSteps:
    steps: int
    seconds: float
    pairs: int
    tokens: int  # processed: the packed stream, each shared prompt once
    micro_batches: int
    flops: float
    peak_gib: float | None  # the loop's training peak over the timed steps (CUDA only)
    losses: list[float]  # per logged step; a skipped (non-finite) step adds a nan
    grad_norms: list[float]


def time_steps(run, warmup: int, plans=None) -> tuple[TimedSteps, object]:
    """The trainer's own loop (TrainLoop.from_run) over ``run``'s plans (or ``plans``): the first ``warmup`` steps
    untimed (kernel choice and compilation, allocator growth, AdamW state), the rest between two device
    synchronisations. Returns what was timed, and the loop (for more steps)."""
    from fasttrain.trainer import TrainLoop

    plans = run.inputs.plans if plans is None else plans
    rows, counter = Rows(), CountingFlops(run.flop_model)
    loop = TrainLoop.from_run(run, logger=rows, flop_model=counter)
    loop.run(plans[:warmup], len(plans))
    sync(run.dist.device)
    loop.peak_memory.start_span()  # the loop resets CUDA's peak counter itself: read its training peak
    counter.reset()
    rows.rows.clear()
    t0 = time.perf_counter()
    loop.run(plans[warmup:], len(plans))
    sync(run.dist.device)
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in rows.rows] + [float("nan")] * len(loop.skipped_steps)
    return TimedSteps(len(plans) - warmup, seconds, sum(p.num_pairs for p in plans[warmup:]), counter.tokens,
                      counter.micro_batches, counter.flops, loop.peak_memory.span_peak_gib(), losses,
                      [r["grad_norm"] for r in rows.rows]), loop


# ----------------------------------------------------------------------------------------------
# Environment, versions, commit
# ----------------------------------------------------------------------------------------------
def one_process_env(**extra: str) -> dict:
    """The environment for a child process that is its own one-rank run of this checkout, offline."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return {**env, **OFFLINE_ENV, **extra}


def versions(*names: str, check_import: bool = False) -> dict[str, str]:
    """Installed version of each distribution; ``check_import``: also import it, so that a broken install
    (a CUDA extension built for another torch) is reported, not raised."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
            continue
        if check_import:
            try:
                importlib.import_module(name.replace("-", "_"))
            except Exception as e:  # noqa: BLE001 -- reported, not raised
                out[name] += f", not importable ({first_line(e, 80)})"
    return out


def resolve_commit(arg: str | None = None) -> tuple[str, str] | None:
    """(commit, where it came from): ``arg`` (--commit), else the file benchmarks/COMMIT, else git (read-only;
    "+uncommitted" when tracked files differ); None when nothing names it (no .git travels to the device)."""
    if arg:
        return arg, "--commit"
    file = REPO / "benchmarks" / "COMMIT"
    if file.is_file() and file.read_text().strip():
        return file.read_text().strip(), "benchmarks/COMMIT"
    if not ((REPO / ".git").exists() and shutil.which("git")):
        return None
    try:
        head, dirty = (subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
                       for a in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+uncommitted" if dirty else ""), "git"


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def first_line(e: BaseException, limit: int = 300) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def fmt(x, spec: str = ".3g", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def int_range(text: str) -> tuple[int, int]:
    """argparse type for MIN,MAX with 0 < MIN <= MAX."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN,MAX (integers)") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < MIN <= MAX")
    return lo, hi


def _cell(x) -> str:
    return "–" if x is None else str(x)


def text_table(rows: list[list], right: bool = False) -> str:
    """Aligned columns; the first row is the header. A row shorter than the header runs free after its first
    cell (a status line). ``right``: the columns after the first right-aligned (numbers)."""
    rows = [[_cell(c) for c in row] for row in rows]
    n = len(rows[0])
    full = [row for row in rows if len(row) == n]
    widths = [max(len(row[0]) for row in rows)] + [max(len(row[i]) for row in full) for i in range(1, n)]

    def line(row):
        if len(row) < n:
            return "  ".join([row[0].ljust(widths[0])] + row[1:])
        return "  ".join(c.rjust(w) if right and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row).rstrip() for row in rows)


def markdown_table(rows: list[list]) -> str:
    """A Markdown table; the first row is the header, shorter rows are padded with empty cells."""
    def cells(row):
        return [_cell(c).replace("|", "\\|").replace("\n", " ") for c in row] + [""] * (len(rows[0]) - len(row))

    return "\n".join(["| " + " | ".join(cells(rows[0])) + " |", "|" + "---|" * len(rows[0])]
                     + ["| " + " | ".join(cells(row)) + " |" for row in rows[1:]])
