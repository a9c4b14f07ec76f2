"""Session-wide test set-up.

Triton picks its CPU interpreter when ``@triton.jit`` decorates a kernel, so
``TRITON_INTERPRET`` must be set before anything imports triton: here, at the first conftest
pytest imports. Without a GPU the kernel tests then run on CPU through the interpreter; the
core tests switch it off per test (they use the PyTorch references), and the servers the
tests start never inherit it (see ``tests.helpers.run_server``).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
