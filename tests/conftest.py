"""Shared pytest fixtures.

Every test that takes the ``device`` fixture runs on the CPU and, when a CUDA GPU is present,
again on the GPU (reported as skipped otherwise), so the GPU path is tested wherever it exists.
"""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test starts from the same random state, so a failure reproduces exactly."""
    torch.manual_seed(0)
