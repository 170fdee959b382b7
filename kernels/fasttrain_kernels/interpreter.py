"""Whether a ``triton.jit`` kernel was decorated for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
from __future__ import annotations


def is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)
