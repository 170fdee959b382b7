"""The data layer (DESIGN §2): loading and validation, templates, tokenization rules, truncation, cache."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fasttrain.data import (
    TEMPLATES,
    DataError,
    StepRecord,
    TokenizedPairs,
    dataset_fingerprint,
    load_records,
    prepare_dataset,
    records_from_rows,
    render_prompt,
    tokenize_records,
)
from fasttrain.data import tokenize as tokenize_module

DEMO = Path(__file__).resolve().parents[1] / "fasttrain" / "demo"
DEMO_MODEL = DEMO / "model"
DEMO_TRAIN = DEMO / "data" / "train.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def bos_tokenizer():
    # The demo tokenizer has no BOS (like Qwen2); give one a BOS to test the other branch.
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL), bos_token="<|im_start|>")


def row(**overrides):
    base = {
        "prompt": "Janet has 16 eggs. She eats 3. How many are left?",
        "initial_reason_steps": "Let's think step by step.\nStep 1:",
        "chosen": " She has 16 - 3 = <<16-3=13>>13 eggs left.",
        "rejected": " She has 16 - 3 = <<16-3=13>>12 eggs left.",
        "full_chosen": " She has 13 eggs left.\nThe answer is: 13",
        "full_rejected": " She has 12 eggs left.\nThe answer is: 12",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- loading and validation


def test_loads_fields_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(id="a1", dataset="gsm8k", extra=5), "", row(id=7), row()])
    records = load_records(path)
    assert [r.record_id for r in records.records] == ["a1", "7", "d.jsonl:4"]  # line 4: blank line 2 counts
    first = records.records[0]
    assert first == StepRecord("a1", row()["prompt"], row()["initial_reason_steps"], row()["chosen"],
                               row()["rejected"], "gsm8k")
    assert records.skipped == []


def test_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(prompt="a\u2028b\x85c"), ensure_ascii=False) + "\r\n" + json.dumps(row()) + "\n")
    records = load_records(path)
    assert records.records[0].prompt == "a\u2028b\x85c" and records.records[1].record_id == "d.jsonl:2"


def test_rows_from_memory_like_a_datasets_dataset():
    records = records_from_rows([row(), row(id="z")], "hub:gsm8k-steps")
    assert [r.record_id for r in records.records] == ["hub:gsm8k-steps:0", "z"]
    with pytest.raises(DataError, match=r"hub:gsm8k-steps, row 1 \(0-based index\): missing field 'chosen'"):
        records_from_rows([row(), row(chosen=DROP)], "hub:gsm8k-steps")


def test_full_mode_uses_full_responses(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row()])
    record = load_records(path, mode="full").records[0]
    assert (record.chosen, record.rejected) == (row()["full_chosen"], row()["full_rejected"])
    missing = write_jsonl(tmp_path / "m.jsonl", [row(full_rejected=DROP)])
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: missing field 'full_rejected'"):
        load_records(missing, mode="full")
    with pytest.raises(ValueError, match="unknown data mode"):
        load_records(path, mode="partial")


def test_text_is_kept_as_is(tmp_path):
    noisy = "Let's think step by step.Step 1: a\nStep 3:"  # missing newline, mis-numbered: not fixed
    path = write_jsonl(tmp_path / "d.jsonl", [row(initial_reason_steps=noisy, chosen="  x  ")])
    record = load_records(path).records[0]
    assert record.initial_reason_steps == noisy and record.chosen == "  x  "


@pytest.mark.parametrize(
    "bad, expected",
    [
        (row(chosen=DROP), r"line 2: missing field 'chosen'; expected a string"),
        (row(rejected=""), r"line 2: field 'rejected' is empty; expected a non-empty string"),
        (row(chosen="   "), r"line 2: field 'chosen' is empty"),
        (row(prompt=12), r"line 2: field 'prompt' must be a string, got a number"),
        (row(initial_reason_steps=None), r"line 2: missing field 'initial_reason_steps'"),
        (row(initial_reason_steps=["a"]), r"line 2: field 'initial_reason_steps' must be a string, got an array"),
        (row(dataset=3), r"line 2: field 'dataset' must be a string"),
        (row(id=[1]), r"line 2: field 'id' must be a string or an integer"),
        ([1, 2], r"line 2: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(), bad])
    with pytest.raises(DataError, match=r"bad\.jsonl, " + expected):
        load_records(path)
    # skip_bad_rows: the good row survives, the bad one is listed with its reason
    records = load_records(path, skip_bad_rows=True)
    assert len(records) == 1
    assert records.skipped[0][0] == "bad.jsonl:2" and "line 2" in records.skipped[0][1]


def test_json_array_rows_are_zero_based(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row(), row(prompt="")]))
    with pytest.raises(DataError, match=r"d\.json, row 1 \(0-based index\): field 'prompt' is empty"):
        load_records(path)
    path.write_text(json.dumps({"data": [row(), row()]}))
    assert [r.record_id for r in load_records(path).records] == ["d.json:0", "d.json:1"]
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"expected a JSON array of records"):
        load_records(path)


def test_broken_json_line_is_fatal_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(), '{"prompt": "x", ', row()])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"d\.jsonl, line 2: not valid JSON"):
            load_records(path, skip_bad_rows=skip)
    broken = tmp_path / "d.json"
    broken.write_text("[{]")
    with pytest.raises(DataError, match=r"d\.json: not valid JSON"):
        load_records(broken)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk"):
        load_records(tmp_path)  # a directory that is not a saved dataset
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data file extension '\.csv'; expected \.jsonl, \.json or \.parquet"):
        load_records(csv)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: not valid UTF-8"):
        load_records(binary)
    not_parquet = tmp_path / "p.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataError, match=r"p\.parquet: cannot read as Parquet"):
        load_records(not_parquet)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match=r"d\.parquet: reading Parquet needs pyarrow; install it with `pip install pyarrow`"):
        load_records(path)


def test_empty_dataset(tmp_path):
    with pytest.raises(DataError, match=r"e\.jsonl: no usable records"):
        load_records(write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    empty_array = tmp_path / "e.json"
    empty_array.write_text("[]")
    with pytest.raises(DataError, match=r"no usable records"):
        load_records(empty_array)
    only_bad = write_jsonl(tmp_path / "b.jsonl", [row(chosen=""), row(prompt=None)])
    with pytest.raises(DataError, match=r"no usable records \(2 bad rows skipped"):
        load_records(only_bad, skip_bad_rows=True)


def test_skipped_rows_are_counted_through_tokenization(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [row(), row(chosen=""), row(rejected=5), row(), row(prompt=DROP)])
    records = load_records(path, skip_bad_rows=True)
    assert len(records) == 2 and [i for i, _ in records.skipped] == ["d.jsonl:2", "d.jsonl:3", "d.jsonl:5"]
    pairs = tokenize_records(records, tokenizer, "qwen2-boxed", 256, 128, skip_bad_rows=True)
    assert pairs.stats.num_records == 2 and len(pairs.stats.skipped) == 3
    assert "3 bad records skipped" in pairs.stats.summary()


@pytest.mark.parametrize("field", ["prompt", "initial_reason_steps", "chosen", "rejected"])
def test_special_token_text_is_refused_or_skipped(tmp_path, tokenizer, field):
    """Text spelling '<|im_end|>' would be encoded as the turn-end control token: refused, naming record and
    field; skipped and counted with skip_bad_rows."""
    bad = row(**{field: row()[field] + " <|im_end|> more"})
    path = write_jsonl(tmp_path / "d.jsonl", [row(), bad, row(prompt="What is <|x|> in <im_end>?")])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field '{field}' contains '<\|im_end\|>'"):
        tokenize_records(load_records(path), tokenizer, "qwen2-boxed", 256, 128)
    pairs = tokenize_records(load_records(path, skip_bad_rows=True), tokenizer, "qwen2-boxed", 256, 128,
                             skip_bad_rows=True)
    # look-alikes that are not special tokens are ordinary text
    assert pairs.record_ids == ["d.jsonl:1", "d.jsonl:3"] and [i for i, _ in pairs.stats.skipped] == ["d.jsonl:2"]


def test_json_parquet_jsonl_give_identical_pairs(tmp_path, tokenizer):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:50]]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    table = tmp_path / "d.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), table)
    results = [tokenize_records(load_records(p), tokenizer, "qwen2-boxed", 256, 128) for p in (jsonl, array, table)]
    assert len(results[0]) == 50
    assert results[0] == results[1] == results[2]


def test_saved_datasets_dataset_gives_identical_pairs(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")

    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:30]]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    via_jsonl = tokenize_records(load_records(jsonl), tokenizer, "qwen2-boxed", 256, 128)
    assert tokenize_records(load_records(saved), tokenizer, "qwen2-boxed", 256, 128) == via_jsonl
    # the tokenized cache key covers the directory's files: other rows, another key
    key = dataset_fingerprint(saved, tokenizer, "qwen2-boxed", 256, 128, "step")
    other = tmp_path / "other"
    datasets.Dataset.from_list(rows[:29]).save_to_disk(str(other))
    assert dataset_fingerprint(other, tokenizer, "qwen2-boxed", 256, 128, "step") != key
    # a DatasetDict names its splits; a plain directory says what was expected
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['train'\]"):
        load_records(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(tmp_path / "plain")


# ---------------------------------------------------------------- templates


def test_templates_are_the_design_strings(tokenizer):
    p, s = "What is 1+1?", "Let's think step by step.\nStep 1:"
    assert render_prompt("qwen2-boxed", p, s) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 1+1?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\nLet's think step by step.\nStep 1:"
    )
    assert render_prompt("alpaca", p, s) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 1+1?\n\n### Response:\nLet's think step by step.\nStep 1:"
    )
    assert render_prompt("deepseek-math", p, s) == (
        "User: What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
        "Assistant: Let's think step by step.\nStep 1:"
    )
    # The demo tokenizer's chat template is Qwen2-style, so it renders exactly like qwen2-boxed.
    assert render_prompt("chat", p, s, tokenizer) == render_prompt("qwen2-boxed", p, s)
    assert render_prompt("alpaca", "{x} \\frac{1}{2}", "") .count("{x} \\frac{1}{2}") == 1  # braces untouched
    assert set(TEMPLATES) == {"qwen2-boxed", "alpaca", "deepseek-math", "chat"}


def test_template_errors():
    with pytest.raises(ValueError, match=r"unknown prompt template 'llama'; choose one of qwen2-boxed, alpaca"):
        render_prompt("llama", "p", "s")
    plain = PreTrainedTokenizerFast(tokenizer_object=AutoTokenizer.from_pretrained(str(DEMO_MODEL)).backend_tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"template 'chat' needs a tokenizer with a chat template"):
        render_prompt("chat", "p", "s", plain)
    with pytest.raises(DataError, match=r"needs a tokenizer with a chat template"):
        render_prompt("chat", "p", "s", None)


# ---------------------------------------------------------------- tokenization


def make_record(prompt="Janet has 16 eggs. How many?", steps="Let's think step by step.\nStep 1:",
                chosen=" She makes 9 * 2 = <<9*2=18>>18 dollars.", rejected=" She makes 9 * 2 = <<9*2=18>>17 dollars.",
                record_id="r0"):
    return StepRecord(record_id, prompt, steps, chosen, rejected, None)


def test_normal_case_equals_joint_tokenization(tokenizer):
    record = make_record()
    pairs = tokenize_records([record], tokenizer, "alpaca", 1024, 512)
    prompt_text = render_prompt("alpaca", record.prompt, record.initial_reason_steps)
    for step, ids in ((record.chosen, pairs.chosens[0]), (record.rejected, pairs.rejecteds[0])):
        joint = tok(tokenizer, prompt_text + step)
        assert np.concatenate([pairs.prompts[0], ids]).tolist() == joint
    assert pairs.prompts[0].tolist() == tok(tokenizer, prompt_text)  # no BOS: the demo tokenizer has none
    assert pairs.prompts[0].dtype == np.int64 and pairs.chosens[0].dtype == np.int64
    assert pairs.stats.boundary_merges == 0 and pairs.record_ids == ["r0"]
    assert tokenizer.eos_token_id not in pairs.chosens[0].tolist()  # no EOS after a step


def test_boundary_merge_falls_back_to_step_alone(tokenizer):
    # "... eg" + "gs a day": jointly BPE makes " eggs" one token, which crosses the prompt boundary.
    record = make_record(steps="Let's think step by step.\nStep 1: She sells the eg", chosen="gs a day.",
                         rejected=" milk a day.")
    prompt_text = render_prompt("alpaca", record.prompt, record.initial_reason_steps)
    prompt_ids = tok(tokenizer, prompt_text)
    assert tok(tokenizer, prompt_text + record.chosen)[: len(prompt_ids)] != prompt_ids  # the merge happens
    pairs = tokenize_records([record], tokenizer, "alpaca", 1024, 512)
    assert pairs.stats.boundary_merges == 1  # only the chosen step merged
    assert pairs.prompts[0].tolist() == prompt_ids  # chosen and rejected share the prompt-alone ids
    assert pairs.chosens[0].tolist() == tok(tokenizer, record.chosen)
    assert pairs.rejecteds[0].tolist() == tok(tokenizer, prompt_text + record.rejected)[len(prompt_ids):]


def test_bos_only_when_the_tokenizer_has_one(tokenizer, bos_tokenizer):
    record = make_record()
    bos = bos_tokenizer.bos_token_id
    assert tokenizer.bos_token_id is None and bos is not None
    with_bos = tokenize_records([record], bos_tokenizer, "alpaca", 1024, 512)
    without = tokenize_records([record], tokenizer, "alpaca", 1024, 512)
    assert with_bos.prompts[0].tolist() == [bos] + without.prompts[0].tolist()
    assert with_bos.chosens[0].tolist() == without.chosens[0].tolist()
    # qwen2-boxed text already starts with the BOS string "<|im_start|>": not added twice
    chat = tokenize_records([record], bos_tokenizer, "qwen2-boxed", 1024, 512)
    assert chat.prompts[0][0] == bos and chat.prompts[0][1] != bos
    # left truncation keeps the BOS in front
    cut = tokenize_records([record], bos_tokenizer, "alpaca", 1024, 10)
    assert cut.prompts[0].tolist() == [bos] + without.prompts[0].tolist()[-9:]


def test_truncation_keeps_prompt_end_and_step_beginning(tokenizer):
    long_step = " " + "She adds 1 + 1 = <<1+1=2>>2. " * 10
    records = [make_record(record_id="long", chosen=long_step), make_record(record_id="short")]
    full = tokenize_records(records, tokenizer, "alpaca", 4096, 2048)
    prompt_len = len(full.prompts[0])
    max_prompt, max_len = prompt_len - 7, prompt_len - 7 + 20
    cut = tokenize_records(records, tokenizer, "alpaca", max_len, max_prompt)
    for i in range(2):
        assert cut.prompts[i].tolist() == full.prompts[i].tolist()[-max_prompt:]  # the end survives
    assert cut.chosens[0].tolist() == full.chosens[0].tolist()[:20]  # the beginning survives
    assert len(full.chosens[1]) <= 20 and cut.chosens[1].tolist() == full.chosens[1].tolist()
    assert all(len(p) + len(c) <= max_len and len(p) + len(r) <= max_len
               for p, c, r in zip(cut.prompts, cut.chosens, cut.rejecteds))
    stats = cut.stats
    assert (stats.prompts_truncated, stats.chosen_truncated, stats.rejected_truncated) == (2, 1, 0)
    assert "2 prompts" in stats.summary() and "1 chosen / 0 rejected" in stats.summary()


def test_length_settings_are_validated(tokenizer):
    for max_length, max_prompt_length in ((512, 512), (512, 600), (512, 0)):
        with pytest.raises(ValueError, match=r"need 0 < data.max_prompt_length < data.max_length"):
            tokenize_records([make_record()], tokenizer, "alpaca", max_length, max_prompt_length)


def test_record_that_cannot_fit_is_an_error_or_skipped():
    # A BPE without unk token drops characters it does not know, so a step can end with no tokens.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz .:?\n'#-ABLSTUW0123456789")))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    dropping = PreTrainedTokenizerFast(tokenizer_object=backend)
    good, bad = make_record(record_id="good", chosen=" ok", rejected=" no"), make_record(record_id="bad", chosen="☃☃")
    with pytest.raises(DataError, match=r"record bad: the chosen step is empty after tokenization"):
        tokenize_records([good, bad], dropping, "alpaca", 1024, 512)
    pairs = tokenize_records([good, bad], dropping, "alpaca", 1024, 512, skip_bad_rows=True)
    assert pairs.record_ids == ["good"] and pairs.stats.skipped[0][0] == "bad"
    # The no-room guard names the lengths and the config keys (unreachable through the public
    # function, which enforces max_prompt_length < max_length first).
    with pytest.raises(DataError, match=r"record x: the prompt cannot fit .*prompt 10 tokens.*data\.max_length"):
        tokenize_module._truncate("x", list(range(10)), [1, 2], [3], None, 10, 10,
                                  tokenize_module.TruncationStats())


def test_batched_fast_path_matches_the_tokenizer_call(tokenizer):
    texts = [render_prompt("qwen2-boxed", r.prompt, r.initial_reason_steps) + r.chosen
             for r in load_records(DEMO_TRAIN).records[:40]]
    assert tokenize_module._encode(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_shared_prompts_get_identical_ids(tokenizer):
    records = [make_record(record_id="a"), make_record(record_id="b", rejected=" She makes 9 * 2 = <<9*2=18>>19.")]
    pairs = tokenize_records(records, tokenizer, "deepseek-math", 1024, 512)
    assert np.array_equal(pairs.prompts[0], pairs.prompts[1]) and np.array_equal(pairs.chosens[0], pairs.chosens[1])


# ---------------------------------------------------------------- save, cache, speed


def test_save_load_roundtrip(tmp_path, tokenizer):
    records = load_records(DEMO_TRAIN).records[:30]
    pairs = tokenize_records(records, tokenizer, "alpaca", 128, 64)
    pairs.stats.skipped.append(("x:1", "some reason"))
    pairs.save(tmp_path / "p.bin")  # any name: no ".npz" is appended
    loaded = TokenizedPairs.load(tmp_path / "p.bin")
    assert loaded == pairs and len(loaded) == 30 and loaded.prompts[3].dtype == np.int64


def test_cache_hit_and_fingerprint(tmp_path, tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [row(), row(chosen=" other")])
    cache = tmp_path / "cache"
    first = prepare_dataset(data, tokenizer, "qwen2-boxed", 256, 128, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(tokenize_module, "tokenize_records", no_tokenizing)
    second = prepare_dataset(data, tokenizer, "qwen2-boxed", 256, 128, cache_dir=str(cache))
    assert second == first
    monkeypatch.undo()

    base = dataset_fingerprint(data, tokenizer, "qwen2-boxed", 256, 128, "step")
    assert files[0].name == base + ".npz"
    changed = [
        dataset_fingerprint(data, tokenizer, "alpaca", 256, 128, "step"),
        dataset_fingerprint(data, tokenizer, "qwen2-boxed", 257, 128, "step"),
        dataset_fingerprint(data, tokenizer, "qwen2-boxed", 256, 127, "step"),
        dataset_fingerprint(data, tokenizer, "qwen2-boxed", 256, 128, "full"),
        dataset_fingerprint(data, tokenizer, "qwen2-boxed", 256, 128, "step", skip_bad_rows=True),
        dataset_fingerprint(data, AutoTokenizer.from_pretrained(str(DEMO_MODEL), bos_token="<|im_start|>"),
                            "qwen2-boxed", 256, 128, "step"),
    ]
    assert len(set(changed + [base])) == len(changed) + 1
    write_jsonl(data, [row(), row(chosen=" changed")])
    assert dataset_fingerprint(data, tokenizer, "qwen2-boxed", 256, 128, "step") != base
    # A damaged cache file is rebuilt, not trusted.
    (cache / (base + ".npz")).write_bytes(b"garbage")
    write_jsonl(data, [row(), row(chosen=" other")])
    assert prepare_dataset(data, tokenizer, "qwen2-boxed", 256, 128, cache_dir=str(cache)) == first


def test_demo_train_set_tokenizes_fast(tokenizer):
    start = time.perf_counter()
    records = load_records(DEMO_TRAIN)
    pairs = tokenize_records(records, tokenizer, "qwen2-boxed", 1024, 512)
    elapsed = time.perf_counter() - start
    assert len(pairs) == len(records) >= 2000
    assert elapsed < 5.0, f"tokenizing {len(records)} demo records took {elapsed:.1f} s"


def test_demo_files_are_well_formed(tokenizer):
    train, evaluation = load_records(DEMO_TRAIN), load_records(DEMO / "data" / "eval.jsonl")
    assert 2000 <= len(train) <= 2500 and 150 <= len(evaluation) <= 250
    assert not {r.prompt for r in train} & {r.prompt for r in evaluation}  # split by problem
    assert all(r.dataset == "gsm8k" and r.chosen != r.rejected and "<<" in r.rejected for r in train)
    assert len(load_records(DEMO_TRAIN, mode="full")) == len(train)
    # Several continuations share a prompt for some records (the second rejected variants).
    keys = [(r.prompt, r.initial_reason_steps) for r in train]
    assert len(set(keys)) < len(keys)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == 1024
    assert sum(f.stat().st_size for f in DEMO_MODEL.glob("*.json")) < 200_000
