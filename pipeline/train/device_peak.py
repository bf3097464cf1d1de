"""The one table of device peaks that MFU is measured against: the trainer (train.peak_tflops overrides it),
`python -m pipeline plan`'s --peak-tflops default and the bench scripts. No torch import: the CLI's argument
parser reads it."""
from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core TFLOP/s per GPU from NVIDIA's datasheets: H100 SXM5 and H200 SXM 989.4,
# A100 SXM/PCIe 312, L40S 362.05. Matched as substrings of torch.cuda.get_device_name().
DEVICE_PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
# What `plan` assumes without --peak-tflops: the GPU its other defaults (80 GiB per GPU) describe.
PLAN_DEVICE = "H100"
PLAN_PEAK_TFLOPS = DEVICE_PEAK_TFLOPS[PLAN_DEVICE]


def peak_tflops_of(device_name: str) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, the table's key) for a device name such as 'NVIDIA H100 80GB HBM3'; (0.0, '') when
    the table has no entry (no MFU is reported then)."""
    for key, value in DEVICE_PEAK_TFLOPS.items():
        if key in device_name:
            return value, key
    return 0.0, ""
