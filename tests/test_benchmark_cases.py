"""benchmarks/cases.py: the real-architecture and large-micro-batch cases build what they claim (CPU, fast)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.cases import (
    REAL_ARCHITECTURES,
    Case,
    accuracy_cases,
    large_batch_cases,
    model_config,
    real_architecture_cases,
)
from memtune.config import TrainConfig

TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(config) -> list[int]:
    """Every special token id the config names (eos may be a list), None left out."""
    ids: list[int] = []
    for key in TOKEN_KEYS:
        value = getattr(config, key, None)
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    return ids


@pytest.mark.parametrize("model_type", list(REAL_ARCHITECTURES))
def test_real_architecture_builds_the_claimed_type_at_its_depth(model_type):
    entry = REAL_ARCHITECTURES[model_type]
    cases = [case for case in real_architecture_cases() if case.model_type == model_type]
    assert len(cases) == 2 and {case.model for case in cases} == {entry["shapes_of"]}
    config = model_config(cases[0])
    assert config.model_type == model_type
    assert config.num_hidden_layers == (entry["num_layers"] or entry["published_layers"])
    assert 2 <= config.num_hidden_layers <= entry["published_layers"]
    ids = token_ids(config)
    assert ids and all(0 <= token < config.vocab_size for token in ids), (ids, config.vocab_size)
    # The published per-layer shape reaches the config (not the config class's default).
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        assert getattr(config, key) == entry["settings"][key]


def test_real_architectures_are_outside_the_catalog_matrix():
    catalog_types = {str(model_config(case).model_type) for case in accuracy_cases()[::16]}
    assert catalog_types == {"gpt2", "qwen2", "llama", "gemma2", "phi3"}
    assert len(REAL_ARCHITECTURES) >= 12 and not catalog_types & set(REAL_ARCHITECTURES)


def test_real_architecture_cases_are_bf16_mixed_and_bf16_lora_with_checkpointing():
    cases = real_architecture_cases()
    assert len(cases) == 2 * len(REAL_ARCHITECTURES)
    assert {case.config.precision for case in cases[::2]} == {"bf16-mixed"}
    lora = cases[1::2]
    assert all(case.config.adapter and case.config.gradient_checkpointing and case.config.weights_dtype == "bf16"
               for case in lora)


def test_case_names_are_unique_across_suites():
    names = [case.name for case in accuracy_cases() + large_batch_cases() + real_architecture_cases()]
    assert len(names) == len(set(names))


def test_large_batch_cases_hold_the_issue_outlier():
    names = [case.name for case in large_batch_cases()]
    assert names[0] == "Qwen/Qwen2.5-0.5B 16x1024 bf16-mixed"
    assert len(names) == 3 and all(model_config(case).model_type for case in large_batch_cases())


def test_a_settings_case_does_not_change_its_architecture_entry():
    case = real_architecture_cases()[0]
    before = dict(case.settings)
    model_config(case).num_hidden_layers = 1
    assert dict(case.settings) == before and REAL_ARCHITECTURES["mistral"]["settings"].get("num_hidden_layers") is None


def test_a_shrunk_real_architecture_case_traces_on_the_cpu_path():
    from memtune.predict.estimate import estimate

    case = real_architecture_cases()[0]
    tiny = {**case.settings, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256}
    shrunk = dataclasses.replace(case, num_layers=2, settings=tiny, config=TrainConfig(seq_len=64, micro_batch_size=2,
                                                                                        amp="bf16"))
    assert isinstance(shrunk, Case)
    result = estimate(model_config(shrunk), shrunk.config, device="cpu")
    assert result.trace_device == "cpu"
    assert 0 < result.peak_allocated_bytes <= result.peak_reserved_bytes


def test_a_failing_case_keeps_its_row_with_the_error():
    """benchmarks/accuracy.py records a config or trace failure in the case's row and goes on."""
    from benchmarks.accuracy import case_row, format_row

    case = real_architecture_cases()[0]
    broken = dataclasses.replace(case, model_type="no_such_type")
    row = case_row(broken, {"fits": False, "error": "OutOfMemoryError: fake"}, ["cpu"])
    assert row["cpu_error"].startswith("ValueError") and "no_such_type" in row["cpu_error"]
    assert row["measured_error"] == "OutOfMemoryError: fake" and "cpu_reserved_bytes" not in row
    assert "cpu FAILED ValueError" in format_row(row, ["cpu"])


def test_summary_counts_the_cases_within_five_percent():
    from benchmarks.accuracy import summarize

    rows = [{"cpu_reserved_error": error} for error in (0.01, -0.049, 0.06, -0.2)] + [{"cpu_error": "x"}]
    stats = summarize(rows, "cpu", "reserved")
    assert stats["cases"] == 4 and stats["within_5pct"] == 2 and stats["max_abs_error"] == 0.2
