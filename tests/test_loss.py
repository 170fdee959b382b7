"""Loss and metrics from the packed, prefix-shared path equal a separate plain implementation:
transformers' own model on right-padded, unpacked [prompt+step] rows, TRL-style formulas written out."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fasttrain.loss import (
    MetricSums,
    PairLogps,
    continuation_logps,
    dpo_pair_losses,
    metric_sums,
    pair_logps,
)
from fasttrain.packing import build_groups, pack_groups


def tiny_hf_model(seed: int, vocab: int = 97):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init so log-probs differ visibly between models
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def to_fasttrain(hf_model, tmp_path, name):
    from fasttrain.model.config import ModelConfig
    from fasttrain.model.decoder import build_model
    from fasttrain.model.hf_checkpoint import load_hf_weights

    d = tmp_path / name
    hf_model.save_pretrained(d, safe_serialization=True)
    model = build_model(ModelConfig.from_model_dir(d), device="meta")
    model.to_empty(device="cpu")
    model.reset_buffers()
    load_hf_weights(model, d)
    return model.eval()


def random_pairs(rng, n, vocab):
    prompts, chosens, rejecteds = [], [], []
    shared_prompt = rng.integers(0, vocab, size=9)
    shared_rejected = rng.integers(0, vocab, size=4)
    for i in range(n):
        if i < 3:  # three pairs share prompt and rejected step (several continuations per prompt)
            prompts.append(shared_prompt)
            rejecteds.append(shared_rejected)
        else:
            prompts.append(rng.integers(0, vocab, size=int(rng.integers(1, 20))))
            rejecteds.append(rng.integers(0, vocab, size=int(rng.integers(1, 8))))
        chosens.append(rng.integers(0, vocab, size=int(rng.choice([1, rng.integers(1, 8)]))))
    return prompts, chosens, rejecteds


def plain_padded_logps(hf_model, prompts, steps, pad_id=0):
    """Sum of log p(step tokens | prompt) per row with right padding and an attention mask."""
    rows = [np.concatenate([p, s]) for p, s in zip(prompts, steps)]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)] = torch.as_tensor(r)
        attn[i, : len(r)] = 1
        labels[i, len(p) : len(r)] = torch.as_tensor(r[len(p) :])
    with torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=attn).logits.double()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    picked = logp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_packed_loss_and_metrics_equal_plain_padded(tmp_path, loss_type, label_smoothing):
    rng = np.random.default_rng(11)
    vocab, beta = 97, 0.3
    policy_hf, ref_hf = tiny_hf_model(1, vocab), tiny_hf_model(2, vocab)
    policy, ref = to_fasttrain(policy_hf, tmp_path, "policy"), to_fasttrain(ref_hf, tmp_path, "ref")
    prompts, chosens, rejecteds = random_pairs(rng, 8, vocab)

    # fasttrain: one prefix-shared packed batch
    groups = build_groups(prompts, chosens, rejecteds, [f"r{i}" for i in range(8)])
    batch = pack_groups(groups)
    assert batch.num_continuations < 16  # the shared rejected step is computed once
    with torch.no_grad():
        cont_pol = continuation_logps(policy(batch), batch.lp_cont_N, batch.num_continuations)
        cont_ref = continuation_logps(ref(batch), batch.lp_cont_N, batch.num_continuations)
    pc, pr = pair_logps(cont_pol, batch.chosen_cont_B, batch.rejected_cont_B)
    rc, rr = pair_logps(cont_ref, batch.chosen_cont_B, batch.rejected_cont_B)
    order = np.argsort(batch.pair_index_B.numpy())  # packed order -> dataset order
    if loss_type == "ipo":
        lens = batch.cont_lengths_M.float()
        lc, lr = lens[batch.chosen_cont_B], lens[batch.rejected_cont_B]
        logps = PairLogps(pc / lc, pr / lr, rc / lc, rr / lr)
    else:
        logps = PairLogps(pc, pr, rc, rr)
    losses = dpo_pair_losses(logps, beta, loss_type, label_smoothing)[order].double()
    report = MetricSums.report(metric_sums(PairLogps(pc, pr, rc, rr), losses.float(), beta).as_vector())

    # plain: transformers on padded rows, float64 formulas written out
    pol_c, len_c = plain_padded_logps(policy_hf, prompts, chosens)
    pol_r, len_r = plain_padded_logps(policy_hf, prompts, rejecteds)
    ref_c, _ = plain_padded_logps(ref_hf, prompts, chosens)
    ref_r, _ = plain_padded_logps(ref_hf, prompts, rejecteds)
    if loss_type == "ipo":
        h = (pol_c - ref_c) / len_c - (pol_r - ref_r) / len_r
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        h = (pol_c - ref_c) - (pol_r - ref_r)
        expected = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing

    # Tolerance: float32 rounding of sums of ~10-30 log-probs of magnitude ~5 (|sum| <= 200): the
    # float32 model's own error vs float64 is ~1e-5 relative; 1e-4 absolute on logps leaves 10x room.
    torch.testing.assert_close(pc[order].double(), pol_c, rtol=0, atol=1e-4)
    torch.testing.assert_close(rr[order].double(), ref_r, rtol=0, atol=1e-4)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
    rew_c, rew_r = beta * (pol_c - ref_c), beta * (pol_r - ref_r)
    assert report["loss"] == pytest.approx(expected.mean().item(), rel=1e-4, abs=1e-5)
    assert report["rewards/chosen"] == pytest.approx(rew_c.mean().item(), abs=1e-4)
    assert report["rewards/rejected"] == pytest.approx(rew_r.mean().item(), abs=1e-4)
    assert report["rewards/margins"] == pytest.approx((rew_c - rew_r).mean().item(), abs=1e-4)
    assert report["rewards/accuracies"] == pytest.approx((rew_c > rew_r).double().mean().item())
    assert report["logps/chosen"] == pytest.approx(pol_c.mean().item(), abs=1e-4)
    assert report["logps/rejected"] == pytest.approx(pol_r.mean().item(), abs=1e-4)


def test_policy_equal_reference_gives_ln2():
    x = torch.randn(5) * 30
    y = torch.randn(5) * 30
    losses = dpo_pair_losses(PairLogps(x, y, x, y), beta=0.5)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2.0)))


def test_unknown_loss_type_is_named():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_pair_losses(PairLogps(x, x, x, x), beta=0.1, loss_type="hinge2")
