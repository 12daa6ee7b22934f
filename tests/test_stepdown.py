"""The OOM guard's step-down policy without a Trainer: after each of consecutive OOMs, exactly which
configuration comes next (the pattern of accelerate's tests of find_executable_batch_size, which assert
the exact sequence of batch sizes tried)."""

from __future__ import annotations

import pytest

from memtune.config import Adapter, TrainConfig
from memtune.run.stepdown import (
    FIXED_FIELDS,
    StepDownPolicy,
    chunk_size,
    step_down_ladder,
)

PLAN = TrainConfig(seq_len=8, micro_batch_size=4, grad_accum_steps=2)


def shapes(configs: list[TrainConfig]) -> list[tuple[int, int, bool, str]]:
    """(micro-batch, accumulation, checkpointing, loss) of each configuration."""
    return [(c.micro_batch_size, c.grad_accum_steps, c.gradient_checkpointing, c.loss) for c in configs]


def test_the_ladder_keeps_the_effective_batch() -> None:
    ladder = step_down_ladder(PLAN, loader_micro_batch=4, chunked_loss=True)
    assert shapes(ladder) == [
        (2, 4, False, "standard"), (1, 8, False, "standard"),
        (4, 2, True, "standard"), (2, 4, True, "standard"), (1, 8, True, "standard"),
        (1, 8, True, "chunked"),
    ]
    assert shapes(step_down_ladder(PLAN.replace(gradient_checkpointing=True), loader_micro_batch=4)) == [
        (2, 4, True, "standard"), (1, 8, True, "standard")]


def test_the_plans_fallbacks_come_first_then_the_ladder() -> None:
    fallbacks = (PLAN.replace(micro_batch_size=2, grad_accum_steps=4),
                 PLAN.replace(micro_batch_size=1, grad_accum_steps=8))
    policy = StepDownPolicy(PLAN, fallbacks, can_checkpoint=True)
    assert shapes(policy.step_downs()) == [(2, 4, False, "standard"), (1, 8, False, "standard"),
                                           (1, 8, True, "standard")]


def test_without_fallbacks_the_whole_ladder_down_to_the_chunked_loss() -> None:
    policy = StepDownPolicy(PLAN, can_checkpoint=True, can_switch_loss=True)
    assert shapes(policy.step_downs()) == [(2, 4, False, "standard"), (1, 8, False, "standard"),
                                           (1, 8, True, "standard"), (1, 8, True, "chunked")]


def test_what_the_trainer_cannot_do_is_never_a_step_down() -> None:
    # A model without checkpointing methods, a wrapped model (no chunked loss): only smaller micro-batches.
    with_checkpointing = (PLAN.replace(gradient_checkpointing=True),)
    assert shapes(StepDownPolicy(PLAN, with_checkpointing).step_downs()) == [
        (2, 4, False, "standard"), (1, 8, False, "standard")]
    chunked = (PLAN.replace(micro_batch_size=1, grad_accum_steps=8, loss="chunked"),)
    assert shapes(StepDownPolicy(PLAN, chunked, can_checkpoint=True).step_downs()) == [
        (2, 4, False, "standard"), (1, 8, False, "standard"), (1, 8, True, "standard")]


@pytest.mark.parametrize("field", FIXED_FIELDS)
def test_a_fallback_that_needs_a_new_optimizer_or_a_relaunch_is_skipped(field: str) -> None:
    changed = {"seq_len": 4, "weights_dtype": "bf16", "amp": "bf16", "adapter": Adapter(), "offload": "optimizer",
               "num_gpus": 2, "strategy": "fsdp", "optimizer": "sgd"}[field]
    plan = PLAN.replace(num_gpus=2, grad_accum_steps=1, strategy="ddp") if field == "strategy" else PLAN
    if field == "optimizer":  # TrainConfig accepts only adamw today: a fallback from a plan that names another
        fallback = plan.replace(micro_batch_size=1, grad_accum_steps=plan.grad_accum_steps * 4)
        object.__setattr__(fallback, "optimizer", changed)
    else:
        fallback = plan.replace(micro_batch_size=1, grad_accum_steps=plan.grad_accum_steps * 4, **{field: changed})
    policy = StepDownPolicy(plan, (fallback,))
    first = plan.replace(micro_batch_size=2, grad_accum_steps=plan.grad_accum_steps * 2)
    assert policy.next_config(plan) == (first, 1)  # the ladder's first


def test_a_fallback_with_another_effective_batch_or_a_larger_micro_batch_is_skipped() -> None:
    fallbacks = (PLAN.replace(micro_batch_size=2, grad_accum_steps=2),   # effective batch 4, not 8
                 PLAN.replace(micro_batch_size=8, grad_accum_steps=1, gradient_checkpointing=True),  # loader yields 4
                 PLAN.replace(micro_batch_size=1, grad_accum_steps=8))
    policy = StepDownPolicy(PLAN, fallbacks, can_checkpoint=True)
    assert policy.next_config(PLAN) == (fallbacks[2], 3)


def test_a_fallback_that_is_not_lighter_than_the_failed_configuration_is_passed_over() -> None:
    # Fastest first, as `memtune fit` saves them; after 1 x 8 failed, 2 x 4 is no step down.
    fallbacks = (PLAN.replace(micro_batch_size=1, grad_accum_steps=8),
                 PLAN.replace(micro_batch_size=2, grad_accum_steps=4))
    policy = StepDownPolicy(PLAN, fallbacks, can_checkpoint=True)
    assert shapes(policy.step_downs()) == [(1, 8, False, "standard"), (1, 8, True, "standard")]


def test_a_micro_batch_that_does_not_divide_the_loaders_runs_as_the_next_divisor() -> None:
    assert [chunk_size(micro, 4) for micro in (1, 2, 3, 4, 5)] == [1, 2, 2, 4, 4]
    assert [chunk_size(micro, 6) for micro in (4, 5)] == [3, 3]
    policy = StepDownPolicy(TrainConfig(seq_len=8, micro_batch_size=4, grad_accum_steps=3),
                            (TrainConfig(seq_len=8, micro_batch_size=3, grad_accum_steps=4),))
    assert shapes(policy.step_downs()) == [(2, 6, False, "standard"), (1, 12, False, "standard")]


def test_the_loader_and_the_effective_batch_come_from_the_trainer() -> None:
    # Trainer runs micro-batches of 8 with 1 accumulation step although the plan said 4 x 2: the guard cuts
    # the loader's 8-sequence batches, and the plan's 4 x 2 fallback is a step down.
    policy = StepDownPolicy(PLAN, (PLAN,), loader_micro_batch=8, per_device_batch=8)
    started = PLAN.replace(micro_batch_size=8, grad_accum_steps=1)
    assert shapes(policy.step_downs(started)) == [(4, 2, False, "standard"), (2, 4, False, "standard"),
                                                  (1, 8, False, "standard")]


def test_next_config_reports_where_it_stopped_in_the_fallbacks() -> None:
    fallbacks = (PLAN.replace(micro_batch_size=2, grad_accum_steps=4),)
    policy = StepDownPolicy(PLAN, fallbacks)
    assert policy.next_config(PLAN) == (fallbacks[0], 1)
    failed = policy.normalized(fallbacks[0])
    assert policy.next_config(failed, 1) == (PLAN.replace(micro_batch_size=1, grad_accum_steps=8), 1)
    assert policy.next_config(PLAN.replace(micro_batch_size=1, grad_accum_steps=8), 1) == (None, 1)
