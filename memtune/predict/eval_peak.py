"""Evaluation's peak in a trace's event stream: where Trainer's evaluation loop begins, and its own peak.

The trace of a configuration with `eval_batch_size` set holds its training steps and then the evaluation loop
(`eval_step`). `eval_estimate_of_events` splits that stream where evaluation begins and replays it once, resetting
the peak counters there as `torch.cuda.reset_peak_memory_stats()` before `trainer.evaluate()` would: the eval peak
is what evaluation reaches on top of what training left allocated and reserved. `single.estimate_single` attaches
it to its Estimate (`Estimate.evaluation`); `evaluation` replays it against a device's size.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from memtune.config import TrainConfig
from memtune.predict import allocator
from memtune.predict.events import Category, Event


@dataclass
class EvalEstimate:
    """The predicted memory of Trainer's evaluation run mid-training (bytes). `peak_*` count from the moment
    evaluation begins (the peak counters reset there), so they include what training leaves allocated (weights,
    optimizer state) and, for reserved, the segments it leaves cached."""

    config: TrainConfig
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    train_peak_reserved_bytes: int
    """The training steps' own peak reserved, before evaluation (the same replay)."""
    workspace_bytes: int
    context_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    """Live bytes by category at evaluation's allocated peak ("evaluation", "eval logits kept", weights, ...)."""
    fits: bool | None = None
    """Whether training then evaluation fit `usable_bytes` (the allocator releasing its cache under pressure, as
    torch does); None when no capacity was given."""
    trace_device: str = "cpu"
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Evaluation's peak reserved + workspaces + CUDA context: what the device must hold while it evaluates."""
        return self.peak_reserved_bytes + self.workspace_bytes + self.context_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval_batch_size": self.config.eval_batch_size,
            "eval_logits": self.config.eval_logits,
            "eval_sequences": self.config.eval_sequences,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "train_peak_reserved_bytes": self.train_peak_reserved_bytes,
            "total_bytes": self.total_bytes,
            "breakdown": dict(self.breakdown),
            "fits": self.fits,
            "trace_device": self.trace_device,
        }


def eval_start(events: list[Event], first_storage: int | None) -> int:
    """The index of the first event of evaluation in `events` (a trace's own or its extension: `Event.source` is
    the traced storage): the first alloc of a storage at or after `first_storage`; len(events) when none."""
    if first_storage is None:
        return len(events)
    for index, event in enumerate(events):
        if event.kind == "alloc" and isinstance(event.source, int) and event.source >= first_storage:
            return index
    return len(events)


@dataclass
class Replay:
    """Peaks of one replay split at evaluation's start (bytes); `fits` False when a request failed."""

    train_allocated_bytes: int
    train_reserved_bytes: int
    eval_allocated_bytes: int
    eval_reserved_bytes: int
    fits: bool


def replay(events: list[Event], start: int, capacity_bytes: int | None = None, expandable: bool = False) -> Replay:
    """Replay `events` through the allocator model (`allocator.simulate`'s rules), resetting the peak counters at
    `start` to what is allocated and reserved then (torch.cuda.reset_peak_memory_stats)."""
    model: allocator.CachingAllocator | allocator.ExpandableAllocator = (
        allocator.ExpandableAllocator(capacity_bytes) if expandable else allocator.CachingAllocator(capacity_bytes))
    addresses: dict[Hashable, int] = {}
    train: tuple[int, int] | None = None
    fits = True
    for index, event in enumerate(events):
        if index == start:
            train = (model.peak_allocated, model.peak_reserved)
            model.peak_allocated, model.peak_reserved = model.allocated, model.reserved
        if event.kind == "alloc":
            address = model.malloc(event.num_bytes)
            if address is None:
                fits = False
                break
            addresses[event.storage] = address
        elif (address := addresses.pop(event.storage, None)) is not None:
            model.free(address)
    if train is None:
        train = (model.peak_allocated, model.peak_reserved)
    return Replay(train[0], train[1], model.peak_allocated, model.peak_reserved, fits)


def breakdown_after(events: list[Event], categories: dict[Hashable, str], start: int) -> dict[str, int]:
    """Live bytes by category at the largest allocated total reached from event `start` on."""
    live: dict[Hashable, tuple[str, int]] = {}
    by_category: dict[str, int] = {}
    total = peak = 0
    best: dict[str, int] = {}
    for index, event in enumerate(events):
        if event.kind == "alloc":
            category = categories.get(event.source, Category.TEMPORARIES)
            category = getattr(category, "value", category)
            live[event.storage] = (category, event.num_bytes)
            by_category[category] = by_category.get(category, 0) + event.num_bytes
            total += event.num_bytes
        elif event.storage in live:
            category, size = live.pop(event.storage)
            by_category[category] -= size
            total -= size
        if index >= start and total > peak:
            peak, best = total, dict(by_category)
    return {category: size for category, size in best.items() if size}


def eval_estimate_of_events(
    train_config: TrainConfig, events: list[Event], categories: dict[Hashable, str], first_storage: int | None, *,
    trace_device: str, context_bytes: int, workspace_bytes: int, capacity_bytes: int | None = None,
) -> EvalEstimate:
    """The EvalEstimate of a full-depth event stream whose evaluation begins at storage `first_storage`
    (`Trace.eval_first_storage`); `capacity_bytes`: replayed against that much memory for the allocator
    (`EvalEstimate.fits`), else unconstrained (fits None)."""
    start = eval_start(events, first_storage)
    result = replay(events, start, capacity_bytes, train_config.expandable_segments)
    breakdown = breakdown_after(events, categories, start)
    breakdown[Category.OVERHEAD.value] = (max(0, result.eval_reserved_bytes - result.eval_allocated_bytes)
                                          + workspace_bytes + context_bytes)
    return EvalEstimate(
        config=train_config,
        peak_allocated_bytes=result.eval_allocated_bytes,
        peak_reserved_bytes=result.eval_reserved_bytes,
        train_peak_reserved_bytes=result.train_reserved_bytes,
        workspace_bytes=workspace_bytes,
        context_bytes=context_bytes,
        breakdown=breakdown,
        fits=None if capacity_bytes is None else result.fits and capacity_bytes > 0,
        trace_device=trace_device,
    )
