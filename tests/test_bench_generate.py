"""benchmarks/bench_generate.py --smoke on the CPU, and the generator's fixed-length mode it relies on."""
import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import load_benchmark

from fasttrain.data.templates import render_prompt
from fasttrain.eval.evaluate import DEFAULT_PREFILL
from fasttrain.eval.generate import HFGenerator
from fasttrain.model.config import num_params

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "fasttrain" / "demo" / "model"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_generate")


def test_shape_constants_give_qwen2_1_5b(bench):
    # 1,543,714,304: the parameter count of Qwen2-1.5B (tied embeddings), also what transformers built
    # from this shape on the CPU (bf16, 2.9 GB of safetensors)
    assert num_params(bench.benchlib.model_config("qwen2-1.5b")) == 1_543_714_304


def test_smoke_run(bench, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    meta, rows = res["meta"], res["rows"]
    assert meta["params"] == num_params(bench.benchlib.model_config("tiny"))
    assert meta["dtype"] == "float32" and meta["max_new_tokens"] == 8 and "EOS ignored" in meta["decoding"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["new_tokens"] == 8 and r["peak_mem_gib"] is None  # no CUDA peak memory on the CPU
        # GSM8K prompts with the eval template and the demo tokenizer: ~80-270 tokens
        assert 50 < r["prompt_tokens_mean"] <= r["padded_width"] < 400
        for k in ("prefill_s", "prompt_tok_s", "batch_s", "gen_tok_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        # full minus prefill: positive, or nan when CPU timing noise hides 7 decoding steps (busy CI machine)
        for k in ("decode_tok_s", "ms_per_step"):
            assert math.isnan(r[k]) or r[k] > 0, (k, r)
        assert r["gen_tok_s"] == pytest.approx(r["batch"] * r["new_tokens"] / r["batch_s"])
    printed = capsys.readouterr().out
    assert "gen tok/s" in printed and "decode tok/s" in printed and len(printed.strip().splitlines()) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_full_run_needs_cuda(bench, capsys):
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_batch_sizes(bench, capsys):
    assert bench.main(["--smoke", "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_ignore_eos_forces_the_full_length():
    prompt = render_prompt("qwen2-boxed", "Tom has 2 apples and buys 3 more. How many?", DEFAULT_PREFILL)
    plain, fixed = HFGenerator(str(DEMO_MODEL), batch_size=2), HFGenerator(str(DEMO_MODEL), ignore_eos=True)
    ids = plain.tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        first = int(plain.model(torch.tensor([ids])).logits[0, -1].argmax())
    # make the greedy first token a stop token: the normal generator stops right there ...
    plain.stop_ids = fixed.stop_ids = [first]
    plain.generate([prompt], max_new_tokens=6)
    assert plain.stats.generated_tokens == 1
    # ... the fixed-length one masks it and always generates max_new_tokens
    fixed.generate([prompt, prompt + " 2"], max_new_tokens=6)
    assert fixed.stats.generated_tokens == 12 and fixed.stats.prompt_tokens == len(ids) + len(plain.tokenizer(prompt + " 2")["input_ids"])
