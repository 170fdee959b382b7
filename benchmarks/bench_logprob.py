"""LM-head log-prob benchmark (DESIGN §4): fused Triton kernel vs eager / torch.compile / Liger.

For each (N, D) with V = 152064 in bf16: forward + backward time of logp = log_softmax(h @ W.T)[t] with an
upstream gradient (CUDA events, warmup then the median of reps), TFLOP/s counted as 8*N*V*D / time (2 forward,
2 recompute, 4 backward; the same count for every implementation so the numbers compare), and the peak extra
memory: torch.cuda.max_memory_allocated during the step minus what was allocated before it (inputs) minus the
dh / dW outputs. Needs CUDA.

    python benchmarks/bench_logprob.py            # N in {2048, 8192, 32768} x D in {1536, 4096, 8192}
    python benchmarks/bench_logprob.py --quick    # N=2048 and 8192, D=1536 and 4096
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

V_DEFAULT = 152064


def eager_logprobs(h, w, t):
    logits = (h @ w.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)


def make_impls():
    from fasttrain_kernels.ops import lm_head_logprobs_triton

    impls = {"triton": lm_head_logprobs_triton, "eager": eager_logprobs,
             "compile": torch.compile(eager_logprobs, dynamic=False)}
    notes = []
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        notes.append(f"liger: skipped (liger_kernel not importable: {e})")
    else:
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_logprobs(h, w, t):
            return -liger(w, h, t)  # CE with reduction="none" is -logp per row

        impls["liger"] = liger_logprobs
    return impls, notes


def bench_one(fn, h0, w0, t, g, warmup, reps):
    h = h0.detach().clone().requires_grad_()
    w = w0.detach().clone().requires_grad_()

    def step():
        h.grad = None
        w.grad = None
        logp = fn(h, w, t)
        logp.backward(g)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    h.grad = w.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    peak_extra = torch.cuda.max_memory_allocated() - base - grads
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), peak_extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset: N in {2048, 8192}, D in {1536, 4096}")
    ap.add_argument("--vocab", type=int, default=V_DEFAULT)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--impls", default="triton,eager,compile,liger", help="comma-separated subset")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_logprob.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it on the device machine.", file=sys.stderr)
        return 2

    Ns = (2048, 8192) if args.quick else (2048, 8192, 32768)
    Ds = (1536, 4096) if args.quick else (1536, 4096, 8192)
    V, dtype, dev = args.vocab, torch.bfloat16, "cuda"
    impls, notes = make_impls()
    wanted = [s.strip() for s in args.impls.split(",") if s.strip()]
    for name in wanted:
        if name not in impls and not name.startswith("liger"):
            raise SystemExit(f"unknown impl {name!r}; have {sorted(impls)}")
    names = [n for n in wanted if n in impls]
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  V={V} bf16  "
          f"median of {args.reps} (warmup {args.warmup})")
    for note in notes:
        print(f"# {note}")
    print(f"{'N':>6} {'D':>5} {'impl':>8} {'ms':>9} {'TFLOP/s':>8} {'extra GiB':>9}")
    gen = torch.Generator(device=dev).manual_seed(0)
    for D in Ds:
        w = (torch.randn(V, D, device=dev, generator=gen) / D ** 0.5 * 3).to(dtype)
        for N in Ns:
            h = torch.randn(N, D, device=dev, generator=gen).to(dtype)
            t = torch.randint(0, V, (N,), device=dev, generator=gen)
            g = torch.randn(N, device=dev, generator=gen)
            flops = 8 * N * V * D
            for name in names:
                try:
                    sec, extra = bench_one(impls[name], h, w, t, g, args.warmup, args.reps)
                    print(f"{N:>6} {D:>5} {name:>8} {sec * 1e3:>9.2f} {flops / sec / 1e12:>8.1f} "
                          f"{extra / 2**30:>9.2f}", flush=True)
                except torch.OutOfMemoryError:
                    print(f"{N:>6} {D:>5} {name:>8} {'OOM':>9}", flush=True)
                except Exception as e:  # e.g. a Liger version whose reduction="none" backward is unsupported
                    if name == "triton":
                        raise
                    print(f"{N:>6} {D:>5} {name:>8} {'FAILED':>9}  {type(e).__name__}: {str(e)[:80]}", flush=True)
                torch.cuda.empty_cache()
            del h, t, g
        del w
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
