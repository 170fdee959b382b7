"""benchmarks/roofline.py: the speed-of-light model on hand-countable inputs, ceilings from gpu_check's output,
and the report end to end (every number labelled PREDICTED)."""
import json
from dataclasses import replace

import pytest
from cli_runner import load_benchmark


@pytest.fixture(scope="module")
def rl():
    return load_benchmark("roofline")


def test_geometry_of_prefix_sharing_and_padding(rl):
    w = rl.Workload("tiny", gpus=2, pairs_per_step=8, prompt_tokens=100.0, step_tokens=10.0, micro_batches=2)
    tokens, rows, attended = rl.geometry(w, rl.FASTTRAIN)  # 2 pairs per GPU per micro-batch
    assert tokens == 2 * (100 + 20) and rows == 2 * 20
    assert attended == 2 * (100 * 100 / 2 + 2 * 10 * (100 + 5))
    tokens, rows, attended = rl.geometry(w, replace(rl.TRL, padding_factor=1.5))
    assert tokens == 2 * 2 * 110 * 1.5 and rows == tokens  # prompt twice, padded, logits on every token
    assert attended == 2 * 2 * (110 * 1.5) ** 2 / 2


def test_each_component_is_its_flops_or_its_bytes_whichever_is_slower(rl):
    card = rl.Card("test", bf16_tflops=100.0, hbm_gbps=1000.0, bus_gbps=100.0)
    w = rl.Workload("tiny", 1, 4, 64.0, 8.0, recompute=False)
    p = rl.predict(w, rl.FASTTRAIN, card)
    names = [c.name for c in p.components]
    assert not any(n.startswith("recompute") for n in names) and not any("all-gather" in n for n in names)
    assert "FSDP2 copy-in/out around the collectives" in names  # at any world size
    for c in p.components:
        assert c.seconds == pytest.approx(max(c.flops / 100e12, c.bytes / 1000e9))
    assert p.step_s == pytest.approx(sum(c.seconds for c in p.components))
    assert p.pairs_per_s == pytest.approx(4 / p.step_s)
    cfg = rl.benchlib.model_config("tiny")
    p_layer = rl.layer_params(cfg)
    tokens = 4 * (64 + 16)
    fwd = next(c for c in p.components if c.name == "block GEMMs, forward")
    assert fwd.flops == pytest.approx(2 * p_layer * tokens * cfg.num_hidden_layers)
    opt = next(c for c in p.components if c.name.startswith("optimizer"))
    assert opt.bytes == pytest.approx(40 * rl.num_params(cfg))
    with_recompute = rl.predict(replace(w, recompute=True), rl.FASTTRAIN, card)
    assert with_recompute.step_s > p.step_s


def test_compact_state_costs_its_optimizer_traffic_and_gpus_add_communication(rl):
    card = rl.CARDS["h200"]
    base = rl.Workload("qwen2-72b", 8, 128, 260.0, 45.0)
    fp32, compact = rl.predict(base, rl.FASTTRAIN, card), rl.predict(replace(base, optimizer="compact"), rl.FASTTRAIN,
                                                                     card)
    opt = {p.workload.optimizer: next(c for c in p.components if c.name.startswith("optimizer")) for p in (fp32, compact)}
    assert opt["compact"].bytes / opt["fused"].bytes == pytest.approx(448 / 40)
    comm = next(c for c in fp32.components if "FSDP2" in c.name)
    assert comm.seconds > 0 and comm.bytes > 0


def test_padding_factor_of_uniform_lengths(rl):
    assert rl.trl_padding_factor((100, 100), (10, 10)) == pytest.approx(1.0)
    assert 1.3 < rl.trl_padding_factor() < 1.7  # 16 sequences of U[96,512] + U[16,128]


def test_ceilings_from_gpu_check_and_flags(rl, tmp_path):
    report = tmp_path / "gpu_check.json"
    report.write_text(json.dumps({"stages": [{"key": "env", "data": {"bf16_tflops": 700.0, "copy_gbps": 4000.0}}]}))
    args = rl.argparse.Namespace(card="h200", ceilings=str(report), peak_tflops=None, hbm_gbps=None, bus_gbps=None)
    card = rl.card_from(args)
    assert (card.bf16_tflops, card.hbm_gbps, card.name) == (700.0, 4000.0, "H200")
    assert rl.card_from(replace_ns(args, peak_tflops=650.0)).bf16_tflops == 650.0


def replace_ns(ns, **kw):
    return type(ns)(**{**vars(ns), **kw})


def test_report_is_labelled_predicted_and_checked_against_trl(rl, capsys):
    assert rl.main(["--card", "h100"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    assert headers and all(h.startswith("== PREDICTED") for h in headers)
    assert len(headers) == len(rl.scenarios())
    assert "took 1.17 s per 16-pair step" in out and "measured / predicted" in out


def test_every_component_has_one_group_and_the_groups_add_up_to_the_step(rl):
    for card in rl.CARDS.values():
        for _title, w, s in rl.scenarios():
            p = rl.predict(w, s, card)
            assert sum(rl.predicted_groups(p.components).values()) == pytest.approx(p.step_s)
    with pytest.raises(ValueError, match="belongs to no group"):
        rl.group_of("something else")


def test_recompute_modes_live_reference_and_fused_projections(rl):
    """selective recomputes only the element-wise work; a live reference adds a forward in each group but the
    optimizer's; separate projections move more bytes in the block GEMMs (the input read 5 times, not 2)."""
    card = rl.CARDS["h100"]
    cfg = rl.benchlib.model_config("qwen2-1.5b")
    g = rl.Geometry(tokens=8000.0, rows=2000.0, attended=2e6, micro_batches=1)

    def names(**kw):
        args = dict(recompute="none", optimizer="fused", s=rl.FASTTRAIN, live_reference=False) | kw
        return {c.name: c for c in rl.components(cfg, g, 1, args["recompute"], args["optimizer"], args["s"], card,
                                                  live_reference=args["live_reference"])}

    none, selective, full = names(), names(recompute="selective"), names(recompute="full")
    assert not [n for n in none if n.startswith("recompute")]
    assert [n for n in selective if n.startswith("recompute")] == ["recompute: element-wise and norms"]
    assert {n for n in full if n.startswith("recompute")} == {
        "recompute: block GEMMs", "recompute: attention", "recompute: element-wise and norms"}
    live = names(live_reference=True)
    assert {rl.group_of(n) for n in live if n.startswith("live reference")} == {
        "block GEMMs", "attention", "element-wise and norms", "LM head"}
    separate = names(s=replace(rl.FASTTRAIN, fused_projections=False))
    extra = separate["block GEMMs, forward"].bytes - none["block GEMMs, forward"].bytes
    assert extra == pytest.approx(2 * 8000 * 3 * cfg.hidden_size * cfg.num_hidden_layers)
    assert separate["block GEMMs, forward"].flops == none["block GEMMs, forward"].flops
