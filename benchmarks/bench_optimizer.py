"""One AdamW step over a model's parameters, side by side in one process: fp32 master state (torch's AdamW,
for-each and fused) against train.optimizer_state=compact (fasttrain.compact_adamw.CompactAdamW), with the
persistent bytes per parameter measured from the tensors (weights + grads + optimizer state).

    python benchmarks/bench_optimizer.py                      # ~100M params (hidden 768, 12 blocks, 32k vocab)
    python benchmarks/bench_optimizer.py --smoke              # tiny, seconds (CI)

Times are the median of --reps steps after --warmup, with random gradients in place (the step alone: no
gradient clipping, no forward or backward). The update is memory-bound, so the ratio on a GPU follows the bytes
each implementation moves, not the CPU's ratio: CPU numbers are CPU numbers.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import benchlib
import torch

from fasttrain.compact_adamw import CompactAdamW

# A ~100M-parameter Qwen2-like layout: embedding, then per block q/k/v/o, gate/up/down and two norms.
HUNDRED_M = dict(vocab=32000, hidden=768, ffn=2048, layers=12)
SMOKE = dict(vocab=1024, hidden=128, ffn=384, layers=2)


def parameter_shapes(vocab: int, hidden: int, ffn: int, layers: int) -> list[tuple[int, ...]]:
    block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return [(vocab, hidden)] + block * layers + [(hidden,)]


def make_state(shapes, dtype: torch.dtype, device, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def persistent_bytes(params, optimizer) -> int:
    total = sum(p.nbytes + p.grad.nbytes for p in params)
    return total + sum(t.nbytes for p in params for t in optimizer.state[p].values() if t.dim() > 0)


VARIANTS: dict[str, tuple[torch.dtype, Callable]] = {
    "fp32 AdamW (for-each)": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=5e-7, foreach=True)),
    "fp32 AdamW (fused)": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=5e-7, fused=True)),
    "compact (CompactAdamW)": (torch.bfloat16, lambda ps: CompactAdamW(ps, lr=5e-7)),
}


def measure(shapes, device, warmup: int, reps: int) -> list[dict]:
    rows = []
    for name, (dtype, make) in VARIANTS.items():
        params = make_state(shapes, dtype, device, seed=0)
        optimizer = make(params)
        seconds = benchlib.median_seconds(optimizer.step, device, warmup, reps)
        n = sum(p.numel() for p in params)
        rows.append({"variant": name, "params": n, "step_s": seconds,
                     "bytes_per_param": persistent_bytes(params, optimizer) / n})
        del params, optimizer
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = parameter_shapes(**(SMOKE if args.smoke else HUNDRED_M))
    rows = measure(shapes, device, args.warmup, args.reps)
    base = rows[0]["step_s"]
    print(f"AdamW step over {rows[0]['params'] / 1e6:.1f}M params on {benchlib.device_name(device)} "
          f"(median of {args.reps} after {args.warmup}); commit {(benchlib.resolve_commit() or ('?',))[0]}")
    table = [["variant", "step (ms)", "vs fp32 for-each", "persistent B/param"]]
    table += [[r["variant"], f"{r['step_s'] * 1e3:.1f}", f"{r['step_s'] / base:.2f}x", f"{r['bytes_per_param']:.2f}"]
              for r in rows]
    print(benchlib.markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
