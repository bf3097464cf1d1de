import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 kernel results are judged at ~1e-5 against float64: GEMMs must be IEEE fp32, not TF32 (which GPU
    training runs switch on process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
