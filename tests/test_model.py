"""Decoder parity with transformers' own models on the same weights (DESIGN §5, §7).

Tolerance rule (DESIGN §7): both our float32 model and transformers' float32 model are compared with
transformers in float64 on the same weights; our error must be within a small factor of transformers'
own float32 error (plus a 1e-7 floor). Logits here are O(1) and transformers' fp32 error is ~1e-6; a
wrong formula (a missing bias, unscaled RoPE, norm order) gives errors of 1e-3 or more.
"""
from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from weights import randomize_

from fasttrain.model.config import ModelConfig, num_params
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import load_hf_weights
from fasttrain.model.hf_layout import to_hf_state_dict
from fasttrain.model.rope import inv_freq
from fasttrain.packing import AttentionMeta, build_groups, pack_groups

VOCAB = 257  # odd on purpose: uneven FSDP rows elsewhere, no accidental power-of-two alignment
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    # Llama-3 scaling with a short original context so all three frequency bands occur at these lengths.
    "llama3_bias": dict(model_type="llama", attention_bias=True, tie_word_embeddings=False,
                        rope_parameters=LLAMA3_ROPE),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2_untied": dict(model_type="qwen2", tie_word_embeddings=False),
    # head_dim set explicitly and != hidden/heads, as real Qwen3 configs do.
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False, attention_bias=False),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=4096, head_dim=16),
}


def hf_model(case: str, seed: int = 0):
    kwargs = {**BASE, **CASES[case]}
    config = transformers.AutoConfig.for_model(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0]


def ours_from_hf(hf, tmp_path, **save_kwargs):
    d = tmp_path / "hf"
    hf.save_pretrained(d, **save_kwargs)
    cfg = ModelConfig.from_model_dir(d)
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    load_hf_weights(model, d)
    return model.eval(), cfg, d


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(ids, torch.arange(len(ids)), AttentionMeta.for_sequences([len(ids)]))


def assert_parity(ours: torch.Tensor, hf32: torch.Tensor, hf64: torch.Tensor) -> None:
    err_ours = (ours.double() - hf64).abs().max().item()
    err_hf = (hf32.double() - hf64).abs().max().item()
    assert err_ours <= 4 * err_hf + 1e-7, f"ours {err_ours:.3g} vs transformers' own fp32 error {err_hf:.3g}"


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, n)).long()


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = hf_model(case)
    hf64 = copy.deepcopy(hf).double()
    ours, cfg, _ = ours_from_hf(hf, tmp_path)
    assert cfg.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = tokens(48, seed=1)
    ref64 = hf_logits(hf64, ids)
    assert_parity(our_logits(ours, ids), hf_logits(hf, ids), ref64)

    # Two sequences packed into one stream (positions restart) equal each run alone.
    a, b = tokens(19, seed=2), tokens(29, seed=3)
    packed = ours.logits(
        torch.cat([a, b]), torch.cat([torch.arange(19), torch.arange(29)]), AttentionMeta.for_sequences([19, 29])
    ).detach()
    for part, seq in ((packed[:19], a), (packed[19:], b)):
        torch.testing.assert_close(part, our_logits(ours, seq), rtol=1e-5, atol=1e-5)
        assert_parity(part, hf_logits(hf, seq), hf_logits(hf64, seq))


def test_sharded_hf_checkpoint_loads_identically(tmp_path):
    hf = hf_model("llama3_bias")
    single, _, _ = ours_from_hf(hf, tmp_path / "a")
    sharded, _, d = ours_from_hf(hf, tmp_path / "b", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_forward_logprobs_prefix_shared_equal_full_sequences(tmp_path):
    """forward(batch) on the prefix-shared layout = log_softmax(transformers' logits) on each full
    sequence prompt+continuation, gathered at the continuation tokens."""
    hf = hf_model("qwen2_tied")
    ours, _, _ = ours_from_hf(hf, tmp_path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, n) for n in (21, 13)]
    chosen = [rng.integers(0, VOCAB, n) for n in (7, 11)]
    rejected = [rng.integers(0, VOCAB, n) for n in (9, 5)]
    batch = pack_groups(build_groups(prompts, chosen, rejected, ["r0", "r1"]))
    with torch.no_grad():
        logp_N = ours(batch)
    assert logp_N.dtype == torch.float32
    expected = []
    for p, c, r in zip(prompts, chosen, rejected):
        for cont in (c, r):
            seq = torch.from_numpy(np.concatenate([p, cont])).long()
            lp_TV = torch.log_softmax(hf_logits(hf, seq).double(), dim=-1)
            rows = torch.arange(len(p) - 1, len(seq) - 1)
            expected.append(lp_TV[rows, seq[len(p):]])
    torch.testing.assert_close(logp_N.double(), torch.cat(expected), rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", ["qwen3", "llama3_bias"])
def test_activation_checkpointing_modes_give_the_same_gradients(tmp_path, case):
    """none / selective / full (and the old booleans): the recomputed forward is the same arithmetic in fp32 on
    the CPU, so every gradient is bit for bit the one without checkpointing."""
    from torch.utils.checkpoint import CheckpointPolicy

    import fasttrain.model.decoder as decoder

    hf = hf_model(case)
    model, _, _ = ours_from_hf(hf, tmp_path)
    model.train()
    batch = pack_groups(build_groups([np.arange(10), np.arange(50, 57)], [np.arange(20, 26), np.arange(60, 63)],
                                     [np.arange(30, 34), np.arange(70, 79)], ["r", "s"]))
    grads, decisions = {}, []
    real_context = decoder._save_matmuls_and_attention

    def recording_context():  # records what selective checkpointing keeps and recomputes
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        saved = decoder._saved_by_selective_checkpointing()

        def policy(ctx, op, *args, **kwargs):
            decisions.append((op, op in saved))
            return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    decoder._save_matmuls_and_attention = recording_context
    try:
        for mode in ("none", "selective", "full", True, False):
            model.zero_grad()
            model.activation_checkpointing = mode
            model(batch).sum().backward()
            grads[mode] = [p.grad.clone() for p in model.parameters()]
    finally:
        decoder._save_matmuls_and_attention = real_context
    for mode in ("selective", "full", True, False):
        for g0, g1 in zip(grads["none"], grads[mode]):
            assert torch.equal(g0, g1), mode
    kept = {str(op) for op, keep in decisions if keep}
    recomputed = {str(op) for op, keep in decisions if not keep}
    assert any("mm" in name for name in kept)  # the projections' outputs are kept
    assert any("mul" in name for name in recomputed)  # norms / RoPE / SwiGLU are recomputed
    with pytest.raises(ValueError, match="activation checkpointing 'some'"):
        decoder.checkpointing_mode("some")


def test_llama3_inv_freq_bit_identical_to_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.for_model(**{**BASE, **CASES["llama3_bias"]})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    cfg = ModelConfig.from_hf_dict(config.to_dict())
    ours = inv_freq(cfg.rope, cfg.head_dim)
    assert torch.equal(ours, theirs)
    # All three bands are exercised: unchanged, divided by factor, smoothed.
    plain = inv_freq(ModelConfig.from_hf_dict({**config.to_dict(), "rope_parameters": {"rope_theta": 500000.0}}).rope, 16)
    ratio = plain / ours
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any() and ((ratio > 1.01) & (ratio < 7.9)).any()


def test_rope_config_old_and_new_spelling_agree():
    old = {**BASE, "model_type": "llama", "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}}}
    new = {**BASE, "model_type": "llama", "rope_parameters": LLAMA3_ROPE}
    assert ModelConfig.from_hf_dict(old).rope == ModelConfig.from_hf_dict(new).rope
    assert ModelConfig.from_hf_dict(old).rope.rope_type == "llama3"
    assert ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "rope_theta": 1e6}).rope.theta == 1e6


@pytest.mark.parametrize("case", ["llama3_bias", "qwen2_tied", "qwen3"])
def test_num_params(case):
    hf = hf_model(case)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    assert num_params(cfg) == sum(p.numel() for p in hf.parameters())
    model = build_model(cfg, device="meta")
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    assert num_params(cfg, include_embeddings=False) == num_params(cfg) - embed * (1 if cfg.tie_word_embeddings else 2)
    # MFU's dense term counts exactly the decoder blocks and the final norm
    from fasttrain.flops import FlopModel

    blocks = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    assert FlopModel.of(cfg).block_params == blocks


@pytest.mark.parametrize("fuse", [False, True])
def test_hf_parameter_names_match(fuse):
    """Unfused, our parameters are transformers' one for one; fused, they are after to_hf_state_dict's split."""
    for case in CASES:
        hf = hf_model(case)
        cfg = dataclasses.replace(ModelConfig.from_hf_dict(hf.config.to_dict()), fuse_projections=fuse)
        ours = build_model(cfg, device="meta")
        named = dict(ours.named_parameters())
        assert any("qkv_proj" in n for n in named) == fuse
        assert {n: tuple(p.shape) for n, p in to_hf_state_dict(named, cfg).items()} == {
            n: tuple(p.shape) for n, p in hf.named_parameters()
        }, case
        assert not list(ours.buffers())


def test_build_model_cpu_init_and_dtype():
    cfg = ModelConfig.from_hf_dict({**BASE, **CASES["qwen2_tied"]})
    a, b = build_model(cfg, "cpu"), build_model(cfg, "cpu")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        if n.endswith("norm.weight"):
            assert torch.all(p == 1)
        elif n.endswith("bias"):
            assert torch.all(p == 0)
        else:
            assert 0.015 < p.std().item() < 0.025, n
    bf = build_model(cfg, "cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert bf.lm_head.weight is bf.model.embed_tokens.weight
    ids = tokens(10, seed=0)
    assert bf.logits(ids, torch.arange(10), AttentionMeta.for_sequences([10])).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------------------
def good_dict(**over):
    return {**BASE, "model_type": "llama", **over}


@pytest.mark.parametrize(
    "d, match",
    [
        (good_dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (good_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'yarn'"),
        (good_dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear'"),
        ({k: v for k, v in good_dict().items() if k != "hidden_size"}, "required key 'hidden_size' is missing"),
        (good_dict(num_hidden_layers="2"), "key 'num_hidden_layers' must be int"),
        (good_dict(rms_norm_eps=True), "key 'rms_norm_eps' must be float"),
        (good_dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (good_dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (good_dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (good_dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "low_freq_factor"),
    ],
)
def test_config_errors(d, match):
    with pytest.raises(ValueError, match=match) as e:
        ModelConfig.from_hf_dict(d, "/x/config.json")
    assert "/x/config.json" in str(e.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_model_dir(tmp_path)


def test_qwen3_and_bias_flags():
    q3 = ModelConfig.from_hf_dict(good_dict(model_type="qwen3", head_dim=32, attention_bias=True))
    assert q3.qk_norm and q3.qkv_bias and q3.o_proj_bias and q3.head_dim == 32
    q2 = ModelConfig.from_hf_dict(good_dict(model_type="qwen2"))
    assert q2.qkv_bias and not q2.o_proj_bias and not q2.qk_norm
    mi = ModelConfig.from_hf_dict(good_dict(model_type="mistral", attention_bias=True))
    assert not mi.qkv_bias and not mi.o_proj_bias  # transformers' Mistral has no biases
    assert ModelConfig.from_hf_dict(good_dict(num_key_value_heads=None)).num_key_value_heads == 4


def test_sliding_window_refused_beyond_window():
    cfg = ModelConfig.from_hf_dict(good_dict(model_type="mistral", sliding_window=16))
    cfg.check_max_length(16)
    with pytest.raises(ValueError, match="sliding_window=16"):
        cfg.check_max_length(17)
    model = build_model(cfg, "cpu")
    model.logits(tokens(16, 0), torch.arange(16), AttentionMeta.for_sequences([16]))
    with pytest.raises(ValueError, match="sliding_window is 16"):
        model.logits(tokens(17, 0), torch.arange(17), AttentionMeta.for_sequences([17]))
    # Qwen2 only windows when use_sliding_window is on.
    assert ModelConfig.from_hf_dict(good_dict(model_type="qwen2", sliding_window=16)).sliding_window is None
    assert ModelConfig.from_hf_dict(
        good_dict(model_type="qwen2", sliding_window=16, use_sliding_window=True)).sliding_window == 16


def test_attention_backend_setting():
    model = build_model(ModelConfig.from_hf_dict(good_dict()), "meta")
    assert model.attention_backend == "reference"
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("auto")
    model.set_attention_backend("flash_attn")
    assert model.attention_backend == "flash_attn"


def test_on_device_init_of_a_bf16_copy_is_the_fp32_init_rounded():
    """Benchmarks draw random weights on the device (init_weights(on_device=True)); a frozen live reference is
    stored in bf16, and must be exactly the fp32 policy's weights rounded, as FSDP's bf16 gather sees them."""
    from fasttrain.model.decoder import build_model

    cfg = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2"})
    policy = build_model(cfg, device="cpu", dtype=torch.float32)
    frozen = build_model(cfg, device="cpu", dtype=torch.bfloat16)
    policy.init_weights(seed=5, on_device=True)
    frozen.init_weights(seed=5, on_device=True)
    for (name, p32), (_, p16) in zip(policy.named_parameters(), frozen.named_parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16, p32.to(torch.bfloat16)), name
    assert policy.model.layers[0].mlp.gate_up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_the_model_registers_no_buffers():
    """assembly.py materialises an offloaded model on the CPU and relies on this: a registered buffer would be
    left in host memory while the forward runs on the GPU (RoPE tables are cached per device instead)."""
    for case in CASES.values():
        model = build_model(ModelConfig.from_hf_dict({**BASE, **case}), device="meta", dtype=torch.float32)
        assert list(model.named_buffers()) == [], case
