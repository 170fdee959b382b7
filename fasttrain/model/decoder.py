"""Llama-family decoder over packed 1-D token streams (DESIGN §3, §5).

Shape legend: T = tokens in the packed stream (no batch dimension), D = hidden size, F = FFN size,
N = query heads, M = key/value heads, H = head_dim, Q = N*H, K = M*H, V = vocabulary, R = LM-head rows
(packing.py calls them N: lp_rows_N).

Parameter names equal transformers' (``model.layers.{i}.self_attn.o_proj.weight`` ...) except the fused
projections (``self_attn.qkv_proj``, ``mlp.gate_up_proj`` with ``cfg.fuse_projections``), whose rows are the HF
tensors stacked (hf_layout.py). There are no persistent buffers: RoPE frequencies are recomputed from the config
(``reset_buffers``), so ``build_model(device="meta")`` + ``to_empty`` + load gives a complete model.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import profiler as autograd_profiler
from torch.utils.checkpoint import checkpoint

from fasttrain.attention import BACKENDS, varlen_attention
from fasttrain.model.config import ModelConfig
from fasttrain.model.hf_layout import hf_pieces
from fasttrain.model.lora import adapted, is_adapter
from fasttrain.model.rope import apply_rope, inv_freq, rope_cos_sin
from fasttrain.model.shards import check_writable_sharding, local_shard
from fasttrain.packing import AttentionMeta, PackedBatch
from fasttrain_kernels import lm_head_logprobs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, normalised value cast back before the weight multiply: transformers'
        # order, so bf16 runs round identically.
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.qkv_split = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
        self.fused = cfg.fuse_projections
        self.lora: nn.ModuleDict | None = None  # LoRA adapters by linear layer name (lora.add_adapters)
        if self.fused:  # one GEMM reads x_TD once (DESIGN §5.6)
            self.qkv_proj = nn.Linear(D, sum(self.qkv_split), bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(D, cfg.q_dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(D, cfg.kv_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(D, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_dim, D, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's H dims, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x_TD, cos_TH, sin_TH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_TNH, k_TMH, v_TMH: projections, Qwen3's qk-norm and RoPE (everything before the varlen call)."""
        T = x_TD.shape[0]
        if self.fused:
            q_TQ, k_TK, v_TK = adapted(self, "qkv_proj", x_TD).split(self.qkv_split, dim=-1)
        else:
            q_TQ, k_TK, v_TK = (adapted(self, name, x_TD) for name in ("q_proj", "k_proj", "v_proj"))
        q_TNH = q_TQ.view(T, self.n_heads, self.head_dim)
        k_TMH = k_TK.view(T, self.n_kv, self.head_dim)
        # v is the only projection that reaches the attention kernel without an element-wise op making it
        # contiguous; a fused split leaves it strided, which flash kernels refuse or copy anyway.
        v_TMH = v_TK.contiguous().view(T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q_TNH, k_TMH = self.q_norm(q_TNH), self.k_norm(k_TMH)
        return apply_rope(q_TNH, cos_TH, sin_TH), apply_rope(k_TMH, cos_TH, sin_TH), v_TMH

    def output(self, o_TNH: torch.Tensor) -> torch.Tensor:
        return adapted(self, "o_proj", o_TNH.reshape(o_TNH.shape[0], self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Fd = cfg.hidden_size, cfg.intermediate_size
        self.ffn_size = Fd
        self.fused = cfg.fuse_projections
        self.lora: nn.ModuleDict | None = None  # LoRA adapters by linear layer name (lora.add_adapters)
        if self.fused:  # one GEMM reads x_TD once (DESIGN §5.6)
            self.gate_up_proj = nn.Linear(D, 2 * Fd, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(D, Fd, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(D, Fd, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(Fd, D, bias=cfg.mlp_bias)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate_TF, up_TF = adapted(self, "gate_up_proj", x_TD).split(self.ffn_size, dim=-1)
        else:
            gate_TF, up_TF = adapted(self, "gate_proj", x_TD), adapted(self, "up_proj", x_TD)
        return adapted(self, "down_proj", F.silu(gate_TF) * up_TF)


CHECKPOINTING_MODES = ("none", "selective", "full")


def checkpointing_mode(value) -> str:
    """``model.activation_checkpointing`` as one of CHECKPOINTING_MODES; True / False (the setting's old boolean
    form) mean "full" / "none"."""
    if value is True or value is False:
        return "full" if value else "none"
    if value not in CHECKPOINTING_MODES:
        raise ValueError(f"activation checkpointing {value!r}: expected one of {CHECKPOINTING_MODES} (or a bool)")
    return value


@functools.cache
def _saved_by_selective_checkpointing() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels (the FLOPs); every
    other op of the block is recomputed in backward (element-wise: cheap in FLOPs, costly in memory)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    flash = getattr(torch.ops, "flash_attn", None)  # the flash-attn package's custom ops, where installed
    for name in ("_flash_attn_varlen_forward", "_flash_attn_forward"):
        op = getattr(flash, name, None) if flash is not None else None
        if op is not None and hasattr(op, "default"):
            ops.add(op.default)
    return frozenset(ops)


def _save_matmuls_and_attention():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_by_selective_checkpointing()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def profiler_range(name: str):
    """A named range while torch.profiler records (benchmarks/components.py splits a step's measured time by
    them), nothing otherwise: a record_function costs microseconds, and there are two per block and micro-batch."""
    return torch.profiler.record_function(name) if autograd_profiler._is_profiler_enabled else nullcontext()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_TD, cos_TH, sin_TH, attn: AttentionMeta, backend: str, recompute: str = "none",
                compiled: bool = False):
        # Checkpointing happens inside the block's forward, so an FSDP2 hook on this module fires
        # once around it (and the pre-backward unshard covers the recomputation), the same
        # composition as torchtitan's checkpoint_wrapper-then-fully_shard. The compiled regions sit
        # inside _block, so the recomputation reruns the same compiled graphs (no extra compile).
        # recompute: "none" | "full" (keep the block's input only) | "selective" (keep every matmul's and the
        # attention's output, recompute the element-wise work: norms, RoPE, SwiGLU, residual adds).
        recompute = checkpointing_mode(recompute)
        if recompute == "full":
            return checkpoint(self._block, h_TD, cos_TH, sin_TH, attn, backend, compiled, use_reentrant=False)
        if recompute == "selective":
            return checkpoint(self._block, h_TD, cos_TH, sin_TH, attn, backend, compiled, use_reentrant=False,
                              context_fn=_save_matmuls_and_attention)
        return self._block(h_TD, cos_TH, sin_TH, attn, backend, compiled)

    def _block(self, h_TD, cos_TH, sin_TH, attn, backend, compiled):
        pre, post = compiled_regions() if compiled else (pre_attention, post_attention)
        q_TNH, k_TMH, v_TMH = pre(self, h_TD, cos_TH, sin_TH)
        with profiler_range("fasttrain.attention"):  # eager: host-side cu_seqlens / max_seqlen
            o_TNH = varlen_attention(q_TNH, k_TMH, v_TMH, attn, backend)
        return post(self, h_TD, o_TNH)


# -- the block's compute around attention, eager or torch.compile'd (model.compile) -----------------
def pre_attention(layer: DecoderLayer, h_TD, cos_TH, sin_TH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input RMSNorm, q/k/v projections, qk-norm, RoPE."""
    return layer.self_attn.project(layer.input_layernorm(h_TD), cos_TH, sin_TH)


def post_attention(layer: DecoderLayer, h_TD, o_TNH) -> torch.Tensor:
    """o_proj, residual add, post-attention RMSNorm, SwiGLU MLP, residual add."""
    h_TD = h_TD + layer.self_attn.output(o_TNH)
    return h_TD + layer.mlp(layer.post_attention_layernorm(h_TD))


@functools.cache
def compiled_regions() -> tuple[Callable, Callable]:
    """(pre, post) compiled once per process and shared by every block of every model.

    Dynamo inlines nn.Modules (inline_inbuilt_nn_modules), so parameters are graph inputs and all
    blocks reuse one graph per region instead of one per layer (28 layers would pass dynamo's recompile
    limit of 8, after which it runs eager with a single warning). Graphs per region in a run: one for
    training, one for no-grad passes, one for a frozen live reference (the dummy micro-batch has T = 2,
    so it needs none of its own). The attention call stays eager between the two regions: its segment
    boundaries are host ints that change every batch and would be guarded on.
    fullgraph=True: a graph break is an error, not a block that silently runs partly eager.
    """
    return (_tokens_dynamic(torch.compile(pre_attention, fullgraph=True)),
            _tokens_dynamic(torch.compile(post_attention, fullgraph=True)))


def _tokens_dynamic(compiled_fn: Callable) -> Callable:
    """Marks dim 0 (T, the packed token count, new every micro-batch) of every tensor argument
    dynamic, so the first compile is already shape-generic: one graph per region for all T >= 2
    (tests/test_compile.py). T = 1 would be specialised by dynamo's 0/1 rule, which is why the dummy
    micro-batch of a rank without work has two tokens."""

    def call(layer: DecoderLayer, *tensors: torch.Tensor):
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)
        return compiled_fn(layer, *tensors)

    return call


class DecoderModel(nn.Module):
    """HF's ``model.*`` submodule: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._tie_weights()
        self.attention_backend = "reference"
        self.lm_head_impl = "torch"
        self.activation_checkpointing = "none"  # checkpointing_mode(); a bool is accepted (True: "full")
        # model.compile: torch.compile each block's compute around attention (compiled_regions).
        # Not named `compile`: that is nn.Module.compile, which would compile the whole module.
        self.compile_blocks = False
        # Not a buffer: module.to(bf16) would round it, and meta/to_empty would leave it garbage.
        # Cached per device; reset_buffers() clears it.
        self._inv_freq_cache: dict[torch.device, torch.Tensor] = {}

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            # One Parameter under two names: FSDP shards/gathers it once and the LM head's gradient
            # accumulates into the embedding. state_dict() then lists both keys; saving drops lm_head.
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, *args, **kwargs):
        # nn.Module._apply may replace each module's Parameter separately (it does for to_empty from
        # meta), which would untie the LM head from the embedding; re-tie after every conversion.
        out = super()._apply(fn, *args, **kwargs)
        self._tie_weights()
        return out

    # -- settings --------------------------------------------------------------------------------
    def set_attention_backend(self, name: str) -> None:
        """Takes a resolved backend name (fasttrain.attention.resolve_backend), not "auto"."""
        if name not in BACKENDS or name == "auto":
            raise ValueError(f"attention backend {name!r}: expected a resolved one of {BACKENDS[1:]}")
        self.attention_backend = name

    def reset_buffers(self) -> None:
        self._inv_freq_cache = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._inv_freq_cache.get(device)
        if t is None:  # computed on the CPU like transformers does, then moved
            t = inv_freq(self.config.rope, self.config.head_dim).to(device)
            self._inv_freq_cache[device] = t
        return t

    # -- forward paths --------------------------------------------------------------------------
    def hidden_states(self, input_ids_T: torch.Tensor, position_ids_T: torch.Tensor,
                      attn: AttentionMeta) -> torch.Tensor:
        """h_TD after the final norm."""
        window = self.config.sliding_window
        if window is not None and attn.max_seqlen_k > window:
            raise ValueError(
                f"a segment attends {attn.max_seqlen_k} keys but the model's sliding_window is {window}; "
                "sliding-window attention is not implemented (see ModelConfig.check_max_length)"
            )
        h_TD = self.model.embed_tokens(input_ids_T)
        cos_TH, sin_TH = rope_cos_sin(self._inv_freq(h_TD.device), position_ids_T, h_TD.dtype)
        # each layer checks the mode (checkpointing_mode)
        recompute = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        for layer in self.model.layers:
            h_TD = layer(h_TD, cos_TH, sin_TH, attn, self.attention_backend, recompute, self.compile_blocks)
        return self.model.norm(h_TD)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """logp_R (fp32): log-prob of lp_targets_N under the rows lp_rows_N. The LM head runs here,
        inside the module's forward, so FSDP's hooks have gathered its (maybe tied) weight."""
        h_TD = self.hidden_states(batch.input_ids_T, batch.position_ids_T, batch.attn)
        with profiler_range("fasttrain.lm_head"):
            h_RD = h_TD.index_select(0, batch.lp_rows_N)
            return lm_head_logprobs(h_RD, self.lm_head.weight, batch.lp_targets_N, impl=self.lm_head_impl)

    def logits(self, input_ids_T: torch.Tensor, position_ids_T: torch.Tensor, attn: AttentionMeta) -> torch.Tensor:
        """logits_TV for every row (parity tests; training never materialises these)."""
        return self.lm_head(self.hidden_states(input_ids_T, position_ids_T, attn))

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02, generator: torch.Generator | None = None,
                     on_device: bool = False) -> None:
        """Linear/Embedding weights ~ N(0, std), biases 0, norm weights 1.

        Every parameter's full tensor is drawn on the CPU from one generator in named_parameters()
        order and the local rows are copied in, so the result is the same unsharded, FSDP-sharded
        (any world size) or on any device. Meant for tests and the demo model, not for 70B.
        ``on_device``: draw each rank's local rows directly on the parameter's device instead (seconds
        instead of minutes at 8B, for benchmarks); reproducible for one seed, world size and device only.
        """
        check_writable_sharding(self)
        if generator is None:
            device = next(self.parameters()).device if on_device else torch.device("cpu")
            generator = torch.Generator(device=device).manual_seed(seed)
        for name, param in self.named_parameters():  # a tied weight appears once
            if is_adapter(name):  # LoRA's own init (lora.init_adapters)
                continue
            local, start, end = local_shard(param, name)
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            elif name.endswith(".bias"):
                local.zero_()
            elif on_device:  # drawn in fp32 whatever the storage dtype: a bf16 frozen copy = the fp32 policy rounded
                draw = torch.empty(local.shape, dtype=torch.float32, device=local.device)
                local.copy_(draw.normal_(0.0, std, generator=generator))
            else:  # a fused parameter draws its HF pieces in order: the same weights as the unfused model
                full = torch.cat([torch.empty((p.end - p.start, *param.shape[1:]), dtype=torch.float32)
                                  .normal_(0.0, std, generator=generator)
                                  for p in hf_pieces(self.config, name, param.shape[0])])
                local.copy_(full[start:end])
        self.reset_buffers()


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> CausalLM:
    """Construct on the meta device (no memory, no init cost), then for a real device materialise it
    and run init_weights(seed=0). With device="meta" the caller shards it (fully_shard), calls
    ``to_empty(device=...)`` and ``load_hf_weights`` (or ``init_weights``)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed=0)
    return model
