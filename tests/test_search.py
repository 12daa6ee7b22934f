"""The search walk, driven by a fake predictor and a fake trial: exact sequences, batch kept, margin kept."""

from __future__ import annotations

import dataclasses

import pytest

from memtune.config import GIB, MIB, Adapter, Policy, TrainConfig, liger_available, margin_for
from memtune.errors import UsageError
from memtune.measure.memory import Measurement
from memtune.predict.estimate import Estimate
from memtune.search import ladder
from memtune.search.choose import (
    EXTRAPOLATED,
    FITS,
    NOT_EVALUATED,
    SKIPPED,
    TOO_BIG,
    TRIAL_OOM,
    VERIFIED,
    extrapolate,
    needs_at_least,
    search,
)
from memtune.search.ladder import candidate_space, settings


def short(config: TrainConfig) -> str:
    """h/b/f = bf16 weights/bf16-mixed/fp32, c = checkpointing, k = chunked loss, L = LoRA, then the micro-batch."""
    return (
        ("h" if config.weights_dtype == "bf16" else "b" if config.amp == "bf16" else "f")
        + ("c" if config.gradient_checkpointing else "")
        + ("k" if config.loss == "chunked" else "")
        + ("L" if config.adapter else "")
        + str(config.micro_batch_size)
    )


class FakePredictor:
    """Memory in GiB: model state + activations per sequence; speed: bf16 2x fp32, checkpointing 0.7x,
    micro-batch m runs at m/(m+1) of full speed. Records the order of memory predictions."""

    def __init__(self, state_gib: float = 6.0, lora_state_gib: float = 1.0):
        self.state_gib = state_gib
        self.lora_state_gib = lora_state_gib
        self.calls: list[str] = []

    def state(self, config: TrainConfig) -> float:
        half = config.amp == "bf16" or config.weights_dtype == "bf16"
        return self.lora_state_gib if config.adapter else self.state_gib - (2 if not half else 0)

    def gib(self, config: TrainConfig) -> float:
        half = config.amp == "bf16" or config.weights_dtype == "bf16"
        state = self.state(config)
        per_sequence = (0.5 if config.gradient_checkpointing else 2.0) * (1 if half else 2)
        return state + per_sequence * config.micro_batch_size

    def memory(self, config: TrainConfig) -> Estimate:
        self.calls.append(short(config))
        size = int(self.gib(config) * GIB)
        state = int(self.state(config) * GIB)
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0,
                        breakdown={"weights": state, "activations": size - state})

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        half = config.amp == "bf16" or config.weights_dtype == "bf16"
        m = config.micro_batch_size
        speed = (2.0 if half else 1.0) * (0.7 if config.gradient_checkpointing else 1.0) * m / (m + 1)
        return speed * (0.9 if config.adapter else 1.0) * (0.95 if config.loss == "chunked" else 1.0)


class FakeTrial:
    """A trial that runs out of memory for the configurations named in `oom`."""

    def __init__(self, oom: set[str] = frozenset(), measured_gib: float | None = None):
        self.oom = oom
        self.measured_gib = measured_gib
        self.calls: list[str] = []

    def __call__(self, config: TrainConfig) -> Measurement:
        self.calls.append(short(config))
        if short(config) in self.oom:
            return Measurement(fits=False, error="CUDA out of memory. Tried to allocate 2.00 GiB")
        peak = int((self.measured_gib or FakePredictor().gib(config)) * GIB)
        return Measurement(fits=True, peak_reserved_bytes=peak, step_seconds=[0.2, 0.1],
                           tokens_per_step=config.effective_batch_size * config.seq_len)


SIMPLE = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                allow_8bit_optimizer=False, allow_pure_16bit=False, expandable_segments=False,
                offload_activations=False)
"""The walks below count predictions: the allocator's mode and the activation offload are pinned (FakePredictor
gives both ways the same memory; test_the_allocator_mode_is_tried_when_the_default_does_not_fit covers the mode,
tests/test_activation_offload.py the offload)."""


def test_walks_candidates_fastest_first_and_stops_at_the_first_that_fits():
    predictor = FakePredictor()
    result = search(
        predictor, seq_len=512, effective_batch_size=4, budget_bytes=int(7.5 * GIB), policy=SIMPLE, explain=False
    )
    # Ranked: b4 1.6, b2 1.33, bc4 1.12, b1 1.0, bc2 0.93, ...; memory 14, 10, 8, 8, 7 GiB against 7.5.
    assert predictor.calls == ["b4", "b2", "bc4", "b1", "bc2"]
    assert short(result.chosen.config) == "bc2"
    assert result.chosen.status == FITS  # no trial function: predicted only
    assert [c.status for c in result.candidates[:5]] == [TOO_BIG] * 4 + [FITS]
    assert all(c.status == NOT_EVALUATED for c in result.candidates[5:])
    assert result.estimates == 5 and result.trials == 0


def test_clearly_too_big_micro_batches_are_extrapolated_not_traced():
    predictor = FakePredictor()
    result = search(
        predictor, seq_len=512, effective_batch_size=8, budget_bytes=int(7.5 * GIB), policy=SIMPLE, explain=False
    )
    # Ranked: b8, b4, b2, bc8, bc4, b1, bc2. b2 (accumulating) is extrapolated from b4, the nearest traced
    # micro-batch that also accumulates: 6 + 2*2 = 10 GiB > 1.10 x 7.5. b8 (no accumulation) is not used for it.
    assert predictor.calls == ["b8", "b4", "bc8", "bc4", "b1", "bc2"]
    assert next(c for c in result.candidates if short(c.config) == "b2").status == EXTRAPOLATED
    assert short(result.chosen.config) == "bc2" and result.chosen.config.grad_accum_steps == 4


def test_extrapolation_uses_two_traced_micro_batches_and_counts_fragmentation_as_growing():
    def traced(micro: int, total_gib: float, overhead_gib: float) -> Estimate:
        config = TrainConfig(seq_len=512, micro_batch_size=micro, grad_accum_steps=16 // micro)
        total = int(total_gib * GIB)
        breakdown = {"weights": 4 * GIB, "overhead": int(overhead_gib * GIB), "activations": total - 4 * GIB}
        return Estimate(config, total, total, workspace_bytes=0, context_bytes=0, breakdown=breakdown)

    # One traced micro-batch: weights fixed, everything else (overhead included) scaled: 4 + (20 - 4) / 2.
    assert extrapolate([traced(8, 20, 6)], 4) == (12 * GIB, "from micro-batch 8")
    # Two: the line through the two nearest micro-batches, 2 and 8 (a constant temporary stays constant).
    bytes_, source = extrapolate([traced(16, 36, 10), traced(8, 20, 6), traced(2, 9, 1)], 4)
    assert source == "from micro-batches 2 and 8"
    assert bytes_ == int(9 * GIB + (20 - 9) * GIB / 6 * 2)


def test_every_candidate_keeps_the_effective_batch():
    for config in candidate_space(1024, 24, Policy(num_gpus=2), with_adapter=False):
        assert config.micro_batch_size * config.grad_accum_steps * config.num_gpus == 24
    assert {c.micro_batch_size for c in candidate_space(1024, 24, Policy(), False)} == {1, 2, 3, 4, 6, 8, 12, 24}
    assert {c.micro_batch_size for c in candidate_space(1024, 24, Policy(min_micro_batch_size=4), False)} == {
        4,
        6,
        8,
        12,
        24,
    }


def test_a_trial_oom_falls_back_to_the_next_candidate():
    predictor, trial = FakePredictor(), FakeTrial(oom={"bc2"})
    result = search(predictor, 512, 4, int(7.5 * GIB), SIMPLE, trial=trial, explain=False)
    # bc2 is predicted to fit but runs out of memory; f4 (20 GiB) is too big; bc1 (6.5 GiB) is verified. f2, within
    # 10% of bc1's speed (0.67 vs 0.70), is not looked at: after an OOM no runner-up is measured (`measure_both`).
    assert predictor.calls == ["b4", "b2", "bc4", "b1", "bc2", "f4", "bc1"]
    assert trial.calls == ["bc2", "bc1"]
    assert short(result.chosen.config) == "bc1" and result.chosen.status == VERIFIED
    assert result.trials == 2 and result.trial_ooms == 1
    assert next(c for c in result.candidates if short(c.config) == "bc2").status == TRIAL_OOM
    assert result.chosen.config.grad_accum_steps == 4
    assert result.throughput_error is not None


def test_the_trial_limit_is_respected():
    trial = FakeTrial(oom={"bc2", "bc1", "fc1"})
    result = search(
        FakePredictor(state_gib=6.0),
        512,
        4,
        int(7.5 * GIB),
        Policy(**{**SIMPLE.__dict__, "max_trials": 2}),
        trial=trial,
        explain=False,
    )
    assert trial.calls == ["bc2", "bc1"]
    assert result.chosen is not None and result.chosen.status == FITS and "limit of 2 trials" in result.chosen.note


def test_the_margin_is_respected():
    # bc2 needs 7 GiB: it fits 7.5 GiB with no margin but not with 1 GiB kept free.
    result = search(
        FakePredictor(), 512, 4, int(7.5 * GIB), Policy(**{**SIMPLE.__dict__, "margin_bytes": GIB}), explain=False
    )
    assert short(result.chosen.config) == "bc1"
    assert result.chosen.predicted_total_bytes <= result.budget_bytes - result.margin_bytes
    assert margin_for(100 * GIB, Policy()) == 2 * GIB  # 2% by default
    assert margin_for(2 * GIB, Policy()) == 256 * MIB  # but at least 256 MiB


def test_pinned_options_are_kept():
    predictor = FakePredictor()
    policy = Policy(**{**SIMPLE.__dict__, "precision": "fp32", "gradient_checkpointing": True})
    result = search(predictor, 512, 4, 20 * GIB, policy, explain=False)
    assert predictor.calls == ["fc4"]
    assert all(c.config.precision == "fp32" and c.config.gradient_checkpointing for c in result.candidates)


def test_adapters_only_when_nothing_else_fits():
    # Full fine-tuning never fits 4 GiB (state 6 GiB); LoRA (1 GiB state) does.
    predictor = FakePredictor()
    policy = Policy(allow_offload=False, allow_chunked_loss=False, margin_bytes=0, allow_8bit_optimizer=False,
                    expandable_segments=False)
    result = search(predictor, 512, 4, 4 * GIB, policy, explain=False)
    full = [call for call in predictor.calls if "L" not in call]
    assert full and all(
        c.config.adapter is None for c in result.candidates[: len(candidate_space(512, 4, policy, False))]
    )
    assert result.chosen.config.adapter == Adapter()
    # A bf16-stored base (h) ties with bf16-mixed (b) in speed and comes first: L4 needs 1 + 2*4 = 9 GiB,
    # L2 5 GiB, cL4 3 GiB.
    assert predictor.calls[len(full):] == ["hL4", "bL4", "hL2", "bL2", "hcL4"]
    # ...and when it fits without, LoRA is never tried.
    predictor = FakePredictor()
    search(predictor, 512, 4, 20 * GIB, policy, explain=False)
    assert all("L" not in call for call in predictor.calls)


def test_no_lora_policy_and_nothing_fits_gives_the_shortfall():
    predictor = FakePredictor()
    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=256 * MIB)
    result = search(predictor, 512, 4, 5 * GIB, policy, explain=False)
    assert result.chosen is None
    assert all(c.config.adapter is None for c in result.candidates)
    smallest = min(c.predicted_total_bytes for c in result.candidates if c.estimate is not None)
    assert smallest == 5 * GIB  # fp32 (less state in this fake), checkpointing, micro-batch 1
    assert result.shortfall_bytes == smallest + 256 * MIB - 5 * GIB
    assert any("LoRA" in s for s in result.suggestions)
    assert any("--seq-len" in s or "GPU" in s for s in result.suggestions)


def test_alternatives_explain_the_choice():
    result = search(FakePredictor(), 512, 4, int(7.5 * GIB), SIMPLE, explain=True)
    changes = {a.change: a for a in result.alternatives}
    assert short(result.chosen.config) == "bc2"
    assert not changes["no gradient accumulation (micro-batch 4)"].fits
    assert not changes["- gradient checkpointing"].fits
    fp32 = changes["fp32 instead of bf16-mixed"]
    assert fp32.predicted_tokens_per_second < result.chosen.predicted_tokens_per_second


def test_an_alternative_that_cannot_be_traced_leaves_the_choice_and_a_note():
    """A trace failure while explaining the winner (e.g. an optimizer FSDP cannot run, traced for the
    '+ CPU offload' row) costs that row, not the plan."""

    class Untraceable(FakePredictor):
        def memory(self, config: TrainConfig) -> Estimate:
            if config.gradient_checkpointing and config.micro_batch_size == 2 and config.amp == "none":
                raise UsageError("memtune cannot trace a training step of model type 'x': the cpu trace failed")
            return super().memory(config)

    result = search(Untraceable(), 512, 4, int(7.5 * GIB), SIMPLE, explain=True)
    assert short(result.chosen.config) == "bc2"
    changes = {a.change for a in result.alternatives}
    assert "fp32 instead of bf16-mixed" not in changes and "- gradient checkpointing" in changes
    assert any("'fp32 instead of bf16-mixed' was not predicted" in note for note in result.notes)


def test_fallbacks_need_no_more_memory_than_the_winner():
    result = search(FakePredictor(), 512, 8, 12 * GIB, SIMPLE, explain=False)
    chosen = result.chosen.config
    assert result.fallbacks
    for config in result.fallbacks:
        assert needs_at_least(chosen, config) and config.effective_batch_size == chosen.effective_batch_size


def test_needs_at_least():
    base = TrainConfig(seq_len=512, micro_batch_size=4, amp="bf16")
    assert needs_at_least(base, base.replace(micro_batch_size=2))
    assert needs_at_least(base, base.replace(gradient_checkpointing=True))
    assert needs_at_least(base, base.replace(loss="chunked", offload="parameters"))
    assert not needs_at_least(base.replace(gradient_checkpointing=True), base)
    assert not needs_at_least(base, base.replace(micro_batch_size=8))
    assert not needs_at_least(base, base.replace(amp="none"))  # other precision: not comparable


def test_bad_policies_are_refused_with_every_problem():
    with pytest.raises(UsageError) as error:
        search(FakePredictor(), 512, 6, GIB, Policy(micro_batch_size=4, precision="bf16-mixed", bf16_supported=False))
    message = str(error.value)
    assert "does not divide the batch 6" in message and "needs bf16" in message


def test_offload_candidates_come_with_either_loss():
    """The chunked loss is the model's forward, which FSDP's root module calls: it runs with CPU offload too."""
    configs = candidate_space(1024, 8, Policy(), with_adapter=False)
    assert {c.loss for c in configs if c.offload == "parameters"} == {"standard", "chunked"}


# ---- several GPUs: a replica per GPU (DDP) or FSDP sharding ---------------------------------------------


class ShardingPredictor(FakePredictor):
    """FakePredictor's memory per GPU under DDP (a full replica, plus 1 GiB of gradient buckets); under
    FSDP state / N plus 1 GiB of gathered units; DDP runs 1.3x the tokens/s of FSDP."""

    def gib(self, config: TrainConfig) -> float:
        replica = super().gib(config)
        if config.num_gpus == 1:
            return replica
        if config.strategy == "ddp":
            return replica + 1.0
        return replica - self.state(config) * (1 - 1 / config.num_gpus) + 1.0

    def tokens_per_second(self, config: TrainConfig) -> float:
        return super().tokens_per_second(config) * (1.3 if config.strategy == "ddp" else 1.0)

    def memory(self, config: TrainConfig) -> Estimate:
        estimate = super().memory(config)
        self.calls[-1] = ("D" if config.strategy == "ddp" else "F") + self.calls[-1]
        return estimate


TWO_GPUS = Policy(**{**SIMPLE.__dict__, "num_gpus": 2})


def test_several_gpus_offer_ddp_without_offload_and_fsdp_with_everything_both_with_either_loss():
    configs = candidate_space(1024, 8, Policy(num_gpus=2), with_adapter=False)
    ddp = [c for c in configs if c.strategy == "ddp"]
    assert ddp and all(c.offload == "none" for c in ddp)
    assert any(c.strategy == "fsdp" and c.offload == "parameters" for c in configs)
    liger = {"liger"} if liger_available() else set()  # Liger's fused loss: where installed, one GPU or DDP only
    for strategy, offload, extra in (("ddp", "none", liger), ("fsdp", "none", set()), ("fsdp", "parameters", set())):
        assert {c.loss for c in configs if (c.strategy, c.offload) == (strategy, offload)} == {"standard", "chunked",
                                                                                                 *extra}
    assert {(c.micro_batch_size, c.gradient_checkpointing, c.precision) for c in ddp} == {
        (c.micro_batch_size, c.gradient_checkpointing, c.precision)
        for c in configs
        if c.strategy == "fsdp" and c.offload == "none"
    }
    assert {c.strategy for c in candidate_space(1024, 8, Policy(), with_adapter=False)} == {
        "fsdp"
    }  # one GPU: no choice
    assert {c.strategy for c in candidate_space(1024, 8, Policy(num_gpus=2, strategy="fsdp"), False)} == {"fsdp"}


def test_ddp_is_chosen_when_a_replica_fits():
    predictor = ShardingPredictor()
    result = search(predictor, 512, 4, 20 * GIB, TWO_GPUS, explain=True)
    assert predictor.calls[0] == "Db2"
    assert result.chosen.config.strategy == "ddp" and result.chosen.config.describe().endswith("2 GPUs, DDP")
    changes = {a.change: a for a in result.alternatives}
    fsdp = changes["FSDP instead of DDP (shards the model state)"]
    assert fsdp.fits and fsdp.config.strategy == "fsdp"
    assert fsdp.predicted_total_bytes < result.chosen.predicted_total_bytes
    assert fsdp.predicted_tokens_per_second < result.chosen.predicted_tokens_per_second
    assert all(c.strategy == "ddp" for c in result.fallbacks)  # the OOM guard never switches strategy mid-run


def test_fsdp_is_chosen_when_only_sharding_fits():
    predictor = ShardingPredictor()
    result = search(predictor, 512, 4, 7 * GIB, TWO_GPUS, explain=True)
    # Ranked: Db2 1.73 (11 GiB), Fb2 1.33 (8), Db1 1.3 (9), Dbc2 1.21 (8), Fb1 1.0 (6): DDP never fits 7 GiB.
    assert predictor.calls[:5] == ["Db2", "Fb2", "Db1", "Dbc2", "Fb1"]
    assert result.chosen.config.strategy == "fsdp" and result.chosen.config.micro_batch_size == 1
    assert result.chosen.config.grad_accum_steps == 2 and result.chosen.config.effective_batch_size == 4
    ddp = next(a for a in result.alternatives if a.change.startswith("DDP instead of FSDP"))
    assert not ddp.fits and ddp.config.strategy == "ddp"


class ChunkedLossPredictor(ShardingPredictor):
    """ShardingPredictor where the chunked loss saves 2 GiB (the logits of a large vocabulary)."""

    def gib(self, config: TrainConfig) -> float:
        return super().gib(config) - (2.0 if config.loss == "chunked" else 0.0)


def test_two_gpus_choose_ddp_with_the_chunked_loss_when_only_it_fits_a_replica():
    predictor = ChunkedLossPredictor()
    policy = Policy(**{**TWO_GPUS.__dict__, "allow_chunked_loss": True})
    # DDP bf16 micro-batch 2: 11 GiB with the standard loss, 9 GiB chunked; FSDP fits 9 GiB too, but runs slower.
    result = search(predictor, 512, 4, 9 * GIB, policy, explain=True)
    chosen = result.chosen.config
    assert (chosen.strategy, chosen.loss, chosen.micro_batch_size) == ("ddp", "chunked", 2)
    assert chosen.describe().endswith("chunked loss, 2 GPUs, DDP")
    standard = next(a for a in result.alternatives if a.change == "- chunked loss")
    assert not standard.fits and standard.config == chosen.replace(loss="standard")


def test_cpu_offload_keeps_the_chunked_loss():
    chosen = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", loss="chunked")
    change, flipped = ladder.Offload().flip(chosen, Policy(), 2)
    assert change == "+ CPU offload" and flipped == chosen.replace(offload="parameters")
    change, back = ladder.Loss().flip(flipped, Policy(), 2)
    assert change == "- chunked loss" and back == flipped.replace(loss="standard")


def test_a_too_big_strategy_implies_nothing_about_the_other():
    ddp = TrainConfig(seq_len=512, micro_batch_size=4, amp="bf16", num_gpus=2, strategy="ddp")
    fsdp = ddp.replace(strategy="fsdp")
    assert not needs_at_least(ddp, fsdp) and not needs_at_least(fsdp, ddp)
    assert needs_at_least(ddp, ddp.replace(micro_batch_size=2))


def test_pinned_strategy_is_kept_and_contradictions_are_refused():
    predictor = ShardingPredictor()
    result = search(predictor, 512, 4, 20 * GIB, Policy(**{**TWO_GPUS.__dict__, "strategy": "fsdp"}), explain=True)
    assert all(c.config.strategy == "fsdp" for c in result.candidates)
    assert result.alternatives and all(a.config.strategy == "fsdp" for a in result.alternatives)
    with pytest.raises(UsageError) as error:
        search(predictor, 512, 4, GIB, Policy(strategy="ddp", offload="parameters", loss="chunked"))
    message = str(error.value)
    assert "needs --gpus 2 or more" in message and "cannot offload" in message
    assert "loss" not in message  # the chunked loss runs under DDP


def test_choose_strategy_takes_the_faster_that_fits():
    from memtune.search.choose import choose_strategy

    config = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", num_gpus=2)
    chosen, estimate, why = choose_strategy(ShardingPredictor(), config, 20 * GIB, margin_bytes=0)
    assert chosen.strategy == "ddp" and estimate.config == chosen and "faster that fits" in why
    chosen, _, why = choose_strategy(ShardingPredictor(), config, 9 * GIB, margin_bytes=0)  # DDP 11 GiB, FSDP 8 GiB
    assert chosen.strategy == "fsdp" and "DDP 11.00 GiB per GPU (too big)" in why
    predictor = ShardingPredictor()
    chosen, _, why = choose_strategy(predictor, config, None, margin_bytes=0)
    assert chosen.strategy == "fsdp" and predictor.calls == ["Fb2"] and "no budget" in why
    single = config.replace(num_gpus=1)
    assert choose_strategy(ShardingPredictor(), single, GIB, margin_bytes=0)[0] == single


def test_a_paged_optimizer_that_fits_gets_its_speed_once_its_memory_is_known(monkeypatch):
    from memtune.search import ladder

    monkeypatch.setattr(ladder, "require_extra", lambda name: None)

    class Settling(FakePredictor):
        def settled_tokens_per_second(self, estimate, usable_bytes):
            return 123.0 if estimate.config.optimizer == "paged_adamw_8bit" else -1.0

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    allow_pure_16bit=False, optimizer="paged_adamw_8bit")
    result = search(Settling(), seq_len=512, effective_batch_size=4, budget_bytes=int(7.5 * GIB), policy=policy,
                    explain=False)
    assert result.chosen.config.optimizer == "paged_adamw_8bit" and result.chosen.predicted_tokens_per_second == 123.0


class ModePredictor(FakePredictor):
    """FakePredictor whose default allocator strands 1.5 GiB between blocks and expandable segments none: the same
    allocations (peak allocated), 1.5 GiB less reserved."""

    def gib(self, config: TrainConfig) -> float:
        return super().gib(config) - (1.5 if config.expandable_segments else 0.0)

    def memory(self, config: TrainConfig) -> Estimate:
        estimate = super().memory(config)
        allocated = estimate.peak_reserved_bytes - (0 if config.expandable_segments else int(1.5 * GIB))
        return dataclasses.replace(estimate, peak_allocated_bytes=allocated)


def test_the_allocator_mode_is_tried_when_the_default_does_not_fit():
    policy = dataclasses.replace(SIMPLE, expandable_segments=None)
    predictor = ModePredictor()
    # b4 14 GiB, b2 10, bc4 8, b1 8, bc2 7 (default mode); each 1.5 GiB less with expandable segments. b4's and b2's
    # allocations alone are over 7.5 GiB: their twins are not traced; bc4's (6.5 GiB) is, and fits.
    result = search(predictor, seq_len=512, effective_batch_size=4, budget_bytes=int(7.5 * GIB), policy=policy,
                    explain=False)
    assert predictor.calls == ["b4", "b2", "bc4", "bc4"]
    skipped = [c for c in result.candidates if c.config.expandable_segments and c.status == SKIPPED]
    assert [short(c.config) for c in skipped] == ["b4", "b2"] and "whichever the allocator's mode" in skipped[0].note
    assert short(result.chosen.config) == "bc4" and result.chosen.config.expandable_segments
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in " ".join(settings(result.chosen.config))
    both_fit = search(ModePredictor(), 512, 4, 20 * GIB, policy, explain=False)
    assert both_fit.chosen is not None and not both_fit.chosen.config.expandable_segments


def test_options_that_cannot_run_together_raise_before_any_note():
    said: list[str] = []
    with pytest.raises(UsageError, match="these options cannot run together: FSDP cannot shard or offload"):
        search(FakePredictor(), 512, 4, 8 * GIB, Policy(optimizer="adafactor", offload="parameters"),
               explain=False, progress=said.append)
    assert said == []  # no "skipped" line ahead of the error (a fresh-user trial found one)


# -- too close to call: measure both -----------------------------------------------------------------------------


class SpeedTrial(FakeTrial):
    """A trial that fits (FakePredictor's memory) and measures the tokens/s named in `speeds` (by `short`)."""

    def __init__(self, speeds: dict[str, float], oom: set[str] = frozenset()):
        super().__init__(oom=oom)
        self.speeds = speeds

    def __call__(self, config: TrainConfig) -> Measurement:
        measurement = super().__call__(config)
        if measurement.fits:
            tokens = config.effective_batch_size * config.seq_len
            measurement.tokens_per_step = tokens
            measurement.step_seconds = [1.0, tokens / self.speeds[short(config)]]
        return measurement


WIDE_BAND = 0.3
"""FakePredictor ranks bc2 (0.93), f4 (0.80), bc1 (0.70), f2 (0.67): within 30% of bc2, f4 is too big (20 GiB) and
bc1 (6.5 GiB) fits 7.5 GiB: the runner-up."""


@pytest.fixture
def wide_band(monkeypatch):
    from memtune.predict import throughput

    monkeypatch.setattr(throughput, "SPEED_ERROR_BAND", WIDE_BAND, raising=False)


def test_too_close_to_call_both_are_measured_and_the_faster_measured_is_chosen(wide_band):
    predictor, trial = FakePredictor(), SpeedTrial({"bc2": 9_000.0, "bc1": 10_000.0})
    result = search(predictor, 512, 4, int(7.5 * GIB), SIMPLE, trial=trial, explain=False)
    assert predictor.calls == ["b4", "b2", "bc4", "b1", "bc2", "f4", "bc1"]
    assert trial.calls == ["bc2", "bc1"] and result.trials == 2 and result.trial_ooms == 0
    bc2 = next(c for c in result.candidates if short(c.config) == "bc2")
    assert short(result.chosen.config) == "bc1" and result.chosen.status == VERIFIED and bc2.status == VERIFIED
    assert result.measured_both == [result.chosen, bc2]
    assert result.chosen.note.startswith("measured faster: 10,000 tokens/s measured, 9,000 for")
    assert bc2.note.startswith("measured slower: 9,000 tokens/s measured, 10,000 for")
    assert result.to_dict()["measured_both"][0]["config"] == result.chosen.config.to_dict()


def test_too_close_to_call_keeps_the_leader_when_it_is_measured_faster(wide_band):
    trial = SpeedTrial({"bc2": 10_000.0, "bc1": 9_000.0})
    result = search(FakePredictor(), 512, 4, int(7.5 * GIB), SIMPLE, trial=trial, explain=False)
    assert trial.calls == ["bc2", "bc1"]
    assert short(result.chosen.config) == "bc2" and [short(c.config) for c in result.measured_both] == ["bc2", "bc1"]


def test_a_runner_up_that_runs_out_of_memory_leaves_the_leader(wide_band):
    trial = SpeedTrial({"bc2": 9_000.0}, oom={"bc1"})
    result = search(FakePredictor(), 512, 4, int(7.5 * GIB), SIMPLE, trial=trial, explain=False)
    assert trial.calls == ["bc2", "bc1"] and result.trial_ooms == 1
    assert short(result.chosen.config) == "bc2" and result.chosen.status == VERIFIED and not result.measured_both
    assert next(c for c in result.candidates if short(c.config) == "bc1").status == TRIAL_OOM


def test_measuring_both_stays_within_the_trial_limit(wide_band):
    trial = SpeedTrial({"bc2": 9_000.0, "bc1": 10_000.0})
    policy = dataclasses.replace(SIMPLE, max_trials=1)
    result = search(FakePredictor(), 512, 4, int(7.5 * GIB), policy, trial=trial, explain=False)
    assert trial.calls == ["bc2"] and short(result.chosen.config) == "bc2" and not result.measured_both


def test_without_trials_or_outside_the_band_the_prediction_decides(wide_band, monkeypatch):
    from memtune.predict import throughput

    predictor = FakePredictor()
    result = search(predictor, 512, 4, int(7.5 * GIB), SIMPLE, explain=False)  # no trial: nothing more is traced
    assert predictor.calls == ["b4", "b2", "bc4", "b1", "bc2"] and short(result.chosen.config) == "bc2"
    monkeypatch.setattr(throughput, "SPEED_ERROR_BAND", 0.05)  # f4 (0.80) is 14% below bc2 (0.93): not close
    predictor, trial = FakePredictor(), SpeedTrial({"bc2": 9_000.0, "bc1": 10_000.0})
    result = search(predictor, 512, 4, int(7.5 * GIB), SIMPLE, trial=trial, explain=False)
    assert predictor.calls == ["b4", "b2", "bc4", "b1", "bc2"] and trial.calls == ["bc2"]
    assert short(result.chosen.config) == "bc2" and not result.measured_both


def test_the_speed_error_band_defaults_until_the_speed_model_states_one(monkeypatch):
    from memtune.predict import throughput
    from memtune.search.choose import DEFAULT_SPEED_ERROR_BAND, speed_error_band

    monkeypatch.delattr(throughput, "SPEED_ERROR_BAND", raising=False)
    assert speed_error_band() == DEFAULT_SPEED_ERROR_BAND == 0.10
    monkeypatch.setattr(throughput, "SPEED_ERROR_BAND", 0.15, raising=False)
    assert speed_error_band() == 0.15


# -- the extrapolation rule ----------------------------------------------------------------------------------------


class LinePredictor(FakePredictor):
    """Memory 8 GiB + 1 GiB per sequence, all of it in "activations" (so the one-point extrapolation, which scales
    all but the fixed categories, underestimates a smaller micro-batch); larger micro-batches are faster."""

    def gib(self, config: TrainConfig) -> float:
        return 8.0 + config.micro_batch_size

    def memory(self, config: TrainConfig) -> Estimate:
        self.calls.append(str(config.micro_batch_size))
        size = int(self.gib(config) * GIB)
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"activations": size})


ONE_FAMILY = dataclasses.replace(SIMPLE, precision="bf16-mixed", gradient_checkpointing=False)


@pytest.mark.parametrize(("budget_gib", "margin_gib", "traced", "chosen"), [
    # usable 9.25: micro-batch 2 is 10 GiB on the line through 4 (12) and 8 (16), over the 9.75 budget: not traced
    # (under the one-point slack, 1.10 x 9.25 = 10.2 GiB, it would be)
    (9.75, 0.5, ["16", "8", "4", "1"], 1),
    # usable 9.75: 10 GiB is within the margin of the 10.25 budget: traced (too big), then 1 (9 GiB) fits
    (10.25, 0.5, ["16", "8", "4", "2", "1"], 1),
])
def test_a_third_micro_batch_is_traced_only_within_the_margin_of_the_budget(budget_gib, margin_gib, traced, chosen):
    predictor = LinePredictor()
    policy = dataclasses.replace(ONE_FAMILY, margin_bytes=int(margin_gib * GIB))
    result = search(predictor, 512, 16, int(budget_gib * GIB), policy, explain=False)
    # 16 (24 GiB) is a family of its own (no accumulation); 8 is the first of 8, 4, 2, 1 (accumulating); 4 is
    # extrapolated from 8 alone to 8 GiB (under 1.10 x usable: traced, 12 GiB); from then on two points.
    assert predictor.calls == traced
    assert result.chosen.config.micro_batch_size == chosen
    two_point = [c for c in result.candidates if c.status == EXTRAPOLATED]
    assert all("from micro-batches 4 and 8" in c.note for c in two_point)


def test_the_extrapolation_limit_is_the_budget_with_two_traced_micro_batches_and_a_slack_with_one():
    from memtune.search.choose import EXTRAPOLATION_SLACK, SearchResult, extrapolation_limit

    result = SearchResult(512, 16, budget_bytes=10 * GIB, margin_bytes=GIB)
    assert extrapolation_limit(2, result) == 10 * GIB == extrapolation_limit(3, result)
    assert extrapolation_limit(1, result) == EXTRAPOLATION_SLACK * 9 * GIB


# -- the explanation, after the choice -----------------------------------------------------------------------------


def test_the_explanation_can_come_after_the_search_and_reuses_its_traces():
    from memtune.search.choose import explain_choice

    predictor = FakePredictor()
    result = search(predictor, 512, 4, int(7.5 * GIB), SIMPLE, explain=False)
    searched, traced = result.seconds, list(predictor.calls)
    assert result.alternatives == [] and result.explain_seconds == 0.0
    explain_choice(result, predictor, SIMPLE)
    assert result.alternatives and result.explain_seconds > 0
    assert result.seconds == pytest.approx(searched + result.explain_seconds)
    already = [c for c in traced if c in {short(a.config) for a in result.alternatives}]
    assert already and not set(already) & set(predictor.calls[len(traced):])  # not traced again
    calls, alternatives = len(predictor.calls), list(result.alternatives)
    explain_choice(result, predictor, SIMPLE)  # twice: nothing more
    assert len(predictor.calls) == calls and result.alternatives == alternatives


def test_an_allocator_twin_of_the_leader_is_not_measured_as_its_runner_up(monkeypatch):
    """bc2 with expandable segments is predicted as fast as bc2 (the same kernels): not a second opinion worth a
    trial (`choose.techniques`); nothing else is within a 10% band (f4: 0.80 against 0.93)."""
    from memtune.predict import throughput

    monkeypatch.setattr(throughput, "SPEED_ERROR_BAND", 0.10, raising=False)
    predictor, trial = FakePredictor(), SpeedTrial({"bc2": 9_000.0})
    policy = dataclasses.replace(SIMPLE, expandable_segments=None)
    result = search(predictor, 512, 4, int(7.5 * GIB), policy, trial=trial, explain=False)
    assert trial.calls == ["bc2"] and not result.chosen.config.expandable_segments and not result.measured_both
    twin = next(c for c in result.candidates if c.config == result.chosen.config.replace(expandable_segments=True))
    assert twin.status == NOT_EVALUATED


def test_the_other_allocator_mode_is_extrapolated_from_the_default_modes_allocations():
    """Micro-batch 2 with expandable segments has no trace of its own mode, and its default-allocator twin was
    extrapolated, not traced: the line through the default mode's allocations (a floor for either mode) is over the
    budget, so it is not traced either."""
    predictor = LinePredictor()
    policy = dataclasses.replace(ONE_FAMILY, margin_bytes=GIB // 2, expandable_segments=None)
    result = search(predictor, 512, 16, int(9.75 * GIB), policy, explain=False)
    assert predictor.calls == ["16", "8", "4", "1"]
    twin = next(c for c in result.candidates
                if c.config.micro_batch_size == 2 and c.config.expandable_segments)
    assert twin.status == EXTRAPOLATED and "whichever the allocator's mode, from micro-batches 4 and 8" in twin.note


def test_the_fewest_checkpointed_layers_are_guessed_from_the_line_through_known_points():
    """Memory is affine in the layers checkpointed: with k = 0 and k = L predicted, the line's crossing of the budget
    and its neighbour settle the fewest that fit (2 predictions, where the bisection took log2(L))."""
    from memtune.search.choose import interpolated_layers

    gib = {0: 26 * GIB, 16: 10 * GIB}  # 10 GiB + 1 GiB per layer not checkpointed
    assert interpolated_layers(gib, 0, 16, int(20.5 * GIB)) == 6  # 10 + 10 = 20 GiB fits, 5 layers: 21 GiB
    assert interpolated_layers({**gib, 6: 20 * GIB}, 0, 6, int(20.5 * GIB)) == 5  # kept inside the interval
    assert interpolated_layers({16: 10 * GIB}, 0, 16, int(20.5 * GIB)) is None  # one point: bisect
    assert interpolated_layers({0: 10 * GIB, 16: 10 * GIB}, 0, 16, int(20.5 * GIB)) is None  # not falling

    class Layered:
        num_layers = 16

        def __init__(self) -> None:
            self.calls: list[int] = []

        def memory(self, config: TrainConfig) -> Estimate:
            k = config.checkpointed_layers(self.num_layers)
            self.calls.append(k)
            size = int((10 + 1.02 * (self.num_layers - k)) * GIB)  # not quite affine: the guess is checked
            return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"activations": size})

        def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
            return estimate.total_bytes <= usable_bytes

        def tokens_per_second(self, config: TrainConfig) -> float:
            return 1.0 - 0.02 * config.checkpointed_layers(self.num_layers)

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    allow_8bit_optimizer=False, allow_pure_16bit=False, precision="fp32", micro_batch_size=1,
                    expandable_segments=False)
    predictor = Layered()
    result = search(predictor, 1024, 1, int(20.5 * GIB), policy, explain=False)
    assert result.chosen is not None and result.chosen.config.checkpoint_layers == 6  # 20.2 GiB; 5: 21.2 GiB
    assert predictor.calls == [0, 16, 6, 5]
