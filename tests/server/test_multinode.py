"""Multi-node tensor parallelism with FreeKV: two SGLang processes as two nodes on loopback.

The command line is the LeaderWorkerSet overlay's (``deploy/k8s/overlays/multinode-lws``):
``--tp 2 --nnodes 2 --node-rank {0,1} --dist-init-addr 127.0.0.1:PORT``, each node hosting one
TP rank (CPU platform, gloo). Checked:

* passkeys at ~3K tokens (budget 512) are found through the leader's HTTP server;
* every rank's FreeKV metrics are exported: the leader (node rank 0) serves ``/metrics`` for its
  own ranks; a node of rank >= 1 runs no tokenizer or HTTP API, but SGLang starts a "dummy
  health check server" on its ``--port`` that answers ``/health``, ``/health_generate`` and, with
  ``--enable-metrics``, ``/metrics`` for the ranks of that node (its own prometheus multiprocess
  directory). A monitor must therefore scrape every pod of the group, not only the leader;
* stopping one node ends the other within a bounded time (no hang): the leader with SIGTERM
  (what Kubernetes sends), the worker with SIGKILL (a lost node). A worker ignores SIGTERM by
  design (SGLang 0.5.23 waits for the leader's shutdown broadcast), so it is not tried here.

Each node is pinned to its own core (``SGLANG_CPU_OMP_THREADS_BIND``): two "nodes" share this
machine, and the CPU platform would otherwise pin both ranks to the same core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.helpers import Server, embedded_model_path, free_port, generate_ids, metric_values
from tests.passkey import build_passkey_prompt, found_key

pytestmark = pytest.mark.server

FREEKV_CFG = {"budget": 512, "sink": 64, "window": 128}  # as tests/server/test_freekv_server.py
# (target tokens, depth, seed): the TP2 passkey cases of test_freekv_server.py, same seeds.
PASSKEY_CASES = [(3000, 0.15, 3000), (3000, 0.85, 3002)]
PASSKEY_NEW_TOKENS = 10
FREEKV_METRICS = (
    "sglang:freekv_recall_bytes_total",
    "sglang:freekv_recalled_pages_total",
    "sglang:freekv_checked_heads_total",
    "sglang:freekv_corrected_heads_total",
    "sglang:freekv_host_pages_used",
    "sglang:freekv_device_pages_used",
    "sglang:freekv_host_pages_cached",
    "sglang:freekv_speculative_layers",
    "sglang:freekv_job_wait_seconds_total",
)
START_TIMEOUT_S = 600.0  # two servers starting on a shared 2-core machine
STOP_TIMEOUT_S = 60.0  # the other node must be gone this long after one node stops


def node_args(model: str, node_rank: int, dist_port: int, http_port: int) -> list[str]:
    """The launch arguments of one node (the LeaderWorkerSet overlay's shape, on loopback)."""
    return [
        "--model-path", model, "--dtype", "float32",
        "--kv-policy", "freekv", "--freekv-config", json.dumps(FREEKV_CFG),
        "--enable-metrics", "--tp", "2",
        "--nnodes", "2", "--node-rank", str(node_rank),
        "--dist-init-addr", f"127.0.0.1:{dist_port}",
        "--host", "127.0.0.1", "--port", str(http_port),
    ]


@dataclass
class Node:
    rank: int
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """True while any process of this node's session (server, schedulers) still runs."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return self.proc.poll() is None or _group_has_live_members(self.proc.pid)

    def as_server(self) -> Server:
        """The leader as a ``tests.helpers.Server`` (for ``generate_ids``)."""
        return Server(url=self.url, proc=self.proc, log_path=self.log_path)

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def _group_has_live_members(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not s.startswith("Z") for s in out.stdout.split())


def _start_node(model: str, rank: int, dist_port: int, tmp_path: Path) -> Node:
    port = free_port()
    log_path = tmp_path / f"node{rank}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SGLANG_CPU_OMP_THREADS_BIND": str(rank)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "sglang.launch_server",
           *node_args(model, rank, dist_port, port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return Node(rank=rank, url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)


def _wait_ready(nodes: list[Node]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = {n.rank: n for n in nodes}
    while pending:
        for rank, node in list(pending.items()):
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {rank} exited with {node.proc.returncode}:\n"
                                   f"{node.log()[-4000:]}")
            try:
                if requests.get(f"{node.url}/health_generate", timeout=30).status_code == 200:
                    del pending[rank]
            except requests.RequestException:
                pass
        if pending and time.monotonic() > deadline:
            logs = "\n".join(f"--- node {n.rank}\n{n.log()[-3000:]}" for n in nodes)
            raise TimeoutError(f"nodes {sorted(pending)} not ready in {START_TIMEOUT_S}s\n{logs}")
        if pending:
            time.sleep(2)


def _wait_gone(node: Node, timeout_s: float) -> float | None:
    """Seconds until every process of ``node`` is gone, or None after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not node.alive():
            node.proc.wait(timeout=5)
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """(leader, worker): node ranks 0 and 1, ready; both stopped (SIGKILL) afterwards."""
    tmp_path = tmp_path_factory.mktemp("multinode")
    model = embedded_model_path()
    dist_port = free_port()
    worker = _start_node(model, 1, dist_port, tmp_path)
    leader = _start_node(model, 0, dist_port, tmp_path)
    try:
        _wait_ready([leader, worker])
        yield leader, worker
    finally:
        for node in (leader, worker):
            node.kill(signal.SIGKILL)
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def test_passkeys_found_through_the_leader(cluster: tuple[Node, Node]) -> None:
    leader, _ = cluster
    model = embedded_model_path()
    rows, missed = [], []
    for n, depth, seed in PASSKEY_CASES:
        p = build_passkey_prompt(model, n, depth, seed=seed)
        text = generate_ids(leader.as_server(), p.input_ids, PASSKEY_NEW_TOKENS)["text"]
        rows.append(f"{p.n_tokens} tokens depth {depth} key {p.key}: {text!r}")
        if not found_key(text, p.key):
            missed.append(rows[-1])
    assert not missed, "keys missed over two nodes:\n" + "\n".join(rows)


def _rank_samples(url: str, name: str) -> dict[str, float]:
    """tp_rank label -> value of one metric at ``url``/metrics."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'tp_rank="' in line:
            rank = line.split('tp_rank="', 1)[1].split('"', 1)[0]
            out[rank] = float(line.rpartition(" ")[2])
    return out


def test_every_rank_exports_freekv_metrics(cluster: tuple[Node, Node]) -> None:
    """The leader's /metrics carries rank 0, the worker's dummy health server rank 1; after the
    passkey requests (contexts beyond the budget) both ranks counted drift checks."""
    leader, worker = cluster
    assert requests.get(f"{worker.url}/health", timeout=30).status_code == 200
    for name in FREEKV_METRICS:
        on_leader = _rank_samples(leader.url, name)
        on_worker = _rank_samples(worker.url, name)
        assert set(on_leader) == {"0"}, (name, on_leader)
        assert set(on_worker) == {"1"}, (name, on_worker)
    for url, rank in ((leader.url, "0"), (worker.url, "1")):
        checked = _rank_samples(url, "sglang:freekv_checked_heads_total")[rank]
        recalled = _rank_samples(url, "sglang:freekv_recall_bytes_total")[rank]
        assert checked > 0 and recalled > 0, (rank, checked, recalled)
        assert _rank_samples(url, "sglang:freekv_host_pages_used")[rank] == 0
    assert metric_values(leader.url, "sglang:num_running_reqs") == [0.0]


def test_leader_shutdown_ends_the_worker(cluster: tuple[Node, Node]) -> None:
    """SIGTERM to the leader (what Kubernetes sends): both nodes are gone within
    STOP_TIMEOUT_S; the worker notices the closed gloo connection and exits by itself."""
    leader, worker = cluster
    leader.kill(signal.SIGTERM)
    leader_s = _wait_gone(leader, STOP_TIMEOUT_S)
    worker_s = _wait_gone(worker, STOP_TIMEOUT_S)
    logs = f"--- leader\n{leader.log()[-2000:]}\n--- worker\n{worker.log()[-2000:]}"
    assert leader_s is not None, f"leader still running {STOP_TIMEOUT_S}s after SIGTERM\n{logs}"
    assert worker_s is not None, f"worker still running after the leader stopped\n{logs}"
