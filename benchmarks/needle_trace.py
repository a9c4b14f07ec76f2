"""Per-step trace of FreeKV's page selection while the embedded model copies a needle (offline).

HF transformers decodes a ``tests/needles.py`` prompt with the embedded model; every non-dense
layer's decode attention is restricted, per KV head, to what FreeKV keeps on the device:
sink pages + the retrieved pages + the window (the current partial page included). The
retrieved pages are chosen by the library's own selection (``sglang_freekv.retrieval.
select_batch`` over page digests built from the post-RoPE keys) and follow the serving path's
schedule (``cache.FreeKVCache``):

* the first sparse step selects with the current query ``q_t`` (no speculative result yet);
* speculative (default): step ``t`` attends over the pages selected with ``q_{t-1}``, except
  KV heads whose group-mean ``cos(q_t, q_{t-1}) < tau``, which re-select with ``q_t``;
* ``--sync``: every step selects with ``q_t``.

Per decode step it records, for every layer and KV head: the pages it attends, whether each
page holding needle-value tokens is resident, whether correction fired, the cosine, the exact
attention mass (group mean, over the *full* context) on each needle page, and the page's
selection rank. ``--mode dense`` decodes without restriction.

    .venv/bin/python benchmarks/needle_trace.py --context 4096 --depth 0.5 --budget 512 \
        --sink 64 --window 128 [--sync] [--json /tmp/trace.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from tests.needles import build_needle_prompt, exact_match  # noqa: E402


class Tracer:
    """FreeKV's per-(layer, KV head) residency over an HF decode, with a trace per step."""

    def __init__(self, args: argparse.Namespace, needle_pages: list[int], extra: dict) -> None:
        self.a = argparse.Namespace(**vars(args))
        p = args.page_size
        self.p, self.ns, self.nw = p, args.sink // p, args.window // p
        self.k = args.budget // p - self.ns - self.nw
        self.needle_pages = needle_pages
        self.extra = extra  # keyword args for select_batch (a selection knob under test)
        self.last_q: dict[int, torch.Tensor] = {}
        self.spec: dict[int, torch.Tensor] = {}  # layer -> [H, k] pages selected with q_{t-1}
        self.step = -1
        self.trace: list[dict] = []

    def select(self, q: torch.Tensor, key: torch.Tensor, n_pages: int) -> tuple:
        """Top-k pages per KV head with the library's selection. ``q [Hq, D]``,
        ``key [H, n, D]`` post-RoPE; candidates ``[ns, n_pages - nw)``."""
        from sglang_freekv.retrieval import select_batch

        h, n, d = key.shape
        full = n // self.p
        kp = key[:, : full * self.p].reshape(h, full, self.p, d)
        dg = torch.stack([kp.amin(2), kp.amax(2)], dim=2).transpose(0, 1)  # [pages, H, 2, D]
        pt = torch.arange(full, dtype=torch.int32)[None]  # [1, pages]
        cs = torch.tensor([self.ns], dtype=torch.int32)
        ce = torch.tensor([n_pages - self.nw], dtype=torch.int32)
        scale = self.a.score_scale or d**-0.5
        sel, sc = select_batch(q[None].contiguous(), dg.contiguous(), pt, cs, ce, None, h,
                               self.k, scale, **self.extra)
        return sel[0], sc[0]  # [H, k]

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kw):  # type: ignore[no-untyped-def]
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if (query.shape[2] != 1 or layer in self.a.dense_layers or self.a.mode == "dense"):
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, dropout=dropout, **kw)
        if layer == min(set(range(64)) - set(self.a.dense_layers)):
            self.step += 1
            self.trace.append({"step": self.step, "layers": {}})
        _, hq, _, d = query.shape
        h, n = key.shape[1], key.shape[2]
        g = hq // h
        p, ns, nw, k = self.p, self.ns, self.nw, self.k
        n_pages = -(-n // p)
        q = query[0, :, 0]  # [Hq, D]
        kk = key[0]  # [H, n, D]
        scale = scaling or d**-0.5
        # exact attention mass per page (group mean), for the trace
        logits = torch.einsum("hgd,hnd->hgn", q.float().view(h, g, d), kk.float()) * scale
        probs = torch.softmax(logits, -1).mean(1)  # [H, n]
        mass = torch.nn.functional.pad(probs, (0, n_pages * p - n)).view(h, n_pages, p).sum(-1)
        entry: dict = {"n": n}
        keep = torch.ones(h, n, dtype=torch.bool)
        if n_pages - ns - nw > k:  # sparse regime
            cos = torch.nn.functional.cosine_similarity(
                q.float(), self.last_q.get(layer, q).float(), dim=-1).view(h, g).mean(1)
            sel_now, sc_now = self.select(q, kk, n_pages)
            if self.a.sync or layer not in self.spec:
                sel, flags = sel_now, [True] * h
            else:
                spec = self.spec[layer]
                flags = [bool(c < self.a.tau) for c in cos] if self.a.tau is not None \
                    else [False] * h
                sel = torch.stack([sel_now[x] if flags[x] else spec[x] for x in range(h)])
            keep[:] = False
            keep[:, : ns * p] = True
            keep[:, (n_pages - nw) * p:] = True
            for x in range(h):
                for page in sel[x].tolist():
                    if page >= 0:
                        keep[x, page * p: (page + 1) * p] = True
            ranks = {}
            for x in range(h):
                order = sel_now[x].tolist()
                ranks[x] = {pg: (order.index(pg) if pg in order else -1)
                            for pg in self.needle_pages}
            entry.update({
                "flags": flags, "cos": [round(float(c), 3) for c in cos],
                "sel": sel.tolist(),
                "resident": {pg: [bool(keep[x, pg * p]) for x in range(h)]
                             for pg in self.needle_pages},
                "rank_now": ranks,
            })
        entry["mass"] = {pg: [round(float(mass[x, pg]), 4) for x in range(h)]
                         for pg in self.needle_pages if pg < n_pages}
        if self.a.mode != "dense":
            # speculative selection for the next step (candidates at n + 1), with q_t
            self.last_q[layer] = q.clone()
            nxt = -(-(n + 1) // p)
            if nxt - ns - nw > k:
                self.spec[layer] = self.select(q, kk, nxt)[0] if nxt == n_pages else \
                    self._select_next(q, kk, nxt)
        self.trace[-1]["layers"][layer] = entry if self.trace else None
        mask = torch.where(keep, 0.0, float("-inf")).to(query.dtype)
        mask = mask.repeat_interleave(g, 0)[None, :, None, :]  # [1, Hq, 1, n]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
            attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def _select_next(self, q: torch.Tensor, kk: torch.Tensor, nxt: int) -> torch.Tensor:
        return self.select(q, kk, nxt)[0]


def _decode(model, cache, first: int, n_new: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy decode of ``n_new`` tokens from a prefilled cache (its last token not fed)."""
    out, tok = [], first
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache,
                           use_cache=True).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
    return out


def tail_misses(trace: list[dict], tail: int, heavy: float = 0.1) -> str:
    """Over the decode: (layer, KV head, step) triples whose exact attention mass on the
    needle's tail page is >= ``heavy`` while the page is not resident ("miss"), of them the
    ones whose q_t selection would have had it ("q_t"), and the largest missed mass."""
    miss = qt = 0
    worst = 0.0
    for st in trace:
        for e in st["layers"].values():
            if not e or "resident" not in e or tail not in e["mass"]:
                continue
            for x, m in enumerate(e["mass"][tail]):
                if m >= heavy and not e["resident"][tail][x]:
                    miss += 1
                    qt += e["rank_now"][x][tail] >= 0
                    worst = max(worst, m)
    return f"[miss {miss} q_t {qt} max {worst:.2f}]"


def scan(args: argparse.Namespace) -> None:
    """One prefill per case, then dense and each FreeKV variant decode from a copy of it."""
    import copy

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from sglang_freekv.models import prepare

    model_path = str(prepare("smollm2"))
    tok = AutoTokenizer.from_pretrained(model_path)
    box: dict = {}

    def attention(*a, **kw):  # type: ignore[no-untyped-def]
        return box["tracer"].attention(*a, **kw)

    AttentionInterface.register("freekv_scan", attention)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, args.dtype), attn_implementation="freekv_scan").eval()
    variants = json.loads(args.variants)
    rows = []
    for depth in [float(x) for x in args.depths.split(",")]:
        for split in args.splits.split(","):
            for seed in [int(x) for x in args.seeds.split(",")]:
                sp = None if split == "none" else split
                prompt = build_needle_prompt(model_path, args.context, depth, args.shape,
                                             args.haystack, sp, seed=seed,
                                             page_size=args.page_size)
                pages = sorted({pg for pp in prompt.pages(args.page_size) for pg in pp})
                dense_args = argparse.Namespace(**{**vars(args), "mode": "dense"})
                box["tracer"] = Tracer(dense_args, pages, {})
                ids = list(prompt.input_ids)
                with torch.no_grad():
                    pre = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
                res = {}
                for name, v in [("dense", None)] + list(variants.items()):
                    if v is None:
                        box["tracer"] = Tracer(dense_args, pages, {})
                    else:
                        va = argparse.Namespace(**{**vars(args), "mode": "freekv",
                                                   **{k: x for k, x in v.items()
                                                      if k != "select"}})
                        box["tracer"] = Tracer(va, pages, v.get("select", {}))
                    new = _decode(model, copy.deepcopy(pre.past_key_values), ids[-1],
                                  prompt.max_new_tokens())
                    text = tok.decode(new)
                    res[name] = (exact_match(text, prompt.values), text,
                                 tail_misses(box["tracer"].trace, pages[-1]))
                rows.append((depth, split, seed, prompt.value_spans[0], pages, res))
                print(f"depth {depth:.2f} {split:>4} seed {seed} span {prompt.value_spans[0]} "
                      f"pages {pages}: " + " | ".join(
                          f"{n} {'ok' if ok else 'WRONG'} {t.strip()[:12]!r} {m}"
                          for n, (ok, t, m) in res.items()), flush=True)
    names = ["dense"] + list(variants)
    print("scores: " + ", ".join(f"{n} {sum(r[5][n][0] for r in rows)}/{len(rows)}"
                                 for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("freekv", "dense"), default="freekv")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--shape", default="digits7")
    ap.add_argument("--haystack", default="repeat")
    ap.add_argument("--split", default="tail")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.8)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[0])
    ap.add_argument("--score-scale", type=float, default=None)
    ap.add_argument("--select-extra", default="{}", help="JSON kwargs for select_batch")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="write the trace here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--scan", action="store_true",
                    help="no trace: score dense and --variants over --depths x --splits x "
                    "--seeds, one prefill per case")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--splits", default="none,tail")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default='{"spec": {"select": {"span_weight": 0}}, '
                    '"sync": {"sync": true, "select": {"span_weight": 0}}}',
                    help="JSON name -> {tracer option overrides, select: select_batch kwargs}")
    args = ap.parse_args()
    if args.scan:
        scan(args)
        return

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from sglang_freekv.models import prepare

    model_path = str(prepare("smollm2"))
    split = None if args.split == "none" else args.split
    prompt = build_needle_prompt(model_path, args.context, args.depth, args.shape,
                                 args.haystack, split, seed=args.seed, page_size=args.page_size)
    pages = sorted({pg for pp in prompt.pages(args.page_size) for pg in pp})
    tracer = Tracer(args, pages, json.loads(args.select_extra))
    AttentionInterface.register("freekv_trace", tracer.attention)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, args.dtype), attn_implementation="freekv_trace").eval()
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=prompt.max_new_tokens(), do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new)
    ok = exact_match(text, prompt.values)
    print(f"{args.mode}{' sync' if args.sync else ''} budget {args.budget} ctx "
          f"{prompt.n_tokens} depth {args.depth} {args.shape}/{args.haystack}/{args.split} "
          f"values {prompt.values} spans {prompt.value_spans} pages {pages}: "
          f"{'OK' if ok else 'WRONG'} {text!r}", flush=True)
    if not args.quiet and args.mode == "freekv":
        toks = [tok.decode([t]) for t in new]
        for st in tracer.trace:
            s = st["step"]
            rows = []
            for layer, e in st["layers"].items():
                if e is None or "resident" not in e:
                    continue
                miss = [f"p{pg}h{x}(m{e['mass'][pg][x]:.2f},r{e['rank_now'][x][pg]},"
                        f"c{e['cos'][x]:.2f}{',corr' if e['flags'][x] else ''})"
                        for pg in pages for x in range(len(e["flags"]))
                        if not e["resident"][pg][x] and e["mass"][pg][x] >= 0.05]
                if miss:
                    rows.append(f"L{layer}:" + ",".join(miss))
            nxt = toks[s] if s < len(toks) else ""
            print(f"step {s} -> {nxt!r}: missing heavy needle pages: " + (" ".join(rows) or "-"))
    if args.json:
        Path(args.json).write_text(json.dumps({"prompt": {
            "values": prompt.values, "spans": prompt.value_spans, "pages": pages,
            "n_tokens": prompt.n_tokens}, "text": text, "ok": ok, "tokens": new,
            "trace": tracer.trace}))


if __name__ == "__main__":
    main()
