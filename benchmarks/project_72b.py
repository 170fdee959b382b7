"""Measure Qwen2-72B-shaped decoder layers on one GPU, then project the official Step-DPO recipe onto 8 and 32 H100s.

Part 1, measurement (issue 5). A few real ``fasttrain`` DecoderLayers with the Qwen2-72B shape (hidden 8192, 64
heads, 8 KV heads, FFN 29568; bf16 on CUDA) run forward + backward on a Step-DPO-shaped packed micro-batch built by
``fasttrain.packing`` (so attention is the real prefix-shared varlen path of ``resolve_backend('auto')``), with and
without activation checkpointing exactly as the trainer does it (``DecoderLayer(..., recompute=True)``). Times are
CUDA events, the median of ``--reps`` after ``--warmup``; memory is ``torch.cuda.max_memory_allocated``. The LM head
(V=152064, D=8192) runs on the micro-batch's step rows (``--lm-head torch|triton``), and every layer also runs
forward-only (the reference pass). Per-layer numbers are the stack's total / ``--layers``, scaled to 80 layers.

Part 2, projection: ``project()`` is a pure function (dataclasses in, dataclass out) of the measured per-layer
times, the model's parameter counts (``fasttrain.model.config.num_params``), the cluster and the recipe
(10,795 pairs x 4 epochs, 128 pairs per step, DESIGN §1). Its model, every number of which is a flag:

* Steps: ceil(10795 / 128) * 4 = 340 (the official per-epoch count; fasttrain's continuous plan runs 337).
  Tokens per GPU per step = 128 pairs x tokens/pair / GPUs, split into ceil(. / token budget) micro-batches.
  tokens/pair defaults to 350 (DESIGN §7's estimate for the real set: ~260-token prompt + two ~45-token steps).
* Compute: measured per-layer forward / backward (backward includes the recompute) and LM-head times, scaled
  linearly in tokens (rows for the LM head) from the measurement nearest in size.
* FSDP2 communication, ring collectives: t = bytes * (N-1)/N / bus bandwidth. Per layer and micro-batch: a bf16
  all-gather (2 B/param) in forward and again in backward (blocks are resharded after forward), an fp32
  reduce-scatter (4 B/param, DESIGN §6 reduce_dtype) in backward. Bus bandwidth: NVLink inside a node; across
  nodes min(NVLink, 8 NICs x IB per GPU), i.e. rail-optimised rings that use every NIC of a node.
* Overlap: FSDP2 prefetches one layer ahead, so a layer costs max(compute, communication); the root's
  (embedding + LM head) gather and the first layer's gather are exposed before forward, the last layer's and
  the root's reduce-scatters after backward. All-gather and reduce-scatter share the link in backward.
* CPU offload (FSDP2 CPUOffloadPolicy, what ``model.cpu_offload=true`` does) when the plan does not fit the card:
  sharded fp32 params, grads and AdamW state live in host memory; every all-gather first copies its fp32 shard
  host-to-device (4 B/param/N over PCIe), every reduce-scatter copies its fp32 shard back, and AdamW runs on the
  CPU at the host memory bandwidth. Without offload AdamW runs on the GPU at HBM bandwidth. The model assumes
  asynchronous gradient copies, which FSDP2 makes only when no gradient is being accumulated: with more than
  one micro-batch per GPU per step, the second one's copies block the host and add on the CPU, which this
  does not model (the projection then says so; the real recipe at 8 GPUs is one micro-batch per step).
* Optimizer bytes/param: the trainer builds a fused AdamW on CUDA and on CPU-offloaded shards (one pass: read
  p, g, m, v, write p, m, v = 28 B), plus clip_grad_norm_ 12 B (norm read 4 + scale 8) = 40 B (the default);
  ``--adam torch`` models torch's for-each update instead: lerp 12 + mul 8 + addcmul 12 + sqrt 8 + div 8 +
  add 8 + addcdiv 16 = 72 B, + 12 = 84 B.
* Reference pass (``loss.reference=precompute``): forward-only over the 10,795 pairs once, at the token budget.

    python benchmarks/project_72b.py                       # measure on the GPU, project 8 and 32 GPUs
    python benchmarks/project_72b.py --smoke               # tiny shape, runs on a CPU in seconds
    python benchmarks/project_72b.py --from-json m.json    # re-project saved measurements with other flags
    python benchmarks/project_72b.py --predict-mfu 0.5 --card h200 --optimizer-state compact   # no GPU: predicted
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import torch

from fasttrain import activation_memory
from fasttrain.attention import resolve_backend
from fasttrain.flops import FlopModel, peak_bf16_tflops
from fasttrain.model.config import ModelConfig, layer_params, num_params
from fasttrain.model.decoder import DecoderLayer
from fasttrain.model.rope import inv_freq, rope_cos_sin
from fasttrain.packing import PackedBatch, pack_groups

DEFAULT_CONFIG = benchlib.REPO / "fasttrain" / "configs" / "stepdpo_qwen2_72b.yaml"
OFFICIAL_HOURS = 20.0  # the official recipe's wall time for Qwen2-72B on 8 x A100 (issue 5)
TARGET_HOURS = 1.0  # issue 5's target on 8 x H100
GIB = float(benchlib.GIB)
# The projection's target card (8 / 32 x H100 SXM): its measured dense bf16 ceiling, for the TFLOP/s legend
H100_BF16_TFLOPS = peak_bf16_tflops("NVIDIA H100 80GB HBM3").tflops
# --smoke: benchlib's tiny shape, prompts U[16, 48] and steps U[4, 12] tokens (48 per pair, 16 LM rows),
# 256-token micro-batches, so 8 GPUs get 3 micro-batches per step (a reduce-scatter after each) and 32 GPUs one.
SMOKE_BUDGET = 256
SMOKE_PAIR = (48.0, 16.0)


@dataclass(frozen=True)
class ParamCounts:
    layers: int
    params_total: int
    params_layer: int  # one decoder block
    params_root: int  # what fully_shard(model) owns: embedding, final norm, LM head
    hidden: int
    vocab: int

    @staticmethod
    def of(cfg: ModelConfig) -> ParamCounts:
        total = num_params(cfg)
        blocks = num_params(cfg, include_embeddings=False) - cfg.hidden_size  # minus the final norm
        if blocks % cfg.num_hidden_layers:
            raise ValueError(f"{blocks} block parameters do not split over {cfg.num_hidden_layers} layers")
        per_layer = blocks // cfg.num_hidden_layers
        return ParamCounts(cfg.num_hidden_layers, total, per_layer, total - blocks, cfg.hidden_size, cfg.vocab_size)


# ==============================================================================================
# Projection (pure: dataclasses in, dataclass out)
# ==============================================================================================
@dataclass(frozen=True)
class Measured:
    """Per decoder layer (the stack's total / layers measured) and the LM head, on one micro-batch."""

    tokens: int
    lm_rows: int
    recompute: bool
    layer_fwd_s: float  # training forward (under checkpoint when recompute)
    layer_bwd_s: float  # backward, including the recompute forward when recompute
    layer_fwd_nograd_s: float  # forward-only (reference pass)
    lm_head_train_s: float  # forward + backward on lm_rows rows
    lm_head_fwd_s: float  # forward-only
    act_saved_bytes_per_layer: float  # kept from forward to backward, per layer
    act_transient_bytes: float  # extra peak while one layer runs backward
    lm_head_transient_bytes: float  # extra peak of the LM head's forward + backward
    memory_source: str = "cuda allocator"


@dataclass(frozen=True)
class Cluster:
    n_gpus: int
    gpus_per_node: int = 8
    nvlink_gbps: float = 360.0  # NCCL bus bandwidth inside a node (NVLink 4: 450 GB/s per direction, ~80%)
    ib_gbps_per_gpu: float = 40.0  # one 400 Gb/s NDR NIC per GPU = 50 GB/s line rate, ~80%
    pcie_gbps: float = 25.0  # host<->GPU per GPU when all copy at once (Gen5 x16 ~50 GB/s, 2 GPUs per switch)
    host_gbps_per_node: float = 350.0  # CPU AdamW memory traffic, 2 sockets x 8 DDR5-4800 = 614 GB/s peak, ~57%
    hbm_gbps: float = 3000.0  # device copy measured on the H100 here (DESIGN §6)
    card_gib: float = 79.6  # H100 80 GB as the driver reports it
    reserve_gib: float = 5.0  # CUDA context, NCCL buffers, allocator fragmentation
    card: str = "H100"

    @property
    def nodes(self) -> int:
        return math.ceil(self.n_gpus / self.gpus_per_node)

    @property
    def gpus_on_node(self) -> int:
        return min(self.n_gpus, self.gpus_per_node)


@dataclass(frozen=True)
class Recipe:
    pairs: int = 10795  # Math-Step-DPO-10K
    epochs: int = 4  # > 30B models (DESIGN §1)
    global_batch: int = 128
    token_budget: int = 8192  # train.tokens_per_micro_batch of configs/stepdpo_qwen2_72b.yaml
    tokens_per_pair: float = 350.0  # DESIGN §7 estimate for the real set: 260 prompt + 2 x 45 step tokens
    lm_rows_per_pair: float = 90.0  # one LM-head row per step token


@dataclass(frozen=True)
class Strategy:
    recompute: bool = True  # model.activation_checkpointing of the 72B config
    offload: str = "auto"  # auto (offload when the GPU plan does not fit) | on | off
    adam_bytes_per_param: float = 40.0  # see the module docstring
    optimizer_state: str = "fp32"  # train.optimizer_state: fp32 (16 B/param) | compact (10 B/param)


@dataclass
class MemoryPlan:
    """Bytes per GPU; the peak is the larger of 'during backward' and 'end of backward' plus the reserve."""

    items: dict[str, float]
    peak_bytes: float
    card_bytes: float
    host_bytes_per_node: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.card_bytes


@dataclass
class StepTimes:
    """Seconds per optimizer step, and the raw per-layer transfers behind them."""

    layers_compute: float
    lm_head_compute: float
    exposed_comm: float
    optimizer: float
    ag_layer: float
    rs_layer: float
    h2d_layer: float
    d2h_layer: float

    @property
    def total(self) -> float:
        return self.layers_compute + self.lm_head_compute + self.exposed_comm + self.optimizer


@dataclass
class Projection:
    n_gpus: int
    nodes: int
    steps: int
    micro_batches: int
    tokens_per_micro: float
    offload: bool
    step: StepTimes
    reference_s: float
    components_s: dict[str, float]
    memory: MemoryPlan
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.components_s.values())

    @property
    def dominant(self) -> str:
        return max(self.components_s, key=self.components_s.get)


def optimizer_steps(pairs: int, global_batch: int, epochs: int) -> int:
    """The official (HF Trainer) count: every epoch ends with a partial batch."""
    return math.ceil(pairs / global_batch) * epochs


def bus_bandwidth(c: Cluster) -> float:
    """bytes/s. Across nodes a ring crosses every node boundary; with one NIC per GPU and one ring per NIC the
    boundary carries gpus_per_node NICs' worth."""
    nvlink = c.nvlink_gbps * 1e9
    if c.n_gpus <= c.gpus_per_node:
        return nvlink
    return min(nvlink, c.gpus_per_node * c.ib_gbps_per_gpu * 1e9)


def collective_s(nbytes: float, c: Cluster) -> float:
    """Ring all-gather / reduce-scatter of a tensor of nbytes (unsharded): each rank moves (N-1)/N of it."""
    return nbytes * (c.n_gpus - 1) / c.n_gpus / bus_bandwidth(c)


def pick(measured: Sequence[Measured], tokens: float, recompute: bool) -> Measured:
    """The measurement nearest in tokens (per-token rates drift with matmul size) in the asked mode."""
    same = [m for m in measured if m.recompute == recompute]
    if not same:
        raise ValueError(f"no measurement with recompute={recompute}; measure both modes or change the strategy")
    return min(same, key=lambda m: (abs(math.log(m.tokens / tokens)), -m.tokens))


@dataclass(frozen=True)
class _Micro:
    """One micro-batch on one GPU (tokens, LM rows), with the layer/LM numbers scaled to it."""

    tokens: float
    rows: float
    fwd: float
    bwd: float
    fwd_nograd: float
    lm_train: float
    lm_fwd: float
    saved: float
    transient: float
    lm_transient: float


def scale(m: Measured, tokens: float, rows: float) -> _Micro:
    t, r = tokens / m.tokens, rows / m.lm_rows
    return _Micro(tokens, rows, m.layer_fwd_s * t, m.layer_bwd_s * t, m.layer_fwd_nograd_s * t,
                  m.lm_head_train_s * r, m.lm_head_fwd_s * r, m.act_saved_bytes_per_layer * t,
                  m.act_transient_bytes * t, m.lm_head_transient_bytes * r)


STATE_NAMES = {"fp32": "fp32 master + grads + AdamW m, v",
               "compact": "bf16 weights + master low bits + bf16 grads + bf16 m, v"}
# (weight, gradient) bytes per parameter of the sharded state: what CPU offload copies per gather / reduce-scatter
STATE_COPY_BYTES = {"fp32": (4.0, 4.0), "compact": (2.0, 2.0)}
CARDS = benchlib.CARDS  # --card presets


def optimizer_bytes(optimizer_state: str, adam: str) -> float:
    """benchlib.OPTIMIZER_BYTES for train.optimizer_state and --adam (compact has its own update)."""
    return benchlib.OPTIMIZER_BYTES["compact" if optimizer_state == "compact" else
                                    {"fused": "fused", "torch": "foreach"}[adam]]


def memory_plan(shape: ParamCounts, c: Cluster, mb: _Micro, offload: bool, optimizer_state: str = "fp32"
                ) -> MemoryPlan:
    from fasttrain.compact_adamw import STATE_BYTES_PER_PARAM

    P, Pl, Pr, N = shape.params_total, shape.params_layer, shape.params_root, c.n_gpus
    state_bytes = STATE_BYTES_PER_PARAM[optimizer_state]
    state = 0.0 if offload else state_bytes * P / N
    name = STATE_NAMES[optimizer_state]
    items = {
        f"{name}: in host memory (CPU offload)" if offload else f"{name} ({state_bytes} B/param / GPUs)": state,
        "root (embedding + LM head) gathered bf16, held forward->backward": 2.0 * Pr,
        "root bf16 grads (LM head's from the start of backward)": 2.0 * Pr,
        # two gathered blocks (current + prefetched), one block's bf16 grads and its fp32 reduce-scatter input
        "blocks in flight: 2 gathered bf16 + bf16 grads + fp32 RS buffer": (2 * 2.0 + 2.0 + 4.0) * Pl,
        f"activations: {shape.layers} layers x saved + one layer's backward / LM head peak":
            shape.layers * mb.saved + max(mb.transient, mb.lm_transient),
    }
    during_bwd = sum(items.values())
    # after the last block: root params and grads (bf16) and the root's fp32 reduce-scatter input
    end_of_bwd = state + (2.0 + 2.0 + 4.0) * Pr
    reserve = c.reserve_gib * GIB
    items["reserve (CUDA context, NCCL, fragmentation)"] = reserve
    host = state_bytes * P / N * c.gpus_on_node if offload else 0.0
    return MemoryPlan(items, max(during_bwd, end_of_bwd) + reserve, c.card_gib * GIB, host)


def _transfers(shape: ParamCounts, c: Cluster, offload: bool, optimizer_state: str = "fp32") -> dict[str, float]:
    """Seconds per block (and for the root) of each transfer."""
    pcie = c.pcie_gbps * 1e9
    weight_b, grad_b = STATE_COPY_BYTES[optimizer_state]
    per = {}
    for name, n in (("layer", shape.params_layer), ("root", shape.params_root)):
        per[f"ag_{name}"] = collective_s(2.0 * n, c)  # bf16 params
        per[f"rs_{name}"] = collective_s(4.0 * n, c)  # fp32 grads
        per[f"h2d_{name}"] = weight_b * n / c.n_gpus / pcie if offload else 0.0  # the shard before the gather
        per[f"d2h_{name}"] = grad_b * n / c.n_gpus / pcie if offload else 0.0  # the grad shard after the RS
    return per


def micro_batch_s(shape: ParamCounts, mb: _Micro, x: dict[str, float]) -> tuple[float, float]:
    """(wall, compute) seconds of one training micro-batch under the overlap model (module docstring); the
    trainer reduce-scatters gradients after every micro-batch."""
    L = shape.layers
    rs, d2h = x["rs_layer"], x["d2h_layer"]
    c_fwd = max(x["ag_layer"], x["h2d_layer"])  # copy-in stream and all-gather stream pipeline over layers
    c_bwd = max(x["h2d_layer"], x["ag_layer"] + rs, rs + d2h)  # AG and RS share the link
    fwd = x["ag_root"] + x["h2d_root"] + c_fwd + L * max(mb.fwd, c_fwd)
    root_rs = x["rs_root"] + x["d2h_root"]
    bwd = L * max(mb.bwd, c_bwd) + rs + d2h + root_rs
    compute = L * (mb.fwd + mb.bwd) + mb.lm_train
    return fwd + bwd + mb.lm_train, compute


def reference_pass_s(shape: ParamCounts, m: Measured, c: Cluster, r: Recipe, x: dict[str, float]) -> float:
    """Forward-only over every pair once, at the token budget, gathering every block once per micro-batch."""
    tokens_gpu = r.pairs * r.tokens_per_pair / c.n_gpus
    n_micro = math.ceil(tokens_gpu / r.token_budget)
    t = tokens_gpu / n_micro
    mb = scale(m, t, t / r.tokens_per_pair * r.lm_rows_per_pair)
    c_fwd = max(x["ag_layer"], x["h2d_layer"])
    one = x["ag_root"] + x["h2d_root"] + c_fwd + shape.layers * max(mb.fwd_nograd, c_fwd) + mb.lm_fwd
    return n_micro * one


def _micro_geometry(r: Recipe, c: Cluster) -> tuple[int, float]:
    if r.tokens_per_pair > r.token_budget:
        raise ValueError(f"tokens per pair {r.tokens_per_pair} exceed the micro-batch budget {r.token_budget}")
    tokens_gpu = r.global_batch * r.tokens_per_pair / c.n_gpus
    n_micro = max(1, math.ceil(tokens_gpu / r.token_budget))
    return n_micro, tokens_gpu / n_micro


def plan_memory(shape: ParamCounts, c: Cluster, s: Strategy, mb: _Micro) -> tuple[bool, MemoryPlan, list[str]]:
    """(offload, memory plan, notes): CPU offload when asked, or (auto) when the plan does not fit the card."""
    if s.offload not in ("auto", "on", "off"):
        raise ValueError(f"offload {s.offload!r}: expected auto, on or off")
    notes: list[str] = []
    on_gpu = memory_plan(shape, c, mb, False, s.optimizer_state)
    offload = s.offload == "on" or (s.offload == "auto" and not on_gpu.fits)
    mem = memory_plan(shape, c, mb, True, s.optimizer_state) if offload else on_gpu
    if not mem.fits:
        notes.append(f"does not fit even {'with' if offload else 'without'} CPU offload: "
                     f"{mem.peak_bytes / GIB:.1f} GiB > {c.card_gib} GiB")
    if offload:
        per_rank = c.host_gbps_per_node / c.gpus_on_node
        notes.append(f"CPU offload: host memory {mem.host_bytes_per_node / 1e12:.2f} TB per node (pinned); "
                     f"AdamW at {per_rank:.1f} GB/s per rank needs ~{per_rank / 12:.0f} CPU threads per rank at "
                     "~12 GB/s each (torchrun sets OMP_NUM_THREADS=1)")
    return offload, mem, notes


def step_times(shape: ParamCounts, c: Cluster, s: Strategy, mb: _Micro, n_micro: int, offload: bool,
               x: dict[str, float]) -> StepTimes:
    wall, compute = (n_micro * t for t in micro_batch_s(shape, mb, x))  # every micro-batch costs the same
    adam_bw = c.host_gbps_per_node * 1e9 / c.gpus_on_node if offload else c.hbm_gbps * 1e9
    opt = shape.params_total / c.n_gpus * s.adam_bytes_per_param / adam_bw
    return StepTimes(n_micro * shape.layers * (mb.fwd + mb.bwd), n_micro * mb.lm_train, wall - compute, opt,
                     x["ag_layer"], x["rs_layer"], x["h2d_layer"], x["d2h_layer"])


def project(shape: ParamCounts, measured: Sequence[Measured], c: Cluster, r: Recipe, s: Strategy) -> Projection:
    steps = optimizer_steps(r.pairs, r.global_batch, r.epochs)
    n_micro, tokens = _micro_geometry(r, c)
    mb = scale(pick(measured, tokens, s.recompute), tokens, tokens / r.tokens_per_pair * r.lm_rows_per_pair)
    offload, mem, notes = plan_memory(shape, c, s, mb)
    x = _transfers(shape, c, offload, s.optimizer_state)
    step = step_times(shape, c, s, mb, n_micro, offload, x)
    ref = reference_pass_s(shape, pick(measured, r.token_budget, s.recompute), c, r, x)
    components = {
        "decoder layers fwd" + (" + recompute" if s.recompute else "") + " + bwd": steps * step.layers_compute,
        "LM head fwd + bwd (step rows)": steps * step.lm_head_compute,
        "exposed FSDP comm (AG bf16, RS fp32" + (", H2D/D2H" if offload else "") + ")": steps * step.exposed_comm,
        f"optimizer step ({s.optimizer_state} AdamW + clip on {'CPU, offloaded' if offload else 'GPU'})":
            steps * step.optimizer,
        "reference pass (forward over all pairs once)": ref,
    }
    return Projection(c.n_gpus, c.nodes, steps, n_micro, tokens, offload, step, ref, components, mem, notes)


def optimizer_budget_s(p: Projection, target_s: float) -> float:
    """Seconds per step the optimizer could take for the run to meet target_s (negative: impossible)."""
    other = p.total_s - p.components_s[next(k for k in p.components_s if k.startswith("optimizer"))]
    return (target_s - other) / p.steps


# ==============================================================================================
# Measurement
# ==============================================================================================
def synth_batch(budget: int, prompt_range: tuple[int, int], step_range: tuple[int, int], vocab: int,
                seed: int = 0) -> PackedBatch:
    """Step-DPO-shaped pairs (benchlib's synthetic data: one prompt, one chosen and one rejected step each,
    DESIGN §7.5) packed with the trainer's packing until the next pair would overflow the token budget."""
    groups = benchlib.synthetic_groups(budget // (prompt_range[0] + 2 * step_range[0]) + 1, vocab,
                                       benchlib.Lengths(prompt_range, step_range), seed=seed)
    fit, used = [], 0
    for g in groups:
        if used + g.num_tokens > budget:
            break
        fit.append(g)
        used += g.num_tokens
    if not fit:
        raise ValueError(f"token budget {budget} is smaller than one pair (prompt {prompt_range}, steps {step_range})")
    return pack_groups(fit)


@torch.no_grad()
def build_layers(cfg: ModelConfig, n: int, device: torch.device, dtype: torch.dtype) -> torch.nn.ModuleList:
    """n DecoderLayers materialised straight on the device (a 72B layer is 1.76 GB in bf16), weights ~ N(0, 0.02)."""
    with torch.device("meta"):
        layers = torch.nn.ModuleList(DecoderLayer(cfg) for _ in range(n))
    layers.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy is ever allocated
    for name, p in layers.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
    return layers


def _drop_grads(module: torch.nn.Module) -> None:
    """Free each weight gradient as soon as it is accumulated, as FSDP2 does after its reduce-scatter, so
    the backward peak is the activations' and not L layers of grads."""
    for p in module.parameters():
        p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves for backward while fn runs (distinct storages, leaves in ``exclude`` not counted).
    The CPU's stand-in for the allocator; activation checkpointing hides its saves from these hooks."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@dataclass
class LayerRun:
    """Everything one layer stack needs to run on a packed batch."""

    layers: torch.nn.ModuleList
    batch: PackedBatch
    h_TD: torch.Tensor
    cos_TH: torch.Tensor
    sin_TH: torch.Tensor
    backend: str
    compiled: bool = False  # DecoderLayer's torch.compile'd regions (where the decoder has them)

    def forward(self, recompute: bool) -> torch.Tensor:
        h_TD = self.h_TD
        extra = {"compiled": True} if self.compiled else {}
        for layer in self.layers:
            h_TD = layer(h_TD, self.cos_TH, self.sin_TH, self.batch.attn, self.backend, recompute, **extra)
        return h_TD


def make_layer_run(cfg: ModelConfig, layers, batch: PackedBatch, device, dtype, backend: str,
                   compiled: bool = False) -> LayerRun:
    batch = batch.to(device)
    cos_TH, sin_TH = rope_cos_sin(inv_freq(cfg.rope, cfg.head_dim).to(device), batch.position_ids_T, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    # The embedding output: unit-scale rows, a leaf that wants a gradient like the embedding's output does.
    h_TD = torch.randn(batch.num_tokens, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    return LayerRun(layers, batch, h_TD.requires_grad_(), cos_TH, sin_TH, backend, compiled)


def time_train(run: LayerRun, recompute: bool, clock: benchlib.Clock, warmup: int, reps: int) -> tuple[float, float]:
    """Seconds over the stack: training forward, backward (with the recompute when recompute)."""
    g_TD = torch.randn_like(run.h_TD)

    def train(mark):
        run.h_TD.grad = None
        mark()
        out = run.forward(recompute)
        mark()
        out.backward(g_TD)
        mark()

    fwd, bwd = benchlib.time_phases(train, clock, warmup, reps, 2)
    return fwd, bwd


def time_nograd(run: LayerRun, clock: benchlib.Clock, warmup: int, reps: int) -> float:
    """Seconds over the stack, forward-only (the reference pass)."""

    def nograd(mark):
        with torch.no_grad():
            mark()
            run.forward(False)
            mark()

    return benchlib.time_phases(nograd, clock, warmup, reps, 1)[0]


def layer_memory(run: LayerRun, recompute: bool, cfg: ModelConfig) -> tuple[float, float, str]:
    """(saved bytes per layer, backward transient bytes, source)."""
    L = len(run.layers)
    g_TD = torch.randn_like(run.h_TD)
    run.h_TD.grad = None
    if run.h_TD.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        out = run.forward(recompute)
        torch.cuda.synchronize()
        after_fwd = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(g_TD)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        run.h_TD.grad = None
        # after_fwd - base includes the stack's output: the next layer's saved input in the real model
        return (after_fwd - base) / L, float(peak - after_fwd), "cuda allocator"
    params = list(run.layers.parameters())
    full, out = saved_tensor_bytes(lambda: run.forward(False), [run.h_TD, *params])
    out.backward(g_TD)
    run.h_TD.grad = None
    per_layer = full / L
    if not recompute:
        return per_layer, 0.0, "saved-tensor hooks (no allocator peak on CPU)"
    # checkpoint keeps each block's input; backward rebuilds one layer's activations at a time
    return float(run.h_TD.numel() * run.h_TD.element_size()), per_layer, "saved-tensor hooks + checkpoint inputs"


def lm_head_fn(impl: str):
    """The decoder's own LM-head functions (so every implementation it has is measurable)."""
    from fasttrain_kernels import LM_HEAD_FUNCTIONS as table
    if impl not in table:
        raise ValueError(f"--lm-head {impl!r}: expected one of {sorted(table)}")
    return table[impl]


def measure_lm_head(cfg: ModelConfig, rows: int, device, dtype, impl: str, clock: benchlib.Clock, warmup: int,
                    reps: int) -> tuple[float, float, float]:
    """(fwd+bwd seconds, fwd-only seconds, transient bytes) of the LM head on `rows` rows."""
    fn = lm_head_fn(impl)
    gen = torch.Generator(device=device).manual_seed(1)
    V, D = cfg.vocab_size, cfg.hidden_size
    h_ND = torch.randn(rows, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    w_VD = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * 0.02).requires_grad_()
    t_N = torch.randint(0, V, (rows,), device=device, generator=gen)
    g_N = torch.ones(rows, device=device, dtype=torch.float32)

    def train(mark):
        h_ND.grad = w_VD.grad = None
        mark()
        out = fn(h_ND, w_VD, t_N)
        mark()
        out.backward(g_N)
        mark()

    def nograd(mark):
        with torch.no_grad():
            mark()
            fn(h_ND, w_VD, t_N)
            mark()

    fwd, bwd = benchlib.time_phases(train, clock, warmup, reps, 2)
    (fwd_only,) = benchlib.time_phases(nograd, clock, warmup, reps, 1)
    h_ND.grad = w_VD.grad = None
    grads = h_ND.numel() * h_ND.element_size() + w_VD.numel() * w_VD.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h_ND, w_VD, t_N).backward(g_N)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - base - grads  # dh, dW are counted as root grads
        h_ND.grad = w_VD.grad = None
    else:
        transient, out = saved_tensor_bytes(lambda: fn(h_ND, w_VD, t_N), [h_ND, w_VD, t_N])
        out.backward(g_N)
        h_ND.grad = w_VD.grad = None
    return fwd + bwd, fwd_only, float(max(transient, 0))


def layer_tflops(cfg: ModelConfig, batch: PackedBatch, seconds: float, train: bool) -> float:
    """Model FLOPs of one block (6·P·T + 12·H·d·A train, a third forward-only; recompute not counted)."""
    per_layer = ParamCounts.of(cfg).params_layer
    fm = FlopModel(per_layer, 1, cfg.q_dim, cfg.vocab_size, cfg.hidden_size)
    return fm.batch(batch.num_tokens, batch.num_attended_keys, 0, train) / seconds / 1e12


def measure(cfg: ModelConfig, a: argparse.Namespace, device: torch.device) -> tuple[list[Measured], list[str]]:
    """Times ``a.layers`` layers and the LM head on a synthetic micro-batch of each of ``a.tokens`` token counts,
    with and without recompute; returns the measurements and their table."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = resolve_backend(a.attention_backend, device, dtype)
    clock = benchlib.Clock(device)
    layers = build_layers(cfg, a.layers, device, dtype)
    _drop_grads(layers)
    out: list[Measured] = []
    done: set[int] = set()
    table = [["tokens", "pairs", "rows", "recompute", "fwd ms", "bwd ms", "fwd-only ms", f"x{cfg.num_hidden_layers} s",
              "TFLOP/s", "fwd-only", "saved MiB", "bwd peak MiB", "LM head fwd+bwd / fwd ms"]]
    for budget in a.tokens:
        batch = synth_batch(budget, a.prompt_len, a.step_len, cfg.vocab_size)
        if batch.num_tokens in done:  # two asked counts that pack to the same batch
            continue
        done.add(batch.num_tokens)
        run = make_layer_run(cfg, layers, batch, device, dtype, backend, a.compile)
        rows = int(batch.lp_rows_N.numel())
        lm_train, lm_fwd, lm_transient = measure_lm_head(cfg, rows, device, dtype, a.lm_head, clock, a.warmup, a.reps)
        fwd_ng = time_nograd(run, clock, a.warmup, a.reps) / a.layers
        for recompute in (True, False):
            fwd, bwd = (t / a.layers for t in time_train(run, recompute, clock, a.warmup, a.reps))
            saved, transient, source = layer_memory(run, recompute, cfg)
            out.append(Measured(batch.num_tokens, rows, recompute, fwd, bwd, fwd_ng, lm_train, lm_fwd, saved,
                                transient, lm_transient, source))
            table.append([batch.num_tokens, batch.num_pairs, rows, "yes" if recompute else "no", f"{fwd * 1e3:.2f}",
                          f"{bwd * 1e3:.2f}", f"{fwd_ng * 1e3:.2f}", f"{(fwd + bwd) * cfg.num_hidden_layers:.2f}",
                          f"{layer_tflops(cfg, batch, fwd + bwd, True):.1f}",
                          f"{layer_tflops(cfg, batch, fwd_ng, False):.1f}", f"{saved / 2**20:.1f}",
                          f"{transient / 2**20:.1f}", f"{lm_train * 1e3:.2f} / {lm_fwd * 1e3:.2f}"])
        del run
    return out, [
        f"measured on {benchlib.device_name(device)}, torch {torch.__version__}, {dtype}, attention {backend}, LM head "
        f"{a.lm_head}, {'compiled ' if a.compile else ''}{a.layers} layers of hidden {cfg.hidden_size} / "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV / FFN {cfg.intermediate_size}; median of "
        f"{a.reps} after {a.warmup}; per layer unless named",
        benchlib.text_table(table, right=True),
        f"TFLOP/s = model FLOPs (FlopModel: 6·P_layer·T + 12·heads·head_dim·attended, forward-only a third) / time; "
        f"H100 dense bf16 ceiling {H100_BF16_TFLOPS:.0f}. LM head transient: "
        f"{out[0].lm_head_transient_bytes / 2**20:.1f} MiB at {out[0].lm_rows} rows. Memory source: "
        f"{out[0].memory_source}"]


# ==============================================================================================
# Report
# ==============================================================================================
def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.2f} MiB"


def format_assumptions(c: Cluster, r: Recipe, s: Strategy) -> str:
    return (f"assumptions: NVLink bus {c.nvlink_gbps:g} GB/s, IB {c.ib_gbps_per_gpu:g} GB/s per GPU x "
            f"{c.gpus_per_node} per node, PCIe {c.pcie_gbps:g} GB/s per GPU, host memory {c.host_gbps_per_node:g} GB/s "
            f"per node, HBM {c.hbm_gbps:g} GB/s, card {c.card_gib:g} GiB (reserve {c.reserve_gib:g}); AdamW + clip "
            f"{s.adam_bytes_per_param:g} B/param; {r.tokens_per_pair:g} tokens and {r.lm_rows_per_pair:g} LM rows "
            f"per pair; offload {s.offload}; overlap: per block max(compute, comm), first gathers and last "
            "reduce-scatters exposed")


def format_projection(p: Projection, c: Cluster, r: Recipe, s: Strategy) -> list[str]:
    link = "NVLink" if c.nodes == 1 else f"{c.nodes} nodes, IB"
    title = (f"== {p.n_gpus} x {c.card} ({link}; bus bandwidth {bus_bandwidth(c) / 1e9:.0f} GB/s) — "
             f"{'CPU offload' if p.offload else 'no offload'}, recompute {'on' if s.recompute else 'off'}, "
             f"optimizer state {s.optimizer_state} ==")
    geometry = (f"{p.steps} steps x {p.micro_batches} micro-batch(es) of {p.tokens_per_micro:,.0f} tokens per GPU "
                f"({r.global_batch} pairs x {r.tokens_per_pair:g} tokens / {p.n_gpus} GPUs); reduce-scatter "
                "after every micro-batch")
    per_step = (f"per step: layers {p.step.layers_compute:.3f} s + LM head {p.step.lm_head_compute:.3f} s + exposed "
                f"comm {p.step.exposed_comm:.3f} s + optimizer {p.step.optimizer:.3f} s = {p.step.total:.3f} s; "
                f"per block AG {p.step.ag_layer * 1e3:.1f} ms, RS {p.step.rs_layer * 1e3:.1f} ms")
    if p.offload:
        per_step += f", H2D {p.step.h2d_layer * 1e3:.1f} ms, D2H {p.step.d2h_layer * 1e3:.1f} ms"
        if p.micro_batches > 1:
            geometry += ("; NOTE with CPU offload, micro-batches after the first copy gradients to the host "
                         "synchronously and sum them on the CPU, which this projection does not model (optimistic)")
    lines = [title, geometry, per_step, f"  {'component':<58} {'time':>9} {'share':>6}"]
    total = p.total_s
    for name, sec in p.components_s.items():
        lines.append(f"  {name:<58} {_h(sec):>9} {sec / total:>6.1%}")
    lines.append(f"  {'total':<58} {_h(total):>9}   vs official ~{OFFICIAL_HOURS:.0f} h on 8 x A100 "
                 f"({OFFICIAL_HOURS * 3600 / total:.1f}x)")
    lines.append(f"dominant: {p.dominant} ({p.components_s[p.dominant] / total:.0%})")
    lines.append(f"memory per GPU (peak {p.memory.peak_bytes / GIB:.1f} GiB of {c.card_gib} GiB: "
                 f"{'fits' if p.memory.fits else 'DOES NOT FIT'}):")
    for name, b in p.memory.items.items():
        lines.append(f"  {name:<72} {_size(b):>10}")
    lines.extend(f"note: {n}" for n in p.notes)
    return lines


def format_state_matrix(args, shape: ParamCounts, measured: list[Measured], recipe: Recipe, strategy: Strategy
                        ) -> list[str]:
    """One node of 8 GPUs, every card preset x optimizer state x offload: peak memory per GPU, whether it fits,
    and the recipe's time (issue 14's table: Qwen2-72B on 8 x 80 GB and 8 x 141 GB, with and without offload)."""
    rows = [["card", "optimizer state", "offload", "peak GiB / card", "fits", "recipe time"]]
    single = argparse.Namespace(**{**vars(args), "gpus": "8"})
    for card in sorted(CARDS):
        c = clusters(single, card)[0]
        for state in ("fp32", "compact"):
            for offload in ("off", "on"):
                s = dataclasses.replace(strategy, offload=offload, optimizer_state=state,
                                        adam_bytes_per_param=optimizer_bytes(state, args.adam))
                q = project(shape, measured, c, recipe, s)
                rows.append([f"8 x {c.card}", state, offload, f"{q.memory.peak_bytes / GIB:.1f} / {c.card_gib:g}",
                             "yes" if q.memory.fits else "NO", _h(q.total_s)])
    return ["one node, every card x optimizer state x offload (recompute as above):",
            benchlib.text_table(rows)]


def format_verdict(projections: list[Projection], card: str = "H100") -> list[str]:
    eight = [p for p in projections if p.n_gpus == 8]
    if not eight:
        return []
    p = eight[0]
    ok = p.total_s <= TARGET_HOURS * 3600
    lines = [f"target <= {TARGET_HOURS:g} h on 8 x {card}: projected {_h(p.total_s)} -> {'MET' if ok else 'MISSED'}"]
    if not ok:
        budget = optimizer_budget_s(p, TARGET_HOURS * 3600)
        lines.append(f"  to meet it the optimizer step would have to take <= {budget:.2f} s/step "
                     f"(projected {p.step.optimizer:.2f} s)" if budget > 0 else
                     "  not reachable by a faster optimizer alone: compute + comm + reference exceed it")
    return lines


# ==============================================================================================
# CLI
# ==============================================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU (or GPU), seconds; projects that model")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="recipe config: token budget, recompute, epochs")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers to measure (per-layer = total / this)")
    ap.add_argument("--tokens", default="", help="comma list of micro-batch token counts to measure "
                    "(default: the config's budget and the per-GPU step tokens of each --gpus)")
    ap.add_argument("--prompt-len", type=benchlib.int_range, default=None,
                    help="synthetic prompt lengths LO,HI (default 96,512; --smoke 16,48)")
    ap.add_argument("--step-len", type=benchlib.int_range, default=None,
                    help="synthetic step lengths LO,HI (default 16,128; --smoke 4,12)")
    ap.add_argument("--lm-head", default="torch", help="LM-head implementation: torch, triton (or any other the "
                    "kernels package lists in LM_HEAD_IMPLS)")
    ap.add_argument("--compile", action="store_true", help="run the decoder layers with their torch.compile'd "
                    "regions (DecoderLayer(..., compiled=True), where the decoder has them); every token count "
                    "compiles again, so keep --warmup >= 3")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default 3; --smoke 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions, median kept (default 10; --smoke 3)")
    ap.add_argument("--gpus", default="8,32", help="GPU counts to project")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbps", type=float, default=Cluster.nvlink_gbps, help="intra-node NCCL bus bandwidth")
    ap.add_argument("--ib-gbps-per-gpu", type=float, default=Cluster.ib_gbps_per_gpu,
                    help="effective InfiniBand per GPU (one NIC per GPU)")
    ap.add_argument("--pcie-gbps", type=float, default=Cluster.pcie_gbps, help="host<->GPU per GPU, concurrent")
    ap.add_argument("--host-gbps-per-node", type=float, default=Cluster.host_gbps_per_node,
                    help="host memory bandwidth available to the CPU AdamW of all ranks of a node")
    ap.add_argument("--card", choices=sorted(CARDS), default="h100",
                    help="the card: its memory and copy bandwidth, unless --card-gib / --hbm-gbps are given")
    ap.add_argument("--hbm-gbps", type=float, default=None)
    ap.add_argument("--card-gib", type=float, default=None)
    ap.add_argument("--reserve-gib", type=float, default=Cluster.reserve_gib)
    ap.add_argument("--offload", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--adam", choices=("torch", "fused"), default="fused",
                    help="AdamW traffic: torch's non-fused update 72 B/param or a fused one 28 B/param (+12 clip)")
    ap.add_argument("--optimizer-state", choices=("fp32", "compact"), default="fp32",
                    help="train.optimizer_state: 16 or 10 B/param of sharded state (compact's update: 448 B/param)")
    ap.add_argument("--pairs", type=int, default=Recipe.pairs)
    ap.add_argument("--tokens-per-pair", type=float, default=None,
                    help=f"projected tokens per pair (default {Recipe.tokens_per_pair:g}; --smoke {SMOKE_PAIR[0]:g})")
    ap.add_argument("--lm-rows-per-pair", type=float, default=None,
                    help=f"projected LM-head rows per pair (default {Recipe.lm_rows_per_pair:g}; "
                         f"--smoke {SMOKE_PAIR[1]:g})")
    ap.add_argument("--json", default="", help="write measurements and projections here")
    ap.add_argument("--from-json", default="", help="skip measuring: re-project the measurements of a --json file")
    ap.add_argument("--predict-mfu", type=float, default=0.0,
                    help="skip measuring: PREDICT layer times at this fraction of the card's bf16 ceiling (no GPU)")
    args = ap.parse_args(argv)
    smoke = {"warmup": 1, "reps": 3, "prompt_len": (16, 48), "step_len": (4, 12)}
    full = {"warmup": 3, "reps": 10, "prompt_len": (96, 512), "step_len": (16, 128)}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layers < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--layers and --reps must be >= 1, --warmup >= 0")
    return args


def recipe_from_config(path: str, args: argparse.Namespace, smoke: bool) -> tuple[Recipe, bool]:
    from fasttrain.config import load_config

    cfg = load_config(path)
    budget = SMOKE_BUDGET if smoke else cfg.train.tokens_per_micro_batch
    epochs = cfg.train.epochs
    if epochs != int(epochs):
        raise ValueError(f"{path}: train.epochs={epochs}; the projection needs whole epochs")
    tokens, rows = SMOKE_PAIR if smoke else (Recipe.tokens_per_pair, Recipe.lm_rows_per_pair)
    tokens = tokens if args.tokens_per_pair is None else args.tokens_per_pair
    rows = rows if args.lm_rows_per_pair is None else args.lm_rows_per_pair
    # The projection measures blocks with full recompute or none; selective and auto are projected as full
    # (an upper bound on their time).
    return (Recipe(args.pairs, int(epochs), cfg.train.global_batch_pairs, budget, tokens, rows),
            cfg.model.activation_checkpointing != "none")


def clusters(args: argparse.Namespace, card: str | None = None) -> list[Cluster]:
    name, gib, hbm = CARDS[card or args.card]
    if card is None:  # the explicit flags override the chosen card's preset
        gib, hbm = args.card_gib or gib, args.hbm_gbps or hbm
    return [Cluster(int(n), args.gpus_per_node, args.nvlink_gbps, args.ib_gbps_per_gpu, args.pcie_gbps,
                    args.host_gbps_per_node, hbm, gib, args.reserve_gib, name)
            for n in args.gpus.split(",")]


def default_token_counts(recipe: Recipe, cls: Sequence[Cluster]) -> list[int]:
    counts = {recipe.token_budget}
    for c in cls:
        _, per_micro = _micro_geometry(recipe, c)
        counts.add(int(per_micro))
    return sorted(counts, reverse=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = benchlib.model_config("tiny" if args.smoke else "qwen2-72b")
    shape = ParamCounts.of(cfg)
    recipe, recompute = recipe_from_config(args.config, args, args.smoke)
    cls = clusters(args)
    strategy = Strategy(recompute, args.offload, optimizer_bytes(args.optimizer_state, args.adam),
                        args.optimizer_state)
    print(f"model: {'smoke (benchlib tiny)' if args.smoke else 'Qwen2-72B'}, {shape.params_total / 1e9:.2f}B params "
          f"({shape.layers} x {shape.params_layer / 1e6:.1f}M per block + {shape.params_root / 1e6:.1f}M root); "
          f"recipe {recipe.pairs} pairs x {recipe.epochs} epochs, {recipe.global_batch} pairs/step, "
          f"budget {recipe.token_budget} tokens/GPU micro-batch")
    try:
        measured = load_or_measure(args, cfg, recipe, cls)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    projections = [project(shape, measured, c, recipe, strategy) for c in cls]
    print("\n".join(format_report(args, shape, measured, cls, recipe, strategy, projections)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": dataclasses.asdict(shape), "recipe": dataclasses.asdict(recipe),
            "strategy": dataclasses.asdict(strategy), "measured": [dataclasses.asdict(m) for m in measured],
            "projections": [{**dataclasses.asdict(p), "total_s": p.total_s, "dominant": p.dominant}
                            for p in projections],
        }, indent=2))
    return 0


def predicted_measurements(cfg: ModelConfig, recipe: Recipe, tokens: Sequence[int], mfu: float, peak_tflops: float
                           ) -> list[Measured]:
    """PREDICTED per-layer numbers in place of measured ones (--predict-mfu): every matmul at ``mfu`` of the card's
    bf16 ceiling, attention counted for the recipe's prefix-shared pairs, activations in bf16 from the shapes.

    FLOPs per layer, T tokens: forward 2 * params_layer * T + 4 * q_dim * A (QK^T and PV over A attended keys);
    backward 2x forward, + 1x forward recompute. A per pair = prompt^2 / 2 + 2 * step * (prompt + step / 2).
    LM head: 2 * D * V per row forward, 3x that with backward. Bytes kept per layer, and one layer's backward
    transient: the trainer's own activation model (fasttrain.activation_memory: the block input under recompute,
    every intermediate without).
    """
    per_layer = layer_params(cfg)
    step = recipe.lm_rows_per_pair / 2
    prompt = recipe.tokens_per_pair - 2 * step
    attended_per_token = (prompt**2 / 2 + 2 * step * (prompt + step / 2)) / recipe.tokens_per_pair
    rate = mfu * peak_tflops * 1e12
    D, V = cfg.hidden_size, cfg.vocab_size
    out = []
    for T in tokens:
        rows = T / recipe.tokens_per_pair * recipe.lm_rows_per_pair
        fwd = (2 * per_layer * T + 4 * cfg.q_dim * attended_per_token * T) / rate
        layer_bytes = 2.0 * T * activation_memory.saved_elements_per_token(cfg, "none")
        for recompute in (True, False):
            out.append(Measured(int(T), int(rows), recompute, fwd, (3 if recompute else 2) * fwd, fwd,
                                6 * D * V * rows / rate, 2 * D * V * rows / rate,
                                2.0 * T * activation_memory.saved_elements_per_token(cfg, "full") if recompute
                                else layer_bytes, layer_bytes, 4.0 * rows * V,
                                memory_source=f"PREDICTED at {mfu:.0%} MFU, not measured"))
    return out


def load_or_measure(args: argparse.Namespace, cfg: ModelConfig, recipe: Recipe, cls: list[Cluster]) -> list[Measured]:
    """The measurements of --from-json, else predicted (--predict-mfu), else measured here (table printed)."""
    if args.from_json:
        return [Measured(**m) for m in json.loads(Path(args.from_json).read_text())["measured"]]
    if args.predict_mfu:
        if not 0 < args.predict_mfu <= 1:
            raise ValueError(f"--predict-mfu {args.predict_mfu}: expected a fraction in (0, 1]")
        peak = peak_bf16_tflops(f"NVIDIA {cls[0].card}").tflops or H100_BF16_TFLOPS
        print(f"PREDICTED, not measured: every layer and the LM head at {args.predict_mfu:.0%} of {peak:.0f} "
              "TFLOP/s (predicted_measurements' docstring has the model)")
        return predicted_measurements(cfg, recipe, default_token_counts(recipe, cls), args.predict_mfu, peak)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise ValueError("no CUDA device: the 72B measurement needs a GPU (use --smoke on a CPU, or --from-json)")
    lm_head_fn(args.lm_head)  # an unknown name fails before anything is built
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else default_token_counts(recipe, cls)
    measured, lines = measure(cfg, args, device)
    print("\n".join(lines))
    return measured


def format_report(args, shape: ParamCounts, measured: list[Measured], cls: list[Cluster], recipe: Recipe,
                  strategy: Strategy, projections: list[Projection]) -> list[str]:
    lines = ["", format_assumptions(cls[0], recipe, strategy)]
    for c, p in zip(cls, projections):
        lines += [""] + format_projection(p, c, recipe, strategy)
    other = dataclasses.replace(strategy, recompute=not strategy.recompute)
    if any(m.recompute == other.recompute for m in measured):
        lines.append("")
        for c in cls:
            q = project(shape, measured, c, recipe, other)
            lines.append(f"with recompute {'on' if other.recompute else 'off'} on {c.n_gpus} GPUs: {_h(q.total_s)}, "
                         f"peak {q.memory.peak_bytes / GIB:.1f} GiB ({'fits' if q.memory.fits else 'does not fit'}, "
                         f"{'offload' if q.offload else 'no offload'})")
    lines += [""] + format_state_matrix(args, shape, measured, recipe, strategy)
    lines.append("")
    if args.smoke:
        lines.append("smoke: a tiny model timed on this machine; the numbers above exercise the code, they project "
                     "nothing")
    return lines + format_verdict(projections, cls[0].card)


if __name__ == "__main__":
    sys.exit(main())
