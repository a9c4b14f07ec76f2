"""FreeKVConfig: the one frozen, validated configuration shared by the CLI and the core.

Every rule raises :class:`FreeKVConfigError` with a single line naming the field, the
value and the rule, so the launcher can print it and exit without a traceback.
This module imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["FreeKVConfig", "FreeKVConfigError", "KV_POLICIES", "ENV_CONFIG", "ENV_POLICY",
           "ENV_INNER_BACKEND", "INNER_BACKENDS", "inner_backend_for"]

KV_POLICIES = ("default", "freekv")

# The launcher exports the resolved policy and config here so every spawned
# scheduler / TP process (and `Engine(**kwargs)` users) sees the same values.
ENV_POLICY = "SGLANG_FREEKV_POLICY"
ENV_CONFIG = "SGLANG_FREEKV_CONFIG"
# The SGLang attention backend the freekv backend wraps (``--attention-backend`` under FreeKV).
ENV_INNER_BACKEND = "SGLANG_FREEKV_ATTENTION_BACKEND"
INNER_BACKENDS = ("flashinfer", "triton", "torch_native")


def inner_backend_for(device_type: str) -> str:
    """The SGLang backend FreeKV wraps: the launcher's choice, else FlashInfer on CUDA and
    torch_native elsewhere (the CPU platform)."""
    chosen = os.environ.get(ENV_INNER_BACKEND)
    if chosen:
        return chosen
    return "flashinfer" if device_type == "cuda" else "torch_native"


class FreeKVConfigError(ValueError):
    """Invalid FreeKV configuration; the message is one line: field, value, rule."""


def _fail(name: str, value: object, rule: str) -> None:
    raise FreeKVConfigError(f"freekv-config: {name}={json.dumps(value)}: {rule}")


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `"budget": true` is a type error, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an integer")
    if value < minimum:  # type: ignore[operator]
        _fail(name, value, f"must be >= {minimum}")


SPECULATIVE_JOBS = ("auto", "layer", "step")


@dataclass(frozen=True, kw_only=True, slots=True)
class FreeKVConfig:
    """FreeKV settings (JSON keys of ``--freekv-config`` are the field names).

    Token counts are per request and per KV head; ``budget`` = sink + retrieved + window.
    """

    page_size: int = 32  # tokens per page (P)
    budget: int = 2048  # device token rows kept per request: sink + top-k pages + window
    sink: int = 512  # leading tokens always resident
    window: int = 512  # most recent tokens always resident, counting the current partial page
    tau: float | None = 0.8  # correction when group-mean cos(q_t, q_{t-1}) < tau; None = off
    speculative: bool = True  # False = select with q_t and recall before attention (baseline)
    # Granularity of the speculative job: "layer" = one job per layer, submitted right after
    # its attention (overlaps the next layers; GPUs); "step" = one job for all sparse layers,
    # submitted after the last one (a CPU engine pays per tensor op, not per byte); "auto" =
    # "step" on CPU devices, "layer" elsewhere.
    speculative_job: str = "auto"
    # CPU engines (the per-step job): a sparse layer whose recent checks found a drifted head
    # in more than this fraction of its requests leaves the speculative job and selects with
    # q_t before attention, as the synchronous mode does (on two cores the job's selection for
    # such a layer is redone by correction anyway); it rejoins when its drift, still probed,
    # falls below the limit - 0.1. 1.0 = every layer speculative. GPUs ignore it.
    # Default 1.0 (off): a layer out of the job follows the synchronous rule, which drops
    # digits of copied needles the speculative rule keeps (docs/design.md "CPU engines").
    spec_drift_limit: float = 1.0
    # Temperature of the per-head page softmax: scores are multiplied by it before the softmax.
    # None = the attention scale 1/sqrt(head_dim); 1.0 = the public reference's raw avgSM.
    score_scale: float | None = None
    # Span continuation: a candidate page scores at least span_weight x its predecessor's
    # score, so a head copying a span across a page boundary keeps the page it reads next
    # (docs/design.md, "Copying a needle across a page boundary"). 0 = plain FreeKV scores.
    span_weight: float = 0.5
    dense_layers: tuple[int, ...] = field(default=(0,))  # layers that keep full attention
    host_memory_gb: float | None = None  # host tier size; None = derived from free RAM

    def __post_init__(self) -> None:
        _check_int("page_size", self.page_size, 1)
        if self.page_size & (self.page_size - 1) or self.page_size > 256:
            _fail("page_size", self.page_size, "must be a power of two <= 256")
        for name in ("budget", "sink", "window"):
            value = getattr(self, name)
            _check_int(name, value, 0)
            if value % self.page_size:
                _fail(name, value, f"must be a multiple of page_size ({self.page_size})")
        if self.window < 2 * self.page_size:
            _fail("window", self.window, f"must hold at least 2 pages ({2 * self.page_size})")
        if self.sink + self.window >= self.budget:
            _fail(
                "budget",
                self.budget,
                f"must exceed sink + window ({self.sink} + {self.window}) to leave room "
                "for retrieved pages",
            )
        if self.tau is not None:
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
                _fail("tau", self.tau, "must be a number in [-1, 1] or null")
            if not -1.0 <= float(self.tau) <= 1.0:
                _fail("tau", self.tau, "must be in [-1, 1] or null")
        if not isinstance(self.speculative, bool):
            _fail("speculative", self.speculative, "must be true or false")
        if self.speculative_job not in SPECULATIVE_JOBS:
            _fail("speculative_job", self.speculative_job,
                  "must be one of " + ", ".join(map(json.dumps, SPECULATIVE_JOBS)))
        value = self.spec_drift_limit
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail("spec_drift_limit", value, "must be a number in [0, 1]")
        if not 0.0 <= float(value) <= 1.0:
            _fail("spec_drift_limit", value, "must be in [0, 1]")
        if self.score_scale is not None:
            value = self.score_scale
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail("score_scale", value, "must be a positive number or null")
            if not 0 < float(value) < float("inf"):
                _fail("score_scale", value, "must be a finite number > 0")
        value = self.span_weight
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail("span_weight", value, "must be a number in [0, 1]")
        if not 0.0 <= float(value) <= 1.0:
            _fail("span_weight", value, "must be in [0, 1]")
        if not isinstance(self.dense_layers, tuple):
            _fail("dense_layers", self.dense_layers, "must be a list of layer ids")
        for layer_id in self.dense_layers:
            if isinstance(layer_id, bool) or not isinstance(layer_id, int) or layer_id < 0:
                _fail("dense_layers", list(self.dense_layers), "must hold integers >= 0")
        if len(set(self.dense_layers)) != len(self.dense_layers):
            _fail("dense_layers", list(self.dense_layers), "must not repeat a layer id")
        if self.host_memory_gb is not None:
            value = self.host_memory_gb
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail("host_memory_gb", value, "must be a positive number or null")
            if not value > 0:
                _fail("host_memory_gb", value, "must be > 0")

    # ------------------------------------------------------------------ derived
    @property
    def budget_pages(self) -> int:
        return self.budget // self.page_size

    @property
    def sink_pages(self) -> int:
        return self.sink // self.page_size

    @property
    def window_pages(self) -> int:
        return self.window // self.page_size

    @property
    def top_k(self) -> int:
        """Retrieved pages per (request, KV head): (budget - sink - window) / page_size."""
        return self.budget_pages - self.sink_pages - self.window_pages

    def score_scale_for(self, head_dim: int) -> float:
        """The page-softmax temperature for ``head_dim`` (``score_scale`` or 1/sqrt(D))."""
        return float(self.score_scale) if self.score_scale is not None else head_dim**-0.5

    def speculative_job_for(self, device_type: str) -> str:
        """``"layer"`` or ``"step"``: ``speculative_job`` with ``"auto"`` resolved for a
        device type (``"cpu"``, ``"cuda"``, ...)."""
        if self.speculative_job != "auto":
            return self.speculative_job
        return "step" if device_type == "cpu" else "layer"

    @property
    def correction(self) -> bool:
        return self.tau is not None

    # ------------------------------------------------------------- model checks
    def validate_for_model(
        self, *, num_layers: int, attention: str = "mha", model: str = "the model"
    ) -> None:
        """Rules that need the model: dense layer ids in range, a servable attention kind.

        ``attention`` is ``"mha"`` for MHA/GQA/MQA models; anything else (``"mla"``,
        ``"hybrid"``...) cannot be served because FreeKV selects pages per KV head.
        """
        if attention != "mha":
            raise FreeKVConfigError(
                f"freekv-config: model={json.dumps(model)}: uses {attention} attention; "
                "the freekv policy serves only MHA/GQA models (per-KV-head paged KV)"
            )
        for layer_id in self.dense_layers:
            if layer_id >= num_layers:
                _fail(
                    "dense_layers",
                    list(self.dense_layers),
                    f"layer id {layer_id} is out of range for {model} with {num_layers} layers",
                )

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreeKVConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise FreeKVConfigError(
                    f"freekv-config: {key}={json.dumps(data[key])}: unknown key "
                    f"(known: {', '.join(sorted(known))})"
                )
        kwargs = dict(data)
        if "dense_layers" in kwargs:
            layers = kwargs["dense_layers"]
            if not isinstance(layers, (list, tuple)):
                _fail("dense_layers", layers, "must be a list of layer ids")
            kwargs["dense_layers"] = tuple(layers)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | None) -> FreeKVConfig:
        if text is None or not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FreeKVConfigError(
                f"freekv-config: {text!r}: is not valid JSON ({exc.msg} at char {exc.pos})"
            ) from None
        if not isinstance(data, dict):
            raise FreeKVConfigError(
                f"freekv-config: {text!r}: must be a JSON object like '{{\"budget\": 1024}}'"
            )
        return cls.from_dict(data)

    @classmethod
    def from_env(cls) -> FreeKVConfig | None:
        """The config exported by the launcher, or None when FreeKV is not active."""
        if os.environ.get(ENV_POLICY, "default") != "freekv":
            return None
        return cls.from_json(os.environ.get(ENV_CONFIG))
