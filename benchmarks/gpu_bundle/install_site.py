"""Unpack the GPU check bundle into a site folder and register this checkout's entry points.

``python3 install_site.py --bundle .gpu_bundle/out --site /tmp/freekv_site`` (standard library
only, Python >= 3.11; the GPU machine has 3.12 and no network):

* extracts ``site.tar.xz`` (skipped when the folder already holds the same archive);
* writes ``sglang_freekv-<version>.dist-info`` into the site, with the entry points of this
  checkout's ``pyproject.toml`` (``sglang.srt.plugins`` / ``sglang.srt.platforms``), so SGLang
  discovers the plugin while the code itself is imported from the checkout on ``PYTHONPATH``
  (nothing is built, so the check always runs the tree it was sent with);
* copies the ``sgl_kernel`` stub and the check platform from this checkout (so editing them
  needs no rebuild of the bundle) and checks that every distribution of ``bundle.json`` has
  its dist-info and matches ``manifest.BUNDLED`` (a stale bundle is reported, not fatal).

Then ``PYTHONPATH=<site>:<repo>``. Prints one JSON line with what it did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARK = ".freekv_bundle_sha256"


def extract(bundle: Path, site: Path) -> bool:
    info = json.loads((bundle / "bundle.json").read_text())
    sha = info["site_tar_sha256"]
    if (site / MARK).exists() and (site / MARK).read_text().strip() == sha:
        return False
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    with tarfile.open(bundle / "site.tar.xz", "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(site, filter="data")
        else:
            tar.extractall(site)
    (site / MARK).write_text(sha + "\n")
    return True


def register_project(site: Path, repo: Path) -> str:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    for old in site.glob(f"{name.replace('-', '_')}-*.dist-info"):
        shutil.rmtree(old)
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        f"Summary: {project.get('description', '')} (code from {repo})\n"
    )
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))
    (dist / "top_level.txt").write_text("sglang_freekv\n")
    (dist / "INSTALLER").write_text("freekv-gpu-bundle\n")
    (dist / "RECORD").write_text("")
    return f"{name}=={version}"


def check_dists(bundle: Path, site: Path) -> list[str]:
    info = json.loads((bundle / "bundle.json").read_text())
    present = {p.name.split("-")[0].lower().replace(".", "_") for p in site.glob("*.dist-info")}
    return [n for n in info["bundled"] if n.lower().replace("-", "_").replace(".", "_") not in present]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--repo", default=str(REPO))
    args = parser.parse_args()
    bundle, site = Path(args.bundle), Path(args.site)
    t0 = time.time()
    if not (bundle / "site.tar.xz").exists():
        print(json.dumps({"ok": False, "error": f"no bundle at {bundle}: run "
                          "benchmarks/gpu_bundle/build.py where PyPI is reachable"}))
        return 2
    extracted = extract(bundle, site)
    project = register_project(site, Path(args.repo))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build import write_check_package
    from manifest import BUNDLED

    write_check_package(site)
    missing = check_dists(bundle, site)
    stale = json.loads((bundle / "bundle.json").read_text())["bundled"] != BUNDLED
    aot = sorted(p.name for p in (site / "flashinfer" / "data" / "aot").glob("*"))
    print(json.dumps({"ok": not missing, "site": str(site), "extracted": extracted,
                      "project": project, "missing_dists": missing, "flashinfer_aot": aot,
                      "stale_bundle": stale,
                      "seconds": round(time.time() - t0, 1)}))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
