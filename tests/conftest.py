"""Test settings: never reach the network; `gpu`-marked tests run only where CUDA is available."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # The Triton kernels run on the CPU only under the interpreter, and it must be on before anything imports
    # triton: triton 3.6 (the GPU image's) decorates triton.language's own jit helpers (tl.max, tl.sum, ...)
    # when triton is first imported, and an interpreted kernel calling a compiled helper fails ("Cannot call
    # @triton.jit'd outside of the scope of a kernel"). Runs started by tests drop it (tests/cli_runner.py).
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


try:  # property tests: the same examples on every run, so CI never fails on a newly drawn case
    from hypothesis import settings

    settings.register_profile("fasttrain", derandomize=True, print_blob=True)
    settings.load_profile("fasttrain")
except ImportError:
    pass
