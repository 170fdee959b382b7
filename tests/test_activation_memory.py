"""model.activation_checkpointing=auto (fasttrain/activation_memory.py): the activation bytes each mode keeps,
counted from the shapes, and the mode auto picks on three shapes and cards (the card's size is faked)."""
from types import SimpleNamespace

import pytest
import torch

from fasttrain import activation_memory as am
from fasttrain.assembly import resolve_checkpointing
from fasttrain.config import RunConfig
from fasttrain.distributed import DistInfo
from fasttrain.model.config import ModelConfig

BASE = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768}
QWEN2_1P5B = {**BASE, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True}
QWEN2_72B = {**BASE, "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}
GB = 1e9


def test_elements_each_mode_keeps():
    cfg = ModelConfig.from_hf_dict(QWEN2_72B)
    assert [am.saved_elements_per_token(cfg, m) for m in am.MODES_BY_RECOMPUTE] == [169_472, 102_144, 8_192]
    tokens = 1000
    assert am.activation_bytes(cfg, "none", tokens, 2) == 1000 * 80 * 169_472 * 2
    # checkpointing modes also hold one block's full activations while backward recomputes it
    assert am.activation_bytes(cfg, "full", tokens, 2) == 1000 * (80 * 8_192 + 169_472) * 2


def _resolve(monkeypatch, caplog, shape, card_gb, world, **settings):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=card_gb * GB))
    cfg = RunConfig()
    cfg.model.activation_checkpointing, cfg.model.compute_dtype = "auto", "bfloat16"
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    with caplog.at_level("INFO", logger="fasttrain"):
        mode = resolve_checkpointing(cfg, ModelConfig.from_hf_dict(shape), DistInfo(0, world, 0, torch.device("cuda")))
    return mode, caplog.text


def test_auto_keeps_everything_for_1p5b_on_one_h200(monkeypatch, caplog):
    # 16 B x 1.54e9 = 24.7 GB of state; activations of 8192 tokens without recompute ~22 GB: all fits in 141 GB
    mode, text = _resolve(monkeypatch, caplog, QWEN2_1P5B, 141, 1)
    assert mode == "none" and "auto -> none" in text and "fits in the" in text


def test_auto_on_72b_8_h200_compact_state(monkeypatch, caplog):
    # state 10 B x 72.7e9 / 8 = 90.9 GB; gathered blocks + root ~18.7 GB; 85% of 141 GB leaves ~10.2 GB. At the
    # 72B config's 8192 tokens per micro-batch: none ~222 GB, selective ~137 GB, full ~13.5 GB: nothing fits, and
    # the model says so (full is the least memory it has); at 5600 tokens (16 pairs of 350) full needs ~9.2 GB.
    mode, text = _resolve(monkeypatch, caplog, QWEN2_72B, 141, 8, train__optimizer_state="compact",
                          train__tokens_per_micro_batch=8192)
    assert mode == "full" and "does NOT fit even so" in text
    caplog.clear()
    mode, text = _resolve(monkeypatch, caplog, QWEN2_72B, 141, 8, train__optimizer_state="compact",
                          train__tokens_per_micro_batch=5600)
    assert mode == "full" and "full fits" in text


def test_auto_picks_selective_when_it_fits_and_none_does_not(monkeypatch, caplog):
    # 72B, state offloaded to the host: ~101 GB left on a 141 GB card. 1000 tokens: none ~27 GB fits; 8192 tokens:
    # none ~222 GB does not, selective ~137 GB does not, full does; 4000 tokens: selective ~67 GB fits
    results = {}
    for tokens in (1000, 4000, 8192):
        caplog.clear()
        results[tokens], _ = _resolve(monkeypatch, caplog, QWEN2_72B, 141, 8, model__cpu_offload=True,
                                      train__tokens_per_micro_batch=tokens)
    assert results == {1000: "none", 4000: "selective", 8192: "full"}


def test_explicit_modes_and_cpu(caplog):
    cfg = RunConfig()
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    model_cfg = ModelConfig.from_hf_dict(QWEN2_1P5B)
    for setting, mode in (("full", "full"), ("selective", "selective"), (True, "full"), (False, "none")):
        cfg.model.activation_checkpointing = setting
        assert resolve_checkpointing(cfg, model_cfg, cpu) == mode
    cfg.model.activation_checkpointing = "auto"
    with caplog.at_level("INFO", logger="fasttrain"):
        assert resolve_checkpointing(cfg, model_cfg, cpu) == "none"
    assert "on a CPU" in caplog.text
    with pytest.raises(ValueError):
        cfg.model.activation_checkpointing = "sometimes"
        resolve_checkpointing(cfg, model_cfg, cpu)
