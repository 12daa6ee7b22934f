"""Predicted peak memory of one training configuration: trace -> allocator model -> peak reserved.

    estimate(model_config, TrainConfig(seq_len=1024, micro_batch_size=4, amp="bf16"))

1. Trace the step on fake tensors (`trace.trace_step`) with a few decoder layers only: three
   periods of the layer pattern, enough for a first, a repeated and a last block.
2. Extend the trace to the model's depth by repeating the middle block (`trace.extend`); memory
   is affine in depth, and so is the event stream.
3. Replay the events through the caching-allocator model (`allocator.simulate`) for peak reserved.
4. Add what the trace cannot see: cuBLAS workspaces and the CUDA context.

Traces are cached per (model config, traced depth, configuration), so a search reuses them.
Pure: no CUDA memory is used; with a GPU present the trace runs on fake CUDA tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from memtune.config import (
    DEFAULT_CONTEXT_BYTES,
    DEFAULT_WORKSPACE_BYTES,
    MIB,
    TrainConfig,
)
from memtune.predict import allocator
from memtune.predict.trace import Category, Trace, extend, trace_step

NCCL_BYTES = 932 * MIB
"""NCCL's own device memory per rank (communicator and channel buffers), outside torch's allocator:
measured on 2 x H200 with torch 2.11's NCCL (free memory before and after the first collective, less
what torch reserved), 977,338,368 and 977,272,832 bytes in two runs. Other GPU counts, cards and NCCL
versions are unmeasured."""


def collective_context_bytes(train_config: TrainConfig) -> int:
    """What the process group adds to each GPU's fixed memory: NCCL_BYTES with several GPUs, else 0."""
    return NCCL_BYTES if train_config.num_gpus > 1 else 0


@dataclass
class Estimate:
    """Predicted peak memory of a configuration. Bytes are integers."""

    config: TrainConfig
    peak_allocated_bytes: int
    """Peak of live tensors during the step (torch.cuda.max_memory_allocated), workspaces excluded."""
    peak_reserved_bytes: int
    """Peak of the caching allocator's segments (torch.cuda.max_memory_reserved), workspaces excluded."""
    workspace_bytes: int
    context_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    """Bytes by category at the peak; "overhead" holds fragmentation, workspaces and context."""
    trace_device: str = "cpu"
    traced_layers: int = 0
    num_layers: int = 0
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        """What the process needs on the device: peak reserved + workspaces + CUDA context (with NCCL's
        own memory when several GPUs train)."""
        return self.peak_reserved_bytes + self.workspace_bytes + self.context_bytes

    def fits(self, budget_bytes: int, margin_bytes: int = 0) -> bool:
        return self.total_bytes + margin_bytes <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "workspace_bytes": self.workspace_bytes,
            "context_bytes": self.context_bytes,
            "total_bytes": self.total_bytes,
            "breakdown": dict(self.breakdown),
            "trace_device": self.trace_device,
            "traced_layers": self.traced_layers,
            "num_layers": self.num_layers,
            "seconds": self.seconds,
        }


_TRACE_CACHE: dict[str, Trace] = {}


def default_trace_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def num_layers_of(model_config: Any) -> int:
    return int(getattr(model_config, "num_hidden_layers", 0) or 0)


def shallow_config(model_config: Any, num_layers: int) -> Any:
    """A copy of `model_config` with only `num_layers` decoder layers (per-layer lists cut to match)."""
    config = model_config.__class__.from_dict(model_config.to_dict())
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    return config


def traced_depth(model_config: Any, period: int) -> int:
    """Three periods of the layer pattern (plus the remainder), or the whole model if shallower."""
    depth = num_layers_of(model_config)
    shallow = 3 * period + (depth - 3 * period) % period
    return depth if depth <= shallow else shallow


def cached_trace(model_config: Any, train_config: TrainConfig, device: str) -> Trace:
    from memtune.predict.trace import layer_period

    depth = traced_depth(model_config, layer_period(model_config))
    key = json.dumps([model_config.to_json_string(use_diff=False), depth, train_config.to_dict(), device], sort_keys=True)
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = trace_step(shallow_config(model_config, depth), train_config, device=device)
    return _TRACE_CACHE[key]


_EVENTS_CACHE: dict[tuple[int, int], list[tuple]] = {}


def full_depth_events(model_config: Any, train_config: TrainConfig, device: str) -> tuple[Trace, list[tuple]]:
    """The cached shallow trace and its events extended to the model's depth (built once per trace)."""
    trace = cached_trace(model_config, train_config, device)
    depth = num_layers_of(model_config) or trace.num_layers
    key = (id(trace), depth)
    if key not in _EVENTS_CACHE:
        _EVENTS_CACHE[key] = extend(trace, depth)
    return trace, _EVENTS_CACHE[key]


def breakdown_at_peak(events: list[tuple], categories: dict[int, str], sid_field: int = 4) -> dict[str, int]:
    """Live bytes by category at the allocated peak of an event stream. An alloc event's category is
    `categories[event[sid_field]]`: the traced storage id (field 4 of an extended stream, field 1 of a
    trace's own events); unknown storages count as temporaries."""
    live: dict[int, tuple[str, int]] = {}
    by_category: dict[str, int] = {}
    total = peak = 0
    best: dict[str, int] = {}
    for event in events:
        if event[0] == "alloc":
            category = categories.get(event[sid_field], Category.TEMPORARIES)
            category = getattr(category, "value", category)  # Category members and plain strings alike
            live[event[1]] = (category, event[2])
            by_category[category] = by_category.get(category, 0) + event[2]
            total += event[2]
            if total > peak:
                peak, best = total, dict(by_category)
        elif event[1] in live:
            category, size = live.pop(event[1])
            by_category[category] -= size
            total -= size
    return {category: size for category, size in best.items() if size}


def estimate(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the peak memory of `train_config` on the model described by `model_config`."""
    started = time.perf_counter()
    device = device or default_trace_device()
    trace, events = full_depth_events(model_config, train_config, device)
    return estimate_of_events(train_config, events, trace.categories, trace_device=device,
                              traced_layers=trace.num_layers, num_layers=num_layers_of(model_config) or trace.num_layers,
                              started=started, context_bytes=context_bytes, workspace_bytes=workspace_bytes)


def estimate_of_events(
    train_config: TrainConfig, events: list[tuple], categories: dict[int, str], *, trace_device: str,
    traced_layers: int, num_layers: int, started: float, context_bytes: int, workspace_bytes: int,
    peaks: tuple[int, int] | None = None, sid_field: int = 4,
) -> Estimate:
    """The Estimate of a full-depth event list, broken down at its peak. `peaks` (allocated, reserved)
    when the caller replayed the events itself (several streams); else one allocator replay."""
    if peaks is None:
        simulated = allocator.simulate(events)
        peaks = simulated.peak_allocated_bytes, simulated.peak_reserved_bytes
    peak_allocated, peak_reserved = peaks
    breakdown = breakdown_at_peak(events, categories, sid_field=sid_field)
    breakdown[Category.OVERHEAD.value] = max(0, peak_reserved - peak_allocated) + workspace_bytes + context_bytes
    return Estimate(
        config=train_config,
        peak_allocated_bytes=peak_allocated,
        peak_reserved_bytes=peak_reserved,
        workspace_bytes=workspace_bytes,
        context_bytes=context_bytes,
        breakdown=breakdown,
        trace_device=trace_device,
        traced_layers=traced_layers,
        num_layers=num_layers,
        seconds=time.perf_counter() - started,
    )


def fits_under(model_config: Any, estimate_: Estimate, budget_bytes: int, device: str | None = None) -> bool:
    """Replay the step against a device of `budget_bytes`, releasing the cache on pressure as torch does."""
    _, events = full_depth_events(model_config, estimate_.config, device or estimate_.trace_device)
    capacity = budget_bytes - estimate_.workspace_bytes - estimate_.context_bytes
    return capacity > 0 and allocator.simulate(events, capacity_bytes=capacity).fits
