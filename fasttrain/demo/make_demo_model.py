"""Write the demo model's config.json and randomly initialised model.safetensors (bf16, seed 0).

    python -m fasttrain.demo.make_demo_model [--out fasttrain/demo/model]

A tiny Qwen2-shaped decoder (4 layers, hidden 128, GQA 4/2 heads, tied embeddings) sized to the demo
byte-level BPE tokenizer in the same folder. Only config.json and model.safetensors are replaced; the
tokenizer files there belong to make_demo_tokenizer.py and are left alone. Deterministic: running it
twice gives byte-identical weights.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

import torch

from fasttrain.model.checkpoint import save_hf_checkpoint
from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model

DEMO_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_VOCAB = 1024


def demo_config_dict(vocab_size: int, eos_token_id: int | None) -> dict:
    # Old-style top-level rope_theta: read by transformers 4.x, 5.x and vLLM alike.
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
    }


def tokenizer_vocab(model_dir: Path) -> tuple[int, int | None]:
    """(vocab size rounded up to a multiple of 64, eos id) from the tokenizer in model_dir."""
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'tokenizer.json'}: not found; run python -m fasttrain.demo.make_demo_tokenizer first"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return int(math.ceil(len(tok) / 64) * 64), tok.eos_token_id


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out: Path = args.out
    vocab, eos = tokenizer_vocab(out)
    cfg = ModelConfig.from_hf_dict(demo_config_dict(vocab, eos), source="demo config")
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    model.init_weights(seed=args.seed, std=0.02)
    # save_hf_checkpoint replaces a whole directory; write a sibling and move only our two files.
    staging = out.with_name(out.name + f".model-staging-{os.getpid()}")
    save_hf_checkpoint(model.state_dict(), cfg, staging, dtype=torch.bfloat16, overwrite=True)
    try:
        for name in ("model.safetensors", "config.json"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/config.json and model.safetensors: qwen2, vocab {vocab}, {n:,} parameters (bf16)")


if __name__ == "__main__":
    main()
