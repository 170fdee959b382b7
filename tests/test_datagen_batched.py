"""Datagen sampling batched across problems (problems_per_call): same records as one problem at a time,
one generate call per stage, resumable by chunk. Uses the scripted fake generator of test_datagen."""
import json

import pytest
from test_datagen import (
    PROBLEMS,
    SCRIPT,
    FakeGen,
    _fake_transport,
    _lines,
    _rollout_judge,
    cfg,
    prob,
)

from fasttrain.datagen import (
    OpenAICompatibleJudge,
    process_problem,
    process_problems,
    run_datagen,
)
from fasttrain.datagen.__main__ import main as datagen_main
from fasttrain.datagen.pipeline import call_seed, problem_seed
from fasttrain.eval.evaluate import DEFAULT_PREFILL

# a second problem family (its own prefixes and answer) from which no rollout ever succeeds
OTHER_WRONG = " x=4\nStep 2: The answer is: \\boxed{5}"
OTHER = {
    DEFAULT_PREFILL: [OTHER_WRONG],
    DEFAULT_PREFILL + " x=4\nStep 2:": [" The answer is: \\boxed{5}"],
}


class TwoScriptGen(FakeGen):
    """Problems whose question starts with 'O' follow OTHER (where nothing ever succeeds), the rest SCRIPT."""

    def options(self, prompt: str) -> list[str]:
        question, prefix = prompt.split("user\n", 1)[1], prompt.split("<|im_start|>assistant\n", 1)[1]
        return (OTHER if question.startswith("O") else SCRIPT).get(prefix, [" nothing useful"])


def _drop_seeds(recs):
    return [{k: v for k, v in r.items() if not k.endswith("_seed")} for r in recs]


def test_chunk_equals_one_problem_at_a_time_with_three_calls():
    probs = [prob("p1", "Q1"), prob("o1", "O1", ("9",)), prob("p2", "Q2")]
    g = TwoScriptGen()
    chunk = process_problems(g, _rollout_judge(g), probs, cfg())
    assert len(g.calls) == 3  # collect, locate, rectify: one call each for the whole chunk
    collect_prompts, locate_prompts = g.calls[0][0], g.calls[1][0]
    assert len(collect_prompts) == 3 and g.calls[0][1] == 4
    assert sum("Q1" in p for p in locate_prompts) == 6 and sum("O1" in p for p in locate_prompts) == 2
    for p, (recs, st) in zip(probs, chunk):
        g1 = TwoScriptGen()
        alone_recs, alone_st = process_problem(g1, _rollout_judge(g1), p, cfg())
        assert st == alone_st
        assert _drop_seeds(recs) == _drop_seeds(alone_recs)
    assert chunk[1][0] == [] and chunk[1][1]["dropped_no_success"] == 1  # o1: no prefix ever succeeds
    recs = chunk[0][0]
    assert recs[0]["rectify_seed"] == call_seed(0, "rectify", [("p1", 0), ("p1", 3), ("p2", 0), ("p2", 3)])


def test_call_seed_of_one_item_is_the_problem_seed():
    assert call_seed(3, "locate", [("p1", 2)]) == problem_seed(3, "p1", "locate", 2)
    assert call_seed(3, "locate", [("p1", 2), ("p2", 0)]) != call_seed(3, "locate", [("p2", 0), ("p1", 2)])


def test_per_item_judge_in_a_chunk_keeps_per_problem_seeds():
    seen = []
    judge = OpenAICompatibleJudge("http://judge.invalid/v1", "m", transport=_fake_transport("First wrong step: 2", seen))
    g = FakeGen()
    chunk = process_problems(g, judge, [prob("p1", "Q1"), prob("p2", "Q2")], cfg())
    assert [b["seed"] for _, b, _ in seen] == [problem_seed(0, i, "locate", s) for i in ("p1", "p2") for s in (0, 3)]
    assert len(g.calls) == 2 and all(len(r) == 1 for r, _ in chunk)


def test_run_in_chunks_matches_and_resumes_by_chunk(tmp_path):
    one = tmp_path / "one"
    run_datagen(FakeGen(), PROBLEMS, one, cfg())
    ref = _drop_seeds(_lines(one / "records.jsonl"))

    out = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):
        run_datagen(FakeGen(fail_on="Q3"), PROBLEMS, out, cfg(problems_per_call=2))
    # the first chunk (p1, p2) was written whole, the second not at all
    assert [r["problem_idx"] for r in _lines(out / "progress.jsonl")] == ["p1", "p2"]
    g = FakeGen()
    s = run_datagen(g, PROBLEMS, out, cfg(problems_per_call=2))
    assert s["problems_this_run"] == 1 and s["problems_done"] == 3 and len(g.calls) == 3
    assert _drop_seeds(_lines(out / "records.jsonl")) == ref
    assert json.loads((out / "config.json").read_text())["problems_per_call"] == 2


def test_problems_per_call_must_be_positive(tmp_path, capsys):
    with pytest.raises(ValueError, match="problems_per_call"):
        cfg(problems_per_call=0)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"instruction": "q", "answer": "1"}) + "\n")
    assert datagen_main(["--model", "unused", "--data", str(data), "--out", str(tmp_path / "o"),
                         "--problems-per-call", "0"]) == 2
    assert "(--problems-per-call) must be >= 1" in capsys.readouterr().err
