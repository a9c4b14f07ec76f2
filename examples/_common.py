"""Shared command line of the example programs: connect to a running SGLang server."""

from __future__ import annotations

import argparse

import sglang as sgl


def connect(url: str, chat_template: str | None = None) -> sgl.RuntimeEndpoint:
    """A ``RuntimeEndpoint`` for the server at ``url``, made the programs' default backend.

    ``chat_template``: a name from ``sglang.lang.chat_template`` (e.g. ``"chatml"`` for
    SmolLM2); ``None`` lets SGLang pick one from the served model's path.
    """
    backend = sgl.RuntimeEndpoint(url, chat_template_name=chat_template)
    sgl.set_default_backend(backend)
    return backend


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--url", default="http://127.0.0.1:30000",
                    help="SGLang server, e.g. `make serve` (default %(default)s)")
    ap.add_argument("--chat-template", default="chatml",
                    help="chat template name (default %(default)s, the embedded SmolLM2's)")
    return ap.parse_args()
