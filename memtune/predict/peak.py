"""Allocation events -> `Estimate`: the peak, what is live at the peak, and what the trace cannot see.

Every estimate (one GPU, a DDP replica, an FSDP shard) ends here: its events are replayed through the
caching-allocator model (`allocator.simulate`, or per stream by the caller) for peak allocated and
reserved bytes, broken down by category at the allocated peak, and the fixed costs outside torch's
allocator are added: cuBLAS workspaces, the CUDA context and, with several GPUs, NCCL's buffers.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from memtune.config import MIB, TrainConfig
from memtune.predict import allocator
from memtune.predict.eval_peak import EvalEstimate
from memtune.predict.events import Category, Event

NCCL_BYTES = 932 * MIB
"""NCCL's own device memory per rank (communicator and channel buffers), outside torch's allocator:
measured on 2 x H200 with torch 2.11's NCCL (free memory before and after the first collective, less
what torch reserved), 977,338,368 and 977,272,832 bytes in two runs. Other GPU counts, cards and NCCL
versions are unmeasured."""


def collective_context_bytes(train_config: TrainConfig) -> int:
    """What the process group adds to each GPU's fixed memory: NCCL_BYTES with several GPUs, else 0."""
    return NCCL_BYTES if train_config.world_size > 1 else 0


def default_trace_device() -> str:
    """"cuda" (fake CUDA tensors) when torch sees a GPU, else "cpu" (fake CPU tensors with CUDA emulation)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    paged_bytes: int = 0
    """Optimizer state of a paged optimizer in CUDA unified memory: not in peak_reserved_bytes or total_bytes
    (outside torch's pool; the driver evicts it to the host when the GPU needs the room)."""
    host_bytes: int = 0
    """Pinned host memory the step holds at once: the offloaded inputs of checkpointed layers
    (`TrainConfig.offload_activations`), in torch's pinned blocks; 0 without. Not device memory."""
    trace_note: str = ""
    """One line when the trace ran on the other path than asked (the asked one failed: single.cached_trace),
    for the caller to show on stderr; "" otherwise. Not in `to_dict` (the JSON schema documents the fields
    there; `trace_device` says which path ran)."""
    evaluation: EvalEstimate | None = None
    """Trainer's evaluation mid-training when the configuration plans one (`TrainConfig.eval_batch_size`; one GPU):
    its own peak, from the same events (`eval_peak`). The peaks above are then those of training and evaluation
    together, the run's. None without evaluation."""

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
            "paged_bytes": self.paged_bytes,
            "host_bytes": self.host_bytes,
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
        }


def breakdown_at_peak(events: list[Event], categories: dict[Hashable, str]) -> dict[str, int]:
    """Live bytes by category at the allocated peak of an event stream. An alloc's category is
    `categories[event.source]`; unknown storages count as temporaries."""
    live: dict[Hashable, tuple[str, int]] = {}
    by_category: dict[str, int] = {}
    total = peak = 0
    best: dict[str, int] = {}
    for event in events:
        if event.kind == "alloc":
            category = categories.get(event.source, Category.TEMPORARIES)
            category = getattr(category, "value", category)  # Category members and plain strings alike
            live[event.storage] = (category, event.num_bytes)
            by_category[category] = by_category.get(category, 0) + event.num_bytes
            total += event.num_bytes
            if total > peak:
                peak, best = total, dict(by_category)
        elif event.storage in live:
            category, size = live.pop(event.storage)
            by_category[category] -= size
            total -= size
    return {category: size for category, size in best.items() if size}


def estimate_of_events(
    train_config: TrainConfig, events: list[Event], categories: dict[Hashable, str], *, trace_device: str,
    traced_layers: int, num_layers: int, started: float, context_bytes: int, workspace_bytes: int,
    peaks: tuple[int, int] | None = None, trace_note: str = "", paged_bytes: int = 0, host_bytes: int = 0,
) -> Estimate:
    """The Estimate of a full-depth event list, broken down at its peak. `peaks` (allocated, reserved)
    when the caller replayed the events itself (several streams); else one allocator replay.
    `started` is the `time.perf_counter()` at which the estimate began (for `Estimate.seconds`)."""
    if peaks is None:
        simulated = allocator.simulate(events, expandable=train_config.expandable_segments)
        peaks = simulated.peak_allocated_bytes, simulated.peak_reserved_bytes
    peak_allocated, peak_reserved = peaks
    breakdown = breakdown_at_peak(events, categories)
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
        trace_note=trace_note,
        paged_bytes=paged_bytes,
        host_bytes=host_bytes,
    )
