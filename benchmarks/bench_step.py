"""Training-step benchmark: tokens/s, pairs/s, MFU and peak memory of the real trainer step.

What runs is the trainer's own code: ``fasttrain.trainer.TrainLoop`` (micro-batches through
``run_micro_batch``, gradient clipping, the one all-reduce + host sync per step, AdamW, LR schedule)
on an FSDP2 model built as ``fasttrain.assembly.build_sharded_model`` builds it (meta device, fp32
master weights, ``fully_shard`` per block + root with ``MixedPrecisionPolicy(bf16, fp32)``,
activation checkpointing per block), world size 1. The only difference: weights are drawn at random
on the device (std 0.02, norms 1, biases 0) instead of read from a checkpoint, so no 32 GB file is
needed. The reference is either the trainer's precomputed table (``compute_pair_logps``, one
forward pass over the data before training, not timed) or its live frozen FSDP copy.

Data: Step-DPO-shaped random token pairs, seeded. ``--lengths design`` (default): prompt ~ U[96, 512],
steps ~ U[16, 128] tokens (DESIGN §7; means ~304 / ~72). ``--lengths real-estimate``: log-normal
with means ~260 / ~45 (DESIGN §7's estimate of Math-Step-DPO-10K), clipped to [8, 512] / [1, 256].
``--lengths smoke`` (with ``--smoke``): U[24, 128] / U[4, 32], for a quick CPU run.
``--share F``: a pair reuses the previous pair's prompt and rejected step with probability F (rows of
the real set do); 0 by default, so every pair is its own prompt group.

MFU = FlopModel FLOPs / (wall time x the card's dense bf16 peak: ``--peak-tflops`` (gpu_check.py passes the one
it measured), else ``fasttrain.flops.peak_bf16_tflops``'s value for the card, whose source is printed), with
  FLOPs = 6 P_blocks T + 12 L (n_heads d_head) A + 6 N V D      (training)
        + (2 P_blocks T + 4 L (n_heads d_head) A + 2 N V D)      (live reference forward)
T = real tokens in the packed stream (a shared prompt once), A = attended keys summed over queries,
N = LM-head rows (step tokens), P_blocks = decoder-block parameters. Activation-checkpoint recompute,
the duplicated prompt K/V and the optimizer are not counted (not needed work). Wall time: ``--steps``
optimizer steps after ``--warmup`` untimed ones, between two CUDA synchronisations; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (read through the loop's
TrainingPeakMemory: the loop resets CUDA's counter per log interval).

    python benchmarks/bench_step.py --shape qwen2-1.5b --reference both
    python benchmarks/bench_step.py --shape llama3-8b --reference precomputed       # layers reduced to fit
    python benchmarks/bench_step.py --shape llama3-8b --layers 8 --profile [--profile-out top15.txt]
    python benchmarks/bench_step.py --smoke                                          # tiny, CPU, seconds

Every run prints a table and one ``RESULT {json}`` line per reference mode (for RESULTS.md and tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from fasttrain import distributed as fdist
from fasttrain.attention import resolve_backend
from fasttrain.assembly import build_sharded_model
from fasttrain.config import RunConfig
from fasttrain.errors import UserError
from fasttrain.faults import Faults
from fasttrain.flops import FlopModel, PeakFlops, peak_bf16_tflops
from fasttrain_kernels import resolve_lm_head
from fasttrain.model.config import ModelConfig, num_params
from fasttrain.packing import PromptGroup, build_groups
from fasttrain.reference_logps import LiveReference, PrecomputedReference, compute_pair_logps
from fasttrain.plan import plan_inference, plan_steps
from fasttrain.trainer import TrainLoop, build_optimizer

# HF config.json fields of the shapes (random weights; only the shapes matter).
SHAPES = {
    "qwen2-1.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
                   "max_position_embeddings": 32768},
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "max_position_embeddings": 8192},
    "tiny": {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
             "rope_theta": 1e4, "tie_word_embeddings": True, "max_position_embeddings": 2048},
    # the Llama path (untied LM head, Llama RoPE) at a CPU size: gpu_check.py's rehearsal of the 8B stage
    "tiny-llama": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                   "rope_theta": 5e5, "tie_word_embeddings": False, "max_position_embeddings": 2048},
}
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Synthetic Step-DPO data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthModel:
    kind: str  # "design" | "real-estimate" | "smoke"
    max_prompt: int = 512  # data.max_prompt_length
    max_length: int = 1024  # data.max_length (prompt + step)

    def prompt(self, rng: np.random.Generator) -> int:
        if self.kind == "design":
            return int(rng.integers(96, 513))
        if self.kind == "smoke":  # a quarter of the design lengths: the CPU reference attention is slow
            return int(rng.integers(24, 129))
        return int(np.clip(rng.lognormal(math.log(230), 0.5), 8, self.max_prompt))  # mean ~260

    def step(self, rng: np.random.Generator, prompt_len: int) -> int:
        if self.kind == "design":
            n = int(rng.integers(16, 129))
        elif self.kind == "smoke":
            n = int(rng.integers(4, 33))
        else:
            n = int(np.clip(rng.lognormal(math.log(36), 0.65), 1, 256))  # mean ~45
        return min(n, self.max_length - prompt_len)


def synthetic_groups(n_pairs: int, vocab: int, lengths: LengthModel, share: float, seed: int) -> list[PromptGroup]:
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(0, vocab, size=n, dtype=np.int64)
    prompts, chosens, rejecteds = [], [], []
    for i in range(n_pairs):
        if i and rng.random() < share:  # another chosen step for the previous prompt and rejected step
            prompts.append(prompts[-1])
            rejecteds.append(rejecteds[-1])
        else:
            prompts.append(tokens(lengths.prompt(rng)))
            rejecteds.append(tokens(lengths.step(rng, len(prompts[-1]))))
        chosens.append(tokens(lengths.step(rng, len(prompts[-1]))))
    return build_groups(prompts, chosens, rejecteds, [f"synthetic:{i}" for i in range(n_pairs)], range(n_pairs))


# ----------------------------------------------------------------------------------------------
# Model: assembly.build_sharded_model with random weights instead of a checkpoint
# ----------------------------------------------------------------------------------------------
def build_random_sharded(model_cfg: ModelConfig, cfg: RunConfig, dist_info: fdist.DistInfo, backend: str,
                         trainable: bool, seed: int):
    """assembly.build_sharded_model (the trainer's) with random weights drawn on the device in place of a
    checkpoint; the same seed gives the same weights, so a live reference starts equal to the policy."""
    return build_sharded_model(cfg, dist_info, backend, trainable, model_cfg=model_cfg,
                               init_weights=lambda model: model.init_weights(seed, on_device=True))


def activation_bytes_per_token_layer(cfg: ModelConfig, checkpointing: bool) -> int:
    """What one decoder block keeps for backward per token (bf16 tensors, fp32 RMSNorm statistics):
    with checkpointing only the block input; without, roughly every intermediate of the block."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    full = 2 * (4 * D + 3 * q + 6 * kv + 4 * F) + 2 * (4 * D + 4 * D + 2 * D)
    return 2 * D if checkpointing else full


def auto_layers(shape: dict, live: bool, checkpointing: bool, token_budget: int, total_bytes: int) -> int:
    """Most layers (<= the shape's) whose training state + activations fit ~92% of the card.

    Per parameter: fp32 master + grad + AdamW m, v (16 B; the fused CUDA AdamW needs no temporaries), and
    a live reference's bf16 copy (2 B). Fixed: the root's gathered bf16 embedding/LM head, its bf16 grad
    and fp32 reduce copy (8 B/param), the [rows, V] fp32 logits of the torch LM head (x3 for softmax and
    its gradient; ~35% of a micro-batch's rows are step tokens), one block's recompute, 4 GiB slack.
    An estimate: ``--layers`` overrides it; an OOM names the flag.
    """
    full = ModelConfig.from_hf_dict(shape)
    one = dataclasses.replace(full, num_hidden_layers=1)
    zero = dataclasses.replace(full, num_hidden_layers=0)
    per_param = 16 + (2 if live else 0)
    root_params = num_params(zero)
    layer_params = num_params(one) - root_params
    act_full = activation_bytes_per_token_layer(full, False) * token_budget
    fixed = (root_params * (per_param + 8 + (2 if live else 0)) + 12 * int(0.35 * token_budget) * full.vocab_size
             + (act_full if checkpointing else 0) + 4 * GIB)
    per_layer = layer_params * per_param + activation_bytes_per_token_layer(full, checkpointing) * token_budget
    fit = int((0.92 * total_bytes - fixed) // per_layer)
    return max(1, min(full.num_hidden_layers, fit))


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
class CountingFlops:
    """FlopModel that also sums what the trainer asks it for (FLOPs; tokens of training passes)."""

    def __init__(self, inner: FlopModel):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.flops = 0.0
        self.tokens = 0
        self.micro_batches = 0

    def batch(self, tokens: int, attended: int, lm_rows: int, train: bool) -> float:
        flops = self.inner.batch(tokens, attended, lm_rows, train)
        self.flops += flops
        if train:
            self.tokens += tokens
            self.micro_batches += 1
        return flops


class Rows:
    """The TrainLoop's metrics logger: keeps the rows in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        self.rows.append(row)


@dataclass
class Measurement:
    reference: str
    steps: int
    seconds: float
    tokens: int
    pairs: int
    micro_batches: int
    flops: float
    peak_mem_gib: float | None
    loss: float
    precompute_seconds: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    def mfu(self, peak: PeakFlops | None) -> float | None:
        return self.flops / self.seconds / (peak.tflops * 1e12) if peak and peak.tflops else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def no_op(*_args) -> dict:
    return {}


def make_loop(cfg, dist_info, model, reference, counter, rows):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params, total_steps=10**6)  # schedule length: irrelevant to speed
    return TrainLoop(cfg, dist_info, model, optimizer, scheduler, params, reference, counter, rows, Faults())


def run_steps(loop: TrainLoop, plans) -> None:
    loop.run(plans, total_steps=10**9, run_evals=no_op, checkpoint=no_op, export=no_op)


def measure(args, cfg, dist_info, model, reference, ref_name: str, counter: CountingFlops, plans,
            precompute_seconds: float | None) -> Measurement:
    device = dist_info.device
    rows = Rows()
    loop = make_loop(cfg, dist_info, model, reference, counter, rows)
    warm, timed = plans[: args.warmup], plans[args.warmup : args.warmup + args.steps]
    run_steps(loop, warm)  # first steps: cuBLAS/Triton autotuning, allocator growth, AdamW state
    sync(device)
    loop.peak_memory.start_span()  # the loop resets CUDA's peak counter itself: read its training peak
    counter.reset()
    rows.rows.clear()
    t0 = time.perf_counter()
    run_steps(loop, timed)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = loop.peak_memory.span_peak_gib()
    if args.profile:
        table = profile_steps(loop, plans[args.warmup + args.steps :], device)
        print(f"\nprofile ({ref_name} reference), {table}")
        if args.profile_out:
            with open(args.profile_out, "a") as f:
                f.write(f"bench_step {args.shape}, {ref_name} reference: {table}\n")
    losses = [r["loss"] for r in rows.rows]
    return Measurement(ref_name, len(timed), seconds, counter.tokens, sum(p.num_pairs for p in timed),
                       counter.micro_batches, counter.flops, peak,
                       float(np.mean(losses)) if losses else float("nan"), precompute_seconds)


def profile_steps(loop: TrainLoop, plans, device: torch.device) -> str:
    """Runs ``plans`` under torch.profiler; returns the top-15 table (by self CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_steps(loop, plans)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{len(plans)} step(s), top 15 by {sort}:\n" + prof.key_averages().table(sort_by=sort, row_limit=15)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's, fewer if memory demands)")
    ap.add_argument("--reference", choices=("precomputed", "live", "both"), default="both")
    ap.add_argument("--global-batch-pairs", type=int, default=128)
    ap.add_argument("--tokens-per-micro-batch", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--lengths", choices=("design", "real-estimate", "smoke"), default=None,
                    help="token length distribution (default: design; smoke with --smoke)")
    ap.add_argument("--share", type=float, default=0.0, help="probability a pair shares the previous prompt")
    ap.add_argument("--attention", default="auto", help="model.attention_backend")
    ap.add_argument("--lm-head", default="auto", help="model.lm_head_impl")
    ap.add_argument("--no-activation-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="model.compile: torch.compile per decoder block "
                    "(compiled during the warmup steps, which are not timed)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over --profile-steps more steps, top-15 "
                    "kernels")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled with --profile (default 2)")
    ap.add_argument("--profile-out", help="with --profile: also append the top-15 tables to this file")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="MFU denominator in TFLOP/s, e.g. the ceiling measured on this card (default: "
                         "fasttrain.flops.peak_bf16_tflops for the card)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on the CPU, 4 pairs/step of short sequences, 1 warmup + 2 timed steps")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.smoke:  # the other flags (--reference, --profile, --lengths ...) still apply
        args.shape, args.global_batch_pairs, args.tokens_per_micro_batch = "tiny", 4, 2048
        args.warmup, args.steps = 1, 2
        args.lengths = args.lengths or "smoke"
    args.lengths = args.lengths or "design"
    return args


def run_config(args, device: torch.device) -> RunConfig:
    cfg = RunConfig()
    cfg.model.attention_backend = args.attention
    cfg.model.lm_head_impl = args.lm_head
    cfg.model.activation_checkpointing = not args.no_activation_checkpointing
    cfg.model.compile = args.compile
    cfg.model.compute_dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cfg.train.global_batch_pairs = args.global_batch_pairs
    cfg.train.tokens_per_micro_batch = args.tokens_per_micro_batch
    cfg.train.progress_bar = cfg.train.tensorboard = cfg.train.plot = False
    cfg.train.seed = args.seed
    return cfg


def choose_layers(args, device: torch.device) -> tuple[int, str]:
    full = SHAPES[args.shape]["num_hidden_layers"]
    if args.layers:
        return args.layers, "" if args.layers == full else f"set by --layers (the shape has {full})"
    if device.type != "cuda":
        return full, ""
    live = args.reference in ("live", "both")
    n = auto_layers(SHAPES[args.shape], live, not args.no_activation_checkpointing, args.tokens_per_micro_batch,
                    torch.cuda.get_device_properties(device).total_memory)
    return n, "" if n == full else f"reduced from {full} to fit one GPU's memory (estimate; --layers overrides)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA: the smoke run is the CPU path
    dist_info = fdist.init_distributed()
    if dist_info.world_size != 1:
        raise SystemExit("bench_step measures one process on one device; run it without torchrun")
    device = dist_info.device
    torch.manual_seed(args.seed)
    cfg = run_config(args, device)
    backend = resolve_backend(cfg.model.attention_backend, device, getattr(torch, cfg.model.compute_dtype))
    lm_head = resolve_lm_head(cfg.model.lm_head_impl, device)
    layers, layers_note = choose_layers(args, device)
    model_cfg = ModelConfig.from_hf_dict({**SHAPES[args.shape], "num_hidden_layers": layers})
    cfg.data.max_length, cfg.data.max_prompt_length = 1024, 512

    n_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    n_pairs = args.global_batch_pairs * n_steps  # fresh pairs every step
    groups = synthetic_groups(n_pairs, model_cfg.vocab_size, LengthModel(args.lengths), args.share, args.seed)
    plans = plan_steps(groups, args.global_batch_pairs, 1, args.tokens_per_micro_batch, args.seed, 0, n_steps)

    peak = mfu_peak(args, device)
    header = describe(args, device, backend, lm_head, cfg, model_cfg, layers_note, groups, plans, peak)
    print(header, flush=True)
    results, rc = [], 0
    try:
        model = build_random_sharded(model_cfg, cfg, dist_info, backend, trainable=True, seed=args.seed)
        counter = CountingFlops(FlopModel.of(model_cfg))
        refs = ("precomputed", "live") if args.reference == "both" else (args.reference,)
        for ref_name in refs:
            reference, pre_s = make_reference(ref_name, model_cfg, cfg, dist_info, backend, lm_head, model, groups,
                                              args)
            results.append(measure(args, cfg, dist_info, model, reference, ref_name, counter, plans, pre_s))
            del reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except torch.cuda.OutOfMemoryError as e:  # what was measured before it is still reported below
        print(f"\nout of GPU memory with {layers} layers ({e.__class__.__name__}); pass a smaller --layers, "
              "--tokens-per-micro-batch, or --reference precomputed", file=sys.stderr)
        rc = 3
    except UserError as e:  # check_memory_plan: the training state alone cannot fit
        print(f"\nbench_step: {e}", file=sys.stderr)
        return 2
    finally:
        fdist.cleanup()
    if not results:
        return rc
    print(format_results(results, peak, device.type == "cuda"))
    summary = {"shape": args.shape, "layers": layers, "layers_note": layers_note,
               "params": num_params(model_cfg), "device": device_name(device), "torch": torch.__version__,
               "attention": backend, "lm_head": lm_head, "compute_dtype": cfg.model.compute_dtype,
               "activation_checkpointing": cfg.model.activation_checkpointing, "compile": cfg.model.compile,
               "global_batch_pairs": args.global_batch_pairs, "tokens_per_micro_batch": args.tokens_per_micro_batch,
               "lengths": args.lengths, "share": args.share,
               "mfu_peak_tflops": peak.tflops if peak else None, "mfu_peak_source": peak.source if peak else None}
    records = [result_record(summary, m, peak) for m in results]
    for rec in records:
        print("RESULT " + json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return rc


def mfu_peak(args, device: torch.device) -> PeakFlops | None:
    """The MFU denominator: --peak-tflops, else the per-card table; None on the CPU (no MFU there)."""
    if device.type != "cuda":
        return None
    if args.peak_tflops:
        return PeakFlops(args.peak_tflops, "--peak-tflops")
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def make_reference(name, model_cfg, cfg, dist_info, backend, lm_head, policy, groups, args):
    """(reference, seconds of the precompute pass or None): what trainer.train() would use."""
    if name == "live":
        cfg.loss.reference = "live"
        frozen = build_random_sharded(model_cfg, cfg, dist_info, backend, trainable=False, seed=args.seed)
        return LiveReference(frozen), None
    cfg.loss.reference = "precompute"
    n_pairs = sum(g.num_pairs for g in groups)
    sync(dist_info.device)
    t0 = time.perf_counter()
    table = compute_pair_logps(policy, plan_inference(groups, 1, cfg.train.tokens_per_micro_batch)[0], n_pairs,
                               dist_info.device)
    sync(dist_info.device)
    return PrecomputedReference(table), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe(args, device, backend, lm_head, cfg, model_cfg, layers_note, groups, plans, peak) -> str:
    n_pairs = sum(g.num_pairs for g in groups)
    tokens = sum(g.num_tokens for g in groups)
    prompt_tok = sum(len(g.prompt_ids) for g in groups)
    micro = [len(p.micro_batches[0]) for p in plans]
    n_cont = max(1, sum(len(g.continuations) for g in groups))
    lines = [
        f"bench_step: {args.shape}, {model_cfg.num_hidden_layers} layers"
        + (f" ({layers_note})" if layers_note else "")
        + f", {num_params(model_cfg) / 1e9:.3f}B params, random weights",
        (f"  device {device_name(device)}, torch {torch.__version__}; attention {backend}, LM head {lm_head}, "
         f"compute {cfg.model.compute_dtype}, fp32 master weights + AdamW (FSDP2, world 1), activation "
         f"checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}, per-block torch.compile "
         f"{'on' if cfg.model.compile else 'off'}"),
        (f"  data: {args.lengths} lengths, share {args.share}: {n_pairs} pairs, mean prompt "
         f"{prompt_tok / len(groups):.0f} tokens, mean step {(tokens - prompt_tok) / n_cont:.0f}; "
         f"{args.global_batch_pairs} pairs/step, {args.tokens_per_micro_batch} tokens/micro-batch, "
         f"{np.mean(micro):.1f} micro-batches/step; {args.warmup} warmup + {args.steps} timed steps"),
        (f"  MFU = FlopModel FLOPs / (wall s x {peak_text(peak)});  FLOPs = 6 P_blocks T + 12 L (heads d_head) A "
         "+ 6 N V D  (+ a third of that for the live reference's forward); T real tokens, A attended keys, N step "
         "rows"),
    ]
    return "\n".join(lines)


def peak_text(peak: PeakFlops | None) -> str:
    if peak is None:
        return "the card's bf16 peak: none on the CPU, so no MFU"
    if peak.tflops is None:
        return f"no known peak, so no MFU: {peak.source}"
    return f"{peak.tflops:g} TFLOP/s, {peak.source}"


def result_record(summary: dict, m: Measurement, peak: PeakFlops | None) -> dict:
    return {**summary, "reference": m.reference, "timed_steps": m.steps, "seconds": m.seconds,
            "tokens": m.tokens, "pairs": m.pairs, "micro_batches": m.micro_batches, "flops": m.flops,
            "tokens_per_s": m.tokens_per_s, "pairs_per_s": m.pairs_per_s, "mfu": m.mfu(peak),
            "peak_mem_gib": m.peak_mem_gib, "loss": m.loss, "precompute_seconds": m.precompute_seconds}


def format_results(results: list[Measurement], peak: PeakFlops | None, on_cuda: bool) -> str:
    head = f"{'reference':<12} {'step s':>8} {'tokens/s':>10} {'pairs/s':>9} {'MFU':>7} {'peak GiB':>9} {'loss':>8}"
    lines = ["", head, "-" * len(head)]
    for m in results:
        mfu = m.mfu(peak)
        lines.append(
            f"{m.reference:<12} {m.seconds / m.steps:>8.3f} {m.tokens_per_s:>10.0f} {m.pairs_per_s:>9.2f} "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>7} "
            f"{'n/a' if m.peak_mem_gib is None else f'{m.peak_mem_gib:.1f}':>9} {m.loss:>8.4f}")
    if not on_cuda:
        lines.append("(MFU and peak memory: n/a on the CPU)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
