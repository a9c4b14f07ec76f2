"""Concurrency at equal device memory: default vs FreeKV on a simulated device (CPU).

Both servers run on FreeKVCpuPlatform with the same simulated device memory
(``SGLANG_FREEKV_CPU_DEVICE_GB``) and the same ``--mem-fraction-static`` and
``--context-length``: SGLang's own profiler sizes weights, KV pools and activations out of it
for both policies, as on a GPU of that size. N passkey prompts of ~6K tokens are sent at
once; ``sglang:num_running_reqs`` (updated every decode step) is polled while they run, and
each answer is checked for its key. Used by ``tests/server/test_capacity.py`` and
``benchmarks/bench_capacity.py``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from tests.helpers import embedded_model_path, metric_values, run_server
from tests.passkey import build_passkey_prompt, found_key

# Device memory whose KV part holds about 2.5 dense ~6.2K-token float32 contexts of the
# embedded model (46080 B/token): 1.3 GiB - 0.5 GiB of weights - 10% slack = 0.67 GiB of KV.
DEVICE_GB = 1.3
MEM_FRACTION = 0.9
CONTEXT_LENGTH = 6656  # both servers: FreeKV stages one whole prompt of this size
PROMPT_TOKENS = 6200
NEW_TOKENS = 24
FREEKV_CFG = {"budget": 512, "sink": 64, "window": 128}


@dataclass
class CapacityRun:
    policy: str
    requests: int
    max_running: int = 0  # max of sglang:num_running_reqs seen while the batch ran
    found: list[bool] = field(default_factory=list)  # key found per request
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_total_tokens: int | None = None  # SGLang's logical token pool (server info)
    max_running_requests: int | None = None
    startup_lines: list[str] = field(default_factory=list)


def server_args(policy: str, model: str) -> list[str]:
    args = ["--model-path", model, "--dtype", "float32", "--kv-policy", policy,
            "--mem-fraction-static", str(MEM_FRACTION), "--context-length",
            str(CONTEXT_LENGTH), "--enable-metrics", "--decode-log-interval", "1"]
    if policy == "freekv":
        args += ["--freekv-config", json.dumps(FREEKV_CFG)]
    return args


def _server_info(url: str) -> dict:
    try:
        info = requests.get(f"{url}/get_server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        return {}
    states = info.get("internal_states") or [{}]
    return {**info, **(states[0] if isinstance(states, list) and states else {})}


def run_capacity(policy: str, n_requests: int, tmp: Path, *, seed: int = 0) -> CapacityRun:
    """Start one server of ``policy``, send ``n_requests`` passkey prompts at once."""
    model = embedded_model_path()
    prompts = [build_passkey_prompt(model, PROMPT_TOKENS, 0.1 + 0.8 * i / max(1, n_requests - 1),
                                    seed=seed + i) for i in range(n_requests)]
    run = CapacityRun(policy, n_requests)
    env = {"SGLANG_FREEKV_CPU_DEVICE_GB": str(DEVICE_GB)}
    with run_server(server_args(policy, model), tmp, env=env, timeout_s=600) as server:
        info = _server_info(server.url)
        run.max_total_tokens = info.get("max_total_num_tokens")
        run.max_running_requests = info.get("max_running_requests")
        run.startup_lines = [ln for ln in server.log().splitlines()
                             if "freekv:" in ln or "max_total_num_tokens" in ln]
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    vals = metric_values(server.url, "sglang:num_running_reqs")
                    run.max_running = max([run.max_running, *map(int, vals)])
                except requests.RequestException:
                    pass
                stop.wait(0.3)

        def ask(i: int) -> str:
            payload = {"input_ids": list(prompts[i].input_ids),
                       "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                           "ignore_eos": True}}
            resp = requests.post(f"{server.url}/generate", json=payload, timeout=1800)
            resp.raise_for_status()
            return str(resp.json()["text"])

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(n_requests) as pool:
            run.answers = list(pool.map(ask, range(n_requests)))
        run.seconds = time.monotonic() - t0
        stop.set()
        poller.join()
    run.found = [found_key(a, p.key) for a, p in zip(run.answers, prompts)]
    return run


def as_dict(run: CapacityRun) -> dict:
    return asdict(run)
