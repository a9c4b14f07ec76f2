"""Kernel tests run on CPU through Triton's interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before ``triton`` is imported (``@triton.jit`` picks the
interpreter at decoration time), so it is set here, at conftest import. ``import torch``
does not import triton. With a GPU the variable is left alone, so CUDA tensors go through
the compiled kernels and CPU tensors through the references.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED = 1234
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(SEED)


@pytest.fixture
def device() -> torch.device:
    """Where kernel-vs-reference tests run: cuda when present, else cpu (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
