"""MFU's peak: chosen by the exact part (H100 SXM / PCIe / NVL differ) and by precision (FP8 runs are not
divided by the BF16 peak), and the description names which peak is used."""
import pytest

from latentlm_mcore.training.metrics import PEAK_BF16_TFLOPS, device_peak_tflops, peak_for


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 80GB HBM3", "fp8", 1979.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 PCIe", "fp8", 1513.0),
    ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200 NVL", "fp8", 1671.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA B200", "fp8", 4500.0),
    ("NVIDIA B200", "bf16", 2250.0),
])
def test_peak_by_part_and_precision(name, precision, peak):
    value, which = peak_for(name, precision)
    assert value == peak
    assert precision.upper() in which and f"{peak:g}" in which


def test_fp8_on_a_part_without_fp8_and_unknown_parts_have_no_peak():
    assert peak_for("NVIDIA A100-PCIE-40GB", "fp8")[0] is None
    value, which = peak_for("Some Future GPU", "bf16")
    assert value is None and "--peak-tflops" in which


def test_fp32_is_measured_against_the_bf16_peak_and_says_so():
    value, which = peak_for("NVIDIA H100 80GB HBM3", "fp32")
    assert value == 989.0 and "BF16" in which


def test_override_wins_and_the_table_serves_plan_run():
    assert device_peak_tflops(500.0, "fp8")[0] == 500.0
    assert PEAK_BF16_TFLOPS["H100"] == 989.0 and PEAK_BF16_TFLOPS["H100 PCIe"] == 756.0
