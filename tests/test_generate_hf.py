"""HFGenerator decodes with exactly the arguments given and the prompt tokens training would use:
a checkpoint's generation_config.json (repetition penalty, top_k, ...) does not leak into greedy decoding,
and a prompt gets the tokenizer's BOS once (not a second one in front of a chat template that writes it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from fasttrain.data.tokenize import encode_prompts
from fasttrain.eval.generate import HFGenerator

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fasttrain" / "demo" / "model"
PROMPTS = ["Question: What is 3 + 4?\nAnswer: Let's think step by step.\nStep 1:",
           "Question: Tom has 5 apples and buys 7 more. How many now?\nAnswer: Let's think step by step.\nStep 1:"]


def _model_copy(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(DEMO_MODEL, out)
    return out


def test_checkpoint_generation_defaults_do_not_leak_into_greedy_decoding(tmp_path):
    plain = _model_copy(tmp_path, "plain")
    opinionated = _model_copy(tmp_path, "opinionated")
    # what Qwen2 instruct checkpoints ship, exaggerated so that any leak changes the greedy text
    (opinionated / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 2, "repetition_penalty": 3.0,
        "no_repeat_ngram_size": 2, "eos_token_id": 0}))
    outs = {}
    for name, path in (("plain", plain), ("opinionated", opinionated)):
        gen = HFGenerator(str(path), batch_size=2, device="cpu")
        outs[name] = gen.generate(PROMPTS, max_new_tokens=24, temperature=0.0)
    assert outs["plain"] == outs["opinionated"]
    assert any(text.strip() for texts in outs["plain"] for text in texts)  # it generated something


def test_prompt_tokens_are_trainings_with_one_bos(tmp_path):
    model_dir = _model_copy(tmp_path, "bos")
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL), bos_token="<|im_start|>")
    tok.save_pretrained(str(model_dir))
    gen = HFGenerator(str(model_dir), batch_size=4, device="cpu")
    seen = []
    real_generate = gen.model.generate

    def recording_generate(input_ids, attention_mask, **kw):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    gen.model.generate = recording_generate
    texts = [PROMPTS[0], "<|im_start|>user\n" + PROMPTS[1]]  # the second spells BOS itself, as a chat template
    gen.generate(texts, max_new_tokens=2)
    bos = gen.tokenizer.bos_token_id
    expected = encode_prompts(gen.tokenizer, texts)
    assert sorted(seen) == sorted(expected)
    for ids in seen:
        assert ids[0] == bos and ids[1] != bos, ids[:3]
