"""Device peaks for pretraining's MFU figure. The metrics writer itself is runtime/metrics.py."""
from __future__ import annotations

import torch

# Dense (no sparsity) tensor-core peaks per device, TFLOP/s, from the vendor datasheets: (part, the
# substrings of torch.cuda.get_device_name() that identify it, BF16, FP8). Most specific part first: "H100"
# alone is the SXM part ("NVIDIA H100 80GB HBM3"); the PCIe and NVL parts have lower clocks and peaks.
# FP8 None: the part has no FP8 tensor cores. MXFP8 runs at the FP8 rate on Blackwell.
PEAKS = (
    ("GH200", ("GH200",), 989.0, 1979.0),
    ("H200 NVL", ("H200 NVL",), 835.0, 1671.0),
    ("H200", ("H200",), 989.0, 1979.0),
    ("H100 NVL", ("H100 NVL",), 835.0, 1671.0),
    ("H100 PCIe", ("H100 PCIe",), 756.0, 1513.0),
    ("H100", ("H100",), 989.0, 1979.0),
    ("GB200", ("GB200",), 2500.0, 5000.0),
    ("B200", ("B200",), 2250.0, 4500.0),
    ("A100", ("A100",), 312.0, None),
    ("L40S", ("L40S",), 362.0, 733.0),
)
PEAK_BF16_TFLOPS = {part: bf16 for part, _, bf16, _ in PEAKS}  # by part name (tools/plan_run.py)


def peak_for(device_name: str, precision: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, which peak it is) for a device name and "bf16" / "fp8" (fp32 runs are
    measured against the BF16 peak, and say so). None when the part or its FP8 rate is unknown."""
    kind = "fp8" if precision == "fp8" else "bf16"
    for part, needles, bf16, fp8 in PEAKS:
        if any(n.lower() in device_name.lower() for n in needles):
            value = fp8 if kind == "fp8" else bf16
            if value is None:
                return None, f"{part} has no {kind.upper()} peak"
            return value, f"{part} dense {kind.upper()} peak {value:g} TFLOP/s"
    return None, f"no peak known for {device_name!r} (pass --peak-tflops)"


def device_peak_tflops(override: float | None = None, precision: str = "bf16") -> tuple[float | None, str]:
    """(peak TFLOP/s per device for MFU, a description naming which peak): `override` if given, else looked
    up from this GPU's name and the run's precision ("bf16" / "fp8"); (None, why) on a CPU."""
    if override:
        return override, f"given peak {override:g} TFLOP/s"
    if not torch.cuda.is_available():
        return None, "no GPU: no MFU"
    return peak_for(torch.cuda.get_device_name(), precision)
