"""HF safetensors checkpoints in and out (DESIGN §5).

Loading reads straight into the (possibly FSDP2-sharded) parameters: each rank reads only its own rows
of every tensor with ``safe_open(...).get_slice(name)[start:end]``, so no rank ever holds a full copy of
the model. Saving writes what ``transformers`` and vLLM load unchanged: safetensors (sharded with
``model.safetensors.index.json`` past ``max_shard_bytes``), ``config.json`` and tokenizer files, into a
temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fasttrain.model.config import ARCHITECTURES, ModelConfig
from fasttrain.model.decoder import CausalLM
from fasttrain.model.hf_layout import HFReader, Piece, hf_pieces, to_hf_state_dict
from fasttrain.model.lora import is_adapter
from fasttrain.model.shards import check_writable_sharding, local_shard

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer-side files copied by save_hf_checkpoint(tokenizer_dir=...); generation_config.json is not a
# tokenizer file but belongs with a servable checkpoint and usually sits in the same source directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Checkpoint keys that carry no trainable state (old transformers saved RoPE frequencies).
_HARMLESS_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------
# Source directory
# ----------------------------------------------------------------------------------------------
def resolve_model_source(path: str | os.PathLike) -> Path:
    """Check that ``path`` is an HF model directory we can load; return it as a Path."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist (a local HF model directory is expected)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'}: not found; the model directory needs an HF config.json")
    if (d / INDEX_FILE).is_file():
        for shard in sorted(set(_read_index(d / INDEX_FILE).values())):
            if not (d / shard).is_file():
                raise FileNotFoundError(f"{d / shard}: listed in {d / INDEX_FILE} but not found")
        return d
    if (d / SINGLE_FILE).is_file():
        return d
    legacy = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (d / n).is_file()]
    hint = f" (found {legacy[0]}; convert it to safetensors first)" if legacy else ""
    raise FileNotFoundError(f"{d}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def check_model_files(path: str | os.PathLike) -> Path:
    """``resolve_model_source`` plus every safetensors file's header read: a truncated or corrupt file is named
    here, before any data is tokenized or any output written, not halfway through loading."""
    d = resolve_model_source(path)
    shards = sorted(set(_read_index(d / INDEX_FILE).values())) if (d / INDEX_FILE).is_file() else [SINGLE_FILE]
    for shard in shards:
        with _open_safetensors(d / shard):
            pass
    return d


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: expected a JSON object with a 'weight_map' ({e!r})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{index_path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{index_path}: cannot parse the JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise OSError(f"{index_path}: cannot read the file ({e.strerror or e})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names (strings)")
    return weight_map


def _open_safetensors(path: Path):
    """safe_open, with the file named in the error: safetensors' own messages ("Error while
    deserializing header: header too large") do not say which file is damaged."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt? {e})") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read the file ({e.strerror or e})") from None


def hf_reader(model_dir: str | os.PathLike) -> HFReader:
    """Reads rows of parameters (fused or not) out of ``model_dir``'s safetensors files; a context manager."""
    return HFReader(checkpoint_tensor_files(model_dir), _open_safetensors)


def checkpoint_tensor_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    d = resolve_model_source(model_dir)
    if (d / INDEX_FILE).is_file():
        return {name: d / shard for name, shard in _read_index(d / INDEX_FILE).items()}
    with _open_safetensors(d / SINGLE_FILE) as f:
        return {name: d / SINGLE_FILE for name in f.keys()}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, model_dir: str | os.PathLike) -> None:
    """Copy an HF checkpoint into ``model``'s parameters in place (cast to each parameter's dtype).

    Works for a plain module and for one sharded by FSDP2 after ``to_empty``: each parameter's local rows are
    read, nothing more (a fused projection's rows come from its HF pieces, hf_layout.py). Errors name the
    tensor and the file: missing keys, unexpected keys, shape mismatches. A tied LM head is the embedding's
    Parameter, so ``lm_head.weight`` is neither required nor (if present) loaded.
    """
    check_writable_sharding(model)
    files = checkpoint_tensor_files(model_dir)
    # remove_duplicate: a tied weight appears once; LoRA adapters are not in HF files
    params = {n: p for n, p in model.named_parameters() if not is_adapter(n)}
    pieces = {n: param_pieces(model, n, p) for n, p in params.items()}
    where = Path(model_dir) / (INDEX_FILE if (Path(model_dir) / INDEX_FILE).is_file() else SINGLE_FILE)

    needed = [piece.hf_name for ps in pieces.values() for piece in ps]
    missing = [n for n in needed if n not in files]
    if missing:
        raise KeyError(f"{where}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) that the model needs")
    tied = _is_tied(model)
    needed_set = set(needed)
    unexpected = [
        n for n in files
        if n not in needed_set and not _HARMLESS_KEY.search(n) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        raise KeyError(
            f"{where}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) that the model "
            "does not have; is config.json the one that belongs to these weights?"
        )

    with HFReader(files, _open_safetensors) as reader:
        for n, param in params.items():
            for piece in pieces[n]:
                found = tuple(reader.slice(piece.hf_name).get_shape())
                expected = (piece.end - piece.start, *param.shape[1:])
                if found != expected:
                    raise ValueError(
                        f"{files[piece.hf_name]}: tensor {piece.hf_name!r} has shape {found}, the model expects "
                        f"{expected}{_per_config(model)}"
                    )
            local, start, end = local_shard(param, n)
            if end > start:
                local.copy_(reader.rows(pieces[n], start, end))
    reset = getattr(model, "reset_buffers", None)
    if callable(reset):
        reset()


def param_pieces(model: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[Piece, ...]:
    """The HF tensors that parameter ``name`` of ``model`` is made of (itself, unless it is a fused projection)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        return (Piece(name, 0, param.shape[0] if param.dim() else 1),)
    return hf_pieces(cfg, name, param.shape[0] if param.dim() else 1)


def _per_config(model: torch.nn.Module) -> str:
    source = getattr(getattr(model, "config", None), "source", None)
    return f" per {source}; do the weights and config.json belong together?" if source else ""


def _is_tied(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_hf_checkpoint(
    full_state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint directory from a full (unsharded, e.g. rank 0's gathered) state dict.

    Keys are the model's (a fused projection is written as HF's per-module tensors, hf_layout.py) or HF's own;
    keys and shapes are checked against ``cfg`` before anything is written. With tied embeddings
    ``lm_head.weight`` is dropped (transformers re-ties it). Floating tensors are cast to ``dtype``.
    Atomic: written into ``<out_dir>.tmp-<pid>`` and renamed to ``out_dir`` only when complete; an
    existing ``out_dir`` is an error unless ``overwrite=True``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if tokenizer is not None and tokenizer_dir is not None:
        raise ValueError("pass either tokenizer or tokenizer_dir, not both")
    tensors = _checked_state_dict(to_hf_state_dict(full_state_dict, cfg), cfg)

    with _atomic_dir(out) as tmp:
        _write_safetensors(tensors, tmp, dtype, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return out


def save_peft_adapter(adapters: dict[str, torch.Tensor], adapter_config: dict, out_dir: str | os.PathLike,
                      tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, keys already
    PEFT's), atomically like save_hf_checkpoint; the tokenizer files beside it, so the directory is usable alone."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    with _atomic_dir(out) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in adapters.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return out


@contextmanager
def _atomic_dir(out: Path):
    """Yields ``<out>.tmp-<pid>`` to fill; when the block ends, its files get the usual umask-based mode
    (safetensors creates them 0600), are fsynced, and the directory replaces ``out`` by a rename. On any error the
    temporary directory is removed and ``out`` is left as it was."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~umask)
            with open(p, "rb") as fh:  # durable before the rename makes it look finished
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _checked_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):  # HF's names: the per-module projections
        expected = {n: tuple(p.shape) for n, p in CausalLM(replace(cfg, fuse_projections=False)).named_parameters()}
    out = {}
    for name, t in sd.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # the same Parameter as model.embed_tokens.weight; HF expects one key
        if name not in expected:
            raise KeyError(f"state dict key {name!r} is not a parameter of a {cfg.model_type} model per {cfg.source}")
        if isinstance(t, DTensor):
            raise TypeError(
                f"state dict key {name!r} is a sharded DTensor; pass a full state dict "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True))"
            )
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"state dict key {name!r} has shape {tuple(t.shape)}, {cfg.source} implies {expected[name]}"
            )
        out[name] = t
    missing = [n for n in expected if n not in out]
    if missing:
        raise KeyError(f"state dict lacks {missing[0]!r} (and {len(missing) - 1} more)")
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size())

    # Plan shards first, then convert one shard at a time (never a second full copy in memory).
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        b = nbytes(t)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for fname, keys in zip(names, shards):
        part = {}
        for k in keys:
            t = tensors[k].detach()
            t = t.to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a row view of a fused projection: safetensors refuses tensors that share memory
            part[k] = t
            weight_map[k] = fname
        save_file(part, str(out / fname), metadata={"format": "pt"})
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    d = dict(cfg.hf_dict)
    name = str(dtype).removeprefix("torch.")
    d["dtype"] = name  # transformers >= 5 reads "dtype", older versions and vLLM "torch_dtype"
    d["torch_dtype"] = name
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    if not d.get("architectures"):
        d["architectures"] = [ARCHITECTURES[cfg.model_type]]
    return d


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist")
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not any(n.startswith(("tokenizer", "vocab")) for n in copied):
        raise FileNotFoundError(f"{src}: no tokenizer files found (looked for {TOKENIZER_FILES})")
    for n in copied:
        shutil.copy2(src / n, dst / n)
