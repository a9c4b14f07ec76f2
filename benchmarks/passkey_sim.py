"""Offline accuracy simulation of FreeKV page selection with HF transformers (no server).

Decodes the passkey prompts of ``tests/server/test_freekv_server.py`` with the embedded model
in float32, where every non-dense layer's decode attention is restricted to sink pages +
the top-k pages chosen by the Quest bound with the *current* query (exact selection, the
synchronous baseline) + the window. ``--mode`` picks the page score:

* ``quest``: softmax of ``score_scale * bound`` per query head, group mean (FreeKV's rule);
* ``oracle``: the true attention mass of each page (upper limit of any page selector);
* ``dense``: no restriction (what the server's ``--kv-policy default`` computes).

It found why the server missed passkeys at budget 512: with ``--score-scale 1`` (the public
reference) it reproduces the server's wrong answers token for token; with the default
1/sqrt(head_dim) it finds every key dense attention finds.

    .venv/bin/python benchmarks/passkey_sim.py --score-scale 1 --cases 1,3

Writes benchmarks/results/passkey_sim_<mode>.{json,png} (found/missed per context and depth;
and $OUT/ when set). ``--quick`` runs cases 0 and 4 only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from _results import plot_passkey, progress, write_results  # noqa: E402

from tests.passkey import build_passkey_prompt  # noqa: E402

# (target tokens, depth, seed): the cases and seeds of the server passkey tests.
CASES = [(3000, 0.15, 3000), (3000, 0.5, 3001), (3000, 0.85, 3002),
         (5000, 0.15, 5003), (5000, 0.5, 5004), (5000, 0.85, 5005)]


def make_attention(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    p = args.page_size
    ns, nw = args.sink // p, args.window // p
    k = args.budget // p - ns - nw
    dense_layers = set(args.dense_layers)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):  # type: ignore[no-untyped-def]
        if query.shape[2] != 1 or module.layer_idx in dense_layers or args.mode == "dense":
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, dropout=dropout, **kw)
        _, hq, _, d = query.shape
        h, n = key.shape[1], key.shape[2]
        g = hq // h
        n_pages = -(-n // p)
        m = n_pages - ns - nw
        keep = torch.ones(h, n, dtype=torch.bool)
        if m > k:
            keep[:] = False
            keep[:, : ns * p] = True
            keep[:, (n_pages - nw) * p :] = True
            kc = key[0, :, ns * p : (n_pages - nw) * p].float().reshape(h, m, p, d)
            q = query[0, :, 0].float().reshape(h, g, d)
            if args.mode == "quest":
                kmin, kmax = kc.amin(2), kc.amax(2)  # [h, m, d]
                s = torch.maximum(q[:, :, None] * kmin[:, None], q[:, :, None] * kmax[:, None])
                scale = args.score_scale if args.score_scale else d**-0.5
                score = torch.softmax(s.sum(-1) * scale, -1).mean(1)  # [h, m]
            else:  # oracle: attention mass per page, group mean
                logits = torch.einsum("hgd,hmpd->hgmp", q, kc) * (scaling or d**-0.5)
                score = torch.softmax(logits.reshape(h, g, -1), -1).reshape(h, g, m, p)
                score = score.sum(-1).mean(1)
            for hh, pages in enumerate(score.topk(k, -1).indices.tolist()):
                for page in pages:
                    keep[hh, (ns + page) * p : (ns + page + 1) * p] = True
        mask = torch.where(keep, 0.0, float("-inf")).to(query.dtype)
        mask = mask.repeat_interleave(g, 0)[None, :, None, :]  # [1, hq, 1, n]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
            attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("quest", "oracle", "dense"), default="quest")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[0])
    ap.add_argument("--score-scale", type=float, default=None,
                    help="page-softmax temperature (default 1/sqrt(head_dim))")
    ap.add_argument("--cases", default="0,1,2,3,4,5", help="indices into CASES")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="cases 0 and 4 only (~3K and ~5K)")
    args = ap.parse_args()
    if args.quick:
        args.cases = "0,4"
    try:
        picked = [CASES[int(i)] for i in args.cases.split(",")]
    except (ValueError, IndexError):
        ap.error(f"--cases: comma-separated indices in 0..{len(CASES) - 1}, got {args.cases!r}")

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from sglang_freekv.models import prepare

    model_path = str(prepare("smollm2"))
    AttentionInterface.register("freekv_sim", make_attention(args))
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="freekv_sim").eval()
    found = 0
    rows: list[dict[str, object]] = []
    for n, depth, seed in progress(picked, desc=f"passkey {args.mode}"):
        p = build_passkey_prompt(model_path, n, depth, seed=seed)
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:])
        found += p.key in text
        rows.append({"n_tokens": p.n_tokens, "depth": depth, "seed": seed, "key": p.key,
                     "found": p.key in text, "text": text})
        print(f"{p.n_tokens:5d} tokens depth {depth:.2f} key {p.key}: "
              f"{'found' if p.key in text else 'MISSED'} {text!r}", flush=True)
    setting = (f"{args.mode} budget {args.budget} (sink {args.sink}, window {args.window}, "
               f"P {args.page_size}) score_scale {args.score_scale or '1/sqrt(D)'}")
    print(f"{setting}: {found}/{len(picked)} keys")
    result = {"benchmark": "passkey_sim", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
              "mode": args.mode, "page_size": args.page_size, "budget": args.budget,
              "sink": args.sink, "window": args.window, "dense_layers": args.dense_layers,
              "score_scale": args.score_scale, "new_tokens": args.new_tokens,
              "found": found, "cases": rows}
    write_results(f"passkey_sim_{args.mode}", result,
                  plot=lambda: plot_passkey(rows, subtitle=f"{setting}: {found}/{len(rows)}"))


if __name__ == "__main__":
    main()
