"""How much activation memory each checkpointing mode keeps, and ``model.activation_checkpointing=auto``'s choice
(DESIGN §6.10).

Per token and decoder block, in elements of the compute dtype (D hidden, F FFN width, q / kv attention widths),
what autograd keeps from forward to backward:

    none       4D + 2q + 2kv + 4F   block input and residual (the norms' inputs), both norm outputs (the matmuls'
                                    inputs), rotated q and k, v, the attention output (o_proj's input), gate,
                                    SiLU(gate), up, and their product (down's input)
    selective  3D + 2q + 2kv + 2F   the block input, every matmul's output (q, k, v, o, gate, up, down) and the
                                    attention output; norms, RoPE, SwiGLU and residual adds are recomputed
    full       D                    the block input; the whole block is recomputed in backward

Qwen2-72B (D = q = 8192, kv = 1024, F = 29568): 169,472 / 102,144 / 8,192 elements, i.e. selective keeps 60% of
none for ~0% more FLOPs, full keeps 5% for one more forward of every block (~33% more matmul work). With
checkpointing, backward also holds one block's ``none`` activations while it recomputes that block.

``auto`` takes the first of none, selective, full whose activations fit what the memory plan leaves of 85% of
the card: minus the sharded training state (the pre-flight check's bytes), two gathered bf16 blocks in flight,
one block's bf16 gradients and its fp32 reduce-scatter buffer, and the gathered root (embedding + LM head) with
its gradient. Estimates, not measurements: no GPU has checked them yet.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES_BY_RECOMPUTE = ("none", "selective", "full")  # least recompute first
HEADROOM = 0.85  # the share of the card the memory plan uses (assembly.check_memory_plan)


def saved_elements_per_token(cfg, mode: str) -> int:
    """Elements per token and block that ``mode`` keeps from forward to backward (module docstring)."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    return {"none": 4 * D + 2 * q + 2 * kv + 4 * F,
            "selective": 3 * D + 2 * q + 2 * kv + 2 * F,
            "full": D}[mode]


def activation_bytes(cfg, mode: str, tokens: int, dtype_bytes: int) -> float:
    """Peak activation bytes of a training micro-batch of ``tokens`` tokens under ``mode``."""
    per_token = cfg.num_hidden_layers * saved_elements_per_token(cfg, mode)
    if mode != "none":  # backward re-runs one block at a time and holds its full activations meanwhile
        per_token += saved_elements_per_token(cfg, "none")
    return float(tokens) * per_token * dtype_bytes


@dataclass(frozen=True)
class Choice:
    mode: str
    needs_bytes: dict[str, float]  # mode -> activation bytes
    budget_bytes: float  # what the plan leaves for activations
    card_bytes: float
    state_bytes: float
    gathered_bytes: float

    def explain(self) -> str:
        gib = 2.0**30
        needs = ", ".join(f"{m} {b / gib:.1f}" for m, b in self.needs_bytes.items())
        fits = "fits" if self.needs_bytes[self.mode] <= self.budget_bytes else "does NOT fit even so"
        return (f"activation_checkpointing=auto -> {self.mode}: activations GiB {needs}; {self.mode} {fits} in the "
                f"{self.budget_bytes / gib:.1f} GiB left of {HEADROOM:.0%} of the card's {self.card_bytes / gib:.0f} "
                f"GiB after {self.state_bytes / gib:.1f} GiB sharded state and {self.gathered_bytes / gib:.1f} GiB "
                "gathered blocks, root and their gradients")


def gathered_bytes(cfg) -> float:
    """What FSDP2 holds besides the shards while a block runs backward: two gathered bf16 blocks (the current one
    and the prefetched one), one block's bf16 gradients and its fp32 reduce-scatter buffer, and the gathered bf16
    root (embedding + LM head) with its gradient."""
    from fasttrain.model.config import layer_params, num_params

    block = layer_params(cfg)
    root = num_params(cfg) - block * cfg.num_hidden_layers
    return float(2 * 2 * block + 2 * block + 4 * block + 2 * 2 * root)


def choose(cfg, tokens: int, dtype_bytes: int, card_bytes: float, state_bytes: float) -> Choice:
    """The least recompute whose activations fit; ``full`` when none does (the run may then run out of memory:
    lower train.tokens_per_micro_batch)."""
    gathered = gathered_bytes(cfg)
    budget = HEADROOM * card_bytes - state_bytes - gathered
    needs = {m: activation_bytes(cfg, m, tokens, dtype_bytes) for m in MODES_BY_RECOMPUTE}
    mode = next((m for m in MODES_BY_RECOMPUTE if needs[m] <= budget), "full")
    return Choice(mode, needs, budget, card_bytes, state_bytes, gathered)
