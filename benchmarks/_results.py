"""Result writing, progress bars and plots shared by the benchmark scripts.

Every benchmark writes ``<name>.json`` and a ``<name>.png`` plot of the same numbers next to
it (``benchmarks/results/`` by default) and, when the environment variable ``OUT`` is set,
a copy of both into ``$OUT/`` (how the GPU check scripts collect results). The plot functions
take the rows a script already keeps and return a matplotlib ``Figure``; they never measure.

tqdm and matplotlib come with the ``test`` extra. On a machine with only torch and triton
(the GPU check), progress bars are plain iteration and the PNG is skipped with a note; the
JSON is always written.

    from _results import plot_select, progress, write_results
    for item in progress(grid, desc="select"):
        ...
    write_results("bench_select_cpu", result, plot=lambda: plot_select(rows))
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")

# One colour per configuration across every plot.
COLORS = {"default": "#4C72B0", "freekv": "#DD8452", "freekv_sync": "#55A868",
          "freekv_layer": "#8172B3", "freekv_nospan": "#C44E52",
          "freekv_alljob": "#937860", "freekv_drift": "#937860"}
LABELS = {"default": "default (dense)", "freekv": "FreeKV (speculative)",
          "freekv_sync": "FreeKV synchronous", "freekv_layer": "FreeKV, job per layer",
          "freekv_nospan": "FreeKV, span_weight 0",
          "freekv_alljob": "FreeKV, every layer in the step job",
          "freekv_drift": "FreeKV, drifting layers out of the step job"}


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a tqdm progress bar on stderr (stdout keeps the result tables)."""
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine: no bar
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True,
                    leave=False)


class _NoBar:
    """What :func:`progress_bar` returns without tqdm: accepts updates, shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar to ``update(n)`` by hand (e.g. per streamed token), as a context manager."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def output_dirs(out_dir: Path | str | None = None) -> list[Path]:
    """Where results go: ``out_dir`` (default ``benchmarks/results``), then ``$OUT`` if set."""
    dirs = [Path(out_dir) if out_dir is not None else RESULTS_DIR]
    if os.environ.get("OUT"):
        dirs.append(Path(os.environ["OUT"]))
    return dirs


def write_results(name: str, result: Mapping[str, Any], *,
                  plot: Callable[[], Figure] | None = None,
                  out_dir: Path | str | None = None) -> list[Path]:
    """Write ``<name>.json`` (and ``<name>.png``, drawn by ``plot()``) to every output
    directory. Returns the paths written and prints one line per file. ``name`` is a bare
    file stem. Without matplotlib the PNG is skipped (one line says so).
    """
    if not name or "/" in name or name.endswith((".json", ".png")):
        raise ValueError(f"name must be a bare file stem, got {name!r}")
    figure = None
    if plot is not None:
        try:
            figure = plot()
        except ImportError as exc:
            print(f"no plot for {name}: {exc} (pip install matplotlib)")
    written: list[Path] = []
    text = json.dumps(result, indent=2, default=_jsonable) + "\n"
    for folder in output_dirs(out_dir):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        path.write_text(text)
        written.append(path)
        if figure is not None:
            png = folder / f"{name}.png"
            figure.savefig(png, dpi=120, bbox_inches="tight")
            written.append(png)
    if figure is not None:
        import matplotlib.pyplot as plt

        plt.close(figure)
    for path in written:
        print(f"wrote {path}")
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _figure(title: str, width: float = 7.0, height: float = 4.2) -> tuple[Figure, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return fig, ax


# ---------------------------------------------------------------------------- plots
def plot_decode(rows: Sequence[Mapping[str, Any]], *, subtitle: str = "") -> Figure:
    """Decode tok/s vs context length, one line per server configuration and dtype.

    ``rows``: bench_decode rows, each with ``server`` (default / freekv / freekv_sync /
    freekv_layer / freekv_nospan), ``context`` (prompt tokens), ``decode_tok_s`` (median of its
    runs), ``runs`` (each with ``decode_tok_s``, drawn as dots) and optionally ``dtype`` (one
    line style per dtype when a run measured several).
    """
    fig, ax = _figure("Decode throughput vs context" + (f"\n{subtitle}" if subtitle else ""))
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["server"]), str(row.get("dtype", ""))), []).append(row)
    dtypes = sorted({d for _, d in groups})
    styles = dict(zip(dtypes, ("-", "--", ":", "-.")))
    for (server, dtype), points in groups.items():
        points = sorted(points, key=lambda r: r["context"])
        color = COLORS.get(server)
        xs = [p["context"] for p in points]
        label = LABELS.get(server, server) + (f", {dtype}" if len(dtypes) > 1 else "")
        ax.plot(xs, [p["decode_tok_s"] for p in points], marker="o", color=color,
                ls=styles.get(dtype, "-"), label=label)
        for p in points:
            runs = [r["decode_tok_s"] for r in p.get("runs", [])]
            ax.scatter([p["context"]] * len(runs), runs, s=10, color=color, alpha=0.4)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode tokens / s (median; dots: runs)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def plot_recall(gbps: Mapping[str, float], *, subtitle: str = "") -> Figure:
    """Recall bandwidth per copy path (bench_recall's ``gbps``), horizontal bars in GB/s."""
    fig, ax = _figure("Recall bandwidth (host tier -> device buffers)"
                      + (f"\n{subtitle}" if subtitle else ""))
    names = list(gbps)
    values = [gbps[n] for n in names]
    bars = ax.barh(names, values, color=["#DD8452" if n.startswith("hnd_recall") else "#4C72B0"
                                         for n in names])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (1e9 bytes / s)")
    if values and max(values) / max(min(values), 1e-12) > 100:
        ax.set_xscale("log")
    return fig


def plot_select(rows: Sequence[Mapping[str, Any]], *, subtitle: str = "") -> Figure:
    """Selection cost per layer vs context, one line per batch size (bench_select rows with
    ``context``, ``batch``, ``ms`` and ``ref_ms``, the PyTorch reference, drawn dashed)."""
    fig, ax = _figure("Page selection cost per layer (score + top-k)"
                      + (f"\n{subtitle}" if subtitle else ""))
    batches = sorted({int(r["batch"]) for r in rows})
    for i, bs in enumerate(batches):
        pts = sorted((r for r in rows if int(r["batch"]) == bs), key=lambda r: r["context"])
        color = f"C{i}"
        ax.plot([p["context"] for p in pts], [p["ms"] for p in pts], marker="o", color=color,
                label=f"batch {bs} ({pts[0].get('impl', '')})")
        if all("ref_ms" in p for p in pts):
            ax.plot([p["context"] for p in pts], [p["ref_ms"] for p in pts], ls="--",
                    color=color, alpha=0.6, label=f"batch {bs} (PyTorch reference)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per layer")
    ax.legend(fontsize=9)
    return fig


def plot_step(configs: Mapping[str, Mapping[str, float]], *, subtitle: str = "") -> Figure:
    """Median decode step time per configuration (bench_step_cpu ``configs[name]`` medians
    with ``step_ms`` and ``hooks_ms``), split into FreeKV's hooks on the engine's thread
    and the rest (model, attention, the step job's share of the cores)."""
    fig, ax = _figure("Synthetic decode step, ms (lower is better)"
                      + (f"\n{subtitle}" if subtitle else ""))
    names = list(configs)
    hooks = [configs[n]["hooks_ms"] for n in names]
    rest = [configs[n]["step_ms"] - h for n, h in zip(names, hooks)]
    ax.bar(names, rest, color="#4C72B0", label="model, attention, rest")
    ax.bar(names, hooks, bottom=rest, color="#DD8452", label="FreeKV hooks (engine thread)")
    for i, n in enumerate(names):
        ax.text(i, configs[n]["step_ms"], f"{configs[n]['step_ms']:.1f}", ha="center",
                va="bottom", fontsize=9)
    ax.set_ylim(0, max(configs[n]["step_ms"] for n in names) * 1.15)
    ax.set_ylabel("ms per step")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=9, loc="upper left")
    return fig


def plot_passkey(cases: Sequence[Mapping[str, Any]], *, subtitle: str = "") -> Figure:
    """Pass keys found (green) or missed (red) by context and depth (passkey_sim cases with
    ``n_tokens``, ``depth`` and ``found``)."""
    fig, ax = _figure("Pass key retrieval" + (f"\n{subtitle}" if subtitle else ""),
                      height=3.6)
    for found, color, label in ((True, "#55A868", "found"), (False, "#C44E52", "missed")):
        pts = [c for c in cases if bool(c["found"]) == found]
        ax.scatter([c["n_tokens"] for c in pts], [c["depth"] for c in pts], s=120,
                   color=color, marker="o" if found else "X", label=f"{label} ({len(pts)})")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("needle depth")
    ax.set_ylim(-0.05, 1.05)
    ax.margins(x=0.1)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_concurrency(rows: Sequence[Mapping[str, Any]], *, device_memory_gb: float,
                     subtitle: str = "") -> Figure:
    """Concurrent requests that fit at equal device memory, vs context, per policy.

    ``rows``: one per (policy, context) with ``policy`` (e.g. ``default`` / ``freekv``),
    ``context`` (tokens per request) and ``max_concurrency`` (requests); optional
    ``measured`` (bool: served, not only planned) draws a filled marker, else a hollow one.
    ``device_memory_gb``: the KV memory both policies had, in the title.
    """
    if not math.isfinite(device_memory_gb) or device_memory_gb <= 0:
        raise ValueError(f"device_memory_gb must be a positive number, got {device_memory_gb}")
    fig, ax = _figure(f"Concurrent requests at equal device memory ({device_memory_gb:g} GB)"
                      + (f"\n{subtitle}" if subtitle else ""))
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_policy.setdefault(str(row["policy"]), []).append(row)
    for policy, points in by_policy.items():
        points = sorted(points, key=lambda r: r["context"])
        color = COLORS.get(policy)
        ax.plot([p["context"] for p in points], [p["max_concurrency"] for p in points],
                color=color, label=LABELS.get(policy, policy))
        for p in points:
            filled = p.get("measured", True)
            ax.scatter([p["context"]], [p["max_concurrency"]], s=40, color=color,
                       facecolors=color if filled else "none")
    if any(not r.get("measured", True) for r in rows):
        ax.scatter([], [], s=40, facecolors="none", edgecolors="gray",
                   label="planned, not served")
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("context per request (tokens)")
    ax.set_ylabel("concurrent requests")
    ax.legend(fontsize=9)
    return fig


# ---------------------------------------------------------------------------- re-plotting
def replot(path: Path | str) -> Path:
    """Draw ``<path>.png`` again from a result JSON of bench_decode, bench_recall,
    bench_select, bench_step_cpu or passkey_sim (e.g. after changing a plot); returns the
    PNG's path."""
    path = Path(path)
    result = json.loads(path.read_text())
    kind = result.get("benchmark")
    if kind == "bench_decode":
        dtype = result.get("dtype") or ", ".join(result.get("dtypes", []))
        sub = f"SmolLM2-135M {dtype}, {result.get('cpus')} CPUs, " \
              f"{result.get('new_tokens')} new tokens x {result.get('repeats')} runs"
        fig = plot_decode(result["rows"], subtitle=sub)
    elif kind == "bench_step_cpu":
        sub = (f"{result['dtype']}, context {result['context']} / short "
               f"{result['short_context']}, batch {result['batch']}, "
               f"{result['threads']} threads")
        fig = plot_step({c: v["median"] for c, v in result["configs"].items()}, subtitle=sub)
    elif kind == "passkey_sim":
        fig = plot_passkey(result["cases"], subtitle=f"{result['mode']} budget {result['budget']}")
    elif "gbps" in result:
        fig = plot_recall(result["gbps"], subtitle=str(result.get("device", "")))
    elif result.get("rows") and "batch" in result["rows"][0]:
        fig = plot_select(result["rows"], subtitle=str(result.get("device", "")))
    else:
        raise ValueError(f"{path}: not a result of a known benchmark")
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Re-draw the PNG of benchmark result JSON files.")
    ap.add_argument("results", nargs="+", help="result JSON files (benchmarks/results/*.json)")
    for item in ap.parse_args().results:
        replot(item)
