"""Bad input (DESIGN §2, README "errors ... end the run with one line"): malformed records, broken data
files, damaged model directories, odd tokenizers, wrong config values and the CLI end to end.

The standard: a DataError / ConfigError / UserError (or, below fasttrain's entry point, a ValueError /
OSError / KeyError that assembly.py turns into a UserError) whose message names the file and the
row / key / field; never an exception from deep inside torch, transformers, pyarrow or safetensors, and
never silently wrong data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from fasttrain.config import RunConfig, load_config
from fasttrain.data import DataError, load_records, tokenize_records
from fasttrain.errors import (
    ConfigError,
    UserError,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "fasttrain" / "demo"
DEMO_MODEL = DEMO / "model"
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def good_row(**overrides):
    row = {
        "prompt": "Janet has 16 eggs. She eats 3. How many are left?",
        "initial_reason_steps": "Let's think step by step.\nStep 1:",
        "chosen": " 16 - 3 = 13 eggs.",
        "rejected": " 16 - 3 = 12 eggs.",
    }
    row.update(overrides)
    return row


# Valid text that is easy to get wrong: combining marks, right-to-left text and overrides, zero-width
# characters, emoji (incl. ZWJ sequences and flags), NUL, U+2028/U+2029 (line breaks for str.splitlines
# but not for JSON Lines), a BOM in the middle, astral CJK, LaTeX with braces.
ODD_TEXT = [
    "e\u0301\u0302\u0303", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", "\u202eabc\u202c",
    "a\u200bb\u200c\u200d\u2060", "\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467\U0001f1fa\U0001f1f8",
    "nul\u0000inside", "line\u2028sep\u2029para", "\ufeffbom", "\U00020000\U0002a6d6", "$\\frac{a}{b}$ {x}",
    "tab\tcr\r\nlf", "\x7f\x85\xa0",
]


def odd_text():
    return st.one_of(
        st.sampled_from(ODD_TEXT),
        st.lists(st.sampled_from(ODD_TEXT), min_size=1, max_size=4).map(" ".join),
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    )


MISSING = object()


def bad_value():
    """Empty / whitespace-only text, wrong JSON types, or the field left out."""
    return st.one_of(
        st.just(""), st.sampled_from([" ", "\n\t ", "\u3000", "\u2003\u00a0"]),
        st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
        st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=2),
        st.lists(st.text(max_size=5), min_size=1, max_size=2), st.just(MISSING),
    )


def field_value():
    """Mostly valid (odd) text, so that whole records are valid often enough to test that path too."""
    return st.integers(0, 9).flatmap(
        lambda roll: st.one_of(odd_text(), st.just("Step 2: 4 + 4 = 8.")) if roll < 7 else bad_value())


REQUIRED = ("prompt", "initial_reason_steps", "chosen", "rejected")


@st.composite
def records(draw):
    row = {name: draw(field_value()) for name in REQUIRED}
    if draw(st.integers(0, 3)) == 0:
        row["id"] = draw(st.one_of(st.text(max_size=8), st.integers(-5, 10**9), st.booleans(), st.floats(0, 1),
                                   st.none()))
    if draw(st.integers(0, 3)) == 0:
        row["dataset"] = draw(st.one_of(st.text(max_size=8), st.integers(0, 9), st.none()))
    if draw(st.booleans()):
        row[draw(st.text(min_size=1, max_size=6))] = draw(st.one_of(st.integers(), st.text(max_size=4)))
    return {k: v for k, v in row.items() if v is not MISSING}


def bad_fields(row) -> list[str]:
    """The oracle, written independently of records.py: which fields make the record unusable."""
    bad = []
    for name in REQUIRED:
        value = row.get(name)
        if not isinstance(value, str) or (name != "initial_reason_steps" and not value.strip()):
            bad.append(name)
    if "id" in row and row["id"] is not None and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        bad.append("id")
    if row.get("dataset") is not None and not isinstance(row["dataset"], str):
        bad.append("dataset")
    return bad


def write_rows(path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n" for i, r in enumerate(rows)),
                        encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One row per file: a column of mixed types across rows is not a Parquet table.
        assert len(rows) == 1
        try:
            table = pa.table({k: pa.array([v]) for k, v in rows[0].items()})
            pq.write_table(table, path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            assume(False)  # not representable in Parquet (e.g. an empty struct); nothing to test
    return path


def check_pairs(pairs, n: int) -> None:
    assert len(pairs) == n == len(pairs.prompts) == len(pairs.chosens) == len(pairs.rejecteds)
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosens, pairs.rejecteds):
        assert 0 < len(prompt) <= MAX_PROMPT_LENGTH
        assert len(chosen) > 0 and len(rejected) > 0
        assert len(prompt) + len(chosen) <= MAX_LENGTH and len(prompt) + len(rejected) <= MAX_LENGTH


# ---------------------------------------------------------------- 1. malformed records


@SETTINGS
@given(rows=st.lists(records(), min_size=1, max_size=3), fmt=st.sampled_from(["jsonl", "json", "parquet"]),
       template=st.sampled_from(["qwen2-boxed", "alpaca", "chat"]))
def test_malformed_records_error_names_file_row_and_field(tmp_path_factory, tokenizer, rows, fmt, template):
    if fmt == "parquet":
        rows = rows[:1]
    path = write_rows(tmp_path_factory.mktemp("rec") / f"data.{fmt}", fmt, rows)
    first_bad = next((i for i, r in enumerate(rows) if bad_fields(r)), None)
    event("valid" if first_bad is None else "invalid")
    try:
        records_ = load_records(path)
        pairs = tokenize_records(records_, tokenizer, template, MAX_LENGTH, MAX_PROMPT_LENGTH)
    except DataError as error:
        message = str(error)
        assert first_bad is not None, f"a valid record was rejected: {message}"
        assert str(path) in message
        where = f"line {first_bad + 1}" if fmt == "jsonl" else f"row {first_bad} (0-based index)"
        assert where in message, message
        assert any(repr(name) in message for name in bad_fields(rows[first_bad])), message
        return
    assert first_bad is None, f"record {first_bad} {rows[first_bad]!r} was accepted"
    check_pairs(pairs, len(rows))
    for record, row in zip(records_, rows):  # text is kept exactly, never normalised
        assert (record.prompt, record.chosen, record.rejected) == (row["prompt"], row["chosen"], row["rejected"])


@SETTINGS
@given(rows=st.lists(records(), min_size=1, max_size=5))
def test_skip_bad_rows_counts_exactly_the_bad_ones(tmp_path_factory, tokenizer, rows):
    path = write_rows(tmp_path_factory.mktemp("skip") / "data.jsonl", "jsonl", rows)
    n_bad = sum(bool(bad_fields(r)) for r in rows)
    try:
        records_ = load_records(path, skip_bad_rows=True)
    except DataError as error:
        assert n_bad == len(rows) and "no usable records" in str(error) and str(path) in str(error)
        return
    pairs = tokenize_records(records_, tokenizer, "qwen2-boxed", MAX_LENGTH, MAX_PROMPT_LENGTH, skip_bad_rows=True)
    check_pairs(pairs, len(rows) - n_bad)
    assert len(pairs.stats.skipped) == n_bad


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_valid_odd_unicode_loads_unchanged(tmp_path, tokenizer, fmt):
    rows = [good_row(prompt=text, chosen=text, rejected=" " + text, initial_reason_steps=text) for text in ODD_TEXT]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "odd.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = write_rows(tmp_path / f"odd.{fmt}", fmt, rows)
    records_ = load_records(path)
    assert [r.prompt for r in records_] == ODD_TEXT and [r.chosen for r in records_] == ODD_TEXT
    check_pairs(tokenize_records(records_, tokenizer, "qwen2-boxed", MAX_LENGTH, MAX_PROMPT_LENGTH), len(ODD_TEXT))


def test_huge_prompt_is_left_truncated_and_counted(tmp_path, tokenizer):
    huge = "Count the apples: " + "apple pie, " * 200_000 + "THE END?"  # ~2.2 MB
    assert len(huge) > 2_000_000
    path = write_rows(tmp_path / "huge.jsonl", "jsonl", [good_row(prompt=huge), good_row()])
    pairs = tokenize_records(load_records(path), tokenizer, "alpaca", MAX_LENGTH, MAX_PROMPT_LENGTH)
    check_pairs(pairs, 2)
    assert pairs.stats.prompts_truncated == 1 and len(pairs.prompts[0]) == MAX_PROMPT_LENGTH
    assert "THE END?" in tokenizer.decode(pairs.prompts[0].tolist())  # the end is kept
    huge_step = good_row(chosen=" " + "1 + " * 300_000 + "1")
    path = write_rows(tmp_path / "huge_step.jsonl", "jsonl", [huge_step])
    pairs = tokenize_records(load_records(path), tokenizer, "alpaca", MAX_LENGTH, MAX_PROMPT_LENGTH)
    check_pairs(pairs, 1)
    assert pairs.stats.chosen_truncated == 1


# ---------------------------------------------------------------- 2. broken files


def _parquet_bytes(columns: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


BROKEN_FILES = {
    "empty.jsonl": (b"", "no usable records"),
    "blank.jsonl": (b"\n   \n\t\n\n", "no usable records"),
    "empty.json": (b"", "not valid JSON"),
    "empty_array.json": (b"[]", "no usable records"),
    "truncated.jsonl": (json.dumps(good_row()).encode()[:40], "line 1: not valid JSON"),
    "truncated_line3.jsonl": (b"\n".join([json.dumps(good_row()).encode()] * 2 + [b'{"prompt": "x", "ch']),
                              "line 3: not valid JSON"),
    "truncated.json": (json.dumps([good_row()] * 3).encode()[:-10], "not valid JSON"),
    "array_line.jsonl": (b'["prompt", "chosen"]\n', "line 1: expected a JSON object"),
    "number_line.jsonl": (json.dumps(good_row()).encode() + b"\n42\n", "line 2: expected a JSON object"),
    "string_line.jsonl": (b'"just a string"\n', "line 1: expected a JSON object"),
    "null_line.jsonl": (b"null\n", "line 1: expected a JSON object"),
    "object.json": (json.dumps(good_row()).encode(), "expected a JSON array"),
    "array_of_numbers.json": (b"[1, 2]", "row 0 (0-based index): expected a JSON object"),
    "garbage.jsonl": (bytes(range(256)) * 4, "not valid UTF-8"),
    "garbage.json": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not valid UTF-8"),
    "garbage.parquet": (b"PAR1" + bytes(range(200)), "cannot read as Parquet"),
    "empty.parquet": (b"", "cannot read as Parquet"),
    "json_as.parquet": (json.dumps(good_row()).encode(), "cannot read as Parquet"),
    "latin1.jsonl": (json.dumps(good_row(prompt="caf\u00e9 na\u00efve"), ensure_ascii=False).encode("latin-1"),
                     "not valid UTF-8"),
    "utf16.jsonl": (json.dumps(good_row()).encode("utf-16"), "not valid UTF-8"),
    "huge_number.jsonl": (b'{"prompt": 1' + b"0" * 5000 + b"}", "line 1: cannot parse the JSON"),
    "deep.jsonl": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "line 1: cannot parse the JSON"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, "cannot parse the JSON"),
    "int_column.parquet": (lambda: _parquet_bytes({"prompt": [1, 2], "initial_reason_steps": ["", ""],
                                                   "chosen": ["a", "b"], "rejected": ["c", "d"]}),
                           "row 0 (0-based index): field 'prompt' must be a string"),
    "binary_column.parquet": (lambda: _parquet_bytes({"prompt": ["p"], "initial_reason_steps": [""],
                                                      "chosen": [b"a"], "rejected": ["c"]}),
                              "row 0 (0-based index): field 'chosen' must be a string, got bytes"),
    "list_column.parquet": (lambda: _parquet_bytes({"prompt": ["p"], "initial_reason_steps": [["x"]],
                                                    "chosen": ["a"], "rejected": ["c"]}),
                            "field 'initial_reason_steps' must be a string, got an array"),
    "no_columns.parquet": (lambda: _parquet_bytes({"text": ["hello"]}), "row 0 (0-based index): missing field 'prompt'"),
    "data.csv": (b"prompt,chosen\nx,y\n", "unknown data file extension '.csv'"),
    "noext": (json.dumps(good_row()).encode(), "unknown data file extension"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_file_is_a_data_error_naming_the_file(tmp_path, name):
    content, expected = BROKEN_FILES[name]
    path = tmp_path / name
    path.write_bytes(content() if callable(content) else content)
    with pytest.raises(DataError) as info:
        load_records(path, skip_bad_rows=name.startswith("truncated"))  # a damaged file is fatal even so
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_row()).encode() + b"\n")
    assert load_records(path).records[0].prompt == good_row()["prompt"]


@pytest.mark.parametrize("kind", ["directory", "missing", "dangling_link"])
def test_paths_that_are_not_files(tmp_path, kind):
    path = tmp_path / "data.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling_link":
        path.symlink_to(tmp_path / "nowhere.jsonl")
    # a directory may be a saved `datasets` dataset; this one is not, and the message says what was expected
    expected = "not one written by datasets' save_to_disk" if kind == "directory" else "not found"
    with pytest.raises(DataError, match=expected) as info:
        load_records(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write_rows(tmp_path / "locked.jsonl", "jsonl", [good_row()])
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read the file") as info:
        load_records(path)
    assert str(path) in str(info.value)


def test_cache_dir_that_is_a_file(tmp_path, tokenizer):
    from fasttrain.data import prepare_dataset

    data = write_rows(tmp_path / "d.jsonl", "jsonl", [good_row()])
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("I am a file")
    with pytest.raises(UserError, match="data.cache_dir") as info:
        prepare_dataset(data, tokenizer, "alpaca", MAX_LENGTH, MAX_PROMPT_LENGTH, cache_dir=str(not_a_dir))
    assert str(not_a_dir) in str(info.value)


# ---------------------------------------------------------------- 3. model directory


def _model_copy(tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(DEMO_MODEL, target)
    return target


def _edit_config(model_dir: Path, **changes) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir / "config.json"


def _load_everything(model_dir: Path):
    """What assembly.build_sharded_model does, minus FSDP: config, source check, weights."""
    import torch

    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model
    from fasttrain.model.hf_checkpoint import load_hf_weights, resolve_model_source

    cfg = ModelConfig.from_model_dir(model_dir)
    resolve_model_source(model_dir)
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    load_hf_weights(model, model_dir)


def _break_model(model_dir: Path, case: str) -> Path:
    """Damage the copy; return the file the message must name."""
    weights = model_dir / "model.safetensors"
    if case == "no_config":
        (model_dir / "config.json").unlink()
        return model_dir / "config.json"
    if case == "config_is_a_directory":
        (model_dir / "config.json").unlink()
        (model_dir / "config.json").mkdir()
        return model_dir / "config.json"
    if case == "no_weights":
        weights.unlink()
        return model_dir
    if case == "legacy_bin_only":
        weights.rename(model_dir / "pytorch_model.bin")
        return model_dir
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return weights
    if case == "empty_weights":
        weights.write_bytes(b"")
        return weights
    if case == "garbage_weights":
        weights.write_bytes(b"\x00\x01garbage" * 100)
        return weights
    if case == "header_only_weights":
        data = weights.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        weights.write_bytes(data[:header])
        return weights
    if case == "config_not_json":
        (model_dir / "config.json").write_text("model_type: qwen2\n")
        return model_dir / "config.json"
    if case == "config_not_utf8":
        (model_dir / "config.json").write_bytes(b"\xff\xfe{\x00}\x00")
        return model_dir / "config.json"
    if case == "config_is_a_list":
        (model_dir / "config.json").write_text("[1, 2]")
        return model_dir / "config.json"
    if case == "hidden_size_string":
        return _edit_config(model_dir, hidden_size="128")
    if case == "zero_heads":
        return _edit_config(model_dir, num_attention_heads=0)
    if case == "zero_kv_heads":
        return _edit_config(model_dir, num_key_value_heads=0)
    if case == "negative_vocab":
        return _edit_config(model_dir, vocab_size=-5)
    if case == "wrong_vocab":  # config says one thing, the weights another
        return _edit_config(model_dir, vocab_size=999)
    if case == "unsupported_model_type":
        return _edit_config(model_dir, model_type="gpt2")
    sharded = model_dir / "model-00001-of-00002.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if case.startswith("index_"):
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
        weights.rename(sharded)
        weight_map = {n: sharded.name for n in names}
    if case == "index_missing_shard":
        weight_map[names[0]] = "model-00002-of-00002.safetensors"
        index.write_text(json.dumps({"weight_map": weight_map}))
        return model_dir / "model-00002-of-00002.safetensors"
    if case == "index_not_json":
        index.write_text("{weight_map: nope")
        return index
    if case == "index_without_weight_map":
        index.write_text(json.dumps({"metadata": {}}))
        return index
    if case == "index_numbers_as_files":
        index.write_text(json.dumps({"weight_map": {n: 1 for n in names}}))
        return index
    if case == "index_lists_absent_tensor":  # the shard exists but lacks a tensor the index names
        weight_map = {n: sharded.name for n in names}
        other = model_dir / "model-00002-of-00002.safetensors"
        shutil.copy(sharded, other)
        moved = next(n for n in names if "embed" not in n)
        weight_map[moved] = other.name
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(other))
        del tensors[moved]
        save_file(tensors, str(other))
        index.write_text(json.dumps({"weight_map": weight_map}))
        return other
    if case == "index_corrupt_shard":
        sharded.write_bytes(b"{}")
        index.write_text(json.dumps({"weight_map": weight_map}))
        return sharded
    raise AssertionError(case)


MODEL_CASES = [
    "no_config", "config_is_a_directory", "no_weights", "legacy_bin_only", "truncated_weights", "empty_weights",
    "garbage_weights", "header_only_weights", "config_not_json", "config_not_utf8", "config_is_a_list",
    "hidden_size_string", "zero_heads", "zero_kv_heads", "negative_vocab", "wrong_vocab", "unsupported_model_type",
    "index_missing_shard", "index_not_json", "index_without_weight_map", "index_numbers_as_files",
    "index_lists_absent_tensor", "index_corrupt_shard",
]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_damaged_model_directory_names_the_file(tmp_path, case):
    model_dir = _model_copy(tmp_path)
    culprit = _break_model(model_dir, case)
    with pytest.raises(Exception) as info:
        _load_everything(model_dir)
    # assembly.build_sharded_model turns exactly these types into a one-line UserError.
    assert isinstance(info.value, (OSError, ValueError, KeyError, UserError)), repr(info.value)
    assert type(info.value).__module__ in ("builtins", "fasttrain.errors"), repr(info.value)  # not a parser's own
    message = str(info.value)
    assert str(culprit) in message, message
    assert "Traceback" not in message and "\n" not in message.strip(), message


def test_tokenizer_file_missing_is_caught_before_tokenizing(tmp_path):
    """transformers loads a directory that lost tokenizer.json without complaint, as a tokenizer of only
    the special tokens; every step would come out empty and the data would be blamed."""
    model_dir = _model_copy(tmp_path)
    (model_dir / "tokenizer.json").unlink()
    broken = AutoTokenizer.from_pretrained(str(model_dir))
    from fasttrain.data import records_from_rows

    with pytest.raises(UserError, match="tokenizer.json") as info:
        tokenize_records(records_from_rows([good_row()], "x.jsonl"), broken, "qwen2-boxed", 256, 128)
    assert str(model_dir) in str(info.value)


@SETTINGS
@given(key=st.sampled_from(sorted(json.loads((DEMO_MODEL / "config.json").read_text()))
                           + ["head_dim", "rope_scaling", "rope_parameters", "sliding_window", "attention_bias"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2),
                       st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta"]),
                                       st.one_of(st.text(max_size=6), st.floats(-2, 8), st.none()), max_size=3)))
def test_fuzzed_config_json_is_a_value_error_naming_it(tmp_path_factory, key, value):
    import torch

    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model

    model_dir = tmp_path_factory.mktemp("cfg")
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    try:
        cfg = ModelConfig.from_model_dir(model_dir)
    except ValueError as error:
        assert type(error) is ValueError and str(model_dir / "config.json") in str(error), repr(error)
        event("rejected")
        return
    event("accepted")
    from fasttrain.model.config import num_params

    assume(num_params(cfg) < 50_000_000)  # a huge-but-valid size is valid; don't allocate it
    with torch.device("meta"):
        build_model(cfg, device="meta", dtype=torch.float32)  # whatever it accepted, the model can be built


# ---------------------------------------------------------------- 4. tokenizers: no pad, with BOS


def test_tokenizer_without_pad_token_just_works(tmp_path, tokenizer):
    no_pad_dir = tmp_path / "no_pad"
    no_pad = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    no_pad.pad_token = None
    no_pad.save_pretrained(str(no_pad_dir))
    no_pad = AutoTokenizer.from_pretrained(str(no_pad_dir))
    assert no_pad.pad_token is None and no_pad.pad_token_id is None
    path = write_rows(tmp_path / "d.jsonl", "jsonl", [good_row(), good_row(chosen=" other")])
    for template in ("qwen2-boxed", "chat"):
        got = tokenize_records(load_records(path), no_pad, template, MAX_LENGTH, MAX_PROMPT_LENGTH)
        want = tokenize_records(load_records(path), tokenizer, template, MAX_LENGTH, MAX_PROMPT_LENGTH)
        check_pairs(got, 2)
        assert got == want


def test_tokenizer_with_bos_prepends_it_once(tmp_path):
    bos_dir = tmp_path / "bos"
    with_bos = AutoTokenizer.from_pretrained(str(DEMO_MODEL), bos_token="<|im_start|>")
    with_bos.save_pretrained(str(bos_dir))
    with_bos = AutoTokenizer.from_pretrained(str(bos_dir))
    bos = with_bos.bos_token_id
    assert bos is not None
    path = write_rows(tmp_path / "d.jsonl", "jsonl", [good_row(), good_row(prompt="x " * 2000)])
    pairs = tokenize_records(load_records(path), with_bos, "alpaca", MAX_LENGTH, MAX_PROMPT_LENGTH)
    check_pairs(pairs, 2)
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosens, pairs.rejecteds):
        assert prompt[0] == bos and (prompt == bos).sum() == 1  # once, and kept by left truncation
        assert bos not in chosen and bos not in rejected
    assert pairs.stats.prompts_truncated == 1


# ---------------------------------------------------------------- 5. config


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _keys():
    import typing

    out = []
    for section in ("model", "data", "loss", "train"):
        hints = typing.get_type_hints(type(getattr(RunConfig(), section)))
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(getattr(RunConfig(), section))]
    return out


KEYS = _keys()


def _wrong_value(annotation):
    nested = st.one_of(st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(0, 3),
                                                                                max_size=2), st.none())
    if annotation is bool:
        return st.one_of(nested, st.integers(), st.floats(allow_nan=False), st.text(max_size=6).filter(
            lambda s: s.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off")))
    if annotation is int:
        return st.one_of(nested, st.booleans(), st.floats(allow_nan=False).filter(lambda x: x != int(x) if
                                                                                 math.isfinite(x) else True),
                         st.text(st.characters(blacklist_categories=("Cs", "Nd")), min_size=1, max_size=6))
    if annotation is float:
        return st.one_of(nested, st.booleans(), st.text(st.characters(blacklist_categories=("Cs", "Nd")),
                                                        min_size=1, max_size=6).filter(_not_a_float))
    return st.one_of(nested, st.booleans(), st.integers(), st.floats(allow_nan=False))


def _not_a_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


@st.composite
def wrong_entries(draw):
    section, key, annotation = draw(st.sampled_from(KEYS))
    return section, key, draw(_wrong_value(annotation))


@SETTINGS
@given(entry=wrong_entries(), fmt=st.sampled_from(["yaml", "json"]))
def test_wrong_typed_config_value_is_a_config_error_naming_the_key(tmp_path_factory, entry, fmt):
    section, key, value = entry
    path = tmp_path_factory.mktemp("cfg") / f"run.{fmt}"
    document = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    document.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(document) if fmt == "yaml" else json.dumps(document))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert f"{section}.{key}" in str(info.value) and str(path) in str(info.value), str(info.value)


@SETTINGS
@given(section_key=st.sampled_from(KEYS), value=st.one_of(
    st.text(max_size=8), st.sampled_from(["1e3", "1.5", "-0", "nan", "inf", "-inf", "1e-3", "0x10", "1_000", " 7 ",
                                          "true", "False", "", "=", "None", "[1]", "{}"])))
def test_command_line_override_never_crashes(section_key, value):
    section, key, annotation = section_key
    try:
        cfg = load_config(None, [f"{section}.{key}={value}"])
    except ConfigError as error:
        assert f"{section}.{key}" in str(error), str(error)
        return
    assert type(getattr(getattr(cfg, section), key)) is annotation


@SETTINGS
@given(section=st.one_of(st.sampled_from(list(SECTIONS)), st.text(min_size=1, max_size=8)),
       key=st.text(min_size=1, max_size=10), value=st.one_of(st.integers(), st.text(max_size=4), st.none()),
       via=st.sampled_from(["yaml", "json", "override"]))
def test_unknown_keys_and_sections_are_named(tmp_path_factory, section, key, value, via):
    known = section in SECTIONS and key in {name for s, name, _ in KEYS if s == section}
    assume(not known)
    if via == "override":
        assume("=" not in section + key and "." not in section and not section.startswith("-"))
        assume(section.strip() == section and key.strip() == key)
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{section}.{key}={value}"])
    else:
        path = tmp_path_factory.mktemp("cfg") / f"run.{via}"
        path.write_text(yaml.safe_dump({section: {key: value}}) if via == "yaml" else json.dumps({section: {key: value}}))
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
    message = str(info.value)
    assert (f"unknown section {section!r}" in message if section not in SECTIONS
            else f"unknown key {section}.{key}" in message), message


@pytest.mark.parametrize("text", ["model: [unclosed", "- a\n- b\n", "model: 3\n", "just a string", "\x00\x01",
                                  "model:\n  path: m\n  path: n\n"])
def test_unparseable_or_misshapen_config_file(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    try:
        load_config(str(path))
    except ConfigError as error:
        assert str(path) in str(error)
    else:
        assert text.startswith("model:\n")  # a duplicate key: YAML's own rule is "last wins"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert str(tmp_path / "nope.yaml") in str(info.value)


# Out-of-range or non-finite values are ConfigErrors before anything runs.
CONFIG_BUGS = [
    ("train.max_steps=1e400", "OverflowError escapes (int(float('inf')))"),
    ("train.max_steps=1.5e0", "silently truncated to 1"),
    ("train.lr=nan", "NaN learning rate passes validate()"),
    ("loss.beta=nan", "NaN beta passes validate()"),
    ("train.lr=inf", "infinite learning rate passes validate()"),
    ("train.log_every=0", "ZeroDivisionError in the training loop (step % 0)"),
    ("train.adam_beta1=2", "torch.optim.AdamW raises its own ValueError at start-up"),
    ("train.weight_decay=-1", "torch.optim.AdamW raises its own ValueError at start-up"),
    ("train.max_grad_norm=-1", "negative clipping norm accepted"),
    ("train.dist_timeout_minutes=0", "a zero collective timeout aborts the first collective"),
]


@pytest.mark.parametrize("override,why", CONFIG_BUGS, ids=[o for o, _ in CONFIG_BUGS])
def test_out_of_range_config_values_are_config_errors(override, why):
    with pytest.raises(ConfigError):
        load_config(str(DEMO / "demo.yaml"), [override]).validate()


# ---------------------------------------------------------------- 6. the CLI, end to end


def _run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    command = [sys.executable, str(REPO / "fasttrain" / "run.py"), "--config", str(DEMO / "demo.yaml"),
               f"train.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
               "train.progress_bar=false", "train.tensorboard=false", "train.plot=false", "train.global_batch_pairs=4",
               "train.max_steps=1", *overrides]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def _assert_clean_failure(result: subprocess.CompletedProcess, tmp_path: Path, culprit: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "fasttrain: error:" in line]
    assert len(errors) == 1 and str(culprit) in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "out" / "final").exists()


def _small_data(tmp_path: Path) -> Path:
    lines = (DEMO / "data" / "train.jsonl").read_text().splitlines()[:8]
    return write_rows(tmp_path / "small.jsonl", "jsonl", [json.loads(line) for line in lines])


def test_cli_model_without_config_json(tmp_path):
    model_dir = _model_copy(tmp_path)
    (model_dir / "config.json").unlink()
    result = _run_cli(tmp_path, f"model.path={model_dir}", f"data.train={_small_data(tmp_path)}", "data.eval=")
    _assert_clean_failure(result, tmp_path, model_dir / "config.json")


def test_cli_bad_row_at_line_3(tmp_path):
    rows = [json.loads(line) for line in (DEMO / "data" / "train.jsonl").read_text().splitlines()[:5]]
    rows[2]["chosen"] = 17
    data = write_rows(tmp_path / "bad.jsonl", "jsonl", rows)
    result = _run_cli(tmp_path, f"data.train={data}", "data.eval=")
    _assert_clean_failure(result, tmp_path, data)
    assert "line 3" in result.stderr and "'chosen'" in result.stderr


def test_cli_tokenizer_dir_without_files(tmp_path):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    result = _run_cli(tmp_path, f"model.tokenizer={empty}", f"data.train={_small_data(tmp_path)}", "data.eval=")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(empty) in result.stderr and not (tmp_path / "out" / "final").exists()


def test_cli_tokenizer_json_missing(tmp_path):
    model_dir = _model_copy(tmp_path)
    (model_dir / "tokenizer.json").unlink()
    result = _run_cli(tmp_path, f"model.tokenizer={model_dir}", f"data.train={_small_data(tmp_path)}", "data.eval=")
    _assert_clean_failure(result, tmp_path, model_dir)
    assert "tokenizer.json" in result.stderr


def test_tokenizer_load_error_is_one_line(tmp_path):
    from fasttrain.assembly import load_tokenizer

    with pytest.raises(UserError) as info:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(info.value)
