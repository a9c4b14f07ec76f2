"""FreeKV's serving core: engine-facing logic on logical token ids (imports no sglang).

``rows`` (device row layout and allocator), ``tokens`` (logical id -> host slot map for
prefix sharing), ``prefill`` (the one-layer prefill scratch) and ``core`` (:class:`FreeKVServing`, the plan/run API the SGLang adapters in
``sglang_freekv.patches`` call).
"""

from sglang_freekv.serving.core import FreeKVServing, ServingUsage
from sglang_freekv.serving.prefill import ExtendStep, FreeKVStagingFull
from sglang_freekv.serving.rows import BudgetSlots, DeviceRows
from sglang_freekv.serving.tokens import TokenMap

__all__ = [
    "BudgetSlots",
    "DeviceRows",
    "ExtendStep",
    "FreeKVServing",
    "FreeKVStagingFull",
    "ServingUsage",
    "TokenMap",
]
