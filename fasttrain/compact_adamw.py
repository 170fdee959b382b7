"""AdamW on 10 bytes per parameter that keeps every lr-5e-7 update: ``train.optimizer_state=compact`` (DESIGN §6.9).

Persistent state per parameter, all sharded by FSDP2 like the parameter itself:

    weight      bf16   2 B   the parameter: what the forward gathers, what FSDP2 shards
    low_bits    int16  2 B   the low 16 bits of the fp32 master weight: (weight, low_bits) IS the fp32 master
    grad        bf16   2 B   FSDP2 casts the fp32 reduce-scatter to the parameter's dtype
    exp_avg     bf16   2 B   AdamW moments, stored with stochastic rounding
    exp_avg_sq  bf16   2 B
                      ----
                      10 B   (fp32 master + fp32 grad + fp32 moments: 16 B)

Weights. The fp32 master is split exactly into a bf16 "high" part (rounded to nearest, so the forward sees
what an fp32-master run gathers in bf16) and a signed 16-bit remainder; joining them gives the fp32 bits back.
Unlike Kahan compensation (bf16 + bf16 buffer: ~16 significant bits) or stochastic rounding of the weight
(unbiased but noisy: an lr-5e-7 update is ~1e-5 of a weight, the rounding noise ~4e-4), this is the fp32
master bit for bit, so the update arithmetic is fp32 AdamW's.

Moments. Stored in bf16 with stochastic rounding: round-to-nearest would freeze ``exp_avg_sq`` once its
per-step change, (1 - beta2) = 1e-3 of itself, falls below half a bf16 unit (2e-3): after ~250 steps Adam's
denominator would stop tracking the gradients. Stochastic rounding keeps every moment unbiased. Its random
bits are a hash of (seed, step, parameter index, global element index), so N ranks round exactly as one
process does and a resumed run as the uninterrupted one.

Measured (50 AdamW steps at lr 5e-7 on the same gradients, relative L2 error of ``w_T - w_0`` vs fp32 AdamW):
torchao's bf16 stochastic-rounding AdamW 596%, torchao AdamW8bit on fp32 weights 2.0% (and 10.03 B/param),
plain bf16 AdamW 99.8% (the update is lost), this optimizer 0.49% (800 steps: 1.2%), its gradients rounded to bf16.
"""
from __future__ import annotations

import math

import torch

from fasttrain.model.shards import local_shard

# Persistent training state per parameter, gradient included, by train.optimizer_state: fp32 weight + grad + m + v;
# bf16 weight + int16 low bits + bf16 grad + bf16 m + v. The memory plan (pre-flight check, README, project_72b)
# reads it from here; tests/test_compact_adamw.py measures it from the tensors.
STATE_BYTES_PER_PARAM = {"fp32": 16, "compact": 10}

# Elements per pass of the update: bounds the fp32/int32 temporaries to ~0.5 GB however large a shard is
# (the 72B embedding's shard on 8 GPUs has 156M elements).
CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------
# fp32 <-> (bf16 high part, int16 remainder), exactly
# ----------------------------------------------------------------------------------------------
def split_fp32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high bf16, low int16) with join_fp32(high, low) == x bit for bit; high is x rounded to the nearest
    bf16 (ties away from zero). Works on the IEEE bits as int32: bits = high_bits * 2^16 + low, low in
    [-2^15, 2^15); shifts, not divisions (cheaper on a CPU). Finite values only (a weight is never within one
    bf16 unit of the largest float)."""
    bits = x.float().view(torch.int32)
    high = (bits + 0x8000) >> 16  # arithmetic shift: floor((bits + 2^15) / 2^16)
    low = bits - (high << 16)
    return high.to(torch.int16).view(torch.bfloat16), low.to(torch.int16)


def join_fp32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor whose bits are high_bits * 2^16 + low (the inverse of split_fp32)."""
    return ((high.view(torch.int16).to(torch.int32) << 16) + low.to(torch.int32)).view(torch.float32)


_ARANGE: dict[torch.device, torch.Tensor] = {}


def _element_index(n: int, device: torch.device) -> torch.Tensor:
    """int32 0..n-1 (n <= CHUNK), allocated once per device."""
    if device not in _ARANGE or _ARANGE[device].numel() < n:
        _ARANGE[device] = torch.arange(max(n, CHUNK), device=device, dtype=torch.int32)
    return _ARANGE[device][:n]


def _hash_bits(first_index: int, n: int, key: int, device: torch.device) -> torch.Tensor:
    """16 uniform random bits for the elements first_index .. first_index + n - 1 (global indices < 2^31) of a
    tensor, under ``key`` (< 2^31): a multiply-xorshift hash on int32 (wraps on overflow on CPU and CUDA
    alike). Deterministic, and a function of each element's own index only, never of chunks or shards."""
    h = (_element_index(n, device) + first_index) * 0x27D4EB2D + key
    h = h ^ (h >> 15)
    h = h * 0x2C1B3C6D
    h = h ^ (h >> 12)
    h = h * 0x297A2D39
    return (h >> 16) & 0xFFFF


def stochastic_round_bf16(x: torch.Tensor, first_index: int, key: int) -> torch.Tensor:
    """x (fp32) rounded to bf16 up or down with probability given by the distance (unbiased: E = x). Adding
    uniform bits below the cut to the IEEE bits carries into the kept part with exactly that probability.
    ``first_index``: the global index of x's first element in its (unsharded) tensor, so that N ranks draw the
    bits one process draws."""
    if first_index + x.numel() > 2**31:
        raise ValueError(f"stochastic rounding indexes elements in int32; a tensor of {first_index + x.numel()} "
                         "elements is too large")
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    flat_in, flat_out = x.reshape(-1).view(torch.int32), out.view(-1).view(torch.int16)
    key &= 0x7FFFFFFF
    for start in range(0, flat_in.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        bits = _hash_bits(first_index + start, flat_in[part].numel(), key, x.device)
        flat_out[part] = ((flat_in[part] + bits) >> 16).to(torch.int16)
    return out


def _mix(*values: int) -> int:
    """A 62-bit key from small integers (seed, step, parameter index, moment)."""
    key = 0
    for v in values:
        key = (key * 0x100000001B3 + v + 0x9E3779B9) & ((1 << 62) - 1)
    return key


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
class CompactAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction, eps outside the square root) on
    bf16 parameters with the fp32 master's low bits and bf16 moments as state.

    ``moment_dtype=torch.float32`` keeps the moments exact (tests: then every step equals fp32 AdamW's bit for
    bit). Parameters may be FSDP2 DTensors (sharded on dim 0) or plain tensors; the update runs on each rank's
    local shard.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if moment_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"moment_dtype must be bfloat16 or float32, got {moment_dtype}")
        self.seed, self.moment_dtype = seed, moment_dtype
        self._index = {}  # param -> (its index among all parameters, first global element of this rank's shard)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"CompactAdamW trains bf16 parameters (the fp32 master's high half); got "
                                     f"{p.dtype} for parameter {len(self._index)} of shape {tuple(p.shape)}")
                _, start, _ = local_shard(p, f"parameter {len(self._index)}")
                self._index[p] = (len(self._index), start * math.prod(p.shape[1:]))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # The master starts at the bf16 weight (low bits 0); the moments at 0. zeros_like keeps the
            # parameter's DTensor sharding, so DCP saves and reshards these like any optimizer state.
            state["step"] = torch.tensor(0.0)
            state["low_bits"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CompactAdamW.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                state["step"] += 1
                self._update(p, state, group, int(state["step"].item()))

    def _update(self, p: torch.Tensor, state: dict, group: dict, step: int) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        param_index, first_element = self._index[p]
        keys = (_mix(self.seed, step, param_index, 1), _mix(self.seed, step, param_index, 2))
        weight_X, low_X, grad_X, m_X, v_X = (_flat_local(t) for t in (
            p, state["low_bits"], p.grad, state["exp_avg"], state["exp_avg_sq"]))
        for start in range(0, weight_X.numel(), CHUNK):
            part = slice(start, start + CHUNK)
            master = join_fp32(weight_X[part], low_X[part])
            grad = grad_X[part].float()
            if wd != 0:
                master.mul_(1 - lr * wd)
            m = m_X[part].float().lerp_(grad, 1 - beta1)
            v = v_X[part].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            master.addcdiv_(m, denom, value=-step_size)
            high, low = split_fp32(master)
            weight_X[part].copy_(high)
            low_X[part].copy_(low)
            if self.moment_dtype == torch.float32:
                m_X[part].copy_(m)
                v_X[part].copy_(v)
            else:
                m_X[part].copy_(stochastic_round_bf16(m, first_element + start, keys[0]))
                v_X[part].copy_(stochastic_round_bf16(v, first_element + start, keys[1]))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer.load_state_dict casts every floating parameter's state tensors to the
        parameter's dtype, by value: it would turn the int16 low bits into bf16 numbers (and fp32 moments
        into bf16). The saved tensors are put back as they were, bits and dtypes unchanged."""
        saved = {pid: {k: v for k, v in s.items() if k != "step"} for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device)

    def master_local(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of this rank's shard of ``p`` (a new tensor)."""
        weight = _local(p)
        state = self.state.get(p)
        return join_fp32(weight, _local(state["low_bits"])) if state else weight.float()

    def low_bits(self, p: torch.Tensor) -> torch.Tensor | None:
        state = self.state.get(p)
        return state["low_bits"] if state else None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _flat_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard as a 1-D view that writes through to ``t``."""
    local = _local(t)
    if not local.is_contiguous():
        raise RuntimeError(f"CompactAdamW needs contiguous shards; got strides {local.stride()} for "
                           f"shape {tuple(local.shape)}")
    return local.view(-1)


def master_local(optimizer: torch.optim.Optimizer, p: torch.Tensor, name: str) -> torch.Tensor:
    """The fp32 master values of this rank's rows of ``p``, whichever optimizer state the run keeps."""
    if isinstance(optimizer, CompactAdamW):
        return optimizer.master_local(p)
    local, _, _ = local_shard(p, name)
    return local.float()
