"""Which attention backend a run gets (fasttrain.attention.resolve_backend), decided from the device, the
compute dtype and what actually imports; runs on the CPU (a CUDA device object needs no GPU to be named)."""
from __future__ import annotations

import importlib
import logging
import sys

import pytest
import torch

from fasttrain.attention import resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HAS_TORCH_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None


@pytest.fixture
def no_flash_attn(monkeypatch):
    """flash-attn not installed (whatever this machine has)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "flash_attn" else real(name, *a, **k))


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    """flash-attn installed, but its extension fails to load (a wheel built for another torch / CUDA)."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    importlib.invalidate_caches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_is_the_reference(dtype):
    assert resolve_backend("auto", CPU, dtype) == "reference"


def test_auto_on_cuda_in_fp32_is_the_reference(no_flash_attn):
    # both flash kernels refuse fp32 ("FlashAttention only support fp16 and bf16 data type")
    assert resolve_backend("auto", CUDA, torch.float32) == "reference"


@pytest.mark.skipif(not HAS_TORCH_VARLEN, reason="torch without torch.nn.attention.varlen")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_on_cuda_in_16_bit_without_flash_attn_is_torch_varlen(no_flash_attn, dtype):
    assert resolve_backend("auto", CUDA, dtype) == "torch_varlen"


@pytest.mark.skipif(not HAS_TORCH_VARLEN, reason="torch without torch.nn.attention.varlen")
def test_a_flash_attn_that_does_not_import_is_not_picked_and_the_log_says_why(broken_flash_attn, caplog):
    with caplog.at_level(logging.WARNING, logger="fasttrain.attention"):
        assert resolve_backend("auto", CUDA, torch.bfloat16) == "torch_varlen"
    assert "undefined symbol" in caplog.text and "not flash_attn" in caplog.text


def test_asking_for_a_broken_flash_attn_names_the_import_error(broken_flash_attn):
    with pytest.raises(RuntimeError, match="installed but does not import.*undefined symbol"):
        resolve_backend("flash_attn", CUDA, torch.bfloat16)


def test_asking_for_a_missing_flash_attn_says_how_to_install_it(no_flash_attn):
    with pytest.raises(RuntimeError, match=r"not installed \(pip install 'fasttrain\[flash\]'\)"):
        resolve_backend("flash_attn", CUDA, torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_asking_for_a_flash_backend_in_fp32_names_the_compute_dtype(backend):
    with pytest.raises(RuntimeError, match="float16 or bfloat16.*model.compute_dtype=bfloat16"):
        resolve_backend(backend, CUDA, torch.float32)


@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_asking_for_a_flash_backend_on_the_cpu_names_the_device(backend):
    with pytest.raises(RuntimeError, match="needs a CUDA device.*cpu"):
        resolve_backend(backend, CPU, torch.bfloat16)


def test_reference_is_available_everywhere():
    assert resolve_backend("reference", CUDA, torch.float32) == "reference"
    assert resolve_backend("reference", CPU, torch.bfloat16) == "reference"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'flash3'"):
        resolve_backend("flash3", CPU, torch.float32)


def test_the_trainer_turns_a_backend_it_cannot_run_into_one_clear_error(tmp_path):
    """model.attention_backend=torch_varlen on a CPU run: exit 2, one error line, no traceback."""
    from cli_runner import DEMO, run_fasttrain

    result = run_fasttrain(["--config", str(DEMO / "demo.yaml"), f"train.output_dir={tmp_path / 'out'}",
                            f"data.cache_dir={tmp_path / 'cache'}", "model.attention_backend=torch_varlen"],
                           timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "fasttrain: error:" in line]
    assert len(errors) == 1 and "torch_varlen" in errors[0] and "CUDA" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("final*"))
