"""Decode throughput of the real server on CPU: default vs FreeKV vs FreeKV synchronous.

Same run, same prompt (a passkey haystack of ~``--context`` tokens built with the embedded
model's tokenizer), the embedded model (SmolLM2-135M-Instruct). Configurations:

==================  =========================================================================
``default``         ``--kv-policy default`` (dense torch_native attention), long context
``freekv``          ``--kv-policy freekv`` budget 1024 (sink 128, window 256), speculative
``freekv_sync``     the same with ``"speculative": false`` (select + recall before attention)
``default_short``   default at ``--short-context`` tokens (the prompt is shorter than the
                    budget; with the defaults the request crosses it while decoding: 1000 +
                    64 > 1024)
``freekv_short``    freekv at ``--short-context`` tokens; a request that crosses the budget
                    while decoding also gets its decode tok/s below and past it (split at
                    the first sparse step, from the streamed tokens' clocks)
``freekv_layer``    opt-in (``--configs``): freekv with ``"speculative_job": "layer"`` (one
                    speculative job per layer instead of the CPU default, one per step)
``freekv_nospan``   freekv with ``"span_weight": 0`` (span continuation off), the
                    A/B of its decode cost
``freekv_drift``    opt-in: freekv with ``"spec_drift_limit": 0.5`` (CPU step job: sparse
                    layers that keep drifting move out of it; off by default)
==================  =========================================================================

Every configuration runs once per ``--dtype`` (default ``bfloat16,float32``: the model's own
dtype, what users run, then float32), all in the same run. Servers run with SGLang's default
flags (radix cache on); each measured request has its own prompt (another passkey seed), so
no repeat is a cache hit.

One server per policy (the short-context runs reuse their policy's server), all started for a
dtype and warmed up with one short request, then paused (SIGSTOP: an idle SGLang scheduler on
CPU spins on a core). ``--repeats`` rounds follow; each round runs every configuration once
(order rotated per round), resuming only its server, so the machine's drift hits every
configuration alike. Each measured request: ``--new-tokens`` tokens (``ignore_eos``, greedy,
streamed). Every server started here is stopped. Decode tok/s = (new_tokens - 1) / (t_last - t_first), with client clocks at
the first and the last streamed token (the first includes the prefill; SGLang's
``meta_info.first_token_latency`` is not always present for long non-streamed prompts); the
median over repeats is reported, next to SGLang's own ``meta_info`` timings when present.

    python benchmarks/bench_decode.py [--context 6500] [--short-context 1000] [--new-tokens 64]
        [--repeats 2] [--dtype bfloat16,float32] [--quick] [--configs default,freekv,...]
        [--sweep 1500,3000]
        [--out benchmarks/results/bench_decode_cpu.json]

``--sweep`` adds contexts measured on every server of the run (rows ``<server>@<tokens>``),
for the plot of decode tok/s vs context. A progress bar follows each streamed request.

Prints a table, the bar checks as PASS/FAIL lines (never asserts) and writes JSON and a plot
(decode tok/s vs context per configuration, ``<out>.png``; also to $OUT/ when OUT is set).
Bars, per dtype: freekv at the long context >= 0.85x default_short (the ceiling: attention
over a budget-sized context), freekv >= freekv_sync, freekv_short within 5% of
default_short, and (when measured) freekv within 5% of freekv_nospan. freekv / default at the
long context is reported next to them, and (informative) freekv_short / default_short over
the decode steps below the budget and over those past it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from _results import plot_decode, progress_bar, write_results  # noqa: E402

from tests.helpers import Server, embedded_model_path, run_server  # noqa: E402
from tests.passkey import build_passkey_prompt  # noqa: E402

BUDGET_CFG = {"budget": 1024, "sink": 128, "window": 256}
CONFIGS = {
    # name: (server key, context key)
    "default": ("default", "long"),
    "freekv": ("freekv", "long"),
    "freekv_sync": ("freekv_sync", "long"),
    "default_short": ("default", "short"),
    "freekv_short": ("freekv", "short"),
    "freekv_layer": ("freekv_layer", "long"),
    "freekv_nospan": ("freekv_nospan", "long"),
    "freekv_drift": ("freekv_drift", "long"),
}
DEFAULT_CONFIGS = ("default", "freekv", "freekv_sync", "freekv_nospan", "default_short",
                   "freekv_short")
SERVER_ORDER = ("default", "freekv", "freekv_sync", "freekv_layer", "freekv_nospan",
                "freekv_drift")


def server_args(key: str, model: str, dtype: str, tp: int) -> list[str]:
    args = ["--model-path", model, "--dtype", dtype, "--tp", str(tp)]
    if key == "default":
        return args + ["--kv-policy", "default"]
    cfg = dict(BUDGET_CFG)
    if key == "freekv_sync":
        cfg["speculative"] = False
    if key == "freekv_layer":
        cfg["speculative_job"] = "layer"
    if key == "freekv_nospan":
        cfg["span_weight"] = 0.0
    if key == "freekv_drift":
        cfg["spec_drift_limit"] = 0.5
    return args + ["--kv-policy", "freekv", "--freekv-config", json.dumps(cfg)]


def generate(url: str, input_ids: list[int], new_tokens: int) -> dict:
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        "stream": False,
    }
    t0 = time.perf_counter()
    resp = requests.post(f"{url}/generate", json=payload, timeout=3600)
    wall = time.perf_counter() - t0
    resp.raise_for_status()
    out = resp.json()
    out["client_wall_s"] = wall
    return out


def stream_generate(url: str, input_ids: list[int], new_tokens: int, desc: str = "") -> dict:
    """Streamed greedy request; client clocks at the first and the last token chunk."""
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    t0 = time.perf_counter()
    t_first = t_last = None
    last: dict = {}
    stamps: list[tuple[int, float]] = []  # (completion_tokens, client clock) per chunk
    with requests.post(f"{url}/generate", json=payload, stream=True, timeout=3600) as resp, \
            progress_bar(new_tokens, desc or f"{len(input_ids)} tokens") as bar:
        resp.raise_for_status()
        done = 0
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or b"[DONE]" in line:
                continue
            now = time.perf_counter()
            chunk = json.loads(line[5:])
            n = chunk.get("meta_info", {}).get("completion_tokens", 0)
            if n >= 1:
                t_first = t_first or now
                t_last = now
                stamps.append((n, now - t0))
                bar.update(n - done)
                done = n
            last = chunk
    return {"meta_info": last.get("meta_info", {}), "text": last.get("text", ""),
            "t_first": (t_first or t0) - t0, "t_last": (t_last or t0) - t0, "stamps": stamps}


def token_time(stamps: list[tuple[int, float]], i: int) -> float | None:
    """Client clock when output token ``i`` (1-based) had arrived: the first chunk whose
    ``completion_tokens`` reaches ``i`` (None if none did)."""
    return next((t for n, t in stamps if n >= i), None)


def split_rates(stamps: list[tuple[int, float]], prompt_tokens: int, n_tokens: int,
                budget: int) -> dict | None:
    """Decode tok/s of the steps below FreeKV's budget and of those past it.

    Output token ``i >= 2`` comes from a decode step whose seq_len (the token fed in
    included) is ``prompt_tokens + i - 1``; FreeKV is sparse there iff that exceeds
    ``budget`` (a multiple of the page size), i.e. iff ``i > c = budget + 1 - prompt_tokens``.
    None unless both parts hold at least 4 steps. The same split applies to any policy's
    run (the default policy's run at the same positions is the comparison).
    """
    c = budget + 1 - prompt_tokens  # last token of a dense step
    if c - 1 < 4 or n_tokens - c < 4:
        return None
    t1, tc, tn = (token_time(stamps, i) for i in (1, c, n_tokens))
    if t1 is None or tc is None or tn is None or not t1 < tc < tn:
        return None
    return {"last_dense_token": c, "below_budget_tok_s": (c - 1) / (tc - t1),
            "past_budget_tok_s": (n_tokens - c) / (tn - tc)}


def measure_one(url: str, input_ids: list[int], new_tokens: int, desc: str) -> dict:
    """One streamed greedy request; its decode tok/s and timings, and (when the request
    crosses FreeKV's budget while decoding) the rates below and past it."""
    out = stream_generate(url, input_ids, new_tokens, desc)
    meta = out["meta_info"]
    n = int(meta["completion_tokens"])
    ttft, total = out["t_first"], out["t_last"]
    decode_s = total - ttft
    prompt = int(meta["prompt_tokens"])
    return {
        "budget_split": split_rates(out["stamps"], prompt, n, BUDGET_CFG["budget"]),
        "prompt_tokens": prompt,
        "completion_tokens": n,
        "e2e_s": total,
        "ttft_s": ttft,
        "decode_s": decode_s,
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 and n > 1 else float("nan"),
        "server_e2e_latency": meta.get("e2e_latency"),
        "server_first_token_latency": meta.get("first_token_latency"),
        "server_decode_throughput": meta.get("decode_throughput"),
        "text": out["text"][:80],
    }


def checks(rows: dict) -> list[dict]:
    """The bars of one dtype's rows (see the module docstring); ``target`` is informative."""
    def tps(name: str) -> float | None:
        return rows[name]["decode_tok_s"] if name in rows else None

    out = []
    for name, num, den, bar, target in (
        ("freekv (long) / default_short (>= 0.85 of the ceiling)", "freekv", "default_short",
         0.85, None),
        ("freekv / default (long context)", "freekv", "default", None, None),
        ("freekv / freekv_sync (speculative >= synchronous)", "freekv", "freekv_sync", 1.0, None),
        ("freekv / freekv_layer (step job vs per-layer jobs, CPU)", "freekv", "freekv_layer",
         1.0, None),
        ("freekv / freekv_nospan (span continuation costs <= 5%)", "freekv", "freekv_nospan",
         0.95, None),
        ("freekv_drift / freekv (drifting layers out of the step job)", "freekv_drift",
         "freekv", None, None),
        ("freekv_short / default_short (within 5%)", "freekv_short", "default_short", 0.95, None),
    ):
        a, b = tps(num), tps(den)
        if a is None or b is None:
            continue
        ratio = a / b
        out.append({"check": name, "ratio": ratio, "bar": bar, "target": target,
                    "pass": None if bar is None else ratio >= bar,
                    "target_met": None if target is None else ratio >= target})
    # The short request crosses the budget while decoding (1000 + 64 > 1024): its steps
    # below the budget (dense regime) and past it (sparse, a few pages over), each against
    # the default policy's steps at the same positions. Informative; the bar is on the whole.
    for part in ("below_budget", "past_budget"):
        a, b = (rows.get(n, {}).get(f"{part}_tok_s") for n in ("freekv_short", "default_short"))
        if a is not None and b is not None:
            out.append({"check": f"freekv_short / default_short, decode steps "
                                 f"{part.replace('_', ' ')}", "ratio": a / b, "bar": None,
                        "target": None, "pass": None, "target_met": None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=6500, help="long-context prompt tokens")
    ap.add_argument("--short-context", type=int, default=1000,
                    help="short-context prompt tokens (default_short: the ceiling)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="measured requests per config")
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: context 3000, 24 new tokens, 1 repeat")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--dtype", default="bfloat16,float32",
                    help="comma-separated model dtypes, each a full run of the configs "
                         "(bfloat16: the model's own; float32 next to it)")
    ap.add_argument("--sweep", default="",
                    help="extra prompt lengths (comma-separated tokens) measured on every "
                         "server of the run, for the context plot")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/bench_decode_cpu.json, "
                         "bench_decode_cpu_quick.json with --quick); the plot goes next to it")
    args = ap.parse_args()
    if args.out is None:
        stem = "bench_decode_cpu_quick" if args.quick else "bench_decode_cpu"
        args.out = str(REPO / "benchmarks" / "results" / f"{stem}.json")
    # SIGTERM unwinds like Ctrl-C, so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.context, args.new_tokens, args.repeats = 3000, 24, 1

    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    try:
        sweep = sorted({int(t) for t in args.sweep.split(",") if t.strip()})
    except ValueError:
        ap.error(f"--sweep: comma-separated token counts, got {args.sweep!r}")
    if any(t < 200 or t > 8000 for t in sweep):
        ap.error(f"--sweep: prompt lengths must be in [200, 8000] (the model's context is "
                 f"8192), got {sweep}")
    configs = dict(CONFIGS)
    servers = {CONFIGS[n][0] for n in wanted}
    for tokens in sweep:
        for key in sorted(servers):
            name = f"{key}@{tokens}"
            configs[name] = (key, f"sweep{tokens}")
            wanted.append(name)

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("bfloat16", "float16", "float32", "auto")]
    if bad or not dtypes:
        ap.error(f"--dtype: comma-separated of bfloat16, float16, float32, auto; got {args.dtype!r}")

    model = embedded_model_path()
    lengths = {"long": args.context, "short": args.short_context,
               **{f"sweep{t}": t for t in sweep}}
    # One prompt per repeat (another passkey seed each), so with the radix cache on no
    # measured request is a cache hit.
    prompts = {key: [build_passkey_prompt(model, n, depth=0.5, seed=1 + i)
                     for i in range(args.repeats)] for key, n in lengths.items()}
    warm = build_passkey_prompt(model, 200, depth=0.5, seed=100)
    print(f"prompts: long {prompts['long'][0].n_tokens} tokens, short "
          f"{prompts['short'][0].n_tokens} tokens; {args.new_tokens} new tokens x "
          f"{args.repeats}; dtypes {dtypes}; tp {args.tp}", flush=True)

    rows: dict[str, dict[str, dict]] = {d: {} for d in dtypes}
    errors: dict[str, str] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench_decode_"))

    def report() -> None:
        all_checks: dict[str, list[dict]] = {}
        for dtype in dtypes:
            print(f"\n[{dtype}]")
            print(f"{'config':<15} {'context':>7} {'new':>4} {'ttft s':>8} {'decode s':>9} "
                  f"{'decode tok/s':>13}")
            for name in wanted:
                if name not in rows[dtype]:
                    continue
                r = rows[dtype][name]
                r0 = r["runs"][0]
                print(f"{name:<15} {r['context']:>7} {r0['completion_tokens']:>4} "
                      f"{r0['ttft_s']:>8.2f} {r0['decode_s']:>9.2f} {r['decode_tok_s']:>13.2f}")
            all_checks[dtype] = checks(rows[dtype])
            for c in all_checks[dtype]:
                verdict = "INFO" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
                bar = "" if c["bar"] is None else f" (bar {c['bar']:.2f})"
                print(f"{verdict} [{dtype}] {c['check']}: {c['ratio']:.3f}{bar}")

        flat = [rows[d][n] for d in dtypes for n in wanted if n in rows[d]]
        result = {
            "benchmark": "bench_decode",
            "device": "cpu",
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "cpu_flags_bf16": _cpu_bf16_flags(),
            "model": "SmolLM2-135M-Instruct",
            "dtypes": dtypes,
            "tp": args.tp,
            "quick": args.quick,
            "context": args.context,
            "short_context": args.short_context,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "sweep": sweep,
            "freekv_config": BUDGET_CFG,
            "server_flags": "SGLang defaults (radix cache on) + --kv-policy/--freekv-config",
            "method": "decode tok/s = (completion_tokens - 1) / (t_last_token - t_first_token), "
                      "client clocks on a streamed /generate; median over repeats, one prompt "
                      "per repeat",
            "rows": flat,
            "checks": all_checks,
            "errors": errors,
        }
        out = Path(args.out)
        subtitle = (f"SmolLM2-135M {', '.join(dtypes)}, {os.cpu_count()} CPUs, TP{args.tp}, "
                    f"{args.new_tokens} new tokens x {args.repeats} runs"
                    + (" (--quick)" if args.quick else ""))
        write_results(out.stem, result, out_dir=out.parent,
                      plot=lambda: plot_decode(result["rows"], subtitle=subtitle))

    for dtype in dtypes:
        keys = [k for k in SERVER_ORDER if any(configs[n][0] == k for n in wanted)]
        with contextlib.ExitStack() as stack:
            up: dict[str, Server] = {}
            for key in keys:
                t0 = time.perf_counter()
                try:
                    server = stack.enter_context(
                        run_server(server_args(key, model, dtype, args.tp), logs, timeout_s=600))
                    stack.callback(_resume, server)  # a paused server cannot stop
                    generate(server.url, list(warm.input_ids), 8)  # warm-up
                    _pause(server)
                    up[key] = server
                    print(f"[{dtype} {key}] server up in {time.perf_counter() - t0:.0f}s "
                          "(paused)", flush=True)
                except Exception as exc:  # noqa: BLE001 - a failed server is reported, not fatal
                    print(f"[{dtype} {key}] FAILED: {str(exc)[-1500:]}", flush=True)
                    errors[f"{dtype} {key}"] = str(exc)[-4000:]
            names = [n for n in wanted if configs[n][0] in up]
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for i in range(args.repeats):
                # Rounds interleave the configurations (rotated each round), one server
                # running at a time, so drift of this machine's speed hits them alike.
                order = names[i % len(names):] + names[:i % len(names)] if names else []
                for name in order:
                    server = up[configs[name][0]]
                    _resume(server)
                    try:
                        p = prompts[configs[name][1]][i]
                        runs[name].append(measure_one(server.url, list(p.input_ids),
                                                      args.new_tokens,
                                                      f"{dtype} {name} run {i + 1}"))
                    except Exception as exc:  # noqa: BLE001
                        print(f"[{dtype} {name}] FAILED: {str(exc)[-1500:]}", flush=True)
                        errors[f"{dtype} {name}"] = str(exc)[-4000:]
                    finally:
                        _pause(server)
            for name in names:
                if not runs[name]:
                    continue
                key = configs[name][0]
                rows[dtype][name] = {
                    "config": name, "server": key, "dtype": dtype,
                    "context": prompts[configs[name][1]][0].n_tokens,
                    "args": server_args(key, "M", dtype, args.tp)[2:],
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs[name]),
                    "runs": runs[name]}
                splits = [r["budget_split"] for r in runs[name]]
                if all(splits):
                    for part in ("below_budget", "past_budget"):
                        rows[dtype][name][f"{part}_tok_s"] = statistics.median(
                            sp[f"{part}_tok_s"] for sp in splits)
                print(f"[{dtype} {key}] {name}: {rows[dtype][name]['decode_tok_s']:.2f} "
                      f"decode tok/s ({[round(r['decode_tok_s'], 2) for r in runs[name]]})",
                      flush=True)
        report()


def _pause(server: Server) -> None:
    """Stop every process of an idle server (an idle SGLang scheduler on CPU spins on a core,
    which would slow the server being measured)."""
    os.killpg(server.proc.pid, signal.SIGSTOP)


def _resume(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGCONT)


def _cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 / AMX feature flags (Linux), to tell machines apart in results."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


if __name__ == "__main__":
    main()
