"""``--kv-policy {default,freekv}`` and ``--freekv-config JSON`` on SGLang's command line.

Changes (all through SGLang's HookRegistry):
- ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AFTER): adds the two flags, so
  ``python -m sglang.launch_server --help`` lists them.
- ``sglang.srt.server_args.ServerArgs.from_cli_args`` (AROUND): parses and validates the
  policy and config (model-dependent rules included), stores them as underscore bookkeeping
  attributes on the record (they survive the pickling into every scheduler / TP process) and
  exports them to ``SGLANG_FREEKV_POLICY`` / ``SGLANG_FREEKV_CONFIG`` for ``Engine`` users and
  spawned children. Invalid input prints one line naming the field, the value and the rule,
  and exits with status 2 (no traceback).
- ``sglang.srt.managers.scheduler.Scheduler.__init__`` (AFTER): records the policy on the
  scheduler and logs it once per rank; under FreeKV also remembers the scheduler, whose radix
  cache FreeKV evicts from when host-tier pages run out.

Under FreeKV the launcher resolves the host tier's size, and when the tier holds fewer tokens
than the model context, caps ``context_length`` to the tier: SGLang's tokenizer manager then
refuses a prompt, or a prompt + ``max_new_tokens``, beyond it with HTTP 400. It turns off
prefill CUDA graphs (one line says so) and leaves decode graphs, chunked prefill and the
overlap scheduler as the user set them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sglang_freekv.config import (
    ENV_CONFIG,
    ENV_INNER_BACKEND,
    ENV_POLICY,
    INNER_BACKENDS,
    KV_POLICIES,
    FreeKVConfig,
    FreeKVConfigError,
)
from sglang_freekv.sizing import cgroup_memory_available, host_tier_bytes

logger = logging.getLogger(__name__)

_ADD = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM = "sglang.srt.server_args.ServerArgs.from_cli_args"
_SCHED = "sglang.srt.managers.scheduler.Scheduler.__init__"
TARGETS = (_ADD, _FROM, _SCHED)

POLICY_ATTR = "_freekv_policy"
# Running requests on the CPU platform without a simulated device memory (RAM is the
# "device"; each running request holds `budget` rows of every sparse layer).
CPU_MAX_RUNNING_REQUESTS = 32
DEFAULT_MEM_FRACTION = 0.8  # --mem-fraction-static under FreeKV unless given
CONFIG_ATTR = "_freekv_config"


def add_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    if any("--kv-policy" in a.option_strings for a in parser._actions):
        return  # a second registration (tests call apply twice)
    group = parser.add_argument_group("FreeKV (sglang-freekv plugin)")
    group.add_argument(
        "--kv-policy",
        choices=list(KV_POLICIES),
        default="default",
        help="KV-cache policy: 'default' is stock SGLang; 'freekv' keeps each request's full "
        "KV in host memory and a small budget on the device (speculative retrieval).",
    )
    group.add_argument(
        "--freekv-config",
        default=None,
        metavar="JSON",
        help="FreeKV settings as a JSON object. Keys (defaults): page_size (32), budget "
        "(2048: device tokens per request = sink + retrieved + window), sink (512), window "
        "(512), tau (0.8; null turns correction off), speculative (true), dense_layers ([0]), "
        "host_memory_gb (null: derived from free RAM).",
    )


def model_attention_kind(model_path: str) -> tuple[str, int | None, str]:
    """(attention kind, number of layers or None if unknown, model name) from config.json."""
    cfg_file = Path(model_path) / "config.json"
    name = Path(model_path).name or model_path
    if not cfg_file.is_file():
        return "mha", None, name
    cfg = json.loads(cfg_file.read_text())
    text = cfg.get("text_config") or cfg
    archs = " ".join(cfg.get("architectures") or [])
    num_layers = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")
    if text.get("kv_lora_rank") or "Deepseek" in archs:
        return "mla", num_layers, name
    layer_types = text.get("layer_types") or []
    if any(t not in ("full_attention", "attention") for t in layer_types):
        return "hybrid", num_layers, name
    if any(k in archs for k in ("Mamba", "Jamba", "NemotronH", "FalconH1")):
        return "hybrid", num_layers, name
    return "mha", num_layers, name


def resolve_policy(policy: str, config_json: str | None, model_path: str | None) -> str | None:
    """Validate and return the config JSON to hand on (None for the default policy)."""
    if policy != "freekv":
        if config_json:
            raise FreeKVConfigError(
                f"freekv-config: {config_json!r}: only applies with --kv-policy freekv"
            )
        return None
    config = FreeKVConfig.from_json(config_json)
    if model_path:
        kind, num_layers, name = model_attention_kind(model_path)
        config.validate_for_model(num_layers=num_layers or 1 << 30, attention=kind, model=name)
    return config.to_json()


def _bytes_per_token(model_path: str | None, dtype: str | None, tp: int = 1) -> int | None:
    """Host-tier bytes of one token over all layers and the KV heads of every rank (None if
    unknown): each of ``tp`` ranks keeps ``ceil(H / tp)`` heads (replicated when ``tp`` > H,
    padded when ``tp`` does not divide H), so ``host_memory_gb`` is the real host RAM of the
    tier over all ranks."""
    if not model_path or not (Path(model_path) / "config.json").is_file():
        return None
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    layers = text.get("num_hidden_layers")
    heads = text.get("num_key_value_heads") or text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // max(1, text.get("num_attention_heads", 1)))
    if not (layers and heads and head_dim):
        return None
    if dtype in ("auto", None):
        dtype = str(text.get("dtype") or text.get("torch_dtype") or "bfloat16")
    elem = 4 if "32" in dtype or dtype == "float" else 2
    tp = max(1, int(tp))
    heads_all_ranks = -(-int(heads) // tp) * tp
    return 2 * int(layers) * heads_all_ranks * int(head_dim) * elem


def _context_length(args: argparse.Namespace) -> int | None:
    """--context-length if given, else the model's max_position_embeddings (None if unknown)."""
    given = getattr(args, "context_length", None)
    if given:
        return int(given)
    model_path = getattr(args, "model_path", None)
    cfg_file = Path(model_path) / "config.json" if model_path else None
    if cfg_file is None or not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    value = (cfg.get("text_config") or cfg).get("max_position_embeddings")
    return int(value) if value else None


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for flag, bad in (("speculative_algorithm", None), ("enable_dp_attention", False),
                      ("enable_mixed_chunk", False)):
        value = getattr(args, flag, bad)
        if value not in (bad, None, False):
            raise FreeKVConfigError(
                f"freekv-config: --{flag.replace('_', '-')}={value}: is not supported with "
                "--kv-policy freekv"
            )
    if (getattr(args, "pp_size", 1) or 1) > 1:
        raise FreeKVConfigError("freekv-config: --pp-size: pipeline parallelism is not "
                                "supported with --kv-policy freekv")
    kv_dtype = str(getattr(args, "kv_cache_dtype", None) or "auto")
    if kv_dtype.startswith(("fp8", "fp4", "int")):
        raise FreeKVConfigError(
            f"freekv-config: --kv-cache-dtype={kv_dtype}: FreeKV keeps KV in the model dtype "
            "(quantized KV caches are not supported); drop the flag")
    for flag in ("prefill_attention_backend", "decode_attention_backend"):
        value = getattr(args, flag, None)
        if value not in (None, "freekv"):
            raise FreeKVConfigError(
                f"freekv-config: --{flag.replace('_', '-')}={value}: FreeKV wraps one backend "
                f"for prefill and decode; use --attention-backend "
                f"{{{','.join(INNER_BACKENDS)}}}")
    backend = getattr(args, "attention_backend", None)
    if backend not in (None, "freekv", *INNER_BACKENDS):
        raise FreeKVConfigError(
            f"freekv-config: --attention-backend={backend}: FreeKV decodes through SGLang's "
            f"{', '.join(INNER_BACKENDS)} backends; pick one of them or drop the flag")


def _resolve_host_tier(config: FreeKVConfig) -> tuple[FreeKVConfig, str]:
    """The config with ``host_memory_gb`` resolved to GiB (every rank uses the same), and a
    phrase naming the limit that set it."""
    import psutil

    host_bytes, source = host_tier_bytes(
        config.host_memory_gb, free_ram=int(psutil.virtual_memory().available),
        cgroup_available=cgroup_memory_available())
    return dataclasses.replace(config, host_memory_gb=round(host_bytes / 2**30, 6)), source


def apply_freekv_args(args: argparse.Namespace, config: FreeKVConfig) -> FreeKVConfig:
    """Launcher-side settings the FreeKV serving path needs (one line each, no surprises).
    Returns the config with the host tier resolved."""
    _refuse_unsupported(args)
    if config.speculative_job == "step":
        from sglang_freekv.platform import cpu_platform_wanted

        if not cpu_platform_wanted():
            raise FreeKVConfigError(
                'freekv-config: speculative_job="step": is implemented for CPU engines only; '
                'use "auto" or "layer" on GPUs')
    backend = getattr(args, "attention_backend", None)
    if backend in INNER_BACKENDS:
        os.environ[ENV_INNER_BACKEND] = backend
    else:
        os.environ.pop(ENV_INNER_BACKEND, None)
    args.attention_backend = "freekv"
    # Prefill goes through the one-layer scratch and is written through to the host tier by
    # host work: no prefill graphs. Chunked prefill stays as the user set it (each chunk reads
    # its prefix back from the host tier). The decode step is device work (CUDA), captured.
    args.disable_prefill_cuda_graph = True
    if getattr(args, "mem_fraction_static", None) is None:
        # SGLang's automatic fraction reserves activations for an unchunked prefill of the
        # whole context and goes negative on small machines; FreeKV's pool is budget-sized.
        args.mem_fraction_static = DEFAULT_MEM_FRACTION
    from sglang_freekv.platform import cpu_platform_wanted, simulated_device_bytes

    if cpu_platform_wanted():
        # The CPU engine runs eagerly (no graphs); say what runs instead of claiming graphs.
        graphs = "none on CPU (the CPU engine runs eagerly, FreeKV's host-driven step)"
    elif getattr(args, "disable_cuda_graph", False):
        graphs = "off (--disable-cuda-graph)"
    else:
        graphs = "decode graphs on, FreeKV's step captured with them"
    overlap = "off (--disable-overlap-schedule)" if getattr(
        args, "disable_overlap_schedule", False) else "on"
    chunked = getattr(args, "chunked_prefill_size", None)
    chunks = "off" if chunked is not None and chunked <= 0 else (
        f"{chunked} tokens" if chunked else "SGLang's default size")
    if chunks != "off" and not getattr(args, "prefill_decode_interval", 0):
        # SGLang runs the next chunk before any decode step; one decode step between chunks
        # keeps running requests producing tokens during a long prefill.
        args.prefill_decode_interval = 1
        chunks += ", a decode step between chunks (--prefill-decode-interval 1)"
    print(f"freekv: CUDA graphs {graphs}; prefill graphs off (prefill is written through to "
          f"the host tier layer by layer); chunked prefill {chunks}; overlap scheduler "
          f"{overlap}", file=sys.stderr, flush=True)
    if getattr(args, "max_running_requests", None) is None and cpu_platform_wanted() \
            and simulated_device_bytes() is None:
        # RAM-backed "device": no device memory to size requests from.
        args.max_running_requests = CPU_MAX_RUNNING_REQUESTS
    config, source = _resolve_host_tier(config)
    host_bytes = int(config.host_memory_gb * 2**30)  # type: ignore[operator]
    per_token = _bytes_per_token(getattr(args, "model_path", None), getattr(args, "dtype", "auto"),
                                 int(getattr(args, "tp_size", 1) or 1))
    if per_token is None:
        print(f"freekv: host tier {host_bytes / 2**30:.2f} GiB ({source})", file=sys.stderr,
              flush=True)
        return config
    # Tokens one request can hold: whole pages of the tier, one kept spare for the partial
    # last page of a running request (sglang_freekv.sizing).
    tokens = max(0, host_bytes // (per_token * config.page_size) - 1) * config.page_size
    if tokens < config.budget:
        raise FreeKVConfigError(
            f"freekv-config: host_memory_gb={json.dumps(config.host_memory_gb)}: the host tier "
            f"({host_bytes / 2**30:.3f} GiB, {source}) holds {tokens} tokens, fewer than one "
            f"budget ({config.budget}); give at least {config.budget * per_token / 2**30:.4f} GiB"
        )
    context = _context_length(args)
    if context and tokens < context:
        # Every request must fit the host tier alone, else it would queue forever: serve a
        # shorter context, so SGLang's own request checks refuse prompt (+ max_new_tokens)
        # beyond the tier with HTTP 400 before anything is scheduled.
        args.context_length = tokens
        print(f"freekv: the host tier ({host_bytes / 2**30:.3f} GiB, {source}) holds {tokens} "
              f"tokens, fewer than the model context ({context}): serving with "
              f"--context-length {tokens}; longer requests get HTTP 400", file=sys.stderr,
              flush=True)
    if getattr(args, "max_total_tokens", None) is None:
        from sglang_freekv.platform import max_total_tokens_default

        cap = max_total_tokens_default() if cpu_platform_wanted() else None
        if cap is not None:  # the CPU platform's pool cap applies to the host tier too
            args.max_total_tokens = cap
    print(f"freekv: host tier {host_bytes / 2**30:.2f} GiB, up to {tokens} tokens ({source}); "
          "logical tokens and running requests are sized from it and the device memory at "
          "start-up (see the 'device plan' line)", file=sys.stderr, flush=True)
    return config


def from_cli_args(orig: Any, cls: type, args: argparse.Namespace) -> Any:
    policy = getattr(args, "kv_policy", None) or os.environ.get(ENV_POLICY, "default")
    config_json = getattr(args, "freekv_config", None)
    if config_json is None and policy == "freekv":
        config_json = os.environ.get(ENV_CONFIG)
    try:
        resolved = resolve_policy(policy, config_json, getattr(args, "model_path", None))
        if resolved is not None:
            resolved = apply_freekv_args(args, FreeKVConfig.from_json(resolved)).to_json()
    except FreeKVConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    server_args = orig(cls, args)
    setattr(server_args, POLICY_ATTR, policy)
    setattr(server_args, CONFIG_ATTR, resolved)
    # Spawned scheduler processes inherit the environment; the record carries it too.
    os.environ[ENV_POLICY] = policy
    if resolved is None:
        os.environ.pop(ENV_CONFIG, None)
    else:
        os.environ[ENV_CONFIG] = resolved
    return server_args


def policy_of(server_args: Any = None) -> tuple[str, FreeKVConfig | None]:
    """The policy and config of this process: from the record if it has them, else env."""
    policy = getattr(server_args, POLICY_ATTR, None) if server_args is not None else None
    config_json = getattr(server_args, CONFIG_ATTR, None) if server_args is not None else None
    if policy is None:
        policy = os.environ.get(ENV_POLICY, "default")
        config_json = os.environ.get(ENV_CONFIG)
    if policy != "freekv":
        return policy, None
    return policy, FreeKVConfig.from_json(config_json)


def scheduler_init(result: Any, self: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    from sglang.srt.runtime_context import get_parallel

    policy, config = policy_of(server_args)
    self.freekv_policy = policy
    self.freekv_config = config
    if policy == "freekv":
        from sglang_freekv.patches.freekv_pool import ACTIVE

        ACTIVE["scheduler"] = self  # its tree_cache is evicted when host pages run out
    logger.info(
        "freekv: scheduler tp_rank=%s policy=%s config=%s",
        get_parallel().tp_rank,
        policy,
        config.to_json() if config is not None else "{}",
    )


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADD, add_cli_args, HookType.AFTER)
    HookRegistry.register(_FROM, from_cli_args, HookType.AROUND)
    HookRegistry.register(_SCHED, scheduler_init, HookType.AFTER)
