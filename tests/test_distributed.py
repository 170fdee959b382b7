"""Process-group backend choice (the GPU cases are decided here on the CPU by pretending CUDA exists)."""
from __future__ import annotations

import torch

from fasttrain import distributed as fdist


def test_backend_per_device_and_offload(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fdist._backend(cpu_offload=False) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fdist._backend(cpu_offload=False) == "nccl"
    # offloaded gradients are CPU tensors: clip_grad_norm_'s all-reduce of their norms needs gloo
    assert fdist._backend(cpu_offload=True) == "cuda:nccl,cpu:gloo"


def test_fused_cpu_adamw_on_fsdp2_shards_matches_foreach(tmp_path):
    """The CPU-offload optimizer (fused AdamW on host DTensor shards) steps like the for-each reference."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from fasttrain.config import RunConfig
        from fasttrain.assembly import build_optimizer
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        out = []
        for offload in (False, True):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
            for layer in m:
                fully_shard(layer)
            fully_shard(m)
            cfg = RunConfig()
            cfg.model.cpu_offload = offload  # -> fused=True on these CPU shards
            cfg.train.lr, cfg.train.warmup_ratio = 1e-2, 0.0
            params = list(m.parameters())
            opt, sched = build_optimizer(cfg, params, total_steps=10)
            assert opt.defaults["fused"] is offload
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
            for _ in range(3):
                opt.zero_grad()
                m(x).pow(2).sum().backward()
                opt.step()
                sched.step()
            out.append(torch.cat([p.full_tensor().flatten() for p in params]))
        torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
