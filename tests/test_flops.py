"""fasttrain.flops.peak_bf16_tflops: the MFU denominator per card, named by its source, never another card's."""
from __future__ import annotations

import pytest

from fasttrain.flops import peak_bf16_tflops


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"])
def test_h100_sxm_is_the_measured_value(name):
    tflops, source = peak_bf16_tflops(name)
    assert tflops == 785.0 and source.startswith("measured")


def test_h200_is_predicted_from_the_h100_not_claimed_as_measured():
    tflops, source = peak_bf16_tflops("NVIDIA H200")
    assert tflops == 785.0
    assert source.startswith("predicted") and "not yet measured on an H200" in source


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                         ("NVIDIA A100 80GB PCIe", 312.0)])
def test_datasheet_values_say_so(name, tflops):
    value, source = peak_bf16_tflops(name)
    assert value == tflops and source.startswith("datasheet")


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA H200 NVL", "NVIDIA H100 NVL", "NVIDIA L4", "cpu"])
def test_other_cards_get_no_number(name):
    # GH200 and the NVL parts run other power limits: borrowing the H100 SXM's number would be a guess
    value, source = peak_bf16_tflops(name)
    assert value is None and name in source and "gpu_check.py" in source
