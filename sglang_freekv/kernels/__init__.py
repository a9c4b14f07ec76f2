"""FreeKV Triton kernels: page digests, page selection, correction flags, HND<->NHD copies.

Each module holds a private ``@triton.jit`` kernel, a public launcher (validates, then runs
the kernel for CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference; ``impl=``
forces one) and a ``ref_*`` PyTorch reference, which is the spec. Never imports sglang.
"""

from __future__ import annotations

from ._common import next_power_of_2, use_triton
from .correct import correction_flags, cpu_correction_flags, ref_correction_flags
from .digest import page_digest, ref_page_digest
from .direct import backup_direct, recall_direct, ref_backup_direct, ref_recall_direct
from .scatter import backup_gather, recall_scatter, ref_backup_gather, ref_recall_scatter
from .select import (
    CpuScoreWindow,
    cpu_score_pages,
    cpu_select_window,
    cpu_window_scores,
    plan_cpu_window,
    ref_score_pages,
    ref_select_pages,
    score_pages,
    select_pages,
)

__all__ = [
    "CpuScoreWindow",
    "backup_direct",
    "backup_gather",
    "correction_flags",
    "cpu_correction_flags",
    "cpu_score_pages",
    "cpu_select_window",
    "cpu_window_scores",
    "next_power_of_2",
    "page_digest",
    "plan_cpu_window",
    "recall_direct",
    "recall_scatter",
    "ref_backup_direct",
    "ref_backup_gather",
    "ref_correction_flags",
    "ref_page_digest",
    "ref_recall_direct",
    "ref_recall_scatter",
    "ref_score_pages",
    "ref_select_pages",
    "score_pages",
    "select_pages",
    "use_triton",
]
