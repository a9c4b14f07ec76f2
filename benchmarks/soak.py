"""Soak: a FreeKV server under >= 1,000 mixed requests, then drained and checked for leaks.

Drives real ``--kv-policy freekv`` servers (the embedded model, CPU, radix cache on,
``--enable-metrics``; one server at a time: first ``--tp 1``, then ``--tp 2``) with SGLang's
own client, ``python -m sglang.bench_serving``, on workloads that need no download, and with
this script's own traffic at the same time:

=====================  ======  ==============================================================
phase                  server  traffic
=====================  ======  ==============================================================
``bench-random-gen``   tp1     bench_serving ``--dataset-name random-ids --tokenize-prompt``,
                               ``--backend sglang`` (``/generate``), streamed, ragged prompts
                               (< 1K tokens) and outputs
``bench-gsp-chat``     tp1     bench_serving ``--dataset-name generated-shared-prefix``,
                               ``--backend sglang-oai-chat`` (``/v1/chat/completions``), not
                               streamed: groups of prompts sharing a system prompt
``mixed``              tp1     own traffic (below), concurrently with the two phases above
``bench-random-chat``  tp2     bench_serving ``random-ids``, ``sglang-oai-chat``, streamed
``mixed-tp2``          tp2     own traffic, concurrently with ``bench-random-chat``
=====================  ======  ==============================================================

Own traffic (``mixed``): ragged prompts (in the whole run about one request in ten is 1K-7K
tokens, the rest under 1K), ``/generate`` (token ids) and ``/v1/chat/completions`` (text),
streamed and not, prompts that share a cached prefix (short documents and ~5-6.5K-token
ones), ``n > 1`` sampling, ~25% of its requests aborted (``/abort_request`` by rid, after a
delay or after some streamed chunks) or disconnected (the client closes the connection during
the queue, the prefill or the decode; streamed or not), and ~2% beyond the model context
(expected 400). Each request ends in exactly one outcome:

``ok`` (200, finished by length/stop), ``aborted`` (an intended abort: finish_reason abort),
``abort_late`` / ``disconnect_late`` (the abort or disconnect came after the answer: answered),
``disconnected`` (closed by the client on purpose), ``rejected`` (an expected 4xx),
``error`` (anything else: 5xx, an unexpected 4xx or abort, a broken stream, a connection
error), ``hung`` (no answer within ``--request-timeout``). No request may be ``error`` or
``hung``; a bench_serving phase that does not finish within ``--phase-timeout`` counts all its
unanswered requests as ``hung``.

After each server's traffic (the drain) the script checks, with bounded polls (SGLang
refreshes its pool gauges at decode log intervals and on the idle path, within ~30 s):

* FreeKV: ``sglang:freekv_host_pages_used`` and ``sglang:freekv_device_pages_used`` are 0
  (summed over ranks); ``sglang:freekv_host_pages_cached`` is 0 after ``/flush_cache``;
* SGLang's token pool: ``sglang:num_used_tokens`` and ``sglang:kv_used_tokens`` (tokens held by
  requests; the radix cache's tokens are *evictable*, not used) are 0 and
  ``kv_available_tokens + kv_evictable_tokens == max_total_num_tokens``; after ``/flush_cache``
  ``kv_evictable_tokens`` is 0 and ``kv_available_tokens == max_total_num_tokens``;
  ``num_running_reqs`` / ``num_queue_reqs`` are 0;
* the server log: no ``memory leak detected`` (SGLang's own idle-time checker of the token and
  request pools, which raises in the scheduler by default), no traceback, the server alive.

Prints a table per phase and in total (outcomes, throughput, TTFT / ITL / E2E percentiles of
the ``ok`` requests; TTFT and ITL of streamed requests only) and the drain checks as PASS/FAIL
lines; writes ``soak.json`` (``soak_quick.json`` with ``--quick``; ``--name`` to change) with
every number through ``benchmarks/_results.py``. Exit status 1 when a check fails.

    python benchmarks/soak.py [--requests 1000] [--quick] [--no-tp2] [--out-dir DIR]

``--quick`` (default 150 requests): long prompts up to ~3K tokens and shorter outputs; what
``tests/server/test_soak.py`` runs. The full run (1,000 requests) is sized for well under an
hour on 2 idle cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402
from _soak_own import (  # noqa: E402
    CONTEXT,
    FULL,
    QUICK,
    Sizes,
    plan_own,
    run_own_phase,
)

from tests.helpers import Server, embedded_model_path, run_server  # noqa: E402

# budget 512 (sink 64, window 128): every prompt over 512 tokens runs the sparse path; a 2 GiB
# host tier (~45K float32 / ~90K bf16 tokens at TP1) keeps RAM bounded on a shared machine and makes the
# radix cache evict during the run.
FREEKV_CFG = {"budget": 512, "sink": 64, "window": 128, "host_memory_gb": 2}
OUTCOMES = ("ok", "aborted", "abort_late", "disconnected", "disconnect_late", "rejected",
            "error", "hung")
ANSWERED = ("ok", "abort_late", "disconnect_late")
FREEKV_GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used",
                 "sglang:freekv_host_pages_cached")
SGLANG_GAUGES = ("sglang:num_used_tokens", "sglang:kv_used_tokens", "sglang:token_usage",
                 "sglang:kv_available_tokens", "sglang:kv_evictable_tokens",
                 "sglang:max_total_num_tokens", "sglang:num_running_reqs",
                 "sglang:num_queue_reqs")
# what the server log must not contain (SGLang's idle-time leak checker, crashes)
LOG_PATTERNS = {
    "leak": re.compile(r"memory leak detected", re.I),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "scheduler_exception": re.compile(r"Scheduler hit an exception|subprocess .* crashed", re.I),
    "watchdog": re.compile(r"watchdog timeout", re.I),
}

# (phase, server, client, share of --requests)
PHASES = (
    ("bench-random-gen", "tp1", "bench", 0.25),
    ("bench-gsp-chat", "tp1", "bench", 0.20),
    ("mixed", "tp1", "own", 0.35),
    ("bench-random-chat", "tp2", "bench", 0.10),
    ("mixed-tp2", "tp2", "own", 0.10),
)


# ---------------------------------------------------------------------------- statistics
def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation); None without values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_stats(records: Sequence[dict]) -> dict[str, Any]:
    ok = [r for r in records if r["outcome"] == "ok"]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    e2e = [r["e2e"] for r in ok if r.get("e2e") is not None]
    itl = [x for r in ok for x in r.get("itl") or ()]
    out: dict[str, Any] = {"ok": len(ok), "ttft_n": len(ttft), "itl_n": len(itl)}
    for name, xs in (("ttft_s", ttft), ("itl_s", itl), ("e2e_s", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = pct(xs, q)
        out[f"{name}_mean"] = sum(xs) / len(xs) if xs else None
    return out


def summarize(records: Sequence[dict], wall_s: float) -> dict[str, Any]:
    counts = Counter(r["outcome"] for r in records)
    ok = [r for r in records if r["outcome"] in ANSWERED]
    out_tokens = sum(r.get("out_tokens") or 0 for r in ok)
    in_tokens = sum(r.get("in_tokens") or 0 for r in records if r["outcome"] in ANSWERED)
    return {
        "requests": len(records),
        "outcomes": {k: counts.get(k, 0) for k in OUTCOMES},
        "wall_s": wall_s,
        "answered_req_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "input_tok_s": in_tokens / wall_s if wall_s > 0 else None,
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "long_prompts": sum(1 for r in records if 1000 <= (r.get("in_tokens") or 0) <= CONTEXT),
        "streamed": sum(1 for r in records if r.get("stream")),
        "n_gt_1": sum(1 for r in records if (r.get("n") or 1) > 1),
        **latency_stats(records),
    }


# ---------------------------------------------------------------------------- bench_serving
@dataclass
class BenchPhase:
    name: str
    args: list[str]
    count: int
    backend: str
    stream: bool


def bench_phase(name: str, count: int, sizes: Sizes, seed: int, concurrency: int,
                ) -> BenchPhase:
    if name == "bench-random-gen":
        args = ["--backend", "sglang", "--dataset-name", "random-ids", "--tokenize-prompt",
                "--num-prompts", str(count), "--random-input-len", str(sizes.bench_input),
                "--random-output-len", str(sizes.bench_output),
                "--random-range-ratio", str(sizes.bench_ratio)]
        return BenchPhase(name, args, count, "sglang", True)
    if name == "bench-random-chat":
        args = ["--backend", "sglang-oai-chat", "--dataset-name", "random-ids",
                "--num-prompts", str(count), "--random-input-len", str(sizes.bench_input),
                "--random-output-len", str(sizes.bench_output),
                "--random-range-ratio", str(sizes.bench_ratio)]
        return BenchPhase(name, args, count, "sglang-oai-chat", True)
    if name == "bench-gsp-chat":
        groups = max(2, round(count / 20))
        per = max(1, count // groups)
        args = ["--backend", "sglang-oai-chat", "--dataset-name", "generated-shared-prefix",
                "--num-prompts", str(groups * per), "--gsp-num-groups", str(groups),
                "--gsp-prompts-per-group", str(per),
                "--gsp-system-prompt-len", str(sizes.gsp_system),
                "--gsp-question-len", str(sizes.gsp_question),
                "--gsp-output-len", str(sizes.gsp_output), "--gsp-range-ratio", "0.5",
                "--disable-stream"]
        return BenchPhase(name, args, groups * per, "sglang-oai-chat", False)
    raise ValueError(name)


def run_bench(url: str, model: str, phase: BenchPhase, seed: int, concurrency: int,
              timeout_s: float, workdir: Path, server_tag: str) -> tuple[list[dict], dict]:
    """Run ``python -m sglang.bench_serving`` for one phase; per-request records + its own
    summary. A run past ``timeout_s`` is killed and its requests count as hung."""
    out_file = workdir / f"bench-{server_tag}-{phase.name}.jsonl"
    out_file.unlink(missing_ok=True)
    log_file = workdir / f"bench-{server_tag}-{phase.name}.log"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--base-url", url, "--model", model,
           "--tokenizer", model, *phase.args, "--max-concurrency", str(concurrency),
           "--request-rate", "inf", "--warmup-requests", "0", "--seed", str(seed),
           "--ready-check-timeout-sec", "600", "--output-file", str(out_file),
           "--output-details", "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("SGLANG_IS_IN_CI", None)  # it would flush the cache before the run
    t0 = time.perf_counter()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)
            rc = None
    wall = time.perf_counter() - t0
    base = {"phase": phase.name, "client": "bench_serving", "backend": phase.backend,
            "endpoint": "generate" if phase.backend == "sglang" else "chat",
            "stream": phase.stream, "n": 1}
    tail = log_file.read_text(errors="replace")[-3000:]
    if rc is None or not out_file.exists():
        why = (f"bench_serving did not finish within {timeout_s:.0f} s" if rc is None
               else f"bench_serving exited with {rc}: {tail[-600:]}")
        outcome = "hung" if rc is None else "error"
        recs = [{**base, "idx": i, "outcome": outcome, "detail": why}
                for i in range(phase.count)]
        return recs, {"returncode": rc, "wall_s": wall, "log_tail": tail}
    result = json.loads(out_file.read_text().strip().splitlines()[-1])
    recs = []
    for i, err in enumerate(result["errors"]):
        itl = list(result["itls"][i] or [])
        ttft = result["ttfts"][i]
        ok = not err
        rec = {**base, "idx": i, "outcome": "ok" if ok else "error",
               "detail": err[-300:] if err else None,
               "in_tokens": result["input_lens"][i], "out_tokens": result["output_lens"][i],
               # non-streamed: bench_serving's ttft is the whole latency
               "ttft": ttft if (ok and phase.stream) else None,
               "itl": itl if ok else [],
               "e2e": (ttft + sum(itl)) if ok else None}
        recs.append(rec)
    missing = phase.count - len(recs)
    recs += [{**base, "idx": len(recs) + j, "outcome": "error",
              "detail": "no record from bench_serving"} for j in range(max(0, missing))]
    keep = ("completed", "duration", "request_throughput", "output_throughput",
            "input_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
            "p99_itl_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms", "median_tpot_ms",
            "p99_tpot_ms", "max_concurrent_requests", "total_input_tokens",
            "total_output_tokens")
    summary = {k: result.get(k) for k in keep}
    summary.update({"returncode": rc, "wall_s": wall, "command": " ".join(cmd[1:])})
    return recs, summary


# ---------------------------------------------------------------------------- metrics & drain
def read_metrics(url: str) -> dict[str, float]:
    """The gauges we check: FreeKV's summed over TP ranks (each rank has its own host tier
    and budget slots); SGLang's of TP rank 0 (the rank that publishes the scheduler's
    stats; every rank sees the same token pool)."""
    text = requests.get(f"{url}/metrics", timeout=60).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        if name in FREEKV_GAUGES:
            out[name] = out.get(name, 0.0) + float(value)
        elif name in SGLANG_GAUGES:
            rank = re.search(r'tp_rank="(\d+)"', head)
            if rank is None or rank.group(1) == "0":
                out[name] = float(value)
            else:
                out[f"{name}@tp{rank.group(1)}"] = float(value)
    return out


def _idle_ok(m: dict[str, float], flushed: bool) -> list[str]:
    """What is not at its idle value (empty: all idle)."""
    bad = []
    for g in ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used",
              "sglang:num_used_tokens", "sglang:kv_used_tokens", "sglang:token_usage",
              "sglang:num_running_reqs", "sglang:num_queue_reqs"):
        if g not in m:
            bad.append(f"{g} not exported")
        elif m[g] != 0:
            bad.append(f"{g}={m[g]:g}")
    total = m.get("sglang:max_total_num_tokens")
    avail, evict = m.get("sglang:kv_available_tokens"), m.get("sglang:kv_evictable_tokens")
    if total is None or avail is None or evict is None:
        bad.append("pool gauges not exported")
    elif avail + evict != total:
        bad.append(f"available {avail:g} + evictable {evict:g} != max_total {total:g}")
    if flushed:
        if m.get("sglang:freekv_host_pages_cached") != 0:
            bad.append(f"freekv_host_pages_cached={m.get('sglang:freekv_host_pages_cached')}")
        if evict:
            bad.append(f"kv_evictable_tokens={evict:g} after flush")
    return bad


def wait_idle(url: str, flushed: bool, timeout_s: float) -> tuple[dict, list[str], float]:
    """Poll /metrics until every gauge is at its idle value or ``timeout_s`` passed."""
    t0 = time.monotonic()
    while True:
        m = read_metrics(url)
        bad = _idle_ok(m, flushed)
        waited = time.monotonic() - t0
        if not bad or waited > timeout_s:
            return m, bad, waited
        time.sleep(2)


def drain_checks(server: Server, idle_timeout_s: float) -> dict[str, Any]:
    """After the traffic: gauges back to idle, flush, gauges at their flushed values."""
    out: dict[str, Any] = {"alive_before": server.proc.poll() is None}
    before, bad_before, waited = wait_idle(server.url, False, idle_timeout_s)
    out.update(before_flush=before, not_idle_before_flush=bad_before,
               waited_before_flush_s=waited)
    flush_status, flush_text = None, ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # SGLang refuses a flush while requests run
        r = requests.post(f"{server.url}/flush_cache", timeout=60)
        flush_status, flush_text = r.status_code, r.text[:200]
        if r.status_code == 200:
            break
        time.sleep(2)
    out.update(flush_status=flush_status, flush_text=flush_text)
    after, bad_after, waited = wait_idle(server.url, True, idle_timeout_s)
    out.update(after_flush=after, not_idle_after_flush=bad_after, waited_after_flush_s=waited)
    # the server still answers
    r = requests.post(f"{server.url}/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=600)
    out["after_status"] = r.status_code
    out["alive_after"] = server.proc.poll() is None
    return out


def scan_log(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    found: dict[str, list[str]] = {}
    for key, pat in LOG_PATTERNS.items():
        hits = []
        for i, line in enumerate(lines):
            if pat.search(line):
                hits.append("\n".join(lines[i:i + 12])[:1500] if key != "leak" else line[:500])
        found[key] = hits[:5] + ([f"... {len(hits)} in all"] if len(hits) > 5 else [])
    return found


# ---------------------------------------------------------------------------- the run
def phase_counts(total: int, with_tp2: bool) -> dict[str, int]:
    phases = [p for p in PHASES if with_tp2 or p[1] == "tp1"]
    share = sum(p[3] for p in phases)
    counts = {p[0]: max(4, round(total * p[3] / share)) for p in phases}
    # gsp rounds to groups x prompts per group; own traffic takes the rest
    gsp = counts.get("bench-gsp-chat")
    if gsp:
        groups = max(2, round(gsp / 20))
        counts["bench-gsp-chat"] = groups * max(1, gsp // groups)
    rest = total - sum(counts.values())
    counts["mixed"] += rest
    return counts


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every 30 s (how busy the machine was)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(30)


def server_args(model: str, tp: int, cfg: dict, dtype: str | None = None) -> list[str]:
    """Server flags; ``dtype`` None = the model's own (bf16), as users run it."""
    return ["--model-path", model, *(["--dtype", dtype] if dtype else []), "--tp", str(tp),
            "--kv-policy", "freekv", "--freekv-config", json.dumps(cfg), "--enable-metrics"]


def run_server_phases(tag: str, server: Server, model: str, tokenizer: Any, counts: dict,
                      sizes: Sizes, args: argparse.Namespace, workdir: Path,
                      ) -> tuple[list[dict], dict, dict]:
    """All phases of one server, bench_serving and own traffic at the same time."""
    names = [p[0] for p in PHASES if p[1] == tag and p[0] in counts]
    bench_names = [n for n in names if n.startswith("bench")]
    own_name = next(n for n in names if n.startswith("mixed"))
    records: list[dict] = []
    phase_info: dict[str, dict] = {}
    lock = threading.Lock()

    def bench_worker() -> None:
        for k, name in enumerate(bench_names):
            ph = bench_phase(name, counts[name], sizes, args.seed + k, args.concurrency)
            print(f"  [{name}] bench_serving, {ph.count} requests ({ph.backend}, "
                  f"{'streamed' if ph.stream else 'not streamed'})", flush=True)
            t0 = time.monotonic()
            recs, summary = run_bench(server.url, model, ph, args.seed + k, args.concurrency,
                                      args.phase_timeout, workdir, tag)
            wall = time.monotonic() - t0
            with lock:
                records.extend(recs)
                phase_info[name] = {"server": tag, "client": "bench_serving",
                                    "bench": summary, "wall_s": wall}
            errs = sum(r["outcome"] != "ok" for r in recs)
            print(f"  [{name}] done in {wall:.0f} s, {errs} not ok", flush=True)

    worker = threading.Thread(target=bench_worker, daemon=True)
    worker.start()
    rng = random.Random(args.seed * 1000 + (1 if tag == "tp1" else 2))
    own = plan_own(counts[own_name], sizes, tokenizer, rng, tag)
    print(f"  [{own_name}] own traffic, {len(own)} requests", flush=True)
    t0 = time.monotonic()
    own_recs = asyncio.run(run_own_phase(server.url, own, tokenizer, model, args.concurrency,
                                         args.request_timeout, own_name))
    wall = time.monotonic() - t0
    with lock:
        records.extend(own_recs)
        phase_info[own_name] = {"server": tag, "client": "own", "wall_s": wall}
    worker.join(timeout=args.phase_timeout * max(1, len(bench_names)) + 120)
    if worker.is_alive():
        raise RuntimeError("bench_serving worker did not return (its own timeout failed)")
    return records, phase_info, {"names": names}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None,
                    help="requests in the whole run (default 1000; 150 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="shorter prompts and outputs (long prompts up to ~3K tokens)")
    ap.add_argument("--no-tp2", action="store_true", help="skip the --tp 2 server")
    ap.add_argument("--freekv-config", default=json.dumps(FREEKV_CFG))
    ap.add_argument("--concurrency", type=int, default=12,
                    help="requests in flight per client (bench_serving and own traffic each)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dtype", default=None,
                    help="model dtype (default: the model's own, bf16; the committed runs of "
                    "2026-12 used float32)")
    ap.add_argument("--request-timeout", type=float, default=1800,
                    help="seconds before an own request counts as hung")
    ap.add_argument("--phase-timeout", type=float, default=7200,
                    help="seconds before a bench_serving phase is killed (its requests hung)")
    ap.add_argument("--start-timeout", type=float, default=1200,
                    help="seconds a server may take to start (a loaded machine: minutes)")
    ap.add_argument("--idle-timeout", type=float, default=120,
                    help="seconds the gauges may take to reach their idle values")
    ap.add_argument("--name", default=None, help="result file stem (default soak / soak_quick)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results")
    ap.add_argument("--log-dir", default=None, help="server and client logs (default: a new "
                    "temporary directory, kept)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    total = args.requests or (150 if args.quick else 1000)
    name = args.name or ("soak_quick" if args.quick else "soak")
    cfg = json.loads(args.freekv_config)
    counts = phase_counts(total, not args.no_tp2)
    workdir = Path(args.log_dir or tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = embedded_model_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    print(f"soak: {total} requests {counts}, freekv-config {json.dumps(cfg)}, logs in {workdir}",
          flush=True)
    load = LoadSampler()
    load.start()
    t_start = time.monotonic()
    all_records: list[dict] = []
    phases: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    for tag, tp in (("tp1", 1), ("tp2", 2)):
        if tag == "tp2" and args.no_tp2:
            continue
        print(f"[{tag}] starting a --tp {tp} server", flush=True)
        t0 = time.monotonic()
        info: dict[str, Any] = {"tp": tp}
        try:
            with run_server(server_args(model, tp, cfg, args.dtype), workdir,
                            timeout_s=args.start_timeout) as server:
                info["start_s"] = time.monotonic() - t0
                info["log"] = str(server.log_path)
                print(f"[{tag}] up in {info['start_s']:.0f} s at {server.url}", flush=True)
                t1 = time.monotonic()
                recs, ph, _ = run_server_phases(tag, server, model, tokenizer, counts, sizes,
                                                args, workdir)
                info["traffic_s"] = time.monotonic() - t1
                all_records += recs
                phases.update(ph)
                print(f"[{tag}] traffic done in {info['traffic_s']:.0f} s; drain checks",
                      flush=True)
                info["drain"] = drain_checks(server, args.idle_timeout)
                info["log_findings"] = scan_log(server.log())
        except Exception as exc:  # noqa: BLE001 - the run goes on to report what it has
            info["failure"] = f"{type(exc).__name__}: {exc}"[:3000]
            print(f"[{tag}] FAILED: {info['failure'][:500]}", flush=True)
            log_path = info.get("log")
            if log_path and Path(log_path).exists():
                info["log_findings"] = scan_log(Path(log_path).read_text(errors="replace"))
        servers[tag] = info
    duration = time.monotonic() - t_start
    load.stop.set()

    for pname, info in phases.items():
        recs = [r for r in all_records if r["phase"] == pname]
        info.update(summarize(recs, info["wall_s"]))
    traffic_s = sum(s.get("traffic_s", 0) for s in servers.values())
    totals = summarize(all_records, traffic_s)
    checks = make_checks(total, all_records, servers, counts)
    result = {
        "benchmark": "soak",
        "quick": args.quick,
        "requests_planned": total,
        "phase_counts": counts,
        "freekv_config": cfg, "dtype": args.dtype or "model default (bfloat16)",
        "sizes": asdict(sizes),
        "concurrency": args.concurrency,
        "timeouts_s": {"request": args.request_timeout, "phase": args.phase_timeout,
                       "start": args.start_timeout, "idle": args.idle_timeout},
        "duration_s": duration,
        "traffic_s": traffic_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m_samples": load.samples,
                    "load_avg_1m_mean": (sum(load.samples) / len(load.samples)
                                         if load.samples else None)},
        "phases": phases,
        "total": totals,
        "servers": servers,
        "checks": checks,
        "failed_records": [r for r in all_records if r["outcome"] in ("error", "hung")][:50],
        "log_dir": str(workdir),
    }
    print_report(result)
    write_results(name, result, out_dir=args.out_dir)
    return 0 if all(c["ok"] for c in checks) else 1


def make_checks(total: int, records: Sequence[dict], servers: dict, counts: dict) -> list[dict]:
    counts_out = Counter(r["outcome"] for r in records)
    checks = [
        {"name": "every planned request has one outcome", "ok": len(records) == total,
         "detail": f"{len(records)} records for {total} requests"},
        {"name": "no request hung", "ok": counts_out.get("hung", 0) == 0,
         "detail": f"{counts_out.get('hung', 0)} hung"},
        {"name": "no unexpected error", "ok": counts_out.get("error", 0) == 0,
         "detail": f"{counts_out.get('error', 0)} errors"},
    ]
    for tag, info in servers.items():
        d = info.get("drain") or {}
        findings = info.get("log_findings") or {}
        checks += [
            {"name": f"{tag}: server ran the traffic", "ok": "failure" not in info,
             "detail": info.get("failure", "")[:300]},
            {"name": f"{tag}: gauges and token pool idle after the drain",
             "ok": bool(d) and not d.get("not_idle_before_flush"),
             "detail": "; ".join(d.get("not_idle_before_flush") or []) or "idle"},
            {"name": f"{tag}: /flush_cache 200, nothing cached afterwards",
             "ok": d.get("flush_status") == 200 and not d.get("not_idle_after_flush"),
             "detail": f"flush {d.get('flush_status')}; "
                       + ("; ".join(d.get("not_idle_after_flush") or []) or "idle")},
            {"name": f"{tag}: server alive and answering after the drain",
             "ok": bool(d.get("alive_after")) and d.get("after_status") == 200,
             "detail": f"status {d.get('after_status')}"},
        ]
        for key in LOG_PATTERNS:
            hits = findings.get(key)
            checks.append({"name": f"{tag}: no '{key}' in the server log",
                           "ok": hits == [], "detail": (hits or ["log not read"])[0][:300]
                           if hits != [] else "none"})
    return checks


def _f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_report(result: dict) -> None:
    head = ("| phase | server | client | requests | answered | aborted | disconnected | rejected "
            "| errors | hung | answered req/s | out tok/s | TTFT p50 / p99 (s) "
            "| ITL p50 / p99 (ms) | E2E p50 / p99 (s) |")
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def row(name: str, server: str, client: str, s: dict) -> str:
        o = s["outcomes"]
        return (f"| {name} | {server} | {client} | {s['requests']} | "
                f"{o['ok'] + o['abort_late'] + o['disconnect_late']} | {o['aborted']} | "
                f"{o['disconnected']} | {o['rejected']} | {o['error']} | {o['hung']} | "
                f"{_f(s['answered_req_s'])} | {_f(s['output_tok_s'], digits=1)} | "
                f"{_f(s['ttft_s_p50'])} / {_f(s['ttft_s_p99'])} | "
                f"{_f(s['itl_s_p50'], 1000, 0)} / {_f(s['itl_s_p99'], 1000, 0)} | "
                f"{_f(s['e2e_s_p50'])} / {_f(s['e2e_s_p99'])} |")

    for pname in [p[0] for p in PHASES]:
        if pname in result["phases"]:
            info = result["phases"][pname]
            client = info["client"]
            if client == "bench_serving":
                client = "bench_serving " + ("/generate" if "gen" in pname else "chat")
            else:
                client = "own (both endpoints)"
            print(row(pname, info["server"], client, info))
    print(row("**total**", "", "", result["total"]))
    print()
    print("| server | start (s) | traffic (s) | freekv host / device pages used | "
          "host pages cached -> after flush | num_used / kv_used tokens | "
          "available + evictable = max_total | leak / traceback lines |")
    print("|---|---|---|---|---|---|---|---|")
    for tag, info in result["servers"].items():
        d = info.get("drain") or {}
        b, a = d.get("before_flush") or {}, d.get("after_flush") or {}
        f = info.get("log_findings") or {}

        def g(m: dict, k: str) -> str:
            v = m.get(f"sglang:{k}")
            return "-" if v is None else f"{v:g}"

        print(f"| {tag} | {_f(info.get('start_s'), digits=0)} | "
              f"{_f(info.get('traffic_s'), digits=0)} | "
              f"{g(b, 'freekv_host_pages_used')} / {g(b, 'freekv_device_pages_used')} | "
              f"{g(b, 'freekv_host_pages_cached')} -> {g(a, 'freekv_host_pages_cached')} | "
              f"{g(b, 'num_used_tokens')} / {g(b, 'kv_used_tokens')} | "
              f"{g(b, 'kv_available_tokens')} + {g(b, 'kv_evictable_tokens')} = "
              f"{g(b, 'max_total_num_tokens')} (after flush: evictable "
              f"{g(a, 'kv_evictable_tokens')}) | "
              f"{len(f.get('leak', []))} / {len(f.get('traceback', []))} |")
    print()
    load = result["machine"]["load_avg_1m_mean"]
    print(f"duration {result['duration_s'] / 60:.1f} min (traffic {result['traffic_s'] / 60:.1f} "
          f"min), mean 1-min load average {_f(load, digits=1)} on {result['machine']['cpus']} "
          "CPUs")
    for c in result["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")


if __name__ == "__main__":
    sys.exit(main())
