"""FreeKV through the real SGLang server on CPU with the embedded model (issue item 8).

(a) budget >= context: greedy output identical to ``--kv-policy default``;
(b) passkey retrieval at ~3K / ~5K tokens with budget 512: FreeKV finds the key wherever
    dense attention does; (c) the same with ``--tp 2``;
(d) concurrent requests of different lengths plus aborted ones: the usage gauges go back to 0
    and the server still answers;
(e) bad requests (beyond the model's context, beyond the host tier) get a clear HTTP 4xx and
    the server stays up;
(f) prefix sharing with the radix cache (on in every FreeKV server here): a matched prefix is
    served from the host tier with the same tokens as the uncached request.

Only ONE server runs at a time (the machine has 2 cores): ``servers`` keeps the current
configuration's server and stops it before starting another, so tests are grouped by
configuration in file order. Everything runs in float32 (faster than bf16 on CPUs without
native bf16, and free of bf16 near-ties between engines' summation orders).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
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
)
from tests.passkey import build_passkey_prompt, filler_prompt, found_key, load_tokenizer

pytestmark = pytest.mark.server

FREEKV_CFG = {"budget": 512, "sink": 64, "window": 128}
CONTEXT_LEN = 8192  # SmolLM2-135M-Instruct
# Host tier of 0.1 GiB: 2 (K, V) * 30 layers * 3 KV heads * 64 dims * 4 bytes (float32) =
# 46080 B/token, so 72 pages of 32 tokens; one page stays spare for a running request's
# partial last page: a 2272-token context, fewer than the model's 8192.
HOST_GB = 0.1
HOST_TIER_TOKENS = (int(HOST_GB * (1 << 30)) // (2 * 30 * 3 * 64 * 4 * 32) - 1) * 32  # 2272

GAUGES = ("sglang:freekv_host_pages_used", "sglang:freekv_device_pages_used")

# (target tokens, depth): the key at 15%, 50% and 85% of ~3K and ~5K tokens of filler.
PASSKEY_CASES = [(n, d) for n in (3000, 5000) for d in (0.15, 0.5, 0.85)]
PASSKEY_CASES_TP2 = [(3000, d) for d in (0.15, 0.5, 0.85)]
PASSKEY_NEW_TOKENS = 10  # " 12345." is 6-7 tokens (digits are single tokens)

# (a): prompts of different lengths, every prompt + output within the 512-token budget.
EQUAL_LENGTHS = (6, 120, 300, 440)
EQUAL_NEW_TOKENS = 48


def _freekv_args(model: str, cfg: dict, *extra: str) -> list[str]:
    # The radix cache stays on (SGLang's default): FreeKV shares matched prefixes.
    return [
        "--model-path", model, "--dtype", "float32",
        "--kv-policy", "freekv", "--freekv-config", json.dumps(cfg), *extra,
    ]


class Servers:
    """One server at a time, keyed by configuration name; started on first use."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.model = embedded_model_path()
        self.name: str | None = None
        self.server: Server | None = None
        self._stack = ExitStack()
        self.configs = {
            "default": ["--model-path", self.model, "--dtype", "float32",
                        "--disable-radix-cache", "--kv-policy", "default"],
            "freekv": _freekv_args(self.model, FREEKV_CFG, "--enable-metrics"),
            "freekv_tp2": _freekv_args(self.model, FREEKV_CFG, "--tp", "2"),
            "freekv_small_host": _freekv_args(
                self.model, {**FREEKV_CFG, "host_memory_gb": HOST_GB}, "--enable-metrics"
            ),
            "freekv_no_overlap": _freekv_args(self.model, FREEKV_CFG,
                                              "--disable-overlap-schedule"),
        }

    def get(self, name: str) -> Server:
        if self.name != name:
            self.close()
            self.server = self._stack.enter_context(
                run_server(self.configs[name], self.tmp_path)
            )
            self.name = name
        assert self.server is not None
        return self.server

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self.name = None
        self.server = None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory.mktemp("freekv-servers"))
    try:
        yield pool
    finally:
        pool.close()


def _equal_prompts(model: str) -> list[list[int]]:
    """Token-id prompts of EQUAL_LENGTHS: a short story opening repeated for short ones, the
    tail of a passkey haystack (ending with the question) for longer ones."""
    story = load_tokenizer(model)("Once upon a time, in a small village,",
                                  add_special_tokens=False).input_ids
    out = []
    for i, n in enumerate(EQUAL_LENGTHS):
        if n <= 150:
            out.append((story * (n // len(story) + 1))[:n])
        else:
            out.append(list(filler_prompt(model, n + 200, seed=i).input_ids[-n:]))
    return out


@pytest.fixture(scope="module")
def passkey_prompts(servers: Servers) -> dict:
    model = servers.model
    cases = dict.fromkeys(PASSKEY_CASES + PASSKEY_CASES_TP2)
    return {
        case: build_passkey_prompt(model, case[0], case[1], seed=case[0] + i)
        for i, case in enumerate(cases)
    }


@pytest.fixture(scope="module")
def dense(request: pytest.FixtureRequest, servers: Servers, passkey_prompts: dict) -> dict:
    """Everything the dense (``--kv-policy default``) server answers for the selected tests,
    computed once on one server."""
    selected = {item.name for item in request.session.items}
    cases: list = []
    if "test_b_passkey_budget_512" in selected:
        cases += PASSKEY_CASES
    if "test_c_passkey_budget_512_tp2" in selected:
        cases += [c for c in PASSKEY_CASES_TP2 if c not in cases]
    server = servers.get("default")
    equal = [
        generate_ids(server, ids, EQUAL_NEW_TOKENS)["output_ids"]
        for ids in _equal_prompts(servers.model)
    ] if {"test_a_budget_covers_context_matches_default",
          "test_a_overlap_off_matches_overlap_on"} & selected else None
    answers = {
        case: generate_ids(server, passkey_prompts[case].input_ids, PASSKEY_NEW_TOKENS)["text"]
        for case in cases
    }
    return {"equal": equal, "passkey": answers}


def _passkey_check(server: Server, cases: list, prompts: dict, dense: dict) -> None:
    rows, missed = [], []
    for case in cases:
        p = prompts[case]
        got = generate_ids(server, p.input_ids, PASSKEY_NEW_TOKENS)["text"]
        d_ok, f_ok = found_key(dense["passkey"][case], p.key), found_key(got, p.key)
        rows.append(f"{p.n_tokens:5d} tok depth {case[1]:.2f} key {p.key}: "
                    f"dense {d_ok} {dense['passkey'][case]!r} | freekv {f_ok} {got!r}")
        if d_ok and not f_ok:
            missed.append(case)
    report = "\n".join(rows)
    dense_found = sum(found_key(dense["passkey"][c], prompts[c].key) for c in cases)
    # The comparison means something only if dense attention mostly finds the key.
    assert dense_found * 3 >= 2 * len(cases), f"dense found too few keys:\n{report}"
    assert not missed, f"FreeKV missed keys dense attention found:\n{report}"


# ---------------------------------------------------------------- TP1, budget 512 (metrics on)


def test_a_budget_covers_context_matches_default(servers: Servers, dense: dict) -> None:
    """Every prompt + output fits in the budget: FreeKV (overlap scheduler on, the default)
    must equal dense, token for token."""
    server = servers.get("freekv")
    assert "overlap scheduler on" in server.log()
    assert "CUDA graphs none on CPU" in server.log()  # no graph claim on a CPU engine
    got = [
        generate_ids(server, ids, EQUAL_NEW_TOKENS)["output_ids"]
        for ids in _equal_prompts(servers.model)
    ]
    assert got == dense["equal"]


def test_b_passkey_budget_512(servers: Servers, passkey_prompts: dict, dense: dict) -> None:
    server = servers.get("freekv")
    _passkey_check(server, PASSKEY_CASES, passkey_prompts, dense)


def _stream_then_close(url: str, payload: dict, chunks: int, seen: list) -> None:
    with requests.post(f"{url}/generate", json={**payload, "stream": True},
                       stream=True, timeout=600) as resp:
        resp.raise_for_status()
        n = 0
        for line in resp.iter_lines():
            if line.startswith(b"data:") and b"[DONE]" not in line:
                n += 1
                if n >= chunks:
                    break
        seen.append(n)
    # leaving the `with` closes the connection mid-stream: SGLang aborts the request


def test_d_concurrent_and_aborted_requests_release_everything(
    servers: Servers, passkey_prompts: dict
) -> None:
    server = servers.get("freekv")
    model = servers.model
    lengths = [150, 300, 500, 700, 900, 1300, 1900, 2800]  # 5 of 8 exceed the budget
    prompts = [filler_prompt(model, n, seed=100 + i).input_ids for i, n in enumerate(lengths)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            out = generate_ids(server, prompts[i], 16 + 4 * i, ignore_eos=True)
            results[i] = out["meta_info"]["completion_tokens"]
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    streamed: list[int] = []
    abort_rid = f"abort-{uuid.uuid4().hex}"
    aborted_result: list = []

    def run_aborted_by_rid() -> None:
        payload = {"input_ids": list(filler_prompt(model, 1200, seed=7).input_ids), "rid": abort_rid,
                   "sampling_params": {"max_new_tokens": 2000, "temperature": 0.0,
                                       "ignore_eos": True}}
        try:
            aborted_result.append(post_generate(server.url, payload))
        except Exception as exc:  # noqa: BLE001
            aborted_result.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    long_stream = {"sampling_params": {"max_new_tokens": 2000, "temperature": 0.0,
                                       "ignore_eos": True}}
    threads += [
        threading.Thread(target=_stream_then_close, args=(
            server.url, {"input_ids": list(prompts[4]), **long_stream}, 3, streamed)),
        threading.Thread(target=_stream_then_close, args=(
            server.url, {"input_ids": list(prompts[2]), **long_stream}, 5, streamed)),
        threading.Thread(target=run_aborted_by_rid),
    ]
    for t in threads:
        t.start()

    # While the load runs, the gauges must show pages in use at least once.
    peak = {g: 0.0 for g in GAUGES}
    aborted_sent = False
    for tick in range(800):  # polls of 0.5 s: at most ~400 s
        if not any(t.is_alive() for t in threads):
            break
        for g in GAUGES:
            vals = metric_values(server.url, g)
            if vals:
                peak[g] = max(peak[g], sum(vals))
        if not aborted_sent and tick >= 16:  # ~8 s in: the long request is decoding
            r = requests.post(f"{server.url}/abort_request", json={"rid": abort_rid}, timeout=30)
            assert r.status_code == 200, r.text
            aborted_sent = True
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "requests did not finish"

    for i in range(len(prompts)):
        assert results[i] == 16 + 4 * i, f"request {i} ({lengths[i]} tokens): {results[i]!r}"
    assert len(streamed) == 2
    assert aborted_sent and len(aborted_result) == 1
    if isinstance(aborted_result[0], requests.Response) and aborted_result[0].ok:
        # aborted: finished early with an abort reason, not after 2000 tokens
        meta = aborted_result[0].json()["meta_info"]
        assert meta["completion_tokens"] < 2000, meta

    for g in GAUGES:
        assert metric_values(server.url, g), f"{g} is not exported at /metrics"
    assert peak["sglang:freekv_host_pages_used"] > 0, f"host gauge never rose: {peak}"

    wait_gauges_zero(server.url, GAUGES)

    out = server.generate("The capital of France is", 8)
    assert out["meta_info"]["completion_tokens"] > 0 and out["text"].strip()


def test_f_radix_prefix_sharing(servers: Servers, passkey_prompts: dict) -> None:
    """A ~3K-token passkey prompt, then the same prompt and one that shares its first 2000
    tokens: the repeats report cached tokens (their prefix KV comes from the host tier, their
    full pages are shared) and answer exactly as the uncached request; /flush_cache returns
    every page the radix cache held."""
    server = servers.get("freekv")
    p = passkey_prompts[(3000, 0.5)]
    ids = list(p.input_ids)
    first = generate_ids(server, ids, PASSKEY_NEW_TOKENS)
    again = generate_ids(server, ids, PASSKEY_NEW_TOKENS)
    assert again["meta_info"]["cached_tokens"] >= len(ids) - 1, again["meta_info"]
    assert again["output_ids"] == first["output_ids"]
    mixed = ids[:2000] + ids[-300:]  # the needle is at ~1500: kept
    out = generate_ids(server, mixed, PASSKEY_NEW_TOKENS)
    assert out["meta_info"]["cached_tokens"] >= 2000, out["meta_info"]
    assert found_key(out["text"], p.key) == found_key(first["text"], p.key), out["text"]
    cached = metric_values(server.url, "sglang:freekv_host_pages_cached")
    assert cached and sum(cached) > 0, cached
    assert requests.post(f"{server.url}/flush_cache", timeout=60).status_code == 200
    wait_gauges_zero(server.url, ("sglang:freekv_host_pages_cached",), timeout_s=30)
    assert sum(metric_values(server.url, "sglang:freekv_host_pages_used")) == 0


def test_e_prompt_beyond_model_context_is_refused(servers: Servers) -> None:
    server = servers.get("freekv")
    ids = list(filler_prompt(servers.model, 9000, seed=5).input_ids)
    assert len(ids) > CONTEXT_LEN
    resp = post_generate(server.url, {"input_ids": ids,
                                      "sampling_params": {"max_new_tokens": 8}})
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert "context length" in resp.text.lower(), resp.text[:500]
    out = server.generate("The capital of France is", 8)
    assert out["text"].strip()


# ---------------------------------------------------------------- TP2, budget 512


def test_c_passkey_budget_512_tp2(servers: Servers, passkey_prompts: dict, dense: dict) -> None:
    server = servers.get("freekv_tp2")
    _passkey_check(server, PASSKEY_CASES_TP2, passkey_prompts, dense)


# ---------------------------------------------------------------- TP1, host tier 0.1 GiB


def test_e_request_beyond_host_tier_is_refused(servers: Servers) -> None:
    """0.1 GiB of host tier holds HOST_TIER_TOKENS (2272) float32 tokens < the model's 8192:
    the server then serves a 2272-token context. A prompt, or prompt + max_new_tokens, beyond
    the tier gets a clear 4xx on both endpoints; a request that fits runs to the end in the
    sparse regime; nothing is left held and the server keeps answering."""
    server = servers.get("freekv_small_host")
    assert f"serving with --context-length {HOST_TIER_TOKENS}" in server.log()
    model = servers.model
    long_ids = list(filler_prompt(model, 3000, seed=6).input_ids)
    assert len(long_ids) > HOST_TIER_TOKENS
    resp = post_generate(server.url, {"input_ids": long_ids,
                                      "sampling_params": {"max_new_tokens": 8}}, timeout=120)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert f"context length ({HOST_TIER_TOKENS} tokens)" in resp.text, resp.text[:500]

    text = load_tokenizer(model).decode(long_ids)
    resp = requests.post(f"{server.url}/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": text}],
        "max_tokens": 8}, timeout=120)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])

    mid = list(filler_prompt(model, 2000, seed=8).input_ids)
    resp = post_generate(server.url, {"input_ids": mid, "sampling_params": {
        "max_new_tokens": 400, "temperature": 0.0}}, timeout=120)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert "exceeds" in resp.text and str(HOST_TIER_TOKENS) in resp.text, resp.text[:500]

    out = generate_ids(server, mid, 64, ignore_eos=True)  # fits: 2000 + 64 <= 2272
    assert out["meta_info"]["completion_tokens"] == 64

    # Many distinct short requests: each cached one keeps a partial host page, so the host
    # tier (72 pages) runs out before SGLang's token pool would evict; FreeKV then evicts
    # radix-cache entries itself and every request is served.
    for i in range(130):
        out = server.generate(f"Request number {i}: say hello.", 3)
        assert out["meta_info"]["completion_tokens"] > 0

    out = server.generate("The capital of France is", 8)
    assert out["text"].strip()
    for g in GAUGES:
        vals = metric_values(server.url, g)
        assert vals and sum(vals) == 0, (g, vals)


# ---------------------------------------------------------------- TP1, overlap scheduler off


def test_a_overlap_off_matches_overlap_on(servers: Servers, dense: dict) -> None:
    """The same prompts with the overlap scheduler off: the same tokens as dense (and so as
    the overlap-on server of test (a))."""
    server = servers.get("freekv_no_overlap")
    assert "overlap scheduler off" in server.log()
    got = [
        generate_ids(server, ids, EQUAL_NEW_TOKENS)["output_ids"]
        for ids in _equal_prompts(servers.model)
    ]
    assert got == dense["equal"]
