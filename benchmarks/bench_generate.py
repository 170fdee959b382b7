"""Eval generation throughput: the eval's own HF code path (``HFGenerator``) at several batch sizes.

A random-init Qwen2-1.5B-shaped model (hidden 1536, 28 layers, 12 heads / 2 KV heads, FFN 8960, vocab
151936, tied embeddings; bf16 on CUDA) is written to a temporary HF directory together with the repo's
demo tokenizer, then loaded by ``HFGenerator`` exactly as ``python -m fasttrain.eval`` loads a checkpoint:
left-padded batches sorted by length, KV cache, greedy decoding, ``torch.inference_mode``.

* Tokenizer: the demo tokenizer has 1,024 tokens, the model 151,936 rows, so the LM head costs what
  Qwen2-1.5B's does. Prompt ids are all < 1,024; generated ids above that decode to nothing (the text is
  irrelevant here, the token count is measured from ids).
* Prompts: GSM8K problems (default: the distinct problems of ``fasttrain/demo/data/train.jsonl``, which
  ship with the repo; ``--data`` takes e.g. ``../shared/data/gsm8k_test.jsonl``) rendered with the eval's
  template and prefill. Batch size B uses the first B problems, one ``generate`` call = one batch.
* Fixed length: random weights never stop reliably, so the generator runs with ``ignore_eos=True``
  (EOS masked until ``max_new_tokens``): every row generates exactly ``--max-new-tokens`` tokens.
* Per batch size: one full-length warmup call, then ``--repeats`` timed calls of (a) ``max_new_tokens=1`` -- the
  prefill, giving prompt tokens/s -- and (b) the full length. Reported: median wall time per batch,
  generated tokens/s (new tokens / wall time, prefill included: what the eval's summary reports),
  decode tokens/s and ms per decoding step (full minus prefill), peak GPU memory during (b).
* Reading the rows (from transformers 5.17's source, not measured): a left-padded batch carries an attention
  mask, and with a mask transformers' SDPA path does not use grouped-query attention natively: it expands the
  KV cache to every query head (6x here: 12 heads / 2 KV heads) in every layer and step, and its dynamic cache
  re-concatenates per step. B = 1 has no mask and keeps native GQA. So the B = 1 and B > 1 rows do not run
  the same attention code; a drop in per-sequence decode speed at large B is partly that, not the card.

    python benchmarks/bench_generate.py                          # 1.5B shape, B = 1, 32, 256, on CUDA
    python benchmarks/bench_generate.py --batch-sizes 1,64 --max-new-tokens 512 --json out.json
    python benchmarks/bench_generate.py --smoke                  # tiny model on CPU, B = 1, 4, 8 tokens
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import benchlib
import torch

from fasttrain.data.templates import TEMPLATES, render_prompt
from fasttrain.eval.evaluate import DEFAULT_PREFILL, load_problems
from fasttrain.eval.generate import HFGenerator

DEFAULT_DATA = benchlib.DEMO / "data" / "train.jsonl"


@dataclass
class Row:
    batch: int
    prompt_tokens_mean: float     # real prompt tokens per row (no padding)
    padded_width: int             # longest prompt of the batch: the prefill's padded length
    new_tokens: int               # per row
    prefill_s: float              # median wall time of generate(max_new_tokens=1)
    prompt_tok_s: float           # real prompt tokens / prefill_s
    batch_s: float                # median wall time of the full generate call (one batch)
    gen_tok_s: float              # new tokens / batch_s (prefill included, as the eval reports)
    decode_tok_s: float           # (new tokens - 1 per row) / (batch_s - prefill_s)
    ms_per_step: float            # (batch_s - prefill_s) / (new_tokens - 1)
    peak_mem_gib: float | None    # torch.cuda.max_memory_allocated in the full calls, weights included (CUDA only)


def load_prompts(path: Path, count: int, template: str, tokenizer) -> list[str]:
    """The first ``count`` distinct problems of ``path``, rendered as the eval renders them."""
    questions = list(dict.fromkeys(p.question for p in load_problems(path)))
    if len(questions) < count:
        raise ValueError(f"{path} has {len(questions)} distinct problems, the largest batch needs {count}")
    return [render_prompt(template, q, DEFAULT_PREFILL, tokenizer=tokenizer) for q in questions[:count]]


def timed_generate(gen: HFGenerator, prompts: list[str], max_new_tokens: int) -> tuple[float, int, int]:
    """(wall seconds, generated tokens, prompt tokens) of one ``generate`` call, from ``gen.stats``'s counters."""
    before = (gen.stats.generated_tokens, gen.stats.prompt_tokens)
    benchlib.sync(gen.device)
    t0 = time.perf_counter()
    gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    benchlib.sync(gen.device)
    dt = time.perf_counter() - t0
    return dt, gen.stats.generated_tokens - before[0], gen.stats.prompt_tokens - before[1]


def bench_batch(gen: HFGenerator, prompts: list[str], max_new_tokens: int, repeats: int) -> Row:
    b = len(prompts)
    gen.batch_size = b  # one call of b prompts is exactly one batch
    widths = [len(ids) for ids in gen.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    # warmup at the full length: kernels for every shape of the run, allocator blocks for the whole KV cache
    timed_generate(gen, prompts, max_new_tokens)
    prefill = []
    for _ in range(repeats):
        dt, _, n_prompt = timed_generate(gen, prompts, 1)
        prefill.append(dt)
    full, peak = [], None
    for _ in range(repeats):
        benchlib.reset_peak_memory(gen.device)
        dt, n_new, _ = timed_generate(gen, prompts, max_new_tokens)
        if n_new != b * max_new_tokens:
            raise RuntimeError(f"batch {b}: generated {n_new} tokens, expected {b} x {max_new_tokens} "
                               "(ignore_eos should force the full length)")
        full.append(dt)
        gib = benchlib.peak_memory_gib(gen.device)
        peak = None if gib is None else max(peak or 0.0, gib)
    t_pre, t_full = statistics.median(prefill), statistics.median(full)
    t_dec = t_full - t_pre
    steps = max_new_tokens - 1
    # nan when there is no decoding step, or when timing noise makes the full call look no slower than the
    # prefill (seen only on a busy CPU with a few tokens, never a number to report)
    resolved = steps > 0 and t_dec > 0
    return Row(batch=b, prompt_tokens_mean=n_prompt / b, padded_width=max(widths), new_tokens=max_new_tokens,
               prefill_s=t_pre, prompt_tok_s=n_prompt / t_pre, batch_s=t_full,
               gen_tok_s=b * max_new_tokens / t_full,
               decode_tok_s=b * steps / t_dec if resolved else float("nan"),
               ms_per_step=1e3 * t_dec / steps if resolved else float("nan"), peak_mem_gib=peak)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def format_table(rows: list[Row]) -> str:
    head = ["batch", "prompt tok", "width", "new", "prefill s", "prompt tok/s", "batch s", "gen tok/s",
            "decode tok/s", "ms/step", "peak GiB"]
    return benchlib.text_table([head] + [
        [r.batch, f"{r.prompt_tokens_mean:.1f}", r.padded_width, r.new_tokens, f"{r.prefill_s:.3f}",
         f"{r.prompt_tok_s:.0f}", f"{r.batch_s:.2f}", f"{r.gen_tok_s:.0f}", f"{r.decode_tok_s:.0f}",
         f"{r.ms_per_step:.1f}", benchlib.fmt(r.peak_mem_gib, ".2f", "n/a")] for r in rows], right=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, batch sizes 1 and 4, 8 new tokens")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32,256; smoke 1,4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per row (default 256; smoke 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 2; smoke 1)")
    p.add_argument("--device", default=None, help="default: cuda when available (smoke: cpu)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="problems JSONL in the eval's format")
    p.add_argument("--template", default="qwen2-boxed", choices=TEMPLATES)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="benchmark this HF checkpoint instead of a random-init model (EOS still ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


@dataclass
class Settings:
    shape: str  # benchlib.SHAPES
    batch_sizes: list[int]
    max_new_tokens: int
    repeats: int
    device: torch.device
    dtype: torch.dtype


def resolve(args) -> Settings:
    bs = args.batch_sizes or ("1,4" if args.smoke else "1,32,256")
    try:
        batch_sizes = [int(x) for x in bs.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {bs!r}") from None
    max_new = args.max_new_tokens or (8 if args.smoke else 256)
    repeats = args.repeats or (1 if args.smoke else 2)
    if not batch_sizes or min(batch_sizes) < 1 or max_new < 1 or repeats < 1:
        raise ValueError("batch sizes, --max-new-tokens and --repeats must be >= 1")
    if args.device:
        device = torch.device(args.device)
    elif args.smoke:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the full benchmark is for the GPU (use --smoke or --device cpu)")
        device = torch.device("cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what HFGenerator picks by default
    return Settings("tiny" if args.smoke else "qwen2-1.5b", batch_sizes, max_new, repeats, device, dtype)


def run(args) -> dict:
    import transformers

    s = resolve(args)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        model_dir, n_params = args.model_dir, None
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            t0 = time.perf_counter()
            n_params = benchlib.write_random_model(model_dir, s.shape, args.seed, device=s.device, dtype=s.dtype)
            print(f"[bench_generate] random-init {s.shape} ({_fmt_params(n_params)} params) written in "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        t0 = time.perf_counter()
        gen = HFGenerator(str(model_dir), batch_size=max(s.batch_sizes), device=str(s.device), dtype=s.dtype,
                          ignore_eos=True)
        load_s = time.perf_counter() - t0
        prompts = load_prompts(args.data, max(s.batch_sizes), args.template, gen.tokenizer)
        rows = [bench_batch(gen, prompts[:b], s.max_new_tokens, s.repeats) for b in s.batch_sizes]
        meta = {
            "model": s.shape if args.model_dir is None else str(args.model_dir),
            "shape": benchlib.SHAPES[s.shape] if args.model_dir is None else None,
            "params": n_params if n_params is not None else sum(p.numel() for p in gen.model.parameters()),
            "device": benchlib.device_name(s.device),
            "dtype": str(s.dtype).replace("torch.", ""),
            "attn_implementation": getattr(gen.model.config, "_attn_implementation", None),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "data": str(args.data), "template": args.template, "max_new_tokens": s.max_new_tokens,
            "repeats": s.repeats, "decoding": "greedy, EOS ignored (fixed length)", "load_seconds": load_s,
        }
        del gen
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = res["meta"]
    print(f"{m['model']} ({_fmt_params(m['params'])} params), {m['device']}, {m['dtype']}, attention "
          f"{m['attn_implementation']}, torch {m['torch']}, transformers {m['transformers']}; {m['decoding']}, "
          f"{m['max_new_tokens']} new tokens/row; prompts: {m['data']} ({m['template']}); median of {m['repeats']}")
    print(format_table([Row(**r) for r in res["rows"]]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
