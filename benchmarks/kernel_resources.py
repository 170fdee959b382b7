"""Compiles every fasttrain Triton kernel for a GPU target on any machine (no GPU needed) and reports what
ptxas gave it: registers per thread, local memory (register spills), shared memory, and which matrix
instructions its dots became (Hopper's wgmma, the older mma.sync, or none).

Why: on a CPU the kernels run only under the Triton interpreter, which does not compile them, so it cannot
show that they build for the card, nor how their tile settings fit it. Triton's own compiler (with the ptxas
and cuobjdump it bundles) can, for a target named here instead of read from a driver: the launch goes through
the kernel's ``warmup`` with the same arguments, constexprs and options as the real launchers use at the GPU
defaults (GPU_BLOCKS, GPU_EPILOGUE), so the binary is the one a launch on that card would build. Nothing
runs, so this says nothing about speed (benchmarks/bench_logprob.py measures that on the GPU).

    python benchmarks/kernel_resources.py                 # sm_90 (H100), bf16 / fp16 / fp32, a table
    python benchmarks/kernel_resources.py --json          # one JSON object per kernel variant (tests read it)
    python benchmarks/kernel_resources.py --sweep         # the fused kernel's tile settings, bf16

Variants: each dtype, and N (rows) a multiple of 16 or not, because Triton specialises integer arguments on
divisibility by 16 and so builds two binaries for the two cases. Limits checked by tests/test_kernel_resources.py:
no local memory (a spill costs a round trip to L1/L2 per use inside the vocab loop), at most 255 registers and
shared memory within the card's 227 KiB per block (H100: 232448 bytes opt-in).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib  # noqa: F401 -- imported for its effect: this checkout's kernels first on sys.path
import torch
import triton

from fasttrain_kernels import lm_head_chunked, lm_head_triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
V, D = 152064, 4096  # Qwen2 vocabulary and an 8B-class hidden size; only their divisibility by 16 matters here


class _TargetOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup`` to compile for a named target."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def compiling_for(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    previous = driver._active  # reset_active() would build the default driver, which fails without a GPU
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    try:
        yield
    finally:
        driver._active = previous


def _nvidia_tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this triton build has no NVIDIA backend tools")
    return str(path)


def resource_usage(cubin: bytes) -> dict:
    """{'regs', 'local_bytes', 'static_shared_bytes'} from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[1]))
    return {"regs": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
            "static_shared_bytes": int(fields["SHARED"])}


def matmul_instructions(ptx: str) -> str:
    """Which matrix instructions the kernel's dots became: "wgmma" (Hopper's asynchronous warpgroup MMA, what
    a GEMM needs to approach the card's bf16 rate), "mma.sync" (the pre-Hopper tensor-core path, on H100 well
    under half that rate), "none" (no tensor cores: FMA dots, as fp32 IEEE dots are, or no dot at all)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def _launches(dtype: torch.dtype, n_rows: int, fused_blocks: dict | None = None) -> list[tuple]:
    """(kernel, args, options) for every kernel as the launchers call it at the GPU defaults. Tensors are tiny
    CPU stand-ins: only their dtype and alignment enter the compiled binary, the sizes only by divisibility."""
    h = torch.empty(16, 16, dtype=dtype)
    w = torch.empty(16, 16, dtype=dtype)
    t = torch.empty(16, dtype=torch.int64)
    f32 = torch.empty(16, dtype=torch.float32)

    blocks = {**lm_head_triton.default_blocks(torch.device("cuda"), dtype), **(fused_blocks or {})}
    fused_opts = {**lm_head_triton._launch_opts(blocks, dtype),
                  "num_warps": blocks["num_warps"], "num_stages": blocks["num_stages"]}
    dims = (n_rows, V, D, D, D)  # N, V, D, stride_h, stride_w
    out = [
        (lm_head_triton._fwd_kernel, (h, w, t, f32, f32, *dims), fused_opts),
        (lm_head_triton._bwd_dh_kernel, (h, w, t, f32, f32, f32, f32, *dims), fused_opts),
        (lm_head_triton._bwd_dw_kernel, (h, w, t, f32, f32, f32, f32, *dims), fused_opts),
    ]
    if fused_blocks is None:
        ep = dict(lm_head_chunked.GPU_EPILOGUE)
        chunk = lm_head_chunked.chunk_cols(n_rows, V, h.element_size(), torch.device("cuda"))
        z = torch.empty(16, 16, dtype=dtype)
        tail = (n_rows, chunk, 0, chunk)  # N, C, v0, stride_z
        out += [
            (lm_head_chunked._lse_chunk_kernel, (z, t, f32, f32, f32, *tail), ep),
            (lm_head_chunked._dlogits_chunk_kernel, (z, t, f32, f32, f32, *tail), ep),
        ]
    return out


def compile_all(arch: int, dtypes: list[str], row_counts: list[int], fused_blocks: dict | None = None) -> list[dict]:
    rows = []
    with compiling_for(arch):
        for dtype_name in dtypes:
            for n_rows in row_counts:
                for kernel, args, opts in _launches(DTYPES[dtype_name], n_rows, fused_blocks):
                    compiled = kernel.warmup(*args, grid=(1,), **opts)
                    usage = resource_usage(compiled.asm["cubin"])
                    usage["mma"] = matmul_instructions(compiled.asm["ptx"])
                    rows.append({"kernel": kernel.__name__, "dtype": dtype_name, "N": n_rows, "arch": f"sm_{arch}",
                                 "options": {k: v for k, v in opts.items() if k != "DOT_PRECISION"},
                                 "num_warps": compiled.metadata.num_warps,
                                 "shared_bytes": compiled.metadata.shared, **usage})
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"# triton {triton.__version__}, target {rows[0]['arch']}, V={V} D={D}; nothing runs (static)")
    print(f"{'kernel':24s} {'dtype':5s} {'N':>5s} {'tiles / options':44s} {'regs':>4s} {'local B':>7s} "
          f"{'smem KiB':>8s} {'mma':>8s}")
    for r in rows:
        opts = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["options"].items())
        print(f"{r['kernel']:24s} {r['dtype']:5s} {r['N']:5d} {opts:44s} {r['regs']:4d} {r['local_bytes']:7d} "
              f"{r['shared_bytes'] / 1024:8.1f} {r['mma']:>8s}")


SWEEP = [dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d, num_warps=wps, num_stages=st)
         for n, v, d in ((64, 128, 64), (64, 128, 32), (64, 64, 64), (128, 128, 64), (64, 256, 64), (128, 128, 128))
         for wps, st in ((4, 2), (8, 2), (8, 3))]


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter hands back kernels that cannot compile
        sys.exit("kernel_resources.py compiles the kernels: run it without TRITON_INTERPRET=1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    ap.add_argument("--sweep", action="store_true", help="the fused kernel's tile settings (N % 16 == 0)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="--sweep: the input dtype")
    args = ap.parse_args(argv)
    if args.sweep:
        rows = [r for blocks in SWEEP for r in compile_all(args.arch, [args.dtype], [8192], blocks)]
    else:
        rows = compile_all(args.arch, list(DTYPES), [8192, 8191])
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
