"""SGLang hooks of sglang-freekv, registered through SGLang's plugin entry point.

``apply_all`` is the ``sglang.srt.plugins`` entry point: SGLang's ``load_plugins()`` calls it
early in every process (launcher, schedulers / TP ranks, detokenizer) and then applies the
registered hooks once. It is idempotent and cheap: the heavy imports happen inside hooks.

Modules, each owning the SGLang symbols it touches (see its docstring):
- ``cpu_platform``: TP head padding flags and per-rank thread pinning for FreeKVCpuPlatform.
- ``server_args``: ``--kv-policy`` / ``--freekv-config`` on the CLI, validation, and hand-off
  of the resolved policy to every scheduler process.
- ``freekv_pool``: the KV pool (full-size dense layers, budget-size sparse layers).
- ``freekv_backend``: the ``freekv`` attention backend and request-release hook.
- ``freekv_metrics``: Prometheus counters and gauges per TP rank.
"""

from __future__ import annotations

_applied = False


def apply_all() -> None:
    """Register every FreeKV hook with SGLang's HookRegistry (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    from sglang_freekv.patches import cpu_platform, freekv_backend, freekv_pool, server_args

    cpu_platform.register()
    server_args.register()
    freekv_pool.register()
    freekv_backend.register()
