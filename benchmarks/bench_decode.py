"""Decode throughput of the real server on CPU: default vs FreeKV vs FreeKV synchronous.

Same run, same prompt (a passkey haystack of ~``--context`` tokens built with the embedded
model's tokenizer), the embedded model (SmolLM2-135M-Instruct). Configurations:

==================  =========================================================================
``default``         ``--kv-policy default`` (dense torch_native attention), long context
``freekv``          ``--kv-policy freekv`` budget 1024 (sink 128, window 256), speculative
``freekv_sync``     the same with ``"speculative": false`` (select + recall before attention)
``default_short``   default at ``--short-context`` tokens (shorter than the budget)
``freekv_short``    freekv at ``--short-context`` tokens
``freekv_layer``    opt-in (``--configs``): freekv with ``"speculative_job": "layer"`` (one
                    speculative job per layer instead of the CPU default, one per step)
==================  =========================================================================

One server per policy (the short-context run reuses its policy's server); only one server runs
at a time and every server started here is stopped. Per configuration: one short warm-up
request, then ``--repeats`` measured requests of ``--new-tokens`` tokens (``ignore_eos``,
greedy, streamed). Decode tok/s = (new_tokens - 1) / (t_last - t_first), with client clocks at
the first and the last streamed token (the first includes the prefill; SGLang's
``meta_info.first_token_latency`` is not always present for long non-streamed prompts); the
median over repeats is reported, next to SGLang's own ``meta_info`` timings when present.

    python benchmarks/bench_decode.py [--context 6500] [--new-tokens 64] [--quick]
        [--configs default,freekv,...] [--sweep 1500,3000]
        [--out benchmarks/results/bench_decode_cpu.json]

``--sweep`` adds contexts measured on every server of the run (rows ``<server>@<tokens>``),
for the plot of decode tok/s vs context. A progress bar follows each streamed request.

Prints a table, the bar checks as PASS/FAIL lines (never asserts) and writes JSON and a plot
(decode tok/s vs context per configuration, ``<out>.png``; also to $OUT/ when OUT is set).
Bars (issue item 9): freekv >= 1.3x default at the long context (target 1.6x), freekv >=
freekv_sync, and freekv_short within 5% of default_short.
"""

from __future__ import annotations

import argparse
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

from tests.helpers import embedded_model_path, run_server  # noqa: E402
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
}
DEFAULT_CONFIGS = ("default", "freekv", "freekv_sync", "default_short", "freekv_short")
SERVER_ORDER = ("default", "freekv", "freekv_sync", "freekv_layer")


def server_args(key: str, model: str, dtype: str, tp: int) -> list[str]:
    args = ["--model-path", model, "--dtype", dtype, "--disable-radix-cache", "--tp", str(tp)]
    if key == "default":
        return args + ["--kv-policy", "default"]
    cfg = dict(BUDGET_CFG)
    if key == "freekv_sync":
        cfg["speculative"] = False
    if key == "freekv_layer":
        cfg["speculative_job"] = "layer"
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
                bar.update(n - done)
                done = n
            last = chunk
    return {"meta_info": last.get("meta_info", {}), "text": last.get("text", ""),
            "t_first": (t_first or t0) - t0, "t_last": (t_last or t0) - t0}


def measure(url: str, input_ids: list[int], new_tokens: int, repeats: int, name: str) -> dict:
    runs = []
    for i in range(repeats):
        out = stream_generate(url, input_ids, new_tokens, f"{name} run {i + 1}/{repeats}")
        meta = out["meta_info"]
        n = int(meta["completion_tokens"])
        ttft, total = out["t_first"], out["t_last"]
        decode_s = total - ttft
        runs.append({
            "prompt_tokens": int(meta["prompt_tokens"]),
            "completion_tokens": n,
            "e2e_s": total,
            "ttft_s": ttft,
            "decode_s": decode_s,
            "decode_tok_s": (n - 1) / decode_s if decode_s > 0 and n > 1 else float("nan"),
            "server_e2e_latency": meta.get("e2e_latency"),
            "server_first_token_latency": meta.get("first_token_latency"),
            "server_decode_throughput": meta.get("decode_throughput"),
            "text": out["text"][:80],
        })
    best = statistics.median(r["decode_tok_s"] for r in runs)
    return {"decode_tok_s": best, "runs": runs}


def checks(rows: dict) -> list[dict]:
    def tps(name: str) -> float | None:
        return rows[name]["decode_tok_s"] if name in rows else None

    out = []
    for name, num, den, bar, target in (
        ("freekv / default (long context)", "freekv", "default", 1.3, 1.6),
        ("freekv / freekv_sync (speculative >= synchronous)", "freekv", "freekv_sync", 1.0, None),
        ("freekv / freekv_layer (step job vs per-layer jobs, CPU)", "freekv", "freekv_layer",
         1.0, None),
        ("freekv_short / default_short (within 5%)", "freekv_short", "default_short", 0.95, None),
    ):
        a, b = tps(num), tps(den)
        if a is None or b is None:
            continue
        ratio = a / b
        out.append({"check": name, "ratio": ratio, "bar": bar, "target": target,
                    "pass": ratio >= bar,
                    "target_met": None if target is None else ratio >= target})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=6500, help="long-context prompt tokens")
    ap.add_argument("--short-context", type=int, default=600, help="short-context prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="measured requests per config")
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: context 3000, 24 new tokens, 1 repeat")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--dtype", default="float32",
                    help="model dtype (float32 is faster than bf16 on CPUs without bf16)")
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

    model = embedded_model_path()
    prompts = {
        "long": build_passkey_prompt(model, args.context, depth=0.5, seed=1),
        "short": build_passkey_prompt(model, args.short_context, depth=0.5, seed=1),
    }
    for tokens in sweep:
        prompts[f"sweep{tokens}"] = build_passkey_prompt(model, tokens, depth=0.5, seed=1)
    warm = build_passkey_prompt(model, 200, depth=0.5, seed=2)
    print(f"prompts: long {prompts['long'].n_tokens} tokens, short {prompts['short'].n_tokens}"
          f" tokens; {args.new_tokens} new tokens; dtype {args.dtype}; tp {args.tp}", flush=True)

    rows: dict[str, dict] = {}
    errors: dict[str, str] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    def report() -> None:
        print()
        print(f"{'config':<15} {'context':>7} {'new':>4} {'ttft s':>8} {'decode s':>9} "
              f"{'decode tok/s':>13}")
        for name in wanted:
            if name not in rows:
                continue
            r = rows[name]
            r0 = r["runs"][0]
            print(f"{name:<15} {r['context']:>7} {r0['completion_tokens']:>4} {r0['ttft_s']:>8.2f} "
                  f"{r0['decode_s']:>9.2f} {r['decode_tok_s']:>13.2f}")
        print()
        results = checks(rows)
        for c in results:
            tgt = "" if c["target"] is None else (
                f" (target {c['target']:.2f}: {'met' if c['target_met'] else 'not met'})")
            print(f"{'PASS' if c['pass'] else 'FAIL'} {c['check']}: {c['ratio']:.3f} "
                  f"(bar {c['bar']:.2f}){tgt}")

        result = {
            "benchmark": "bench_decode",
            "device": "cpu",
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "model": "SmolLM2-135M-Instruct",
            "dtype": args.dtype,
            "tp": args.tp,
            "quick": args.quick,
            "context": args.context,
            "short_context": args.short_context,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "sweep": sweep,
            "freekv_config": BUDGET_CFG,
            "method": "decode tok/s = (completion_tokens - 1) / (t_last_token - t_first_token), "
                      "client clocks on a streamed /generate",
            "rows": [rows[n] for n in wanted if n in rows],
            "checks": results,
            "errors": errors,
        }
        out = Path(args.out)
        subtitle = (f"SmolLM2-135M {args.dtype}, {os.cpu_count()} CPUs, TP{args.tp}, "
                    f"{args.new_tokens} new tokens x {args.repeats} runs"
                    + (" (--quick)" if args.quick else ""))
        write_results(out.stem, result, out_dir=out.parent,
                      plot=lambda: plot_decode(result["rows"], subtitle=subtitle))

    for key in SERVER_ORDER:
        names = [n for n in wanted if configs[n][0] == key]
        if not names:
            continue
        t0 = time.perf_counter()
        try:
            with run_server(server_args(key, model, args.dtype, args.tp), logs,
                            timeout_s=600) as server:
                print(f"[{key}] server up in {time.perf_counter() - t0:.0f}s", flush=True)
                generate(server.url, list(warm.input_ids), 8)  # warm-up
                for name in names:
                    p = prompts[configs[name][1]]
                    res = measure(server.url, list(p.input_ids), args.new_tokens, args.repeats,
                                  name)
                    rows[name] = {"config": name, "server": key, "context": p.n_tokens,
                                  "args": server_args(key, "M", args.dtype, args.tp)[2:], **res}
                    r0 = res["runs"][0]
                    print(f"[{key}] {name}: {res['decode_tok_s']:.2f} decode tok/s "
                          f"(ttft {r0['ttft_s']:.1f}s, e2e {r0['e2e_s']:.1f}s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failed configuration is reported, not fatal
            msg = str(exc)
            print(f"[{key}] FAILED: {msg[-1500:]}", flush=True)
            errors[key] = msg[-4000:]
        report()

    report()


if __name__ == "__main__":
    main()
