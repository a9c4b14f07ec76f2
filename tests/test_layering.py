"""The FreeKV core imports and runs without sglang (torch + triton only)."""

from __future__ import annotations

import subprocess
import sys

BLOCK_SGLANG = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "sglang" or name.startswith("sglang."):
            raise ImportError("sglang is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
import importlib, pkgutil
import sglang_freekv
import sglang_freekv.kernels
names = [m.name for m in pkgutil.walk_packages(sglang_freekv.__path__, "sglang_freekv.")]
core = [n for n in names if not n.startswith(("sglang_freekv.patches", "sglang_freekv.platform"))]
for n in core:
    importlib.import_module(n)
import sglang_freekv.platform as p  # the entry-point module itself imports no sglang
assert not any(m == "sglang" or m.startswith("sglang.") for m in sys.modules), "sglang leaked"
print("OK", sorted(core))
"""


def test_core_imports_without_sglang() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_SGLANG], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
