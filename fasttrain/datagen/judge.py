"""Locating the first wrong step of a wrong solution.

:class:`StepJudge` is the protocol; :class:`RolloutJudge` (default) estimates, by sampling, how often
the model still reaches the right answer after each prefix of the solution;
:class:`OpenAICompatibleJudge` asks an external chat-completions model (optional, HTTP via urllib).

Rollout rule. Let ``K`` be the number of steps and ``r_j`` (``j = 0..K-1``) the fraction of ``R``
sampled continuations that reach a correct final answer when started after steps ``1..j`` (i.e. from
``"...Step j+1:"``; ``r_0`` starts from the bare prefill). ``r_K = 0`` by definition (the solution
itself is wrong). The first wrong step is the smallest ``k`` in ``1..K`` with ``r_{k-1} > threshold``
and ``r_k <= threshold``: the last prefix from which the model could still succeed is followed by a
step after which it cannot. If no ``r_j`` exceeds the threshold (no prefix ever succeeds) the
solution is unusable for localization and is dropped (``reason="no_success"``). With the default
``threshold = 0`` "cannot succeed" means none of the ``R`` rollouts succeeded.
All ``K`` prefixes are rolled out in one batched ``generate`` call; :meth:`RolloutJudge.locate_many`
rolls out the prefixes of several solutions (of several problems) in one call
(:class:`BatchStepJudge`), so the generator sees large batches.
"""
from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fasttrain.data.templates import render_prompt
from fasttrain.datagen.steps import SplitSolution
from fasttrain.eval.evaluate import Problem, grade

FINAL_ANSWER_RE = re.compile(r"\\boxed|\\fbox|answer\s+is|####", re.IGNORECASE)

__all__ = ["BatchStepJudge", "Localization", "OpenAICompatibleJudge", "RolloutJudge", "StepJudge",
           "first_wrong_step"]


@dataclass
class Localization:
    first_wrong_step: int | None
    success_rates: list[float] | None = None
    reason: str = "ok"  # ok | no_success | judge_no_error | judge_unparseable


@runtime_checkable
class StepJudge(Protocol):
    def locate(self, problem: Problem, solution: SplitSolution, seed: int) -> Localization:
        ...


@runtime_checkable
class BatchStepJudge(Protocol):
    """A judge that localizes many solutions at once, with one seed for the whole call."""

    def locate_many(self, items: list[tuple[Problem, SplitSolution]], seed: int) -> list[Localization]:
        ...


def first_wrong_step(rates: list[float], threshold: float = 0.0) -> int | None:
    """The rollout rule (module docstring) on ``rates = [r_0, ..., r_{K-1}]``; ``r_K = 0`` is implied."""
    full = list(rates) + [0.0]
    for k in range(1, len(full)):
        if full[k - 1] > threshold and full[k] <= threshold:
            return k
    return None


class RolloutJudge:
    def __init__(self, generator, template: str = "qwen2-boxed", rollouts: int = 4, threshold: float = 0.0,
                 max_new_tokens: int = 512, temperature: float = 0.8, top_p: float = 0.95, tokenizer=None,
                 require_final_answer: bool = True):
        if rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {rollouts}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.generator, self.template, self.rollouts, self.threshold = generator, template, rollouts, threshold
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.tokenizer = tokenizer
        self.require_final_answer = require_final_answer

    def success_rates(self, problem: Problem, solution: SplitSolution, seed: int) -> list[float]:
        return self.success_rates_many([(problem, solution)], seed)[0]

    def success_rates_many(self, items: list[tuple[Problem, SplitSolution]], seed: int) -> list[list[float]]:
        """``[r_0..r_{K-1}]`` for every (problem, solution): all their prefixes in one ``generate`` call."""
        jobs = [(i, sol.prefix_through_label(j + 1)) for i, (_, sol) in enumerate(items) for j in range(sol.n_steps)]
        if not jobs:
            return [[] for _ in items]
        prompts = [render_prompt(self.template, items[i][0].question, pre, tokenizer=self.tokenizer)
                   for i, pre in jobs]
        outs = self.generator.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                       top_p=self.top_p, n=self.rollouts, seed=seed)
        rates: list[list[float]] = [[] for _ in items]
        for (i, pre), cs in zip(jobs, outs):
            rates[i].append(sum(self._success(pre + c, items[i][0]) for c in cs) / len(cs))
        return rates

    def _success(self, text: str, problem: Problem) -> bool:
        # an explicit final answer is required (as in pipeline.solved): a truncated text never succeeds
        if self.require_final_answer and not FINAL_ANSWER_RE.search(text):
            return False
        return grade(text, problem.answers)[1]

    def locate(self, problem: Problem, solution: SplitSolution, seed: int) -> Localization:
        return self.locate_many([(problem, solution)], seed)[0]

    def locate_many(self, items: list[tuple[Problem, SplitSolution]], seed: int) -> list[Localization]:
        out = []
        for rates in self.success_rates_many(items, seed):
            k = first_wrong_step(rates, self.threshold)
            out.append(Localization(k, rates, "ok" if k is not None else "no_success"))
        return out


JUDGE_SYSTEM = ("You are a careful math teacher. You check a student's step-by-step solution and find the "
                "first step that contains an error.")


class OpenAICompatibleJudge:
    """A chat-completions endpoint (``POST {base_url}/chat/completions``) names the first wrong step.

    ``transport(url, body: bytes, headers: dict) -> dict`` does the HTTP call (default: urllib);
    pass a fake one in tests. Not exercised against any real server in CI.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 transport: Callable[[str, bytes, dict], dict] | None = None, temperature: float = 0.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s, self.temperature = model, api_key, timeout_s, temperature
        self.transport = transport or self._urllib_transport

    def build_messages(self, problem: Problem, solution: SplitSolution) -> list[dict]:
        steps = "\n".join(f"Step {k}: {solution.step(k).strip()}" for k in range(1, solution.n_steps + 1))
        user = (f"Problem:\n{problem.question}\n\nReference final answer: {problem.answers[0]}\n\n"
                f"Student solution ({solution.n_steps} steps):\n{steps}\n\n"
                "The student's final answer is wrong. Which step is the first one containing an error? "
                "Reply with a short justification, then a last line exactly of the form "
                "'First wrong step: N' (N between 1 and "
                f"{solution.n_steps}), or 'First wrong step: 0' if no step is wrong.")
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def build_request(self, problem: Problem, solution: SplitSolution, seed: int) -> tuple[str, bytes, dict]:
        body = {"model": self.model, "messages": self.build_messages(problem, solution),
                "temperature": self.temperature, "seed": int(seed)}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return self.url, json.dumps(body).encode("utf-8"), headers

    @staticmethod
    def parse_reply(text: str, n_steps: int) -> Localization:
        m = list(re.finditer(r"first\s+wrong\s+step\s*[:=]?\s*\**\s*(\d+)", text or "", re.IGNORECASE))
        if not m:
            return Localization(None, None, "judge_unparseable")
        k = int(m[-1].group(1))
        if k == 0:
            return Localization(None, None, "judge_no_error")
        if not 1 <= k <= n_steps:
            return Localization(None, None, "judge_unparseable")
        return Localization(k, None, "ok")

    def locate(self, problem: Problem, solution: SplitSolution, seed: int) -> Localization:
        url, body, headers = self.build_request(problem, solution, seed)
        resp = self.transport(url, body, headers)
        try:
            text = resp["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Localization(None, None, "judge_unparseable")
        return self.parse_reply(text, solution.n_steps)

    def _urllib_transport(self, url: str, body: bytes, headers: dict) -> dict:  # pragma: no cover - network
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            return json.loads(r.read().decode("utf-8"))
