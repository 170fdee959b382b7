"""Splitting a solution into ``Step k:`` steps.

A solution is the full assistant text, prefill included: ``"Let's think step by step.\\nStep 1: ...
\\nStep 2: ... The answer is: 18"``. A step label is ``Step <number>:`` not glued to a preceding
letter/digit (so a missing newline before a label is tolerated, as in the public data). Labels are
taken in order of appearance; their numbers are not checked (a mis-numbered step is still a step).
Step ``k`` (1-based) is the text between label ``k`` and label ``k+1`` (or the end), right-stripped:
the last step keeps the final answer sentence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["STEP_LABEL_RE", "SplitSolution", "first_step", "split_steps"]

STEP_LABEL_RE = re.compile(r"(?<![A-Za-z0-9])Step[ \t]*\d+[ \t]*:")


@dataclass(frozen=True)
class SplitSolution:
    text: str
    labels: tuple[tuple[int, int], ...]  # (start, end) of each "Step k:" label

    @property
    def n_steps(self) -> int:
        return len(self.labels)

    def prefix_through_label(self, k: int) -> str:
        """Text up to and including the label of step ``k`` (``"...Step k:"``): steps < k are done."""
        self._check(k)
        return self.text[: self.labels[k - 1][1]]

    def step(self, k: int) -> str:
        """The body of step ``k`` (text after ``Step k:`` up to the next label), right-stripped."""
        self._check(k)
        end = self.labels[k][0] if k < self.n_steps else len(self.text)
        return self.text[self.labels[k - 1][1]: end].rstrip()

    def rest_from(self, k: int) -> str:
        """Everything after the label of step ``k`` (the whole continuation from step k)."""
        self._check(k)
        return self.text[self.labels[k - 1][1]:].rstrip()

    def _check(self, k):
        if not 1 <= k <= self.n_steps:
            raise IndexError(f"step {k} out of range 1..{self.n_steps}")


def split_steps(text: str) -> SplitSolution:
    return SplitSolution(text, tuple((m.start(), m.end()) for m in STEP_LABEL_RE.finditer(text)))


def first_step(continuation: str) -> str:
    """The first step of a continuation that starts right after a ``Step k:`` label."""
    m = STEP_LABEL_RE.search(continuation)
    return (continuation[: m.start()] if m else continuation).rstrip()
