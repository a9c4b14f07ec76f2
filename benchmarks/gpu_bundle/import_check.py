"""Dry run of the GPU serving check's import path on a machine without a GPU.

Run in a fresh interpreter (``python benchmarks/gpu_bundle/import_check.py --json OUT``). It
makes this process look like the GPU check machine before anything imports SGLang:

* a fake H200 (``fake_cuda.install``), so every ``if is_cuda():`` branch runs;
* the ``sgl_kernel`` stub and the check platform (``freekv_gpu_check``, with its entry point)
  first on ``sys.path``;
* a blocker: a top-level module whose distribution is neither on the GPU machine's package
  list (``gpu_machine_packages.txt``) nor in the bundle (``manifest.BUNDLED``) nor the
  standard library fails to import, exactly as it would there.

Then it imports the server's import path (the modules below, every ``sglang_freekv``
module), loads SGLang's plugins, resolves the platform (it must be the check platform) and
resolves the server arguments of both runs (``--kv-policy freekv`` and ``default``). The JSON
report lists every distribution used, each blocked import and every failure; exit status 0
only when nothing failed. Differences it cannot see: torch 2.14 / transformers 5.19 here vs
2.11 / 5.17 there, and imports that happen only at request time inside functions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# The server's import path: main process (launcher, HTTP server, tokenizer manager) and the
# scheduler process (scheduler, model runner, the model, attention backends, sampler).
SERVER_MODULES = [
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tp_worker",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner",
    "sglang.srt.model_loader.loader",
    "sglang.srt.model_loader.weight_utils",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.torch_native_backend",
    "sglang.srt.layers.sampler",
    "sglang.srt.layers.logits_processor",
    "sglang.srt.constrained.xgrammar_backend",
    "sglang.srt.mem_cache.unified_radix_cache",
    "sglang.kernels.ops.kvcache.kvcache",
    "flashinfer",
    "flashinfer.decode",
    "flashinfer.prefill",
    "flashinfer.cascade",
    "flashinfer.page",
    "flashinfer.jit",
    "sgl_kernel",
    "freekv_gpu_check",
    "freekv_gpu_check.platform",
]

ENV = {
    "FREEKV_GPU_CHECK": "1",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "FLASHINFER_CUDA_ARCH_LIST": "9.0a",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_package_list(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[=<>!~ ]", line, maxsplit=1)[0]))
    return names


class Blocker(importlib.abc.MetaPathFinder):
    """Replaces ``PathFinder`` on ``sys.meta_path``: files of distributions the GPU check
    machine would not have are not found (``find_spec`` -> None, as if not installed), so
    ``importlib.util.find_spec`` probes and ``try: import`` fallbacks behave as they would
    there. Ownership is read from each distribution's RECORD (works for namespace packages
    such as ``cuda.*`` and ``nvidia.*``); files no distribution owns are allowed."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.owner: dict[str, str] = {}
        for dist in importlib.metadata.distributions():
            name = normalize(dist.metadata["Name"] or "")
            for f in dist.files or ():
                if f.suffix in (".py", ".so", ".pyd") or f.name == "__init__.py":
                    self.owner[str(dist.locate_file(f))] = name
        self.blocked: dict[str, dict[str, Any]] = {}
        self.used: dict[str, set[str]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            return spec
        dist = self.owner.get(spec.origin)
        if dist is None:
            return spec
        root = fullname.split(".")[0]
        if dist in self.allowed:
            self.used.setdefault(dist, set()).add(root)
            return spec
        if fullname not in self.blocked:
            stack = [
                f"{f.filename}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if "importlib" not in f.filename and "import_check" not in f.filename
            ]
            self.blocked[fullname] = {"dist": dist, "importer": stack[-3:]}
        return None

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        # importlib.metadata asks the meta-path finders; metadata stays visible (only the
        # code of blocked distributions is hidden).
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


class Missing(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: records top-level modules not installed here at all."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if "." not in fullname:
            self.names.add(fullname)
        return None


def check_site(tmp: Path) -> Path:
    """A site dir with the check platform, its dist-info (entry point) and the stub."""
    sys.path.insert(0, str(HERE))
    from build import write_check_package  # noqa: E402  (benchmarks/gpu_bundle/build.py)

    write_check_package(tmp)
    return tmp


# Pure-Python packages of a built bundle that can replace this venv's copies in a 3.11
# process: the trimmed sglang (its .so files are dropped anyway) and flashinfer.
OVERLAY = ("sglang", "flashinfer")


def overlay(site: Path, tmp: Path) -> str:
    """A folder of links to the bundle's trimmed pure-Python packages (checks the trimming)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        top = entry.name.split("-")[0].replace("_python", "")
        if entry.name in OVERLAY or (entry.suffix == ".dist-info" and top in OVERLAY):
            link = tmp / entry.name
            if not link.exists():
                link.symlink_to(entry)
    return str(tmp)


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"ok": False, "failures": [], "python": sys.version.split()[0]}
    os.environ.update(ENV)
    from manifest import BUNDLED  # benchmarks/gpu_bundle/manifest.py (HERE is on sys.path)

    gpu = read_package_list(HERE / "gpu_machine_packages.txt")
    bundled = {normalize(n) for n in BUNDLED}
    allowed = gpu | bundled | {"sglang-freekv"}
    site = check_site(Path(args.site))
    if args.overlay:
        sys.path.insert(0, overlay(Path(args.overlay), Path(args.site) / "overlay"))
        report["overlay"] = args.overlay
    if args.mirror:
        sys.path.insert(0, args.mirror)
        report["mirror"] = sorted(p.name for p in Path(args.mirror).glob("*.dist-info"))
    blocker = Blocker(allowed)
    missing = Missing()
    sys.path.insert(0, str(site))
    sys.path.insert(1, str(REPO))
    sys.meta_path[:] = [blocker if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    sys.meta_path.append(missing)
    sys.argv = ["sglang.launch_server"]  # plugins may read the command line

    import fake_cuda

    fake_cuda.install()

    t0 = time.time()
    imported = []
    modules = list(SERVER_MODULES)
    import sglang_freekv

    modules += [
        m.name
        for m in pkgutil.walk_packages(sglang_freekv.__path__, "sglang_freekv.")
        if not m.name.split(".")[-1].startswith("_")
    ]
    for name in modules:
        try:
            importlib.import_module(name)
            imported.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            report["failures"].append(
                {"step": f"import {name}", "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc()[-2500:]}
            )
    report["imported"] = imported
    report["import_s"] = round(time.time() - t0, 1)

    try:
        from sglang.srt.plugins import load_plugins

        load_plugins()
        from sglang.srt.platforms import current_platform

        report["platform"] = type(current_platform).__module__ + "." + type(current_platform).__qualname__
        if "FreeKVCudaCheckPlatform" not in report["platform"]:
            report["failures"].append(
                {"step": "platform", "error": f"resolved {report['platform']}, not the check platform"}
            )
    except BaseException as exc:  # noqa: BLE001
        report["failures"].append(
            {"step": "plugins/platform", "error": f"{type(exc).__name__}: {exc}",
             "trace": traceback.format_exc()[-2500:]}
        )

    if args.model:
        report["server_args"] = {}
        for label, argv in server_argv(args.model).items():
            try:
                from sglang.srt.server_args import prepare_server_args

                sa = prepare_server_args(argv)
                sa.resolve_once()
                from sglang.srt.arg_groups.overrides import resolving_view

                cfg = resolving_view(sa)
                fields = {}
                for f in ("device", "attention_backend", "sampling_backend",
                          "disable_cuda_graph", "disable_overlap_schedule", "kv_policy"):
                    try:
                        fields[f] = str(getattr(cfg, f))
                    except Exception:  # noqa: BLE001 - a field this version lacks
                        continue
                report["server_args"][label] = fields
            except BaseException as exc:  # noqa: BLE001
                report["failures"].append(
                    {"step": f"server args ({label})", "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()[-2500:]}
                )

    if args.overlay:
        # The bundle's prebuilt FlashInfer modules resolve as AOT (no JIT) for the arguments
        # the wrappers' plan() passes (flashinfer_aot.specs builds the same specs).
        try:
            from flashinfer_aot import DEFAULT_MODULES, specs

            resolved = {label: bool(spec.is_aot) for label, spec in specs("bfloat16", 64).items()
                        if label in DEFAULT_MODULES}
            report["flashinfer_aot_resolved"] = resolved
            if not all(resolved.values()):
                report["failures"].append({"step": "flashinfer aot", "error": f"not AOT: {resolved}"})
        except BaseException as exc:  # noqa: BLE001
            report["failures"].append({"step": "flashinfer aot", "error": f"{type(exc).__name__}: {exc}",
                                       "trace": traceback.format_exc()[-2500:]})

    stub = sys.modules.get("sgl_kernel")
    report["sgl_kernel_names_imported"] = sorted(getattr(stub, "_ACCESSED", []))
    report["sgl_kernel_names_called"] = sorted(getattr(stub, "_CALLED", []))
    if stub is not None and not getattr(stub, "IS_FREEKV_STUB", False):
        report["failures"].append({"step": "stub", "error": f"real sgl_kernel imported: {stub}"})
    report["dists_used"] = {d: sorted(v) for d, v in sorted(blocker.used.items())}
    report["blocked"] = blocker.blocked
    report["bundled_unused"] = sorted(bundled - set(blocker.used))
    gpu_missing_here = sorted(
        n for n in missing.names
        if normalize(n) in gpu and n not in sys.stdlib_module_names
    )
    report["gpu_packages_missing_here"] = gpu_missing_here
    report["ok"] = not report["failures"]
    return report


def server_argv(model: str) -> dict[str, list[str]]:
    """The launch flags of the check's runs, minus host/port (mirrors serve_check.py)."""
    sys.path.insert(0, str(HERE))
    from serve_check import launch_args

    return {
        label: launch_args(model, policy, cfg, port=30000)
        for label, (policy, cfg) in {
            "default": ("default", None),
            "freekv": ("freekv", {"budget": 2048, "host_memory_gb": 4}),
        }.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--model", default=None, help="model folder for the server-args step")
    parser.add_argument("--site", default=None, help="folder for the check platform (temp)")
    parser.add_argument("--mirror", default=None,
                        help="folder of the GPU machine's versions of pure-Python packages")
    parser.add_argument("--overlay", default=None,
                        help="an unpacked bundle site: import its trimmed sglang/flashinfer")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.site is None:
        args.site = tempfile.mkdtemp(prefix="freekv_check_site_")
    try:
        report = run(args)
    except BaseException as exc:  # noqa: BLE001 - the report must be written
        report = {"ok": False, "failures": [{"step": "import_check", "error": repr(exc),
                                             "trace": traceback.format_exc()[-3000:]}]}
    Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))
    for f in report.get("failures", []):
        print(f"FAIL {f['step']}: {f['error']}", file=sys.stderr)
    print(f"import_check: ok={report['ok']} blocked={sorted(report.get('blocked', {}))}")
    sys.stdout.flush()
    os._exit(0 if report["ok"] else 1)  # skip atexit hooks of half-initialised SGLang


if __name__ == "__main__":
    main()
