"""The prefill admission hook: a batch's scratch rows (prefix read back + chunk, per request)
never exceed FreeKV's one-layer prefill scratch, counting the requests SGLang admitted before
(a continuing chunked request, which does not pass through ``add_one_req``, included).

SGLang 0.5.23's ``Req`` and ``PrefillAdder`` fields are read by name (``prefix_len``,
``full_untruncated_fill_ids``, ``extend_end``, ``can_run_list``, ``rem_chunk_tokens``); the
test checks they exist on the real classes, then drives the hook with stand-ins.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
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
    for name in ("self.prefix_len", "self.full_untruncated_fill_ids", "self.extend_end",
                 "self.last_node"):
        assert name in src, name
    src = inspect.getsource(PrefillAdder)
    assert "self.can_run_list" in src and "self.rem_chunk_tokens" in src
    assert "def _lock_node(self, last_node" in src


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


class FakeServing:
    """The serving core's face the decode check reads: page size, free host pages, and an
    eviction that frees up to ``evictable`` pages."""

    def __init__(self, free: int, evictable: int) -> None:
        self.cfg = SimpleNamespace(page_size=32)
        self.cache = SimpleNamespace(host=SimpleNamespace(free_pages=free))
        self.evictable = evictable

    def ensure_host_pages(self, n: int) -> None:
        host = self.cache.host
        got = min(self.evictable, max(0, n - host.free_pages))
        self.evictable -= got
        host.free_pages += got


def _batch(*kv_lens: int) -> SimpleNamespace:
    return SimpleNamespace(reqs=[SimpleNamespace(kv=SimpleNamespace(kv_committed_len=n))
                                 for n in kv_lens])


def _decode_fits(monkeypatch: pytest.MonkeyPatch, serving: FakeServing, batch: SimpleNamespace,
                 *args: Any) -> bool:
    monkeypatch.setitem(freekv_pool.ACTIVE, "backend", SimpleNamespace(serving=serving))
    return freekv_pool._check_decode_mem(lambda self, *a, **k: True, batch, *args)


def test_decode_needs_a_host_page_for_each_page_it_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "kv_committed_len" in inspect.getsource(Req)
    batch = _batch(64, 95, 70)  # 64 opens a page now, 95 at the next step (overlap), 70 not
    assert freekv_pool.pages_opened_next_decode([64, 95, 70], 32) == 2
    assert _decode_fits(monkeypatch, FakeServing(free=2, evictable=0), batch)
    # short of pages: the radix cache gives one back, then it fits
    serving = FakeServing(free=1, evictable=5)
    assert _decode_fits(monkeypatch, serving, batch) and serving.evictable == 4
    # nothing to evict: SGLang is told "no room" and retracts
    assert not _decode_fits(monkeypatch, FakeServing(free=1, evictable=0), batch)
    # retraction re-checks a subset (selected_indices): the request at 70 alone fits
    assert _decode_fits(monkeypatch, FakeServing(free=0, evictable=0), batch, [2])


def test_decode_check_leaves_sglang_verdicts_and_other_policies_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(freekv_pool.ACTIVE, "backend", None)
    assert freekv_pool._check_decode_mem(lambda self, *a, **k: True, _batch(64))
    monkeypatch.setitem(freekv_pool.ACTIVE, "backend",
                        SimpleNamespace(serving=FakeServing(free=9, evictable=0)))
    assert not freekv_pool._check_decode_mem(lambda self, *a, **k: False, _batch(64))


# ---------------------------------------------------------------- host-tier pages
P = 32


class LockedServing(FakeServing):
    """FakeServing that records whether the admitted request's prefix was locked while it
    evicted, and has no request rows with pages of their own."""

    def __init__(self, free: int, evictable: int, adder: "LockingAdder") -> None:
        super().__init__(free, evictable)
        self.own_pages: dict[int, set[int]] = {}
        self.adder = adder
        self.evicted_while_locked: list[bool] = []

    def ensure_host_pages(self, n: int) -> None:
        super().ensure_host_pages(n)
        self.evicted_while_locked.append(self.adder.locked)


class LockingAdder(FakeAdder):
    def __init__(self, batch: list[FakeReq]) -> None:
        super().__init__(None, batch)
        self.locked = False

    @contextmanager
    def _lock_node(self, node: object) -> Iterator[None]:
        self.locked = True
        try:
            yield
        finally:
            self.locked = False


def _with_host(monkeypatch: pytest.MonkeyPatch, adder: LockingAdder, free: int,
               evictable: int) -> LockedServing:
    serving = LockedServing(free, evictable, adder)
    monkeypatch.setitem(freekv_pool.ACTIVE, "backend", SimpleNamespace(serving=serving))
    return serving


def test_prompt_pages_counts_from_the_first_page_not_inside_the_prefix() -> None:
    assert freekv_pool.prompt_pages(0, 64, P) == 2
    assert freekv_pool.prompt_pages(0, 65, P) == 3
    assert freekv_pool.prompt_pages(40, 65, P) == 2  # page 1 holds prefix and new tokens
    assert freekv_pool.prompt_pages(64, 64, P) == 0


def test_a_request_waits_while_the_host_tier_cannot_hold_its_pages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Token pool room is not page room: with 10 free pages and nothing to evict, a
    320-token prompt goes in, a second one (10 more pages) waits; nothing was half-admitted."""
    adder = LockingAdder([])
    _with_host(monkeypatch, adder, free=10, evictable=0)
    first = FakeReq(prefix_len=0, total=320)
    first.last_node = object()  # type: ignore[attr-defined]
    assert _admit(adder, first) is None
    second = FakeReq(prefix_len=0, total=320)
    second.last_node = object()  # type: ignore[attr-defined]
    assert _admit(adder, second) is AddReqResult.OTHER
    assert adder.can_run_list == [first]


def test_a_matched_prefix_is_not_assumed_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill plan may copy a matched prefix's pages (it shares only whole pages found
    in the token map): a 1000-token prompt with 999 cached tokens still needs room for all
    32 pages; a chunked request continuing on its row only for the pages past its own."""
    adder = LockingAdder([])
    serving = _with_host(monkeypatch, adder, free=31, evictable=0)
    cached = FakeReq(prefix_len=999, total=1000)
    cached.last_node = object()  # type: ignore[attr-defined]
    assert _admit(adder, cached) is AddReqResult.OTHER
    serving.cache.host.free_pages = 32
    assert _admit(adder, cached) is None
    chunked = FakeReq(prefix_len=512, total=1000)
    chunked.req_pool_idx = 7  # type: ignore[attr-defined]
    serving.own_pages[7] = set(range(16))
    assert freekv_pool._pages_to_write(serving, chunked, P) == 32 - 16


def test_cached_prefixes_are_evicted_with_the_requests_own_prefix_locked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    adder = LockingAdder([])
    serving = _with_host(monkeypatch, adder, free=4, evictable=20)
    req = FakeReq(prefix_len=64, total=64 + 320)  # 12 pages, its prefix's 2 included
    req.last_node = object()  # type: ignore[attr-defined]
    assert _admit(adder, req) is None
    assert serving.evicted_while_locked == [True]
    assert serving.cache.host.free_pages >= 12
