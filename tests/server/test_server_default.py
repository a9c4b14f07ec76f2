"""The real SGLang server on CPU (FreeKVCpuPlatform) against HF transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import embedded_model_path, hf_greedy, run_server

pytestmark = pytest.mark.server

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
NEW_TOKENS = 24


def _strip_eos(ids: list[int], eos: int = 2) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def test_tp1_default_policy_matches_transformers(tmp_path: Path) -> None:
    """Compared in float32: in bf16 one of these prompts hits a near-tie (" red" vs ":") at
    its 4th token and the two engines' different summation orders flip it."""
    model = embedded_model_path()
    expected = hf_greedy(model, PROMPTS, NEW_TOKENS, dtype="float32")
    args = ["--model-path", model, "--dtype", "float32", "--kv-policy", "default"]
    with run_server(args, tmp_path) as server:
        got = [_strip_eos(server.generate(p, NEW_TOKENS)["output_ids"]) for p in PROMPTS]
        log = server.log()
    assert got == expected
    assert "policy=default" in log


def test_tp2_freekv_policy_reaches_every_rank_and_answers(tmp_path: Path) -> None:
    """--tp 2 over gloo (3 KV heads padded over 2 ranks), compared in float32."""
    model = embedded_model_path()
    expected = hf_greedy(model, PROMPTS[:2], NEW_TOKENS, dtype="float32")
    cfg = '{"budget": 1024, "sink": 64, "window": 256, "tau": 0.9}'
    args = ["--model-path", model, "--tp", "2", "--dtype", "float32",
            "--kv-policy", "freekv", "--freekv-config", cfg, "--disable-radix-cache"]
    with run_server(args, tmp_path) as server:
        got = [_strip_eos(server.generate(p, NEW_TOKENS)["output_ids"]) for p in PROMPTS[:2]]
        log = server.log()
    assert got == expected
    for rank in (0, 1):
        line = next(
            (ln for ln in log.splitlines() if f"scheduler tp_rank={rank} policy=freekv" in ln), None
        )
        assert line is not None, f"rank {rank} did not receive the policy:\n{log[-3000:]}"
        assert '"budget": 1024' in line and '"tau": 0.9' in line and '"sink": 64' in line
