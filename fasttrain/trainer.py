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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fasttrain import distributed as fdist
from fasttrain import resume_checkpoint
from fasttrain.assembly import Run, build_run, check_inputs, create_output_dir
from fasttrain.config import RunConfig
from fasttrain.errors import TrainingStopped, UserError
from fasttrain.export import export_hf, weights_as_exported
from fasttrain.faults import Faults
from fasttrain.flops import peak_bf16_tflops
from fasttrain.loss import (
    MetricSums,
    PairLogps,
    continuation_logps,
    dpo_pair_losses,
    metric_sums,
    pair_logps,
)
from fasttrain.packing import pack_groups, to_device
from fasttrain.reporting import MetricsLogger, ProgressBar, TrainingPeakMemory, plot_curves, setup_logging

log = logging.getLogger("fasttrain")


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
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

    build -> loop -> finish. Every input is checked (config, output directory, model files, tokenizer, data,
    resume checkpoint) before anything is written into ``train.output_dir``, and a failure on any rank stops every
    rank with one message (DESIGN §8).
    """
    cfg.validate()
    dist_info = fdist.init_distributed(timeout_minutes=cfg.train.dist_timeout_minutes,
                                       cpu_offload=cfg.model.cpu_offload)
    setup_logging(dist_info.is_main)
    torch.manual_seed(cfg.train.seed)
    if cfg.model.compute_dtype == "auto":  # resolved once, before anything (cache keys, resume checks) reads it
        cfg.model.compute_dtype = "bfloat16" if dist_info.device.type == "cuda" else "float32"
    inputs = check_inputs(cfg, dist_info)
    finished = finished_run(cfg, inputs.info, dist_info)
    if finished is not None:
        log.info("%s: this run finished (summary.json, %d steps); nothing to do. To train further, start a new "
                 "run in another train.output_dir", cfg.train.output_dir, finished.get("steps", 0))
        return finished
    run = build_run(cfg, dist_info, inputs)
    state = restore(run)
    # ---- every input passed: from here on the run writes into output_dir
    with fdist.all_ranks_agree():
        if dist_info.is_main:
            create_output_dir(cfg)
    return RunSession(run, state).train()


def restore(run: Run) -> dict:
    """The trainer state to start from: a fresh one, or the checkpoint train.resume names (model, AdamW, schedule,
    RNG and counters restored in place)."""
    state = {"step": 0, "consecutive_skips": 0, "skipped_steps": [], "before": None}
    resume_from = run.inputs.resume_from
    if resume_from is not None:
        state = resume_checkpoint.load(resume_from, run.model, run.optimizer, run.inputs.info, run.dist)
        run.scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d/%d", resume_from, state["step"], len(run.inputs.plans))
    return state


class RunSession:
    """One training run's outputs around the loop: metrics log, evaluations, checkpoints, exports, summary."""

    def __init__(self, run: Run, state: dict):
        self.run, self.state = run, state
        self.out_dir = Path(run.cfg.train.output_dir)
        self.logger = None
        if run.dist.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", state["step"])
            self.logger = MetricsLogger(self.out_dir / "metrics.jsonl", run.cfg.train.tensorboard)
        self.loop = TrainLoop.from_run(run, self.logger, Faults.from_env())
        self.loop.consecutive_skips, self.loop.skipped_steps = state["consecutive_skips"], list(state["skipped_steps"])
        # An export that exists already was written by this run (the output directory was empty, or replaced, when
        # it started): by an attempt that went past the checkpoint this one resumed from. It is replaced.
        self.replace_exports = bool(run.cfg.train.resume)

    def train(self) -> dict:
        run, state = self.run, self.state
        total_steps = len(run.inputs.plans)
        if state["before"] is None:
            state["before"] = self.evaluate(0)
        self.loop.run(run.inputs.plans[state["step"]:], total_steps, self.evaluate, self.checkpoint, self.export)
        return self.finish(total_steps)

    def evaluate_all(self) -> dict[str, dict]:
        run = self.run
        return {name: evaluate(run.model, run.refs.by_eval_set[name], mbs[run.dist.rank], run.dist.device, run.cfg,
                               run.dist.world_size, run.flop_model)
                for name, mbs in run.eval_plans.items()}

    def evaluate(self, step: int) -> dict[str, dict]:
        results = self.evaluate_all()
        if self.logger:
            for name, metrics in results.items():
                self.logger.write({"split": "eval" if name == "eval" else "eval_train_subset", "step": step,
                                   **metrics})
        return results

    def checkpoint(self, step: int) -> None:
        run, loop = self.run, self.loop
        self.state.update(step=step, scheduler=run.scheduler.state_dict(), consecutive_skips=loop.consecutive_skips,
                          skipped_steps=loop.skipped_steps)
        resume_checkpoint.save(self.out_dir / "checkpoints", step, run.model, run.optimizer, self.state,
                               run.inputs.info, run.cfg.train.keep_checkpoints, run.dist)

    def export(self, step: int) -> None:
        export_hf(self.run.model, self.run.cfg, self.out_dir / "exports" / f"step-{step:08d}", self.run.dist,
                  self.replace_exports, self.run.optimizer)

    def finish(self, total_steps: int) -> dict:
        run, state = self.run, self.state
        after = self.evaluate(total_steps)
        summary = {"steps": total_steps, "skipped_steps": self.loop.skipped_steps, "before": state["before"],
                   "after": after, "last_step": self.loop.last_row, "run_info": run.inputs.info}
        if run.cfg.train.save_final:
            report = export_hf(run.model, run.cfg, self.out_dir / "final", run.dist, self.replace_exports,
                               run.optimizer)
            summary["export"] = report.as_dict()
            if report.dtype != "float32":  # the exported weights are the rounded ones: report what they score
                with weights_as_exported(run.model, report.dtype):
                    summary["after_exported_weights"] = self.evaluate_all()
        if run.dist.is_main:
            write_json_atomic(self.out_dir / "summary.json", summary)  # written last: marks the run finished
            log.info("\n%s", format_before_after(state["before"], after))
            if "after_exported_weights" in summary:
                log.info("the exported %s weights score:\n%s", summary["export"]["dtype"],
                         format_before_after(state["before"], summary["after_exported_weights"]))
            self.logger.close()
            if run.cfg.train.plot and plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png"):
                log.info("curves: %s", self.out_dir / "curves.png")
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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again); atomic rewrite."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step and step > 0]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


@dataclass
class _Interval:
    """What the loop sums between two log rows."""

    sums: np.ndarray  # MetricSums fields, then tokens, then FLOPs
    pairs: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.sums[:] = 0
        self.pairs = 0
        self.t_start = time.perf_counter()


class TrainLoop:
    """Optimizer steps over a list of StepPlans; one small all-reduce and one host sync per step.

    ``run`` reads as its three parts: ``step`` (micro-batches, gradient norm, the one all-reduce, then the
    update or the skip of a non-finite step), ``log_row`` (the metrics of the steps since the last row) and
    ``pauses`` (the cadence of evaluations, exports and checkpoints).
    """

    def __init__(self, cfg, dist_info, model, optimizer, scheduler, params, reference, flop_model, logger, faults):
        self.cfg, self.dist, self.model, self.optimizer, self.scheduler = cfg, dist_info, model, optimizer, scheduler
        self.params, self.reference, self.flop_model, self.logger, self.faults = (
            params, reference, flop_model, logger, faults)
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []
        self.last_row: dict | None = None
        self.peak_memory = TrainingPeakMemory(dist_info.device)  # per log row, and for benchmarks' spans
        self.peak_flops = self._mfu_denominator()
        self.step_lr = float("nan")
        self._t_checkpoint = time.perf_counter()

    @classmethod
    def from_run(cls, run: Run, logger=None, faults: Faults | None = None, flop_model=None) -> TrainLoop:
        """The loop over ``run``'s model, optimizer, schedule and training reference. ``logger``: anything with
        ``write(row)`` (None: rows are kept in ``last_row`` only); ``flop_model``: replaces the run's (a
        benchmark's counting wrapper)."""
        return cls(run.cfg, run.dist, run.model, run.optimizer, run.scheduler, run.params, run.refs.train,
                   flop_model or run.flop_model, logger, faults or Faults())

    def _mfu_denominator(self) -> float | None:
        """This card's dense bf16 ceiling in FLOP/s (fasttrain/flops.py); None off CUDA or for an unlisted card."""
        device = self.dist.device
        if device.type != "cuda":
            return None
        tflops, source = peak_bf16_tflops(torch.cuda.get_device_name(device))
        if self.dist.is_main:
            log.info("MFU denominator: %s TFLOP/s per GPU (%s)", tflops, source)
        return tflops * 1e12 if tflops else None

    def run(self, plans, total_steps, run_evals=None, checkpoint=None, export=None) -> None:
        bar = ProgressBar(total_steps, self.cfg.train.progress_bar and self.dist.is_main)
        self.model.train()
        interval = _Interval(np.zeros(len(MetricSums.FIELDS) + 2))
        self.peak_memory.start()
        for plan in plans:
            step = plan.step + 1
            values, norm, checkpoint_vote = self.step(plan)
            if math.isfinite(values[1]):  # a skipped step's numbers have their own row (split=skipped)
                interval.sums += values
            interval.pairs += plan.num_pairs
            # A log point whose interval holds only skipped steps has nothing to report.
            if (step % self.cfg.train.log_every == 0 or step == total_steps) and interval.sums[0] > 0:
                self.log_row(step, plan, interval, norm, bar)
                interval.reset()
            paused = self.pauses(step, step == total_steps, checkpoint_vote, run_evals, checkpoint, export)
            interval.t_start += paused  # throughput counts the training steps only

    def step(self, plan) -> tuple[np.ndarray, float, bool]:
        """One optimizer step: (the step's metric sums + tokens + FLOPs over all ranks, global grad norm,
        whether any rank's checkpoint_minutes clock ran out)."""
        cfg, device, rank = self.cfg, self.dist.device, self.dist.rank
        step = plan.step + 1
        step_sums = torch.zeros(len(MetricSums.FIELDS), device=device)
        tokens = flops = 0.0
        for i, groups in enumerate(plan.micro_batches[rank]):
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
        minutes = cfg.train.checkpoint_minutes
        due = minutes > 0 and time.perf_counter() - self._t_checkpoint >= 60 * minutes
        stats = torch.cat([step_sums, to_device(torch.tensor([tokens, flops, float(due)]), device)])
        # The step's one host sync: every rank learns the same loss, grad norm (already global) and checkpoint vote.
        *values, vote, norm = torch.cat([fdist.all_reduce_sum(stats), grad_norm.reshape(1).to(stats)]).tolist()
        self.step_lr = self.scheduler.get_last_lr()[0]  # this step's rate: the scheduler moves on below
        if math.isfinite(norm) and math.isfinite(values[1]):
            self.optimizer.step()
            self.consecutive_skips = 0
        else:
            self._skip(step, plan, norm, values[1])
        self.scheduler.step()  # the LR schedule follows the data position, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        return np.asarray(values), norm, vote > 0

    def log_row(self, step: int, plan, interval: _Interval, norm: float, bar) -> None:
        n_fields = len(MetricSums.FIELDS)
        elapsed = time.perf_counter() - interval.t_start
        peak = self.peak_flops
        row = {
            "split": "train", "step": step, "epoch": round(plan.epoch, 4),
            **MetricSums.report(torch.tensor(interval.sums[:n_fields])),
            "grad_norm": norm, "lr": self.step_lr,
            "tokens_per_s": interval.sums[n_fields] / elapsed, "pairs_per_s": interval.pairs / elapsed,
            "mfu": interval.sums[n_fields + 1] / elapsed / (peak * self.dist.world_size) if peak else None,
            "peak_mem_gib": self.peak_memory.report(),
        }
        self.last_row = row
        if self.logger:
            self.logger.write(row)
        bar.update(step, f"loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f} "
                         f"margin {row['rewards/margins']:.3f} {row['tokens_per_s']:.0f} tok/s")

    def pauses(self, step: int, last: bool, checkpoint_vote: bool, run_evals, checkpoint, export) -> float:
        """Evaluations, exports and checkpoints due after ``step``; returns the seconds they took."""
        cfg = self.cfg.train
        due_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0 and not last and run_evals
        due_ckpt = ((bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0) or checkpoint_vote)
        due_export = bool(cfg.export_every) and step % cfg.export_every == 0 and not last and export
        if not (due_eval or (due_ckpt and not last and checkpoint) or due_export):
            if due_ckpt:
                self._t_checkpoint = time.perf_counter()
            return 0.0
        t_pause = time.perf_counter()
        self.peak_memory.pause()  # peak memory counts the training steps only
        if due_eval:
            run_evals(step)
        # Export before checkpointing: a crash between the two then resumes from an earlier checkpoint and
        # rewrites this export, instead of resuming past it and never writing it (DESIGN §8.6).
        if due_export:
            export(step)
        if due_ckpt and not last and checkpoint:
            checkpoint(step)
        self.peak_memory.start()
        if due_ckpt:
            self._t_checkpoint = time.perf_counter()
        return time.perf_counter() - t_pause

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
