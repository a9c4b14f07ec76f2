"""`--kv-policy` / `--freekv-config` on `python -m sglang.launch_server`."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import embedded_model_path


def _run_launcher(args: tuple[str, ...], timeout: float = 180
                  ) -> subprocess.CompletedProcess[str]:
    """Run the launcher; an invalid setting must stop it long before the model loads (a
    launch that runs into ``timeout`` raises ``TimeoutExpired``: the test fails)."""
    return subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def _freekv(*args: str) -> tuple[str, ...]:
    return ("--model-path", embedded_model_path(), "--kv-policy", "freekv", *args)


def _launches() -> list[tuple[str, ...]]:
    """Every launcher invocation of this module (each spends ~30 s importing sglang)."""
    return [
        ("--help",),
        *[_freekv("--freekv-config", cfg) for cfg, _, _ in BAD],
        ("--model-path", embedded_model_path(), "--freekv-config", '{"budget": 1024}'),
        _freekv("--disable-radix-cache", "--freekv-config", '{"host_memory_gb": 0.01}'),
        _freekv("--kv-cache-dtype", "fp8_e4m3"),
    ]


@pytest.fixture(scope="module")
def launched() -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    """All of this module's launches, run four at a time (one import is one busy core, so
    the two cores of our machines run two at once; the others wait on I/O)."""
    cases = _launches()
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(cases, pool.map(_run_launcher, cases)))


def _launch(launched: dict[tuple[str, ...], subprocess.CompletedProcess[str]],
            *args: str) -> subprocess.CompletedProcess[str]:
    return launched[args]


def test_help_lists_the_flags(launched) -> None:  # type: ignore[no-untyped-def]
    out = _launch(launched, "--help")
    assert out.returncode == 0
    assert "--kv-policy {default,freekv}" in out.stdout
    assert "--freekv-config JSON" in out.stdout


BAD = [
    ('{"budget": 1000}', "budget=1000", "multiple of page_size (32)"),
    ("{budget: 1}", "is not valid JSON", "JSON"),
    ('{"sink": 1024, "window": 1024}', "budget=2048", "must exceed sink + window"),
    ('{"tau": 2}', "tau=2", "in [-1, 1]"),
    ('{"dense_layers": [0, 30]}', "dense_layers=[0, 30]", "out of range"),
    ('{"speed": 1}', "speed=1", "unknown key"),
    ('{"speculative_job": "batch"}', 'speculative_job="batch"', 'must be one of "auto"'),
]


@pytest.mark.parametrize("cfg,field,rule", BAD, ids=[b[0] for b in BAD])
def test_invalid_config_exits_with_one_line(launched, cfg: str, field: str,  # type: ignore[no-untyped-def]
                                            rule: str) -> None:
    out = _launch(launched, *_freekv("--freekv-config", cfg))
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert field in errors[0] and rule in errors[0]
    assert "Traceback" not in out.stderr


def test_config_without_freekv_policy_is_refused(launched) -> None:  # type: ignore[no-untyped-def]
    out = _launch(launched, "--model-path", embedded_model_path(), "--freekv-config",
                  '{"budget": 1024}')
    assert out.returncode == 2 and "only applies with --kv-policy freekv" in out.stderr


def test_mla_model_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text(
        '{"architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 512, "num_hidden_layers": 4}'
    )
    out = _run_launcher(("--model-path", str(tmp_path), "--kv-policy", "freekv"))
    assert out.returncode == 2
    assert "uses mla attention" in out.stderr and "Traceback" not in out.stderr


PROBE = """
import os, pickle, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
args = prepare_server_args(sys.argv[1:])
clone = pickle.loads(pickle.dumps(args))  # what each scheduler process receives
print(clone._freekv_policy, clone._freekv_config, os.environ.get("SGLANG_FREEKV_CONFIG"))
"""


def test_policy_rides_on_the_pickled_record_and_env() -> None:
    cfg = '{"budget": 1024, "sink": 64, "window": 128, "speculative": false}'
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--model-path", embedded_model_path(),
         "--kv-policy", "freekv", "--freekv-config", cfg, "--disable-radix-cache"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    policy, rest = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert policy == "freekv"
    assert rest.count('"speculative": false') == 2 and rest.count('"budget": 1024') == 2


def test_host_tier_smaller_than_one_budget_is_refused(launched) -> None:  # type: ignore[no-untyped-def]
    out = _launch(launched, *_freekv("--disable-radix-cache", "--freekv-config",
                                     '{"host_memory_gb": 0.01}'))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "host_memory_gb=0.01" in errors[0]
    assert "fewer than one budget (2048)" in errors[0]


def test_host_tier_smaller_than_the_context_caps_the_context() -> None:
    """0.1 GiB holds 72 pages of 32 float32 tokens of SmolLM2's KV (46080 B each); one stays
    spare for a running request's partial page: 2272 tokens < its 8192 context, so the
    launcher serves a 2272-token context, so SGLang refuses longer requests itself (the
    logical token pool is sized from the host tier in each scheduler: see test_sizing)."""
    probe = PROBE.replace("print(clone._freekv_policy, clone._freekv_config, "
                          'os.environ.get("SGLANG_FREEKV_CONFIG"))',
                          "print(clone.context_length, clone.max_total_tokens)")
    cfg = '{"budget": 512, "sink": 64, "window": 128, "host_memory_gb": 0.1}'
    out = subprocess.run(
        [sys.executable, "-c", probe, "--model-path", embedded_model_path(), "--dtype",
         "float32", "--kv-policy", "freekv", "--freekv-config", cfg, "--disable-radix-cache"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tier = (int(0.1 * 2**30) // (2 * 30 * 3 * 64 * 4 * 32) - 1) * 32
    assert out.stdout.strip().splitlines()[-1] == f"{tier} 65536"  # 65536: the CPU pool cap
    assert f"serving with --context-length {tier}" in out.stderr


def test_default_policy_leaves_record_untouched() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--model-path", embedded_model_path()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "default None None"


def test_step_job_is_refused_off_the_cpu_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """`speculative_job: "step"` relies on CPU program order: refused where the CPU platform
    does not run (a GPU), accepted where it does."""
    import argparse

    from sglang_freekv import platform
    from sglang_freekv.config import FreeKVConfig, FreeKVConfigError
    from sglang_freekv.patches.server_args import apply_freekv_args

    cfg = FreeKVConfig(speculative_job="step")
    monkeypatch.setattr(platform, "cpu_platform_wanted", lambda: False)
    with pytest.raises(FreeKVConfigError, match='speculative_job="step": is implemented for '
                                                 "CPU engines only"):
        apply_freekv_args(argparse.Namespace(), cfg)
    monkeypatch.setattr(platform, "cpu_platform_wanted", lambda: True)
    args = argparse.Namespace()
    apply_freekv_args(args, cfg)
    assert args.attention_backend == "freekv"


def test_quantized_kv_cache_is_refused_in_one_line(launched) -> None:  # type: ignore[no-untyped-def]
    out = _launch(launched, *_freekv("--kv-cache-dtype", "fp8_e4m3"))
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "--kv-cache-dtype=fp8_e4m3" in errors[0], out.stderr[-2000:]


def test_dense_layers_checked_against_the_loaded_model(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Where the launcher could not read a config.json, the scheduler checks dense_layers
    against the model it loaded: one line, exit status 2."""
    from sglang_freekv.config import FreeKVConfig
    from sglang_freekv.patches.freekv_pool import check_dense_layers

    check_dense_layers(FreeKVConfig(dense_layers=(0, 29)), 30, "/m/SmolLM2")
    with pytest.raises(SystemExit) as exc:
        check_dense_layers(FreeKVConfig(dense_layers=(0, 30)), 30, "/m/SmolLM2")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: freekv-config: dense_layers=[0, 30]: layer id 30 is out of range '
                   'for SmolLM2 with 30 layers']
