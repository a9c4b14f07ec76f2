"""The SGLang frontend programs in ``examples/`` against a CPU FreeKV server (embedded model).

Each program runs through ``sgl.RuntimeEndpoint`` exactly as its ``__main__`` does. The
135M model is small, so answers are checked for form (a choice among the choices, text that
matches its regex or JSON schema, non-empty turns), except the pass key of the long-document
program, which must be right: the document (~6K tokens) is far beyond the budget (512), so
FreeKV's sparse path answers it. That program's branches (``fork``) must find the document
in the radix cache. The server also exports every metric the Grafana dashboard of
``deploy/k8s`` reads.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import requests

from tests.helpers import REPO, Server, embedded_model_path, metric_values, run_server
from tests.test_deploy import dashboard_metric_names

pytestmark = pytest.mark.server

FREEKV_CFG = {"budget": 512, "sink": 64, "window": 128}  # as tests/server/test_freekv_server.py
EXAMPLES = REPO / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--model-path", embedded_model_path(), "--dtype", "float32",
            "--kv-policy", "freekv", "--freekv-config", json.dumps(FREEKV_CFG),
            "--enable-metrics"]
    # 600 s: a start took 274 s while other servers shared the 2 cores (~40 s when idle).
    with run_server(args, tmp_path_factory.mktemp("frontend"), timeout_s=600) as srv:
        load_example("_common").connect(srv.url, chat_template="chatml")
        yield srv


def test_chat_with_select(server: Server) -> None:
    chat = load_example("chat_select")
    answer = chat.run("Paris")
    assert answer.continent in chat.CONTINENTS, answer
    assert answer.landmark and len(answer.landmark) < 400, answer
    assert answer.turns == 5, answer  # system + two (user, assistant) turns


def test_regex_and_json_constrained_gen(server: Server) -> None:
    import jsonschema

    constrained = load_example("constrained")
    character = constrained.run("Aria")
    assert re.fullmatch(constrained.AGE_REGEX, character.age_text), character
    jsonschema.validate(character.profile, constrained.PROFILE_SCHEMA)


def test_long_document_fork_shares_the_prefix_and_finds_the_key(server: Server) -> None:
    long_document = load_example("long_document")
    checked_before = sum(metric_values(server.url, "sglang:freekv_checked_heads_total"))
    result = long_document.run(tokens=6000, depth=0.5, seed=0)
    assert all(n > 5000 for n in result.prompt_tokens), result
    assert result.key_found, result
    assert all(a for a in result.answers), result
    # Every branch found the document (committed once by fork) in the radix cache.
    for cached, prompt in zip(result.cached_tokens, result.prompt_tokens, strict=True):
        assert cached >= prompt - 32, result
    # The answers came from the sparse path: drift checks ran (contexts beyond the budget),
    # and the cached document holds host-tier pages.
    assert sum(metric_values(server.url, "sglang:freekv_checked_heads_total")) > checked_before
    assert sum(metric_values(server.url, "sglang:freekv_host_pages_cached")) > 0


def test_dashboard_metrics_are_exported(server: Server) -> None:
    """Every series the Grafana dashboard queries exists at /metrics (after the requests
    above, so histograms and counters have samples)."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    exported = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    missing = sorted(dashboard_metric_names() - exported)
    assert not missing, f"dashboard queries series the server does not export: {missing}"
