"""Evaluation helpers (math answer extraction and equivalence for GSM8K / MATH)."""
from fasttrain.eval.answers import extract_answer, is_equiv, normalize_answer

__all__ = ["extract_answer", "is_equiv", "normalize_answer"]
