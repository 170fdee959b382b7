"""The Triton LM-head kernels (DESIGN §4) against a float64 ground truth.

Both implementations run every test: "triton" (fully fused kernels, lm_head_triton) and "chunked" (cuBLAS GEMMs
on vocabulary chunks + Triton epilogues, lm_head_chunked). Without CUDA the small tests run the kernels under
the Triton interpreter (TRITON_INTERPRET=1 is set below, before anything imports them; triton.jit reads it when
it decorates the kernels),
in float32 and float16 only: the interpreter's tl.dot on bfloat16 is broken. Shapes are tiny because the
interpreter is slow. With CUDA the same small tests run compiled on the GPU, plus the `gpu` bf16 test.

Tolerance rule (as DESIGN §7 for the model): the plain reference (fasttrain_kernels.lm_head_torch) in the same dtype
is compared with the same reference in float64; the kernel's error must be within 4x the reference's own error
plus a tiny floor (a few ulps of the compared values' scale).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (CPU runs need the interpreter)

import pytest

pytest.importorskip("triton")

from triton_interpreter import interpreter_problem

from fasttrain_kernels import lm_head_chunked, lm_head_triton
from fasttrain_kernels.lm_head_torch import lm_head_logprobs_torch as lm_head_logprobs
from fasttrain_kernels.ops import (
    lm_head_logprobs_chunked,
    lm_head_logprobs_chunked_op,
    lm_head_logprobs_op,
    lm_head_logprobs_triton,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
FACTOR = 4.0

pytestmark = [
    pytest.mark.skipif(DEV == "cpu" and not (lm_head_triton.INTERPRETED and lm_head_chunked.INTERPRETED),
                       reason="the kernels were imported without TRITON_INTERPRET=1 and there is no GPU"),
    pytest.mark.skipif(DEV == "cpu" and interpreter_problem() is not None, reason=str(interpreter_problem())),
]
# impl name -> (logp entry point, (logp, lse) op, launcher module)
IMPLS = {"triton": (lm_head_logprobs_triton, lm_head_logprobs_op, lm_head_triton),
         "chunked": (lm_head_logprobs_chunked, lm_head_logprobs_chunked_op, lm_head_chunked)}
impls = pytest.mark.parametrize("impl", list(IMPLS))
cpu_only = pytest.mark.skipif(DEV != "cpu", reason="CPU / interpreter behaviour")


def _make(N, D, V, dtype, device=DEV, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * (scale / D ** 0.5)  # logits ~ N(0, scale^2)
    t = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    return h.to(device, dtype), w.to(device, dtype), t.to(device), g.to(device)


def _reference_grads(h, w, t, g, dtype):
    """logp, dh, dW of the plain reference in `dtype` (float64 -> the ground truth)."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    logp = lm_head_logprobs(hh, ww, t)
    (logp * g.to(logp.dtype)).sum().backward()
    return logp.detach(), hh.grad, ww.grad


def _err(x, truth):
    return (x.double() - truth).abs().max().item()


def _assert_close(name, got, ref, truth, dtype):
    ulp = torch.finfo(dtype).eps
    floor = 4 * ulp * max(truth.abs().max().item(), 1e-3) if truth.numel() else 0.0
    e_got, e_ref = _err(got, truth), _err(ref, truth)
    assert e_got <= FACTOR * e_ref + floor, (
        f"{name} ({dtype}): kernel error {e_got:.3g} > {FACTOR} x reference error {e_ref:.3g} + {floor:.3g}")


def _check_all(impl, h, w, t, g, dtype, launch=None):
    """Kernel logp / dh / dW (through the autograd op, or the raw launchers with `launch` kwargs) vs float64."""
    entry, _, module = IMPLS[impl]
    if launch is None:
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        logp = entry(hh, ww, t)
        (logp * g).sum().backward()
        got = (logp.detach(), hh.grad, ww.grad)
    else:
        logp, lse = module.lm_head_fwd(h, w, t, **launch)
        dh, dw = module.lm_head_bwd(g.float(), torch.zeros_like(lse), h, w, t, lse, **launch)
        got = (logp, dh, dw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    truth = _reference_grads(h, w, t, g, torch.float64)
    ref = _reference_grads(h, w, t, g, dtype)
    for name, a, r, tr in zip(("logp", "dh", "dW"), got, ref, truth):
        assert a.shape == tr.shape and torch.isfinite(a).all(), name
        _assert_close(name, a, r, tr, dtype)
    return got, truth


# raw-launcher settings that split the odd shape below into several tiles / chunks, the last one ragged
LAUNCH = {"triton": dict(blocks=dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32)),
          "chunked": dict(chunk_cols_override=37)}


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_odd_shapes_explicit_blocks(impl, dtype):
    N, D, V = 37, 48, 203
    h, w, t, g = _make(N, D, V, dtype)
    t[0], t[1] = 0, V - 1
    _check_all(impl, h, w, t, g, dtype, launch=LAUNCH[impl])


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_odd_shapes_through_op(impl, dtype):
    h, w, t, g = _make(21, 40, 77, dtype, seed=1)
    _check_all(impl, h, w, t, g, dtype)


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_single_row_and_edge_targets(impl, dtype):
    V = 50
    for target in (0, V - 1):
        h, w, t, g = _make(1, 24, V, dtype, seed=2)
        t[0] = target
        _check_all(impl, h, w, t, g, dtype)


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_repeated_rows(impl, dtype):
    h, w, t, g = _make(5, 32, 61, dtype, seed=3)
    h = h[torch.tensor([0, 1, 0, 2, 0, 1, 3, 0, 4, 0], device=DEV)].contiguous()  # same rows many times
    t = t[torch.tensor([0, 1, 0, 2, 3, 1, 3, 0, 4, 0], device=DEV)].contiguous()  # same (row, target) pairs and not
    g = torch.randn(10, generator=torch.Generator().manual_seed(4)).to(DEV)
    (logp, _, _), _ = _check_all(impl, h, w, t, g, dtype)
    same = logp[torch.tensor([0, 2, 7, 9], device=DEV)]
    if impl == "triton" and DEV == "cuda":  # each row's tile computes alone: identical rows give identical bits
        assert (same == same[0]).all()
    else:  # the BLAS GEMM (numpy's, under the Triton interpreter) may block rows differently from call to call
        # on the CPU, by its thread count and load (seen once in CI, fp16): equal up to a few fp32 ulps
        torch.testing.assert_close(same, same[0].expand(4), rtol=8 * torch.finfo(torch.float32).eps, atol=0)


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_zero_upstream_grad(impl, dtype):
    h, w, t, _ = _make(19, 40, 70, dtype, seed=5)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (IMPLS[impl][0](hh, ww, t) * 0.0).sum().backward()
    assert torch.equal(hh.grad, torch.zeros_like(h)) and torch.equal(ww.grad, torch.zeros_like(w))


@impls
def test_lse_output_gradient(impl):
    """The op's second output (lse) is differentiable too: d lse / d logits = softmax."""
    h, w, t, g = _make(9, 24, 45, torch.float32, seed=6)
    g2 = torch.randn(9, generator=torch.Generator().manual_seed(7)).to(DEV)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, lse = IMPLS[impl][1](hh, ww, t)
    (logp * g + lse * g2).sum().backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logits = h64 @ w64.t()
    lse64 = torch.logsumexp(logits, -1)
    lp64 = logits.gather(1, t[:, None]).squeeze(1) - lse64
    (lp64 * g.double() + lse64 * g2.double()).sum().backward()
    torch.testing.assert_close(lse.detach().double(), lse64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=0, atol=1e-5)


@impls
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_tied_embedding_accumulates(impl, dtype):
    """One weight used as the embedding and the head: its grad is the sum of both paths."""
    V, D, T = 40, 32, 12
    gen = torch.Generator().manual_seed(8)
    w0 = (torch.randn(V, D, generator=gen) * 0.5).to(DEV, dtype)
    ids = torch.randint(0, V, (T,), generator=gen).to(DEV)
    rows = torch.tensor([0, 2, 3, 3, 7, 11], device=DEV)
    tgt = torch.tensor([0, V - 1, 5, 5, 9, 1], device=DEV)
    g = torch.randn(len(rows), generator=gen).to(DEV)

    def run(head, w_dtype):
        w = w0.to(w_dtype).clone().requires_grad_()
        h = torch.nn.functional.embedding(ids, w) * 2.0 + 0.1
        logp = head(h.index_select(0, rows), w, tgt)
        (logp * g).sum().backward()
        return logp.detach(), w.grad

    logp, wg = run(IMPLS[impl][0], dtype)
    logp_ref, wg_ref = run(lm_head_logprobs, dtype)
    logp64, wg64 = run(lm_head_logprobs, torch.float64)
    _assert_close("logp", logp, logp_ref, logp64, dtype)
    _assert_close("dW (tied)", wg, wg_ref, wg64, dtype)
    assert wg[ids].abs().sum() > 0  # the embedding path reached the shared weight


@impls
def test_input_checks(impl):
    h, w, t, _ = _make(4, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="hidden size"):
        IMPLS[impl][0](h, w[:, :8].contiguous(), t)
    with pytest.raises(ValueError, match="targets for"):
        IMPLS[impl][0](h, w, t[:3])
    with pytest.raises(TypeError, match="share one dtype"):
        IMPLS[impl][0](h, w.half(), t)
    with pytest.raises(TypeError, match="int64 or int32"):
        IMPLS[impl][0](h, w, t.float())
    with pytest.raises(ValueError, match="contiguous"):
        IMPLS[impl][0](h.t().contiguous().t(), w, t)


@impls
@cpu_only
def test_targets_out_of_range_cpu(impl):
    h, w, t, _ = _make(4, 16, 20, torch.float32)
    with pytest.raises(IndexError, match="out of range"):
        IMPLS[impl][0](h, w, torch.full_like(t, 20))


@impls
@cpu_only
def test_cpu_without_interpreter_is_refused(impl, monkeypatch):
    h, w, t, _ = _make(4, 16, 20, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        IMPLS[impl][0](h, w, t)


@impls
def test_empty_rows(impl):
    h, w, t, _ = _make(0, 16, 20, torch.float32)
    assert IMPLS[impl][0](h, w, t).shape == (0,)


def test_decoder_dispatch():
    from fasttrain_kernels import LM_HEAD_IMPLS

    assert {"triton", "chunked"} <= set(LM_HEAD_IMPLS)


def _truth_chunked(h, w, t, g, chunk=1024):
    """float64 logp, dh, dW without a full [N, V] float64 buffer (closed-form gradient)."""
    w64 = w.double()
    dw = torch.zeros_like(w64)
    logps, dhs = [], []
    for i in range(0, h.shape[0], chunk):
        h64 = h[i:i + chunk].double()
        logits = h64 @ w64.t()
        lse = torch.logsumexp(logits, -1)
        tt = t[i:i + chunk]
        logps.append(logits.gather(1, tt[:, None]).squeeze(1) - lse)
        gg = g[i:i + chunk].double()
        dl = -(logits - lse[:, None]).exp_().mul_(gg[:, None])
        dl[torch.arange(len(tt), device=h.device), tt] += gg
        dhs.append(dl @ w64)
        dw += dl.t() @ h64
        del logits, dl
    return torch.cat(logps), torch.cat(dhs), dw


@impls
@pytest.mark.gpu
def test_gpu_bf16_realistic(impl, record_property):
    N, D, V = 8192, 4096, 152064
    dtype = torch.bfloat16
    h, w, t, g = _make(N, D, V, dtype, device="cuda", seed=9)
    t[0], t[1] = 0, V - 1
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = IMPLS[impl][0](hh, ww, t)
    (logp * g).sum().backward()
    got = (logp.detach(), hh.grad, ww.grad)
    del hh, ww
    ref = _reference_grads(h, w, t, g, dtype)
    torch.cuda.empty_cache()
    truth = _truth_chunked(h, w, t, g)
    for name, a, r, tr in zip(("logp", "dh", "dW"), got, ref, truth):
        assert torch.isfinite(a).all(), name
        record_property(f"{name} error / reference error", round(_err(a, tr) / _err(r, tr), 2))
        _assert_close(name, a, r, tr, dtype)


@impls
@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_kernel_head_matches_torch_head(impl, tied):
    """CausalLM.forward with a kernel LM head gives the torch head's logp and parameter gradients."""
    import numpy as np

    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model
    from fasttrain.packing import build_groups, pack_groups

    cfg = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, rope_theta=10000.0))
    model = build_model(cfg, device=DEV)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = pack_groups(build_groups([np.arange(9)], [np.arange(20, 26)], [np.arange(90, 95)], ["r"]))
    batch = batch.to(DEV)
    out = {}
    for name in ("torch", impl):
        model.zero_grad()
        model.lm_head_impl = name
        logp = model(batch)
        logp.sum().backward()
        out[name] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[impl][0], out["torch"][0], rtol=0, atol=1e-5)
    for g_tri, g_ref in zip(out[impl][1], out["torch"][1]):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-6)


@impls
def test_custom_op_registration_passes_opcheck(impl):
    """torch.library.opcheck: schema, fake (meta) impl, autograd registration and AOT dispatch agree with the
    real kernel, i.e. what torch.compile relies on to trace through the op."""
    h, w, t, _ = _make(7, 24, 45, torch.float32, seed=11)
    op = IMPLS[impl][1]
    torch.library.opcheck(op, (h.requires_grad_(), w.requires_grad_(), t))


@impls
def test_compiled_caller_matches_eager(impl):
    """A torch.compile'd function around the op (fullgraph: no graph break at the op) gives eager's values
    and gradients."""
    h, w, t, g = _make(9, 32, 61, torch.float32, seed=12)
    entry = IMPLS[impl][0]

    def loss(hh, ww):
        return (entry(hh, ww, t) * g).sum()

    out = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, fullgraph=True, backend="aot_eager"))):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        value = fn(hh, ww)
        value.backward()
        out[name] = (value.detach(), hh.grad, ww.grad)
    for a, b in zip(out["compiled"], out["eager"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
