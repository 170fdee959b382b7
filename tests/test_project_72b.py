"""benchmarks/project_72b.py: the projection on hand-computable inputs, and --smoke end to end on the CPU."""
import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import load_benchmark

REPO = Path(__file__).resolve().parents[1]
GIB = 2.0**30


@pytest.fixture(scope="module")
def pj():
    return load_benchmark("project_72b")


# A 10-block model of 1e9 params per block and no root: P = 1e10, easy to count bytes of.
def shape(pj, layers=10, per_layer=10**9, root=0):
    return pj.ParamCounts(layers, layers * per_layer + root, per_layer, root, 1024, 1000)


def measured(pj, tokens=1000, rows=100, recompute=True, fwd=1e-3, bwd=2e-3, saved=0.0, transient=0.0):
    return pj.Measured(tokens, rows, recompute, fwd, bwd, fwd, 5e-4, 2e-4, saved, transient, 0.0)


FAST = {"nvlink_gbps": 1e9, "ib_gbps_per_gpu": 1e9, "pcie_gbps": 1e9, "reserve_gib": 0.0}  # transfers ~free


def recipe(pj, **kw):
    # 80 pairs x 100 tokens / 8 GPUs = 1000 tokens per GPU per step: one micro-batch; 800 pairs = 10 steps
    base = {"pairs": 800, "epochs": 1, "global_batch": 80, "token_budget": 1000, "tokens_per_pair": 100.0,
            "lm_rows_per_pair": 10.0}
    return pj.Recipe(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
def test_official_step_count(pj):
    assert pj.optimizer_steps(10795, 128, 4) == 4 * math.ceil(10795 / 128) == 340


def test_qwen2_72b_shape(pj):
    s = pj.ParamCounts.of(pj.benchlib.model_config("qwen2-72b"))
    # q, o 8192^2 each; k, v 8192 x 1024 each; q/k/v biases; SwiGLU 3 x 8192 x 29568; two norms
    per_layer = 2 * 8192**2 + 2 * 8192 * 1024 + (8192 + 2 * 1024) + 3 * 8192 * 29568 + 2 * 8192
    assert s.params_layer == per_layer == 877_684_736
    assert s.params_root == 2 * 152064 * 8192 + 8192  # embedding, untied LM head, final norm
    assert s.params_total == 80 * per_layer + s.params_root == 72_706_203_648  # DESIGN §6: 72.7B


def test_collective_time_is_bytes_over_bus_bandwidth(pj):
    one_node = pj.Cluster(8, nvlink_gbps=400.0)
    assert pj.collective_s(8e9, one_node) == pytest.approx(8e9 * 7 / 8 / 400e9)
    # 4 nodes: the ring crosses node boundaries over 8 NICs of 25 GB/s = 200 GB/s < NVLink
    four_nodes = pj.Cluster(32, gpus_per_node=8, nvlink_gbps=400.0, ib_gbps_per_gpu=25.0)
    assert pj.bus_bandwidth(four_nodes) == pytest.approx(200e9)
    assert pj.collective_s(8e9, four_nodes) == pytest.approx(8e9 * 31 / 32 / 200e9)
    assert pj.collective_s(8e9, pj.Cluster(1)) == 0.0


def test_compute_bound_step(pj):
    sh, r = shape(pj), recipe(pj)
    c = pj.Cluster(8, hbm_gbps=3000.0, **FAST)
    p = pj.project(sh, [measured(pj)], c, r, pj.Strategy(adam_bytes_per_param=84.0))
    assert (p.steps, p.micro_batches, p.tokens_per_micro) == (10, 1, 1000.0)
    assert not p.offload
    assert p.step.layers_compute == pytest.approx(10 * (1e-3 + 2e-3))
    assert p.step.lm_head_compute == pytest.approx(5e-4)  # 1000 tokens / 100 per pair x 10 rows = 100 rows
    assert p.step.exposed_comm == pytest.approx(0.0, abs=1e-6)
    assert p.step.optimizer == pytest.approx(1e10 / 8 * 84 / 3000e9)  # AdamW on the GPU at HBM speed
    comp = p.components_s
    assert sum(comp.values()) == pytest.approx(p.total_s)
    assert comp[next(k for k in comp if k.startswith("decoder"))] == pytest.approx(10 * 0.03)
    assert p.dominant.startswith("optimizer")  # 0.35 s vs 0.30 s of layers


def test_comm_bound_step_follows_the_overlap_model(pj):
    sh, r = shape(pj), recipe(pj)
    # bf16 gather of a 1e9-param block = 2e9 B x 7/8 at 175 GB/s = 10 ms; fp32 reduce-scatter = 20 ms
    c = pj.Cluster(8, nvlink_gbps=175.0, reserve_gib=0.0)
    p = pj.project(sh, [measured(pj)], c, r, pj.Strategy())
    assert p.step.ag_layer == pytest.approx(0.010) and p.step.rs_layer == pytest.approx(0.020)
    fwd = 0.010 + 10 * max(1e-3, 0.010)  # first gather exposed, then one block per max(compute, gather)
    bwd = 10 * max(2e-3, 0.010 + 0.020) + 0.020  # AG + RS share the link; the last RS is exposed
    compute = 10 * 3e-3 + 5e-4
    assert p.step.exposed_comm == pytest.approx(fwd + bwd + 5e-4 - compute)


def test_offload_chosen_when_the_plan_exceeds_the_card(pj):
    sh, r = shape(pj), recipe(pj)
    # on the GPU: 16 B x 1e10 / 8 = 2e10 B state + 10 B x 1e9 blocks in flight = 3e10 B = 27.9 GiB
    big = pj.Cluster(8, card_gib=40.0, **FAST)
    p = pj.project(sh, [measured(pj)], big, r, pj.Strategy())
    assert not p.offload and p.memory.peak_bytes == pytest.approx(3e10) and p.memory.fits
    small = pj.Cluster(8, card_gib=20.0, **{**FAST, "pcie_gbps": 20.0, "host_gbps_per_node": 400.0})
    q = pj.project(sh, [measured(pj)], small, r, pj.Strategy(adam_bytes_per_param=84.0))
    assert q.offload and q.memory.fits and q.memory.peak_bytes == pytest.approx(1e10)
    assert q.memory.host_bytes_per_node == pytest.approx(16 * 1e10)  # all 8 ranks' state on one host
    assert q.step.h2d_layer == pytest.approx(4 * 1e9 / 8 / 20e9)  # fp32 shard before every gather
    assert q.step.optimizer == pytest.approx(1e10 / 8 * 84 / (400e9 / 8))  # CPU AdamW at the host's share
    assert any("host memory" in n for n in q.notes)
    forced = pj.project(sh, [measured(pj)], small, r, pj.Strategy(offload="off"))
    assert not forced.offload and not forced.memory.fits and any("does not fit" in n for n in forced.notes)
    with pytest.raises(ValueError, match="offload"):
        pj.project(sh, [measured(pj)], big, r, pj.Strategy(offload="maybe"))


def test_compact_state_counts_10_bytes_per_param_and_halves_offload_copies(pj):
    sh, r = shape(pj), recipe(pj)
    # 10 B x 1e10 / 8 = 1.25e10 B state + 1e10 B blocks in flight = 2.25e10 B: fits 24 GiB, where fp32's 3e10 B
    # does not
    card = pj.Cluster(8, card_gib=24.0, **{**FAST, "pcie_gbps": 20.0})
    fp32 = pj.project(sh, [measured(pj)], card, r, pj.Strategy())
    compact = pj.project(sh, [measured(pj)], card, r, pj.Strategy(optimizer_state="compact"))
    assert fp32.offload and not compact.offload and compact.memory.fits
    assert compact.memory.peak_bytes == pytest.approx(2.25e10)
    offloaded = pj.project(sh, [measured(pj)], card, r, pj.Strategy(offload="on", optimizer_state="compact"))
    assert offloaded.memory.host_bytes_per_node == pytest.approx(10 * 1e10)
    assert offloaded.step.h2d_layer == pytest.approx(2 * 1e9 / 8 / 20e9)  # bf16 shard before every gather
    assert offloaded.step.d2h_layer == pytest.approx(2 * 1e9 / 8 / 20e9)  # bf16 grad shard after the RS


def test_qwen2_72b_state_fits_one_h200_node_only_when_compact(pj):
    """The state alone, without activations: 72.7B params x 16 B / 8 = 135 GiB > 140.4 GiB - blocks in flight;
    x 10 B / 8 = 85 GiB."""
    sh = pj.ParamCounts.of(pj.benchlib.model_config("qwen2-72b"))
    name, gib, hbm = pj.CARDS["h200"]
    node = pj.Cluster(8, card_gib=gib, hbm_gbps=hbm, card=name)
    mb = pj.scale(measured(pj), 1000, 100)
    assert not pj.memory_plan(sh, node, mb, False, "fp32").fits
    plan = pj.memory_plan(sh, node, mb, False, "compact")
    assert plan.fits and plan.items[next(iter(plan.items))] == pytest.approx(10 * sh.params_total / 8)


def test_predicted_layers_follow_the_flop_count(pj):
    """--predict-mfu: no GPU, every number a labelled prediction from FLOPs at a given fraction of the ceiling."""
    cfg = pj.benchlib.model_config("qwen2-72b")
    r = pj.Recipe(tokens_per_pair=350.0, lm_rows_per_pair=90.0)
    rows = pj.predicted_measurements(cfg, r, [5600], 0.5, 800.0)
    on, off = rows
    assert on.recompute and not off.recompute and "PREDICTED" in on.memory_source
    per_layer = pj.ParamCounts.of(cfg).params_layer
    attended = (260**2 / 2 + 2 * 45 * (260 + 22.5)) / 350  # keys per token of a 260 + 45 + 45 pair
    fwd = (2 * per_layer * 5600 + 4 * cfg.q_dim * attended * 5600) / 400e12
    assert on.layer_fwd_s == pytest.approx(fwd) and on.layer_bwd_s == pytest.approx(3 * fwd)
    assert off.layer_bwd_s == pytest.approx(2 * fwd)
    assert on.lm_head_train_s == pytest.approx(6 * 8192 * 152064 * 1440 / 400e12)  # 5600 / 350 * 90 rows
    assert on.act_saved_bytes_per_layer == 2 * 5600 * 8192 < off.act_saved_bytes_per_layer


def test_every_micro_batch_pays_its_reduce_scatter(pj):
    """The trainer reduce-scatters after every micro-batch: two micro-batches of 500 tokens expose twice the
    per-micro-batch communication of one, and no unsharded fp32 gradient appears in the memory plan."""
    sh, m = shape(pj), measured(pj, tokens=500, rows=50)
    slow = dict(FAST, nvlink_gbps=1.0)  # communication-bound, so the exposed part is visible
    one = pj.project(sh, [m], pj.Cluster(8, **slow), recipe(pj, global_batch=40, token_budget=500), pj.Strategy())
    two = pj.project(sh, [m], pj.Cluster(8, **slow), recipe(pj, token_budget=500), pj.Strategy())
    assert (one.micro_batches, two.micro_batches) == (1, 2) and one.tokens_per_micro == two.tokens_per_micro
    assert one.step.exposed_comm > 0
    assert two.step.exposed_comm == pytest.approx(2 * one.step.exposed_comm)
    assert not any("unsharded" in k for k in two.memory.items)


def test_reference_pass_is_forward_only_once_over_the_data(pj):
    sh, r = shape(pj), recipe(pj)
    p = pj.project(sh, [measured(pj)], pj.Cluster(8, **FAST), r, pj.Strategy())
    # 800 pairs x 100 tokens / 8 GPUs = 10 micro-batches of 1000 tokens: 10 blocks x 1 ms + LM head 0.2 ms
    assert p.reference_s == pytest.approx(10 * (10 * 1e-3 + 2e-4), rel=1e-6)


def test_pick_and_scale(pj):
    ms = [measured(pj, tokens=t, fwd=t * 1e-6) for t in (1000, 4000)] + [measured(pj, tokens=1000, recompute=False)]
    assert pj.pick(ms, 1500, True).tokens == 1000 and pj.pick(ms, 3000, True).tokens == 4000
    assert pj.pick(ms, 3000, False).recompute is False
    assert pj.scale(ms[0], 2000, 200).fwd == pytest.approx(2e-3)  # linear in tokens
    with pytest.raises(ValueError, match="tokens per pair"):
        pj.project(shape(pj), ms, pj.Cluster(8), recipe(pj, tokens_per_pair=2000.0), pj.Strategy())


def test_synth_batch_is_prefix_shared_and_within_budget(pj):
    b = pj.synth_batch(600, (50, 100), (5, 20), vocab=1000)
    assert 0 < b.num_tokens <= 600 and b.num_pairs >= 4
    assert b.attn.num_segments == 2 * b.num_pairs and not b.attn.kv_is_identity  # [P|C] and [P]+R per pair
    assert b.lp_rows_N.numel() == int(b.cont_lengths_M.sum())
    with pytest.raises(ValueError, match="smaller than one pair"):
        pj.synth_batch(10, (50, 100), (5, 20), vocab=1000)


# ---------------------------------------------------------------------------------------------
def test_smoke_end_to_end(pj, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["--smoke", "--layers", "1", "--warmup", "0", "--reps", "1", "--tokens", "128", "--json", str(out)]
    assert pj.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert sorted(m["recompute"] for m in res["measured"]) == [False, True]
    for m in res["measured"]:
        assert m["tokens"] <= 128 and m["layer_fwd_s"] > 0 and m["layer_bwd_s"] > 0 and m["lm_head_train_s"] > 0
        assert m["act_saved_bytes_per_layer"] > 0
    assert [p["n_gpus"] for p in res["projections"]] == [8, 32]
    assert all(p["steps"] == 340 for p in res["projections"])
    assert res["projections"][0]["micro_batches"] == 3  # 128 x 48 / 8 = 768 tokens in 256-token micro-batches
    for text in ("== 8 x H100", "== 32 x H100", "dominant:", "official ~20 h on 8 x A100", "memory per GPU",
                 "target <= 1 h on 8 x H100", "assumptions:"):
        assert text in printed
    # re-projection from the saved measurements gives the same totals
    assert pj.main(["--smoke", "--from-json", str(out), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [p["total_s"] for p in again["projections"]] == pytest.approx([p["total_s"] for p in res["projections"]])


def test_unknown_lm_head_is_refused(pj, capsys):
    assert pj.main(["--smoke", "--lm-head", "nope"]) == 2
    assert "--lm-head 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_full_run_needs_cuda(pj, capsys):
    assert pj.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_72b_layers_on_gpu(pj, tmp_path):
    out = tmp_path / "m.json"
    assert pj.main(["--layers", "1", "--tokens", "2048", "--warmup", "1", "--reps", "3", "--json", str(out)]) == 0
    m = json.loads(out.read_text())["measured"]
    assert all(x["memory_source"] == "cuda allocator" and x["act_saved_bytes_per_layer"] > 0 for x in m)
