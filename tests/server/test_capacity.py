"""Capacity from the host tier: at the same (simulated) device memory, ``default`` runs at
most 2 long requests at once and ``freekv`` at least 8, every answer correct.

The device holds about 2.5 dense ~6.2K-token contexts (``tests/capacity.py``); 10 passkey
prompts of ~6.2K tokens are sent at once to each server in turn.
"""

from __future__ import annotations

import pytest

from tests.capacity import PROMPT_TOKENS, NEW_TOKENS, run_capacity

pytestmark = [pytest.mark.server, pytest.mark.slow]

N_REQUESTS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("capacity")
    return {policy: run_capacity(policy, N_REQUESTS, tmp) for policy in ("default", "freekv")}


def test_default_is_capped_by_dense_kv(runs: dict) -> None:
    run = runs["default"]
    need = PROMPT_TOKENS + NEW_TOKENS
    assert run.max_total_tokens is not None and run.max_total_tokens < 3 * need, run
    assert 1 <= run.max_running <= 2, run


def test_freekv_runs_at_least_8_at_once_with_correct_answers(runs: dict) -> None:
    run, dense = runs["freekv"], runs["default"]
    assert run.max_running >= 8, (run.max_running, run.max_running_requests,
                                  run.max_total_tokens, run.startup_lines)
    assert run.max_total_tokens is not None and run.max_total_tokens >= 8 * PROMPT_TOKENS
    assert any("device plan" in ln for ln in run.startup_lines), run.startup_lines
    # every key dense attention finds on this model is found by FreeKV too
    missed = [i for i, (f, d) in enumerate(zip(run.found, dense.found)) if d and not f]
    assert not missed, [(i, run.answers[i]) for i in missed]
    assert sum(dense.found) >= N_REQUESTS - 2, dense.answers
