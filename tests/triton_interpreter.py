"""Whether this machine's Triton interpreter can run the kernels at all (CPU test runs only).

triton 3.6's interpreter turns a loop bound into a Python int with ``int(array)``, which numpy >= 2.4 refuses
for 1-element arrays ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
``for ... in range(0, N, BLOCK)`` loop fails there (seen with triton 3.6.0 + numpy 2.4.6; triton 3.9 is fine).
The kernel tests skip with that reason instead of failing 40 times with an interpreter traceback.
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> str | None:
    """None when the interpreter runs a loop with a runtime bound; otherwise why it cannot."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None  # compiled kernels (GPU): nothing to probe
    import numpy as np
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(x_ptr, n):
        for i in range(0, n, 1):
            tl.store(x_ptr + i, i)

    x = torch.zeros(2)
    try:
        _loop_probe[(1,)](x, 2)
    except Exception as e:  # noqa: BLE001 - any failure means the kernels cannot run here
        return (f"the Triton interpreter (triton {triton.__version__}, numpy {np.__version__}) cannot run a loop "
                f"with a runtime bound ({e!r}); with triton 3.6 install numpy<2.4, or use triton>=3.9")
    if x.tolist() != [0.0, 1.0]:
        return f"the Triton interpreter (triton {triton.__version__}) computed {x.tolist()} for [0, 1]"
    return None
