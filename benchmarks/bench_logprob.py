"""LM-head log-prob benchmark (DESIGN §4): fasttrain's kernels vs eager / torch.compile / Liger.

Implementations: "chunked" (cuBLAS GEMMs on vocabulary chunks + Triton epilogues; the trainer's CUDA default),
"triton" (fully fused Triton kernels), "eager" (matmul + log_softmax + gather), "compile" (torch.compile of
eager), "liger" (Liger-Kernel's fused linear cross-entropy, reduction="none", when importable).

For each (N, D) with V = 152064 in bf16: forward + backward time of logp = log_softmax(h @ W.T)[t] with an
upstream gradient (CUDA events, warmup then the median of reps), TFLOP/s counted as 8*N*V*D / time (2 forward,
2 recompute, 4 backward; the same count for every implementation so the numbers compare), and the peak extra
memory: torch.cuda.max_memory_allocated during the step minus what was allocated before it (inputs) minus the
dh / dW outputs ("extra GiB", the issue's measure; "mem/eager" is its ratio to eager's). Eager's peak comes in
log_softmax's backward, before dW exists, so subtracting dW understates eager's extra (by ~9% at N=8192,
D=4096); "peak-in" is the peak minus the inputs with nothing subtracted, to read both ways. Needs CUDA.

    python benchmarks/bench_logprob.py            # N in {2048, 8192, 32768} x D in {1536, 4096, 8192}
    python benchmarks/bench_logprob.py --quick    # N=2048 and 8192, D=1536 and 4096
    python benchmarks/bench_logprob.py --sweep    # tile / chunk settings of both kernels at N=8192, D=4096

Every row also prints the kernel's largest relative error against eager on logp, dh and dW of the timed
inputs ("err"), so a fast but wrong kernel cannot go unnoticed; the bf16 accuracy test against float64 is
tests/test_lm_head_kernel.py::test_gpu_bf16_realistic.
"""
from __future__ import annotations

import argparse
import os
import sys

import benchlib
import torch

V_DEFAULT = 152064


def counted_flops(N: int, D: int, V: int) -> int:
    """Issue 3's count for every implementation alike: forward 2, recompute of the logits 2, backward 4 (N V D)."""
    return 8 * N * V * D


def eager_logprobs(h, w, t):
    logits = (h @ w.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)


def make_impls(compile_backend: str = "inductor"):
    """name -> logp function, and notes on what is missing. ``compile_backend``: torch.compile's backend for
    "compile" (gpu_check.py's CPU rehearsal passes "eager": dynamo's tracing without inductor's C++ build)."""
    from fasttrain_kernels.ops import lm_head_logprobs_chunked, lm_head_logprobs_triton

    impls = {"chunked": lm_head_logprobs_chunked, "triton": lm_head_logprobs_triton, "eager": eager_logprobs,
             "compile": torch.compile(eager_logprobs, dynamic=False, backend=compile_backend)}
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


def make_inputs(N: int, D: int, V: int, dtype: torch.dtype, dev: str, seed: int = 0):
    """h [N, D], W [V, D] (logits ~ N(0, 9)), targets [N], upstream gradient [N] of logp: one timed problem."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(V, D, device=dev, generator=gen) / D ** 0.5 * 3).to(dtype)
    h = torch.randn(N, D, device=dev, generator=gen).to(dtype)
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    g = torch.randn(N, device=dev, generator=gen)
    return h, w, t, g


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
    peak_extra = grads = 0  # the CPU (--smoke): wall-clock times, no memory accounting
    if h.is_cuda:
        torch.cuda.synchronize()
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
        peak_extra = torch.cuda.max_memory_allocated() - base - grads
    sec = benchlib.median_seconds(step, h.device, 0, reps)
    return sec, peak_extra, grads, (logp_of(fn, h, w, t), h.grad, w.grad)


def logp_of(fn, h, w, t):
    with torch.no_grad():
        return fn(h, w, t).float()


def rel_err(got, ref) -> float:
    """max over (logp, dh, dW) of max|got - ref| / max|ref|."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, ref))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset: N in {2048, 8192}, D in {1536, 4096}")
    ap.add_argument("--vocab", type=int, default=V_DEFAULT)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--impls", default="chunked,triton,eager,compile,liger", help="comma-separated subset")
    ap.add_argument("--sweep", action="store_true", help="time tile / chunk settings of both kernels instead")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: one tiny fp32 shape, kernels under the Triton interpreter")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (make_impls imports them)
        Ns, Ds, V, dtype, dev = (37,), (48,), 203, torch.float32, "cpu"
        args.impls, args.warmup, args.reps = "chunked,triton,eager", 1, 2
    elif not torch.cuda.is_available():
        print("bench_logprob.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it on the device machine.", file=sys.stderr)
        return 2

    elif args.sweep:
        return sweep(args)
    else:
        Ns = (2048, 8192) if args.quick else (2048, 8192, 32768)
        Ds = (1536, 4096) if args.quick else (1536, 4096, 8192)
        V, dtype, dev = args.vocab, torch.bfloat16, "cuda"
    impls, notes = make_impls()
    wanted = [s.strip() for s in args.impls.split(",") if s.strip()]
    for name in wanted:
        if name not in impls and not name.startswith("liger"):
            raise SystemExit(f"unknown impl {name!r}; have {sorted(impls)}")
    names = [n for n in wanted if n in impls]
    print(f"# {benchlib.device_name(dev)}  torch {torch.__version__}  V={V} {str(dtype).removeprefix('torch.')}  "
          f"median of {args.reps} (warmup {args.warmup})")
    for note in notes:
        print(f"# {note}")
    print(f"{'N':>6} {'D':>5} {'impl':>8} {'ms':>9} {'TFLOP/s':>8} {'extra GiB':>9} {'x eager':>7} "
          f"{'mem/eager':>9} {'peak-in':>8} {'err':>8}")
    target = []
    for D in Ds:
        for N in Ns:
            flops = counted_flops(N, D, V)
            for r in bench_shape(impls, names, N, D, V, dtype, dev, args.warmup, args.reps):
                if "note" in r:
                    print(f"{N:>6} {D:>5} {r['name']:>8} {r['note']:>9}", flush=True)
                    continue
                print(f"{N:>6} {D:>5} {r['name']:>8} {r['sec'] * 1e3:>9.2f} {flops / r['sec'] / 1e12:>8.1f} "
                      f"{r['extra'] / 2**30:>9.2f} {benchlib.fmt(r['x_eager'], '.2f', '-'):>7} "
                      f"{benchlib.fmt(r['mem'], '.3f', '-'):>9} {(r['extra'] + r['grads']) / 2**30:>8.2f} "
                      f"{benchlib.fmt(r['err'], '.1e', '-'):>8}", flush=True)
                if (N, D) == (8192, 4096) and r["name"] in ("chunked", "triton"):
                    target.append(f"# target N=8192 D=4096 {r['name']}: {flops / r['sec'] / 1e12:.0f} TFLOP/s "
                                  f"(>= 550), {benchlib.fmt(r['x_eager'], '.2f', '-')}x eager (>= 2), extra memory "
                                  f"{benchlib.fmt(r['mem'], '.3f', '-')} of eager's (< 0.15)")
    for line in target:
        print(line)
    return 0


def bench_shape(impls: dict, names, N: int, D: int, V: int, dtype, dev: str, warmup: int, reps: int,
                skip=lambda name: None):
    """Each of ``names`` at one (N, D), eager first (the others' speed, memory and error are against it): dicts of
    name, sec, extra, grads, x_eager, mem (extra / eager's), err (vs eager), or of name and note when it did not
    run (``skip(name)``'s reason, OOM, FAILED: the error)."""
    h, w, t, g = make_inputs(N, D, V, dtype, dev)
    # a fresh compile per shape (compiled during the warmup, not timed): dynamo's recompile limit (8) would
    # otherwise turn the 9th shape of the grid into eager without saying so
    torch._dynamo.reset()
    eager = None
    for name in sorted(names, key=lambda n: n != "eager"):
        note = skip(name)
        if note:
            yield {"name": name, "note": note}
            continue
        try:
            sec, extra, grads, outs = bench_one(impls[name], h, w, t, g, warmup, reps)
        except torch.OutOfMemoryError:
            yield {"name": name, "note": "OOM"}
            continue
        except Exception as e:  # noqa: BLE001 -- one broken impl must not end a (metered) GPU session
            yield {"name": name, "note": f"FAILED: {benchlib.first_line(e, 80)}"}
            continue
        if name == "eager":
            eager = (sec, extra, outs)
        yield {"name": name, "sec": sec, "extra": extra, "grads": grads, "x_eager": eager[0] / sec if eager else None,
               "mem": extra / eager[1] if eager and eager[1] > 0 else None,
               "err": rel_err(outs, eager[2]) if eager and name != "eager" else None}
        del outs
        torch.cuda.empty_cache()


def sweep(args) -> int:
    """Times tile / chunk settings at the target shape; the winners become the modules' GPU defaults."""
    from fasttrain_kernels import lm_head_chunked, lm_head_triton
    from fasttrain_kernels.ops import lm_head_logprobs_chunked, lm_head_logprobs_triton

    N, D, V, dev = 8192, 4096, args.vocab, "cuda"
    h, w, t, g = make_inputs(N, D, V, torch.bfloat16, dev)
    flops = counted_flops(N, D, V)
    print(f"# sweep at N={N} D={D} V={V} bf16 on {benchlib.device_name(dev)}")
    chunked_default = (lm_head_chunked.CHUNK_BYTES, dict(lm_head_chunked.GPU_EPILOGUE))
    for chunk_mib in (128, 256, 512, 1024):
        for block_n, block_c, warps in ((4, 1024, 4), (8, 1024, 8), (2, 2048, 4), (1, 4096, 8)):
            lm_head_chunked.CHUNK_BYTES = chunk_mib * 2**20
            lm_head_chunked.GPU_EPILOGUE = dict(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps)
            sec, extra, _, _ = bench_one(lm_head_logprobs_chunked, h, w, t, g, 2, 5)
            print(f"chunked chunk={chunk_mib}MiB epilogue={block_n}x{block_c}/{warps}w  {sec * 1e3:8.2f} ms "
                  f"{flops / sec / 1e12:6.0f} TFLOP/s  extra {extra / 2**30:.2f} GiB", flush=True)
    lm_head_chunked.CHUNK_BYTES, lm_head_chunked.GPU_EPILOGUE = chunked_default
    triton_default = dict(lm_head_triton.GPU_BLOCKS)
    for bn, bv, bd, warps, stages in ((64, 128, 64, 8, 2), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                                      (128, 256, 64, 8, 3), (128, 128, 128, 8, 2)):
        lm_head_triton.GPU_BLOCKS = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        try:
            sec, extra, _, _ = bench_one(lm_head_logprobs_triton, h, w, t, g, 1, 3)
            print(f"triton blocks={bn}x{bv}x{bd} {warps}w {stages}s  {sec * 1e3:8.2f} ms "
                  f"{flops / sec / 1e12:6.0f} TFLOP/s  extra {extra / 2**30:.2f} GiB", flush=True)
        except Exception as e:  # e.g. out of shared memory for a large tile: report and go on
            print(f"triton blocks={bn}x{bv}x{bd} {warps}w {stages}s  FAILED {type(e).__name__}: {str(e)[:80]}")
    lm_head_triton.GPU_BLOCKS = triton_default
    return 0


if __name__ == "__main__":
    sys.exit(main())
