"""Fused q/k/v and gate/up projections (fasttrain/model/hf_layout.py, DESIGN §5.6): the same model as the per-module
one, loaded from and written to HF files under transformers' names.

Tolerance rule as in test_model.py: gradients of the fused and the unfused fp32 model are both compared with the
unfused model in float64 on the same weights; the fused error must be within a small factor of the unfused fp32
model's own error.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_model import BASE, CASES, assert_parity, hf_logits, hf_model, our_logits, tokens

from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import hf_reader, load_hf_weights, save_hf_checkpoint
from fasttrain.model.hf_layout import hf_pieces, to_hf_state_dict
from fasttrain.packing import build_groups, pack_groups

transformers = pytest.importorskip("transformers")


def ours_from(d, fuse: bool, dtype=torch.float32):
    cfg = dataclasses.replace(ModelConfig.from_model_dir(d), fuse_projections=fuse)
    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device="cpu")
    load_hf_weights(model, d)
    return model


def test_rows_of_a_fused_parameter_for_every_shard_boundary(tmp_path):
    """HFReader.rows reads rows [start, end) of the stacked tensor for every start < end, wherever the pieces
    begin and end (FSDP2 puts shard boundaries anywhere; pieces of 5, 3 and 3 rows here)."""
    cfg = ModelConfig.from_hf_dict({**CASES["qwen2_untied"], "vocab_size": 11, "hidden_size": 4,
                                    "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 5,
                                    "num_key_value_heads": 1, "head_dim": 2, "rms_norm_eps": 1e-6})
    name = "model.layers.0.self_attn.qkv_proj.weight"
    pieces = hf_pieces(cfg, name, cfg.q_dim + 2 * cfg.kv_dim)
    assert [p.end - p.start for p in pieces] == [10, 2, 2]
    rng = torch.Generator().manual_seed(7)
    hf = {p.hf_name: torch.randn(p.end - p.start, 4, generator=rng) for p in pieces}
    (tmp_path / "config.json").write_text("{}")
    save_file(hf, str(tmp_path / "model.safetensors"))
    stacked = torch.cat([hf[p.hf_name] for p in pieces])
    with hf_reader(tmp_path) as reader:
        for start in range(len(stacked)):
            for end in range(start + 1, len(stacked) + 1):
                assert torch.equal(reader.rows(pieces, start, end), stacked[start:end]), (start, end)


@pytest.mark.parametrize("case", ["qwen2_untied", "llama3_bias", "qwen3"])
def test_fused_init_draws_the_unfused_weights(case):
    """init_weights draws a fused parameter piece by piece in HF order: the same model for one seed."""
    cfg = ModelConfig.from_hf_dict({**BASE, **CASES[case]})
    fused = build_model(dataclasses.replace(cfg, fuse_projections=True), "cpu")
    plain = build_model(dataclasses.replace(cfg, fuse_projections=False), "cpu")
    fused.init_weights(seed=11)
    plain.init_weights(seed=11)
    split = to_hf_state_dict(dict(fused.named_parameters()), fused.config)
    assert split.keys() == dict(plain.named_parameters()).keys()
    for n, p in plain.named_parameters():
        assert torch.equal(split[n], p), n


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("case", ["qwen2_untied", "qwen3"])
def test_fused_gradients_equal_unfused(tmp_path, case, recompute):
    """Same HF weights, same packed prefix-shared batch, a random weighting of the log-probs: the fused model's
    gradient (split back into HF tensors) is the unfused model's, measured against the unfused model in fp64."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    models = {"fused": ours_from(tmp_path / "hf", True), "unfused": ours_from(tmp_path / "hf", False),
              "fp64": ours_from(tmp_path / "hf", False, torch.float64)}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 257, n) for n in (17, 9, 30)]
    chosen = [rng.integers(0, 257, n) for n in (6, 11, 4)]
    rejected = [rng.integers(0, 257, n) for n in (8, 3, 12)]
    batch = pack_groups(build_groups(prompts, chosen, rejected, ["a", "b", "c"]))
    weights_R = torch.from_numpy(rng.standard_normal(len(batch.lp_targets_N)))
    grads = {}
    for key, model in models.items():
        model.train()
        model.activation_checkpointing = recompute
        (model(batch).double() * weights_R).sum().backward()
        grads[key] = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.config)
    assert grads["fused"].keys() == grads["fp64"].keys()
    for name, g64 in grads["fp64"].items():
        err_fused = (grads["fused"][name].double() - g64).abs().max().item()
        err_unfused = (grads["unfused"][name].double() - g64).abs().max().item()
        scale = g64.abs().max().item()
        assert err_fused <= 4 * err_unfused + 1e-7 * scale, f"{name}: fused {err_fused:.3g}, unfused {err_unfused:.3g}"


def test_unfused_model_keeps_parity_with_transformers(tmp_path):
    """model.fuse_projections=false is the per-module layout, with transformers' logits (the fused default is
    checked on every case in test_model.py)."""
    hf = hf_model("llama3_bias")
    hf.save_pretrained(tmp_path / "hf")
    ours = ours_from(tmp_path / "hf", False).eval()
    assert hasattr(ours.model.layers[0].self_attn, "q_proj")
    ids = tokens(40, seed=4)
    assert_parity(our_logits(ours, ids), hf_logits(hf, ids), hf_logits(hf.double(), ids))


def test_fused_weights_round_trip_through_hf_files(tmp_path):
    """HF files -> fused model -> save -> transformers and both layouts load the same tensors bit for bit."""
    hf = hf_model("qwen2_untied")
    hf.save_pretrained(tmp_path / "hf")
    fused = ours_from(tmp_path / "hf", True)
    out = save_hf_checkpoint(dict(fused.state_dict()), fused.config, tmp_path / "out", dtype=torch.float32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for n, p in hf.state_dict().items():
        assert torch.equal(p, reloaded.state_dict()[n]), n
    again = ours_from(out, True)
    for (n, p), q in zip(fused.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    plain = ours_from(out, False)  # the per-module layout reads the same files: the split tensors, bit for bit
    split = to_hf_state_dict(dict(fused.state_dict()), fused.config)
    assert split.keys() == plain.state_dict().keys()
    for n, t in plain.state_dict().items():
        assert torch.equal(t, split[n]), n


@pytest.mark.parametrize("fuse", [True, False])
def test_block_linears_is_the_models_linear_layers(fuse):
    """hf_layout.block_linears, the map loading, saving and LoRA read, names every linear layer of a block with its
    real input and output widths."""
    from fasttrain.model.hf_layout import block_linears

    for case in CASES:
        cfg = dataclasses.replace(ModelConfig.from_hf_dict({**BASE, **CASES[case]}), fuse_projections=fuse)
        layer = build_model(cfg, device="meta").model.layers[0]
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears.keys() == block_linears(cfg).keys(), case
        for name, (in_features, pieces) in block_linears(cfg).items():
            assert (linears[name].in_features, linears[name].out_features) == (
                in_features, sum(rows for _, rows in pieces)), (case, name)
