"""SGLang hooks of sglang-freekv, registered through SGLang's plugin entry point.

``apply_all`` is the ``sglang.srt.plugins`` entry point: SGLang's ``load_plugins()`` calls it
early in every process (launcher, schedulers / TP ranks, detokenizer). It checks the
installed sglang is the pinned release, registers every hook, applies them at once and
verifies each target is patched. SGLang's registry only *logs* a hook it cannot apply, so a
renamed symbol would silently drop a hook (a lost ``free_rows`` hook leaks host pages until
the scheduler crashes): here anything missing stops the process with one line naming the
symbol and the pinned version (exit status 2).

Modules, each owning the SGLang symbols it touches (its ``TARGETS`` and docstring):
- ``cpu_platform``: TP head padding flags, per-rank thread pinning and the simulated device
  memory of FreeKVCpuPlatform.
- ``server_args``: ``--kv-policy`` / ``--freekv-config`` on the CLI, validation, and hand-off
  of the resolved policy to every scheduler process.
- ``freekv_pool``: memory sizing and the KV pool (dense layers full-size, sparse layers
  budget + staging rows).
- ``freekv_backend``: the ``freekv`` attention backend (a wrapper of SGLang's own) and the
  release hooks.
- ``freekv_metrics``: Prometheus counters and gauges per TP rank.
- ``request_checks``: requests refused before they are scheduled (an empty prompt).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

PINNED_SGLANG = "0.5.23"

_applied = False


class HookTargetError(RuntimeError):
    """A patched SGLang symbol is missing or was not patched (one-line message)."""


def _die(message: str) -> None:
    print(f"error: sglang-freekv: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def installed_sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        import sglang

        return str(getattr(sglang, "__version__", "unknown"))


def resolve_target(target: str) -> Any:
    """The object a dotted hook target names (``module.attr[.attr...]``); raises
    :class:`HookTargetError` naming the target when it does not exist."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise HookTargetError(f"{target} does not exist in the installed sglang "
                          f"{installed_sglang_version()}; sglang-freekv needs "
                          f"sglang=={PINNED_SGLANG}")


def _is_patched(target: str, hooks: list[Any]) -> bool:
    """Whether ``target`` now resolves to SGLang's wrapper (``__wrapped__``) or, for a
    REPLACE hook, to the replacement itself."""
    obj = resolve_target(target)
    if getattr(obj, "__wrapped__", None) is not None:
        return True
    return any(obj is fn or getattr(obj, "__func__", None) is fn for _, fn, _ in hooks)


def verify_hooks(targets: list[str]) -> None:
    """Every ``target`` resolves and (for registered hooks) is patched; else
    :class:`HookTargetError` naming the first one that is not."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered: dict[str, list[Any]] = HookRegistry._hooks  # target -> [(type, fn, src)]
    for target in targets:
        resolve_target(target)
        hooks = registered.get(target)
        if hooks and not _is_patched(target, hooks):
            raise HookTargetError(f"the hook on {target} was not applied (see SGLang's log "
                                  f"above); sglang-freekv needs sglang=={PINNED_SGLANG}")


def apply_all() -> None:
    """Register, apply and verify every FreeKV hook (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    found = installed_sglang_version()
    if found != PINNED_SGLANG:
        _die(f"installed sglang is {found}; this plugin patches sglang=={PINNED_SGLANG} "
             f"(pip install 'sglang=={PINNED_SGLANG}')")
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry

        from sglang_freekv.patches import (
            cpu_platform,
            freekv_backend,
            freekv_pool,
            request_checks,
            server_args,
        )

        targets = [*server_args.TARGETS, *freekv_pool.TARGETS, *freekv_backend.TARGETS,
                   *request_checks.TARGETS]
        if cpu_platform.active():
            targets += list(cpu_platform.active_targets())
        for target in targets:  # before registering: a missing one names itself here
            resolve_target(target)
        cpu_platform.register()
        server_args.register()
        freekv_pool.register()
        freekv_backend.register()
        request_checks.register()
        # Apply now (load_plugins applies again afterwards; applied targets are skipped),
        # so a hook SGLang could not apply is caught here instead of logged.
        HookRegistry.apply_hooks()
        verify_hooks(targets)
    except HookTargetError as exc:
        _die(str(exc))


def all_targets() -> list[str]:
    """Every SGLang symbol any FreeKV hook may touch (for tests and docs)."""
    from sglang_freekv.patches import (
        cpu_platform,
        freekv_backend,
        freekv_pool,
        request_checks,
        server_args,
    )

    return [*server_args.TARGETS, *freekv_pool.TARGETS, *freekv_backend.TARGETS,
            *request_checks.TARGETS, *cpu_platform.TARGETS]


__all__ = ["PINNED_SGLANG", "HookTargetError", "all_targets", "apply_all", "resolve_target",
           "verify_hooks"]
