"""train.optimizer_state=compact (fasttrain/compact_adamw.py): the fp32 master split exactly into bf16 + int16,
unbiased sharding-independent stochastic rounding of the moments, fp32 AdamW's arithmetic bit for bit when the
moments are kept in fp32, and the recipe's lr-5e-7 updates kept over 50 Step-DPO steps where bf16 weights lose
them, on at most 10 persistent bytes per parameter measured from the tensors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fasttrain.compact_adamw import (
    STATE_BYTES_PER_PARAM,
    CompactAdamW,
    join_fp32,
    split_fp32,
    stochastic_round_bf16,
)


def _awkward_floats(n: int, seed: int) -> torch.Tensor:
    """Normal values over many binades, both signs, plus zeros, subnormals and exact bf16 ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).float())
    tie = torch.tensor([1.0 + 2.0**-8, -(1.0 + 3 * 2.0**-8)])  # halfway between two bf16 neighbours
    return torch.cat([x, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38]), tie])


@pytest.mark.parametrize("seed", [0, 1])
def test_split_join_is_exact_and_the_high_half_is_the_nearest_bf16(seed):
    x = _awkward_floats(100_003, seed)
    high, low = split_fp32(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_fp32(high, low).view(torch.int32), x.view(torch.int32))  # bit for bit, -0.0 included
    # nearest: never farther from x than torch's round-to-nearest-even; they differ only on exact ties (low
    # bits 0x8000), which the high half rounds away from zero
    assert ((high.double() - x.double()).abs() <= (x.bfloat16().double() - x.double()).abs()).all()
    differ = high.view(torch.int16) != x.bfloat16().view(torch.int16)
    assert differ.any() and (low[differ] == -0x8000).all()


def test_stochastic_rounding_is_unbiased_deterministic_and_independent_of_sharding():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4097, generator=gen) * 1e-3
    down = x.bfloat16().float()
    lower = torch.where(down <= x, down, torch.nextafter(down.bfloat16(), torch.tensor(-math.inf).bfloat16()).float())
    draws = torch.stack([stochastic_round_bf16(x, 0, key).float() for key in range(400)])
    # every draw is one of x's two bf16 neighbours
    ulp = (torch.nextafter(lower.bfloat16(), torch.tensor(math.inf).bfloat16()).float() - lower)
    assert ((draws == lower) | (draws == lower + ulp)).all()
    # unbiased: the mean of 400 draws is within 5 standard errors of x for (almost) every element
    p = (x - lower) / ulp
    stderr = ulp * torch.sqrt(p * (1 - p) / 400).clamp_min(1e-12)
    z = (draws.mean(0) - x).abs() / stderr
    assert (z < 5).float().mean() > 0.999
    # deterministic, and a shard that starts at global element 1000 rounds as the whole tensor does there
    assert torch.equal(stochastic_round_bf16(x, 0, 7), stochastic_round_bf16(x, 0, 7))
    assert torch.equal(stochastic_round_bf16(x[1000:2000], 1000, 7), stochastic_round_bf16(x, 0, 7)[1000:2000])
    assert not torch.equal(stochastic_round_bf16(x, 0, 7), stochastic_round_bf16(x, 0, 8))


def test_rounding_bits_do_not_depend_on_chunks_or_shards(monkeypatch):
    """Shards that start and end mid-chunk, with chunks of 64 elements: every element draws the bits the whole
    tensor draws at its global index; and the optimizer's chunked update equals its one-pass update."""
    import fasttrain.compact_adamw as compact

    x = torch.randn(1000, generator=torch.Generator().manual_seed(9)) * 1e-3
    whole = stochastic_round_bf16(x, 0, 5)
    monkeypatch.setattr(compact, "CHUNK", 64)
    for start, end in ((0, 1000), (0, 333), (333, 667), (667, 1000), (100, 101)):
        assert torch.equal(stochastic_round_bf16(x[start:end], start, 5), whole[start:end]), (start, end)

    def train(chunk: int):
        monkeypatch.setattr(compact, "CHUNK", chunk)
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter((torch.randn(50, 7, generator=gen) * 0.02).bfloat16())
        opt = CompactAdamW([p], lr=1e-3)
        for _ in range(3):
            p.grad = (torch.randn(50, 7, generator=gen) * 1e-3).bfloat16()
            opt.step()
        return opt.master_local(p), opt.state[p]["exp_avg_sq"]

    (w64, v64), (w_all, v_all) = train(64), train(1 << 24)
    assert torch.equal(w64, w_all) and torch.equal(v64, v_all)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_moments_reproduce_torch_adamw_bit_for_bit(weight_decay):
    """The reference is torch.optim.AdamW on fp32 weights; with exact moments the compact optimizer must do the
    same arithmetic on the same fp32 master (split into its two halves)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(37, 19), (64,), (5, 3, 7)]
    start = [(torch.randn(s, generator=gen) * 0.02).bfloat16().float() for s in shapes]
    ref = [torch.nn.Parameter(w.clone()) for w in start]
    ours = [torch.nn.Parameter(w.bfloat16()) for w in start]
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt_ref = torch.optim.AdamW(ref, foreach=False, **kwargs)
    opt = CompactAdamW(ours, moment_dtype=torch.float32, **kwargs)
    for _ in range(7):
        grads = [(torch.randn(s, generator=gen) * 1e-2).bfloat16().float() for s in shapes]  # bf16, as FSDP gives
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.bfloat16()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref, ours):
        assert torch.equal(opt.master_local(q), p.detach())
        assert torch.equal(q.detach(), split_fp32(p.detach())[0])


@pytest.mark.parametrize("moment_dtype", [torch.bfloat16, torch.float32])
def test_state_dict_round_trip_keeps_bits_and_dtypes(moment_dtype):
    """torch's Optimizer.load_state_dict would cast the int16 low bits to bf16 by value; resuming from the
    saved state must continue exactly as the uninterrupted optimizer does."""
    gen = torch.Generator().manual_seed(11)
    start = (torch.randn(33, 17, generator=gen) * 0.02).bfloat16()
    grads = [(torch.randn(33, 17, generator=gen) * 1e-3).bfloat16() for _ in range(6)]

    def make():
        p = torch.nn.Parameter(start.clone())
        return p, CompactAdamW([p], lr=1e-3, weight_decay=0.01, moment_dtype=moment_dtype, seed=3)

    p, opt = make()
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved_param, saved_state = p.detach().clone(), copy.deepcopy(opt.state_dict())  # state_dict() shares tensors
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()

    q, resumed = make()
    with torch.no_grad():
        q.copy_(saved_param)
    resumed.load_state_dict(saved_state)
    state = resumed.state[q]
    assert state["low_bits"].dtype == torch.int16 and state["exp_avg"].dtype == moment_dtype
    for g in grads[3:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(resumed.master_local(q), opt.master_local(p))
    for key in ("low_bits", "exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.state[q][key], opt.state[p][key]), key


def test_bf16_parameters_only():
    with pytest.raises(ValueError, match="bf16 parameters"):
        CompactAdamW([torch.nn.Parameter(torch.zeros(3))])


def test_state_bytes_table_matches_the_tensors():
    p = torch.nn.Parameter(torch.zeros(128, 8, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = CompactAdamW([p])
    opt.step()
    tensors = [p, p.grad, *(t for t in opt.state[p].values() if t.dim() > 0)]
    assert sum(t.nbytes for t in tensors) / p.numel() == STATE_BYTES_PER_PARAM["compact"] == 10


# ----------------------------------------------------------------------------------------------
# The recipe on a small Qwen2-shaped model: 50 Step-DPO steps at lr 5e-7, beta 0.4
# ----------------------------------------------------------------------------------------------
class _Rows(list):
    def write(self, row):
        self.append(row)

    def __bool__(self):  # an empty log is still a logger
        return True


def _train_recipe(tmp_path, optimizer_state: str, plain_bf16: bool = False, exact_moments: bool = False):
    """(run, its 50 logged rows, the initial fp32 weights by name). ``plain_bf16``: bf16 weights trained by
    torch's AdamW (bf16 weights and moments, round to nearest): what 'just use bf16' would do.
    ``exact_moments``: compact weights with fp32 moments, i.e. fp32 AdamW's arithmetic on the compact forward."""
    from cli_runner import DEMO

    from fasttrain import distributed as fdist
    from fasttrain.assembly import build_run, check_inputs
    from fasttrain.compact_adamw import master_local
    from fasttrain.config import load_config
    from fasttrain.trainer import TrainLoop

    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join((DEMO / "data" / "train.jsonl").read_text().splitlines(True)[:50]))
    cfg = load_config(str(DEMO / "demo.yaml"), [
        f"data.train={data}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'out'}", "train.lr=5e-7", "loss.beta=0.4", "train.max_steps=50",
        "train.global_batch_pairs=1", "train.tokens_per_micro_batch=1024", "train.log_every=1",
        "train.progress_bar=false", f"train.optimizer_state={optimizer_state}",
        # fp32 compute: the gradient is then a smooth function of the weights. In bf16 compute this 0.9M-param
        # model's trajectory is chaotic at the 5% level: two compact runs differing only in their
        # stochastic-rounding bits end 5.5% apart, as far as compact and fp32 are (measured).
        "model.compute_dtype=float32",
    ])
    cfg.validate()
    dist_info = fdist.init_distributed()
    torch.manual_seed(cfg.train.seed)
    inputs = check_inputs(cfg, dist_info)
    run = build_run(cfg, dist_info, inputs)
    initial = {n: master_local(run.optimizer, p, n).clone() for n, p in run.model.named_parameters()}
    if plain_bf16 or exact_moments:
        run.optimizer = (torch.optim.AdamW(run.params, lr=cfg.train.lr, weight_decay=0.0, foreach=False) if plain_bf16
                         else CompactAdamW(run.params, lr=cfg.train.lr, seed=cfg.train.seed, moment_dtype=torch.float32))
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, run.scheduler.lr_lambdas[0])
    rows = _Rows()
    TrainLoop.from_run(run, rows).run(inputs.plans, len(inputs.plans))
    return run, rows, initial


def _update(run, initial) -> torch.Tensor:
    from fasttrain.compact_adamw import master_local

    return torch.cat([(master_local(run.optimizer, p, n) - initial[n]).flatten()
                      for n, p in run.model.named_parameters()])


def _final_margins(run) -> torch.Tensor:
    """Per-pair reward margins (pi_c - pi_r) - (ref_c - ref_r) of the trained fp32 master weights (what the
    export writes), computed by a plain fp32 copy of the model over every training pair."""
    from fasttrain.export import gather_master_weights
    from fasttrain.model.decoder import build_model
    from fasttrain.plan import plan_inference
    from fasttrain.reference_logps import compute_pair_logps

    model = build_model(run.model.config, device="cpu", dtype=torch.float32)
    model.set_attention_backend(run.inputs.backend)
    model.load_state_dict(gather_master_weights(run.model, run.optimizer, is_main=True))
    groups = run.inputs.train_groups
    n_pairs = sum(g.num_pairs for g in groups)
    with torch.no_grad():
        policy = compute_pair_logps(model, plan_inference(groups, 1, 1024)[0], n_pairs, torch.device("cpu"))
    reference = run.refs.train.table_P2  # precomputed by the initial weights
    return (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])


def test_recipe_updates_are_kept_by_compact_state_and_lost_by_bf16_weights(tmp_path):
    fp32_run, fp32_rows, initial = _train_recipe(tmp_path, "fp32")
    compact_run, compact_rows, initial_c = _train_recipe(tmp_path, "compact")
    bf16_run, _, _ = _train_recipe(tmp_path, "compact", plain_bf16=True)
    exact_run, _, _ = _train_recipe(tmp_path, "compact", exact_moments=True)
    assert all(torch.equal(initial[n], initial_c[n]) for n in initial)  # the same start (a bf16 checkpoint)
    ref = _update(fp32_run, initial)
    def error(run):
        return ((_update(run, initial) - ref).norm() / ref.norm()).item()
    assert error(compact_run) <= 0.01, error(compact_run)  # measured 0.59% (0.42% of it vs fp32 moments)
    assert error(bf16_run) >= 0.5, error(bf16_run)  # measured 99.9%: lr 5e-7 is below half a bf16 unit
    assert len(fp32_rows) == len(compact_rows) == 50

    # The trained models (the fp32 masters, as exported) score alike: per-pair reward margins after 50 steps.
    # The state's own error, against fp32 moments on the same forward: <= 1% (measured 0.02%). Against the fp32
    # run: <= 10% (measured 4.8%, the same with fp32 moments): under model.compute_dtype=float32 the fp32 run's
    # forward reads its fp32 weights, the compact run's its bf16 ones; with bf16 compute (CUDA) both read the
    # same bf16 rounding of the master. The bf16-weight model barely moved from policy == reference (margin 0).
    m_fp32, m_compact, m_bf16, m_exact = (_final_margins(r) for r in (fp32_run, compact_run, bf16_run, exact_run))
    def relative(m, ref):
        return ((m - ref).norm() / ref.norm()).item()
    assert m_fp32.norm() > 0
    assert relative(m_compact, m_exact) <= 0.01, relative(m_compact, m_exact)
    assert relative(m_compact, m_fp32) <= 0.10, relative(m_compact, m_fp32)
    assert relative(m_bf16, m_fp32) >= 0.5, relative(m_bf16, m_fp32)

    # the HF export writes the joined fp32 masters, and auto picks float32 since bf16 would lose the update
    from safetensors.torch import load_file

    from fasttrain.compact_adamw import master_local
    from fasttrain.export import export_hf

    report = export_hf(compact_run.model, compact_run.cfg, tmp_path / "export", compact_run.dist, False,
                       compact_run.optimizer)
    assert report.dtype == "float32" and report.update_error["bfloat16"] > 0.5
    exported = load_file(tmp_path / "export" / "model.safetensors")
    for name, p in compact_run.model.named_parameters():
        if name in exported:  # a tied LM head is written once, as the embedding
            assert torch.equal(exported[name], master_local(compact_run.optimizer, p, name)), name

    # persistent state measured from the tensors, with the gradient of one more micro-batch in place
    from fasttrain.trainer import run_micro_batch

    run = compact_run
    groups = run.inputs.plans[0].micro_batches[0][0]
    run_micro_batch(run.model, run.refs.train, groups, run.dist.device, run.cfg, 1, run.flop_model, True)
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    n = sum(local(p).numel() for p in run.params)
    state_bytes = sum(local(p).nbytes + local(p.grad).nbytes for p in run.params)
    state_bytes += sum(local(t).nbytes for p in run.params for t in run.optimizer.state[p].values() if t.dim())
    assert state_bytes / n <= 10, state_bytes / n
    assert all(p.grad is not None and local(p.grad).dtype == torch.bfloat16 for p in run.params)


def test_an_fp32_checkpoint_starts_from_its_bf16_rounding_with_its_own_reference(tmp_path, caplog):
    """A float32 source: compact starts from its bf16 rounding (said once), and the precomputed reference is
    that starting point's, not an fp32-state run's table from the same cache (first loss exactly ln 2)."""
    import shutil

    from cli_runner import DEMO
    from safetensors.torch import load_file, save_file

    from fasttrain import distributed as fdist
    from fasttrain.assembly import build_run, check_inputs
    from fasttrain.config import load_config
    from fasttrain.trainer import TrainLoop

    source = tmp_path / "fp32-model"
    shutil.copytree(DEMO / "model", source)
    gen = torch.Generator().manual_seed(0)
    weights = {k: v.float() * (1 + 1e-3 * torch.randn(v.shape, generator=gen))  # not bf16-representable
               for k, v in load_file(source / "model.safetensors").items()}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join((DEMO / "data" / "train.jsonl").read_text().splitlines(True)[:8]))
    first_losses = {}
    for state in ("fp32", "compact"):
        cfg = load_config(str(DEMO / "demo.yaml"), [
            f"model.path={source}", f"data.train={data}", "data.eval=", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1", "train.global_batch_pairs=4",
            "train.tokens_per_micro_batch=1024", "train.progress_bar=false", f"train.optimizer_state={state}"])
        cfg.validate()
        dist_info = fdist.init_distributed()
        with caplog.at_level("WARNING", logger="fasttrain"):
            run = build_run(cfg, dist_info, check_inputs(cfg, dist_info))
        rows = _Rows()
        TrainLoop.from_run(run, rows).run(run.inputs.plans, 1)
        first_losses[state] = rows[0]["loss"]
    assert "holds F32 weights; training starts from them rounded to bfloat16" in caplog.text
    assert first_losses["compact"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_losses["fp32"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.gpu
def test_compact_adamw_on_cuda_rounds_like_the_cpu_and_matches_torch_adamw():
    """On the device: the fp32 split round-trips bit for bit and equals the CPU's; the stochastic-rounding bits
    equal the CPU's (int32 wrap-around, so a run resumed on other hardware rounds the same); with fp32 moments
    three steps equal torch.optim.AdamW's bit for bit."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=gen) * torch.exp2(torch.randint(-30, 30, (1 << 20,), generator=gen).float())
    high, low = split_fp32(x.to(dev))
    assert torch.equal(join_fp32(high, low).cpu().view(torch.int32), x.view(torch.int32))
    assert torch.equal(high.cpu().view(torch.int16), split_fp32(x)[0].view(torch.int16))
    assert torch.equal(stochastic_round_bf16(x.to(dev), 12345, 7).cpu().view(torch.int16),
                       stochastic_round_bf16(x, 12345, 7).view(torch.int16))
    start = (torch.randn(1000, 257, generator=gen) * 0.02).bfloat16()
    ref, ours = torch.nn.Parameter(start.float().to(dev)), torch.nn.Parameter(start.to(dev))
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_ref = torch.optim.AdamW([ref], foreach=False, **kwargs)
    opt = CompactAdamW([ours], moment_dtype=torch.float32, **kwargs)
    for _ in range(3):
        g = (torch.randn(1000, 257, generator=gen) * 1e-3).bfloat16().to(dev)
        ref.grad, ours.grad = g.float(), g
        opt_ref.step()
        opt.step()
    assert torch.equal(opt.master_local(ours), ref.detach())
