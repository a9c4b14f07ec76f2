"""Needle-in-a-haystack accuracy through the real server: dense vs FreeKV budgets.

Needles (``tests/needles.py``): 5-9 digit "special magic numbers", UUID-like strings
(``8hex-4hex``), a four-word phrase, and two 7-digit needles asked for at once; in a
repeated-sentence haystack and in varied text (Newton's *Opticks*); at depths 0-100% of the
haystack; contexts 2K-8K. By default every needle value **straddles a FreeKV page boundary
(32 tokens)** with its last token alone on the next page (``--splits tail``; ``mid`` splits the
value in the middle, ``none`` keeps the nominal place). Greedy decoding; a case scores 1 when
the output contains every needle value whole (``tests.needles.exact_match``).

Configurations (one server each, one at a time, each stopped before the next):

================  =========================================================================
``dense``         ``--kv-policy default``
``fk512``         FreeKV budget 512 = sink 64 + 10 retrieved pages + window 128 (the
                  passkey tests' config), speculative
``fk512_sync``    the same with ``"speculative": false``
``fk1024``        budget 1024 = sink 128 + 20 pages + window 256 (bench_decode's config)
``fk1024_sync``   synchronous (``--full``, or ``--configs``)
``fk2048``        budget 2048 = sink 256 + 40 pages + window 512 (sink/window scaled like the
                  smaller budgets; the server default is sink 512 + 32 pages + window 512)
``fk2048_sync``   synchronous (``--full``, or ``--configs``)
================  =========================================================================

``--freekv-extra JSON`` merges keys into every FreeKV config (e.g. an A/B of a selection knob).

Requests go one at a time by default (``--concurrency 1``): on the CPU engine SGLang's own
bf16 numerics change with the batch (the default policy's greedy answers to 8 concurrent
prompts differ from the same prompts alone; docs/design.md "Batch invariance"), so a
concurrent run's answers depend on arrival order and are not reproducible; one at a time
they are (two runs gave identical outputs). ``--concurrency N`` batches N. The radix cache
stays on as users run it: prompts of one (haystack, context) share the haystack before their
needle, so the deepest needle of each group is sent first and the rest reuse its prefix. Prefill is dense
and exact under both policies (a FreeKV prefix is staged from the host tier, the same bf16
values), so sharing does not change what decode sees; ``--no-radix-cache`` turns it off.

Writes JSON (every case, its output and score) and one PNG heatmap (depth x context, mean over
shapes and haystacks) per config, and prints a table per shape x context plus every cell where
a FreeKV config scores below dense. Default run: 5 configs x 24 cases (6 shapes x 2K/4K x
depths 25%/75%), one request at a time: 11 min in all on 2 quiet cores (2026-12-07,
~2.2 min per config, server start included); 17-19 min per config when the 2 cores were
shared with a load average of ~12. ``--quick``: 2 configs x 4 cases;
``--full``: 7 configs x 576 cases (8 shapes, 4 contexts up to 8K, 9 depths, 2 haystacks,
tail and mid splits), hours.

    python benchmarks/bench_accuracy.py [--quick | --full] [--configs dense,fk512,...]
        [--dtype bfloat16] [--tag before] [--out benchmarks/results/bench_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from tests.helpers import embedded_model_path, run_server  # noqa: E402
from tests.needles import HAYSTACKS, SHAPES, build_needle_prompt, exact_match  # noqa: E402

BUDGETS = {
    512: {"budget": 512, "sink": 64, "window": 128},
    1024: {"budget": 1024, "sink": 128, "window": 256},
    2048: {"budget": 2048, "sink": 256, "window": 512},
}
CONFIGS: dict[str, dict | None] = {"dense": None}
for _b, _cfg in BUDGETS.items():
    CONFIGS[f"fk{_b}"] = dict(_cfg)
    CONFIGS[f"fk{_b}_sync"] = {**_cfg, "speculative": False}

GRIDS = {
    # (configs, shapes, contexts, depths, haystacks, splits)
    "quick": (("dense", "fk512"), ("digits7", "uuid"), (4096,), (0.25, 0.75), ("repeat",),
              ("tail",)),
    "default": (("dense", "fk512", "fk512_sync", "fk1024", "fk2048"),
                ("digits5", "digits7", "digits9", "uuid", "phrase", "two"), (2048, 4096),
                (0.25, 0.75), ("repeat",), ("tail",)),
    "full": (tuple(CONFIGS), SHAPES, (2048, 4096, 6144, 8000),
             (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0), HAYSTACKS, ("tail", "mid")),
}


def _progress(total: int, desc: str):  # type: ignore[no-untyped-def]
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stdout)
    except ImportError:
        class _Plain:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                if self.n == total or self.n % 10 == 0:
                    print(f"  {desc}: {self.n}/{total}", flush=True)

            def close(self) -> None:
                pass

        return _Plain()


def server_args(name: str, model: str, dtype: str | None, radix: bool, extra: dict) -> list[str]:
    args = ["--model-path", model]
    if dtype:
        args += ["--dtype", dtype]
    if not radix:
        args.append("--disable-radix-cache")
    cfg = CONFIGS[name]
    if cfg is None:
        return args + ["--kv-policy", "default"]
    return args + ["--kv-policy", "freekv", "--freekv-config", json.dumps({**cfg, **extra})]


def generate(url: str, input_ids: list[int], new_tokens: int) -> str:
    payload = {"input_ids": input_ids,
               "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0}}
    resp = requests.post(f"{url}/generate", json=payload, timeout=3600)
    resp.raise_for_status()
    return resp.json()["text"]


def run_config(url: str, cases: list[dict], prompts: list, concurrency: int, desc: str
               ) -> list[str]:
    """Outputs of every case: the deepest needle of each (haystack, context) first (it puts
    the group's haystack in the radix cache), then everything else concurrently."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, c in enumerate(cases):
        groups[(c["haystack"], c["context"])].append(i)
    first = [max(ix, key=lambda i: (prompts[i].value_spans[0][0], -i)) for ix in groups.values()]
    rest = [i for i in range(len(cases)) if i not in set(first)]
    outs: list[str] = [""] * len(cases)
    bar = _progress(len(cases), desc)

    def one(i: int) -> None:
        p = prompts[i]
        outs[i] = generate(url, list(p.input_ids), p.max_new_tokens())
        bar.update(1)

    pool = ThreadPoolExecutor(concurrency)
    try:
        list(pool.map(one, first))
        list(pool.map(one, rest))
    finally:
        # on an error or SIGTERM do not wait for requests in flight: the server is stopped next
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return outs


def aggregate(cases: list[dict], scores: list[int], keys: tuple[str, ...]) -> dict[str, float]:
    acc: dict[str, list[int]] = defaultdict(list)
    for c, s in zip(cases, scores):
        acc["|".join(str(c[k]) for k in keys)].append(s)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


# ---------------------------------------------------------------- results and plots
# Local for now; another engineer is adding a shared benchmarks/_results.py helper.
def write_results(result: dict, out: Path) -> list[Path]:
    paths = [out]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / out.name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return paths


def plot_heatmap(name: str, cases: list[dict], scores: list[int], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no heatmap", flush=True)
        return None
    depths = sorted({c["depth"] for c in cases})
    contexts = sorted({c["context"] for c in cases})
    grid = [[float("nan")] * len(contexts) for _ in depths]
    cells = aggregate(cases, scores, ("depth", "context"))
    for (i, d) in enumerate(depths):
        for (j, n) in enumerate(contexts):
            grid[i][j] = cells.get(f"{d}|{n}", float("nan"))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(contexts), 1.0 + 0.45 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(contexts)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                          for n in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(contexts)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{name}: {sum(scores) / max(1, len(scores)):.2f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tables(configs: list[str], cases: list[dict], scores: dict[str, list[int]]) -> list[str]:
    """Score per config (rows) x shape and x context (columns); returns the cells (shape,
    context) where a FreeKV config at budget 512/1024 scores below dense."""
    shapes = list(dict.fromkeys(c["shape"] for c in cases))
    contexts = sorted({c["context"] for c in cases})
    done = [n for n in configs if n in scores]
    head = f"{'config':<12} {'all':>5} " + " ".join(f"{s:>8}" for s in shapes) + " " + \
        " ".join(f"{str(n) + 't':>6}" for n in contexts)
    print()
    print(head)
    for name in done:
        sc = scores[name]
        by_shape = aggregate(cases, sc, ("shape",))
        by_ctx = aggregate(cases, sc, ("context",))
        print(f"{name:<12} {sum(sc) / len(sc):>5.2f} "
              + " ".join(f"{by_shape[s]:>8.2f}" for s in shapes) + " "
              + " ".join(f"{by_ctx[str(n)]:>6.2f}" for n in contexts))
    below: list[str] = []
    if "dense" in scores:
        dense = aggregate(cases, scores["dense"], ("shape", "context"))
        for name in done:
            if name == "dense":
                continue
            cells = aggregate(cases, scores[name], ("shape", "context"))
            for key, v in cells.items():
                if v < dense[key]:
                    below.append(f"{name} {key.replace('|', ' @ ')}t: {v:.2f} < dense "
                                 f"{dense[key]:.2f}")
    print()
    print("cells (shape @ context) below dense:" + ("" if below else " none"))
    for line in below:
        print("  " + line)
    return below


def _load_reuse(path: str | None, cases: list[dict], wanted: dict[str, list[str]]
                ) -> dict[str, tuple[list[str], float]]:
    """Outputs of configs in an earlier result file whose cases and server args match."""
    if not path:
        return {}
    old = json.loads(Path(path).read_text())
    keys = ("shape", "haystack", "context", "depth", "split", "values")
    if [[c[k] for k in keys] for c in old["cases"]] != [[c[k] for k in keys] for c in cases]:
        print(f"--reuse {path}: different cases, nothing reused", flush=True)
        return {}
    out = {}
    for name, args in wanted.items():
        if old.get("configs", {}).get(name) == args and all(
                name in c.get("outputs", {}) for c in old["cases"]):
            out[name] = ([c["outputs"][name] for c in old["cases"]],
                         old.get("seconds", {}).get(name, 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 configs x 4 cases")
    size.add_argument("--full", action="store_true", help="every config, shape, haystack, "
                      "split; 4 contexts x 9 depths (hours)")
    ap.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--shapes", help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--contexts", help="comma-separated prompt sizes in tokens (<= 8000)")
    ap.add_argument("--depths", help="comma-separated depth fractions in [0, 1]")
    ap.add_argument("--haystacks", help=f"comma-separated subset of {','.join(HAYSTACKS)}")
    ap.add_argument("--splits", help="comma-separated subset of tail,mid,none")
    ap.add_argument("--seed", type=int, default=0, help="needle values and keys")
    ap.add_argument("--dtype", default=None,
                    help="model dtype passed as --dtype (default: the model's own, bf16)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests in flight (default 1: reproducible answers)")
    ap.add_argument("--no-radix-cache", action="store_true")
    ap.add_argument("--freekv-extra", default="{}", help="JSON merged into every FreeKV config")
    ap.add_argument("--reuse", default=None,
                    help="JSON of an earlier run: configs found there with the same cases and "
                    "server arguments are taken from it instead of run again (e.g. dense)")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. before)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/bench_accuracy[_TAG].json)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers are stopped

    grid = GRIDS["quick" if args.quick else "full" if args.full else "default"]
    configs, shapes, contexts, depths, haystacks, splits = grid

    def pick(opt: str | None, default: tuple, conv=str) -> tuple:  # type: ignore[no-untyped-def]
        return tuple(conv(x.strip()) for x in opt.split(",") if x.strip()) if opt else default

    configs = pick(args.configs, configs)
    shapes = pick(args.shapes, shapes)
    contexts = pick(args.contexts, contexts, int)
    depths = pick(args.depths, depths, float)
    haystacks = pick(args.haystacks, haystacks)
    splits = tuple(None if s == "none" else s for s in pick(args.splits, splits))
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    extra = json.loads(args.freekv_extra)
    stem = "bench_accuracy" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out) if args.out else REPO / "benchmarks/results" / f"{stem}.json"

    model = embedded_model_path()
    cases, prompts = [], []
    for hay in haystacks:
        for n in contexts:
            for shape in shapes:
                for d in depths:
                    for sp in splits:
                        p = build_needle_prompt(model, n, d, shape, hay, sp, seed=args.seed)
                        prompts.append(p)
                        cases.append({"shape": shape, "haystack": hay, "context": n, "depth": d,
                                      "split": sp or "none", "values": list(p.values),
                                      "prompt_tokens": p.n_tokens,
                                      "value_spans": [list(s) for s in p.value_spans],
                                      "value_pages": [list(x) for x in p.pages()]})
    print(f"{len(cases)} cases x {len(configs)} configs: shapes {','.join(shapes)}; contexts "
          f"{','.join(map(str, contexts))}; depths {','.join(map(str, depths))}; haystacks "
          f"{','.join(haystacks)}; splits {','.join(s or 'none' for s in splits)}; dtype "
          f"{args.dtype or 'model default'}; radix cache {'off' if args.no_radix_cache else 'on'}"
          f"; extra {extra}", flush=True)

    outputs: dict[str, list[str]] = {}
    scores: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench_accuracy_"))
    t_all = time.perf_counter()

    def report(final: bool = True) -> None:
        below = print_tables(list(configs), cases, scores) if final else []
        plots = {}
        for name in scores:
            path = plot_heatmap(name, cases, scores[name],
                                out.with_name(f"{out.stem}_{name}.png"))
            if path is not None:
                plots[name] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else \
                    str(path)
        result = {
            "benchmark": "bench_accuracy", "device": "cpu", "cpus": os.cpu_count(),
            "machine": platform.machine(), "model": "SmolLM2-135M-Instruct",
            "dtype": args.dtype or "model default (bfloat16)",
            "radix_cache": not args.no_radix_cache, "freekv_extra": extra,
            "configs": {n: server_args(n, "MODEL", args.dtype, not args.no_radix_cache, extra)[2:]
                        for n in configs},
            "grid": {"shapes": shapes, "contexts": contexts, "depths": depths,
                     "haystacks": haystacks, "splits": [s or "none" for s in splits],
                     "seed": args.seed},
            "score": {n: sum(s) / len(s) for n, s in scores.items()},
            "by_shape_context": {n: aggregate(cases, s, ("shape", "context"))
                                 for n, s in scores.items()},
            "by_depth_context": {n: aggregate(cases, s, ("depth", "context"))
                                 for n, s in scores.items()},
            "below_dense": below, "seconds": seconds, "errors": errors, "plots": plots,
            "cases": [{**c, "outputs": {n: outputs[n][i] for n in outputs},
                       "scores": {n: scores[n][i] for n in scores}}
                      for i, c in enumerate(cases)],
        }
        for path in write_results(result, out):
            if final:
                print(f"wrote {path}", flush=True)

    reused = _load_reuse(args.reuse, cases, {
        n: server_args(n, "MODEL", args.dtype, not args.no_radix_cache, extra)[2:]
        for n in configs})
    for name, (outs, secs) in reused.items():
        outputs[name] = outs
        scores[name] = [int(exact_match(o, p.values)) for o, p in zip(outs, prompts)]
        seconds[name] = secs
        print(f"[{name}] reused from {args.reuse}: score {sum(scores[name]) / len(cases):.3f}",
              flush=True)
    for name in configs:
        if name in reused:
            continue
        t0 = time.perf_counter()
        try:
            with run_server(server_args(name, model, args.dtype, not args.no_radix_cache, extra),
                            logs, timeout_s=600) as server:
                up = time.perf_counter() - t0
                outs = run_config(server.url, cases, prompts, args.concurrency, name)
            outputs[name] = outs
            scores[name] = [int(exact_match(o, p.values)) for o, p in zip(outs, prompts)]
            seconds[name] = time.perf_counter() - t0
            print(f"[{name}] score {sum(scores[name]) / len(cases):.3f} "
                  f"({sum(scores[name])}/{len(cases)}); server up {up:.0f}s, "
                  f"{seconds[name]:.0f}s in all", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failed configuration is reported
            print(f"[{name}] FAILED: {str(exc)[-1500:]}", flush=True)
            errors[name] = str(exc)[-4000:]
        report(final=False)  # partial results on disk after every config
    seconds["total"] = time.perf_counter() - t_all
    report()
    print(f"total {seconds['total'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
