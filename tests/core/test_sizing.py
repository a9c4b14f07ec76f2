"""Sizing of FreeKV's tiers: the host tier's limit (cgroup-aware) and the device plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_freekv.sizing import (
    FreeKVSizingError,
    ModelShape,
    cgroup_memory_available,
    host_tier_bytes,
    plan_device_memory,
)

GIB = 1 << 30
# SmolLM2-135M in float32: 30 layers, 9 q / 3 KV heads, head_dim 64.
SMOL = ModelShape(num_layers=30, num_dense_layers=1, num_qo_heads=9, num_kv_heads=3,
                  head_dim=64, elem_bytes=4)
SMOL_TOKEN = 2 * 30 * 3 * 64 * 4  # host bytes per token (46080)


def test_cgroup_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert cgroup_memory_available(tmp_path) == 7 * GIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_available(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory/memory.limit_in_bytes").write_text(str(4 * GIB))
    (v1 / "memory/memory.usage_in_bytes").write_text(str(GIB))
    assert cgroup_memory_available(v1) == 3 * GIB
    (v1 / "memory/memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    assert cgroup_memory_available(v1) is None
    assert cgroup_memory_available(tmp_path / "absent") is None


def test_host_tier_names_the_limit_that_applied() -> None:
    assert host_tier_bytes(2.5, free_ram=100 * GIB, cgroup_available=GIB) == (
        int(2.5 * GIB), "host_memory_gb=2.5")
    size, why = host_tier_bytes(None, free_ram=100 * GIB, cgroup_available=10 * GIB)
    assert size == 4 * GIB and "container" in why and "cgroup" in why
    size, why = host_tier_bytes(None, free_ram=10 * GIB, cgroup_available=None)
    assert size == 4 * GIB and "free RAM" in why
    size, why = host_tier_bytes(None, free_ram=10 * GIB, cgroup_available=50 * GIB)
    assert size == 4 * GIB and "free RAM" in why


def _plan(available: float, **kw: object):
    args = dict(available_bytes=int(available * GIB), shape=SMOL, page_size=32, budget=512,
                top_k=10, context_len=6400, host_bytes=8 * GIB, host_bytes_per_token=SMOL_TOKEN)
    args.update(kw)
    return plan_device_memory(**args)  # type: ignore[arg-type]


def test_plan_fits_the_profiled_bytes_and_beats_dense() -> None:
    """With KV memory for ~2.5 dense 6.2K contexts FreeKV runs >= 8 such requests."""
    dense_tokens_per_context = 6200
    available = 2.5 * dense_tokens_per_context * SMOL_TOKEN / GIB
    plan = _plan(available)
    assert plan.total_bytes <= plan.available_bytes
    assert plan.max_running_requests >= 8
    assert plan.max_total_tokens >= 8 * dense_tokens_per_context
    assert plan.max_total_tokens % 32 == 0
    assert plan.num_host_pages == plan.max_total_tokens // 32 + plan.max_running_requests
    assert "device plan" in plan.describe()


def test_plan_caps() -> None:
    big = _plan(40.0)
    assert big.max_running_requests == 512  # default cap
    # the host tier bounds the tokens; the rest of the device is not reserved
    assert big.max_total_tokens == (8 * GIB // (SMOL_TOKEN * 32) - 512) * 32
    assert big.total_bytes < big.available_bytes / 2
    user = _plan(40.0, max_running_requests=7, max_total_tokens=50_000)
    assert user.max_running_requests == 7 and user.max_total_tokens == 50_000 // 32 * 32


def test_plan_refuses_what_cannot_work() -> None:
    with pytest.raises(FreeKVSizingError, match="prefill scratch"):
        _plan(0.02)  # the one-layer scratch (~10 MB) and one budget (~23 MB) need ~33 MB
    with pytest.raises(FreeKVSizingError, match="host_memory_gb"):
        _plan(4.0, host_bytes=12 * 32 * SMOL_TOKEN)  # 11 pages: fewer tokens than a budget


def test_max_running_requests_is_an_upper_bound() -> None:
    """--max-running-requests (or the CPU platform's default) never takes so many spare
    pages that one whole-context request no longer fits the host tier."""
    pages = 72
    context = (pages - 1) * 32
    plan = _plan(4.0, host_bytes=pages * 32 * SMOL_TOKEN, context_len=context,
                 max_running_requests=32)
    assert plan.max_running_requests == 1 and plan.max_total_tokens >= context
    roomy = _plan(4.0, host_bytes=pages * 32 * SMOL_TOKEN, context_len=1000,
                  max_running_requests=32)
    assert roomy.max_running_requests == 32  # 72 pages - 32 for a 1000-token context >= 32


def test_a_whole_context_fits_the_host_tier() -> None:
    """A small host tier keeps room for one whole-context request before adding requests:
    each running request holds one spare page for its partial last page."""
    pages = 72  # the server tests' 0.1 GiB float32 tier
    context = (pages - 1) * 32  # what the launcher serves
    plan = _plan(4.0, host_bytes=pages * 32 * SMOL_TOKEN, context_len=context)
    assert plan.max_running_requests == 1 and plan.max_total_tokens >= context
    assert plan.num_host_pages <= pages
