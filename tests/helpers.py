"""Shared test helpers: seeding, the embedded model, and a real SGLang server on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embedded_model_path() -> str:
    from sglang_freekv.models import prepare

    return str(prepare("smollm2"))


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def generate(self, text: str, max_new_tokens: int = 16, **params: object) -> dict:
        sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, **params}
        resp = requests.post(
            f"{self.url}/generate",
            json={"text": text, "sampling_params": sampling},
            timeout=600,
        )
        resp.raise_for_status()
        return resp.json()


@contextmanager
def run_server(
    args: Sequence[str], tmp_path: Path, *, timeout_s: float = 300.0, env: dict | None = None
) -> Iterator[Server]:
    """Start `python -m sglang.launch_server` on a free loopback port; stop it afterwards."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--host", "127.0.0.1", "--port", str(port),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # the tests' interpreter flag is not for servers
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {timeout_s}s:\n{server.log()[-4000:]}")
            time.sleep(2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def hf_greedy(model_path: str, prompts: Sequence[str], max_new_tokens: int, dtype: str) -> list[list[int]]:
    """Greedy token ids from HF transformers (the reference implementation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
            )
            new = gen[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in new:  # SGLang stops at EOS and does not return it
                new = new[: new.index(tok.eos_token_id)]
            out.append(new)
    return out


def post_generate(url: str, payload: dict, timeout: float = 600) -> requests.Response:
    """POST /generate without raising on HTTP errors (for tests of refused requests)."""
    return requests.post(f"{url}/generate", json=payload, timeout=timeout)


def generate_ids(
    server: Server, input_ids: Sequence[int], max_new_tokens: int = 16, *,
    timeout: float = 600, **params: object
) -> dict:
    """Greedy /generate from token ids (exact prompt length, no server-side tokenization)."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, **params}
    resp = post_generate(server.url, {"input_ids": list(input_ids), "sampling_params": sampling},
                         timeout=timeout)
    resp.raise_for_status()
    return resp.json()


def metric_values(url: str, name: str) -> list[float]:
    """Every sample of one Prometheus metric at GET /metrics (one per label set, e.g. tp_rank).

    An empty list means the metric is not exported.
    """
    text = requests.get(f"{url}/metrics", timeout=30).text
    values: list[float] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0].strip()
        if metric == name:
            values.append(float(value))
    return values


USAGE_GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used")


def wait_until(check: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy (returned); after about
    ``timeout_s`` of polls raise ``TimeoutError`` naming ``what`` and the last value. A bound
    on waiting (a hang fails the test), never a timing assert."""
    last: object = None
    for _ in range(max(1, int(timeout_s / interval_s))):
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"{what} (not within {timeout_s:.0f} s; last: {last!r})")


def wait_gauges_zero(url: str, gauges: Sequence[str] = USAGE_GAUGES,
                     timeout_s: float = 60) -> None:
    """Wait until every gauge in ``gauges`` is exported and sums to 0 over ranks."""
    def idle() -> bool:
        return all((v := metric_values(url, g)) and sum(v) == 0 for g in gauges)

    wait_until(idle, timeout_s, f"gauges {list(gauges)} back to 0")
