"""The hand-rolled Step-DPO training loop on FSDP2.

One optimizer step = ``train.global_batch_pairs`` pairs spread over ranks and token-budgeted
micro-batches (schedule.py). Each micro-batch's loss is ``sum(pair losses) * world / B``: FSDP
averages gradients over ranks, so the update equals one process averaging over the same B pairs.
The step has no host synchronisation per micro-batch: metric sums stay on the device and are
all-reduced once per step.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttrain import distributed as fdist
from fasttrain.attention import resolve_backend
from fasttrain.config import RunConfig
from fasttrain.flops import FlopModel
from fasttrain.loss import MetricSums, PairLogps, continuation_logps, dpo_pair_losses, metric_sums, pair_logps
from fasttrain.building import (
    build_references,
    build_sharded_model,
    groups_of,
    load_datasets,
    load_tokenizer,
    prepare_output_dir,
)
from fasttrain.packing import pack_groups
from fasttrain.reporting import MetricsLogger, ProgressBar, plot_curves, setup_logging
from fasttrain.schedule import plan_inference, plan_steps

log = logging.getLogger("fasttrain")

H100_BF16_TFLOPS = 785.0  # dense bf16 matmul measured on the H100 here (DESIGN §6)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepResult:
    sums: torch.Tensor  # MetricSums vector, summed over micro-batches (this rank)
    tokens: int
    flops: float


def run_micro_batch(model, reference, groups, device, cfg: RunConfig, world_size: int, flop_model, train: bool):
    """Forward (+ backward when training) one micro-batch; returns its metric sums and work."""
    batch = pack_groups(groups).to(device)
    with torch.set_grad_enabled(train):
        logp_N = model(batch)
        cont_M = continuation_logps(logp_N, batch.lp_cont_N, batch.num_continuations)
        pol_c, pol_r = pair_logps(cont_M, batch.chosen_cont_B, batch.rejected_cont_B)
        ref_c, ref_r = reference(batch)
        if cfg.loss.loss_type == "ipo":  # IPO uses per-token means (as TRL does)
            lens_M = batch.cont_lengths_M.float()
            len_c, len_r = lens_M[batch.chosen_cont_B], lens_M[batch.rejected_cont_B]
            logps = PairLogps(pol_c / len_c, pol_r / len_r, ref_c / len_c, ref_r / len_r)
        else:
            logps = PairLogps(pol_c, pol_r, ref_c, ref_r)
        losses_B = dpo_pair_losses(logps, cfg.loss.beta, cfg.loss.loss_type, cfg.loss.label_smoothing)
        if train:
            # 0 * sum(logp) keeps every parameter in the graph for dummy (pair-less) micro-batches.
            loss = (losses_B.sum() + 0.0 * logp_N.sum()) * (world_size / cfg.train.global_batch_pairs)
            loss.backward()
    sums = metric_sums(PairLogps(pol_c, pol_r, ref_c, ref_r), losses_B, cfg.loss.beta).as_vector()
    flops = flop_model.batch(batch.num_tokens, batch.num_attended_keys, int(batch.lp_rows_N.numel()), train)
    if reference.kind == "live":
        flops += flop_model.batch(batch.num_tokens, batch.num_attended_keys, int(batch.lp_rows_N.numel()), False)
    return sums, batch.num_tokens, flops


def evaluate(model, reference, micro_batches, device, cfg, world_size, flop_model) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total = torch.zeros(len(MetricSums.FIELDS), device=device)
    for groups in micro_batches:
        sums, _, _ = run_micro_batch(model, reference, groups, device, cfg, world_size, flop_model, train=False)
        total += sums
    fdist.reshard_all(model)
    model.train(was_training)
    return MetricSums.report(fdist.all_reduce_sum(total).cpu())


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> dict:
    cfg.validate()
    dist_info = fdist.init_distributed()
    setup_logging(dist_info.is_main)
    torch.manual_seed(cfg.train.seed)
    device, world = dist_info.device, dist_info.world_size
    out_dir = prepare_output_dir(cfg, dist_info.is_main)
    if dist_info.is_main:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    backend = resolve_backend(cfg.model.attention_backend, device)
    log.info("world size %d on %s; attention backend %s; compute %s, fp32 master weights + AdamW state",
             world, device, backend, cfg.model.compute_dtype)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_data, eval_data = load_datasets(cfg, dist_info, tokenizer)
    train_groups = groups_of(train_data)
    budget = cfg.train.tokens_per_micro_batch
    plans = plan_steps(train_groups, cfg.train.global_batch_pairs, world, budget, cfg.train.seed,
                       cfg.train.epochs, cfg.train.max_steps)
    n_shared = sum(len(g.continuations) > 2 for g in train_groups)
    log.info("%d pairs in %d prompt groups (%d with >2 continuations); %d optimizer steps of %d pairs",
             len(train_data), len(train_groups), n_shared, len(plans), cfg.train.global_batch_pairs)

    # ---- models
    model = build_sharded_model(cfg, dist_info, backend, trainable=True)
    flop_model = FlopModel.of(model)
    # Built before any forward: the optimizer must hold the sharded (DTensor) parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
        weight_decay=cfg.train.weight_decay,
    )
    # Fixed held-out and train subsets for before/after evaluation (same pairs every time).
    eval_sets = {"train_subset": groups_of(train_data, 256)}
    if eval_data is not None:
        eval_sets["eval"] = groups_of(eval_data)
    eval_plans = {name: plan_inference(gs, world, budget) for name, gs in eval_sets.items()}

    refs = build_references(cfg, dist_info, backend, model, train_data, eval_data, eval_sets)
    reference, eval_refs = refs.train, refs.by_eval_set

    total_steps = len(plans)
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.train.min_lr_ratio)
    )

    logger = MetricsLogger(out_dir / "metrics.jsonl", cfg.train.tensorboard) if dist_info.is_main else None

    def run_evals(step: int) -> dict[str, dict]:
        results = {}
        for name, mbs in eval_plans.items():
            results[name] = evaluate(model, eval_refs[name], mbs[dist_info.rank], device, cfg, world, flop_model)
            if logger:
                logger.write({"split": "eval" if name == "eval" else "eval_train_subset", "step": step, **results[name]})
        return results

    before = run_evals(0)
    bar = ProgressBar(total_steps, cfg.train.progress_bar and dist_info.is_main)
    peak = H100_BF16_TFLOPS * 1e12 if device.type == "cuda" else None
    model.train()
    t_last = time.perf_counter()
    tokens_since = flops_since = pairs_since = 0.0
    history = []
    for plan in plans:
        my_batches = plan.micro_batches[dist_info.rank]
        step_sums = torch.zeros(len(MetricSums.FIELDS), device=device)
        for i, groups in enumerate(my_batches):
            # Reduce-scatter gradients only after the last micro-batch of the step.
            model.set_requires_gradient_sync(i == len(my_batches) - 1)
            sums, tokens, flops = run_micro_batch(model, reference, groups, device, cfg, world, flop_model, True)
            step_sums += sums
            tokens_since += tokens
            flops_since += flops
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pairs_since += plan.num_pairs
        step = plan.step + 1
        if step % cfg.train.log_every == 0 or step == total_steps:
            stats = torch.cat([step_sums, torch.tensor([tokens_since, flops_since], device=device)])
            fdist.all_reduce_sum(stats)
            metrics = MetricSums.report(stats[:-2].cpu())
            elapsed = time.perf_counter() - t_last
            row = {
                "split": "train", "step": step, "epoch": round(plan.epoch, 4), **metrics,
                "grad_norm": float(grad_norm), "lr": lr,
                "tokens_per_s": float(stats[-2]) / elapsed, "pairs_per_s": pairs_since / elapsed,
                "mfu": float(stats[-1]) / elapsed / (peak * world) if peak else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            }
            history.append(row)
            if logger:
                logger.write(row)
            bar.update(step, f"loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f} "
                             f"margin {row['rewards/margins']:.3f} {row['tokens_per_s']:.0f} tok/s")
            t_last = time.perf_counter()
            tokens_since = flops_since = pairs_since = 0.0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
            t_eval = time.perf_counter()
            run_evals(step)
            t_last += time.perf_counter() - t_eval  # throughput counts training time only

    after = run_evals(total_steps)
    summary = {"steps": total_steps, "first_step": history[0] if history else None,
               "last_step": history[-1] if history else None, "before": before, "after": after}
    if cfg.train.save_final:
        save_final_checkpoint(model, cfg, out_dir / "final", dist_info)
    if dist_info.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("\n%s", format_before_after(before, after))
        if logger:
            logger.close()
        if cfg.train.plot and plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png"):
            log.info("curves: %s", out_dir / "curves.png")
    return summary


def format_before_after(before: dict, after: dict) -> str:
    lines = [f"{'':26s}" + "".join(f"{name:>26s}" for name in before)]
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        cells = "".join(f"{before[n][key]:>12.4f} -> {after[n][key]:<10.4f}" for n in before)
        lines.append(f"{key:26s}{cells}")
    return "\n".join(lines)


def save_final_checkpoint(model, cfg: RunConfig, out: Path, dist_info: fdist.DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fasttrain.model.checkpoint import save_hf_checkpoint

    # Every rank takes part in the gathers; only rank 0 holds (on CPU) and writes the full weights.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_info.is_main:
        save_hf_checkpoint(state, model.config, out, tokenizer_dir=cfg.model.tokenizer or cfg.model.path,
                           dtype=getattr(torch, cfg.train.save_dtype), overwrite=cfg.train.overwrite)
        log.info("final checkpoint (HF format): %s", out)
    fdist.barrier()
