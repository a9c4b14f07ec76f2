"""FreeKVHostPool: the host tier (HND page blocks of every layer) and its page allocator.

``kv[L, num_pages, H, 2, P, D]`` (index 0 = K, 1 = V): one contiguous ``[2, P, D]`` block per
(layer, page, head), so recalling one (page, head) is one contiguous read. Pinned when a
CUDA device is used, so H2D/D2H copies are true async DMA.

Pinning: ``torch.empty(pin_memory=True)`` goes through torch's caching host allocator, which
rounds every block up to a power of two (64 GiB asked = 128 GiB pinned). The tier is instead
allocated as ordinary memory and registered with ``cudaHostRegister`` (portable + mapped), in
chunks of whole pages of one layer, so exactly the bytes used are pinned (``pinned_bytes``)
and no copy of a run of pages ever spans two registrations (``write_blocks`` splits runs at
chunk boundaries).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["FreeKVHostPool", "FreeKVHostPoolFull", "host_page_bytes", "pages_for_budget",
           "pin_host_tensor"]

_GIB = float(1 << 30)
_ALIGN = 4096  # registrations start on a host page
REGISTER_CHUNK_BYTES = 1 << 30  # at most this many bytes per cudaHostRegister call
_HOST_REGISTER_FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


class FreeKVHostPoolFull(RuntimeError):
    """The host tier has fewer free pages than requested (one-line message)."""


def host_page_bytes(
    num_layers: int, num_kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of one host page id (all layers, heads, K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * num_kv_heads * 2 * page_size * head_dim * elem


def pages_for_budget(
    host_memory_gb: float,
    *,
    num_layers: int,
    num_kv_heads: int,
    page_size: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """How many host pages fit in ``host_memory_gb`` GiB (at least 1)."""
    per_page = host_page_bytes(num_layers, num_kv_heads, page_size, head_dim, dtype)
    return max(1, int(host_memory_gb * _GIB) // per_page)


def pin_host_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, granule_bytes: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """An uninitialised host tensor of ``shape`` whose bytes are page-locked exactly.

    Registered with ``cudaHostRegister`` in chunks of a whole number of ``granule_bytes``
    (<= ``REGISTER_CHUNK_BYTES`` unless one granule is larger); returns the tensor and the
    ``(address, bytes)`` ranges, which are unregistered when the tensor is freed. Needs CUDA.
    """
    numel = 1
    for n in shape:
        numel *= n
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * elem
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % _ALIGN
    tensor = raw[off:off + nbytes].view(dtype).view(shape)
    cudart = torch.cuda.cudart()
    chunk = max(granule_bytes, REGISTER_CHUNK_BYTES // granule_bytes * granule_bytes)
    ranges: list[tuple[int, int]] = []
    base = tensor.data_ptr()
    try:
        for start in range(0, nbytes, chunk):
            size = min(chunk, nbytes - start)
            err = cudart.cudaHostRegister(base + start, size, _HOST_REGISTER_FLAGS)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {size} bytes failed ({err}); the "
                                   "container's memlock limit may be too low (ulimit -l)")
            ranges.append((base + start, size))
    except BaseException:
        _unregister(ranges)
        raise

    weakref.finalize(raw, _unregister, list(ranges)).atexit = False
    return tensor, ranges


def _unregister(ranges: list[tuple[int, int]]) -> None:
    if not ranges:
        return
    cudart = torch.cuda.cudart()
    for addr, _ in ranges:
        cudart.cudaHostUnregister(addr)


class FreeKVHostPool:
    """Host KV tier with an exact, reference-counted page allocator.

    A page is allocated with one reference (its ``owner``, a request row, is recorded for
    stats); :meth:`incref` / :meth:`decref` add and drop references (prefix sharing: several
    requests, and the serving engine's cached token ids, may hold one page); the page returns
    to the free stack when its count reaches 0.

    Parameters
    ----------
    num_layers, num_pages, num_kv_heads, page_size, head_dim : sizes (L, pages, H, P, D).
    dtype : model dtype of the KV.
    pin_memory : pin ``kv`` (needs CUDA); required for async H2D/D2H.

    Attributes
    ----------
    kv : ``[L, num_pages, H, 2, P, D]`` ``dtype``, cpu (pinned if requested), HND blocks.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        num_kv_heads: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        pin_memory: bool,
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"FreeKVHostPool: num_pages ({num_pages}) must be >= 1")
        self.num_layers, self.num_pages = num_layers, num_pages
        self.num_kv_heads, self.page_size, self.head_dim = num_kv_heads, page_size, head_dim
        self.dtype = dtype
        self.pin_memory = pin_memory
        shape = (num_layers, num_pages, num_kv_heads, 2, page_size, head_dim)
        self.page_bytes = host_page_bytes(num_layers, num_kv_heads, page_size, head_dim, dtype)
        layer_page = self.page_bytes // num_layers  # one page of one layer (a copy granule)
        self._ranges: list[tuple[int, int]] = []
        if pin_memory:
            self.kv, self._ranges = pin_host_tensor(shape, dtype, layer_page)
        else:
            self.kv = torch.empty(shape, dtype=dtype)
        # pages of one layer per registration (write_blocks never crosses a boundary)
        first = self._ranges[0][1] if self._ranges else num_pages * layer_page
        self._pages_per_chunk = max(1, first // layer_page)
        # Free stack: ids in _free[:_top] are free. owner per page, -1 = free.
        self._free = torch.arange(num_pages - 1, -1, -1, dtype=torch.int64)  # pops 0, 1, 2...
        self._top = num_pages
        self._owner = torch.full((num_pages,), -1, dtype=torch.int64)
        self._ref = torch.zeros((num_pages,), dtype=torch.int64)  # references per page
        self._backup_stream: torch.cuda.Stream | None = None
        self._last_write: torch.cuda.Event | None = None

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the tier page-locked with ``cudaHostRegister`` (0 when not pinned)."""
        return sum(size for _, size in self._ranges)

    @property
    def total_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ allocator
    @property
    def free_pages(self) -> int:
        return self._top

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._top

    def used_by(self, owner: int) -> int:
        """Live pages allocated by ``owner`` (O(num_pages); for tests and stats)."""
        return int((self._owner == owner).sum())

    def _check(self, needed: int) -> None:
        if needed > self._top:
            raise FreeKVHostPoolFull(
                f"FreeKV host pool full: needed {needed} pages "
                f"({needed * self.page_bytes / _GIB:.3f} GiB), free {self._top} of "
                f"{self.num_pages} pages ({self._top * self.page_bytes / _GIB:.3f} of "
                f"{self.num_pages * self.page_bytes / _GIB:.3f} GiB); raise host_memory_gb"
            )

    def alloc(self, owner: int, n: int) -> torch.Tensor:
        """``n`` page ids for ``owner``: ``[n]`` int64, cpu. Raises FreeKVHostPoolFull."""
        self._check(n)
        ids = self._free[self._top - n : self._top].flip(0).clone()  # [n] int64
        self._top -= n
        self._owner[ids] = owner
        self._ref[ids] = 1
        return ids

    def alloc_each(self, owners: torch.Tensor) -> torch.Tensor:
        """One page per entry of ``owners`` (``[n]`` int64, cpu), vectorized; ``[n]`` int64."""
        n = int(owners.numel())
        self._check(n)
        ids = self._free[self._top - n : self._top].flip(0).clone()
        self._top -= n
        self._owner[ids] = owners.to(torch.int64)
        self._ref[ids] = 1
        return ids

    def refs(self, ids: torch.Tensor) -> torch.Tensor:
        """Reference counts of pages ``ids`` (``[n]`` int64, cpu)."""
        return self._ref[ids.to("cpu", torch.int64)]

    def incref(self, ids: torch.Tensor) -> None:
        """One more reference on each entry of ``ids`` (``[n]`` int, any device; repeats
        count). Every page must be allocated (ValueError otherwise)."""
        ids = ids.to("cpu", torch.int64)
        if ids.numel() == 0:
            return
        if bool((self._ref[ids] <= 0).any()):
            raise ValueError("FreeKVHostPool.incref: a page id is not allocated")
        self._ref.index_add_(0, ids, torch.ones_like(ids))

    def decref(self, ids: torch.Tensor) -> int:
        """Drop one reference per entry of ``ids`` (repeats count); pages reaching 0 return
        to the pool. Returns how many pages were freed. ValueError on a count below 0."""
        ids = ids.to("cpu", torch.int64)
        if ids.numel() == 0:
            return 0
        self._ref.index_add_(0, ids, torch.full_like(ids, -1))
        uniq = torch.unique(ids)
        if bool((self._ref[uniq] < 0).any()):
            raise ValueError("FreeKVHostPool.decref: a page was released more often than held")
        dead = uniq[self._ref[uniq] == 0]
        m = int(dead.numel())
        self._owner[dead] = -1
        self._free[self._top : self._top + m] = dead.flip(0)
        self._top += m
        return m

    def free_owner(self, owner: int) -> int:
        """Drop the allocation reference of every page ``owner`` allocated (pages nobody else
        references return to the pool); returns how many were freed."""
        return self.decref(torch.nonzero(self._owner == owner).flatten())

    # ------------------------------------------------------------------ data
    def write_blocks(self, layer: int, host_ids: torch.Tensor, blocks: torch.Tensor) -> None:
        """Write HND blocks of ``layer`` to host pages.

        Parameters
        ----------
        host_ids : ``[n]`` int64, cpu (or any device; moved to cpu).
        blocks : ``[n, H, 2, P, D]`` ``dtype``, cpu or cuda (HND).

        Note: with CUDA ``blocks`` the D2H copies run non_blocking on a backup stream that
        waits the current stream; call :meth:`wait_writes` before reading those pages on the
        host (the recall engine does).
        """
        ids = host_ids.to("cpu", torch.int64)
        if ids.numel() == 0:
            return
        if blocks.device.type != "cuda":
            self.kv[layer].index_copy_(0, ids, blocks.to(self.dtype))
            return
        if self._backup_stream is None:
            self._backup_stream = torch.cuda.Stream(device=blocks.device)
        stream = self._backup_stream
        # STREAM: the backup stream waits the producer (current stream) of `blocks`.
        stream.wait_stream(torch.cuda.current_stream(blocks.device))
        # REUSE: `blocks` was allocated on the current stream; record it on the backup stream
        # so the caching allocator does not hand its memory out before the D2H has read it.
        blocks.record_stream(stream)
        # Copies go per run of consecutive ids (one DMA each): allocations are mostly runs. A
        # run also breaks where a registration chunk ends (flat index layer*pages + id).
        starts = torch.ones_like(ids, dtype=torch.bool)
        flat = ids + layer * self.num_pages
        starts[1:] = (ids[1:] != ids[:-1] + 1) | (flat[1:] % self._pages_per_chunk == 0)
        bounds = torch.nonzero(starts).flatten().tolist() + [int(ids.numel())]
        with torch.cuda.stream(stream):
            for a, b in zip(bounds[:-1], bounds[1:]):
                first = int(ids[a])
                self.kv[layer, first : first + (b - a)].copy_(blocks[a:b], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)  # STREAM: all writes so far (one in-order backup stream)
        self._last_write = event

    def wait_writes(self) -> None:
        """Block the calling thread until every D2H write issued so far has landed."""
        event = self._last_write
        if event is not None:
            # SYNC: host readers (recall gather) must not read a page whose D2H is in flight.
            event.synchronize()
