"""The hand-rolled Step-DPO training loop on FSDP2.

One optimizer step = ``train.global_batch_pairs`` pairs spread over ranks and token-budgeted
micro-batches (plan.py). Each micro-batch's loss is ``sum(pair losses) * world / B``: FSDP
averages gradients over ranks, so the update equals one process averaging over the same B pairs.
The step has no host synchronisation per micro-batch: metric sums stay on the device and are
all-reduced once per step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from fasttrain_kernels import resolve_lm_head

from fasttrain import resume_checkpoint
from fasttrain import distributed as fdist
from fasttrain.attention import resolve_backend
from fasttrain.assembly import (
    build_references,
    check_model_source,
    build_sharded_model,
    check_output_dir,
    create_output_dir,
    groups_of,
    load_datasets,
    load_tokenizer,
    tokenized_fingerprint,
)
from fasttrain.config import RunConfig
from fasttrain.errors import TrainingStopped, UserError
from fasttrain.export import export_hf, weights_as_exported
from fasttrain.faults import Faults
from fasttrain.flops import FlopModel, peak_bf16_tflops
from fasttrain.loss import (
    MetricSums,
    PairLogps,
    continuation_logps,
    dpo_pair_losses,
    metric_sums,
    pair_logps,
)
from fasttrain.packing import pack_groups, to_device
from fasttrain.reference_logps import model_fingerprint
from fasttrain.reporting import MetricsLogger, ProgressBar, TrainingPeakMemory, plot_curves, setup_logging
from fasttrain.plan import plan_inference, plan_steps

log = logging.getLogger("fasttrain")


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter], total_steps: int):
    """(AdamW, LambdaLR with linear warmup + cosine decay) over the sharded fp32 master parameters."""
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
        weight_decay=cfg.train.weight_decay,
        # Fused: one pass over each fp32 param / grad / moment (torchtitan's default with FSDP2). On CUDA, and
        # on the host for CPU-offloaded state (torch's vectorised, multithreaded CPU kernel: the 72B recipe's
        # optimizer step is memory-bound there). CPU-only runs keep the for-each path the equality tests pin.
        fused=bool(params) and (params[0].device.type == "cuda" or cfg.model.cpu_offload),
    )
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.train.min_lr_ratio)
    )
    return optimizer, scheduler


def run_micro_batch(model, reference, groups, device, cfg: RunConfig, world_size: int, flop_model, train: bool,
                    loss_scale: float | None = None):
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
            if loss_scale is not None:  # fault injection (tests): a NaN step
                loss = loss * loss_scale
                losses_B = losses_B * loss_scale
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
    """Run (or resume) the training that ``cfg`` describes; returns the summary written to summary.json.

    Every input is checked (config, output directory, model files, tokenizer, data, resume checkpoint)
    before anything is written into ``train.output_dir``, and a failure on any rank stops every rank with one
    message (fasttrain.distributed.agree, fasttrain/cli.py).
    """
    cfg.validate()
    dist_info = fdist.init_distributed(timeout_minutes=cfg.train.dist_timeout_minutes,
                                       cpu_offload=cfg.model.cpu_offload)
    setup_logging(dist_info.is_main)
    torch.manual_seed(cfg.train.seed)
    device, world = dist_info.device, dist_info.world_size
    if cfg.model.compute_dtype == "auto":  # resolved once, before anything (cache keys, resume checks) reads it
        cfg.model.compute_dtype = "bfloat16" if device.type == "cuda" else "float32"
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"

    # ---- inputs: checked on every rank, nothing written yet
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            check_output_dir(cfg)
        resume_from = _resume_source(cfg, ckpt_root)
        if cfg.model.cpu_offload and device.type != "cuda":
            raise UserError("model.cpu_offload=true moves the sharded training state from GPU memory to host "
                            f"memory; this run is on {device.type}, where it already lives in host memory: set it "
                            "to false")
        try:
            backend = resolve_backend(cfg.model.attention_backend, device, getattr(torch, cfg.model.compute_dtype))
            lm_head = resolve_lm_head(cfg.model.lm_head_impl, device)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        model_cfg = check_model_source(cfg.model.path)  # fail fast, before tokenizing anything
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        if len(tokenizer) > model_cfg.vocab_size:
            raise UserError(f"the tokenizer ({cfg.model.tokenizer or cfg.model.path}) has {len(tokenizer)} tokens "
                            f"but the model's vocab_size is {model_cfg.vocab_size}: they do not belong together")
    log.info("world size %d on %s; attention backend %s; LM head %s; compute %s, fp32 master weights + AdamW state",
             world, device, backend, lm_head, cfg.model.compute_dtype)

    train_data, eval_data = load_datasets(cfg, dist_info, tokenizer)
    train_groups = groups_of(train_data)
    budget = cfg.train.tokens_per_micro_batch
    with fdist.all_ranks_agree():
        try:
            plans = plan_steps(train_groups, cfg.train.global_batch_pairs, world, budget, cfg.train.seed,
                               cfg.train.epochs, cfg.train.max_steps)
        except ValueError as e:
            raise UserError(f"{cfg.data.train}: {e}") from None
    if cfg.model.cpu_offload:
        most = max(len(mbs) for plan in plans for mbs in plan.micro_batches)
        if most > 1:
            # FSDP2 copies a gradient to host memory asynchronously only when none is being accumulated:
            # from a step's second micro-batch on, every block's copy blocks the host and adds on the CPU.
            log.warning("model.cpu_offload with up to %d micro-batches per rank per step: from the second one on, "
                        "each block's gradient copy to host memory blocks and is summed on the CPU. One "
                        "micro-batch per step (train.tokens_per_micro_batch >= the tokens of "
                        "global_batch_pairs / world size pairs, or more GPUs) keeps the copies asynchronous",
                        most)
    n_shared = sum(len(g.continuations) > 2 for g in train_groups)
    log.info("%d pairs in %d prompt groups (%d with >2 continuations); %d optimizer steps of %d pairs",
             len(train_data), len(train_groups), n_shared, len(plans), cfg.train.global_batch_pairs)
    model_fp = model_fingerprint(cfg.model.path)
    info = resume_checkpoint.run_info(cfg.to_dict(), model_fp, tokenized_fingerprint(train_data), world)
    finished = finished_run(cfg, info, dist_info)
    if finished is not None:
        log.info("%s: this run finished (summary.json, %d steps); nothing to do. To train further, start a new "
                 "run in another train.output_dir", out_dir, finished.get("steps", 0))
        return finished

    # ---- model, optimizer (built before any forward: it must hold the sharded DTensor parameters)
    model = build_sharded_model(cfg, dist_info, backend, trainable=True)
    flop_model = FlopModel.of(model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = len(plans)
    optimizer, scheduler = build_optimizer(cfg, params, total_steps)

    # ---- references (from the initial weights, before any checkpoint is loaded) and evaluation sets
    eval_sets = {"train_subset": groups_of(train_data, 256)}  # the same pairs every time
    if eval_data is not None:
        eval_sets["eval"] = groups_of(eval_data)
    eval_plans = {name: plan_inference(gs, world, budget) for name, gs in eval_sets.items()}
    refs = build_references(cfg, dist_info, backend, model, train_data, eval_data, eval_sets, model_fp)
    if cfg.loss.reference == "precompute" and resume_from is not None and not refs.all_cached:
        log.warning("the reference log-prob cache was missing on resume; it was recomputed from model.path")

    state = {"step": 0, "consecutive_skips": 0, "skipped_steps": [], "before": None}
    if resume_from is not None:
        state = resume_checkpoint.load(resume_from, model, optimizer, info, dist_info)
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d/%d", resume_from, state["step"], total_steps)

    # ---- every input passed: from here on the run writes into output_dir
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            create_output_dir(cfg)
    logger = None
    if dist_info.is_main:
        truncate_metrics(out_dir / "metrics.jsonl", state["step"])
        logger = MetricsLogger(out_dir / "metrics.jsonl", cfg.train.tensorboard)

    def evaluate_all() -> dict[str, dict]:
        return {name: evaluate(model, refs.by_eval_set[name], mbs[dist_info.rank], device, cfg, world, flop_model)
                for name, mbs in eval_plans.items()}

    def run_evals(step: int) -> dict[str, dict]:
        results = evaluate_all()
        if logger:
            for name, metrics in results.items():
                logger.write({"split": "eval" if name == "eval" else "eval_train_subset", "step": step, **metrics})
        return results

    if state["before"] is None:
        state["before"] = run_evals(0)

    loop = TrainLoop(cfg, dist_info, model, optimizer, scheduler, params, refs.train, flop_model, logger,
                     Faults.from_env())

    def checkpoint(step: int) -> None:
        state.update(step=step, scheduler=scheduler.state_dict(), consecutive_skips=loop.consecutive_skips,
                     skipped_steps=loop.skipped_steps)
        resume_checkpoint.save(ckpt_root, step, model, optimizer, state, info, cfg.train.keep_checkpoints, dist_info)

    loop.consecutive_skips, loop.skipped_steps = state["consecutive_skips"], list(state["skipped_steps"])
    # An export that exists already was written by this run (the output directory was empty, or replaced, when it
    # started): by an attempt that went past the checkpoint this one resumed from. It is replaced.
    replace_exports = bool(cfg.train.resume)

    def export(step: int) -> None:
        export_hf(model, cfg, out_dir / "exports" / f"step-{step:08d}", dist_info, replace_exports)

    loop.run(plans[state["step"]:], total_steps, run_evals, checkpoint, export)

    after = run_evals(total_steps)
    summary = {"steps": total_steps, "skipped_steps": loop.skipped_steps, "before": state["before"], "after": after,
               "last_step": loop.last_row, "run_info": info}
    if cfg.train.save_final:
        report = export_hf(model, cfg, out_dir / "final", dist_info, replace_exports)
        summary["export"] = report.as_dict()
        if report.dtype != "float32":  # the exported weights are the rounded ones: report what they score
            with weights_as_exported(model, report.dtype):
                summary["after_exported_weights"] = evaluate_all()
    if dist_info.is_main:
        write_json_atomic(out_dir / "summary.json", summary)  # written last: marks the run finished
        log.info("\n%s", format_before_after(state["before"], after))
        if "after_exported_weights" in summary:
            log.info("the exported %s weights score:\n%s", summary["export"]["dtype"],
                     format_before_after(state["before"], summary["after_exported_weights"]))
        logger.close()
        if cfg.train.plot and plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png"):
            log.info("curves: %s", out_dir / "curves.png")
    return summary


def finished_run(cfg: RunConfig, info: dict, dist_info: fdist.DistInfo) -> dict | None:
    """With train.resume=auto, the summary of the run in output_dir if it already finished, so that relaunching it
    (torchrun --max-restarts after the last step, a job scheduler's retry) is a no-op; else None. Relaunching
    it with settings that change the math or data is refused as a resume would be."""
    path = Path(cfg.train.output_dir) / "summary.json"
    summary, error = None, None
    if dist_info.is_main and cfg.train.resume == "auto" and path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            error = UserError(f"{path}: cannot read the finished run's summary ({e}); remove it to resume the run")
    fdist.agree(error)
    summary = fdist.broadcast_object(summary)
    if summary is not None and "run_info" in summary:
        with fdist.all_ranks_agree():
            resume_checkpoint.check_compatible(summary["run_info"], info, path)
    return summary


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _resume_source(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    if cfg.train.resume == "":
        return None
    if cfg.train.resume == "auto":
        latest = resume_checkpoint.find_latest(ckpt_root)
        if latest is None:
            log.info("train.resume=auto: no complete checkpoint in %s; starting from the beginning", ckpt_root)
        return latest
    return Path(cfg.train.resume)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again); atomic rewrite."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step and step > 0]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class TrainLoop:
    """Optimizer steps over a list of StepPlans; one small all-reduce and one host sync per step."""

    def __init__(self, cfg, dist_info, model, optimizer, scheduler, params, reference, flop_model, logger, faults):
        self.cfg, self.dist, self.model, self.optimizer, self.scheduler = cfg, dist_info, model, optimizer, scheduler
        self.params, self.reference, self.flop_model, self.logger, self.faults = (
            params, reference, flop_model, logger, faults)
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []
        self.last_row: dict | None = None
        self.peak_memory = TrainingPeakMemory(dist_info.device)  # per log row, and for benchmarks' spans

    def run(self, plans, total_steps, run_evals, checkpoint, export) -> None:
        cfg, device, rank = self.cfg, self.dist.device, self.dist.rank
        n_fields = len(MetricSums.FIELDS)
        bar = ProgressBar(total_steps, cfg.train.progress_bar and self.dist.is_main)
        peak = None  # the MFU denominator: this card's dense bf16 ceiling (fasttrain/flops.py); unknown -> mfu null
        if device.type == "cuda":
            tflops, source = peak_bf16_tflops(torch.cuda.get_device_name(device))
            peak = tflops * 1e12 if tflops else None
            if self.dist.is_main:
                log.info("MFU denominator: %s TFLOP/s per GPU (%s)", tflops, source)
        self.model.train()
        t_last = t_ckpt = time.perf_counter()
        interval = np.zeros(n_fields + 2)  # metric sums, tokens, flops since the last log row
        pairs_since = 0
        peak_memory = self.peak_memory
        peak_memory.start()
        for plan in plans:
            step = plan.step + 1
            my_batches = plan.micro_batches[rank]
            step_sums = torch.zeros(n_fields, device=device)
            tokens = flops = 0.0
            for i, groups in enumerate(my_batches):
                # Gradients are reduce-scattered after every micro-batch (FSDP2's default), into the sharded
                # fp32 grads. Deferring it to the step's last micro-batch would make FSDP2 keep an unsharded
                # fp32 gradient of the whole model on every rank in between: 4 B/param, ~290 GB at 72B.
                sums, n_tok, n_flops = run_micro_batch(
                    self.model, self.reference, groups, device, cfg, self.dist.world_size, self.flop_model, True,
                    loss_scale=self.faults.loss_scale(step, rank, i))
                step_sums += sums
                tokens += n_tok
                flops += n_flops
                self.faults.maybe_kill(step, rank)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            due = cfg.train.checkpoint_minutes > 0 and time.perf_counter() - t_ckpt >= 60 * cfg.train.checkpoint_minutes
            stats = torch.cat([step_sums, to_device(torch.tensor([tokens, flops, float(due)]), device)])
            # The step's one host sync: every rank learns the same loss, grad norm (already global) and
            # checkpoint vote.
            *values, norm = torch.cat([fdist.all_reduce_sum(stats), grad_norm.reshape(1).to(stats)]).tolist()
            lr = self.scheduler.get_last_lr()[0]
            if math.isfinite(norm) and math.isfinite(values[1]):
                self.optimizer.step()
                self.consecutive_skips = 0
            else:
                self._skip(step, plan, norm, values[1])
            self.scheduler.step()  # the LR schedule follows the data position, skipped steps included
            self.optimizer.zero_grad(set_to_none=True)
            if math.isfinite(values[1]):
                interval += np.asarray(values[:-1])
            pairs_since += plan.num_pairs
            # A log point whose interval holds only skipped steps has nothing to report (the skip has its row).
            if (step % cfg.train.log_every == 0 or step == total_steps) and interval[0] > 0:
                elapsed = time.perf_counter() - t_last
                row = {
                    "split": "train", "step": step, "epoch": round(plan.epoch, 4),
                    **MetricSums.report(torch.tensor(interval[:n_fields])),
                    "grad_norm": norm, "lr": lr,
                    "tokens_per_s": interval[n_fields] / elapsed, "pairs_per_s": pairs_since / elapsed,
                    "mfu": interval[n_fields + 1] / elapsed / (peak * self.dist.world_size) if peak else None,
                    "peak_mem_gib": peak_memory.report(),
                }
                self.last_row = row
                if self.logger:
                    self.logger.write(row)
                bar.update(step, f"loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f} "
                                 f"margin {row['rewards/margins']:.3f} {row['tokens_per_s']:.0f} tok/s")
                interval[:] = 0
                pairs_since = 0
                t_last = time.perf_counter()
            last = step == total_steps
            due_eval = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and not last
            due_ckpt = (bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0) or values[-1] > 0
            due_export = bool(cfg.train.export_every) and step % cfg.train.export_every == 0 and not last
            if due_eval or (due_ckpt and not last) or due_export:
                # throughput and peak memory count the training steps only
                t_pause = time.perf_counter()
                peak_memory.pause()
                if due_eval:
                    run_evals(step)
                # Export before checkpointing: a crash between the two then resumes from an earlier checkpoint
                # and rewrites this export, instead of resuming past it and never writing it.
                if due_export:
                    export(step)
                if due_ckpt and not last:
                    checkpoint(step)
                t_last += time.perf_counter() - t_pause
                peak_memory.start()
            if due_ckpt:
                t_ckpt = time.perf_counter()

    def _skip(self, step: int, plan, norm: float, loss_sum: float) -> None:
        self.consecutive_skips += 1
        self.skipped_steps.append(step)
        record_ids = [pr.record_id for per_rank in plan.micro_batches for mb in per_rank for g in mb for pr in g.pairs]
        log.warning("step %d skipped (weights and optimizer state unchanged): non-finite %s; its %d pairs: %s",
                    step, "loss" if not math.isfinite(loss_sum) else "gradient norm", len(record_ids),
                    ", ".join(record_ids[:32]) + (" ..." if len(record_ids) > 32 else ""))
        if self.logger:
            self.logger.write({"split": "skipped", "step": step, "grad_norm": norm, "loss_sum": loss_sum,
                               "record_ids": record_ids})
        if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            stop = TrainingStopped(
                f"stopping: {self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(steps {self.skipped_steps[-self.consecutive_skips:]}; their record ids are in metrics.jsonl "
                f"rows with split=skipped). Check those records and the learning rate "
                f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips})."
            )
            stop.agreed_by_all_ranks = True  # every rank decides from the same all-reduced values: rank 0 prints
            raise stop


def format_before_after(before: dict, after: dict) -> str:
    lines = [f"{'':26s}" + "".join(f"{name:>26s}" for name in before)]
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        cells = "".join(f"{before[n][key]:>12.4f} -> {after[n][key]:<10.4f}" for n in before)
        lines.append(f"{key:26s}{cells}")
    return "\n".join(lines)
