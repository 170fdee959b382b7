"""Training-step benchmark: tokens/s, pairs/s, MFU and peak memory of the real trainer step.

What runs is the trainer itself: the run is assembled by ``fasttrain.assembly.build_run`` (FSDP2 model on the
meta device, fp32 master weights, ``fully_shard`` per block + root with ``MixedPrecisionPolicy(bf16, fp32)``,
activation checkpointing per block, AdamW and its schedule, the reference) and trained by
``fasttrain.trainer.TrainLoop`` (micro-batches, gradient clipping, the one all-reduce + host sync per step),
world size 1. The only difference: weights are drawn at random on the device (std 0.02, norms 1, biases 0)
instead of read from a checkpoint, so no 32 GB file is needed. The reference is either the trainer's
precomputed table (one forward pass over the data before training, timed on its own) or its live frozen copy;
each is a run of its own from the same initial weights.

Data: benchlib's synthetic Step-DPO pairs (random token ids, seeded; DESIGN §7.5). ``--lengths design``
(default): prompt ~ U[96, 512], steps ~ U[16, 128] tokens (means ~304 / ~72). ``--lengths real-estimate``:
log-normal with means ~260 / ~45 (DESIGN §7.5's estimate of Math-Step-DPO-10K), clipped to [8, 512] / [1, 256].
``--lengths smoke`` (with ``--smoke``): U[24, 128] / U[4, 32], for a quick CPU run. ``--share F``: a pair
reuses the previous pair's prompt and rejected step with probability F (rows of the real set do); 0 by default,
so every pair is its own prompt group.

MFU = the FLOPs the trainer's FlopModel counts (DESIGN §7.3; a live reference's forward included) / (wall time x
``--peak-tflops``, which gpu_check.py passes as measured, else ``fasttrain.flops.peak_bf16_tflops``'s value for
the card). Wall time: ``--steps`` optimizer steps after ``--warmup`` untimed ones, between two CUDA
synchronisations; peak memory: the loop's TrainingPeakMemory over the timed steps (DESIGN §7.4).

    python benchmarks/bench_step.py --shape qwen2-1.5b --reference both
    python benchmarks/bench_step.py --shape llama3-8b --reference precomputed       # layers reduced to fit
    python benchmarks/bench_step.py --shape llama3-8b --layers 8 --profile [--profile-out top15.txt]
    python benchmarks/bench_step.py --smoke                                          # tiny, CPU, seconds

Every run prints a table and one ``RESULT {json}`` line per reference mode (for RESULTS.md and tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import benchlib
import components
import numpy as np
import roofline
import torch

from fasttrain import activation_memory
from fasttrain import distributed as fdist
from fasttrain.assembly import resolve_backends, state_bytes
from fasttrain.config import RunConfig
from fasttrain.errors import UserError
from fasttrain.model.config import ModelConfig, num_params

GIB = benchlib.GIB


def auto_layers(shape: str, modes: list[str], live: bool, tokens: int, total_bytes: int) -> int:
    """Most layers (<= the shape's) that the trainer's own memory plan fits on the card: the sharded state
    (``assembly.state_bytes``: fp32 master + grads + AdamW m, v, and a live reference's bf16 copy), the gathered
    blocks and root and the activations of the hungriest of ``modes`` (``fasttrain.activation_memory``), within
    the 85% of the card the plan uses. An estimate: ``--layers`` overrides it; an OOM names the flag."""
    cfg = RunConfig()
    cfg.loss.reference = "live" if live else "precompute"
    cfg.model.compute_dtype = "bfloat16"
    full = benchlib.model_config(shape)

    def fits(layers: int) -> bool:
        m = dataclasses.replace(full, num_hidden_layers=layers)
        policy, reference, _ = state_bytes(m, cfg)
        acts = max(activation_memory.activation_bytes(m, mode, tokens, 2) for mode in modes)
        need = policy + reference + activation_memory.gathered_bytes(m) + acts
        return need <= activation_memory.HEADROOM * total_bytes

    return max((n for n in range(1, full.num_hidden_layers + 1) if fits(n)), default=1)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def measure(args, cfg: RunConfig, dist_info, model_cfg: ModelConfig, groups, ref_name: str, peak) -> dict:
    """One run of the trainer with the ``ref_name`` reference: its timed steps, as a RESULT record's fields."""
    cfg.loss.reference = "live" if ref_name == "live" else "precompute"
    n_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    run, precompute_s = benchlib.build_run(cfg, dist_info, groups, n_steps,
                                           lambda model: model.init_weights(args.seed, on_device=True), model_cfg)
    timed, loop = benchlib.time_steps(run, args.warmup, run.inputs.plans[: args.warmup + args.steps])
    components_per_step = None
    if args.profile:
        plans = run.inputs.plans[args.warmup + args.steps:]
        table, prof, wall_s = profile_steps(loop, plans, dist_info.device)
        print(f"\nprofile ({ref_name} reference), {table}")
        components_per_step, comparison = compare_components(args, cfg, model_cfg, loop.flop_model, prof, wall_s,
                                                              len(plans), dist_info.device, ref_name == "live")
        print(f"\nper component ({ref_name} reference, {len(plans)} profiled step(s)):\n{comparison}")
        if args.profile_out:
            with open(args.profile_out, "a") as f:
                f.write(f"bench_step {args.shape}, {ref_name} reference: {table}\n{comparison}\n")
    del run, loop
    gc.collect()
    if dist_info.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"reference": ref_name, "activation_checkpointing": cfg.model.activation_checkpointing,
            "fuse_projections": cfg.model.fuse_projections,
            "timed_steps": timed.steps, "seconds": timed.seconds, "tokens": timed.tokens,
            "pairs": timed.pairs, "micro_batches": timed.micro_batches, "flops": timed.flops,
            "tokens_per_s": timed.tokens / timed.seconds, "pairs_per_s": timed.pairs / timed.seconds,
            "mfu": timed.flops / timed.seconds / (peak.tflops * 1e12) if peak and peak.tflops else None,
            "peak_mem_gib": timed.peak_gib, "loss": float(np.mean(timed.losses)) if timed.losses else float("nan"),
            "precompute_seconds": precompute_s, "components_per_step": components_per_step}


def profile_steps(loop, plans, device: torch.device):
    """Runs ``plans`` under torch.profiler: (the top-15 table by self CUDA time on a GPU, the profile, wall s)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loop.flop_model.reset()  # counts the profiled steps' work for the prediction
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        loop.run(plans, 10**9)
        benchlib.sync(device)
        wall_s = time.perf_counter() - t0
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = f"{len(plans)} step(s), top 15 by {sort}:\n" + prof.key_averages().table(sort_by=sort, row_limit=15)
    return table, prof, wall_s


def compare_components(args, cfg, model_cfg, counted, prof, wall_s: float, steps: int, device, live: bool):
    """Measured seconds per step per roofline group, and beside them (on an H100 / H200) roofline.py's prediction
    for the work the profiled steps did: ({group: {"measured_s", "predicted_s"}}, the printed table)."""
    on_cuda = device.type == "cuda"
    measured = components.measured_groups(prof, on_cuda)
    if args.predict_for:
        card = roofline.CARDS[args.predict_for]
    else:
        card = roofline.card_for_device(benchlib.device_name(device), args.peak_tflops) if on_cuda else None
    predicted = None
    if card is not None:
        geometry = roofline.Geometry(counted.tokens / steps, counted.rows / steps, counted.attended / steps,
                                     counted.micro_batches / steps)
        setup = dataclasses.replace(roofline.FASTTRAIN, fused_projections=cfg.model.fuse_projections)
        predicted = roofline.predicted_groups(roofline.components(
            model_cfg, geometry, 1, cfg.model.activation_checkpointing, "fused", setup, card, live_reference=live))
    table = components.format_comparison(measured, predicted, steps, wall_s, card.name if card else None, on_cuda)
    per_step = {g: {"measured_s": measured[g] / steps, "predicted_s": predicted[g] if predicted else None}
                for g in measured}
    return per_step, table


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(benchlib.SHAPES), default="qwen2-1.5b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's, fewer if memory demands)")
    ap.add_argument("--reference", choices=("precomputed", "live", "both"), default="both")
    ap.add_argument("--global-batch-pairs", type=int, default=128)
    ap.add_argument("--tokens-per-micro-batch", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--lengths", choices=sorted(benchlib.LENGTHS), default=None,
                    help="token length distribution (default: design; smoke with --smoke)")
    ap.add_argument("--share", type=float, default=0.0, help="probability a pair shares the previous prompt")
    ap.add_argument("--attention", default="auto", help="model.attention_backend")
    ap.add_argument("--lm-head", default="auto", help="model.lm_head_impl")
    ap.add_argument("--no-activation-checkpointing", action="store_true", help="the same as --checkpointing none")
    ap.add_argument("--checkpointing", default="full",
                    help="comma list of model.activation_checkpointing modes (none, selective, full), each measured "
                         "in turn in this one process: side by side")
    ap.add_argument("--projections", default="fused",
                    help="comma list of fused (one q/k/v and one gate/up GEMM per block) and separate "
                         "(model.fuse_projections=false), each measured in turn in this one process")
    ap.add_argument("--compile", action="store_true", help="model.compile: torch.compile per decoder block "
                    "(compiled during the warmup steps, which are not timed)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over --profile-steps more steps, top-15 "
                    "kernels")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled with --profile (default 2)")
    ap.add_argument("--profile-out", help="with --profile: also append the top-15 tables to this file")
    ap.add_argument("--predict-for", choices=sorted(roofline.CARDS), default=None,
                    help="with --profile: the card whose roofline.py prediction is printed beside the measured "
                         "components (default: this GPU if it is an H100 or H200; none on a CPU)")
    benchlib.add_peak_tflops_flag(ap)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on the CPU, 4 pairs/step of short sequences, 1 warmup + 2 timed steps")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.smoke:  # the other flags (--reference, --profile, --lengths ...) still apply
        args.shape, args.global_batch_pairs, args.tokens_per_micro_batch = "tiny", 4, 2048
        args.warmup, args.steps = 1, 2
        args.lengths = args.lengths or "smoke"
    args.lengths = args.lengths or "design"
    args.checkpointing = ["none"] if args.no_activation_checkpointing else args.checkpointing.split(",")
    for mode in args.checkpointing:
        if mode not in ("none", "selective", "full"):
            ap.error(f"--checkpointing {mode!r}: expected none, selective or full")
    args.projections = args.projections.split(",")
    for layout in args.projections:
        if layout not in ("fused", "separate"):
            ap.error(f"--projections {layout!r}: expected fused or separate")
    return args


def run_config(args, device: torch.device) -> RunConfig:
    cfg = RunConfig()
    cfg.model.attention_backend = args.attention
    cfg.model.lm_head_impl = args.lm_head
    cfg.model.activation_checkpointing = args.checkpointing[0]
    cfg.model.compile = args.compile
    cfg.model.compute_dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cfg.data.max_length, cfg.data.max_prompt_length = 1024, 512
    cfg.train.global_batch_pairs = args.global_batch_pairs
    cfg.train.tokens_per_micro_batch = args.tokens_per_micro_batch
    cfg.train.progress_bar = cfg.train.tensorboard = cfg.train.plot = False
    cfg.train.seed = args.seed
    return cfg


def choose_layers(args, device: torch.device) -> tuple[int, str]:
    full = benchlib.SHAPES[args.shape]["num_hidden_layers"]
    if args.layers:
        return args.layers, "" if args.layers == full else f"set by --layers (the shape has {full})"
    if device.type != "cuda":
        return full, ""
    n = auto_layers(args.shape, args.checkpointing, args.reference in ("live", "both"), args.tokens_per_micro_batch,
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
    backend, lm_head = resolve_backends(cfg, device)
    layers, layers_note = choose_layers(args, device)
    model_cfg = benchlib.model_config(args.shape, num_hidden_layers=layers)
    n_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    groups = benchlib.synthetic_groups(args.global_batch_pairs * n_steps, model_cfg.vocab_size,  # fresh pairs
                                       benchlib.LENGTHS[args.lengths], args.share, args.seed)  # every step
    peak = benchlib.mfu_peak(device, args.peak_tflops)
    print(describe(args, device, backend, lm_head, cfg, model_cfg, layers_note, groups, peak), flush=True)
    results, rc = [], 0
    try:
        for layout in args.projections:
            cfg.model.fuse_projections = layout == "fused"
            for mode in args.checkpointing:
                cfg.model.activation_checkpointing = mode
                for ref_name in ("precomputed", "live") if args.reference == "both" else (args.reference,):
                    results.append(measure(args, cfg, dist_info, model_cfg, groups, ref_name, peak))
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
    print(format_results(results, device.type == "cuda"))
    summary = {"shape": args.shape, "layers": layers, "layers_note": layers_note,
               "params": num_params(model_cfg), "device": benchlib.device_name(device), "torch": torch.__version__,
               "attention": backend, "lm_head": lm_head, "compute_dtype": cfg.model.compute_dtype,
               "compile": cfg.model.compile,
               "global_batch_pairs": args.global_batch_pairs, "tokens_per_micro_batch": args.tokens_per_micro_batch,
               "lengths": args.lengths, "share": args.share,
               "mfu_peak_tflops": peak.tflops if peak else None, "mfu_peak_source": peak.source if peak else None}
    records = [{**summary, **r} for r in results]
    for rec in records:
        print("RESULT " + json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return rc


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def describe(args, device, backend, lm_head, cfg, model_cfg, layers_note, groups, peak) -> str:
    n_pairs = sum(g.num_pairs for g in groups)
    tokens = sum(g.num_tokens for g in groups)
    prompt_tok = sum(len(g.prompt_ids) for g in groups)
    n_cont = max(1, sum(len(g.continuations) for g in groups))
    if peak is None:
        peak_text = "the card's bf16 peak: none on the CPU, so no MFU"
    elif peak.tflops is None:
        peak_text = f"no known peak, so no MFU: {peak.source}"
    else:
        peak_text = f"{peak.tflops:g} TFLOP/s, {peak.source}"
    return "\n".join([
        f"bench_step: {benchlib.describe_shape(args.shape)}, {model_cfg.num_hidden_layers} layers"
        + (f" ({layers_note})" if layers_note else "")
        + f", {num_params(model_cfg) / 1e9:.3f}B params, random weights",
        (f"  device {benchlib.device_name(device)}, torch {torch.__version__}; attention {backend}, LM head {lm_head}, "
         f"compute {cfg.model.compute_dtype}, fp32 master weights + AdamW (FSDP2, world 1), activation "
         f"checkpointing {', '.join(args.checkpointing)}, projections {', '.join(args.projections)}, "
         f"per-block torch.compile "
         f"{'on' if cfg.model.compile else 'off'}"),
        (f"  data: {args.lengths} lengths, share {args.share}: {n_pairs} pairs, mean prompt "
         f"{prompt_tok / len(groups):.0f} tokens, mean step {(tokens - prompt_tok) / n_cont:.0f}; "
         f"{args.global_batch_pairs} pairs/step, {args.tokens_per_micro_batch} tokens/micro-batch; "
         f"{args.warmup} warmup + {args.steps} timed steps"),
        (f"  MFU = FlopModel FLOPs / (wall s x {peak_text});  FLOPs = 6 P_blocks T + 12 L (heads d_head) A "
         "+ 6 N V D  (+ a third of that for the live reference's forward); T real tokens, A attended keys, N step "
         "rows"),
    ])


def format_results(results: list[dict], on_cuda: bool) -> str:
    rows = [["reference", "projections", "checkpointing", "step s", "vs first", "micro-batches", "tokens/s",
             "pairs/s", "MFU", "peak GiB", "loss", "precompute s"]]
    first = {}  # reference -> the first mode's step time: the ratios compare modes side by side
    for r in results:
        step_s = r["seconds"] / r["timed_steps"]
        first.setdefault(r["reference"], step_s)
        rows.append([r["reference"], "fused" if r["fuse_projections"] else "separate", r["activation_checkpointing"],
                     f"{step_s:.3f}",
                     f"{step_s / first[r['reference']]:.2f}x",
                     f"{r['micro_batches'] / r['timed_steps']:.1f}/step", f"{r['tokens_per_s']:.0f}",
                     f"{r['pairs_per_s']:.2f}", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     benchlib.fmt(r["peak_mem_gib"], ".1f", "n/a"), f"{r['loss']:.4f}",
                     benchlib.fmt(r["precompute_seconds"], ".1f")])
    return "\n" + benchlib.text_table(rows, right=True) + ("" if on_cuda else "\n(MFU and peak memory: n/a on the CPU)")


if __name__ == "__main__":
    sys.exit(main())
