"""Every Triton kernel compiles for the H100 (sm_90) at its GPU defaults, on any machine, and fits the card:
no register spills, at most 255 registers, shared memory within 227 KiB per block, and the fused kernels'
16-bit dots on Hopper's warpgroup MMA (wgmma).

The interpreter (the other CPU kernel tests) never compiles a kernel, so without this a tile setting that does
not build, or one that spills in the vocab loop, would first show on the GPU. benchmarks/kernel_resources.py
compiles with Triton's own compiler and ptxas for a named target; nothing runs, so this is no speed test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"_fwd_kernel", "_bwd_dh_kernel", "_bwd_dw_kernel", "_lse_chunk_kernel", "_dlogits_chunk_kernel"}


def test_kernels_compile_for_sm90_within_the_cards_limits():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build has no NVIDIA backend tools (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling, not interpreting
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    # every kernel, in each dtype, for row counts with and without Triton's divisible-by-16 specialisation
    assert {(r["kernel"], r["dtype"], r["N"]) for r in rows} == {
        (k, d, n) for k in KERNELS for d in ("bf16", "fp16", "fp32") for n in (8192, 8191)}
    for r in rows:
        assert r["arch"] == "sm_90"
        assert r["local_bytes"] == 0, f"spills (local memory per thread): {r}"
        assert 0 < r["regs"] <= 255, r
        assert r["shared_bytes"] <= 232448, r  # H100: 227 KiB opt-in shared memory per block
        fused = r["kernel"] in {"_fwd_kernel", "_bwd_dh_kernel", "_bwd_dw_kernel"}
        if fused and r["dtype"] != "fp32":  # 16-bit dots must run on Hopper's warpgroup MMA, not mma.sync
            assert r["mma"] == "wgmma", r
        elif not fused:  # the epilogues are elementwise / row reductions: the GEMMs are cuBLAS's
            assert r["mma"] == "none", r
