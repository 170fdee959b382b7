"""HF checkpoint loading (plain and FSDP2-sharded) and saving (DESIGN §5)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from cli_runner import free_port

from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import load_hf_weights, resolve_model_source, save_hf_checkpoint
from fasttrain.packing import AttentionMeta, pack_unshared

VOCAB = 101  # odd: FSDP rank 1 gets one row fewer than rank 0
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
CASES = {
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "llama_untied_bias": dict(model_type="llama", tie_word_embeddings=False, attention_bias=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=8),
}


def make_hf_dir(path, case: str, seed: int = 0, **save_kwargs):
    config = transformers.AutoConfig.for_model(**{**BASE, **CASES[case]})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model.save_pretrained(path, **save_kwargs)
    return model.eval()


def load_ours(path, dtype=torch.float32):
    model = build_model(ModelConfig.from_model_dir(path), "meta", dtype)
    model.to_empty(device="cpu")
    load_hf_weights(model, path)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def our_logits(model, ids):
    with torch.no_grad():
        return model.logits(ids, torch.arange(len(ids)), AttentionMeta.for_sequences([len(ids)]))


IDS = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, 40)).long()


# ----------------------------------------------------------------------------------------------
# Save -> transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_save_reload_in_transformers_identical(case, tmp_path):
    hf = make_hf_dir(tmp_path / "src", case)
    ours = load_ours(tmp_path / "src")
    cfg = ours.config
    out = save_hf_checkpoint(ours.state_dict(), cfg, tmp_path / "out", dtype=torch.float32)
    keys = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)
    assert not list(tmp_path.glob("out.tmp-*"))
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["dtype"] == "float32" and saved_cfg["architectures"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert torch.equal(hf_logits(reloaded, IDS), hf_logits(hf, IDS))
    for n, p in hf.state_dict().items():
        assert torch.equal(p, reloaded.state_dict()[n]), n


def test_save_bf16_sharded_with_tokenizer_dir(tmp_path):
    make_hf_dir(tmp_path / "src", "llama_untied_bias")
    ours = load_ours(tmp_path / "src")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "unrelated.txt").write_text("x")
    out = save_hf_checkpoint(ours.state_dict(), ours.config, tmp_path / "out", tokenizer_dir=tok, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in ours.parameters())
    assert (out / "tokenizer.json").is_file() and not (out / "unrelated.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    # transformers and we load the same bf16 weights into fp32 and agree on the logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ours_bf = load_ours(out)
    torch.testing.assert_close(our_logits(ours_bf, IDS), hf_logits(reloaded, IDS), rtol=1e-5, atol=1e-5)
    for n, p in ours_bf.named_parameters():
        assert torch.equal(p, ours.state_dict()[n].bfloat16().float()), n


def test_save_is_atomic_and_refuses_existing(tmp_path):
    make_hf_dir(tmp_path / "src", "qwen2_tied")
    ours = load_ours(tmp_path / "src")
    out = tmp_path / "out"
    save_hf_checkpoint(ours.state_dict(), ours.config, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_checkpoint(ours.state_dict(), ours.config, out)
    # A failure mid-write leaves the previous checkpoint untouched and no temporary directory.
    bad = dict(ours.state_dict())
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        save_hf_checkpoint(bad, ours.config, out, overwrite=True)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf_checkpoint(ours.state_dict(), ours.config, out, tokenizer=BrokenTokenizer(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert load_ours(out) is not None
    save_hf_checkpoint(ours.state_dict(), ours.config, out, overwrite=True, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    sd = dict(ours.state_dict())
    del sd["model.layers.1.mlp.gate_up_proj.weight"]  # a fused projection; the error names HF's first piece
    with pytest.raises(KeyError, match="model.layers.1.mlp.gate_proj.weight"):
        save_hf_checkpoint(sd, ours.config, tmp_path / "x")


# ----------------------------------------------------------------------------------------------
# Load errors
# ----------------------------------------------------------------------------------------------
def test_load_errors(tmp_path):
    src = tmp_path / "src"
    make_hf_dir(src, "llama_untied_bias")
    cfg = ModelConfig.from_model_dir(src)
    tensors = load_file(src / "model.safetensors")

    def variant(name, tensors_, cfg_over=None):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors_, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg.hf_dict, **(cfg_over or {})}))
        return d

    missing = variant("missing", {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.bias"})
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias.*model\.safetensors|model\.safetensors.*k_proj\.bias"):
        load_ours(missing)
    extra = variant("extra", {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
                              "model.layers.0.mlp.extra.weight": torch.ones(2)})
    with pytest.raises(KeyError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_ours(extra)
    harmless = variant("harmless", {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    load_ours(harmless)
    shape = variant("shape", tensors, {"intermediate_size": 64})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(80, 48\), the model expects \(64, 48\)"):
        load_ours(shape)
    # Tied checkpoint that still carries lm_head.weight: accepted, the embedding is the head.
    tied = variant("tied", tensors, {"tie_word_embeddings": True})
    m = load_ours(tied)
    assert torch.equal(m.lm_head.weight, tensors["model.embed_tokens.weight"])
    # Untied config but no lm_head in the file.
    no_head = variant("nohead", {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_ours(no_head)


def test_resolve_model_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(tmp_path / "nope")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_model_source(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        resolve_model_source(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        resolve_model_source(d)


def test_load_bf16_checkpoint_into_fp32_and_bf16(tmp_path):
    hf = make_hf_dir(tmp_path / "src", "qwen3")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m32 = load_ours(tmp_path / "bf16", torch.float32)
    m16 = load_ours(tmp_path / "bf16", torch.bfloat16)
    for (n, p32), p16 in zip(m32.named_parameters(), m16.parameters()):
        assert p32.dtype == torch.float32 and p16.dtype == torch.bfloat16
        assert torch.equal(p32, p16.float()), n


# ----------------------------------------------------------------------------------------------
# FSDP2 on two gloo ranks
# ----------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, port: int, model_dirs: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        rng = np.random.default_rng(1)
        seqs = [rng.integers(0, VOCAB, n) for n in (23, 17)]
        batch = pack_unshared(seqs, [5, 9])
        for d in model_dirs:
            plain = load_ours(d)
            sharded = build_model(ModelConfig.from_model_dir(d), "meta")
            for layer in sharded.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
            sharded.to_empty(device="cpu")
            load_hf_weights(sharded, d)
            if sharded.config.tie_word_embeddings:
                assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
            ref = plain.state_dict()
            for n, p in sharded.named_parameters():
                local = p.to_local()
                assert local.shape[0] < p.shape[0], f"{n} is not sharded"
                assert torch.equal(p.full_tensor(), ref[n]), f"rank {rank}: {n} differs after sharded load"
            with torch.no_grad():
                torch.testing.assert_close(sharded(batch), plain(batch), rtol=0, atol=1e-6)
            # The root keeps its parameters unsharded after a forward; writing into those all-gathered
            # copies would be lost, so it is refused until reshard() puts the DTensors back.
            try:
                sharded.init_weights(seed=3)
                raise AssertionError("writing into unsharded FSDP parameters was not refused")
            except RuntimeError as e:
                assert "reshard()" in str(e)
            sharded.reshard()
            # Backward through the sharded blocks with activation checkpointing: same gradients
            # (every rank runs the same batch, so FSDP's average over ranks is that gradient).
            for m, ckpt in ((plain, False), (sharded, True)):
                m.train()
                m.activation_checkpointing = ckpt
                m(batch).sum().backward()
            ref_grads = {n: p.grad for n, p in plain.named_parameters()}
            for n, p in sharded.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
            sharded.zero_grad()
            sharded.eval()
            # Sharded init_weights draws the same full tensors as unsharded init.
            sharded.init_weights(seed=3)
            plain.init_weights(seed=3)
            for n, p in sharded.named_parameters():
                assert torch.equal(p.full_tensor(), plain.state_dict()[n]), f"rank {rank}: init {n}"
        # both ranks past their last collective before either tears gloo down. Likely cause of one CI abort
        # (rank 1 SIGABRT, "terminate called without an active exception"; 6 local reruns passed): a rank
        # destroying the group while its peer still has the last all-gather in flight.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Seen again after the barrier (1 of ~10 runs, 2026-12-02): gloo's teardown itself aborted. Every check has
    # passed here, so the worker leaves without running it; exit code 0 is what mp.spawn checks.
    os._exit(0)


def test_fsdp2_sharded_load_two_gloo_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dirs = []
    for case, kw in (("qwen2_tied", {}), ("llama_untied_bias", {"max_shard_size": "30KB"})):
        make_hf_dir(tmp_path / case, case, **kw)
        dirs.append(str(tmp_path / case))
    assert (tmp_path / "llama_untied_bias" / "model.safetensors.index.json").is_file()
    mp.spawn(_fsdp_worker, args=(2, free_port(), dirs), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# The demo model shipped in fasttrain/demo/model
# ----------------------------------------------------------------------------------------------
def test_demo_model_loads_and_matches_transformers(tmp_path):
    from pathlib import Path

    import fasttrain

    demo = Path(fasttrain.__file__).parent / "demo" / "model"
    if not (demo / "model.safetensors").is_file():
        pytest.skip("demo model not generated (python tools/demo/make_demo_model.py)")
    cfg = ModelConfig.from_model_dir(demo)
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings and cfg.vocab_size % 64 == 0
    ours = load_ours(demo)
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32, attn_implementation="eager")
    ids = torch.arange(0, cfg.vocab_size, 17)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=1e-5, atol=1e-5)
    if (demo / "tokenizer.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(demo)
        assert len(tok) <= cfg.vocab_size
        out = save_hf_checkpoint(ours.state_dict(), cfg, tmp_path / "out", tokenizer=tok)
        assert len(transformers.AutoTokenizer.from_pretrained(out)) == len(tok)
