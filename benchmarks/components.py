"""Where a training step's time went, measured with torch.profiler, beside roofline.py's prediction for the same work.

Every profiled op's self time (device time on a GPU: its kernels; CPU time on a CPU) is put in one of
roofline.GROUPS by the first rule that matches the op or one of the ranges around it:

    optimizer step          inside torch.optim's "Optimizer.step#..." range
    FSDP2                   inside an "FSDP::..." range, or a collective (nccl / c10d / all_gather / reduce_scatter)
    LM head                 inside "fasttrain.lm_head" (the model's forward) or a fasttrain::lm_head_* op (the
                            Triton and chunked kernels, forward and backward)
    attention               inside "fasttrain.attention", or an op whose name says attention / attn (the flash and
                            varlen kernels, forward and backward)
    block GEMMs             mm, addmm, bmm
    element-wise and norms  everything else

The model's two ranges (decoder.profiler_range) exist only while a profiler records. What no rule can see: the
backward of the plain-PyTorch LM head (model.lm_head_impl=torch) and of the reference attention are generic
autograd ops, so on a CPU they count as GEMMs and element-wise work. The GPU paths (chunked / triton LM head,
flash or varlen attention) are attributed whole.
"""
from __future__ import annotations

import roofline

GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm"})
COLLECTIVE_WORDS = ("nccl", "c10d::", "all_gather", "reduce_scatter", "allgather", "reducescatter")


def classify(chain: list[str]) -> str:
    """The group of an op, given its name first and then the names of the ranges around it, innermost first."""
    op = chain[0]
    if any(n.startswith("Optimizer.step#") for n in chain):
        return "optimizer step"
    if any(n.startswith("FSDP::") for n in chain) or any(w in op.lower() for w in COLLECTIVE_WORDS):
        return "FSDP2"
    if any(n == "fasttrain.lm_head" or n.startswith("fasttrain::lm_head") for n in chain):
        return "LM head"
    if "fasttrain.attention" in chain or "attention" in op.lower() or "attn" in op.lower():
        return "attention"
    if op in GEMM_OPS:
        return "block GEMMs"
    return "element-wise and norms"


def measured_groups(prof, on_cuda: bool) -> dict[str, float]:
    """Seconds of self time per group over everything ``prof`` (a finished torch.profiler.profile) recorded."""
    out = dict.fromkeys(roofline.GROUPS, 0.0)
    for event in prof.events():
        us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if us <= 0:
            continue
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        out[classify(chain)] += us * 1e-6
    return out


def format_comparison(measured: dict[str, float], predicted: dict[str, float] | None, steps: int, wall_s: float,
                      card_name: str | None, on_cuda: bool) -> str:
    """Per group: measured ms per step, and where there is a card, the prediction and measured / predicted."""
    import benchlib

    head = ["component", "measured ms/step", "share"]
    if predicted is not None:
        head += [f"predicted ms/step ({card_name})", "measured / predicted"]
    rows = [head]
    total = sum(measured.values())
    for group in roofline.GROUPS:
        m = measured[group] / steps
        row = [group, f"{m * 1e3:.3g}", f"{measured[group] / total:.0%}" if total else "-"]
        if predicted is not None:
            p = predicted[group]
            row += [f"{p * 1e3:.3g}", f"{m / p:.3g}" if p > 0 else "-"]
        rows.append(row)
    row = ["sum of op self times", f"{total / steps * 1e3:.3g}", ""]
    if predicted is not None:
        p = sum(predicted.values())
        row += [f"{p * 1e3:.3g}", f"{total / steps / p:.3g}"]
    rows.append(row)
    rows.append(["wall clock", f"{wall_s / steps * 1e3:.3g}", ""] + (["", ""] if predicted is not None else []))
    note = ("\n(no prediction: roofline.py has ceilings for H100 and H200 only)" if predicted is None else "")
    if not on_cuda:
        note += "\n(measured on a CPU: CPU timings are not GPU claims" + (
            f"; the prediction is for an {card_name}, so the ratio is no check of the model)" if predicted else ")")
    return benchlib.text_table(rows, right=True) + note
