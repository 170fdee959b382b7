"""fasttrain vs TRL's DPOTrainer (DESIGN §7.6): same model, data, global batch, learning rate, beta and precision,
one GPU, one invocation.

    python benchmarks/bench_vs_trl.py                                    # the H100 comparison: 2 + 16 steps
    python benchmarks/bench_vs_trl.py --variants trl_default,fasttrain_live   # a subset
    python benchmarks/bench_vs_trl.py --smoke --in-process               # tiny model on a CPU (~40 s)

What runs, in this order (``--variants`` picks a subset):

  trl_default          TRL DPOTrainer as it comes: fp32 weights + bf16 autocast, live reference (a second
                       fp32 copy of the model, loaded by TRL itself)
  trl_precompute       the same with ``precompute_ref_log_probs=True`` (one reference pass before training)
  trl_bf16             bf16 weights (and so bf16 AdamW state), live reference: the low-memory way people run
                       TRL; it drops lr-5e-7 updates (DESIGN §6.3), so it is a memory/speed reference point only
  trl_liger            trl_default + ``use_liger_kernel=True`` (CUDA and liger-kernel only; otherwise reported as
                       skipped). In TRL 1.16 this applies Liger's layer kernels (RMSNorm, SwiGLU, RoPE) only:
                       DPOTrainer forces Liger's fused linear cross-entropy off, because it patches the model with
                       its own chunked log-prob LM head (trl/trainer/dpo_trainer.py 1.16.0; every TRL variant has it)
  fasttrain_precompute the trainer itself (fasttrain.assembly.build_run, then its TrainLoop),
                       ``loss.reference=precompute`` (fp32 master weights, bf16 compute)
  fasttrain_live       the same, ``loss.reference=live``

Weights: the model directory is written once (default: a random model of benchlib's qwen2-1.5b shape, bf16
safetensors; fp32 variants upcast exactly) and each variant loads it afresh, in its own Python process
(``--worker``), so that peak memory is its own and no library state (Liger's patches, accelerate's singletons)
leaks into the next; ``--in-process`` runs them here instead (the CPU smoke test).

Data: Step-DPO records (DESIGN §2), a file (``--data``) or benchlib's synthetic records (DESIGN §7.5). fasttrain
tokenizes them once and TRL is handed those ids (``prompt_ids``/``chosen_ids``/``rejected_ids``): its own
preprocessing would append EOS to each step, which Step-DPO does not do. Every trainer trains ``warmup + --steps``
optimizer steps on the first ``(warmup + steps) x global batch`` pairs (``--steps 0``: one epoch of all pairs).
Six variants of the 1.5B model should fit one 10-minute device command (an estimate: not yet run on a GPU).

Timing: the clock starts after ``--warmup-steps`` optimizer steps and stops after the last, each with a device
synchronisation; loading, construction and data preparation are never timed. The reference precompute is timed
alone, after one untimed forward of its first batch on each side, and "amortised" pairs/s charges it to
``--recipe-epochs`` epochs: ``1 / (1/r + t_pre / (n_pre * epochs))`` (live variants: amortised = r).

Metrics: pairs/s; seq tok/s (each pair's prompt+chosen and prompt+rejected tokens, the same for every variant);
proc tok/s (what the trainer ran: TRL both sequences, padded; fasttrain its packed stream, each prompt once);
MFU (FlopModel FLOPs of the processed tokens, DESIGN §7.3, over ``--peak-tflops`` or the card's value, named in
each variant's settings as mfu_peak; TRL's second copy of each prompt is counted, padding is not); peak GiB over
the whole variant; first loss (policy == reference: ln 2 within ``--loss-tol``; "sane" also needs every logged
loss and gradient norm finite); fasttrain / TRL ratios.

TRL settings (trl 1.16.0; every other field is TRL's default, e.g. optim=adamw_torch_fused, weight_decay=0,
max_grad_norm=1, sdpa attention, padded batches: ``padding_free=True`` is refused by TRL 1.16):
per_device_train_batch_size=--batch, gradient_accumulation_steps=--grad-accum (global batch = fasttrain's
train.global_batch_pairs), learning_rate, beta, max_length as given; lr_scheduler_type=cosine with
warmup_steps=ceil(0.1 x steps) (fasttrain's shape); gradient_checkpointing=True; bf16=True on CUDA (autocast over
fp32 weights); logging_steps=1; logging_nan_inf_filter=False (a non-finite loss must show); report_to=none,
save_strategy=no, eval_strategy=no, disable_tqdm=True. fasttrain settings: its config defaults except the
comparison's (global batch, lr, beta, lengths, compute dtype, epochs=1, warmup_ratio 0.1, log_every=1,
--tokens-per-micro-batch); any other key with --fasttrain-set section.key=value.

Wheels for the GPU machine (no network there): ``benchmarks/fetch_wheels.sh`` downloads trl, datasets,
liger-kernel and the dependencies the device image lacks into ``.whl/`` and prints the install line.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import torch

REPO = benchlib.REPO
TRL_VARIANTS = ("trl_default", "trl_precompute", "trl_bf16", "trl_liger")
FASTTRAIN_VARIANTS = ("fasttrain_precompute", "fasttrain_live")
ALL_VARIANTS = TRL_VARIANTS + FASTTRAIN_VARIANTS
LIVE_REFERENCE = {"trl_default", "trl_bf16", "trl_liger", "fasttrain_live"}
PRECOMPUTE = {"trl_precompute", "fasttrain_precompute"}
# fasttrain variant -> the TRL variant of the same precision and reference kind (the memory target)
MEMORY_TARGET = {"fasttrain_live": "trl_default", "fasttrain_precompute": "trl_precompute"}
TARGET_PAIRS_PER_S = 60.0
TRL_VERSION = "1.16."  # the DPOTrainer internals the hooks below rely on (setup.py's bench extra pins it)
VERSIONED = ("torch", "transformers", "trl", "datasets", "accelerate", "liger-kernel", "triton")


class BenchError(Exception):
    """A problem with the arguments, model or data: one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# What is benchmarked
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Defaults for the flags the user did not give (the full benchmark, or --smoke)."""

    shape: str  # benchlib.SHAPES
    pairs: int
    batch: int
    grad_accum: int
    max_length: int
    max_prompt_length: int
    tokens_per_micro_batch: int
    warmup_steps: int
    steps: int
    prompt_tokens: tuple[int, int]  # synthetic templated-prompt length, uniform [min, max]
    step_tokens: tuple[int, int]  # synthetic chosen / rejected step length, uniform [min, max]


FULL = Preset("qwen2-1.5b", pairs=2048, batch=8, grad_accum=2, max_length=1024, max_prompt_length=512,
              tokens_per_micro_batch=8192, warmup_steps=2, steps=16, prompt_tokens=(96, 512), step_tokens=(16, 128))
SMOKE = Preset("tiny", pairs=24, batch=4, grad_accum=2, max_length=128, max_prompt_length=96,
               tokens_per_micro_batch=512, warmup_steps=1, steps=2, prompt_tokens=(40, 80), step_tokens=(4, 16))


@dataclass
class BenchSpec:
    """Everything a variant needs; written as JSON for the worker processes."""

    model_dir: str
    tokenizer_dir: str
    data_path: str
    template: str
    num_pairs: int  # pairs handed to every trainer: total_steps x global batch, the first of the file
    batch: int
    grad_accum: int
    lr: float
    beta: float
    max_length: int
    max_prompt_length: int
    warmup_steps: int  # optimizer steps excluded from timing
    total_steps: int  # optimizer steps trained (warm-up included)
    precision: str  # bf16 (CUDA: bf16 compute over fp32 master weights) | fp32
    seed: int
    tokens_per_micro_batch: int
    fasttrain_overrides: list[str]  # section.key=value applied last (--fasttrain-set)
    recipe_epochs: float
    loss_tol: float
    work_dir: str
    peak_tflops: float | None = None  # MFU denominator (--peak-tflops); None: fasttrain.flops' value for the card

    @property
    def global_batch(self) -> int:
        return self.batch * self.grad_accum

    @property
    def timed_steps(self) -> int:
        return self.total_steps - self.warmup_steps


@dataclass
class VariantResult:
    name: str
    status: str  # ok | skipped | failed
    reason: str = ""
    device: str = ""
    timed_steps: int = 0
    timed_pairs: int = 0
    timed_s: float = 0.0
    pairs_per_s: float | None = None
    seq_tokens_per_s: float | None = None
    processed_tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    padding_fraction: float | None = None  # TRL: pad tokens / padded batch tokens in the timed steps
    first_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    all_finite: bool | None = None
    sane: bool | None = None
    precompute_s: float | None = None
    precompute_pairs: int | None = None
    amortised_pairs_per_s: float | None = None
    settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkCount:
    """What the timed steps computed: pairs, sequence tokens, processed tokens, model FLOPs."""

    pairs: int
    seq_tokens: int
    processed_tokens: int
    flops: float
    padded_tokens: int | None = None  # TRL only


# ----------------------------------------------------------------------------------------------
# What both sides share
# ----------------------------------------------------------------------------------------------
def load_pairs(spec: BenchSpec, tokenizer):
    """fasttrain's tokenization of the data file, cut to the first ``spec.num_pairs`` pairs."""
    from fasttrain.data import TokenizedPairs, prepare_dataset

    data = prepare_dataset(spec.data_path, tokenizer, template=spec.template, max_length=spec.max_length,
                           max_prompt_length=spec.max_prompt_length)
    if len(data) < spec.num_pairs:
        raise BenchError(f"{spec.data_path}: {len(data)} usable pairs, the run needs {spec.num_pairs}")
    n = spec.num_pairs
    return TokenizedPairs(data.prompts[:n], data.chosens[:n], data.rejecteds[:n], data.record_ids[:n], data.stats)


def finish_result(result: VariantResult, spec: BenchSpec, work: WorkCount, timed_s: float, device,
                  losses: list[float], grad_norms: list[float], peak_gib: float | None) -> VariantResult:
    """Rates, MFU, peak memory and the loss sanity check from what a variant measured. ``peak_gib``: peak
    allocated over the whole variant (model loading, reference precompute and training), CUDA only."""
    result.timed_steps, result.timed_pairs, result.timed_s = spec.timed_steps, work.pairs, timed_s
    result.pairs_per_s = work.pairs / timed_s
    result.seq_tokens_per_s = work.seq_tokens / timed_s
    result.processed_tokens_per_s = work.processed_tokens / timed_s
    if work.padded_tokens:
        result.padding_fraction = 1.0 - work.processed_tokens / work.padded_tokens
    if device.type == "cuda":
        peak = benchlib.mfu_peak(device, spec.peak_tflops)
        result.mfu = work.flops / timed_s / (peak.tflops * 1e12) if peak.tflops else None
        result.settings["mfu_peak"] = f"{peak.tflops} TFLOP/s ({peak.source})"
        result.peak_gib = peak_gib
    result.losses = losses
    result.first_loss = losses[0] if losses else None
    result.all_finite = bool(losses) and all(math.isfinite(x) for x in losses + grad_norms)
    result.sane = bool(result.all_finite and abs(result.first_loss - math.log(2)) <= spec.loss_tol)
    result.amortised_pairs_per_s = result.pairs_per_s
    if result.precompute_s is not None and result.precompute_pairs:
        per_pair = result.precompute_s / result.precompute_pairs / spec.recipe_epochs
        result.amortised_pairs_per_s = 1.0 / (1.0 / result.pairs_per_s + per_pair)
    return result


def skip_reason(name: str, device) -> str | None:
    """Why a variant cannot run here (reported as skipped), or None."""
    if name in TRL_VARIANTS and importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install 'fasttrain[bench]', or benchmarks/fetch_wheels.sh on the GPU machine)"
    if name == "trl_liger":
        if device.type != "cuda":
            return "use_liger_kernel needs CUDA (Triton GPU kernels)"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MicroBatchStats:
    seq_lengths: list[int]  # real tokens of each sequence (chosen half, then rejected half)
    completion_tokens: int  # step tokens, = LM-head rows TRL's fused head computes
    padded_tokens: int  # batch x padded length


class CollatorRecorder:
    """Wraps TRL's collator and records each micro-batch's real lengths (CPU tensors: no device sync).

    Installed after the trainer is built, so the reference precompute's batches are not recorded; with
    dataloader_num_workers=0 the training batches are collated in the order the steps consume them."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[MicroBatchStats] = []

    def __call__(self, features, *args, **kwargs):
        out = self.inner(features, *args, **kwargs)
        self.batches.append(MicroBatchStats(
            seq_lengths=[int(x) for x in out["attention_mask"].sum(dim=1).tolist()],
            completion_tokens=int(out["completion_mask"].sum()),
            padded_tokens=int(out["input_ids"].numel()),
        ))
        return out


def trl_work(spec: BenchSpec, batches: list[MicroBatchStats], live_reference: bool) -> WorkCount:
    timed = batches[spec.warmup_steps * spec.grad_accum: spec.total_steps * spec.grad_accum]
    if len(timed) != spec.timed_steps * spec.grad_accum:
        raise RuntimeError(f"recorded {len(batches)} TRL micro-batches, expected "
                           f"{spec.total_steps * spec.grad_accum} ({spec.total_steps} steps x {spec.grad_accum})")
    from fasttrain.flops import FlopModel
    from fasttrain.model.config import ModelConfig

    fm = FlopModel.of(ModelConfig.from_model_dir(spec.model_dir))
    pairs = seq_tokens = padded = 0
    flops = 0.0
    for mb in timed:
        tokens = sum(mb.seq_lengths)
        attended = sum(n * (n + 1) // 2 for n in mb.seq_lengths)
        flops += fm.batch(tokens, attended, mb.completion_tokens, True)
        if live_reference:
            flops += fm.batch(tokens, attended, mb.completion_tokens, False)
        pairs += len(mb.seq_lengths) // 2
        seq_tokens += tokens
        padded += mb.padded_tokens
    return WorkCount(pairs, seq_tokens, seq_tokens, flops, padded)


def make_trl_trainer_class():
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class BenchDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with two benchmark hooks; the training loop is TRL's own."""

        precompute_s: float = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # The dataset already holds fasttrain's token ids (the same ids for every variant); TRL's own
            # preprocessing would tokenize the same way but append EOS after each step.
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._warm_up_reference(dataset, batch_size)
            benchlib.sync(self.args.device)
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            benchlib.sync(self.args.device)
            self.precompute_s += time.perf_counter() - t0
            return out

        def _warm_up_reference(self, dataset, batch_size):
            """One untimed reference forward on the first batch (CUDA context, cuBLAS handles, kernel choice),
            as fasttrain gets one and as the training steps have their untimed warm-up."""
            examples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
            batch = {k: v.to(self.accelerator.device) for k, v in self.data_collator(examples).items()}
            self.compute_ref_log_probs(self.ref_model or self.model, batch)

    class StepClock(TrainerCallback):
        """Synchronised timestamps at the end of every optimizer step; the logged loss and grad norm."""

        def __init__(self, device):
            self.device = device
            self.step_end: list[float] = []
            self.losses: list[float] = []
            self.grad_norms: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            benchlib.sync(self.device)
            self.step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # a training-step log (the end-of-training summary has train_loss)
                self.losses.append(float(logs["loss"]))
                if "grad_norm" in logs and logs["grad_norm"] is not None:
                    self.grad_norms.append(float(logs["grad_norm"]))

    return BenchDPOTrainer, StepClock


def run_trl(spec: BenchSpec, name: str) -> VariantResult:
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig

    if not trl.__version__.startswith(TRL_VERSION):
        raise BenchError(f"this benchmark hooks into trl {TRL_VERSION}x's DPOTrainer (_prepare_dataset, "
                         f"_precompute_ref_logps, compute_ref_log_probs); found trl {trl.__version__}")
    transformers.logging.set_verbosity_warning()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    benchlib.reset_peak_memory(device)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
    pairs = load_pairs(spec, tokenizer)
    dataset = Dataset.from_dict({
        "prompt_ids": [p.tolist() for p in pairs.prompts],
        "chosen_ids": [c.tolist() for c in pairs.chosens],
        "rejected_ids": [r.tolist() for r in pairs.rejecteds],
    })
    weights_dtype = torch.bfloat16 if name == "trl_bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=weights_dtype)
    precompute = name in PRECOMPUTE
    args = DPOConfig(
        output_dir=str(Path(spec.work_dir) / name / "trl_output"), per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=spec.grad_accum, learning_rate=spec.lr, beta=spec.beta,
        max_length=spec.max_length, num_train_epochs=1, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.1 * spec.total_steps), gradient_checkpointing=True, bf16=spec.precision == "bf16",
        use_cpu=device.type == "cpu",  # transformers refuses bf16 autocast on a CPU unless told so
        precompute_ref_log_probs=precompute, use_liger_kernel=name == "trl_liger", logging_steps=1,
        logging_nan_inf_filter=False, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=spec.seed)
    trainer_cls, clock_cls = make_trl_trainer_class()
    clock = clock_cls(device)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # one printed dict per step; the clock keeps what we need
    recorder = CollatorRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()

    if len(clock.step_end) != spec.total_steps:
        raise RuntimeError(f"TRL ran {len(clock.step_end)} optimizer steps, expected {spec.total_steps}")
    timed_s = clock.step_end[-1] - clock.step_end[spec.warmup_steps - 1]
    result = VariantResult(name, "ok", device=benchlib.device_name(device), versions=benchlib.versions(*VERSIONED))
    if precompute:
        result.precompute_s, result.precompute_pairs = trainer.precompute_s, len(dataset)
    result.settings = {
        "weights": str(weights_dtype).removeprefix("torch."), "bf16_autocast": args.bf16,
        "reference": "precompute" if precompute else "live", "use_liger_kernel": args.use_liger_kernel,
        "optim": str(args.optim), "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
        "global_batch": spec.global_batch,
    }
    work = trl_work(spec, recorder.batches, live_reference=name in LIVE_REFERENCE)
    peak = benchlib.peak_memory_gib(device)  # never reset
    result = finish_result(result, spec, work, timed_s, device, clock.losses, clock.grad_norms, peak)
    del trainer, model
    return result


# ----------------------------------------------------------------------------------------------
# fasttrain
# ----------------------------------------------------------------------------------------------
def fasttrain_config(spec: BenchSpec, reference: str, out_dir: Path):
    """The run config: fasttrain's defaults (so the benchmark follows the trainer's), the comparison's
    settings, then the user's --fasttrain-set overrides; checked by fasttrain's own validation."""
    from fasttrain.config import load_config

    ours = {
        "model.path": spec.model_dir, "model.tokenizer": spec.tokenizer_dir,
        "model.compute_dtype": "bfloat16" if spec.precision == "bf16" else "float32",
        "data.train": spec.data_path, "data.template": spec.template, "data.max_length": spec.max_length,
        "data.max_prompt_length": spec.max_prompt_length,
        "loss.beta": repr(spec.beta), "loss.reference": reference,
        "train.output_dir": out_dir, "train.epochs": 1, "train.global_batch_pairs": spec.global_batch,
        "train.tokens_per_micro_batch": spec.tokens_per_micro_batch, "train.lr": repr(spec.lr),
        "train.warmup_ratio": 0.1, "train.seed": spec.seed, "train.log_every": 1, "train.progress_bar": "false",
        "train.tensorboard": "false", "train.plot": "false", "train.save_final": "false",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in ours.items()] + list(spec.fasttrain_overrides))
    cfg.validate()
    return cfg


def sequence_tokens(plans) -> int:
    """Tokens of each planned pair's two sequences, prompt+chosen and prompt+rejected (one rank)."""
    return sum(2 * len(g.prompt_ids) + len(g.continuations[pr.chosen]) + len(g.continuations[pr.rejected])
               for plan in plans for groups in plan.micro_batches[0] for g in groups for pr in g.pairs)


def show_fasttrain_log() -> None:
    """fasttrain's own INFO lines (backends, reference pass) on stderr, without turning on every library's
    INFO logging as a root-logger setup would. Worker processes only: in process (tests), logging is left as
    the host set it up."""
    log = logging.getLogger("fasttrain")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fasttrain %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_fasttrain(spec: BenchSpec, name: str) -> VariantResult:
    """The trainer itself: benchlib.build_run (fasttrain.assembly.build_run) on the first ``spec.num_pairs`` pairs,
    then its TrainLoop, timed after the warm-up steps."""
    import torch.distributed as dist

    from fasttrain import distributed as fdist
    from fasttrain.assembly import groups_of, load_tokenizer
    from fasttrain.model.hf_checkpoint import load_hf_weights

    reference = "precompute" if name in PRECOMPUTE else "live"
    cfg = fasttrain_config(spec, reference, Path(spec.work_dir) / name)
    owns_group = not dist.is_initialized()
    dist_info = fdist.init_distributed()
    try:
        if dist_info.world_size != 1:
            raise BenchError("the fasttrain variants run on one GPU: do not start this benchmark under torchrun")
        device = dist_info.device
        benchlib.reset_peak_memory(device)
        data = load_pairs(spec, load_tokenizer(spec.tokenizer_dir))
        run, precompute_s = benchlib.build_run(cfg, dist_info, groups_of(data), spec.total_steps,
                                               lambda model: load_hf_weights(model, spec.model_dir))
        # The loop resets CUDA's peak counter per log interval: the variant's peak is the larger of what came
        # before it (model building, precompute) and the loop's own training peak.
        before_loop = benchlib.peak_memory_gib(device)
        timed, loop = benchlib.time_steps(run, spec.warmup_steps)
        result = VariantResult(name, "ok", device=benchlib.device_name(device),
                               versions=benchlib.versions(*VERSIONED))
        if reference == "precompute":
            result.precompute_s, result.precompute_pairs = precompute_s, len(data)
        plans = run.inputs.plans
        result.settings = {
            "master_weights": "float32", "reference": reference, "attention_backend": run.inputs.backend,
            "lm_head_impl_resolved": run.inputs.lm_head, "global_batch": spec.global_batch,
            "micro_batches_per_step": [p.num_micro_batches for p in plans],
            "optimizer": type(run.optimizer).__name__ + (" (fused)" if run.optimizer.defaults.get("fused") else ""),
            "config": cfg.to_dict(),
        }
        work = WorkCount(timed.pairs, sequence_tokens(plans[spec.warmup_steps:]), timed.tokens, timed.flops)
        peak = max(before_loop, timed.peak_gib) if device.type == "cuda" else None
        result = finish_result(result, spec, work, timed.seconds, device, timed.losses, timed.grad_norms, peak)
        del loop, run
        return result
    finally:
        if owns_group:
            fdist.cleanup()


# ----------------------------------------------------------------------------------------------
# Running variants (in this process or one worker process each)
# ----------------------------------------------------------------------------------------------
def run_variant(spec: BenchSpec, name: str) -> VariantResult:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    reason = skip_reason(name, device)
    if reason:
        return VariantResult(name, "skipped", reason=reason)
    try:
        return run_trl(spec, name) if name in TRL_VARIANTS else run_fasttrain(spec, name)
    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others' numbers
        traceback.print_exc()
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        return VariantResult(name, "failed", reason=f"{type(e).__name__}: {first}"[:300])
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_in_worker(spec_path: Path, name: str) -> VariantResult:
    result_path = spec_path.parent / f"result-{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path),
           "--result", str(result_path)]
    proc = subprocess.run(cmd, env=benchlib.one_process_env(), check=False)  # a failed worker is reported
    if not result_path.is_file():
        return VariantResult(name, "failed", reason=f"worker exited with code {proc.returncode} and no result "
                                                    "(its output is above)")
    return VariantResult(**json.loads(result_path.read_text()))


def worker_main(name: str, spec_path: str, result_path: str) -> int:
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    show_fasttrain_log()
    result = run_variant(spec, name)
    Path(result_path).write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSummary:
    source: str
    pairs: int
    mean_prompt: float
    mean_chosen: float
    mean_rejected: float
    truncations: str


def summarize_data(spec: BenchSpec, source: str) -> DataSummary:
    from transformers import AutoTokenizer

    pairs = load_pairs(spec, AutoTokenizer.from_pretrained(spec.tokenizer_dir))
    def mean(seqs) -> float:
        return sum(len(s) for s in seqs) / len(seqs)

    return DataSummary(source, len(pairs), mean(pairs.prompts), mean(pairs.chosens), mean(pairs.rejecteds),
                       pairs.stats.summary())


def results_table(results: list[VariantResult]) -> list[list[str]]:
    rows = [["variant", "status", "pairs/s", "amort.", "seq tok/s", "proc tok/s", "MFU", "peak GiB", "pad",
             "first loss", "sane", "precomp s"]]
    def num(x, spec):
        return benchlib.fmt(x, spec, "n/a")

    for r in results:
        if r.status != "ok":
            rows.append([r.name, f"{r.status}: {r.reason}"])  # a short row: printed as one line
            continue
        rows.append([
            r.name, "ok", num(r.pairs_per_s, ".2f"), num(r.amortised_pairs_per_s, ".2f"),
            num(r.seq_tokens_per_s, ",.0f"), num(r.processed_tokens_per_s, ",.0f"),
            "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", num(r.peak_gib, ".1f"),
            "–" if r.padding_fraction is None else f"{100 * r.padding_fraction:.0f}%",
            num(r.first_loss, ".4f"), "yes" if r.sane else "NO", benchlib.fmt(r.precompute_s, ".1f"),
        ])
    return rows


def ratio_table(results: list[VariantResult]) -> list[list[str]]:
    ok = {r.name: r for r in results if r.status == "ok"}
    trl = [n for n in TRL_VARIANTS if n in ok]
    fast = [n for n in FASTTRAIN_VARIANTS if n in ok]
    if not trl or not fast:
        return []
    rows = [["fasttrain / TRL (pairs/s; amortised)"] + trl]
    for f in fast:
        rows.append([f] + [f"{ok[f].pairs_per_s / ok[t].pairs_per_s:.2f}x; "
                           f"{ok[f].amortised_pairs_per_s / ok[t].amortised_pairs_per_s:.2f}x" for t in trl])
    return rows


def target_lines(results: list[VariantResult]) -> list[str]:
    ok = {r.name: r for r in results if r.status == "ok"}
    lines = []
    for fast, trl in MEMORY_TARGET.items():
        if fast in ok and trl in ok and ok[fast].peak_gib is not None and ok[trl].peak_gib is not None:
            f, t = ok[fast], ok[trl]
            met = f.pairs_per_s >= TARGET_PAIRS_PER_S and f.peak_gib <= t.peak_gib
            lines.append(f"target ({fast}): >= {TARGET_PAIRS_PER_S:.0f} pairs/s at peak <= {trl}'s "
                         f"{t.peak_gib:.1f} GiB: {f.pairs_per_s:.1f} pairs/s, {f.peak_gib:.1f} GiB -> "
                         f"{'met' if met else 'NOT met'}")
    return lines


def report_header(spec: BenchSpec, data: DataSummary, model_desc: str, results: list[VariantResult],
                  command: str) -> list[str]:
    first_ok = next((r for r in results if r.status == "ok"), None)
    versions = first_ok.versions if first_ok else benchlib.versions(*VERSIONED)
    card = first_ok.device if first_ok else "?"
    commit = benchlib.resolve_commit()
    return [
        f"date {datetime.date.today().isoformat()}, card {card}, commit {commit[0] if commit else 'unknown'}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"command: {command}",
        f"model: {model_desc}",
        (f"data: {data.source}; {data.pairs} pairs used, mean tokens prompt {data.mean_prompt:.0f} / chosen "
         f"{data.mean_chosen:.0f} / rejected {data.mean_rejected:.0f}; {data.truncations}"),
        (f"batch {spec.batch} x accumulation {spec.grad_accum} = {spec.global_batch} pairs/step, lr {spec.lr:g}, "
         f"beta {spec.beta:g}, max_length {spec.max_length}, precision {spec.precision}; {spec.total_steps} steps, "
         f"the first {spec.warmup_steps} untimed; amortised over {spec.recipe_epochs:g} epochs"),
    ]


FOOTNOTE = ("pairs/s and tok/s over the timed steps; amort. = pairs/s with the reference precompute charged to the "
            "recipe's epochs; seq tok/s: prompt+chosen and prompt+rejected, proc tok/s: what the trainer ran; MFU: "
            "FlopModel FLOPs of the processed tokens (DESIGN §7.3) / (time x the card's bf16 ceiling, each variant's "
            "mfu_peak); pad = padding share of TRL's batches; sane = losses and grad norms finite, first loss ln 2.")


def write_outputs(args, spec: BenchSpec, data: DataSummary, model_desc: str, results: list[VariantResult]) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
    header = report_header(spec, data, model_desc, results, command)
    table, ratios = results_table(results), ratio_table(results)
    print("\n" + "\n".join(header))
    print("\n" + benchlib.text_table(table, right=True))
    if ratios:
        print("\n" + benchlib.text_table(ratios, right=True))
    for line in target_lines(results):
        print(line)
    print("\n" + FOOTNOTE)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "header": header, "spec": dataclasses.asdict(spec), "data": dataclasses.asdict(data),
            "results": [dataclasses.asdict(r) for r in results]}, indent=2))
    if args.md_out:
        md = ["### fasttrain vs TRL DPOTrainer", ""] + [f"- {line}" for line in header]
        md += ["", benchlib.markdown_table(table)] + (["", benchlib.markdown_table(ratios)] if ratios else [])
        md += [""] + [f"- {line}" for line in target_lines(results)] + ["", FOOTNOTE, ""]
        Path(args.md_out).write_text("\n".join(md))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: a random Qwen2-1.5B-shaped model made here)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model's, else fasttrain's demo tokenizer)")
    p.add_argument("--data", help="Step-DPO records (JSONL / JSON / Parquet); default: synthetic (DESIGN §7)")
    p.add_argument("--template", default="qwen2-boxed", help="fasttrain prompt template (default qwen2-boxed)")
    p.add_argument("--pairs", type=int, help="synthetic pairs to make (default 2048; smoke 24)")
    p.add_argument("--prompt-tokens", type=benchlib.int_range,
                   help="synthetic templated prompt length MIN,MAX (96,512)")
    p.add_argument("--step-tokens", type=benchlib.int_range, help="synthetic step length MIN,MAX (16,128)")
    p.add_argument("--batch", type=int, help="pairs per micro-batch for TRL (default 8; smoke 4)")
    p.add_argument("--grad-accum", type=int, help="TRL's gradient accumulation (default 2); fasttrain's global batch "
                                                  "is batch x grad-accum pairs")
    p.add_argument("--lr", type=float, default=5e-7, help="learning rate (default 5e-7, the Step-DPO recipe's)")
    p.add_argument("--beta", type=float, default=0.4, help="DPO beta (default 0.4)")
    p.add_argument("--max-length", type=int, help="prompt + step tokens (default 1024; smoke 128)")
    p.add_argument("--max-prompt-length", type=int, help="fasttrain's prompt cut (default 512; smoke 96)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 16; smoke 2; 0: one epoch of all pairs)")
    p.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first (default 2; smoke 1)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA (bf16 compute, fp32 master weights), fp32 on a CPU")
    p.add_argument("--seed", type=int, default=42, help="model init, synthetic data and data order")
    p.add_argument("--tokens-per-micro-batch", type=int, help="fasttrain's token budget (default 8192; smoke 512)")
    p.add_argument("--fasttrain-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a fasttrain config override for its variants, e.g. model.lm_head_impl=triton (repeatable)")
    p.add_argument("--recipe-epochs", type=float, default=4.0, help="epochs the precompute is amortised over")
    p.add_argument("--loss-tol", type=float, default=1e-3, help="|first loss - ln 2| allowed")
    benchlib.add_peak_tflops_flag(p)
    p.add_argument("--smoke", action="store_true", help="tiny model and data (CPU: seconds)")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (no isolation of peak memory / library state)")
    p.add_argument("--work-dir", help="where the model, data and outputs go (default: a temporary directory)")
    p.add_argument("--keep-work-dir", action="store_true", help="do not delete the work directory at the end")
    p.add_argument("--json-out", help="write every result as JSON here")
    p.add_argument("--md-out", help="write a Markdown section for benchmarks/RESULTS.md here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    for f in dataclasses.fields(Preset)[1:]:  # the flags not given: the preset's (their names are the fields')
        if getattr(args, f.name) is None:
            setattr(args, f.name, getattr(preset, f.name))
    return args


def check_args(args) -> None:
    """Refuses bad flags before any work; resolves --variants (a list) and --precision."""
    from fasttrain.config import load_config

    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown or not args.variants:
        raise BenchError(f"--variants: unknown {unknown}; expected a comma list of {', '.join(ALL_VARIANTS)}")
    if args.batch < 1 or args.grad_accum < 1 or args.warmup_steps < 1 or args.steps < 0:
        raise BenchError("--batch, --grad-accum and --warmup-steps must be >= 1, --steps >= 0")
    load_config(None, list(args.fasttrain_set))  # a bad --fasttrain-set key fails here, before any work
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"


def prepare_data(args, tokenizer, work: Path) -> tuple[str, str, int]:
    """(data file, description, usable pairs): the user's file, or synthetic records written to work/."""
    if args.data:
        from fasttrain.data import prepare_dataset

        data_path = str(Path(args.data).resolve())
        return data_path, args.data, len(prepare_dataset(data_path, tokenizer, args.template, args.max_length,
                                                         args.max_prompt_length))
    lengths = benchlib.Lengths(args.prompt_tokens, args.step_tokens)
    records = benchlib.synthetic_records(tokenizer, args.template, args.pairs, lengths, args.seed)
    data_path = work / "synthetic.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(data_path), f"synthetic, seed {args.seed}", args.pairs


def count_steps(args, available: int) -> int:
    global_batch = args.batch * args.grad_accum
    total = args.warmup_steps + args.steps if args.steps else available // global_batch
    if total * global_batch > available or total <= args.warmup_steps:
        wanted = f"--steps {args.steps}" if args.steps else "one epoch"
        raise BenchError(f"{available} pairs give {available // global_batch} steps of {global_batch} pairs; the "
                         f"run needs {args.warmup_steps} warm-up + at least one timed step ({wanted})")
    return total


def check_vocab(model_dir: str, tokenizer) -> None:
    from fasttrain.assembly import check_model_source

    vocab = check_model_source(model_dir).vocab_size
    if len(tokenizer) > vocab:
        raise BenchError(f"the tokenizer has {len(tokenizer)} tokens but {model_dir}'s vocab_size is {vocab}")


def prepare(args, work: Path) -> tuple[BenchSpec, DataSummary, str]:
    """Check the flags, write the data file and the model (unless given); nothing touches a GPU here.
    Everything that can be checked is checked before the (1.5B: slow) model is written."""
    from transformers import AutoTokenizer

    check_args(args)
    if args.model:
        model_dir, tokenizer_dir = str(Path(args.model).resolve()), str(Path(args.tokenizer or args.model).resolve())
    else:
        model_dir = str(work / "model")
        tokenizer_dir = str(Path(args.tokenizer or benchlib.DEMO_TOKENIZER).resolve())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if args.model:
        check_vocab(model_dir, tokenizer)
    data_path, source, available = prepare_data(args, tokenizer, work)
    total_steps = count_steps(args, available)
    spec = BenchSpec(
        model_dir=model_dir, tokenizer_dir=model_dir if not args.model else tokenizer_dir, data_path=data_path,
        template=args.template, num_pairs=total_steps * args.batch * args.grad_accum, batch=args.batch,
        grad_accum=args.grad_accum, lr=args.lr, beta=args.beta, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, warmup_steps=args.warmup_steps, total_steps=total_steps,
        precision=args.precision, seed=args.seed, tokens_per_micro_batch=args.tokens_per_micro_batch,
        fasttrain_overrides=list(args.fasttrain_set), recipe_epochs=args.recipe_epochs, loss_tol=args.loss_tol,
        work_dir=str(work), peak_tflops=args.peak_tflops,
    )
    fasttrain_config(spec, "precompute", work / "config-check")  # config errors now, before the model is written
    if args.model:
        return spec, summarize_data(spec, source), args.model
    shape = SMOKE.shape if args.smoke else FULL.shape
    print(f"writing a random {shape} model to {model_dir} ...", flush=True)
    benchlib.write_random_model(Path(model_dir), shape, args.seed, tokenizer)  # with the tokenizer: tokenizer_dir
    desc = (f"random {benchlib.describe_shape(shape)}, seed {args.seed}; tokenizer "
            f"{args.tokenizer or 'fasttrain demo (1024 tokens)'}")
    return spec, summarize_data(spec, source), desc


def main(argv=None) -> int:
    for key, value in benchlib.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    from fasttrain.errors import ConfigError, DataError, UserError

    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_vs_trl-"))
    if args.work_dir and work.exists() and any(work.iterdir()):
        print(f"bench_vs_trl: error: --work-dir {work} is not empty", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    try:
        try:
            spec, data, model_desc = prepare(args, work)
        except (BenchError, ConfigError, DataError, UserError, ValueError) as e:
            print(f"bench_vs_trl: error: {e}", file=sys.stderr)
            return 2
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(dataclasses.asdict(spec), indent=2))
        results = []
        for name in args.variants:
            print(f"\n=== {name} ({'in process' if args.in_process else 'worker process'}) ===", flush=True)
            result = run_variant(spec, name) if args.in_process else run_in_worker(spec_path, name)
            print(f"=== {name}: {result.status}"
                  + (f", {result.pairs_per_s:.2f} pairs/s" if result.pairs_per_s else "")
                  + (f" ({result.reason})" if result.reason else ""), flush=True)
            results.append(result)
            if args.json_out:  # after every variant: a run cut short (e.g. a device time limit) keeps what it measured
                Path(args.json_out).write_text(json.dumps({"partial": True, "spec": dataclasses.asdict(spec),
                                                           "results": [dataclasses.asdict(r) for r in results]},
                                                          indent=2))
        write_outputs(args, spec, data, model_desc, results)
        bad = [r.name for r in results if r.status == "failed" or (r.status == "ok" and not r.sane)]
        if bad:
            print(f"\nfailed or not sane: {', '.join(bad)}", file=sys.stderr)
        return 1 if bad else 0
    finally:
        if not args.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
