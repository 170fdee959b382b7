"""The eval command (python -m fasttrain.eval) and the HF generation backend, on the demo model."""
import json
from pathlib import Path

import pytest

from fasttrain.errors import DataError, UserError
from fasttrain.eval.__main__ import main as eval_main
from fasttrain.eval.evaluate import DEFAULT_PREFILL, evaluate, load_problems
from fasttrain.eval.generate import Generator, HFGenerator, make_generator

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fasttrain" / "demo" / "model"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


PROBLEMS = [
    {"idx": "g0", "instruction": "Tom has 2 apples and buys 3 more. How many apples?", "answer": ["5"], "dataset": "gsm8k"},
    {"idx": "g1", "instruction": "A box holds 4 pens. How many pens in 3 boxes?", "answer": ["12"], "dataset": "gsm8k"},
    {"idx": "m0", "question": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "answer": "\\frac{3}{4}", "type": "math"},
    {"idx": "m1", "prompt": "What is $2^3$?", "answer": ["8", "8.0"], "type": "math"},
]


class FakeGen:
    def __init__(self, completions):
        self.completions, self.calls = completions, []

    def generate(self, prompts, max_new_tokens=512, temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append(dict(prompts=prompts, temperature=temperature, n=n, max_new_tokens=max_new_tokens))
        return [[self.completions[i]] * n for i in range(len(prompts))]


def test_accuracy_accounting_with_fake_generator(tmp_path):
    probs = load_problems(write_jsonl(tmp_path / "p.jsonl", PROBLEMS))
    assert [p.source for p in probs] == ["gsm8k", "gsm8k", "math", "math"]
    fake = FakeGen([
        " 2+3=5.\nStep 2: The answer is: 5",             # right ("The answer is")
        " 4*3=11\nStep 2: \\boxed{11}",                   # wrong
        " 1/2+1/4 = 0.75, so \\boxed{\\frac{3}{4}}",      # right (boxed)
        " I do not know",                                 # no answer at all
    ])
    out = tmp_path / "out"
    out.mkdir()
    s = evaluate(fake, probs, out, template="qwen2-boxed", max_new_tokens=7)
    assert isinstance(fake, Generator)
    call, = fake.calls
    assert call["temperature"] == 0.0 and call["n"] == 1 and call["max_new_tokens"] == 7
    assert all(p.endswith("<|im_start|>assistant\n" + DEFAULT_PREFILL) for p in call["prompts"])
    assert s["correct"] == 2 and s["total"] == 4 and s["accuracy"] == 0.5 and s["no_answer"] == 1
    assert s["per_source"] == {"gsm8k": {"correct": 1, "total": 2, "accuracy": 0.5},
                               "math": {"correct": 1, "total": 2, "accuracy": 0.5}}
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == ["g0", "g1", "m0", "m1"]
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert [r["extracted"] for r in rows] == ["5", "11", "\\frac{3}{4}", None]
    assert rows[3]["reference"] == ["8", "8.0"] and rows[2]["source"] == "math"
    assert json.loads((out / "summary.json").read_text())["accuracy"] == 0.5


def test_any_acceptable_answer_and_prefill_counts(tmp_path):
    probs = load_problems(write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "q", "answer": ["7", "seven"]},
        {"instruction": "q2", "answer": "3"}]))
    assert [p.idx for p in probs] == ["0", "1"] and probs[0].source == "p"
    out = tmp_path / "o"
    out.mkdir()
    # the answer may sit in the prefill (extraction runs on prefill + completion)
    s = evaluate(FakeGen(["The answer is: seven", ""]), probs, out, prefill="So x = 3.\n")
    assert s["correct"] == 2


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROBLEMS[0], {"idx": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'instruction'"):
        load_problems(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"instruction": "q", "answer": {"a": 1}}])
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: field 'answer'"):
        load_problems(bad)
    bad = write_jsonl(tmp_path / "bad3.jsonl", [PROBLEMS[0], "{not json"])
    with pytest.raises(DataError, match=r"bad3\.jsonl:2: not valid JSON"):
        load_problems(bad)
    assert len(load_problems(write_jsonl(tmp_path / "ok.jsonl", PROBLEMS), limit=3)) == 3


@pytest.fixture(scope="module")
def hf_gen():
    return HFGenerator(str(DEMO_MODEL), batch_size=2)


def test_hf_generator_batching_and_sampling(hf_gen):
    short, long_ = "<|im_start|>user\nWhat is 2+3?", "<|im_start|>user\nTom has many apples and more pens, how many?"
    alone = hf_gen.generate([short], max_new_tokens=8)
    # left padding + attention mask: a prompt's greedy text does not depend on its batch-mates
    both = hf_gen.generate([long_, short, short], max_new_tokens=8, n=2)
    assert both[1] == alone[0] * 2 and both[2] == alone[0] * 2 and len(both[0]) == 2
    s1 = hf_gen.generate([short, long_], max_new_tokens=8, temperature=0.8, top_p=0.95, n=3, seed=5)
    s2 = hf_gen.generate([short, long_], max_new_tokens=8, temperature=0.8, top_p=0.95, n=3, seed=5)
    assert s1 == s2 and [len(x) for x in s1] == [3, 3]
    assert hf_gen.stats.generated_tokens > 0 and hf_gen.stats.seconds > 0
    assert hf_gen.tokenizer.padding_side == "left" and hf_gen.tokenizer.pad_token is not None
    with pytest.raises(ValueError):
        hf_gen.generate([short], max_new_tokens=0)


def test_backend_choice():
    from fasttrain.eval.generate import vllm_available
    if vllm_available():
        pytest.skip("vllm installed")
    with pytest.raises(UserError, match="vllm package is not installed"):
        make_generator(str(DEMO_MODEL), backend="vllm")
    with pytest.raises(ValueError, match="unknown backend"):
        make_generator(str(DEMO_MODEL), backend="tgi")


def test_cli_end_to_end(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", PROBLEMS)
    out = tmp_path / "out"
    args = ["--model", str(DEMO_MODEL), "--data", str(data), "--out", str(out), "--max-new-tokens", "8",
            "--batch-size", "3", "--backend", "hf", "--no-progress"]
    assert eval_main(args) == 0
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {"idx", "prompt", "completion", "extracted", "reference", "correct", "source"}
        assert isinstance(r["correct"], bool) and isinstance(r["reference"], list)
        assert r["prompt"].endswith(DEFAULT_PREFILL)
    s = json.loads((out / "summary.json").read_text())
    assert s["total"] == 4 and set(s["per_source"]) == {"gsm8k", "math"}
    assert sum(v["total"] for v in s["per_source"].values()) == 4
    assert s["correct"] == sum(r["correct"] for r in rows) == sum(v["correct"] for v in s["per_source"].values())
    assert s["generated_tokens"] > 0 and s["generation_tokens_per_s"] > 0 and s["wall_seconds"] > 0
    assert s["backend"] == "hf" and s["template"] == "qwen2-boxed"
    assert "accuracy" in capsys.readouterr().out
    # an existing non-empty --out is never overwritten silently
    before = (out / "outputs.jsonl").read_text()
    assert eval_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "outputs.jsonl").read_text() == before
    # --limit and clear data errors
    assert eval_main(args[:4] + ["--out", str(tmp_path / "o2"), "--limit", "2", "--max-new-tokens", "4", "--no-progress",
                                 "--backend", "hf"]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["total"] == 2
    assert eval_main(["--model", str(DEMO_MODEL), "--data", str(tmp_path / "nope.jsonl"), "--out",
                      str(tmp_path / "o3")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_a_lora_adapter_directory_is_named_with_what_to_evaluate_instead(tmp_path, capsys):
    """LoRA runs export PEFT adapter directories (no config.json): the error says so and points at the merged
    export when there is one."""
    from fasttrain.eval.generate import check_model_dir

    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="a LoRA adapter directory .PEFT.*train.merge_lora=true"):
        check_model_dir(str(adapter))
    merged = tmp_path / "final_merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"evaluate {merged}, its merged export"):
        check_model_dir(str(adapter))
