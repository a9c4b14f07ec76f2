"""Long prompts under FreeKV: chunked prefill streamed into the host tier through a one-layer
scratch.

* budget >= context: greedy outputs equal ``--kv-policy default`` with chunk sizes 256 and
  1024 (each chunk reads its prefix back from the host tier, exactly);
* a ~7K-token passkey prompt on a (simulated) device whose KV memory holds ~3.3K dense tokens
  (a prompt staged in every layer could not fit; one layer's prefix plus a chunk does): the
  key is found wherever dense attention on a large device finds it;
* a request decoding while a ~7K prompt prefills in chunks keeps producing tokens: at least
  one per two chunks of the prefill (counted in tokens, not seconds), not none until it ends;
* an abort during the chunked prefill returns every host page and device page.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import (
    Server,
    embedded_model_path,
    generate_ids,
    metric_values,
    post_generate,
    run_server,
    wait_gauges_zero,
    wait_until,
)
from tests.passkey import build_passkey_prompt, filler_prompt, found_key

pytestmark = [pytest.mark.server, pytest.mark.slow]

EXACT = {"budget": 4096, "sink": 512, "window": 512}  # covers every prompt + output below
SMALL = {"budget": 512, "sink": 64, "window": 128}
GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used")
# ~0.15 GiB of KV after 0.5 GiB of weights and 10% slack: 3.3K dense float32 tokens.
DEVICE_GB = 0.75
N_NEW = 24


def _args(cfg: dict | None, *extra: str) -> list[str]:
    args = ["--model-path", embedded_model_path(), "--dtype", "float32", *extra]
    if cfg is None:
        return [*args, "--kv-policy", "default", "--disable-radix-cache"]
    return [*args, "--kv-policy", "freekv", "--freekv-config", json.dumps(cfg),
            "--enable-metrics"]


def _prompts() -> list[list[int]]:
    model = embedded_model_path()
    return [list(filler_prompt(model, n + 80, seed=300 + i).input_ids[-n:])
            for i, n in enumerate((700, 1900, 3100))]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Dense answers (default policy, a large device): equal prompts and the 7K passkey."""
    model = embedded_model_path()
    key = build_passkey_prompt(model, 7000, 0.35, seed=77)
    with run_server(_args(None), Path(tmp_path_factory.mktemp("dense"))) as srv:
        equal = [_greedy_with_logprobs(srv, p) for p in _prompts()]
        text = generate_ids(srv, key.input_ids, 10)["text"]
    return {"equal": equal, "key": key, "key_text": text}


def _greedy_with_logprobs(srv: Server, ids: list[int]) -> tuple[list[int], dict[int, float]]:
    """Greedy output ids and the top-5 log-probabilities after the prompt's last token (the
    first output position: the last prompt token's logits through log-softmax)."""
    resp = post_generate(srv.url, {
        "input_ids": ids, "return_logprob": True, "top_logprobs_num": 5,
        "sampling_params": {"max_new_tokens": N_NEW, "temperature": 0.0}}, timeout=900)
    resp.raise_for_status()
    out = resp.json()
    top = out["meta_info"]["output_top_logprobs"][0]  # [(logprob, token id, text)] x 5
    return out["output_ids"], {int(t[1]): float(t[0]) for t in top}


@pytest.mark.parametrize("chunk", [256, 1024])
def test_chunked_prefill_equals_dense(tmp_path: Path, dense: dict, chunk: int) -> None:
    """Budget >= context, float32: chunked prefill (each chunk reading its prefix back from
    the host tier) gives dense's greedy tokens and, after the prompt, its top-5
    log-probabilities within 1e-4."""
    with run_server(_args(EXACT, "--chunked-prefill-size", str(chunk)), tmp_path) as srv:
        assert f"chunked prefill {chunk} tokens" in srv.log()
        got = [_greedy_with_logprobs(srv, p) for p in _prompts()]
    for (ids, top), (want_ids, want_top) in zip(got, dense["equal"]):
        assert ids == want_ids
        assert top.keys() == want_top.keys(), (top, want_top)
        worst = max(abs(top[t] - want_top[t]) for t in top)
        assert worst < 1e-4, (worst, top, want_top)


@pytest.fixture(scope="module")
def small_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = _args(SMALL, "--chunked-prefill-size", "1024", "--mem-fraction-static", "0.9")
    env = {"SGLANG_FREEKV_CPU_DEVICE_GB": str(DEVICE_GB)}
    with run_server(args, Path(tmp_path_factory.mktemp("small")), env=env) as srv:
        yield srv


def test_7k_prompt_on_a_small_device(small_device: Server, dense: dict) -> None:
    srv = small_device
    plan = [ln for ln in srv.log().splitlines() if "device plan" in ln]
    assert plan, srv.log()[-3000:]
    key = dense["key"]
    got = generate_ids(srv, key.input_ids, 10)["text"]
    if found_key(dense["key_text"], key.key):
        assert found_key(got, key.key), (got, dense["key_text"])
    _wait_idle(srv)


def _wait_idle(srv: Server) -> None:
    wait_gauges_zero(srv.url, GAUGES)


def test_decoding_goes_on_while_a_long_prompt_prefills(small_device: Server) -> None:
    srv = small_device
    model = embedded_model_path()
    tokens = [0]  # the decoding request's streamed tokens so far
    started = threading.Event()

    def stream() -> None:
        payload = {"input_ids": list(filler_prompt(model, 300, seed=5).input_ids),
                   "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
                   "stream": True}
        with requests.post(f"{srv.url}/generate", json=payload, stream=True,
                           timeout=900) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data:") and b"[DONE]" not in line:
                    tokens[0] += 1
                    if tokens[0] == 3:
                        started.set()

    th = threading.Thread(target=stream)
    th.start()
    assert started.wait(timeout=600), "the decoding request never started"
    long_ids = list(filler_prompt(model, 7000, seed=6).input_ids)
    before = tokens[0]
    out = generate_ids(srv, long_ids, 1)
    during = tokens[0] - before
    th.join(timeout=900)
    assert out["meta_info"]["completion_tokens"] == 1
    # Counted in tokens, not seconds: with a decode step between chunks the decoding request
    # gets about one token per chunk of the long prompt, not none until the prefill ends.
    chunks = -(-len(long_ids) // 1024)
    assert during >= chunks // 2, (during, chunks)
    _wait_idle(srv)


def test_abort_during_chunked_prefill_frees_everything(small_device: Server) -> None:
    srv = small_device
    model = embedded_model_path()
    rid = "long-abort"
    payload = {"input_ids": list(filler_prompt(model, 7000, seed=9).input_ids), "rid": rid,
               "sampling_params": {"max_new_tokens": 8}}
    result: list[object] = []
    th = threading.Thread(target=lambda: result.append(
        requests.post(f"{srv.url}/generate", json=payload, timeout=900)))
    th.start()
    wait_until(lambda: sum(metric_values(srv.url, "sglang:freekv_host_pages_used")) > 0,
               300, "the long prefill takes host pages", interval_s=0.2)
    assert requests.post(f"{srv.url}/abort_request", json={"rid": rid},
                         timeout=60).status_code == 200
    th.join(timeout=300)
    assert result, "the aborted request never got an answer"
    _wait_idle(srv)
    assert srv.generate("The capital of France is", 8)["text"].strip()
