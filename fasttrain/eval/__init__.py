"""Evaluation helpers (math answer extraction and equivalence for GSM8K / MATH), generation backends
and the eval command (``python -m fasttrain.eval``)."""
from fasttrain.eval.answers import extract_answer, is_equiv, normalize_answer
from fasttrain.eval.evaluate import (
    DEFAULT_PREFILL,
    Problem,
    evaluate,
    grade,
    load_problems,
)
from fasttrain.eval.generate import (
    Generator,
    HFGenerator,
    VLLMGenerator,
    make_generator,
)

__all__ = [
    "DEFAULT_PREFILL",
    "Generator",
    "HFGenerator",
    "Problem",
    "VLLMGenerator",
    "evaluate",
    "extract_answer",
    "grade",
    "is_equiv",
    "load_problems",
    "make_generator",
    "normalize_answer",
]
