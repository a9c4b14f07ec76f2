"""Memory pressure under ``--kv-policy freekv``: a host tier too small for the requests sent
at once. SGLang queues requests (and retracts running ones when decode runs out of logical
tokens, resuming them later); the server never crashes or hangs, every answer equals the
same request run alone (greedy; the budget covers every context, so FreeKV is exact), and
nothing is left held afterwards.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.helpers import (
    embedded_model_path,
    generate_ids,
    metric_values,
    run_server,
    wait_gauges_zero,
    wait_until,
)
from tests.passkey import filler_prompt

pytestmark = [pytest.mark.server, pytest.mark.slow]

# 0.33 GiB of float32 host tier (46080 B/token) = 240 pages of 32 tokens; with a 2048-token
# context and 32 running requests, SGLang gets (240 - 32) * 32 = 6656 logical tokens, while
# the 8 requests below need 8 x (1000 + 600) = 12800.
CFG = {"budget": 2048, "sink": 512, "window": 512, "host_memory_gb": 0.33}
N_REQ, PROMPT, NEW = 8, 1000, 600
GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used")


# Three requests alone (~3 min), then eight at once, queued and retracted (~10-20 min on 2 cores).
@pytest.mark.timeout(2700)
def test_small_host_tier_queues_and_retracts_with_correct_outputs(tmp_path: Path) -> None:
    model = embedded_model_path()
    args = ["--model-path", model, "--dtype", "float32", "--kv-policy", "freekv",
            "--freekv-config", json.dumps(CFG), "--context-length", "2048",
            "--enable-metrics", "--decode-log-interval", "1"]
    prompts = [list(filler_prompt(model, PROMPT + 60, seed=200 + i).input_ids[-PROMPT:])
               for i in range(N_REQ)]
    with run_server(args, tmp_path) as server:
        alone = [generate_ids(server, p, NEW, ignore_eos=True)["output_ids"]
                 for p in prompts[:3]]
        results: dict[int, object] = {}
        peak_running = [0]

        def run(i: int) -> None:
            try:
                # queued behind the others and retracted: ~10 min on 2 busy cores
                results[i] = generate_ids(server, prompts[i], NEW, ignore_eos=True,
                                          timeout=1500)["output_ids"]
            except Exception as exc:  # noqa: BLE001 - reported below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQ)]
        for t in threads:
            t.start()
        def finished() -> bool:
            vals = metric_values(server.url, "sglang:num_running_reqs")
            peak_running[0] = max([peak_running[0], *map(int, vals)])
            return not any(t.is_alive() for t in threads)

        wait_until(finished, 1500, "the requests finish (hang?)")
        for t in threads:
            t.join()
        for i in range(N_REQ):
            assert isinstance(results[i], list) and len(results[i]) == NEW, (i, results[i])
        for i in range(3):  # the requests also run alone: the same tokens under pressure
            assert results[i] == alone[i], i
        log = server.log().lower()
        assert peak_running[0] < N_REQ or "retract" in log, peak_running[0]
        wait_gauges_zero(server.url, GAUGES)
        assert server.generate("The capital of France is", 8)["text"].strip()
