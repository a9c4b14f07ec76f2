"""Long prompts: time to first token, prefill device memory, and a concurrent request's
inter-token latency, FreeKV vs default (chunked prefill on, chunks of ``--chunk`` tokens,
1024 unless given, under both policies).

For each prompt length: one server per policy (started once, reused across lengths), a
streaming request decoding in the background while the long prompt is sent; reported:

* ``ttft_s``: the long prompt's time to its first token;
* ``itl_max_s`` / ``itl_p50_s``: the largest and the median gap between the background
  request's tokens while the long prompt prefilled (decode keeps going between chunks);
* ``prefill_device_bytes``: KV device memory the prompt's prefill occupies, from the model
  shape: default keeps the whole prompt in every layer; FreeKV one layer's prefix + chunk
  (its one-layer scratch) plus the dense layers' rows;
* ``server_peak_rss_gb``: the scheduler process's peak resident memory (CPU), measured.

    python benchmarks/bench_long_prompt.py [--lengths 1000,3000,5000,7000] [--chunk 1024]
        [--model-path M] [--dtype float32] [--quick]

On a GPU with Llama-3.1-8B pass ``--model-path`` and ``--lengths 8192,32768,131072``.
Writes JSON + PNG (``benchmarks/results``, and ``$OUT``); prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import COLORS, LABELS, _figure, progress, write_results  # noqa: E402
from tests.helpers import embedded_model_path, run_server  # noqa: E402
from tests.passkey import filler_prompt  # noqa: E402

FREEKV_CFG = {"budget": 1024, "sink": 128, "window": 256}


def _model_shape(model: str) -> dict:
    cfg = json.loads((Path(model) / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"layers": int(cfg["num_hidden_layers"]), "kv_heads": int(heads),
            "head_dim": int(head_dim)}


def prefill_device_bytes(policy: str, n: int, chunk: int, shape: dict, elem: int) -> int:
    """KV device bytes a prefill of ``n`` tokens occupies (model-shape arithmetic)."""
    row = 2 * shape["kv_heads"] * shape["head_dim"] * elem  # K + V of one token, one layer
    if policy == "default":
        return n * row * shape["layers"]
    dense_layers = 1  # FreeKV's default dense_layers [0]
    return n * row + n * row * dense_layers  # one layer's prefix + chunk; the dense layer


def _scheduler_rss(launcher_pid: int) -> float:
    total = 0.0
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "scheduler" in child.name() or "scheduler" in " ".join(child.cmdline()):
                total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**30


def measure(url: str, pid: int, model: str, n: int, seed: int) -> dict:
    stamps: list[float] = []
    started = threading.Event()
    peak = [0.0]
    stop = threading.Event()

    def background() -> None:
        payload = {"input_ids": list(filler_prompt(model, 200, seed=seed + 1).input_ids),
                   "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
                   "stream": True, "rid": f"bg-{seed}"}
        with requests.post(f"{url}/generate", json=payload, stream=True, timeout=3600) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:") and b"[DONE]" not in line:
                    stamps.append(time.monotonic())
                    started.set()
                    if stop.is_set():
                        break

    def watch_rss() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _scheduler_rss(pid))
            stop.wait(0.5)

    bg = threading.Thread(target=background, daemon=True)
    bg.start()
    started.wait(timeout=600)
    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()
    ids = list(filler_prompt(model, n, seed=seed).input_ids)
    t0 = time.monotonic()
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}
    resp = requests.post(f"{url}/generate", json=payload, timeout=3600)
    ttft = time.monotonic() - t0
    stop.set()
    requests.post(f"{url}/abort_request", json={"rid": f"bg-{seed}"}, timeout=60)
    bg.join(timeout=120)
    watcher.join(timeout=10)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if a >= t0 and b <= t0 + ttft]
    return {"prompt_tokens": len(ids), "ttft_s": ttft, "ok": resp.ok,
            "itl_max_s": max(gaps) if gaps else None,
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "tokens_during_prefill": len(gaps), "server_peak_rss_gb": peak[0]}


def plot(rows: list[dict], subtitle: str):  # type: ignore[no-untyped-def]
    fig, ax = _figure("Long prompts: time to first token and a concurrent request's ITL\n"
                      + subtitle, width=7.5, height=4.6)
    for policy in ("default", "freekv"):
        pts = sorted((r for r in rows if r["policy"] == policy),
                     key=lambda r: r["prompt_tokens"])
        if not pts:
            continue
        x = [r["prompt_tokens"] for r in pts]
        ax.plot(x, [r["ttft_s"] for r in pts], marker="o", color=COLORS[policy],
                label=f"{LABELS[policy]}: TTFT")
        itl = [r["itl_max_s"] if r["itl_max_s"] is not None else float("nan") for r in pts]
        ax.plot(x, itl, marker="x", linestyle="--", color=COLORS[policy],
                label=f"{LABELS[policy]}: max gap of a decoding request")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1000,3000,5000,7000")
    ap.add_argument("--chunk", type=int, default=1024, help="--chunked-prefill-size")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--policies", default="default,freekv")
    ap.add_argument("--quick", action="store_true", help="lengths 1000,3000 only")
    ap.add_argument("--name", default=None, help="result file stem")
    args = ap.parse_args()
    model = args.model_path or embedded_model_path()
    lengths = [1000, 3000] if args.quick else [int(x) for x in args.lengths.split(",")]
    shape = _model_shape(model)
    elem = 4 if args.dtype in ("float32", "float") else 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            srv_args = ["--model-path", model, "--dtype", args.dtype, "--kv-policy", policy,
                        "--chunked-prefill-size", str(args.chunk), "--enable-metrics"]
            if policy == "freekv":
                srv_args += ["--freekv-config", json.dumps(FREEKV_CFG)]
            else:
                srv_args += ["--prefill-decode-interval", "1"]  # same cadence as FreeKV
            with run_server(srv_args, Path(tmp), timeout_s=900) as srv:
                for i, n in enumerate(progress(lengths, desc=policy)):
                    row = measure(srv.url, srv.proc.pid, model, n, seed=1000 + i)
                    row.update(policy=policy, chunk=args.chunk, prefill_device_bytes=(
                        prefill_device_bytes(policy, row["prompt_tokens"], args.chunk, shape,
                                             elem)))
                    rows.append(row)
    print(f"{'policy':<8} {'tokens':>7} {'TTFT s':>8} {'ITL max s':>10} {'ITL p50 s':>10} "
          f"{'prefill dev MiB':>16} {'RSS GiB':>8}")
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
        print(f"{r['policy']:<8} {r['prompt_tokens']:>7} {r['ttft_s']:>8.2f} "
              f"{fmt(r['itl_max_s']):>10} {fmt(r['itl_p50_s']):>10} "
              f"{r['prefill_device_bytes'] / 2**20:>16.1f} {r['server_peak_rss_gb']:>8.2f}")
    name = args.name or ("bench_long_prompt_cpu_quick" if args.quick else "bench_long_prompt_cpu")
    result = {"benchmark": "bench_long_prompt", "model": Path(model).name, "dtype": args.dtype,
              "chunk": args.chunk, "freekv_config": FREEKV_CFG, "shape": shape, "rows": rows}
    write_results(name, result, plot=lambda: plot(
        rows, f"{Path(model).name}, {args.dtype}, chunks of {args.chunk}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
