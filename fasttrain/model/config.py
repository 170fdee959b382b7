"""Model configuration read from a Hugging Face ``config.json`` (DESIGN §5).

Only the Llama family that the decoder in ``decoder.py`` implements exactly is accepted: llama, qwen2,
qwen3, mistral. Anything the decoder would silently compute differently (another rope type, another
activation, partial rotary embeddings) is an error here, not a warning later.

Both spellings of RoPE settings are read:
  transformers < 5:  top-level ``rope_theta`` + ``rope_scaling: {"rope_type"|"type": ..., ...}``
  transformers >= 5: ``rope_parameters: {"rope_type": ..., "rope_theta": ..., ...}``

Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is not implemented. We keep
the window in ``ModelConfig.sliding_window`` and refuse (ValueError) any sequence whose attended key count
exceeds it: ``check_max_length`` is for the trainer to call at start-up, and the decoder checks every
batch. Up to the window, full causal attention is exactly what the windowed model computes, so configs
with a window are accepted and exact for ``max_length <= sliding_window``. We chose an error over a
warning because a warning would let a run train on silently different attention.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Written into a saved config.json when the source dict has no "architectures" (vLLM needs it).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers' default when a config has no rope_theta at all (RotaryEmbeddingConfigMixin.default_theta).
DEFAULT_ROPE_THETA = 10000.0

_MISSING = object()
_POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" | "llama3"
    # Llama-3 frequency scaling (only for rope_type == "llama3").
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int | None
    rope: RopeConfig
    qkv_bias: bool  # q_proj/k_proj/v_proj have a bias
    o_proj_bias: bool
    mlp_bias: bool  # llama's mlp_bias (gate/up/down)
    qk_norm: bool  # qwen3: per-head RMSNorm on q and k before RoPE
    tie_word_embeddings: bool
    sliding_window: int | None  # not implemented; sequences longer than this are refused
    # Not from config.json: one q/k/v GEMM and one gate/up GEMM per block instead of five (model.fuse_projections,
    # hf_layout.py). HF files keep the per-module names either way.
    fuse_projections: bool = True
    hf_dict: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    source: str = field(repr=False, compare=False, default="config.json")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: not found; a model directory needs an HF config.json")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 10^5 deep
            raise ValueError(f"{cfg_path}: cannot parse the JSON ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise OSError(f"{cfg_path}: cannot read the file ({e.strerror or e})") from None
        return cls.from_hf_dict(d, str(cfg_path))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = _get(d, "model_type", str, source)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        _check_architectures(d, model_type, source)
        # Sizes must be positive: a 0 or negative one would end in a ZeroDivisionError here or a
        # shape error deep inside torch when the model is built.
        for key in _POSITIVE_INT_KEYS:
            value = d.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{source}: key {key!r} must be a positive integer, found {value!r}")
        hidden = _get(d, "hidden_size", int, source)
        heads = _get(d, "num_attention_heads", int, source)
        kv_heads = _get(d, "num_key_value_heads", int, source, default=None)
        kv_heads = heads if kv_heads is None else kv_heads
        head_dim = _get(d, "head_dim", int, source, default=None)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(
                    f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                    "and head_dim is not given"
                )
            head_dim = hidden // heads
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim {head_dim} must be even for RoPE")
        act = _get(d, "hidden_act", str, source, default="silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected 'silu' (SwiGLU)")

        attention_bias = _get(d, "attention_bias", bool, source, default=False)
        if model_type == "qwen2":  # Qwen2 always has q/k/v bias and no o_proj bias
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":  # transformers' Mistral has no bias at all (ignores attention_bias)
            qkv_bias, o_bias = False, False
        else:  # llama, qwen3: attention_bias applies to q, k, v and o
            qkv_bias, o_bias = attention_bias, attention_bias
        mlp_bias = _get(d, "mlp_bias", bool, source, default=False) if model_type == "llama" else False

        return cls(
            model_type=model_type,
            vocab_size=_get(d, "vocab_size", int, source),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", int, source),
            num_hidden_layers=_get(d, "num_hidden_layers", int, source),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_get(d, "rms_norm_eps", float, source),
            max_position_embeddings=_get(d, "max_position_embeddings", int, source, default=None),
            rope=_parse_rope(d, source),
            qkv_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            # All four model classes default to untied when the key is absent.
            tie_word_embeddings=_get(d, "tie_word_embeddings", bool, source, default=False),
            sliding_window=_parse_sliding_window(d, model_type, source),
            hf_dict=dict(d),
            source=source,
        )

    # ------------------------------------------------------------------------------------------
    def check_max_length(self, max_length: int) -> None:
        """Refuse a training length the decoder cannot compute exactly (see the module docstring)."""
        if self.sliding_window is not None and max_length > self.sliding_window:
            raise ValueError(
                f"{self.source}: sliding_window={self.sliding_window} but sequences of up to {max_length} "
                "tokens were asked for; sliding-window attention is not implemented, so only "
                f"max_length <= {self.sliding_window} is exact. Lower data.max_length."
            )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# ----------------------------------------------------------------------------------------------
def _get(d: dict, key: str, typ: type, source: str, default: Any = _MISSING) -> Any:
    if key not in d or (d[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise ValueError(f"{source}: required key {key!r} is missing")
        return default
    value = d[key]
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ValueError(f"{source}: key {key!r} must be {typ.__name__}, found {value!r}")
    return value


def _check_architectures(d: dict, model_type: str, source: str) -> None:
    """``architectures`` names the class transformers and vLLM build; the export keeps it. A value that does not
    match ``model_type`` (a llama config naming GPT2LMHeadModel) would be trained as one model and served as
    another, so it is refused. Absent or empty, the export writes the model type's class."""
    archs = d.get("architectures")
    if archs is None or archs == []:
        return
    expected = ARCHITECTURES[model_type]
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{source}: key 'architectures' must be a list of class names, found {archs!r}")
    if archs != [expected]:
        raise ValueError(f"{source}: architectures {archs} does not match model_type {model_type!r}; fasttrain "
                         f"trains and exports {model_type} as [{expected!r}]. Fix config.json so they agree")


def _parse_rope(d: dict, source: str) -> RopeConfig:
    partial = d.get("partial_rotary_factor")
    rope_params = d.get("rope_parameters")
    if rope_params is not None:
        # transformers >= 5. Per-layer-type dicts ({"full_attention": {...}, ...}) are not for our models.
        key = "rope_parameters"
        if not isinstance(rope_params, dict) or any(isinstance(v, dict) for v in rope_params.values()):
            raise ValueError(f"{source}: key 'rope_parameters' must be a flat object, found {rope_params!r}")
        params = rope_params
        theta = params.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA))
    else:
        key = "rope_scaling"
        params = d.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{source}: key 'rope_scaling' must be an object or null, found {params!r}")
        theta = d.get("rope_theta", DEFAULT_ROPE_THETA)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{source}: rope_theta must be a positive number, found {theta!r}")
    partial = params.get("partial_rotary_factor", partial)
    if partial is not None and partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: {key}.rope_type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    where = f"{source} ({key})"
    orig = params.get("original_max_position_embeddings", d.get("max_position_embeddings"))
    rope = RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=_get(params, "factor", float, where),
        low_freq_factor=_get(params, "low_freq_factor", float, where),
        high_freq_factor=_get(params, "high_freq_factor", float, where),
        original_max_position_embeddings=_get({"original_max_position_embeddings": orig},
                                              "original_max_position_embeddings", int, where),
    )
    if rope.high_freq_factor == rope.low_freq_factor:
        raise ValueError(f"{where}: llama3 rope needs high_freq_factor != low_freq_factor")
    return rope


def _parse_sliding_window(d: dict, model_type: str, source: str) -> int | None:
    window = _get(d, "sliding_window", int, source, default=None)
    if model_type in ("qwen2", "qwen3"):
        # Qwen only uses its window when use_sliding_window is true (and then only on some layers,
        # per layer_types / max_window_layers). Treating the whole model as windowed is conservative:
        # it can only refuse sequences, never compute something different.
        layer_types = d.get("layer_types") or []
        uses = bool(d.get("use_sliding_window", False)) or "sliding_attention" in layer_types
        return window if uses else None
    return window


# ----------------------------------------------------------------------------------------------
# Parameter and FLOP counts (DESIGN §7)
# ----------------------------------------------------------------------------------------------
def layer_params(cfg: ModelConfig) -> int:
    D, F = cfg.hidden_size, cfg.intermediate_size
    attn = D * cfg.q_dim + 2 * D * cfg.kv_dim + cfg.q_dim * D
    if cfg.qkv_bias:
        attn += cfg.q_dim + 2 * cfg.kv_dim
    if cfg.o_proj_bias:
        attn += D
    if cfg.qk_norm:
        attn += 2 * cfg.head_dim
    mlp = 3 * D * F + (2 * F + D if cfg.mlp_bias else 0)
    return attn + mlp + 2 * D  # + input/post-attention norms


def num_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Stored parameters (a tied LM head counted once). Without embeddings: the decoder blocks and
    the final norm only."""
    n = cfg.num_hidden_layers * layer_params(cfg) + cfg.hidden_size
    if include_embeddings:
        n += cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return n
