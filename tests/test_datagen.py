"""Step-DPO data generation: stage logic with a scripted fake generator, plus one tiny real run."""
import json
from pathlib import Path

import pytest

from fasttrain.datagen import (
    DatagenConfig,
    OpenAICompatibleJudge,
    collect_errors,
    first_step,
    first_wrong_step,
    process_problem,
    run_datagen,
    split_steps,
)
from fasttrain.datagen.__main__ import main as datagen_main
from fasttrain.eval.evaluate import DEFAULT_PREFILL, Problem

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fasttrain" / "demo" / "model"
ASSISTANT = "<|im_start|>assistant\n"

WRONG_A = " a=2\nStep 2: b=3 (wrong)\nStep 3: The answer is: 7"
WRONG_B = " a=2\nStep 2: b=3 (wrong)\nStep 3: The answer is: 8"
RIGHT = " a=2\nStep 2: b=5\nStep 3: The answer is: \\boxed{10}"

# assistant text so far -> completions, cycled to fill n
SCRIPT = {
    DEFAULT_PREFILL: [WRONG_A, RIGHT, WRONG_A, WRONG_B],
    DEFAULT_PREFILL + " a=2\nStep 2:": [" b=5\nStep 3: The answer is: \\boxed{10}", " b=3 (wrong)\nStep 3: The answer is: 7"],
    DEFAULT_PREFILL + " a=2\nStep 2: b=3 (wrong)\nStep 3:": [" The answer is: 7"],
}


class FakeGen:
    """Implements the Generator protocol from a script keyed by the assistant prefix."""

    def __init__(self, script=SCRIPT, fail_on=None):
        self.script, self.fail_on, self.calls = script, fail_on, []

    def generate(self, prompts, max_new_tokens=512, temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append((list(prompts), n, seed, temperature, top_p))
        out = []
        for p in prompts:
            if self.fail_on and self.fail_on in p:
                raise KeyboardInterrupt("simulated interruption")
            opts = self.options(p)
            out.append([opts[i % len(opts)] for i in range(n)])
        return out

    def options(self, prompt: str) -> list[str]:
        """The scripted completions for this prompt (cycled over the n samples)."""
        return self.script.get(prompt.split(ASSISTANT, 1)[1], [" nothing useful"])


def prob(idx="p1", q="Q1", ans=("10",)):
    return Problem(idx=idx, question=q, answers=list(ans), source="toy")


def cfg(**kw):
    base = dict(samples=4, rollouts=4, rectify=4, source_model="fake-model")
    base.update(kw)
    return DatagenConfig(**base)


def test_split_steps():
    s = split_steps(DEFAULT_PREFILL + WRONG_A)
    assert s.n_steps == 3
    assert s.step(1) == " a=2" and s.step(2) == " b=3 (wrong)" and s.step(3) == " The answer is: 7"
    assert s.prefix_through_label(1) == DEFAULT_PREFILL
    assert s.prefix_through_label(2) == DEFAULT_PREFILL + " a=2\nStep 2:"
    assert s.rest_from(2) == " b=3 (wrong)\nStep 3: The answer is: 7"
    # a missing newline before a label and mis-numbering are tolerated; "Steps" is no label
    t = split_steps("Let's think step by step.\nStep 1: x.Step 3: y Steps 4: z")
    assert t.n_steps == 2 and t.step(1) == " x." and t.step(2) == " y Steps 4: z"
    assert first_step(" b=5\nStep 3: done") == " b=5"
    assert first_step(" only one") == " only one"


@pytest.mark.parametrize("rates,thr,expect", [
    ([1.0, 0.5, 0.0], 0.0, 2),
    ([0.0, 0.0, 0.0], 0.0, None),       # no prefix ever succeeds -> dropped
    ([0.0, 0.5, 0.0], 0.0, 2),          # first rise, then the drop
    ([0.5, 0.5], 0.0, 2),               # the last step is the wrong one (r_K = 0 implied)
    ([0.5, 0.25, 0.0], 0.25, 1),        # threshold is inclusive
    ([0.5, 0.0, 0.5, 0.0], 0.0, 1),     # the FIRST drop counts
    ([], 0.0, None),
])
def test_first_wrong_step_rule(rates, thr, expect):
    assert first_wrong_step(rates, thr) == expect


def test_collect_errors_keeps_distinct_wrong_solutions():
    g = FakeGen()
    wrong, n_ok, n_unfinished = collect_errors(g, prob(), cfg())
    assert n_ok == 1 and n_unfinished == 0
    assert [w.sample_id for w in wrong] == [0, 3]  # sample 2 duplicates sample 0
    assert wrong[0].text == DEFAULT_PREFILL + WRONG_A and wrong[0].extracted == "7"
    (prompts, n, _seed, temp, top_p), = g.calls
    assert n == 4 and temp == 0.8 and top_p == 0.95 and prompts[0].endswith(ASSISTANT + DEFAULT_PREFILL)


def test_localize_rectify_and_dedup():
    g = FakeGen()
    recs, st = process_problem(g, _rollout_judge(g), prob(), cfg())
    assert st["wrong"] == 2 and st["localized"] == 2 and st["dropped_no_success"] == 0
    # both wrong solutions share steps 1-2 and both rectifications give " b=5": one record after dedup
    assert len(recs) == 1
    r = recs[0]
    assert r["prompt"] == "Q1"
    assert r["initial_reason_steps"] == DEFAULT_PREFILL + " a=2\nStep 2:"
    assert r["chosen"] == " b=5" and r["rejected"] == " b=3 (wrong)"
    assert r["full_chosen"] == " b=5\nStep 3: The answer is: \\boxed{10}"
    assert r["full_rejected"] == " b=3 (wrong)\nStep 3: The answer is: 7"
    assert r["first_wrong_step"] == 2 and r["rollout_success_rates"] == [0.25, 0.5, 0.0]
    assert r["answer"] == "10" and r["dataset"] == "toy" and r["source_model"] == "fake-model"
    assert r["sample_id"] == 0 and r["seed"] == 0


def test_unlocalizable_solution_is_dropped_and_counted():
    script = {DEFAULT_PREFILL: [WRONG_A]}  # nothing ever succeeds
    recs, st = process_problem(FakeGen(script), _rollout_judge(FakeGen(script)), prob(), cfg())
    assert recs == [] and st["wrong"] == 1 and st["dropped_no_success"] == 1 and st["localized"] == 0


def test_truncated_solutions_are_neither_errors_nor_successes():
    cut = " a=2\nStep 2: b=3 and then 1"  # hit max_new_tokens: no explicit final answer
    script = dict(SCRIPT)
    script[DEFAULT_PREFILL] = [WRONG_A, cut, RIGHT]
    # " b=5 so 10": the right last number, but no explicit final answer
    script[DEFAULT_PREFILL + " a=2\nStep 2:"] = [" b=5 so 10", " b=3 (wrong)\nStep 3: The answer is: 7"]
    g = FakeGen(script)
    wrong, n_ok, n_unfinished = collect_errors(g, prob(), cfg(samples=3))
    assert [w.sample_id for w in wrong] == [0] and n_ok == 1 and n_unfinished == 1
    rates = _rollout_judge(g).success_rates(prob(), split_steps(DEFAULT_PREFILL + WRONG_A), seed=0)
    assert rates == [0.25, 0.0, 0.0]  # after step 1, the "lucky" unfinished text is no success
    from fasttrain.datagen import RolloutJudge
    loose_judge = RolloutJudge(g, rollouts=4, require_final_answer=False)
    assert loose_judge.success_rates(prob(), split_steps(DEFAULT_PREFILL + WRONG_A), seed=0)[1] == 0.5
    loose = collect_errors(FakeGen(script), prob(), cfg(samples=3, require_final_answer=False))
    assert [w.sample_id for w in loose[0]] == [0, 1] and loose[2] == 0


def test_seeds_are_per_problem_and_deterministic():
    g1, g2 = FakeGen(), FakeGen()
    process_problem(g1, _rollout_judge(g1), prob("p1"), cfg())
    process_problem(g2, _rollout_judge(g2), prob("p1"), cfg())
    assert [c[2] for c in g1.calls] == [c[2] for c in g2.calls]
    g3 = FakeGen()
    process_problem(g3, _rollout_judge(g3), prob("p2"), cfg())
    assert g3.calls[0][2] != g1.calls[0][2]
    g4 = FakeGen()
    process_problem(g4, _rollout_judge(g4), prob("p1"), cfg(seed=1))
    assert g4.calls[0][2] != g1.calls[0][2]


def _rollout_judge(g, c=None):
    from fasttrain.datagen import RolloutJudge
    c = c or cfg()
    return RolloutJudge(g, c.template, c.rollouts, c.threshold, c.max_new_tokens, c.temperature, c.top_p)


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


PROBLEMS = [prob("p1", "Q1"), prob("p2", "Q2"), prob("p3", "Q3")]


def test_run_and_resume_after_interrupt(tmp_path):
    clean = tmp_path / "clean"
    s = run_datagen(FakeGen(), PROBLEMS, clean, cfg())
    assert s["problems_done"] == 3 and s["records"] == 3
    clean_recs = _lines(clean / "records.jsonl")
    from fasttrain.data.records import (
        load_records,  # the trainer reads what datagen writes, both modes
    )
    for mode in ("step", "full"):
        assert len(load_records(clean / "records.jsonl", mode=mode).records) == 3
    assert {r["problem_idx"] for r in clean_recs} == {"p1", "p2", "p3"}

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_datagen(FakeGen(fail_on="Q2"), PROBLEMS, out, cfg())
    assert [r["problem_idx"] for r in _lines(out / "progress.jsonl")] == ["p1"]
    assert len(_lines(out / "records.jsonl")) == 1
    g = FakeGen()
    s = run_datagen(g, PROBLEMS, out, cfg())
    assert s["problems_this_run"] == 2 and s["problems_done"] == 3
    assert not any("Q1" in p for c in g.calls for p in c[0])  # finished problem skipped
    assert _lines(out / "records.jsonl") == clean_recs  # same records, same order, no duplicates

    # crash after the records were written but before the progress line; plus a torn last line
    prog = (out / "progress.jsonl").read_text().splitlines(keepends=True)
    (out / "progress.jsonl").write_text("".join(prog[:-1]))
    with open(out / "records.jsonl", "a") as f:
        f.write('{"prompt": "torn')
    s = run_datagen(FakeGen(), PROBLEMS, out, cfg())
    assert s["problems_this_run"] == 1 and s["problems_done"] == 3
    assert _lines(out / "records.jsonl") == clean_recs
    assert _lines(out / "progress.jsonl")[-1]["duplicates_skipped"] == 1


def test_resume_with_other_settings_is_refused(tmp_path):
    run_datagen(FakeGen(), PROBLEMS[:1], tmp_path, cfg())
    with pytest.raises(ValueError, match="samples"):
        run_datagen(FakeGen(), PROBLEMS[:1], tmp_path, cfg(samples=5))


def _fake_transport(reply, seen):
    def t(url, body, headers):
        seen.append((url, json.loads(body), headers))
        return {"choices": [{"message": {"role": "assistant", "content": reply}}]}
    return t


def test_openai_judge_request_and_parsing():
    seen = []
    j = OpenAICompatibleJudge("http://judge.invalid/v1/", "judge-model", api_key="k",
                              transport=_fake_transport("Step 2 multiplies wrongly.\nFirst wrong step: 2", seen))
    sol = split_steps(DEFAULT_PREFILL + WRONG_A)
    loc = j.locate(prob(), sol, seed=7)
    assert loc.first_wrong_step == 2 and loc.reason == "ok"
    url, body, headers = seen[0]
    assert url == "http://judge.invalid/v1/chat/completions"
    assert body["model"] == "judge-model" and body["seed"] == 7 and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "Q1" in user and "Step 2: b=3 (wrong)" in user and "Reference final answer: 10" in user
    assert headers["Authorization"] == "Bearer k"
    P = OpenAICompatibleJudge.parse_reply
    assert P("**First wrong step:** 3", 3).first_wrong_step == 3
    assert P("First wrong step: 0", 3).reason == "judge_no_error"
    assert P("First wrong step: 9", 3).reason == "judge_unparseable"
    assert P("I think it's fine", 3).reason == "judge_unparseable"
    # plugged into the pipeline: no rollouts, records carry rollout_success_rates None
    g = FakeGen()
    recs, _ = process_problem(g, j, prob(), cfg())
    assert len(recs) == 1 and recs[0]["rollout_success_rates"] is None and recs[0]["chosen"] == " b=5"


def test_cli_end_to_end_on_demo_model(tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"idx": "a", "instruction": "Tom has 2 apples and buys 3 more. How many?",
                                "answer": ["5"]}) + "\n"
                    + json.dumps({"idx": "b", "question": "What is 4 times 2?", "answer": "8",
                                  "dataset": "toy"}) + "\n")
    out = tmp_path / "out"
    args = ["--model", str(DEMO_MODEL), "--data", str(data), "--out", str(out), "--samples", "2",
            "--rollouts", "1", "--rectify", "2", "--max-new-tokens", "12", "--max-wrong-per-problem", "1",
            "--backend", "hf", "--no-progress"]
    assert datagen_main(args) == 0
    for name in ("records.jsonl", "progress.jsonl", "config.json", "summary.json"):
        assert (out / name).is_file()
    assert [r["problem_idx"] for r in _lines(out / "progress.jsonl")] == ["a", "b"]
    for r in _lines(out / "records.jsonl"):
        assert r["initial_reason_steps"].startswith(DEFAULT_PREFILL) and r["chosen"] and r["rejected"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems_done"] == 2 and summary["samples"] == 4
    # rerun: nothing left to do, nothing duplicated
    n = len(_lines(out / "records.jsonl"))
    assert datagen_main(args) == 0
    assert len(_lines(out / "records.jsonl")) == n
    other = list(args)
    other[other.index("--samples") + 1] = "3"
    assert datagen_main(other) == 2  # resuming with other settings is refused
