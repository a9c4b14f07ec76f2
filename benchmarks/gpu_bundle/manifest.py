"""What the GPU serving check's bundle holds: distributions, versions, trimming, size limit.

The single source of truth for ``build.py`` (which downloads and installs exactly these
wheels for CPython 3.12 manylinux x86_64) and for ``tests/test_gpu_bundle.py`` (which checks,
without a network, that the server's import path needs nothing beyond these plus the GPU
machine's own packages, ``gpu_machine_packages.txt``). Versions are the ones SGLang 0.5.23's
install resolved in this project's venv; every name here is absent from the GPU machine's
list (checked by the test), except where a comment says why a second copy travels.
"""

from __future__ import annotations

# distribution -> version; all installed with --no-deps.
BUNDLED: dict[str, str] = {
    # The server itself and its kernels.
    "sglang": "0.5.23",
    "flashinfer-python": "0.7.2",
    "apache-tvm-ffi": "0.1.11",
    # HTTP server and API types.
    "fastapi": "0.165.0",
    "starlette": "1.10.0",
    "uvicorn": "0.54.0",
    "python-multipart": "0.0.34",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "typing-inspection": "0.4.5",
    "annotated-types": "0.8.0",
    "openai": "2.8.0",
    "distro": "1.9.0",
    "sniffio": "1.3.1",
    "jiter": "0.19.0",
    "partial-json-parser": "0.2.1.1.post7",
    # IPC, serialisation, process titles.
    "pyzmq": "27.3.0",
    "msgspec": "0.23.0",
    "orjson": "3.13.0",
    "pybase64": "1.5.1",
    "setproctitle": "1.3.8",
    "dill": "0.4.1",
    # Structured output (the default grammar backend is imported by the scheduler).
    "xgrammar": "0.2.7",
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    # Model loading and misc imports on the path.
    "compressed-tensors": "0.18.0",
    "gguf": "0.19.0",
    "loguru": "0.7.3",
    "opentelemetry-api": "1.45.2",
    "soundfile": "0.13.1",
    "cffi": "2.1.1",
    "pycparser": "3.12",
    "ipython": "9.18.1",
    "traitlets": "5.16.1",
    "interegular": "0.3.3",
}

# Files dropped from installed packages (glob patterns relative to the site folder).
TRIM: list[str] = [
    "sglang/srt/rust_extensions/_*.so",  # PyO3 builds against torch 2.14: cannot load there
    "sglang/srt/mem_cache/rust_tree_core/*.so",  # idem; the Python TreeCore is used
    "sglang/multimodal_gen",
    "sglang/test",
    "sglang/benchmark",
    "bin",
    "**/__pycache__",
]

# FlashInfer: keep the Python package, its headers (data/include; the vendored CCCL, CUTLASS
# and spdlog its JIT builds put first on the include path: +6.5 MiB packed, so a module not
# prebuilt, FA3 included, can still compile on the GPU machine) and these csrc files (decode,
# prefill, cascade, page); the other 270 MiB of csrc go.
FLASHINFER_KEEP_DATA: list[str] = [
    "data/include",
    "data/cccl",
    "data/cutlass",
    "data/spdlog",
]
FLASHINFER_KEEP_CSRC: list[str] = [
    "batch_decode*",
    "batch_prefill*",
    "single_decode*",
    "single_prefill*",
    "cascade*",
    "page*",
    "flashinfer_cascade_binding.cu",
    "flashinfer_page_binding.cu",
    "flashinfer_ops*",
    "tvm_ffi_utils.h",
    "*jit_binding*",
    "*config.inc",
    "*customize_config*",
]

MAX_BUNDLE_MIB = 45.0

# Pure-Python packages whose version on the GPU machine differs from this venv's: not carried
# (the machine has them), but ``build.py`` unpacks them into ``.gpu_bundle/cache/mirror`` so
# the dry run (``import_check.py --mirror``) imports SGLang against the GPU machine's version.
GPU_MIRROR: dict[str, str] = {
    "transformers": "5.17.0",
}
