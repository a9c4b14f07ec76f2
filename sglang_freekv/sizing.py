"""How big FreeKV's two tiers are: the host tier (RAM, pinned on GPUs) and the device plan.

Two pure functions, no sglang, no torch device work:

* :func:`host_tier_bytes`: the host tier's size in bytes and which limit set it
  (``host_memory_gb``, or a share of the memory this container may still use: the smaller
  of free RAM and the cgroup memory limit minus its usage).
* :func:`plan_device_memory`: how SGLang's profiled KV budget (bytes of device memory left
  for KV after weights and activations) is spent under FreeKV. Logical tokens are bounded by
  the host tier, not by dense KV: the device holds only a prefill scratch of one layer, one
  ``budget`` of rows per running request (sparse layers), full-size rows of the dense layers
  and the page digests (per host page), so far more logical tokens and requests fit than a
  dense pool of the same bytes would hold.

Rule of the plan, with ``A`` the profiled bytes, ``F`` the fixed cost (prefill scratch), ``r``
the bytes of one running request (its budget rows, ``last_q``, residency, one spare host
page's digest) and ``t`` the device bytes per logical token (dense-layer rows + digests):

1. ``R0 = min(R_cap, (A - F) // (r + context * t))``: as many running requests as fit when
   each could hold a whole context;
2. ``T = min(T_host, (A - F - R0 * r) // t)``: the logical tokens get the rest;
3. if the host tier capped ``T``, the bytes left buy more requests:
   ``R = min(R_cap, (A - F - T * t) // r)``; else ``R = R0``.

Every running request keeps one spare host page (its partial last page), and ``R`` stays small
enough that one whole-context request fits the host tier. A user's ``max_running_requests``
replaces step 1; a user's ``max_total_tokens`` caps ``T``. Whatever is left after the plan is
not reserved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DeviceMemoryPlan",
    "FreeKVSizingError",
    "ModelShape",
    "cgroup_memory_available",
    "host_tier_bytes",
    "plan_device_memory",
]

_GIB = float(1 << 30)
# Share of the usable memory the host tier takes when ``host_memory_gb`` is null.
HOST_FRACTION = 0.4
# Default cap on running requests when the user gives none (device rows are reserved per
# request, so an unbounded cap would turn spare memory into unused budget slots).
DEFAULT_MAX_RUNNING_REQUESTS = 512


class FreeKVSizingError(ValueError):
    """The tiers cannot be sized as asked; the message is one line with the numbers."""


# ---------------------------------------------------------------------------- host tier
def cgroup_memory_available(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup may still allocate (limit - usage), or None
    when no limit is set or no cgroup file can be read (v2 ``memory.max`` /
    ``memory.current``, else v1 ``memory/memory.limit_in_bytes`` / ``memory.usage_in_bytes``).
    """
    base = Path(root)
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit_text = (base / limit_name).read_text().strip()
        except OSError:
            continue
        if limit_text in ("max", ""):
            return None
        limit = int(limit_text)
        if limit >= 1 << 60:  # v1 reports "no limit" as a huge number
            return None
        try:
            usage = int((base / usage_name).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(0, limit - usage)
    return None


def host_tier_bytes(
    host_memory_gb: float | None,
    *,
    free_ram: int,
    cgroup_available: int | None,
) -> tuple[int, str]:
    """The host tier size in bytes and a phrase naming the limit that set it.

    ``free_ram``: available RAM in bytes (e.g. ``psutil.virtual_memory().available``);
    ``cgroup_available``: :func:`cgroup_memory_available` (None = no container limit).
    """
    if host_memory_gb is not None:
        return int(host_memory_gb * _GIB), f"host_memory_gb={host_memory_gb}"
    pct = int(HOST_FRACTION * 100)
    if cgroup_available is not None and cgroup_available < free_ram:
        return (int(cgroup_available * HOST_FRACTION),
                f"{pct}% of the container's memory limit left "
                f"({cgroup_available / _GIB:.1f} GiB, cgroup)")
    return int(free_ram * HOST_FRACTION), f"{pct}% of free RAM ({free_ram / _GIB:.1f} GiB)"


# ---------------------------------------------------------------------------- device plan
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What the plan needs to know of the model on one rank (local KV heads)."""

    num_layers: int  # layers of this rank
    num_dense_layers: int  # of them, layers with full attention (dense_layers)
    num_qo_heads: int  # query heads of this rank
    num_kv_heads: int  # KV heads of this rank
    head_dim: int
    elem_bytes: int  # bytes of one KV element (model dtype)

    @property
    def num_sparse_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def row_bytes(self) -> int:
        """K + V of one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMemoryPlan:
    """Sizes of FreeKV's device memory on one rank (every rank computes the same plan)."""

    max_total_tokens: int  # logical tokens SGLang may allocate (T)
    max_running_requests: int  # requests with a budget on the device (R)
    staging_rows: int  # tokens of the one-layer prefill scratch (one context)
    num_host_pages: int  # host-tier pages to allocate: T / page_size + one spare per request
    budget_bytes: int  # budget rows of all running requests, sparse layers
    staging_bytes: int  # the prefill scratch (one layer)
    dense_bytes: int  # full-size rows of the dense layers
    digest_bytes: int  # key min/max per host page
    other_bytes: int  # last_q, residency
    available_bytes: int  # what SGLang's profiler left for KV (A)

    @property
    def total_bytes(self) -> int:
        return (self.budget_bytes + self.staging_bytes + self.dense_bytes + self.digest_bytes
                + self.other_bytes)

    def describe(self) -> str:
        """One line for the start-up log."""
        gib = lambda b: f"{b / _GIB:.2f}"  # noqa: E731
        return (f"device plan: {gib(self.total_bytes)} of {gib(self.available_bytes)} GiB "
                f"profiled for KV: {self.max_running_requests} running requests x budget "
                f"{gib(self.budget_bytes)} GiB, prefill scratch of one layer "
                f"{self.staging_rows} tokens {gib(self.staging_bytes)} GiB, dense layers "
                f"{gib(self.dense_bytes)} GiB, "
                f"digests {gib(self.digest_bytes)} GiB; max_total_tokens="
                f"{self.max_total_tokens} (host tier {self.num_host_pages} pages)")


def plan_device_memory(
    *,
    available_bytes: int,
    shape: ModelShape,
    page_size: int,
    budget: int,
    top_k: int,
    context_len: int,
    host_bytes: int,
    host_bytes_per_token: int,
    max_total_tokens: int | None = None,
    max_running_requests: int | None = None,
    max_running_cap: int = DEFAULT_MAX_RUNNING_REQUESTS,
) -> DeviceMemoryPlan:
    """FreeKV's device plan (module docstring). ``host_bytes_per_token`` is the host tier's
    bytes per token over *all* ranks (every rank keeps the same number of host pages);
    ``context_len`` the longest request (the prefill scratch holds one whole context).
    Raises :class:`FreeKVSizingError` when not even one request fits."""
    if min(page_size, budget, context_len, host_bytes_per_token) <= 0:
        raise FreeKVSizingError(f"invalid sizes: page_size={page_size} budget={budget} "
                                f"context_len={context_len} "
                                f"host_bytes_per_token={host_bytes_per_token}")
    p = page_size
    row = shape.row_bytes
    sparse_row = shape.num_sparse_layers * row  # one device row over the sparse layers
    dense_row = shape.num_dense_layers * row
    digest_page = shape.num_layers * shape.num_kv_heads * 2 * shape.head_dim * shape.elem_bytes
    host_pages = int(host_bytes // (host_bytes_per_token * p))
    staging_rows = -(-(context_len + p) // p) * p
    # the prefill scratch: one layer (and its margin page); the sparse layers' scratch page
    fixed = (staging_rows + p) * row + p * sparse_row
    per_req = (budget * sparse_row + digest_page  # budget rows + one partial page per request
               + shape.num_layers * (shape.num_qo_heads * shape.head_dim * shape.elem_bytes
                                     + shape.num_kv_heads * top_k * 4))  # last_q, residency
    per_token = dense_row + -(-digest_page // p)
    spare = available_bytes - fixed
    if spare < per_req + budget * per_token:
        need = fixed + per_req + budget * per_token
        raise FreeKVSizingError(
            f"freekv: the device has {available_bytes / _GIB:.3f} GiB for KV, but FreeKV needs "
            f"{need / _GIB:.3f} GiB for its prefill scratch ({staging_rows} rows) and one "
            f"request's budget ({budget} rows); raise --mem-fraction-static, lower "
            "--context-length or the budget")
    t_cap = (max_total_tokens // p * p) if max_total_tokens is not None else None

    def tokens_for(r: int) -> tuple[int, bool]:
        """Logical tokens left for ``r`` requests, and whether the host tier (or the
        user's cap) bounds them rather than device memory."""
        host_t = (host_pages - r) * p  # the host tier keeps one spare page per request
        if t_cap is not None:
            host_t = min(host_t, t_cap)
        dev_t = (spare - r * per_req) // per_token // p * p
        return int(min(host_t, dev_t)), host_t <= dev_t

    # Requests the host tier allows while one whole-context request still fits in it (every
    # running request keeps one spare host page for its partial last page).
    host_cap = max(1, host_pages - -(-context_len // p))
    if max_running_requests is not None:
        # an upper bound, as SGLang reads --max-running-requests: never so many requests
        # that their spare pages leave the host tier short of one whole context
        r = max(1, min(int(max_running_requests), host_cap))
    else:
        r = int(min(max_running_cap, host_cap,
                    max(1, spare // (per_req + context_len * per_token))))
    t, host_bound = tokens_for(r)
    if max_running_requests is None and host_bound:
        # The host tier caps the logical tokens: spend the device bytes left on requests.
        r = int(min(max_running_cap, host_cap, max(r, (spare - t * per_token) // per_req)))
        t, _ = tokens_for(r)
    if t < budget:
        raise FreeKVSizingError(
            f"freekv: {r} running requests leave room for only {max(t, 0)} logical tokens "
            f"(fewer than one budget, {budget}) with {host_pages} host pages and "
            f"{available_bytes / _GIB:.3f} GiB of device memory for KV; raise "
            "host_memory_gb or --mem-fraction-static, or lower --max-running-requests")
    num_host_pages = t // p + r
    return DeviceMemoryPlan(
        max_total_tokens=int(t),
        max_running_requests=int(r),
        staging_rows=staging_rows,
        num_host_pages=num_host_pages,
        budget_bytes=r * budget * sparse_row,
        staging_bytes=fixed,
        dense_bytes=t * dense_row,
        digest_bytes=num_host_pages * digest_page,
        other_bytes=r * (per_req - budget * sparse_row - digest_page),
        available_bytes=int(available_bytes),
    )
