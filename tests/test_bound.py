"""The state lower bound (memtune/predict/bound.py) under the traced peak, and the search skipping what it rules
out without a trace."""

from __future__ import annotations

import pytest

from memtune.config import GIB, Adapter, Policy, Quantization, TrainConfig
from memtune.predict import throughput
from memtune.predict.bound import state_lower_bound
from memtune.predict.estimate import Estimate, estimate
from memtune.search.choose import STATE_ALONE, search
from memtune.sources import parameter_count

BASE = TrainConfig(seq_len=32, micro_batch_size=2)
CONFIGS = {
    "fp32": BASE,
    "bf16-mixed": BASE.replace(amp="bf16"),
    "pure bf16": BASE.replace(weights_dtype="bf16"),
    "foreach adamw": BASE.replace(amp="bf16", optimizer="adamw_torch"),
    "adafactor": BASE.replace(amp="bf16", optimizer="adafactor"),
    "lora": BASE.replace(weights_dtype="bf16", amp="bf16", adapter=Adapter()),
    "fsdp 2 gpus": BASE.replace(amp="bf16", micro_batch_size=1, num_gpus=2),
    "ddp 2 gpus": BASE.replace(amp="bf16", micro_batch_size=1, num_gpus=2, strategy="ddp"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_state_bound_is_under_the_traced_peak_allocated(name):
    from benchmarks.cases import tiny_llama

    model_config = tiny_llama(2)
    config = CONFIGS[name]
    shape = throughput.ModelShape.of(model_config, parameter_count(model_config))
    bound = state_lower_bound(shape, config)
    peak = estimate(model_config, config, device="cpu").peak_allocated_bytes
    assert 0 < bound <= peak, (bound, peak)
    if config.adapter is None and config.num_gpus == 1 and config.optimizer != "adafactor":
        assert bound > 0.5 * peak  # the state is most of a small model's step: the bound is not vacuous


def test_offload_and_quantised_bases():
    shape = throughput.ModelShape(num_parameters=7_000_000_000, num_layers=32, hidden_size=4096, vocab_size=32000,
                                  tied_embeddings=False)
    assert state_lower_bound(shape, BASE.replace(amp="bf16", offload="parameters")) == 0  # the state is on the host
    lora = BASE.replace(weights_dtype="bf16", amp="bf16", adapter=Adapter())
    four = state_lower_bound(shape, lora.replace(quantization=Quantization(bits=4)))
    eight = state_lower_bound(shape, lora.replace(quantization=Quantization(bits=8)))
    assert four < eight < state_lower_bound(shape, lora) == 14_000_000_000
    # bf16-mixed full fine-tuning with fused AdamW: 4 + 4 + 8 bytes per parameter; 8-bit AdamW 4 + 4 + 2
    assert state_lower_bound(shape, BASE.replace(amp="bf16")) == 16 * 7_000_000_000
    assert state_lower_bound(shape, BASE.replace(amp="bf16", optimizer="adamw_bnb_8bit")) == 10 * 7_000_000_000


class Bounded:
    """Full fine-tuning needs 20 GiB of state; LoRA 2 GiB plus 1 GiB per sequence."""

    def __init__(self):
        self.traced: list[TrainConfig] = []

    def state_bytes(self, config: TrainConfig) -> int:
        return (2 if config.adapter else 20) * GIB

    def memory(self, config: TrainConfig) -> Estimate:
        self.traced.append(config)
        total = self.state_bytes(config) + config.micro_batch_size * GIB
        return Estimate(config, total, total, workspace_bytes=0, context_bytes=0, breakdown={"weights": total})

    def fits(self, estimate_: Estimate, usable_bytes: int) -> bool:
        return estimate_.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        return float(config.micro_batch_size) * (0.5 if config.adapter else 1.0)


def test_the_search_skips_what_the_state_alone_rules_out_without_tracing_it():
    predictor = Bounded()
    policy = Policy(allow_offload=False, allow_chunked_loss=False, margin_bytes=0, allow_8bit_optimizer=False,
                    allow_pure_16bit=False, allow_quantized_base=False)
    result = search(predictor, seq_len=64, effective_batch_size=4, budget_bytes=8 * GIB, policy=policy,
                    explain=False)
    assert result.chosen is not None and result.chosen.config.adapter is not None
    assert all(config.adapter is not None for config in predictor.traced)  # no full fine-tuning traced
    skipped = [c for c in result.candidates if c.status == STATE_ALONE]
    assert skipped and all(c.config.adapter is None for c in skipped)
    assert "alone need 20.00 GiB" in skipped[0].note


def test_when_the_state_rules_out_everything_the_shortfall_is_its_floor_with_what_would_fit():
    policy = Policy(allow_offload=False, allow_chunked_loss=False, margin_bytes=0, allow_8bit_optimizer=False,
                    allow_pure_16bit=False, allow_quantized_base=False)
    result = search(Bounded(), seq_len=64, effective_batch_size=4, budget_bytes=1 * GIB, policy=policy,
                    explain=False)
    assert result.chosen is None and not result.evaluated
    smallest, need, floor = result.smallest_need()
    assert floor and need == 2 * GIB and smallest.config.adapter is not None
    assert smallest.config.micro_batch_size == 1  # of equal floors, the one that needs least beyond its state
    assert result.shortfall_bytes == 1 * GIB
    assert result.suggestions[0].startswith("a GPU with well over 2.00 GiB (the state alone; check a card with --gpu")
    assert not any("--margin" in line for line in result.suggestions)  # 1 GiB short: no margin closes that
    assert any("drop --no-offload" in line for line in result.suggestions)


def test_pinned_options_that_exclude_each_other_are_a_usage_error_naming_why(monkeypatch):
    from memtune.errors import UsageError
    from memtune.search import ladder

    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(ladder, "require_extra", lambda name: None)
    policy = Policy(optimizer="paged_adamw_8bit", offload="parameters", use_adapter=False)
    with pytest.raises(UsageError, match=r"cannot run together: FSDP cannot shard or offload this optimizer's state"):
        search(Bounded(), seq_len=64, effective_batch_size=4, budget_bytes=8 * GIB, policy=policy, explain=False)


def test_a_fit_over_the_usable_memory_says_why_it_still_fits():
    from memtune.report.words import spare_words

    assert spare_words(10 * GIB, 9 * GIB) == "1.00 GiB to spare"
    assert spare_words(9 * GIB, 10 * GIB).startswith("the peak is 1.00 GiB over it, but it fits: torch's allocator")
