"""Write the demo model's config.json and model.safetensors (bf16): briefly pretrained by default.

    python tools/demo/make_demo_model.py [--out fasttrain/demo/model] [--random-init]

A tiny Qwen2-shaped decoder (4 layers, hidden 128, GQA 4/2 heads, tied embeddings) sized to the demo
byte-level BPE tokenizer in the same folder. Only config.json and model.safetensors are replaced; the
tokenizer files there belong to make_demo_tokenizer.py and are left alone.

By default the randomly initialised model (seed 0) then gets a short causal-LM pretraining (a few
minutes on a 2-core CPU) on the GSM8K reference solutions of the problems in data/train.jsonl only
(eval.jsonl's problems stay held out), each formatted like the Step-DPO prompts: the qwen2-boxed
template, "Let's think step by step.", "Step k: <line>" lines and "The answer is: <answer>". It learns,
among other things, that the number shown after a ``<<expr=result>>`` annotation repeats its result,
which is what the demo's preference pairs test. The script reports how often the model prefers the
chosen over the rejected step on eval.jsonl, before and after. ``--random-init`` skips pretraining
(the old behaviour). Deterministic on a given machine and torch build (fixed seeds, fixed step count);
thread scheduling can change fp32 sums in the last bits elsewhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import save_hf_checkpoint

DEMO_DIR = Path(__file__).resolve().parents[2] / "fasttrain" / "demo" / "model"
DATA_DIR = Path(__file__).resolve().parents[2] / "fasttrain" / "demo" / "data"
DEFAULT_GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_test.jsonl"
DEFAULT_VOCAB = 1024
TEMPLATE = "qwen2-boxed"

# Pretraining settings (see pretrain()).
PRETRAIN_STEPS = 500
PRETRAIN_TOKENS_PER_BATCH = 4096
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 25
PRETRAIN_MIN_LR_RATIO = 0.1
PRETRAIN_WEIGHT_DECAY = 0.01
PRETRAIN_MAX_LEN = 1024


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


# ---------------------------------------------------------------------------------------- pretraining
def solution_text(output: str) -> str | None:
    """A GSM8K solution as the demo's steps: "Step 1: line\nStep 2: line ...\nThe answer is: x"."""
    lines = [text.strip() for text in output.split("\n") if text.strip()]
    if len(lines) < 2 or not lines[-1].startswith("####"):
        return None
    steps = "\n".join(f"Step {i + 1}: {line}" for i, line in enumerate(lines[:-1]))
    return steps + "\nThe answer is: " + lines[-1].removeprefix("####").strip()


def pretrain_texts(train_path: Path, gsm8k_path: Path) -> list[str]:
    """The full solution text of every GSM8K problem whose question is a prompt in ``train_path``,
    rendered like the Step-DPO prompts (template + "Let's think step by step.\nStep 1: ..."). Only
    train problems: make_demo_data.py splits train/eval by problem, so eval questions never occur."""
    from fasttrain.data.templates import render_prompt

    with open(train_path, encoding="utf-8") as handle:
        train_prompts = {json.loads(line)["prompt"] for line in handle if line.strip()}
    texts, seen = [], set()
    with open(gsm8k_path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            question = row["instruction"].strip()
            solution = solution_text(row["output"])
            if question not in train_prompts or question in seen or solution is None:
                continue
            seen.add(question)
            # = render_prompt(..., "Let's think step by step.\nStep 1:") + " line 1\nStep 2: ...".
            texts.append(render_prompt(TEMPLATE, question, "Let's think step by step.\n") + solution)
    if len(seen) != len(train_prompts):
        raise ValueError(f"{gsm8k_path}: found {len(seen)} of the {len(train_prompts)} problems of {train_path}")
    return texts


def _pack(seqs: list[np.ndarray], budget: int) -> list[list[int]]:
    """Indices of ``seqs`` grouped into batches of at most ``budget`` tokens (first fit, in order)."""
    batches, current, load = [], [], 0
    for i, seq in enumerate(seqs):
        if current and load + len(seq) > budget:
            batches.append(current)
            current, load = [], 0
        current.append(i)
        load += len(seq)
    if current:
        batches.append(current)
    return batches


def pretrain(model, sequences: list[np.ndarray], steps: int, seed: int, log_every: int = 25) -> float:
    """Causal-LM cross-entropy on every token of packed sequences (fp32, AdamW, warmup + cosine).
    Each epoch reshuffles the sequences (seeded) and packs them to ~PRETRAIN_TOKENS_PER_BATCH tokens.
    Returns the mean loss over the last 10% of steps."""
    from fasttrain.packing import AttentionMeta

    model.set_attention_backend("reference")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": PRETRAIN_WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=PRETRAIN_LR, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < PRETRAIN_WARMUP:
            return PRETRAIN_LR * (step + 1) / PRETRAIN_WARMUP
        progress = (step - PRETRAIN_WARMUP) / max(1, steps - PRETRAIN_WARMUP)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return PRETRAIN_LR * (PRETRAIN_MIN_LR_RATIO + (1 - PRETRAIN_MIN_LR_RATIO) * cosine)

    rng = np.random.default_rng(seed)
    batches: list[list[int]] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if not batches:
            order = rng.permutation(len(sequences))
            shuffled = [sequences[i] for i in order]
            batches = [[int(order[i]) for i in b] for b in _pack(shuffled, PRETRAIN_TOKENS_PER_BATCH)]
            batches.reverse()  # pop() from the end = in order
        seqs = [sequences[i] for i in batches.pop()]
        ids = torch.from_numpy(np.concatenate(seqs))
        lengths = [len(s) for s in seqs]
        pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
        # Targets: the next token inside the same sequence; a sequence's last row predicts nothing.
        targets = torch.roll(ids, -1)
        ends = torch.from_numpy(np.cumsum(lengths) - 1)
        targets[ends] = -100
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model.logits(ids, pos, AttentionMeta.for_sequences(lengths))
        loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            print(f"pretrain step {step + 1}/{steps}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return float(sum(tail) / len(tail))


@torch.no_grad()
def preference_accuracy(model, tokenizer, path: Path, token_budget: int = 8192) -> float:
    """Fraction of the pairs in ``path`` where log p(chosen | prompt) > log p(rejected | prompt)."""
    from fasttrain.data import prepare_dataset
    from fasttrain.loss import continuation_logps, pair_logps
    from fasttrain.packing import bin_groups, build_groups, pack_groups

    model.set_attention_backend("reference")
    model.eval()
    pairs = prepare_dataset(path, tokenizer, TEMPLATE, max_length=512, max_prompt_length=384)
    groups = build_groups(pairs.prompts, pairs.chosens, pairs.rejecteds, pairs.record_ids)
    wins = total = 0
    for bin_ in bin_groups(groups, token_budget):
        batch = pack_groups(bin_)
        cont_M = continuation_logps(model(batch), batch.lp_cont_N, batch.num_continuations)
        chosen_B, rejected_B = pair_logps(cont_M, batch.chosen_cont_B, batch.rejected_cont_B)
        wins += int((chosen_B > rejected_B).sum())
        total += batch.num_pairs
    return wins / total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-init", action="store_true",
                    help="write the randomly initialised weights, no pretraining")
    ap.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pretraining steps (~4096 tokens each)")
    ap.add_argument("--train", type=Path, default=DATA_DIR / "train.jsonl",
                    help="Step-DPO train file: its prompts pick the GSM8K problems to pretrain on")
    ap.add_argument("--eval", type=Path, default=DATA_DIR / "eval.jsonl",
                    help="Step-DPO eval file for the preference check (never trained on)")
    ap.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    args = ap.parse_args(argv)
    out: Path = args.out
    vocab, eos = tokenizer_vocab(out)
    cfg = ModelConfig.from_hf_dict(demo_config_dict(vocab, eos), source="demo config")
    torch.manual_seed(args.seed)
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    model.init_weights(seed=args.seed, std=0.02)
    if not args.random_init:
        from transformers import AutoTokenizer

        torch.set_num_threads(2)
        tok = AutoTokenizer.from_pretrained(str(out))
        before = preference_accuracy(model, tok, args.eval) if args.eval.is_file() else None
        texts = pretrain_texts(args.train, args.gsm8k)
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        sequences = [np.asarray(x[:PRETRAIN_MAX_LEN], dtype=np.int64) for x in ids]
        print(f"pretraining on {len(sequences)} train problems, {sum(map(len, sequences)):,} tokens, "
              f"{args.steps} steps", flush=True)
        start = time.perf_counter()
        final_loss = pretrain(model, sequences, args.steps, args.seed)
        elapsed = time.perf_counter() - start
        # Measure what is shipped: the weights rounded to bf16.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        print(f"pretrained in {elapsed:.0f}s; final LM loss {final_loss:.4f} (mean of the last 10% of steps)")
        if before is not None:
            after = preference_accuracy(model, tok, args.eval)
            print(f"{args.eval.name}: log p(chosen) > log p(rejected) for {before:.3f} of pairs at random init, "
                  f"{after:.3f} after pretraining")
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
