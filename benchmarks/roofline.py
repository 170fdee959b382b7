"""Speed of light of one Step-DPO training step: per component, the FLOPs, the bytes moved, the lower-bound time
max(FLOPs / bf16 ceiling, bytes / HBM bandwidth), then the predicted step time, pairs/s and MFU. Every number it
prints is PREDICTED, never measured (issue 15, part 3).

    python benchmarks/roofline.py                                  # the default scenarios on an H100 and an H200
    python benchmarks/roofline.py --card h200 --peak-tflops 790 --hbm-gbps 4300   # ceilings gpu_check measured
    python benchmarks/roofline.py --ceilings results/gpu_check.json               # ... read from its output

The model (T tokens per GPU per micro-batch, R LM-head rows, A attended key pairs, P_l one block's parameters,
L blocks, D hidden, F FFN width, V vocabulary, q / kv the attention widths; bf16 activations, 2 B):

* block GEMMs: 2 P_l T FLOPs per pass and block; passes: forward 1, backward 2 (dX, dW), recompute 1 more
  forward under full activation checkpointing (selective: only the element-wise work again). Bytes: the
  block's bf16 weights read once per pass (+ its gradient written in backward) and every GEMM's input and
  output, 2 T (4 D + 2 q + 2 kv + 3 F) per pass with fused q/k/v and gate/up projections; + 2 T 3 D for
  separate ones (the input read 5 times, not 2).
* attention: 4 q A FLOPs forward (QK^T, PV); backward 2.5x forward (flash-attention's recompute of P); bytes:
  q, k, v, o once per pass, 2 T (2 q + 2 kv).
* element-wise and norms: no FLOPs that matter; bytes per token per block and pass 2 (10 D + 2 (q + kv) + 3 F):
  two RMSNorms (read, write), two residual adds (2 reads, 1 write), RoPE on q and k, SwiGLU (2 reads, 1 write).
  Backward counts twice.
* LM head: 2 D V R forward, 4 D V R backward; bytes: the bf16 head read per pass, and where the logits are
  materialised (TRL) 30 B per logit: bf16 out 2, fp32 upcast 2 + 4, log_softmax 4 + 4, its backward 4 + 4 + 4,
  the cast back 2 + 4 (fasttrain's kernels never write them).
* optimizer: parameters per GPU x its traffic per parameter: fused fp32 AdamW + clip 40 B, torch's for-each 84 B,
  compact state 448 B (docs/DESIGN.md §6.9).
* FSDP2's copies (any N): the all-gather's copy-in (the local shard cast to bf16: 6 B per parameter / N, compact
  4) and copy-out (4 B), the reduce-scatter's copy-in (bf16 gradient to fp32: 6 B) and the shard's accumulation
  (12 B / N).
* FSDP2 (N > 1): a bf16 all-gather per forward and per backward pass, an fp32 reduce-scatter per micro-batch,
  ring time bytes (N-1)/N / bus bandwidth; overlapped with the blocks' compute except one block's gather and
  one block's reduce-scatter per micro-batch (FSDP2 prefetches one block ahead).

Every compute component runs at its bound, one after the other; the step is their sum + the exposed
communication + the optimizer. MFU counts the work fasttrain needs (fasttrain.flops.FlopModel: no recompute, no
padding, LM head on step rows only) over the step time x ceiling x GPUs, for both setups.

TRL's setup (DPOTrainer): each pair is two sequences, prompt + chosen and prompt + rejected, right-padded to
the longest in the micro-batch (padding factor = padded / real tokens), full-vocabulary logits on every token,
fp32 master weights cast to bf16 by autocast in every pass (6 B per parameter and pass), torch's for-each AdamW.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import benchlib

from fasttrain.flops import FlopModel, peak_bf16_tflops
from fasttrain.model.config import ModelConfig, layer_params, num_params

# TRL's measured step (issue 5): DPOTrainer with precompute_ref_log_probs on one H100 80GB, Qwen2-1.5B shape,
# 2048 synthetic pairs (mean prompt 308, steps 72 tokens), batch 8 x accumulation 2, gradient checkpointing:
# 13.7 pairs/s = 16 pairs in 1.17 s.
TRL_MEASURED_STEP_S = 16 / 13.7
LOGIT_BYTES_MATERIALISED = 30.0


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float
    hbm_gbps: float
    bus_gbps: float  # NCCL ring bus bandwidth between the node's GPUs


# ceilings: fasttrain.flops.peak_bf16_tflops (H100 measured 785; H200 the same chip, predicted), the copy
# bandwidths of benchlib.CARDS, and an NVLink 4 bus of ~360 GB/s (450 per direction, ~80%)
DEVICE_NAMES = {"H100": "NVIDIA H100 80GB HBM3", "H200": "NVIDIA H200"}  # as torch.cuda names them
CARDS = {key: Card(name, peak_bf16_tflops(DEVICE_NAMES[name]).tflops, copy_gbps, 360.0)
         for key, (name, _gib, copy_gbps) in benchlib.CARDS.items()}


def card_for_device(device_name: str, peak_tflops: float | None = None) -> Card | None:
    """The ceilings of the card torch names ``device_name`` (None for any other device), the bf16 one replaced by
    ``peak_tflops`` (e.g. what gpu_check measured) when given."""
    for card in CARDS.values():
        if card.name in device_name:
            return replace(card, bf16_tflops=peak_tflops or card.bf16_tflops)
    return None


@dataclass(frozen=True)
class Workload:
    shape: str  # benchlib.SHAPES key
    gpus: int
    pairs_per_step: int  # all GPUs together
    prompt_tokens: float  # mean per pair
    step_tokens: float  # mean per step, each of chosen and rejected
    micro_batches: int = 1  # per GPU per step
    recompute: bool = True  # full activation checkpointing of every block
    optimizer: str = "fused"  # benchlib.OPTIMIZER_BYTES key


@dataclass(frozen=True)
class Setup:
    name: str
    prefix_shared: bool = True  # the prompt once per pair (fasttrain), else once per sequence (TRL)
    padding_factor: float = 1.0  # padded tokens / real tokens
    logits_on_every_token: bool = False  # TRL: full-vocabulary logits on every position, materialised
    cast_weights_each_pass: bool = False  # fp32 master weights + autocast: a bf16 copy made per pass
    fused_projections: bool = True  # one q/k/v and one gate/up GEMM per block (model.fuse_projections)
    fsdp: bool = True  # parameters sharded by FSDP2 (its copies run at any world size); TRL's one GPU: none


FASTTRAIN = Setup("fasttrain")
TRL = Setup("TRL DPOTrainer", prefix_shared=False, logits_on_every_token=True, cast_weights_each_pass=True,
            fused_projections=False, fsdp=False)


@dataclass(frozen=True)
class Component:
    name: str
    flops: float
    bytes: float
    seconds: float  # lower bound: max(flops / ceiling, bytes / bandwidth), or link time for communication


@dataclass(frozen=True)
class Prediction:
    workload: Workload
    setup: Setup
    card: Card
    components: list[Component]
    step_s: float
    pairs_per_s: float
    mfu: float


def _bound(name: str, flops: float, nbytes: float, card: Card) -> Component:
    return Component(name, flops, nbytes, max(flops / (card.bf16_tflops * 1e12), nbytes / (card.hbm_gbps * 1e9)))


def geometry(w: Workload, s: Setup) -> tuple[float, float, float]:
    """(tokens, LM-head rows, attended key pairs) per GPU per micro-batch."""
    pairs = w.pairs_per_step / w.gpus / w.micro_batches
    p, st = w.prompt_tokens, w.step_tokens
    if s.prefix_shared:
        tokens = pairs * (p + 2 * st)
        attended = pairs * (p * p / 2 + 2 * st * (p + st / 2))
    else:
        tokens = pairs * 2 * (p + st) * s.padding_factor
        attended = pairs * 2 * ((p + st) * s.padding_factor) ** 2 / 2
    rows = tokens if s.logits_on_every_token else pairs * 2 * st
    return tokens, rows, attended


def predict(w: Workload, s: Setup, card: Card) -> Prediction:
    cfg: ModelConfig = benchlib.model_config(w.shape)
    T, R, A = geometry(w, s)
    m = w.micro_batches
    comps = components(cfg, Geometry(m * T, m * R, m * A, m), w.gpus, "full" if w.recompute else "none", w.optimizer,
                       s, card)
    step = sum(c.seconds for c in comps)
    tokens, rows, attended = geometry(w, FASTTRAIN)  # the work fasttrain needs, whatever the setup does
    needed = FlopModel.of(cfg).batch(int(tokens), int(attended), int(rows), train=True) * m
    mfu = needed / (step * card.bf16_tflops * 1e12)
    return Prediction(w, s, card, comps, step, w.pairs_per_step / step, mfu)


@dataclass(frozen=True)
class Geometry:
    """One GPU's work in one step, summed over its micro-batches: tokens in the (packed or padded) stream, LM-head
    rows, attended (query, key) pairs."""
    tokens: float
    rows: float
    attended: float
    micro_batches: int


def components(cfg: ModelConfig, g: Geometry, gpus: int, recompute: str, optimizer: str, s: Setup, card: Card,
               live_reference: bool = False) -> list[Component]:
    """The step's components at their bounds. ``recompute``: none | selective (the element-wise work again) | full
    (the block's forward again); ``live_reference``: a frozen bf16 copy's forward on the same batch."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.q_dim, cfg.kv_dim
    p_layer = layer_params(cfg)
    params = num_params(cfg)
    T, R, A, m = g.tokens, g.rows, g.attended, g.micro_batches
    passes_fwd = 2 if recompute == "full" else 1  # forward + the recompute forward
    # inputs 2 D + q + F and outputs 2 D + q + 2 kv + 2 F; separate projections read their input 5 times, not 2
    gemm_io = 2 * T * (4 * D + 2 * q + 2 * kv + 3 * F + (0 if s.fused_projections else 3 * D))
    elementwise = 2 * T * (10 * D + 2 * (q + kv) + 3 * F) * L
    cast = 6 * p_layer * L * m if s.cast_weights_each_pass else 0.0  # read fp32 4 + write bf16 2 per pass

    def blocks(passes: float, backward: bool) -> tuple[float, float]:
        flops = 2 * p_layer * T * L * passes
        weights = m * (passes * 2 * p_layer * L + (2 * p_layer * L if backward else 0))
        return flops, weights + passes * (gemm_io * L + cast)

    comps = []
    comps.append(_bound("block GEMMs, forward", *blocks(1, False), card))
    comps.append(_bound("block GEMMs, backward", *blocks(2, True), card))
    attn_fwd = 4 * q * A * L
    attn_io = 2 * T * (2 * q + 2 * kv) * L
    comps.append(_bound("attention, forward + backward", attn_fwd * 3.5, attn_io * 3, card))
    comps.append(_bound("element-wise and norms, forward + backward", 0.0, elementwise * 3, card))
    if recompute == "full":
        comps.append(_bound("recompute: block GEMMs", *blocks(1, False), card))
        comps.append(_bound("recompute: attention", attn_fwd, attn_io, card))
    if recompute in ("full", "selective"):
        comps.append(_bound("recompute: element-wise and norms", 0.0, elementwise, card))
    head = 2 * D * V
    logits = LOGIT_BYTES_MATERIALISED * R * V if s.logits_on_every_token else 0.0
    comps.append(_bound("LM head, forward + backward", 3 * head * R, m * 3 * D * V * 2 + logits, card))
    if live_reference:  # bf16 weights, no gradients, no recompute
        comps.append(_bound("live reference: block GEMMs", 2 * p_layer * T * L, m * 2 * p_layer * L + gemm_io * L,
                            card))
        comps.append(_bound("live reference: attention", attn_fwd, attn_io, card))
        comps.append(_bound("live reference: element-wise and norms", 0.0, elementwise, card))
        comps.append(_bound("live reference: LM head", head * R, m * 2 * D * V + logits / 3, card))
    comps.append(_bound(f"optimizer step ({optimizer})", 0.0, params / gpus * benchlib.OPTIMIZER_BYTES[optimizer],
                        card))
    # FSDP2's copies around every collective, at any world size: the gather's copy-in casts the local fp32 shard
    # (compact: bf16) into the bf16 buffer and its copy-out writes the gathered parameters (2 + 2 B); the
    # reduce-scatter's copy-in upcasts the bf16 gradient to fp32 (2 + 4 B) and the shard is accumulated (3 x 4 / N).
    gathers = m * (passes_fwd + 1)
    gather_copy = params * ((4 if optimizer == "compact" else 6) / gpus + 4)
    scatter_copy = params * (6 + 12 / gpus)
    if s.fsdp:
        comps.append(_bound("FSDP2 copy-in/out around the collectives", 0.0,
                            gathers * gather_copy + m * scatter_copy, card))
    if gpus > 1 and s.fsdp:
        ring = (gpus - 1) / gpus / (card.bus_gbps * 1e9)
        gather = 2 * params * ring * (passes_fwd + 1)  # forward, recompute, backward (blocks reshard after forward)
        scatter = 4 * params * ring
        comm = m * (gather + scatter)
        compute = sum(c.seconds for c in comps if not c.name.startswith(("optimizer", "FSDP2")))
        exposed = max(comm - compute, 0.0) + m * (gather + scatter) / L  # the first gather and the last scatter
        comps.append(Component(f"FSDP2 all-gather + reduce-scatter ({comm * 1e3:.0f} ms on the link, overlapped)",
                               0.0, m * params * (2 * (passes_fwd + 1) + 4) * (gpus - 1) / gpus, exposed))
    return comps


# What a profiler can tell apart (benchmarks/components.py): each predicted component belongs to one group.
GROUPS = ("block GEMMs", "attention", "element-wise and norms", "LM head", "optimizer step", "FSDP2")


def group_of(component_name: str) -> str:
    for group in GROUPS:
        if group.split()[0] in component_name:
            return group
    raise ValueError(f"component {component_name!r} belongs to no group of {GROUPS}")


def predicted_groups(comps: list[Component]) -> dict[str, float]:
    """Predicted seconds per group (recompute and a live reference's forward in the group of their kind)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for c in comps:
        out[group_of(c.name)] += c.seconds
    return out


def scenarios() -> list[tuple[str, Workload, Setup]]:
    """The shapes issue 15 names: Qwen2-1.5B and Llama-3-8B on one GPU, Qwen2-72B on 8 GPUs of a node with fp32
    and with compact optimizer state; and TRL's measured setup (issue 5's shape, padding of its lengths)."""
    trl_shape = Workload("qwen2-1.5b", 1, 16, 308.0, 72.0, micro_batches=2, optimizer="foreach")
    pad = trl_padding_factor()
    return [
        ("Qwen2-1.5B, 1 GPU, 128 pairs/step", Workload("qwen2-1.5b", 1, 128, 260.0, 45.0, micro_batches=4), FASTTRAIN),
        ("Llama-3-8B, 1 GPU, 128 pairs/step", Workload("llama3-8b", 1, 128, 260.0, 45.0, micro_batches=4), FASTTRAIN),
        ("Qwen2-72B, 8 GPUs, fp32 state", Workload("qwen2-72b", 8, 128, 260.0, 45.0, micro_batches=1), FASTTRAIN),
        ("Qwen2-72B, 8 GPUs, compact state",
         Workload("qwen2-72b", 8, 128, 260.0, 45.0, micro_batches=1, optimizer="compact"), FASTTRAIN),
        ("issue 5's shape, fasttrain", replace(trl_shape, optimizer="fused"), FASTTRAIN),
        (f"issue 5's shape, TRL (padding x{pad:.2f})", trl_shape, replace(TRL, padding_factor=pad)),
    ]


def trl_padding_factor(prompt=(96, 512), step=(16, 128), sequences: int = 16, draws: int = 4000, seed: int = 0
                       ) -> float:
    """Padded / real tokens of ``sequences`` right-padded sequences of uniform prompt + step lengths (issue 5's
    synthetic data, 8 pairs x 2 sequences per micro-batch), by sampling."""
    import random

    rng = random.Random(seed)
    real = padded = 0
    for _ in range(draws):
        lengths = [rng.randint(*prompt) + rng.randint(*step) for _ in range(sequences)]
        real += sum(lengths)
        padded += max(lengths) * sequences
    return padded / real


def card_from(args) -> Card:
    card = CARDS[args.card]
    if args.ceilings:
        stages = json.loads(Path(args.ceilings).read_text())["stages"]
        env = next(s for s in stages if s["key"] == "env")["data"]
        card = replace(card, bf16_tflops=env.get("bf16_tflops") or card.bf16_tflops,
                       hbm_gbps=env.get("copy_gbps") or card.hbm_gbps)
    return replace(card, bf16_tflops=args.peak_tflops or card.bf16_tflops, hbm_gbps=args.hbm_gbps or card.hbm_gbps,
                   bus_gbps=args.bus_gbps or card.bus_gbps)


def format_prediction(title: str, p: Prediction) -> list[str]:
    rows = [["component", "TFLOP", "GB moved", "lower bound (ms)", "share"]]
    for c in p.components:
        rows.append([c.name, f"{c.flops / 1e12:.2f}", f"{c.bytes / 1e9:.1f}", f"{c.seconds * 1e3:.1f}",
                     f"{c.seconds / p.step_s:.0%}"])
    return [f"== PREDICTED: {title} on {p.workload.gpus} x {p.card.name} ({p.setup.name}) ==",
            benchlib.text_table(rows),
            f"step {p.step_s:.3f} s, {p.pairs_per_s:.1f} pairs/s, MFU {p.mfu:.0%} (the work fasttrain needs, over "
            f"{p.card.bf16_tflops:.0f} TFLOP/s x {p.workload.gpus}), HBM {p.card.hbm_gbps:.0f} GB/s", ""]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", choices=sorted(CARDS), default=None, help="one card (default: both)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 ceiling to use (e.g. gpu_check's)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="copy bandwidth to use (e.g. gpu_check's)")
    ap.add_argument("--bus-gbps", type=float, default=None, help="NCCL bus bandwidth between the GPUs")
    ap.add_argument("--ceilings", default="", help="gpu_check.json: its stage 0 ceilings replace the card's")
    args = ap.parse_args(argv)
    lines = []
    for key in [args.card] if args.card else sorted(CARDS):
        card = card_from(argparse.Namespace(**{**vars(args), "card": key}))
        for title, workload, setup in scenarios():
            lines += format_prediction(title, predict(workload, setup, card))
    h100 = card_from(argparse.Namespace(**{**vars(args), "card": "h100"}))
    trl = next(predict(w, s, h100) for t, w, s in scenarios() if s.name.startswith("TRL"))
    lines.append(f"check against one measurement: TRL on one H100 (issue 5) took {TRL_MEASURED_STEP_S:.2f} s per "
                 f"16-pair step; the model's lower bound is {trl.step_s:.2f} s: measured / predicted = "
                 f"{TRL_MEASURED_STEP_S / trl.step_s:.2f} (the model predicts the speed of light, so this is how "
                 "far from it TRL runs, not an error bar on fasttrain)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
