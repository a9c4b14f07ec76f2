"""The soak's own traffic (``benchmarks/soak.py``): run sizes, the request plan (ragged
prompts, shared prefixes, both endpoints, streaming, ``n > 1``, aborts and disconnects, a few
over-long prompts) and the asyncio client that runs it and gives each request one outcome."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CONTEXT = 8192  # the embedded model's context length


@dataclass(frozen=True)
class Sizes:
    """Prompt and output sizes of one run (tokens)."""

    short: tuple[int, int] = (16, 1000)  # most prompts
    long: tuple[int, int] = (1000, 7000)  # ~1 in 10 over the whole run
    long_doc: tuple[int, int] = (5000, 6500)  # shared long prefixes
    out: tuple[int, int] = (4, 48)  # max_new_tokens of normal requests
    out_abort: tuple[int, int] = (48, 128)  # of requests meant to be aborted or dropped
    bench_input: int = 1000  # random-ids: uniform in [input * ratio, input]
    bench_output: int = 32
    bench_ratio: float = 0.05
    gsp_system: int = 700
    gsp_question: int = 64
    gsp_output: int = 16
    long_fraction_mixed: float = 0.25  # of the own traffic (bench prompts are all short)


FULL = Sizes()
QUICK = Sizes(long=(1000, 3000), long_doc=(1500, 2800), out=(4, 24), out_abort=(32, 96),
              bench_input=600, bench_output=16, gsp_system=400, gsp_question=32, gsp_output=8)


# ---------------------------------------------------------------------------- own traffic
@dataclass
class OwnRequest:
    idx: int
    endpoint: str  # "generate" | "chat"
    stream: bool
    fate: str  # "normal" | "abort" | "disconnect" | "invalid"
    n: int
    max_new_tokens: int
    temperature: float
    ignore_eos: bool
    prompt_ids: list[int]  # sent as input_ids (generate)
    prefix: str | None = None  # name of the shared prefix, if any
    # abort / disconnect trigger: after `after_chunks` streamed chunks, or after `after_s`
    after_chunks: int | None = None
    after_s: float | None = None
    extra: dict = field(default_factory=dict)


def plan_own(count: int, sizes: Sizes, tokenizer: Any, rng: random.Random,
             tag: str) -> list[OwnRequest]:
    """``count`` requests of the own mixed traffic (deterministic from ``rng``)."""
    vocab = len(tokenizer)

    def ids(n: int) -> list[int]:
        return [rng.randrange(200, vocab) for _ in range(n)]

    # shared prefixes: 4 short documents, 2 long ones (the radix cache and FreeKV's shared
    # host pages); each request adds its own suffix
    docs = {f"{tag}-doc{i}": ids(rng.randint(200, 900)) for i in range(4)}
    docs.update({f"{tag}-long{i}": ids(rng.randint(*sizes.long_doc)) for i in range(2)})
    long_docs = [k for k in docs if "-long" in k]
    short_docs = [k for k in docs if "-doc" in k]
    out: list[OwnRequest] = []
    for i in range(count):
        u = rng.random()
        fate = ("abort" if u < 0.125 else "disconnect" if u < 0.25 else
                "invalid" if u < 0.27 else "normal")
        endpoint = "generate" if rng.random() < 0.6 else "chat"
        stream = rng.random() < 0.5
        long = rng.random() < sizes.long_fraction_mixed
        shared = rng.random() < 0.35
        prefix = None
        if shared:
            prefix = rng.choice(long_docs if long else short_docs)
            prompt = docs[prefix] + ids(rng.randint(8, 64))
        elif long:
            prompt = ids(rng.randint(*sizes.long))
        else:
            prompt = ids(rng.randint(*sizes.short))
        n = 1
        if fate == "normal" and rng.random() < 0.12:
            n = rng.choice((2, 3))
        if fate == "invalid":
            prompt = ids(CONTEXT + rng.randint(1, 200))  # beyond the context: 400
        temperature = 0.0 if n == 1 and rng.random() < 0.6 else 0.8
        if fate in ("abort", "disconnect"):
            max_new = rng.randint(*sizes.out_abort)
            ignore_eos = True
        else:
            max_new = rng.randint(*sizes.out)
            ignore_eos = rng.random() < 0.5
        req = OwnRequest(i, endpoint, stream, fate, n, max_new, temperature, ignore_eos,
                         prompt, prefix)
        if fate in ("abort", "disconnect"):
            if stream and rng.random() < 0.6:
                # 0 chunks: right after the response headers (queue / prefill)
                req.after_chunks = rng.randint(0 if fate == "disconnect" else 1, 5)
            else:
                req.after_s = rng.uniform(0.2, 6.0)
        out.append(req)
    return out


def _payload(req: OwnRequest, rid: str, text: str | None, model: str) -> tuple[str, dict]:
    if req.endpoint == "generate":
        sp = {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
              "ignore_eos": req.ignore_eos}
        if req.n > 1:
            sp["n"] = req.n
        body = {"input_ids": req.prompt_ids, "sampling_params": sp, "stream": req.stream,
                "rid": rid}
        return "/generate", body
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": req.max_new_tokens, "temperature": req.temperature,
            "ignore_eos": req.ignore_eos, "stream": req.stream, "rid": rid}
    if req.n > 1:
        body["n"] = req.n
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


def _finish_reasons_generate(data: Any) -> list[str | None]:
    items = data if isinstance(data, list) else [data]
    out = []
    for item in items:
        fr = (item.get("meta_info") or {}).get("finish_reason")
        out.append(fr.get("type") if isinstance(fr, dict) else fr)
    return out


async def run_own_request(session: Any, url: str, req: OwnRequest, text: str | None,
                          model: str, timeout_s: float, phase: str) -> dict:
    """Send one request, apply its fate, return its record (never raises)."""
    import aiohttp

    rid = f"soak-{phase}-{req.idx}-{uuid.uuid4().hex[:8]}"
    path, body = _payload(req, rid, text, model)
    rec: dict[str, Any] = {
        "phase": phase, "idx": req.idx, "client": "own", "endpoint": req.endpoint,
        "stream": req.stream, "fate": req.fate, "n": req.n, "prefix": req.prefix,
        "in_tokens": len(req.prompt_ids), "max_new_tokens": req.max_new_tokens,
        "outcome": None, "status": None, "ttft": None, "e2e": None, "itl": [],
        "out_tokens": 0, "finish": None, "detail": None,
    }
    abort_sent = asyncio.Event()

    async def send_abort() -> None:
        try:
            async with session.post(f"{url}/abort_request", json={"rid": rid},
                                    timeout=aiohttp.ClientTimeout(total=60)) as r:
                rec["abort_status"] = r.status
        except Exception as exc:  # noqa: BLE001 - recorded; the request's outcome decides
            rec["abort_status"] = f"{type(exc).__name__}: {exc}"
        abort_sent.set()

    async def timed_abort(delay: float) -> None:
        await asyncio.sleep(delay)
        await send_abort()

    t0 = time.perf_counter()
    aborter: asyncio.Task | None = None
    if req.fate == "abort" and req.after_s is not None:
        aborter = asyncio.create_task(timed_abort(req.after_s))

    async def exchange() -> None:
        async with session.post(f"{url}{path}", json=body) as resp:
            rec["status"] = resp.status
            if resp.status != 200:
                text_body = (await resp.text())[:300]
                rec["detail"] = text_body
                expected = req.fate == "invalid" and 400 <= resp.status < 500
                rec["outcome"] = "rejected" if expected else "error"
                return
            if not req.stream:
                data = await resp.json(content_type=None)
                rec["e2e"] = time.perf_counter() - t0
                if req.endpoint == "generate":
                    finishes = _finish_reasons_generate(data)
                    items = data if isinstance(data, list) else [data]
                    rec["out_tokens"] = sum((it.get("meta_info") or {}).get(
                        "completion_tokens", 0) for it in items)
                else:
                    finishes = [c.get("finish_reason") for c in data.get("choices", [])]
                    rec["out_tokens"] = (data.get("usage") or {}).get("completion_tokens", 0)
                rec["finish"] = finishes
                return
            # streamed
            chunks = 0
            last_t = None
            per_index: dict[int, dict] = {}
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                data = json.loads(payload)
                if "error" in data:
                    # SGLang reports a refused streamed request in the stream (status 200)
                    err = data["error"] if isinstance(data["error"], dict) else {}
                    code = int(err.get("code") or 0)
                    rec["detail"] = str(data["error"])[:300]
                    expected = req.fate == "invalid" and 400 <= code < 500
                    rec["outcome"] = "rejected" if expected else "error"
                    return
                now = time.perf_counter()
                new_tokens = 0
                if req.endpoint == "generate":
                    idx = int(data.get("index", 0) or 0)
                    meta = data.get("meta_info") or {}
                    st = per_index.setdefault(idx, {"tokens": 0, "finish": None})
                    ct = int(meta.get("completion_tokens", st["tokens"]))
                    new_tokens = ct - st["tokens"]
                    st["tokens"] = ct
                    fr = meta.get("finish_reason")
                    if fr:
                        st["finish"] = fr.get("type") if isinstance(fr, dict) else fr
                else:
                    if data.get("usage"):
                        rec["out_tokens"] = data["usage"].get("completion_tokens", 0)
                    for ch in data.get("choices") or []:
                        st = per_index.setdefault(int(ch.get("index", 0)),
                                                  {"tokens": 0, "finish": None})
                        if (ch.get("delta") or {}).get("content"):
                            st["tokens"] += 1
                            new_tokens += 1
                        if ch.get("finish_reason"):
                            st["finish"] = ch["finish_reason"]
                if new_tokens > 0:
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    elif last_t is not None:
                        rec["itl"].extend([(now - last_t) / new_tokens] * new_tokens)
                    last_t = now
                chunks += 1
                if req.after_chunks is not None and chunks >= req.after_chunks:
                    if req.fate == "abort" and not abort_sent.is_set() and aborter is None:
                        await send_abort()
                    elif req.fate == "disconnect":
                        resp.close()  # drop the connection mid-stream
                        rec["outcome"] = "disconnected"
                        return
            rec["e2e"] = time.perf_counter() - t0
            rec["finish"] = [per_index[k]["finish"] for k in sorted(per_index)]
            if req.endpoint == "generate":
                rec["out_tokens"] = sum(s["tokens"] for s in per_index.values())
            elif not rec["out_tokens"]:
                rec["out_tokens"] = sum(s["tokens"] for s in per_index.values())
            if not done:
                rec["detail"] = "stream ended without [DONE]"

    try:
        async with asyncio.timeout(timeout_s):
            if req.fate == "disconnect" and req.after_chunks is None:
                # close the connection after a delay (queued, prefilling or decoding)
                try:
                    await asyncio.wait_for(exchange(), timeout=req.after_s)
                except TimeoutError:
                    rec["outcome"] = "disconnected"
            elif req.fate == "disconnect" and req.after_chunks == 0:
                async with session.post(f"{url}{path}", json=body) as resp:
                    rec["status"] = resp.status
                    resp.close()  # headers only: dropped before any token
                    rec["outcome"] = "disconnected" if resp.status == 200 else "error"
            else:
                await exchange()
            if aborter is not None:
                await aborter
    except TimeoutError:
        rec["outcome"] = "hung"
        rec["detail"] = f"no answer within {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - a broken connection is an outcome
        rec["outcome"] = "error"
        rec["detail"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if aborter is not None and not aborter.done():
            aborter.cancel()
    rec["e2e_any"] = time.perf_counter() - t0
    if rec["outcome"] is None:
        rec["outcome"] = classify(req, rec)
    return rec


def classify(req: OwnRequest, rec: dict) -> str:
    finishes = rec.get("finish") or []
    if rec.get("detail") == "stream ended without [DONE]":
        return "error"
    if req.fate == "invalid":
        rec["detail"] = "a prompt beyond the context was answered with 200"
        return "error"
    if len(finishes) != req.n:
        rec["detail"] = f"{len(finishes)} completions for n={req.n}"
        return "error"
    if all(f in ("length", "stop") for f in finishes):
        return {"abort": "abort_late", "disconnect": "disconnect_late"}.get(req.fate, "ok")
    if req.fate == "abort" and any(f == "abort" for f in finishes):
        return "aborted"
    rec["detail"] = f"finish reasons {finishes}"
    return "error"


async def run_own_phase(url: str, reqs: Sequence[OwnRequest], tokenizer: Any, model: str,
                        concurrency: int, timeout_s: float, phase: str) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    texts: dict[int, str] = {}
    for r in reqs:
        if r.endpoint == "chat":
            texts[r.idx] = tokenizer.decode(r.prompt_ids)

    connector = aiohttp.TCPConnector(limit=concurrency * 2 + 8)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        done = 0

        async def one(r: OwnRequest) -> dict:
            nonlocal done
            async with sem:
                rec = await run_own_request(session, url, r, texts.get(r.idx), model,
                                            timeout_s, phase)
            done += 1
            if done % 25 == 0 or done == len(reqs):
                print(f"  [{phase}] {done}/{len(reqs)} own requests done", flush=True)
            return rec

        return list(await asyncio.gather(*(one(r) for r in reqs)))
