"""The GPU serving check's bundle is complete, without a GPU and without a network.

``benchmarks/gpu_serve_check.sh`` runs the real SGLang server on a GPU machine that has torch
but neither sglang, flashinfer nor sgl_kernel; what it needs travels in a bundle built by
``benchmarks/gpu_bundle/build.py``. GPU time is scarce (one run, maybe a rerun), so what can
be known here is checked here.

Choice: these tests check the *manifest* (``benchmarks/gpu_bundle/manifest.py``) and the
import path, not a freshly built bundle. Building needs ~110 MiB of cp312 wheels from PyPI
(CI reaches PyPI only through pip during install) and, for the FlashInfer modules, ~20 min of
nvcc; so CI checks that (a) the server's import path under a fake H200 needs no distribution
beyond the GPU machine's list plus the manifest (``import_check.py``: a path finder hides
every other distribution's code, as absent there), (b) the check platform resolves and both
runs' server arguments resolve, (c) the stub and the platform behave, (d) the manifest stays
in step with what SGLang's install resolved. A bundle built here (``.gpu_bundle/out``) is
checked too when present (size, contents); in CI it is absent and that test skips.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE_SRC = REPO / "benchmarks" / "gpu_bundle"
BUNDLE_OUT = REPO / ".gpu_bundle" / "out"
sys.path.insert(0, str(BUNDLE_SRC))

import manifest  # noqa: E402  (benchmarks/gpu_bundle/manifest.py)
from import_check import normalize, read_package_list  # noqa: E402

GPU_PACKAGES = read_package_list(BUNDLE_SRC / "gpu_machine_packages.txt")


def _run(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_manifest_names_are_missing_on_the_gpu_machine() -> None:
    both = sorted(n for n in manifest.BUNDLED if normalize(n) in GPU_PACKAGES)
    assert not both, f"already on the GPU machine, do not carry: {both}"


def test_manifest_versions_satisfy_the_requirements() -> None:
    # Every carried version satisfies what sglang 0.5.23 and the other carried distributions
    # require (read from this venv's metadata; sglang is pinned, so this does not drift).
    from packaging.requirements import Requirement

    bundled = {normalize(n): v for n, v in manifest.BUNDLED.items()}
    broken = []
    for dist in ["sglang", *manifest.BUNDLED]:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            have = bundled.get(normalize(req.name))
            if have is not None and not req.specifier.contains(have, prereleases=True):
                broken.append(f"{dist} requires {req}, manifest has {have}")
    assert not broken, broken


STUB = f"""
import sys
sys.path.insert(0, {str(BUNDLE_SRC / 'stub')!r})
import sgl_kernel
assert sgl_kernel.IS_FREEKV_STUB
assert sgl_kernel.is_arch_support_pdl() is False
t = object()
assert sgl_kernel.weak_ref_tensor(t) is t
from sgl_kernel.memory import weak_ref_tensor
from sgl_kernel.utils import is_arch_support_pdl
assert weak_ref_tensor(t) is t and is_arch_support_pdl() is False
from sgl_kernel import rmsnorm, silu_and_mul
from sgl_kernel.kvcacheio import transfer_kv_per_layer
from sgl_kernel.scalar_type import scalar_types
assert repr(scalar_types.uint4b8).startswith("<sgl_kernel stub")
for fn, name in ((rmsnorm, "rmsnorm"), (transfer_kv_per_layer, "kvcacheio.transfer_kv_per_layer")):
    try:
        fn(1, 2)
    except sgl_kernel.SglKernelStubError as e:
        assert name + "()" in str(e), str(e)
    else:
        raise AssertionError("a stub placeholder did not raise")
assert not hasattr(sgl_kernel, "__wrapped__")
assert sorted(sgl_kernel._CALLED) == ["is_arch_support_pdl", "kvcacheio.transfer_kv_per_layer", "rmsnorm", "weak_ref_tensor"], sgl_kernel._CALLED
print("OK")
"""


def test_sgl_kernel_stub_behaves_and_raises_clearly() -> None:
    assert _run(STUB).strip().endswith("OK")


ACTIVATE = f"""
import sys, os
sys.path.insert(0, {str(BUNDLE_SRC / 'check_platform')!r}); sys.path.insert(0, {str(BUNDLE_SRC)!r})
import freekv_gpu_check as c
os.environ.pop("FREEKV_GPU_CHECK", None)
import torch
real = torch.cuda.is_available()
assert c.activate() is None                    # off unless asked for
os.environ["FREEKV_GPU_CHECK"] = "1"
assert (c.activate() is not None) == real      # off without CUDA
import fake_cuda; fake_cuda.install()
assert c.activate() == c.PLATFORM_QUALNAME
print("OK")
"""


def test_check_platform_activates_only_on_cuda_when_asked() -> None:
    assert _run(ACTIVATE).strip().endswith("OK")


def test_serve_check_helpers() -> None:
    from serve_check import RUNS, compare, launch_args, make_verdict

    argv = launch_args("/m", "freekv", {"budget": 2048}, port=1234)
    assert argv[argv.index("--kv-policy") + 1] == "freekv"
    assert json.loads(argv[argv.index("--freekv-config") + 1]) == {"budget": 2048}
    assert "--disable-cuda-graph" in argv
    assert "--disable-cuda-graph" not in launch_args("/m", "default", None, 1, graphs=True)
    assert {"default", "freekv"} <= set(RUNS)
    a = [{"prompt_tokens": 8, "output_ids": [1, 2, 3], "logprobs": [-1.0, -2.0, -3.0],
          "top2_gap": [0.5, 0.01, 0.2]}]
    b = [{"prompt_tokens": 8, "output_ids": [1, 2, 4], "logprobs": [-1.0, -2.1, -3.0],
          "top2_gap": [0.5, 0.02, 0.2]}]
    same = compare(a, a)
    assert same["all_identical"] and same["prompts"][0]["first_divergence"] is None
    diff = compare(a, b)["prompts"][0]
    assert not diff["identical"] and diff["first_divergence"] == 2
    assert diff["max_abs_logprob_diff"] == pytest.approx(0.1)
    assert compare({"error": "x"}, a)["comparable"] is False
    assert "--attention-backend" in launch_args("/m", "default", None, 1, flags=RUNS["freekv_triton"].flags)
    verdict = make_verdict({
        "default": {"equivalence": a, "decode": {"decode_tok_s": 100.0}},
        "freekv": {"equivalence": b, "decode": {"decode_tok_s": 150.0}},
        "freekv_dense16k": {"error": "RuntimeError: server exited"},
    })
    assert verdict["decode_16k"]["freekv_vs_default"] == 1.5
    assert verdict["equivalence_budget_ge_context"]["all_identical"] is False
    assert "freekv_dense16k" in verdict["failed_runs"]


def test_server_import_path_needs_only_the_gpu_machine_and_the_bundle(tmp_path: Path) -> None:
    """The dry run of the import path (~1 min): fake H200, stub, check platform, blocker."""
    model = subprocess.run(
        [sys.executable, "-m", "sglang_freekv.models", "smollm2"], capture_output=True,
        text=True, timeout=600, cwd=REPO,
    )
    args = ["--json", str(tmp_path / "report.json"), "--site", str(tmp_path / "site")]
    if model.returncode == 0:
        args += ["--model", model.stdout.strip().splitlines()[-1]]
    out = subprocess.run(
        [sys.executable, str(BUNDLE_SRC / "import_check.py"), *args],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    fails = "\n".join(f"{f['step']}: {f['error']}\n{f.get('trace', '')[-1500:]}"
                      for f in report.get("failures", []))
    assert out.returncode == 0 and report["ok"], fails or out.stderr[-3000:]
    assert report["platform"].endswith("FreeKVCudaCheckPlatform")
    # Every distribution the path used is there or carried (the blocker hid all others).
    allowed = GPU_PACKAGES | {normalize(n) for n in manifest.BUNDLED} | {"sglang-freekv", "(local)"}
    assert set(report["dists_used"]) <= allowed
    assert {"sglang", "flashinfer-python", "apache-tvm-ffi"} <= set(report["dists_used"])
    assert not report["sgl_kernel_names_called"], report["sgl_kernel_names_called"]
    if model.returncode == 0:
        for label in ("default", "freekv"):
            fields = report["server_args"][label]
            assert fields["device"] == "cuda" and fields["sampling_backend"] == "pytorch", fields
        assert report["server_args"]["default"]["attention_backend"] == "flashinfer"


@pytest.mark.skipif(not (BUNDLE_OUT / "bundle.json").exists(),
                    reason="no bundle built here (benchmarks/gpu_bundle/build.py)")
def test_built_bundle_fits_and_matches_the_manifest() -> None:
    info = json.loads((BUNDLE_OUT / "bundle.json").read_text())
    size = sum(f.stat().st_size for f in BUNDLE_OUT.rglob("*") if f.is_file()) / 2**20
    assert size <= manifest.MAX_BUNDLE_MIB, f"{size:.1f} MiB"
    assert info["bundled"] == manifest.BUNDLED, "bundle is stale: rerun build.py"
    assert (BUNDLE_OUT / "model" / "config.json").exists()
    aot = info.get("flashinfer_aot") or {"modules": {}}
    assert "decode" in aot["modules"] and "so" in aot["modules"]["decode"]
