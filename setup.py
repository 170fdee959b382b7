"""fasttrain: a performance-first Step-DPO trainer.

Import names: ``fasttrain`` (the trainer) and ``fasttrain_kernels`` (Triton kernels and their
PyTorch references, source in ``kernels/fasttrain_kernels``). We deliberately do not install a
top-level ``kernels`` module: Hugging Face publishes a distribution with that import name, which
transformers probes for.
"""
from setuptools import find_packages, setup

setup(
    name="fasttrain",
    version="0.1.0",
    description="Performance-first Step-DPO trainer: prefix-shared varlen packing, step-token-only LM head, FSDP2",
    python_requires=">=3.10",
    packages=find_packages(include=["fasttrain", "fasttrain.*"]) + ["fasttrain_kernels"],
    package_dir={"fasttrain_kernels": "kernels/fasttrain_kernels"},
    package_data={"fasttrain": ["demo/*.json", "demo/*.jsonl", "demo/*.yaml", "demo/*.safetensors", "demo/*.md",
                                "demo/model/*", "demo/data/*"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
    ],
    extras_require={
        "flash": ["flash-attn>=2.1"],
        "parquet": ["pyarrow>=14"],
        "plots": ["matplotlib>=3.7"],
        "bench": ["trl==1.16.0", "datasets>=4.7"],
        "test": ["pytest>=7", "pyarrow>=14", "hypothesis>=6", "ruff>=0.6", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["fasttrain=fasttrain.run:main"]},
)
