"""Typed run configuration: dataclasses loaded from YAML/JSON plus ``section.key=value`` overrides.

Unknown sections/keys and values of the wrong type are errors naming the key and the file, raised
before any model or data is touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.errors import ConfigError


@dataclass
class ModelSection:
    path: str = ""  # HF model directory (config.json + safetensors + tokenizer files)
    tokenizer: str = ""  # defaults to model.path
    attention_backend: str = "auto"  # auto | flash_attn | torch_varlen | reference
    lm_head_impl: str = "auto"  # auto (chunked on CUDA, torch on CPU) | torch | triton | chunked (fasttrain_kernels)
    # full: every block keeps only its input and reruns its forward in backward (~33% more matmul work);
    # selective: keeps every matmul's and attention's output, recomputes only the element-wise work; none;
    # auto: the least recompute whose activations fit what the memory plan leaves on the card (CUDA; resolved
    # once and logged with its numbers, fasttrain/activation_memory.py; none on a CPU). true / false = full / none.
    activation_checkpointing: str = "full"
    # bfloat16 | float32 | auto (bfloat16 on CUDA, float32 on a CPU, where bf16 matmuls are slow and gain nothing);
    # the master weights are fp32 whatever train.optimizer_state keeps
    compute_dtype: str = "bfloat16"
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads, AdamW state live in host memory
    # torch.compile each decoder block's compute around the (eager) attention call: norm + q/k/v + qk-norm +
    # RoPE, and o_proj + residual + norm + SwiGLU + residual, fused by inductor. The token count is dynamic, so
    # each region compiles once per mode (train / no-grad / frozen live reference), never per batch. Costs compile
    # time in the first micro-batches; needs a C++ compiler on CPU.
    compile: bool = False
    # One GEMM for q/k/v and one for gate/up per block instead of five, each reading its input once (weights
    # stacked when loaded, split again when exported: HF files keep transformers' names; DESIGN §5.6).
    fuse_projections: bool = True
    # LoRA (fasttrain/model/lora.py, DESIGN §5.7): rank 0 trains every weight. Rank > 0 freezes the base (held in
    # the compute dtype, FSDP-sharded, no master / gradient / optimizer state) and trains adapters
    # y += (alpha / rank) * B A x on the target layers ("all", or a comma list of q_proj, k_proj, v_proj, o_proj,
    # gate_proj, up_proj, down_proj); final/ is then a PEFT adapter directory.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all"


@dataclass
class DataSection:
    train: str = ""  # JSONL / JSON / Parquet file of Step-DPO records
    eval: str = ""  # optional held-out file, same format
    template: str = "qwen2-boxed"  # qwen2-boxed | alpaca | deepseek-math | chat
    mode: str = "step"  # step (Step-DPO) | full (plain DPO on full_chosen / full_rejected)
    max_length: int = 1024
    max_prompt_length: int = 512
    skip_bad_rows: bool = False
    cache_dir: str = ".cache/fasttrain"


@dataclass
class LossSection:
    beta: float = 0.4
    loss_type: str = "sigmoid"  # sigmoid | ipo
    label_smoothing: float = 0.0
    reference: str = "precompute"  # precompute | live


@dataclass
class TrainSection:
    output_dir: str = "runs/stepdpo"
    overwrite: bool = False
    epochs: float = 4.0
    max_steps: int = 0  # >0 caps the number of optimizer steps
    global_batch_pairs: int = 128  # pairs per optimizer step, all ranks and micro-batches together
    tokens_per_micro_batch: int = 8192  # per rank; must be >= 2 * data.max_length
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999  # HF Trainer default, which the official Step-DPO recipe used
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    # What AdamW keeps per parameter (fasttrain/compact_adamw.py, DESIGN §6.9). fp32: fp32 master weights, grads and
    # moments, 16 bytes. compact: bf16 weights + the master's low 16 bits (the fp32 master exactly), bf16 grads,
    # bf16 moments with stochastic rounding, 10 bytes: Qwen2-72B's state fits 8 x 141 GB without CPU offload.
    optimizer_state: str = "fp32"
    # With LoRA: also write the base with the adapters merged (W + alpha/rank B A, fp32) as a plain HF checkpoint
    # next to each adapter export, <export>_merged/
    merge_lora: bool = False
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate before training and at the end only
    save_final: bool = True
    # dtype of the exported HF weights: auto | bfloat16 | float32. auto: the initial checkpoint's 16-bit dtype when
    # it keeps the trained update (<= 1% relative L2 error, fasttrain/export.py), else float32.
    save_dtype: str = "auto"
    progress_bar: bool = True
    resume: str = ""  # "" (fresh run), "auto" (newest complete checkpoint in output_dir, if any), or a path
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps (0: off)
    checkpoint_minutes: float = 0.0  # ... and/or every so many minutes (0: off)
    keep_checkpoints: int = 2  # the newest K resumable checkpoints are kept
    export_every: int = 0  # also export an HF checkpoint to output_dir/exports/step-N every N steps (0: off)
    max_consecutive_skips: int = 3  # non-finite loss/grad-norm steps in a row before the run stops
    # How long a rank waits in a collective before the run aborts. Ranks wait at a barrier while rank 0 alone
    # writes an HF export (~145 GB at 72B) or prunes an old checkpoint: raise it on a slow shared filesystem.
    dist_timeout_minutes: float = 30.0
    tensorboard: bool = True  # used when tensorboard is installed
    plot: bool = True  # PNG of the curves when matplotlib is installed


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        choices = {
            ("model", "attention_backend"): ("auto", "flash_attn", "torch_varlen", "reference"),
            ("model", "lm_head_impl"): ("auto", "torch", "triton", "chunked"),
            ("model", "compute_dtype"): ("auto", "bfloat16", "float32"),
            ("model", "activation_checkpointing"): ("auto", "none", "selective", "full"),
            ("train", "save_dtype"): ("auto", "bfloat16", "float32"),
            ("train", "optimizer_state"): ("fp32", "compact"),
            ("data", "template"): ("qwen2-boxed", "alpaca", "deepseek-math", "chat"),
            ("data", "mode"): ("step", "full"),
            ("loss", "loss_type"): ("sigmoid", "ipo"),
            ("loss", "reference"): ("precompute", "live"),
        }
        for (section, key), allowed in choices.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key}={value!r}: expected one of {allowed}")
        if self.model.compile and self.model.activation_checkpointing == "selective":
            # untested: the compiled regions would run under the selective-checkpoint dispatch mode
            raise ConfigError("model.activation_checkpointing=selective with model.compile=true is not supported "
                              "yet: use full or none with model.compile")
        self._validate_lora()
        if not self.model.path:
            raise ConfigError("model.path is required (an HF model directory)")
        if not self.data.train:
            raise ConfigError("data.train is required (a JSONL / JSON / Parquet file)")
        d, t, lo = self.data, self.train, self.loss
        if not 0 < d.max_prompt_length < d.max_length:
            raise ConfigError(
                f"data.max_prompt_length={d.max_prompt_length} must be > 0 and < data.max_length={d.max_length}"
            )
        if t.tokens_per_micro_batch < 2 * d.max_length:
            raise ConfigError(
                f"train.tokens_per_micro_batch={t.tokens_per_micro_batch} must be >= 2 * data.max_length "
                f"= {2 * d.max_length} so that any single pair (prompt + chosen + rejected) fits"
            )
        if t.global_batch_pairs < 1:
            raise ConfigError("train.global_batch_pairs must be >= 1")
        if lo.beta <= 0:
            raise ConfigError(f"loss.beta={lo.beta} must be > 0")
        if not 0.0 <= lo.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing={lo.label_smoothing} must be in [0, 0.5)")
        if t.lr <= 0 or not 0 <= t.warmup_ratio < 1:
            raise ConfigError("train.lr must be > 0 and train.warmup_ratio in [0, 1)")
        for key, ok, expected in (
            ("log_every", t.log_every >= 1, ">= 1"), ("eval_every", t.eval_every >= 0, ">= 0"),
            ("checkpoint_every", t.checkpoint_every >= 0, ">= 0"), ("export_every", t.export_every >= 0, ">= 0"),
            ("checkpoint_minutes", t.checkpoint_minutes >= 0, ">= 0"),
            ("keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"), ("max_steps", t.max_steps >= 0, ">= 0"),
            ("epochs", t.epochs >= 0, ">= 0"), ("weight_decay", t.weight_decay >= 0, ">= 0"),
            ("adam_beta1", 0 <= t.adam_beta1 < 1, "in [0, 1)"), ("adam_beta2", 0 <= t.adam_beta2 < 1, "in [0, 1)"),
            ("adam_eps", t.adam_eps > 0, "> 0"), ("max_grad_norm", t.max_grad_norm > 0, "> 0"),
            ("min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
            ("dist_timeout_minutes", t.dist_timeout_minutes > 0, "> 0"),
        ):
            if not ok:
                raise ConfigError(f"train.{key}={getattr(t, key)!r}: expected {expected}")
        if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
            raise ConfigError(f"train.resume={t.resume!r}: expected '', 'auto' or an existing checkpoint directory")
        if t.max_consecutive_skips < 1:
            raise ConfigError("train.max_consecutive_skips must be >= 1")
        if t.epochs <= 0 and t.max_steps <= 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0")


    def _validate_lora(self) -> None:
        from fasttrain.model.lora import parse_targets

        m, defaults = self.model, ModelSection()
        if m.lora_rank < 0:
            raise ConfigError(f"model.lora_rank={m.lora_rank}: expected 0 (full fine-tuning) or a positive rank")
        if m.lora_rank == 0:
            for key in ("lora_alpha", "lora_dropout", "lora_targets"):
                if getattr(m, key) != getattr(defaults, key):
                    raise ConfigError(f"model.{key}={getattr(m, key)!r} is set but model.lora_rank=0 trains every "
                                      "weight: set model.lora_rank > 0 for LoRA, or leave model." + key + " out")
            if self.train.merge_lora:
                raise ConfigError("train.merge_lora=true needs LoRA (model.lora_rank > 0)")
            return
        if m.lora_alpha <= 0:
            raise ConfigError(f"model.lora_alpha={m.lora_alpha}: expected > 0")
        if not 0 <= m.lora_dropout < 1:
            raise ConfigError(f"model.lora_dropout={m.lora_dropout}: expected in [0, 1)")
        try:
            parse_targets(m.lora_targets)
        except ValueError as e:
            raise ConfigError(f"model.lora_targets={m.lora_targets!r}: {e}") from None
        if self.train.optimizer_state != "fp32":
            raise ConfigError("train.optimizer_state=compact with model.lora_rank > 0: LoRA's trainable state is a "
                              "few hundred MB, keep train.optimizer_state=fp32")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML/JSON/CLI value to the field's declared type."""
    target = {"int": int, "float": float, "bool": bool, "str": str}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None
    )
    if target is None:
        raise ConfigError(f"{where}: unsupported field type {annotation!r}")
    if isinstance(value, str) and target is not str:  # from the command line
        text = value.strip()
        try:
            if target is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if target is int:
                number = float(text)  # accepts 1e3; refuses 1.5, 1e-3 (not whole), inf, nan
                if not math.isfinite(number) or not number.is_integer():
                    raise ValueError
                return int(number)
            number = target(text)
            if target is float and not math.isfinite(number):
                raise ValueError
            return number
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a finite {target.__name__}") from None
    if target is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true/false")
        return value
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}={value!r}: expected a finite float")
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}={value!r}: expected {target.__name__}, got {type(value).__name__}")


def _set(cfg: RunConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}; expected one of {sorted(sections)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key}; {section} has {sorted(fields)}")
    hints = typing.get_type_hints(type(obj))
    if (section, key) in BOOLEAN_ALIASES:  # an older boolean setting that grew modes
        aliases = BOOLEAN_ALIASES[section, key]
        text = value.strip().lower() if isinstance(value, str) else value
        if isinstance(text, bool) or text in ("true", "false"):
            value = aliases[text in (True, "true")]
        elif not isinstance(value, str):
            raise ConfigError(f"{source}: {section}.{key}={value!r}: expected one of the modes or true/false "
                              f"(= {aliases[True]} / {aliases[False]})")
    setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


# Settings that were true/false before they had modes: {True: mode, False: mode}
BOOLEAN_ALIASES = {("model", "activation_checkpointing"): {True: "full", False: "none"}}


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    cfg = RunConfig()
    if path:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except Exception as e:  # yaml/json parse errors: keep the parser's line info
            raise ConfigError(f"config file {path} is not valid {p.suffix[1:].upper()}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(cfg, section, key, value, f"config file {path}")
        # Relative paths in a config file are relative to the file, so the demo runs from anywhere.
        base = p.resolve().parent
        for section, key in (("model", "path"), ("model", "tokenizer"), ("data", "train"), ("data", "eval")):
            value = getattr(getattr(cfg, section), key)
            if value and not Path(value).is_absolute() and (base / value).exists():
                setattr(getattr(cfg, section), key, str(base / value))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-6")
        dotted, value = item.split("=", 1)
        section, key = dotted.lstrip("-").split(".", 1)
        _set(cfg, section, key, value, "command line")
    return cfg
