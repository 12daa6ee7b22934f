"""The estimator on tiny models (CPU, fake tensors) and against GPU measurements recorded on an H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memtune.config import Adapter, TrainConfig
from memtune.predict.allocator import simulate
from memtune.predict.estimate import estimate, shallow_config
from memtune.predict.trace import extend, trace_step
from memtune.sources import catalog_config

DATA = Path(__file__).parent / "data"


def tiny_llama(layers: int = 6):
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 128, 256, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 32, 1000
    config.num_hidden_layers = layers
    return config


def test_trace_counts_weights_and_optimizer_state_exactly():
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    trace = trace_step(tiny_llama(3), config, device="cpu")
    from memtune.sources import parameter_count

    params = parameter_count(tiny_llama(3))
    weights = trace.peak_breakdown.get("weights", 0)
    optimizer = trace.peak_breakdown.get("optimizer", 0)
    # fp32 weights; AdamW keeps two fp32 moments per parameter (plus a 4-byte step per tensor, rounded to 512 B).
    assert abs(weights - 4 * params) / (4 * params) < 0.05
    assert 8 * params <= optimizer <= 8 * params * 1.1


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(seq_len=32, micro_batch_size=2),
        TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", gradient_checkpointing=True),
        TrainConfig(seq_len=32, micro_batch_size=2, weights_dtype="bf16", adapter=Adapter(rank=4)),
    ],
    ids=["fp32", "bf16-mixed+ckpt", "bf16+lora"],
)
def test_extending_a_shallow_trace_matches_tracing_every_layer(config):
    full = trace_step(tiny_llama(8), config, device="cpu")
    shallow = trace_step(tiny_llama(3), config, device="cpu")
    extended = extend(shallow, 8)
    assert len(extended) == len(full.events)
    full_result, extended_result = simulate(full.events), simulate(extended)
    assert extended_result.peak_allocated_bytes == full_result.peak_allocated_bytes
    # Tiny tensors live in 2 MiB small-pool segments: allow one segment either way.
    assert abs(extended_result.peak_reserved_bytes - full_result.peak_reserved_bytes) <= 2 * 1024 * 1024


def test_memory_techniques_lower_the_estimate_in_the_expected_order():
    model = tiny_llama(4)
    base = TrainConfig(seq_len=256, micro_batch_size=8)
    full = estimate(model, base, device="cpu")
    checkpointed = estimate(model, base.replace(gradient_checkpointing=True), device="cpu")
    lora = estimate(model, base.replace(adapter=Adapter(rank=4)), device="cpu")
    assert checkpointed.peak_allocated_bytes < full.peak_allocated_bytes
    assert lora.breakdown.get("optimizer", 0) < full.breakdown["optimizer"] / 10
    assert full.total_bytes == full.peak_reserved_bytes + full.workspace_bytes + full.context_bytes
    assert set(full.breakdown) >= {"weights", "optimizer", "activations", "overhead"}


def test_shallow_config_keeps_layer_pattern():
    config = catalog_config("google/gemma-2-2b")
    cut = shallow_config(config, 6)
    assert cut.num_hidden_layers == 6 and len(cut.layer_types) == 6
    assert config.num_hidden_layers == 26  # the original is untouched


def _ground_truth_cases():
    from benchmarks.cases import accuracy_cases

    truth = {row["case"]: row for row in json.loads((DATA / "ground_truth_h200.json").read_text())["cases"]}
    # The gpt2 and Phi-3 cases trace in seconds on two cores; the others run in benchmarks/accuracy.py.
    return [(case, truth[case.name]) for case in accuracy_cases() if case.model in ("gpt2",)]


@pytest.mark.parametrize("case,truth", _ground_truth_cases(), ids=lambda value: getattr(value, "name", ""))
def test_gpu_free_path_matches_h200_measurements(case, truth):
    """GPU-free prediction vs torch.cuda.max_memory_allocated/reserved measured on an H200 (torch 2.11)."""
    from benchmarks.cases import model_config

    predicted = estimate(model_config(case), case.config, device="cpu")
    assert abs(predicted.peak_allocated_bytes / truth["peak_allocated_bytes"] - 1) < 0.02
    assert abs(predicted.peak_reserved_bytes / truth["peak_reserved_bytes"] - 1) < 0.05


def test_a_tied_gradient_sum_is_recorded_in_place():
    """The GPU adds a tied weight's second gradient into the first; fake tensors allocate a new one."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtune.predict.trace import StorageCounter

    def events(in_place: bool) -> list[tuple]:
        counter = StorageCounter()
        counter.accumulate_in_place = {(64, 32)} if in_place else set()
        with FakeTensorMode(), counter:
            first, second = torch.empty(64, 32), torch.empty(64, 32)
            total = first + second
            del first, second
            gc.collect()
            kept = [kind for kind, *_ in counter.trace.events]
            del total
            gc.collect()
        return kept, [kind for kind, *_ in counter.trace.events]

    while_alive, after = events(in_place=True)
    assert while_alive == ["alloc", "alloc", "free"]  # only `second` is gone; `first`'s bytes hold the sum
    assert after == ["alloc", "alloc", "free", "free"]
    while_alive, _ = events(in_place=False)
    assert while_alive == ["alloc", "alloc", "alloc", "free", "free"]
