"""Test helpers: run ``fasttrain/run.py`` in a subprocess, alone or under torchrun, as a user would; import a
benchmark script (``benchmarks/`` is not a package) as a module."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "fasttrain" / "run.py"
DEMO = REPO / "fasttrain" / "demo"
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as the module ``name`` (registered in sys.modules: dataclasses look it up there), with
    benchmarks/ on sys.path, as when the script runs: its shared parts (benchlib) are imported by name."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fasttrain(args: list[str], nproc: int = 1, env_extra: dict | None = None, max_restarts: int = 0,
                  cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """One process without torchrun when nproc == 1 and no restarts are asked for, else torchrun."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FASTTRAIN_FAULT", None)
    env.pop("TRITON_INTERPRET", None)  # test_lm_head_kernel sets it in this process; runs get it only if asked
    env.update(env_extra or {})
    if nproc == 1 and not max_restarts:
        cmd = [sys.executable, str(RUN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), "--master-port", str(free_port()), str(RUN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
