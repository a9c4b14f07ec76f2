"""Bad input to a FreeKV server: every case gets a 4xx with a clear message, the server
stays up, and nothing leaks (the usage gauges read 0 afterwards).

One table row per case: the endpoint, the raw body (bytes or a JSON-able object), and a
piece of the message the answer must carry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import Server, embedded_model_path, metric_values, run_server
from tests.passkey import filler_prompt

pytestmark = pytest.mark.server

GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used")
GEN, CHAT = "/generate", "/v1/chat/completions"


def _long_prompt() -> list[int]:
    return list(filler_prompt(embedded_model_path(), 9000, seed=3).input_ids)


CASES: list[tuple[str, str, object, str]] = [
    # (id, endpoint, body, expected in the message (lower case))
    ("negative-max-new-tokens", GEN,
     {"text": "Hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("huge-max-new-tokens", GEN,
     {"text": "Hi", "sampling_params": {"max_new_tokens": 10**9}}, "context length"),
    ("prompt-beyond-context", GEN,
     {"input_ids": "LONG", "sampling_params": {"max_new_tokens": 4}}, "context length"),
    ("empty-prompt", GEN, {"text": "", "sampling_params": {"max_new_tokens": 4}}, "empty"),
    ("empty-input-ids", GEN, {"input_ids": [], "sampling_params": {"max_new_tokens": 4}},
     "empty"),
    ("invalid-json", GEN, b'{"text": "Hi", "sampling_params": {', "json"),
    ("text-not-a-string", GEN, {"text": 123, "sampling_params": {"max_new_tokens": 4}}, "text"),
    ("sampling-params-not-an-object", GEN, {"text": "Hi", "sampling_params": "greedy"},
     "sampling_params"),
    ("max-new-tokens-not-a-number", GEN,
     {"text": "Hi", "sampling_params": {"max_new_tokens": "ten"}}, "expected"),
    ("non-utf8-body", GEN, b'{"text": "\xff\xfe\xfa"}', ""),
    ("unknown-sampling-key", GEN,
     {"text": "Hi", "sampling_params": {"max_new_tokens": 4, "temprature": 0}}, "temprature"),
    ("huge-n", GEN, {"text": "Hi", "sampling_params": {"max_new_tokens": 4, "n": 10**6}}, "n"),
    ("negative-top-logprobs", GEN,
     {"text": "Hi", "return_logprob": True, "top_logprobs_num": -1,
      "sampling_params": {"max_new_tokens": 4}}, "logprob"),
    ("logprob-start-beyond-prompt", GEN,
     {"text": "Hi", "return_logprob": True, "logprob_start_len": 100,
      "sampling_params": {"max_new_tokens": 4}}, "logprob_start_len"),
    ("token-id-out-of-vocab", GEN,
     {"input_ids": [10**9], "sampling_params": {"max_new_tokens": 4}}, "vocab"),
    ("chat-messages-not-a-list", CHAT, {"model": "default", "messages": "hello"}, "messages"),
    ("chat-negative-max-tokens", CHAT,
     {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -5},
     "max_tokens"),
    ("chat-unknown-role", CHAT,
     {"model": "default", "messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--model-path", embedded_model_path(), "--dtype", "float32", "--kv-policy", "freekv",
            "--freekv-config", json.dumps({"budget": 512, "sink": 64, "window": 128}),
            "--enable-metrics"]
    with run_server(args, Path(tmp_path_factory.mktemp("bad-input"))) as srv:
        yield srv


def _post(server: Server, endpoint: str, body: object) -> requests.Response:
    if body == "LONG" or (isinstance(body, dict) and body.get("input_ids") == "LONG"):
        body = {**body, "input_ids": _long_prompt()}  # type: ignore[dict-item]
    if isinstance(body, bytes):
        return requests.post(f"{server.url}{endpoint}", data=body, timeout=120,
                             headers={"content-type": "application/json"})
    return requests.post(f"{server.url}{endpoint}", json=body, timeout=120)


@pytest.mark.parametrize("endpoint,body,needle", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_is_a_clear_4xx(server: Server, endpoint: str, body: object,
                                    needle: str) -> None:
    resp = _post(server, endpoint, body)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert "Traceback" not in resp.text, resp.text[:2000]
    assert needle in resp.text.lower(), resp.text[:500]


def test_the_server_is_up_and_nothing_leaked(server: Server) -> None:
    out = server.generate("The capital of France is", 8)
    assert out["meta_info"]["completion_tokens"] > 0
    for g in GAUGES:
        vals = metric_values(server.url, g)
        assert vals and sum(vals) == 0, (g, vals)
