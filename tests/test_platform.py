"""FreeKVCpuPlatform activation rules and the TP thread-pinning helpers."""

from __future__ import annotations

import pytest

from sglang_freekv import platform
from sglang_freekv.patches.cpu_platform import parse_cpu_list, split_cpus


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_accelerator_present", lambda: False)
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)


def test_activates_without_accelerator(no_accelerator: None) -> None:
    assert platform.activate() == "sglang_freekv.platform.FreeKVCpuPlatform"


def test_stays_off_with_cuda(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_accelerator_present", lambda: True)
    assert platform.activate() is None


def test_explicit_selection_wins(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_accelerator_present", lambda: True)
    monkeypatch.setenv("SGLANG_PLATFORM", "freekv_cpu")
    assert platform.activate() is not None
    monkeypatch.setenv("SGLANG_PLATFORM", "someone_else")
    assert platform.activate() is None


def test_in_tree_cpu_engine_request_is_respected(
    no_accelerator: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    assert platform.activate() is None


def test_platform_class_is_out_of_tree_cpu() -> None:
    from sglang.srt.platforms.device_mixin import PlatformEnum

    cls = platform.FreeKVCpuPlatform
    plat = cls()
    assert plat._enum == PlatformEnum.OOT and plat.is_out_of_tree()
    assert plat.get_device() == "cpu"
    assert plat.get_default_attention_backend() == "torch_native"
    assert plat.get_dispatch_key_name() == "native"


def test_cpu_list_helpers() -> None:
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert split_cpus([0, 1], 2, 0) == [0] and split_cpus([0, 1], 2, 1) == [1]
    shares = [split_cpus(list(range(7)), 3, i) for i in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_cpus([0, 1], 4, 3) == [1]  # more ranks than cores still serves
    with pytest.raises(ValueError):
        split_cpus([0, 1], 2, 2)
