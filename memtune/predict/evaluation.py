"""The evaluation step's predicted peak, and the eval batch that fits: what `--eval-batch-size` plans.

    estimate_evaluation(model_config, TrainConfig(seq_len=2048, micro_batch_size=1, amp="bf16",
                                                  eval_batch_size=16, eval_logits="keep", eval_sequences=64))
    choose_eval_batch(model_config, train_config, usable_bytes=80 * 2**30)

The trace of a configuration with `eval_batch_size` set holds its training steps and then Trainer's evaluation
loop (`eval_step`), so `estimate.estimate` of it is already the run's peak: max(training, evaluation) with the
allocator state training leaves, and its `Estimate.evaluation` is evaluation's own peak (`eval_peak`). This module
replays that stream against a device's size (the cache released under pressure, as torch does) and chooses the
eval batch. One GPU (and a DDP replica's own step) only; `TrainConfig` refuses evaluation under FSDP, CPU offload
and DeepSpeed.
"""

from __future__ import annotations

import time
from typing import Any

from memtune.config import (
    DEFAULT_CONTEXT_BYTES,
    DEFAULT_WORKSPACE_BYTES,
    EVAL_BATCH_FACTOR,
    TrainConfig,
    format_bytes,
)
from memtune.errors import NothingFitsError, UsageError
from memtune.predict import single
from memtune.predict.eval_peak import EvalEstimate, eval_estimate_of_events
from memtune.predict.peak import default_trace_device


def estimate_evaluation(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    usable_bytes: int | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> EvalEstimate:
    """Predict the memory of Trainer's evaluation of `train_config` (its eval fields) mid-training, on one GPU.

    `usable_bytes`: also replay against a device of that size less workspaces and context (`EvalEstimate.fits`;
    the cache is released under pressure, so the peaks are then those of that device). Raises UsageError when
    `train_config.eval_batch_size` is None."""
    if train_config.eval_batch_size is None:
        raise UsageError("estimate_evaluation needs a configuration with an eval batch: "
                         "train_config.replace(eval_batch_size=8)")
    started = time.perf_counter()
    device = device or default_trace_device()
    trace, events = single.full_depth_events(model_config, train_config, device)
    capacity = None if usable_bytes is None else max(0, usable_bytes - workspace_bytes - context_bytes)
    found = eval_estimate_of_events(train_config, events, trace.categories, trace.eval_first_storage,
                                    trace_device=trace.device or device, context_bytes=context_bytes,
                                    workspace_bytes=workspace_bytes, capacity_bytes=capacity)
    found.seconds = time.perf_counter() - started
    return found


def eval_batch_candidates(micro_batch_size: int, eval_sequences: int | None = None) -> list[int]:
    """The eval batches --eval-batch-size auto tries, largest first: the powers of two up to
    EVAL_BATCH_FACTOR x the training micro-batch, and that limit itself; none above the eval set's size."""
    limit = EVAL_BATCH_FACTOR * micro_batch_size
    if eval_sequences is not None:
        limit = max(1, min(limit, eval_sequences))
    sizes = {limit} | {1 << power for power in range(limit.bit_length()) if 1 << power <= limit}
    return sorted(sizes, reverse=True)


def choose_eval_batch(
    model_config: Any,
    train_config: TrainConfig,
    usable_bytes: int,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> EvalEstimate | None:
    """--eval-batch-size auto: the largest of `eval_batch_candidates` whose training-then-evaluation replay fits
    `usable_bytes` (`estimate_evaluation(...).fits`), with `train_config`'s eval_logits and eval_sequences; its
    estimate (`config` carries the batch), or None when not even an eval batch of 1 fits. Memory grows with the
    eval batch, so the first that fits, largest first, is the largest."""
    for batch in eval_batch_candidates(train_config.micro_batch_size, train_config.eval_sequences):
        found = estimate_evaluation(model_config, train_config.replace(eval_batch_size=batch), device=device,
                                    usable_bytes=usable_bytes, context_bytes=context_bytes,
                                    workspace_bytes=workspace_bytes)
        if found.fits:
            return found
    return None


def with_eval_batch(
    model_config: Any,
    train_config: TrainConfig,
    usable_bytes: int,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> TrainConfig:
    """`train_config` with the eval batch --eval-batch-size auto chooses (`choose_eval_batch`) for `usable_bytes`
    (the budget less its margin). Raises NothingFitsError (exit code 3) when even an eval batch of 1 does not fit,
    with evaluation's predicted total at 1 and what to change."""
    chosen = choose_eval_batch(model_config, train_config, usable_bytes, device=device, context_bytes=context_bytes,
                               workspace_bytes=workspace_bytes)
    if chosen is not None:
        return chosen.config
    smallest = estimate_evaluation(model_config, train_config.replace(eval_batch_size=1), device=device,
                                   context_bytes=context_bytes, workspace_bytes=workspace_bytes)
    shortfall = max(0, smallest.total_bytes - usable_bytes)
    fixes = ["--eval-logits accumulate_cpu or none (the logits leave the GPU)"] if train_config.eval_logits == "keep" \
        else []
    fixes.append("a smaller --micro-batch-size or --checkpointing (less training memory stays cached)")
    raise NothingFitsError(
        f"no eval batch fits: evaluation with 1 sequence per step needs {format_bytes(smallest.total_bytes)} with "
        f"training's memory alive, {format_bytes(usable_bytes)} usable; try " + " or ".join(fixes),
        shortfall_bytes=shortfall, suggestions=fixes)
