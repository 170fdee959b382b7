"""Whole-model check from records to log-probs: the packed, prefix-shared batch gives the same per-pair
log-probs as running every prompt+step sequence alone — with several continuations of one prompt, an
empty ``initial_reason_steps`` and one-token steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fasttrain.assembly import load_tokenizer
from fasttrain.data import records_from_rows, tokenize_records
from fasttrain.loss import continuation_logps, pair_logps
from fasttrain.model.config import ModelConfig
from fasttrain.model.decoder import build_model
from fasttrain.model.hf_checkpoint import load_hf_weights
from fasttrain.packing import AttentionMeta, build_groups, pack_groups

DEMO_MODEL = Path(__file__).resolve().parents[1] / "fasttrain" / "demo" / "model"


def demo_model(dtype=torch.float64):
    model = build_model(ModelConfig.from_model_dir(DEMO_MODEL), device="meta")
    model.to_empty(device="cpu")
    model.reset_buffers()
    load_hf_weights(model, DEMO_MODEL)
    return model.to(dtype).eval()


def records():
    q1 = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    q2 = "A box holds 12 eggs. How many eggs are in 5 boxes?"
    rows = [
        # several continuations of one prompt: shared prompt and rejected step, different chosen steps
        {"prompt": q1, "initial_reason_steps": "Let's think step by step.\nStep 1:",
         "chosen": " 3 + 4 = <<3+4=7>>7 apples.", "rejected": " 3 + 4 = <<3+4=7>>8 apples."},
        {"prompt": q1, "initial_reason_steps": "Let's think step by step.\nStep 1:",
         "chosen": " He has 3 + 4 = 7 apples.", "rejected": " 3 + 4 = <<3+4=7>>8 apples."},
        # empty initial_reason_steps: the prompt is the template alone
        {"prompt": q2, "initial_reason_steps": "", "chosen": "12 * 5 = 60", "rejected": "12 * 5 = 50"},
        # one-token steps (digits are single tokens in the demo tokenizer)
        {"prompt": q2, "initial_reason_steps": "Let's think step by step.\nStep 1: 12 * 5 = ",
         "chosen": "6", "rejected": "5"},
    ]
    return records_from_rows(rows, source="inline")


def test_packed_prefix_shared_logps_equal_each_sequence_alone():
    tok = load_tokenizer(str(DEMO_MODEL))
    pairs = tokenize_records(records(), tok, "qwen2-boxed", max_length=512, max_prompt_length=384)
    assert len(pairs.chosens[3]) == 1 and len(pairs.rejecteds[3]) == 1  # really one-token steps
    groups = build_groups(pairs.prompts, pairs.chosens, pairs.rejecteds, pairs.record_ids)
    assert len(groups[0].continuations) == 3  # pair 0 and 1 share the prompt and the rejected step
    batch = pack_groups(groups)

    def run(dtype):
        model = demo_model(dtype)
        with torch.no_grad():
            cont = continuation_logps(model(batch), batch.lp_cont_N, batch.num_continuations)
            packed = torch.stack(pair_logps(cont, batch.chosen_cont_B, batch.rejected_cont_B))

            def alone(prompt, step):
                ids = torch.as_tensor(np.concatenate([prompt, step]))
                logits = model.logits(ids, torch.arange(len(ids)), AttentionMeta.for_sequences([len(ids)]))
                logp = F.log_softmax(logits.to(torch.promote_types(dtype, torch.float32)), dim=-1)
                rows = torch.arange(len(prompt) - 1, len(ids) - 1)
                return logp[rows, ids[len(prompt):]].sum()

            order = batch.pair_index_B.tolist()
            unpacked = torch.stack([
                torch.stack([alone(pairs.prompts[i], pairs.chosens[i]) for i in order]),
                torch.stack([alone(pairs.prompts[i], pairs.rejecteds[i]) for i in order]),
            ])
        return packed.double(), unpacked.double()

    packed64, truth = run(torch.float64)
    torch.testing.assert_close(packed64, truth, rtol=0, atol=1e-9)  # same math, exact up to float64 rounding
    packed32, unpacked32 = run(torch.float32)
    # float32: the packed path's error must be within a small factor of the plain per-sequence path's
    # own float32 error (both against the float64 truth); seen: both ~6e-6 on sums of ~1-30 nats.
    own_error = (unpacked32 - truth).abs().max().item()
    assert (packed32 - truth).abs().max().item() <= 4 * own_error + 1e-7
