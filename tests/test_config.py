"""FreeKVConfig validation: every rule, and valid configs accepted."""

from __future__ import annotations

import json

import pytest

from sglang_freekv.config import FreeKVConfig, FreeKVConfigError

VALID = [
    {},
    {"budget": 1024, "sink": 128, "window": 256},
    {"page_size": 16, "budget": 512, "sink": 64, "window": 64},
    {"tau": None},
    {"tau": -1}, {"tau": 1.0}, {"tau": 0.9},
    {"speculative": False},
    {"score_scale": None}, {"score_scale": 1}, {"score_scale": 0.125},
    {"span_weight": 0}, {"span_weight": 0.25}, {"span_weight": 1},
    {"spec_drift_limit": 0}, {"spec_drift_limit": 0.5}, {"spec_drift_limit": 1.0},
    {"dense_layers": []}, {"dense_layers": [0, 5]},
    {"host_memory_gb": 2}, {"host_memory_gb": 0.5},
    {"sink": 0},
]

# (json text, the field the message must name, a fragment of the rule)
INVALID = [
    ("not json", "is not valid JSON", "JSON"),
    ("[1, 2]", "must be a JSON object", "object"),
    ('{"budgett": 1024}', "budgett", "unknown key"),
    ('{"budget": "1024"}', "budget", "must be an integer"),
    ('{"budget": true}', "budget", "must be an integer"),
    ('{"budget": 1000}', "budget", "multiple of page_size"),
    ('{"sink": 100}', "sink", "multiple of page_size"),
    ('{"window": 500, "budget": 4096}', "window", "multiple of page_size"),
    ('{"sink": 512, "window": 512, "budget": 1024}', "budget", "must exceed sink + window"),
    ('{"sink": 1024, "window": 1024}', "budget", "must exceed sink + window"),
    ('{"window": 32}', "window", "at least 2 pages"),
    ('{"page_size": 24}', "page_size", "power of two"),
    ('{"page_size": 0}', "page_size", ">= 1"),
    ('{"tau": 1.5}', "tau", "in [-1, 1]"),
    ('{"tau": -2}', "tau", "in [-1, 1]"),
    ('{"tau": "high"}', "tau", "number"),
    ('{"score_scale": 0}', "score_scale", "> 0"),
    ('{"score_scale": -0.5}', "score_scale", "> 0"),
    ('{"score_scale": "auto"}', "score_scale", "positive number"),
    ('{"span_weight": 1.5}', "span_weight", "in [0, 1]"),
    ('{"span_weight": -0.5}', "span_weight", "in [0, 1]"),
    ('{"span_weight": null}', "span_weight", "number in [0, 1]"),
    ('{"span_weight": true}', "span_weight", "number in [0, 1]"),
    ('{"spec_drift_limit": 1.2}', "spec_drift_limit", "in [0, 1]"),
    ('{"spec_drift_limit": "high"}', "spec_drift_limit", "number in [0, 1]"),
    ('{"speculative": "yes"}', "speculative", "true or false"),
    ('{"speculative": 1}', "speculative", "true or false"),
    ('{"dense_layers": 0}', "dense_layers", "list"),
    ('{"dense_layers": [-1]}', "dense_layers", ">= 0"),
    ('{"dense_layers": [1, 1]}', "dense_layers", "repeat"),
    ('{"dense_layers": ["0"]}', "dense_layers", "integers"),
    ('{"host_memory_gb": 0}', "host_memory_gb", "> 0"),
    ('{"host_memory_gb": "8G"}', "host_memory_gb", "positive number"),
]


@pytest.mark.parametrize("data", VALID, ids=[json.dumps(d) for d in VALID])
def test_valid_configs_accepted(data: dict) -> None:
    cfg = FreeKVConfig.from_json(json.dumps(data))
    assert cfg.sink + cfg.window < cfg.budget
    assert cfg.top_k == (cfg.budget - cfg.sink - cfg.window) // cfg.page_size
    # Round trip through JSON keeps every field.
    assert FreeKVConfig.from_json(cfg.to_json()) == cfg


def test_defaults_are_the_paper_defaults() -> None:
    cfg = FreeKVConfig.from_json(None)
    assert (cfg.page_size, cfg.budget, cfg.sink, cfg.window) == (32, 2048, 512, 512)
    assert cfg.tau == 0.8 and cfg.speculative and cfg.dense_layers == (0,)
    assert cfg.score_scale is None and cfg.score_scale_for(64) == 0.125
    assert cfg.host_memory_gb is None and cfg.top_k == 32


@pytest.mark.parametrize("text,field,rule", INVALID, ids=[t for t, _, _ in INVALID])
def test_invalid_configs_name_field_value_and_rule(text: str, field: str, rule: str) -> None:
    with pytest.raises(FreeKVConfigError) as info:
        FreeKVConfig.from_json(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert field in msg and rule in msg


def test_frozen() -> None:
    cfg = FreeKVConfig()
    with pytest.raises(AttributeError):
        cfg.budget = 4096  # type: ignore[misc]


def test_model_rules() -> None:
    cfg = FreeKVConfig.from_json('{"dense_layers": [0, 30]}')
    with pytest.raises(FreeKVConfigError, match=r"dense_layers=\[0, 30\]: layer id 30 is out of range"):
        cfg.validate_for_model(num_layers=30, model="SmolLM2")
    cfg.validate_for_model(num_layers=31)
    with pytest.raises(FreeKVConfigError, match="uses mla attention"):
        FreeKVConfig().validate_for_model(num_layers=30, attention="mla", model="DeepSeek-V3")
