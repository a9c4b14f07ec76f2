"""Hooks fail fast: a missing SGLang symbol or another sglang release stops the launcher
with one line naming it (SGLang's own registry would only log and go on)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_freekv.patches import PINNED_SGLANG, HookTargetError, all_targets, resolve_target

LAUNCH_HELP = """
import runpy, sys
{prelude}
sys.argv = ["sglang.launch_server", "--help"]
runpy.run_module("sglang.launch_server", run_name="__main__")
"""


def _launch_help(prelude: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LAUNCH_HELP.format(prelude=prelude)],
                          capture_output=True, text=True, timeout=300)


def test_every_target_exists_in_the_pinned_sglang() -> None:
    for target in all_targets():
        resolve_target(target)
    with pytest.raises(HookTargetError, match=f"sglang=={PINNED_SGLANG}"):
        resolve_target("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.no_such_method")


def test_a_removed_target_stops_the_launcher_in_one_line() -> None:
    out = _launch_help("import sglang.srt.mem_cache.memory_pool as m\n"
                       "del m.ReqToTokenPool.free_rows")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows" in errors[0]
    assert f"sglang=={PINNED_SGLANG}" in errors[0]
    assert "Traceback" not in out.stderr


def test_another_sglang_release_stops_the_launcher_in_one_line() -> None:
    out = _launch_help("import importlib.metadata as md\n"
                       "real = md.version\n"
                       "md.version = lambda name: '0.5.99' if name == 'sglang' else real(name)")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "0.5.99" in errors[0] and PINNED_SGLANG in errors[0]
