"""How the models are sharded and what a forward leaves behind, on two gloo ranks; and the GPU memory plan.

* A frozen model (the live reference) never runs backward, and FSDP2 frees the root's and a keep-after-forward
  block's gathered parameters only in backward: so it must reshard every module after forward, or each GPU
  holds the embedding, LM head and last block unsharded for the whole run.
* A batch moved to the device carries its cu_seqlens as host lists through FSDP2's per-block rebuild of the
  inputs, so the reference attention backend never reads them back from the GPU (a sync per layer there).
* A reference log-prob table found in rank 0's cache reaches every rank, also where the cache directory is
  node-local (the other nodes have no such file).
* The memory plan counts the trainable model's state and a live reference's shards together.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_runner import DEMO, free_port

from fasttrain.assembly import check_memory_plan
from fasttrain.config import RunConfig
from fasttrain.distributed import DistInfo
from fasttrain.errors import UserError
from fasttrain.model.config import ModelConfig, num_params
from fasttrain.model.decoder import build_model
from fasttrain.packing import AttentionMeta, PairRef, PromptGroup, pack_groups

TINY = json.loads((DEMO / "model" / "config.json").read_text())


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    groups = []
    for p, conts in [(13, [6, 9]), (20, [4, 7, 5])]:
        continuations = [rng.integers(0, TINY["vocab_size"], c) for c in conts]
        pairs = [PairRef(len(groups), f"g{len(groups)}", 0, j) for j in range(1, len(conts))]
        groups.append(PromptGroup(rng.integers(0, TINY["vocab_size"], p), continuations, pairs))
    return pack_groups(groups)


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fasttrain.distributed import reshard_all, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # the host lists are read from the copy to() made, never recomputed from (device) tensors
        recomputed = []
        original = AttentionMeta.host_cu_seqlens

        def counting(self):
            recomputed.append(self._host_cu is None)
            return original(self)

        AttentionMeta.host_cu_seqlens = counting
        for frozen in (True, False):
            model = build_model(ModelConfig.from_hf_dict(TINY), device="meta")
            model.set_attention_backend("reference")
            shard_model(model, torch.float32, frozen=frozen)
            model.to_empty(device="cpu")
            model.reset_buffers()
            model.init_weights(seed=1)
            model.eval()
            for seed in range(2):
                with torch.no_grad():
                    model(_batch(seed).to("cpu"))
                gathered = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
                if frozen:
                    assert gathered == [], (rank, gathered)
                else:  # the trainable model keeps the root for backward; reshard_all frees it after no-grad use
                    assert gathered, rank
                    reshard_all(model)
                    assert all(isinstance(p, DTensor) for p in model.parameters()), rank
        assert recomputed and not any(recomputed), (rank, recomputed)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_frozen_model_reshards_after_forward_and_batches_keep_their_host_cu_seqlens():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def _cache_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from fasttrain.reference_logps import load_or_compute_table

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        key = {"model": "m", "tokens": "t"}
        table = torch.arange(10, dtype=torch.float32).reshape(5, 2)
        node_local = Path(root) / f"node{rank}" / "ref.pt"  # only node 0's directory will hold the file

        def compute():
            return table.clone()

        first, cached = load_or_compute_table(node_local, key, compute, rank == 0, torch.device("cpu"))
        assert not cached and torch.equal(first, table)
        assert node_local.exists() == (rank == 0)

        def must_not_run():
            raise AssertionError("a cache hit on rank 0 must not recompute")

        again, cached = load_or_compute_table(node_local, key, must_not_run, rank == 0, torch.device("cpu"))
        assert cached and torch.equal(again, table), rank
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cached_reference_table_reaches_ranks_whose_cache_dir_is_node_local(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_cache_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# Memory plan (CUDA only in a run: the card's size is faked here)
# ----------------------------------------------------------------------------------------------
QWEN2_72B = {**TINY, "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "tie_word_embeddings": False}


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80e9))


def _plan(world: int, offload: bool, reference: str, optimizer_state: str = "fp32") -> None:
    cfg = RunConfig()
    cfg.model.cpu_offload, cfg.model.compute_dtype, cfg.loss.reference = offload, "bfloat16", reference
    cfg.train.optimizer_state = optimizer_state
    check_memory_plan(ModelConfig.from_hf_dict(QWEN2_72B), cfg, DistInfo(0, world, 0, torch.device("cuda")))


def test_72b_on_8_gpus_needs_offload(h100):
    with pytest.raises(UserError, match=r"16 bytes/param training state.*model.cpu_offload=true"):
        _plan(8, offload=False, reference="precompute")
    _plan(8, offload=True, reference="precompute")
    _plan(8, offload=True, reference="live")  # 2 bytes/param of frozen shards: ~18 GB per GPU
    _plan(32, offload=False, reference="precompute")  # 16 x 72.7e9 / 32 = 36 GB


def test_72b_on_one_h200_node_fits_with_compact_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=141e9))
    # fp32: 16 x 72.7e9 / 8 = 145 GB > 85% of 141 GB = 120 GB; compact: 10 x 72.7e9 / 8 = 91 GB fits
    with pytest.raises(UserError, match=r"16 bytes/param.*train.optimizer_state=compact"):
        _plan(8, offload=False, reference="precompute")
    _plan(8, offload=False, reference="precompute", optimizer_state="compact")
    # + a live reference's 2 B/param: 109 GB, still within 120 GB
    _plan(8, offload=False, reference="live", optimizer_state="compact")
    # on 80 GB cards compact alone (91 GB per GPU) does not fit 8 GPUs either
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80e9))
    with pytest.raises(UserError, match=r"10 bytes/param training state \(train.optimizer_state=compact\)"):
        _plan(8, offload=False, reference="precompute", optimizer_state="compact")


def test_the_live_reference_counts_with_the_training_state(h100):
    # 32 GPUs: 16 B/param alone is 36 GB (fits 85% of 80 GB = 68 GB); a live reference adds 4.5 GB: still fits.
    _plan(32, offload=False, reference="live")
    # 18 GPUs: 16 B/param is 64.6 GB (fits); with the reference's 2 B/param, 72.7 GB does not
    _plan(18, offload=False, reference="precompute")
    with pytest.raises(UserError, match=r"16 bytes/param training state .*\+ 2 bytes/param live reference"):
        _plan(18, offload=False, reference="live")


def test_no_plan_off_cuda():
    cfg = RunConfig()
    check_memory_plan(ModelConfig.from_hf_dict(QWEN2_72B), cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def test_lora_plans_the_frozen_base_and_the_adapters(monkeypatch):
    """LoRA: the base frozen in bf16 (2 B/param) + the adapters' fp32 state; Qwen2-72B on one 8 x 80 GB node fits
    without offload (18 GB per GPU for the base), and the live reference adds nothing (it is the same model)."""
    from fasttrain.assembly import lora_params, state_bytes

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80e9))
    cfg = RunConfig()
    cfg.model.compute_dtype, cfg.model.lora_rank, cfg.loss.reference = "bfloat16", 64, "live"
    model_cfg = ModelConfig.from_hf_dict(QWEN2_72B)
    adapters = lora_params(model_cfg, cfg)
    D, F, q, kv, L = 8192, 29568, 8192, 1024, 80
    assert adapters == 64 * L * ((D + q) + 2 * (D + kv) + (q + D) + 2 * (D + F) + (F + D))
    policy, reference, what = state_bytes(model_cfg, cfg)
    assert reference == 0 and policy == pytest.approx(2 * num_params(model_cfg) + 16 * adapters)
    assert "frozen base 2 bytes/param" in what
    check_memory_plan(model_cfg, cfg, DistInfo(0, 8, 0, torch.device("cuda")))
    with pytest.raises(UserError, match=r"frozen base 2 bytes/param"):  # but not on one GPU
        check_memory_plan(model_cfg, cfg, DistInfo(0, 1, 0, torch.device("cuda")))
    cfg.model.cpu_offload = True  # FSDP2 offloads every sharded parameter, the frozen base too: nothing on the GPU
    assert state_bytes(model_cfg, cfg)[:2] == (0, 0.0)
    check_memory_plan(model_cfg, cfg, DistInfo(0, 1, 0, torch.device("cuda")))
