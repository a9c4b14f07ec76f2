"""FreeKVRecallEngine: host HND blocks -> device NHD slot columns (freekv-method.md §4-5).

One recall unit is one (layer, host page, KV head) block ``kv[layer, host_id, head]`` of
``[2, P, D]`` elements, contiguous on the host. It is copied into the column ``head`` of the
``P`` device rows starting at ``dst_loc`` (``recall_scatter``).

CUDA path, per staging set (>= 2 pinned host buffers, >= 2 device buffers, one stream each):
the recall list is cut into groups of ``group_blocks``; group ``g`` uses buffer/stream
``g % num_staging``: CPU gather (``index_select`` into the pinned buffer), one H2D, then the
scatter on the same stream. So the H2D of group ``g`` overlaps the scatter of group ``g - 1``
(other stream). Two staging sets exist: ``sync`` (main thread, correction recalls) and
``async`` (the single ordered worker thread, speculative jobs), so a correction never shares
buffers with an in-flight speculative job (race 8).

CPU path: same interface, no staging groups (one gather into per-thread scratch, one
scatter); async jobs run in order on one worker thread (``ThreadPoolExecutor(max_workers=1)``),
sync recalls run inline. :meth:`recall_layers` copies the blocks of several layers at once
(the per-step job): one gather and, when the layers' K/V buffers share one storage (the
FreeKV pool allocates them so), one scatter per K and V for every layer, instead of ~10 ops
per layer.

``_checkpoint(point)`` (a no-op, called at ``"job_start"`` and ``"gathered"``) is where race
tests hook in from outside to hold a job at a chosen point.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from sglang_freekv.kernels._common import ScratchBuffers, wide_int_view
from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.threads import pin_worker_threads

__all__ = ["FreeKVRecallEngine", "Fence"]

T = TypeVar("T")
Fence = Any  # torch.cuda.Event on CUDA; on CPU any object with .wait() (threading.Event)


class _StagingSet:
    """Staging buffers of one user (sync or async): ``num_staging`` slots of ``cap`` blocks."""

    def __init__(self, cap: int, num_staging: int, block: tuple[int, int, int],
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (cap, *block)  # [cap, 2, P, D] HND blocks
        self.cap = cap
        self.cuda = device.type == "cuda"
        # CPU recalls stage in per-thread scratch instead (one gather + one scatter)
        self.device_bufs = [torch.empty(shape, dtype=dtype, device=device)
                            for _ in range(num_staging)] if self.cuda else []
        self.host_bufs: list[torch.Tensor] = []
        self.streams: list[torch.cuda.Stream] = []
        self.h2d_done: list[torch.cuda.Event] = []
        if self.cuda:
            self.host_bufs = [torch.empty(shape, dtype=dtype, pin_memory=True)
                              for _ in range(num_staging)]
            self.streams = [torch.cuda.Stream(device=device) for _ in range(num_staging)]
            self.h2d_done = [torch.cuda.Event() for _ in range(num_staging)]


class FreeKVRecallEngine:
    """Copy machinery of FreeKV recalls (sync and async).

    Parameters
    ----------
    host_pool : the host tier (``kv [L, num_pages, H, 2, P, D]``, HND).
    k_buffers, v_buffers : per layer ``[rows, H, D]`` model dtype, ``device`` (NHD).
    device : device of the KV buffers.
    group_blocks : blocks per staging buffer (one H2D per group).
    num_staging : 1 or 2 buffers per staging set (1 = no copy/scatter overlap; benchmark).
    """

    def __init__(
        self,
        host_pool: FreeKVHostPool,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        *,
        device: torch.device | str,
        group_blocks: int = 64,
        num_staging: int = 2,
    ) -> None:
        if num_staging not in (1, 2):
            raise ValueError(f"num_staging ({num_staging}) must be 1 or 2")
        self.pool = host_pool
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.num_staging = num_staging
        block = (2, host_pool.page_size, host_pool.head_dim)
        self.block_numel = 2 * host_pool.page_size * host_pool.head_dim
        self.block_bytes = self.block_numel * \
            torch.empty((), dtype=host_pool.dtype).element_size()
        self._sets = {
            name: _StagingSet(group_blocks, num_staging, block, host_pool.dtype, self.device)
            for name in ("sync", "async")
        }
        self.job_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        # REUSE: one ordered worker => async jobs never interleave on the async staging set.
        self._executor = self._new_executor(1)
        self._inflight: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._shared = None if self.cuda else _SharedRows.of(k_buffers, v_buffers)
        # CPU staging of recall / recall_layers (up to a whole step's blocks: MBs), reused
        # rather than refaulted. REUSE: per thread, so a correction (engine thread) and a job
        # (worker) never share it (race 8 on CPU).
        self._scratch = ScratchBuffers()

    # ------------------------------------------------------------------ jobs
    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the ordered worker; returns its Future (the job handle)."""

        def run() -> T:
            self._checkpoint("job_start")
            if self.cuda:
                with torch.cuda.device(self.device):
                    return fn()
            return fn()

        fut = self._executor.submit(run)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def wait_all(self) -> None:
        """Block until every submitted job finished (re-raises a job's exception)."""
        with self._lock:
            futs = list(self._inflight)
        for fut in futs:
            fut.result()  # SYNC: host wait for the worker (release / shutdown paths only)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _new_executor(self, n: int) -> ThreadPoolExecutor:
        """``n`` worker threads; on CPU each runs torch ops with one intra-op thread
        (see :mod:`sglang_freekv.threads`: a job's ops are tiny, and a team of the worker's
        own would spin against the model's team on the same cores)."""
        ex = ThreadPoolExecutor(max_workers=n, thread_name_prefix="freekv-recall")
        if not self.cuda:
            pin_worker_threads(ex, n)
        return ex

    def _checkpoint(self, point: str) -> None:
        """Named points of a job (``"job_start"``, ``"gathered"``); a no-op."""

    def device_tensors(self) -> list[torch.Tensor]:
        """The staging buffers on the KV device (for memory accounting)."""
        return [b for st in self._sets.values() for b in st.device_bufs]

    # ------------------------------------------------------------------ copies
    def recall(
        self,
        layer: int,
        host_ids: torch.Tensor,
        heads: torch.Tensor,
        dst_loc: torch.Tensor,
        *,
        mode: str,
        before_scatter: Fence | None = None,
        heads_cpu: torch.Tensor | None = None,
    ) -> torch.cuda.Event | None:
        """Copy ``n`` host blocks ``kv[layer, host_ids[i], heads[i]]`` to the device.

        Parameters
        ----------
        layer : host-pool layer index (same as the model layer).
        host_ids : ``[n]`` int64, cpu: host page ids (the worker D2H'd them).
        heads : ``[n]`` int32, device: destination KV head.
        heads_cpu : ``[n]`` int64 cpu copy of ``heads`` if the caller has it (saves a D2H).
        dst_loc : ``[n]`` int64, device: first device row of the destination slot.
        mode : ``"sync"`` (main thread, correction) or ``"async"`` (worker thread only).
        before_scatter : on CPU an object with ``.wait()``; on CUDA a ``torch.cuda.Event``;
            the scatter is ordered after it (race 5: attention must be done reading slots).

        Returns on CUDA the event recorded after the last scatter (the caller's stream must
        wait it before reading the slots); None on CPU (copies are complete on return).
        """
        st = self._sets[mode]
        n = int(host_ids.numel())
        h = self.pool.num_kv_heads
        # [num_pages * H, 2*P*D] HND blocks as wide integer rows (fast CPU gather)
        src = wide_int_view(self.pool.kv[layer].view(self.pool.num_pages * h, -1))
        hc = heads if heads_cpu is None else heads_cpu
        flat = host_ids.to("cpu", torch.int64) * h + hc.to("cpu", torch.int64)  # [n] block ids
        kbuf, vbuf = self.k_buffers[layer], self.v_buffers[layer]
        if not self.cuda:
            # One gather and one scatter (no staging groups: nothing to overlap on a CPU).
            buf = self._gather_cpu(src, flat, mode, before_scatter)
            _scatter(buf, kbuf, vbuf, dst_loc, heads)
            return None
        return self._recall_cuda(st, src, flat, kbuf, vbuf, heads, dst_loc, before_scatter)

    def recall_layers(
        self,
        layers: torch.Tensor,
        host_ids: torch.Tensor,
        heads: torch.Tensor,
        dst_loc: torch.Tensor,
        *,
        before_scatter: Fence | None = None,
    ) -> None:
        """CPU, worker thread: :meth:`recall` of blocks of several layers in one call.

        ``layers``, ``host_ids``, ``heads``, ``dst_loc``: ``[n]`` int64 CPU tensors, block
        ``i`` is ``kv[layers[i], host_ids[i], heads[i]]`` -> the column ``heads[i]`` of the
        ``P`` rows of layer ``layers[i]`` from ``dst_loc[i]``. Entries of one layer must be
        contiguous when the buffers do not share a storage (then one :meth:`recall` per
        layer). ``before_scatter``: as in :meth:`recall` (race 5).
        """
        if self.cuda:
            raise RuntimeError("recall_layers is the CPU engine's path; CUDA recalls per layer")
        n = int(host_ids.numel())
        if n == 0:
            return
        shared = self._shared
        base = shared.base.index_select(0, layers) if shared is not None else None  # [n, 2]
        if base is None or bool((base[:, 0] < 0).any()):  # a layer outside the storage
            bounds = torch.unique_consecutive(layers, return_counts=True)
            a = 0
            for layer, m in zip(bounds[0].tolist(), bounds[1].tolist()):
                self.recall(layer, host_ids[a:a + m], heads[a:a + m], dst_loc[a:a + m],
                            mode="async", before_scatter=before_scatter,
                            heads_cpu=heads[a:a + m])
                a += m
            return
        pool, h = self.pool, self.pool.num_kv_heads
        # [L * num_pages * H, 2*P*D] HND blocks of every layer as wide integer rows
        src = wide_int_view(pool.kv.view(-1, self.block_numel))
        flat = (layers * pool.num_pages + host_ids) * h + heads  # [n] block ids
        shared.scatter(self._gather_cpu(src, flat, "async", before_scatter), base, dst_loc,
                       heads)

    def _gather_cpu(self, src: torch.Tensor, flat: torch.Tensor, mode: str,
                    before_scatter: Fence | None) -> torch.Tensor:
        """Rows ``flat`` (``[n]`` int64 block ids) of ``src`` (wide-int HND blocks) into this
        thread's staging, ``[n, 2, P, D]``; returns once ``before_scatter`` is open."""
        n = int(flat.numel())
        shape = (n, 2, self.pool.page_size, self.pool.head_dim)
        buf = self._scratch.get(f"blocks_{mode}", shape, self.pool.dtype, self.device)
        torch.index_select(src, 0, flat, out=wide_int_view(buf.view(n, -1)))
        self._checkpoint("gathered")
        if before_scatter is not None:
            before_scatter.wait()  # SYNC: the slots' previous readers are done (race 5)
        return buf

    def _recall_cuda(
        self,
        st: _StagingSet,
        src: torch.Tensor,
        flat: torch.Tensor,
        kbuf: torch.Tensor,
        vbuf: torch.Tensor,
        heads: torch.Tensor,
        dst_loc: torch.Tensor,
        before_scatter: Fence | None,
    ) -> torch.cuda.Event:
        n = int(flat.numel())
        # SYNC: host pages written through by D2H (backup stream) must have landed before the
        # CPU gather reads them.
        self.pool.wait_writes()
        producer = torch.cuda.current_stream(self.device)
        start = torch.cuda.Event()
        start.record(producer)  # STREAM: fresh event per call, waited just below
        for b in range(self.num_staging):
            # STREAM: copies/scatters come after the producer of heads/dst_loc (selection) and
            # after everything the caller enqueued before (its previous attention reads).
            st.streams[b].wait_event(start)
            if before_scatter is not None:
                st.streams[b].wait_event(before_scatter)  # STREAM: attention done (race 5)
        for t in (heads, dst_loc):
            for s in st.streams:
                # REUSE: made on the producer stream, read on the staging streams.
                t.record_stream(s)
        used = set()
        for g, a in enumerate(range(0, n, st.cap)):
            b = g % self.num_staging
            m = min(st.cap, n - a)
            used.add(b)
            # REUSE: pinned buffer b is refilled only after its previous H2D has finished.
            # SYNC: host-side wait on that copy (the other buffer keeps the DMA engine busy).
            st.h2d_done[b].synchronize()
            host = st.host_bufs[b][:m]
            out = wide_int_view(host.view(m, -1))
            torch.index_select(src, 0, flat[a : a + m], out=out)  # gather
            self._checkpoint("gathered")
            with torch.cuda.stream(st.streams[b]):
                # REUSE: device buffer b was last read by the scatter of group g - 2 on this
                # same stream, so stream order protects it.
                dev = st.device_bufs[b][:m]
                dev.copy_(host, non_blocking=True)  # one H2D per group
                st.h2d_done[b].record()  # STREAM: marks pinned buffer b free again
                _scatter(dev, kbuf, vbuf, dst_loc[a : a + m], heads[a : a + m])
        end = torch.cuda.Event()
        main = st.streams[0]
        for b in used - {0}:
            ev = torch.cuda.Event()
            ev.record(st.streams[b])
            main.wait_event(ev)  # STREAM: fold the other staging stream into stream 0
        end.record(main)  # STREAM: fresh event; the caller's stream waits it
        return end


class _SharedRows:
    """K/V buffers of several layers that live in one CPU storage, seen as one matrix of
    ``[*, D]`` rows, so blocks of many layers go in with one ``index_put_`` per K and V.

    ``base[layer, 0 | 1]``: the row of that matrix where the layer's K | V buffer
    (``[rows, H, D]``, contiguous) starts; ``-1`` for a layer outside the storage.
    """

    def __init__(self, flat: torch.Tensor, base: torch.Tensor, heads: int) -> None:
        self.flat, self.base, self.heads = flat, base, heads

    @classmethod
    def of(cls, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]
           ) -> _SharedRows | None:
        """The shared view of the largest group of layers whose buffers share one storage
        (None when no storage holds two layers, or a buffer's layout does not fit)."""
        by_ptr: dict[int, list[int]] = {}
        for i, (k, v) in enumerate(zip(k_buffers, v_buffers)):
            if k.device.type != "cpu" or k.untyped_storage().data_ptr() != \
                    v.untyped_storage().data_ptr():
                continue
            by_ptr.setdefault(k.untyped_storage().data_ptr(), []).append(i)
        if not by_ptr:
            return None
        group = max(by_ptr.values(), key=len)
        k0 = k_buffers[group[0]]
        d, h = k0.shape[-1], k0.shape[1]
        base = torch.full((len(k_buffers), 2), -1, dtype=torch.int64)
        for i in group:
            for j, t in enumerate((k_buffers[i], v_buffers[i])):
                if (t.dim() != 3 or not t.is_contiguous() or t.dtype != k0.dtype
                        or t.shape[1:] != k0.shape[1:] or t.storage_offset() % d):
                    return None
                base[i, j] = t.storage_offset() // d
        if len(group) < 2:
            return None
        storage = k0.untyped_storage()
        numel = storage.nbytes() // k0.element_size()
        flat = torch.empty(0, dtype=k0.dtype).set_(storage, 0, (numel // d, d), (d, 1))
        return cls(wide_int_view(flat), base, h)

    def scatter(self, staging: torch.Tensor, base: torch.Tensor, dst_loc: torch.Tensor,
                heads: torch.Tensor) -> None:
        """``staging [n, 2, P, D]`` HND blocks -> rows ``dst_loc[i] + [0, P)``, column
        ``heads[i]`` of the K and V buffers starting at rows ``base[i]`` (``[n, 2]``, rows of
        ``self.base``); ``dst_loc``, ``heads`` ``[n]`` int64, CPU."""
        p = staging.shape[2]
        # [n, P] (row, head) vector index inside one layer's buffer
        local = (dst_loc[:, None] + torch.arange(p)) * self.heads + heads[:, None]
        for i in range(2):  # K, V
            self.flat.index_put_((local + base[:, i:i + 1],), wide_int_view(staging[:, i]))


def _scatter(staging: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
             dst_loc: torch.Tensor, heads: torch.Tensor) -> None:
    """``recall_scatter`` semantics; on CPU an ``index_copy_`` over flattened (row, head)
    vectors, ~100x faster than the reference's 2-D advanced-index put."""
    if kbuf.device.type == "cpu" and kbuf.is_contiguous() and vbuf.is_contiguous():
        n, _, p, d = staging.shape
        h = kbuf.shape[1]
        rows = dst_loc.to(torch.int64)[:, None] + torch.arange(p)  # [n, P]
        flat = rows * h + heads.to(torch.int64)[:, None]  # [n, P] (row, head) vector ids
        for i, buf in enumerate((kbuf, vbuf)):
            # [n, P, D] strided source, no copy: the index keeps the [n, P] shape
            wide_int_view(buf.view(-1, d)).index_put_((flat,), wide_int_view(staging[:, i]))
        return
    from sglang_freekv.kernels.scatter import recall_scatter

    recall_scatter(staging, kbuf, vbuf, dst_loc, heads)
