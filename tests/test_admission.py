"""The prefill admission hook: a batch's scratch rows (prefix read back + chunk, per request)
never exceed FreeKV's one-layer prefill scratch, counting the requests SGLang admitted before
(a continuing chunked request, which does not pass through ``add_one_req``, included).

SGLang 0.5.23's ``Req`` and ``PrefillAdder`` fields are read by name (``prefix_len``,
``full_untruncated_fill_ids``, ``extend_end``, ``can_run_list``, ``rem_chunk_tokens``); the
test checks they exist on the real classes, then drives the hook with stand-ins.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder  # noqa: E402

from sglang_freekv.patches import freekv_pool  # noqa: E402

SCRATCH = 1000


@dataclass
class FakeReq:
    prefix_len: int
    total: int
    extend_end: int = 0
    full_untruncated_fill_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.full_untruncated_fill_ids = [0] * self.total


class FakeAdder:
    def __init__(self, rem_chunk_tokens: int | None, batch: list[FakeReq]) -> None:
        self.rem_chunk_tokens = rem_chunk_tokens
        self.can_run_list = list(batch)


def _admit(adder: FakeAdder, req: FakeReq) -> Any:
    def orig(self: FakeAdder, r: FakeReq, *args: Any) -> None:
        chunk = self.rem_chunk_tokens or r.total
        r.extend_end = r.prefix_len + min(r.total - r.prefix_len, chunk)
        self.can_run_list.append(r)

    return freekv_pool._add_one_req(orig, adder, req, False, None)


@pytest.fixture(autouse=True)
def _pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(freekv_pool.ACTIVE, "pool", SimpleNamespace(staging_rows=SCRATCH))


def test_fields_exist_in_the_pinned_sglang() -> None:
    src = inspect.getsource(Req.__init__)
    for name in ("self.prefix_len", "self.full_untruncated_fill_ids", "self.extend_end"):
        assert name in src, name
    src = inspect.getsource(PrefillAdder)
    assert "self.can_run_list" in src and "self.rem_chunk_tokens" in src


def test_the_first_request_always_goes_in() -> None:
    adder = FakeAdder(None, [])
    assert _admit(adder, FakeReq(prefix_len=900, total=990)) is None
    assert len(adder.can_run_list) == 1


def test_cached_prefixes_count_against_the_scratch() -> None:
    adder = FakeAdder(None, [])
    _admit(adder, FakeReq(prefix_len=0, total=400))
    # 50 new tokens, but 600 cached ones are read back into the scratch too: 400 + 650 > 1000
    assert _admit(adder, FakeReq(prefix_len=600, total=650)) is AddReqResult.OTHER
    assert _admit(adder, FakeReq(prefix_len=500, total=550)) is None
    assert sum(r.extend_end for r in adder.can_run_list) <= SCRATCH


def test_a_continuing_chunked_request_is_counted() -> None:
    # admitted by add_chunked_req: 700 earlier-chunk tokens + a 200-token chunk in the scratch
    chunked = FakeReq(prefix_len=700, total=2000, extend_end=900)
    adder = FakeAdder(300, [chunked])
    assert _admit(adder, FakeReq(prefix_len=0, total=200)) is AddReqResult.OTHER
    assert _admit(adder, FakeReq(prefix_len=0, total=100)) is None


def test_only_the_chunk_of_a_long_prompt_counts() -> None:
    adder = FakeAdder(256, [FakeReq(prefix_len=0, total=300, extend_end=300)])
    # a 5000-token prompt extends at most 256 tokens this forward
    assert _admit(adder, FakeReq(prefix_len=0, total=5000)) is None
    assert adder.can_run_list[-1].extend_end == 256
