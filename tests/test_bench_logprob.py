"""benchmarks/bench_logprob.py runs end to end (--smoke: CPU, interpreter, tiny fp32 shape) and its kernels
agree with eager on the timed inputs; the GPU numbers come from the device (benchmarks/RESULTS.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_logprob_smoke():
    pytest.importorskip("triton")
    from triton_interpreter import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_logprob.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[2]: line.split() for line in out.stdout.splitlines()
            if line.strip() and not line.startswith("#") and line.split()[0] == "37"}
    assert set(rows) == {"eager", "chunked", "triton"}, out.stdout
    for name in ("chunked", "triton"):
        assert float(rows[name][-1]) < 1e-5, rows[name]  # fp32: relative error vs eager on logp, dh, dW
