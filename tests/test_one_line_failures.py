"""Every failure ends in one line: under torchrun with 2 gloo ranks, bad input stops every rank with exit code 2,
rank 0 alone prints the message, no worker prints a traceback, and nothing is written into the output directory.
The same for ``python -m fasttrain.eval`` and ``python -m fasttrain.datagen`` on a corrupt model."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import DEMO, REPO, run_fasttrain

DEMO_MODEL = DEMO / "model"


def _rows(n: int = 12) -> list[dict]:
    return [json.loads(line) for line in (DEMO / "data" / "train.jsonl").read_text().splitlines()[:n]]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, target)
    return target


def _truncated_model(tmp_path: Path) -> tuple[list[str], str]:
    model = _model_copy(tmp_path)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return [f"model.path={model}"], str(weights)


def _gpt2_model_type(tmp_path: Path) -> tuple[list[str], str]:
    model = _model_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    return [f"model.path={model}"], "model_type 'gpt2' is not supported"


def _gpt2_architecture(tmp_path: Path) -> tuple[list[str], str]:
    model = _model_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    return [f"model.path={model}"], "does not match model_type 'qwen2'"


def _missing_rejected(tmp_path: Path) -> tuple[list[str], str]:
    rows = _rows()
    del rows[4]["rejected"]
    data = _write_jsonl(tmp_path / "missing.jsonl", rows)
    return [f"data.train={data}"], f"{data}, line 5: missing field 'rejected'"


def _empty_chosen(tmp_path: Path) -> tuple[list[str], str]:
    rows = _rows()
    rows[2]["chosen"] = ""
    data = _write_jsonl(tmp_path / "empty.jsonl", rows)
    return [f"data.train={data}"], f"{data}, line 3"


def _not_utf8(tmp_path: Path) -> tuple[list[str], str]:
    data = _write_jsonl(tmp_path / "latin1.jsonl", _rows())
    raw = data.read_bytes().split(b"\n")
    raw[6] = raw[6].replace(b"Step", b"St\xe9p", 1)
    data.write_bytes(b"\n".join(raw))
    return [f"data.train={data}"], f"{data}, line 7: not valid UTF-8"


def _unknown_key(tmp_path: Path) -> tuple[list[str], str]:
    return ["train.lrr=1"], "unknown key train.lrr"


def _negative_beta(tmp_path: Path) -> tuple[list[str], str]:
    return ["loss.beta=-0.1"], "loss.beta=-0.1 must be > 0"


BAD_INPUTS = {
    "truncated_safetensors": _truncated_model,
    "model_type_gpt2": _gpt2_model_type,
    "architectures_gpt2": _gpt2_architecture,
    "row_missing_rejected": _missing_rejected,
    "empty_chosen": _empty_chosen,
    "non_utf8_byte": _not_utf8,
    "unknown_config_key": _unknown_key,
    "negative_beta": _negative_beta,
}


def _base_args(tmp_path: Path, out: Path) -> list[str]:
    data = _write_jsonl(tmp_path / "good.jsonl", _rows())
    return ["--demo", f"data.train={data}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={out}", "train.max_steps=2", "train.global_batch_pairs=4",
            "train.progress_bar=false", "train.plot=false", "train.tensorboard=false"]


def assert_one_line_failure(result: subprocess.CompletedProcess, expected: str, nproc: int) -> None:
    """Exit code 2 from every rank, rank 0's one message, no traceback from any worker."""
    err = result.stderr
    assert result.returncode != 0, err[-3000:]
    messages = [line for line in err.splitlines() if re.match(r"fasttrain( \(rank \d+\))?: error:", line)]
    assert len(messages) == 1 and expected in messages[0], err[-4000:]
    assert messages[0].startswith("fasttrain: error:"), err[-4000:]  # printed by rank 0
    assert not re.search(r"^\[rank\d+\]", err, re.M), err[-4000:]  # no worker traceback (torch prefixes them)
    if nproc == 1:
        assert result.returncode == 2 and "Traceback" not in err, err[-3000:]
    else:
        # torchrun's own summary: every rank it lists exited with 2, and the root cause is our message
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", err)
        assert codes and set(codes) == {"2"}, err[-4000:]
        assert err.count("Traceback") <= 1, err[-4000:]  # torchrun's launcher raises ChildFailedError itself
        assert f"traceback : fasttrain: error: {messages[0].split('error: ', 1)[1]}" in err, err[-4000:]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_under_torchrun_is_one_line_and_writes_nothing(tmp_path, case):
    overrides, expected = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "out"
    result = run_fasttrain(_base_args(tmp_path, out) + overrides, nproc=2, timeout=300)
    assert_one_line_failure(result, expected, nproc=2)
    assert not out.exists()  # nothing is written into output_dir until every input check has passed


def test_existing_output_dir_under_torchrun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_fasttrain(_base_args(tmp_path, out), nproc=2, timeout=300)
    assert_one_line_failure(result, f"output directory {out} exists and is not empty", nproc=2)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_bad_input_without_torchrun_is_one_line(tmp_path):
    overrides, expected = _missing_rejected(tmp_path)
    out = tmp_path / "out"
    result = run_fasttrain(_base_args(tmp_path, out) + overrides, nproc=1, timeout=300)
    assert_one_line_failure(result, expected, nproc=1)
    assert not out.exists()


def test_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "out"
    overrides, _ = _gpt2_model_type(tmp_path)
    failed = run_fasttrain(_base_args(tmp_path, out) + overrides, nproc=1, timeout=300)
    assert failed.returncode == 2 and not out.exists(), failed.stderr[-3000:]
    fixed = run_fasttrain(_base_args(tmp_path, out), nproc=1, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()


def _module_cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _problems(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"instruction": "What is 2 + 3?", "answer": "5"}) + "\n")
    return path


@pytest.mark.parametrize("module", ["fasttrain.eval", "fasttrain.datagen"])
def test_eval_and_datagen_on_a_corrupt_model(tmp_path, module):
    _, weights = _truncated_model(tmp_path)
    out = tmp_path / "out"
    result = _module_cli(module, ["--model", str(tmp_path / "model"), "--data", str(_problems(tmp_path)),
                                  "--out", str(out), "--backend", "hf"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [line for line in result.stderr.splitlines() if line.startswith(f"{module}: error:")]
    assert len(errors) == 1 and weights in errors[0], result.stderr[-3000:]
    assert not out.exists()  # --out is created only once the model has loaded
