"""Config loading: typed fields, overrides, unknown keys and wrong types named before anything runs."""
from pathlib import Path

import pytest

from fasttrain.config import load_config
from fasttrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path", sorted((REPO / "fasttrain" / "configs").glob("*.yaml")) + [REPO / "fasttrain" / "demo" / "demo.yaml"]
)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(str(path))
    cfg.validate()
    assert cfg.train.global_batch_pairs >= 1


def test_demo_paths_resolve_relative_to_the_file():
    cfg = load_config(str(REPO / "fasttrain" / "demo" / "demo.yaml"))
    assert Path(cfg.model.path, "config.json").exists() and Path(cfg.data.train).exists()


def test_activation_checkpointing_modes_and_the_old_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    for text, mode in (("true", "full"), ("false", "none"), ("selective", "selective"), ("auto", "auto")):
        path.write_text(f"model:\n  activation_checkpointing: {text}\n")
        assert load_config(str(path)).model.activation_checkpointing == mode
    assert load_config(None, ["model.activation_checkpointing=True"]).model.activation_checkpointing == "full"
    cfg = load_config(None, ["model.activation_checkpointing=some", "model.path=m", "data.train=d"])
    with pytest.raises(ConfigError, match="model.activation_checkpointing='some': expected one of"):
        cfg.validate()
    cfg = load_config(None, ["model.activation_checkpointing=selective", "model.compile=true", "model.path=m",
                             "data.train=d"])
    with pytest.raises(ConfigError, match="selective with model.compile=true is not supported"):
        cfg.validate()


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-6", "train.max_steps=3", "model.activation_checkpointing=false",
                             "train.epochs=2", "data.template=alpaca"])
    assert cfg.train.lr == 1e-6 and cfg.train.max_steps == 3 and cfg.train.epochs == 2.0
    assert cfg.model.activation_checkpointing == "none" and cfg.data.template == "alpaca"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  max_steps: 1.5\n", "train.max_steps"),
        ("train:\n  colour: red\n", "unknown key train.colour"),
        ("trainer:\n  lr: 1\n", "unknown section 'trainer'"),
        ("model:\n  activation_checkpointing: 3\n", "true/false"),
        ("- a\n- b\n", "mapping"),
        ("train: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")) as e:
        load_config(str(path))
    assert "bad.yaml" in str(e.value)


def test_validation_messages():
    cfg = load_config(None, ["model.path=m", "data.train=t.jsonl", "train.tokens_per_micro_batch=100"])
    with pytest.raises(ConfigError, match="tokens_per_micro_batch"):
        cfg.validate()
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/x.yaml")
