"""benchmarks/bench_decode.py's split of a request's decode at FreeKV's budget.

The short request of the benchmark (1000 prompt tokens, 64 new) crosses the budget (1024)
while decoding; its rate below and past the budget come from the streamed tokens' clocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_decode import split_rates, token_time  # noqa: E402


def _stamps(n: int, dense_s: float, sparse_s: float, last_dense: int) -> list[tuple[int, float]]:
    """Token 1 at t=1 (after the prefill), then one token per step: ``dense_s`` per step up
    to token ``last_dense``, ``sparse_s`` after it."""
    t, out = 1.0, [(1, 1.0)]
    for i in range(2, n + 1):
        t += dense_s if i <= last_dense else sparse_s
        out.append((i, t))
    return out


def test_split_at_the_first_sparse_step() -> None:
    # prompt 1000, budget 1024: token i comes from a step with seq_len 1000 + i - 1, sparse
    # iff > 1024, so tokens 2..25 are dense and 26..64 sparse.
    stamps = _stamps(64, 0.040, 0.050, last_dense=25)
    sp = split_rates(stamps, prompt_tokens=1000, n_tokens=64, budget=1024)
    assert sp is not None and sp["last_dense_token"] == 25
    assert sp["below_budget_tok_s"] == pytest.approx(25.0)
    assert sp["past_budget_tok_s"] == pytest.approx(20.0)


def test_coalesced_chunks_use_the_first_chunk_reaching_a_token() -> None:
    stamps = [(1, 1.0), (3, 1.1), (4, 1.2), (9, 1.5)]
    assert token_time(stamps, 2) == 1.1 and token_time(stamps, 9) == 1.5
    assert token_time(stamps, 10) is None


@pytest.mark.parametrize("prompt", [1030, 1022, 500])
def test_no_split_unless_both_parts_have_four_steps(prompt: int) -> None:
    # 1030: sparse from the first step; 1022: 2 dense steps; 500: never sparse in 64 tokens
    stamps = _stamps(64, 0.04, 0.05, last_dense=1025 - prompt)
    assert split_rates(stamps, prompt_tokens=prompt, n_tokens=64, budget=1024) is None


def test_missing_tokens_give_no_split() -> None:
    stamps = _stamps(30, 0.04, 0.05, last_dense=25)  # the stream stopped at token 30
    assert split_rates(stamps, prompt_tokens=1000, n_tokens=64, budget=1024) is None
