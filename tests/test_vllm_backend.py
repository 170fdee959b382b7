"""The vLLM generation backend's plumbing, against a stand-in ``vllm`` module (the real one needs a GPU):
engine arguments, sampling parameters (greedy vs sampling, n, seed, ignore_eos), the per-prompt output
shape, token accounting, and the eval command end to end through it."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from fasttrain.eval.evaluate import evaluate, load_problems, prepare_out_dir
from fasttrain.eval.generate import VLLMGenerator, make_generator

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fasttrain" / "demo" / "model"


class _Out:
    def __init__(self, text: str):
        self.text, self.token_ids = text, list(range(len(text.split())))


class _Result:
    def __init__(self, prompt: dict, texts: list[str]):
        self.prompt_token_ids = list(prompt["prompt_token_ids"])  # vLLM's TokensPrompt
        self.outputs = [_Out(t) for t in texts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A module named vllm with LLM / SamplingParams that record what they were given."""
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    seen: dict = {"engines": [], "params": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            seen["params"].append(kw)

    class LLM:
        def __init__(self, **kw):
            seen["engines"].append(kw)

        def get_tokenizer(self):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(DEMO_MODEL))

        def generate(self, prompts, params):
            seen.setdefault("prompts", []).append(prompts)
            n = params.kw["n"]
            # "The answer is <k>" for prompt k, so grading has something to check
            return [_Result(p, [f"Step 1: so. The answer is {k + 2}."] * n) for k, p in enumerate(prompts)]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return seen


def test_engine_and_sampling_parameters(fake_vllm):
    gen = make_generator(str(DEMO_MODEL), backend="vllm", max_model_len=2048, ignore_eos=True)
    assert isinstance(gen, VLLMGenerator)
    assert fake_vllm["engines"] == [{"model": str(DEMO_MODEL), "dtype": "bfloat16", "tensor_parallel_size": 1,
                                     "gpu_memory_utilization": 0.9, "max_model_len": 2048}]
    greedy = gen.generate(["a b c", "d e"], max_new_tokens=7, temperature=0.0, top_p=0.5, n=3, seed=4)
    # greedy: one sample per prompt from the engine, repeated n times (it is deterministic)
    assert fake_vllm["params"][-1] == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "seed": 4,
                                       "ignore_eos": True}
    assert [len(r) for r in greedy] == [3, 3] and greedy[1][0].endswith("is 3.")
    sampled = gen.generate(["a b c"], max_new_tokens=5, temperature=0.8, top_p=0.95, n=4, seed=1)
    assert fake_vllm["params"][-1]["n"] == 4 and fake_vllm["params"][-1]["top_p"] == 0.95
    assert len(sampled) == 1 and len(sampled[0]) == 4
    # the engine gets token prompts built as training builds them (BOS once), not text it would re-tokenize
    from fasttrain.data.tokenize import encode_prompts

    ids_abc, ids_de = encode_prompts(gen.tokenizer, ["a b c", "d e"])
    assert fake_vllm["prompts"][0] == [{"prompt_token_ids": ids_abc}, {"prompt_token_ids": ids_de}]
    # tokens: 2 + 4 sequences of 7 words; prompt tokens counted per returned sequence
    assert gen.stats.sequences == 6 and gen.stats.generated_tokens == 6 * 7
    assert gen.stats.prompt_tokens == len(ids_abc) + len(ids_de) + 4 * len(ids_abc)
    assert gen.generate([], max_new_tokens=5) == []
    with pytest.raises(ValueError):
        gen.generate(["x"], max_new_tokens=0)


def test_eval_through_the_vllm_backend(fake_vllm, tmp_path):
    rows = [{"idx": f"q{k}", "instruction": f"What is {k} + 2?", "answer": [str(k + 2 if k != 2 else 99)],
             "dataset": "toy"} for k in range(4)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = make_generator(str(DEMO_MODEL), backend="vllm")
    summary = evaluate(gen, load_problems(path), prepare_out_dir(tmp_path / "out", overwrite=False), max_new_tokens=16)
    assert summary["accuracy"] == pytest.approx(0.75)  # every answer right except the one set to 99
    outputs = [json.loads(line) for line in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert [o["correct"] for o in outputs] == [True, True, False, True]
