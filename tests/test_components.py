"""benchmarks/components.py: a profiled step's self times put in roofline.py's groups, by rules tested here on
the op and range names the profiler reports, and end to end on a real CPU profile of the decoder."""
import numpy as np
import pytest
import torch
from cli_runner import load_benchmark

from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.packing import build_groups, pack_groups


@pytest.fixture(scope="module")
def comp():
    load_benchmark("roofline")
    return load_benchmark("components")


@pytest.mark.parametrize("chain,group", [
    (["aten::mul", "Optimizer.step#AdamW.step"], "optimizer step"),
    (["aten::copy_", "FSDP::all_gather_copy_in", "FSDP::pre_forward"], "FSDP2"),
    (["ncclDevKernel_AllGather_RING_LL"], "FSDP2"),
    (["c10d::allgather_"], "FSDP2"),
    (["aten::mm", "fasttrain.lm_head"], "LM head"),
    (["fasttrain::lm_head_chunked_backward", "autograd::engine::evaluate_function: backward"], "LM head"),
    (["aten::softmax", "fasttrain.attention"], "attention"),
    (["aten::_flash_attention_backward", "autograd::engine::evaluate_function: FlashBackward"], "attention"),
    (["aten::addmm", "autograd::engine::evaluate_function: AddmmBackward0"], "block GEMMs"),
    (["aten::mm"], "block GEMMs"),
    (["aten::silu"], "element-wise and norms"),
])
def test_classify(comp, chain, group):
    assert comp.classify(chain) == group


def test_a_profiled_training_pass_is_split_into_its_groups(comp):
    """The decoder's forward + backward on the CPU: attention and the LM head are found by their ranges, GEMMs by
    their ops, and the groups add up to every op's self time."""
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        rms_norm_eps=1e-6, tie_word_embeddings=True))
    model = build_model(cfg, "cpu").train()
    rng = np.random.default_rng(0)
    batch = pack_groups(build_groups([rng.integers(0, 300, 40)], [rng.integers(0, 300, 9)],
                                     [rng.integers(0, 300, 7)], ["r"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(batch).sum().backward()
        opt.step()
    groups = comp.measured_groups(prof, on_cuda=False)
    for group in ("block GEMMs", "attention", "element-wise and norms", "LM head", "optimizer step"):
        assert groups[group] > 0, (group, groups)
    assert groups["FSDP2"] == 0  # a plain module
    total = sum(e.self_cpu_time_total for e in prof.events()) * 1e-6
    assert sum(groups.values()) == pytest.approx(total)
    table = comp.format_comparison(groups, None, 1, 1.0, None, on_cuda=False)
    assert "no prediction" in table and "CPU timings are not GPU claims" in table
