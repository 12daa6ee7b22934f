"""Predicted per-GPU peak memory of data-parallel training with a full replica per GPU (DDP).

    estimate_replicated(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=4, strategy="ddp"))

Under torch's DistributedDataParallel every GPU runs the single-GPU step on its share of the batch
(Trainer: the plan's micro-batch per GPU, gradient accumulation under `no_sync`, autocast around the
forward), so the per-GPU step is what `single.estimate_single` traces for the same configuration on
one GPU. What DDP adds, read from torch's sources (torch/nn/parallel/distributed.py `_ddp_init_helper`,
torch/csrc/distributed/c10d/reducer.cpp and comm.cpp; the same from torch 2.0 to 2.13, the version
here; benchmarks/ddp.py measures it under the GPU machine's 2.11):

- Gradient buckets. With `gradient_as_bucket_view=False` (torch's default; accelerate's
  DistributedDataParallelKwargs and Trainer keep it) the Reducer owns flat bucket tensors
  (`at::empty({numel})` in the parameters' dtype) holding a second copy of every trainable
  parameter's gradient: backward copies each gradient into its bucket view (`mul_out` by 1/N), the
  all-reduce runs in place on the bucket, and the result is copied back into `.grad`. They are made
  at construction and live as long as the wrapper. With find_unused_parameters=False (what memtune's
  plans give Trainer, `run.launch.ddp_training_arguments`) construction puts all trainable
  parameters of one dtype into a single bucket (bucket_size_limits=[sys.maxsize]); after the first
  synchronised backward the Reducer rebuilds them in gradient-ready order (1 MiB first bucket, then
  bucket_cap_mb=25 MiB). `initialize_buckets` clears the old buckets first, but whether that frees
  them depends on timing: on 2 x H200 (allocator histories, benchmarks/allocator_history.py --ddp)
  rank 0 freed them at the rebuild while rank 1 kept them until late in the second step, one more
  gradient copy at its peak, in 10 of 12 configurations; in 2 of 3 later ones no rank kept them.
  The estimate takes the worse case, as an OOM advisor must: the construction buckets right after
  the weights, the rebuilt ones from the second step on, the old ones freed at the end. When no
  rank keeps them it over-predicts by one gradient copy (+13.9% for Qwen2.5-1.5B 1 x 2048 x 2).
- The construction broadcast. `_sync_module_states` broadcasts every parameter and buffer from rank 0
  through `_broadcast_coalesced`: `compute_bucket_assignment_by_size` (called here, through
  `torch.distributed._compute_bucket_assignment_by_size`) groups them per dtype into 250 MiB buckets
  (a bucket closes once it reaches the limit), a bucket of several tensors is
  flattened into a new tensor (`at::cat`), a lone tensor is broadcast in place, and at most two
  buckets are in flight. The copies are freed before training, but their segments stay cached, where
  the step reuses them: they are replayed too.

Events: the single-GPU trace's events with the broadcast copies and the buckets inserted after the
weights, replayed by `allocator.simulate` (one stream: the all-reduce works in place on the buckets).

Known limitations: NCCL's own buffers (communicator, channels) are outside torch's allocator, as for
FSDP (fsdp.py): `peak.NCCL_BYTES`, measured on 2 x H200 under torch 2.11, is added to the
context. Not modelled: the shape check's small device tensors at
construction (under 1 MiB, freed at once) and the per-forward broadcast of the model's buffers
(broadcast_buffers=True: the rotary frequencies, a few KiB). Models with parameters that a step may
not use (mixture-of-experts) need find_unused_parameters=True, which memtune does not set.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from memtune.config import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, TrainConfig
from memtune.errors import UsageError
from memtune.predict import allocator
from memtune.predict.events import DDP_BUCKETS
from memtune.predict.peak import Estimate, collective_context_bytes, default_trace_device, estimate_of_events
from memtune.predict.single import full_depth_events, offloaded_host_bytes
from memtune.predict.trace import Category, Event, Trace, num_layers_of, paged_bytes_at_depth, rounded

BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024
"""DistributedDataParallel.broadcast_bucket_size: the bucket limit of the construction broadcast."""
BROADCASTS_IN_FLIGHT = 2
"""comm.cpp broadcast_coalesced: `constexpr auto max_in_flight = 2`."""
MIB = 1024 * 1024
REBUILT_BUCKET_BYTES = 25 * MIB
"""DistributedDataParallel bucket_cap_mb (Trainer's ddp_bucket_cap_mb unset): the rebuilt buckets' limit."""


@dataclass(frozen=True)
class ReplicaLayout:
    """The device memory DDP itself allocates, from the model's parameters and buffers."""

    bucket_bytes: tuple[int, ...]
    """The gradient buckets as constructed: one flat tensor per dtype of the trainable parameters."""
    broadcast_bytes: tuple[int, ...]
    """The construction broadcast's buckets in order: bytes of each flattened copy, 0 for a lone
    tensor broadcast in place."""
    rebuilt_bucket_bytes: tuple[int, ...] = ()
    """The buckets rebuilt after the first synchronised backward (gradient-ready order, approximated
    by the reverse of the parameters' order: 1 MiB first, then bucket_cap_mb 25 MiB)."""

    @property
    def total_bucket_bytes(self) -> int:
        return sum(self.bucket_bytes)


def bucket_groups(tensors: list[torch.Tensor], limits: list[int]) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets by torch's own `compute_bucket_assignment_by_size`
    (reducer.cpp, exposed as `torch.distributed._compute_bucket_assignment_by_size` with this signature
    from torch 1.x to 2.13): tensors join the open bucket of their (dtype, device) in order; a bucket
    closes once its bytes reach the current limit, the next bucket of that key takes the next limit
    (the last one repeats); buckets come sorted by their smallest index. Meta tensors give the same
    groups as real ones (tests/test_replicate.py)."""
    groups, _ = dist._compute_bucket_assignment_by_size(tensors, limits)
    return [list(group) for group in groups]


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def replica_layout(model: Any) -> ReplicaLayout:
    """What DDP allocates for `model` (meta tensors are fine): buckets and broadcast copies."""
    buckets: dict[Any, int] = {}
    for param in model.parameters():  # deduplicated, as DDP's _build_params_for_reducer
        if param.requires_grad:
            buckets[param.dtype] = buckets.get(param.dtype, 0) + _nbytes(param)
    states = [param for param in model.parameters()] + [buffer for buffer in model.buffers()]
    groups = bucket_groups(states, [BROADCAST_BUCKET_BYTES])
    broadcast = tuple(sum(_nbytes(states[i]) for i in group) if len(group) > 1 else 0 for group in groups)
    trainable = [param for param in model.parameters() if param.requires_grad][::-1]
    rebuilt = bucket_groups(trainable, [1 * MIB, REBUILT_BUCKET_BYTES])
    return ReplicaLayout(bucket_bytes=tuple(buckets.values()), broadcast_bytes=broadcast,
                         rebuilt_bucket_bytes=tuple(sum(_nbytes(trainable[i]) for i in group) for group in rebuilt))


def construction_events(layout: ReplicaLayout) -> list[Event]:
    """Allocation events of DDP's constructor, in its order: the broadcast (two in flight), then the buckets.
    Each storage is its own category key: ("ddp-broadcast", n) or ("ddp-bucket", n)."""
    events: list[Event] = []
    in_flight: deque[tuple | None] = deque()

    def finish_oldest() -> None:
        done = in_flight.popleft()
        if done is not None:
            events.append(Event.free(done))

    for number, size in enumerate(layout.broadcast_bytes):
        if len(in_flight) >= BROADCASTS_IN_FLIGHT:
            finish_oldest()
        key = None
        if size:
            key = ("ddp-broadcast", number)
            events.append(Event.alloc(key, rounded(size)))
        in_flight.append(key)
    while in_flight:
        finish_oldest()
    for number, size in enumerate(layout.bucket_bytes):
        key = ("ddp-bucket", number)
        events.append(Event.alloc(key, rounded(size)))
    return events


def rebuild_events(layout: ReplicaLayout) -> list[Event]:
    """The rebuilt buckets, allocated when the second step starts.

    Measured on 2 x H200 (torch 2.11, benchmarks/allocator_history.py --ddp): rank 0 freed the
    construction buckets at the rebuild, but rank 1 kept them until late in the second step, past its
    peak: one more copy of the gradients than rank 0 (+1.84 GiB for Qwen2.5-0.5B). It is a matter of
    timing (other runs freed them on both ranks); the per-GPU peak is the largest rank's in the worse
    case, so the old buckets are freed only at the end of the trace here.
    """
    events = []
    for number, size in enumerate(layout.rebuilt_bucket_bytes):
        events.append(Event.alloc(("ddp-rebuilt", number), rounded(size)))
    return events


def _category(categories: dict[Hashable, str], key: Hashable) -> str | None:
    """The breakdown key of a storage: Category members and plain strings alike."""
    category = categories.get(key)
    return getattr(category, "value", category)


def after_first_optimizer_step(events: list[Event], categories: dict[Hashable, str]) -> int:
    """Index of the first event after the first optimizer step's state was made (the second step's start)."""
    optimizer = Category.OPTIMIZER.value
    last = None
    for index, event in enumerate(events):
        if event.kind == "alloc" and _category(categories, event.source) == optimizer:
            last = index
        elif last is not None and event.kind == "alloc":
            return index
    return len(events)


def check_replicated(train_config: TrainConfig) -> None:
    if not train_config.replicated:
        raise UsageError(f"the DDP estimate is for strategy 'ddp' over several GPUs, got {train_config.describe()}: "
                         "use memtune.predict.estimate.estimate, which picks the estimate for any configuration")


def single_gpu_config(train_config: TrainConfig) -> TrainConfig:
    """The configuration each GPU runs under DDP: the same step, on one GPU (of one machine)."""
    return train_config.replace(num_gpus=1, num_nodes=1, strategy="fsdp")


_LAYOUT_CACHE: dict[str, ReplicaLayout] = {}
_EVENTS_CACHE: dict[str, tuple[list[Event], dict[Hashable, str], Trace]] = {}


def cached_layout(model_config: Any, train_config: TrainConfig) -> ReplicaLayout:
    """The layout of the full-depth model, built on the meta device (the adapter applied), cached."""
    from memtune.recipe import step as recipe

    key = json.dumps([model_config.to_json_string(use_diff=False), train_config.weights_dtype,
                      train_config.to_dict()["adapter"]], sort_keys=True)
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = replica_layout(recipe.build_model(model_config, single_gpu_config(train_config), "meta"))
    return _LAYOUT_CACHE[key]


def weights_prefix(events: list[Event], categories: dict[Hashable, str]) -> int:
    """How many leading events allocate the weights (the trace starts with the model on the device)."""
    weights = Category.WEIGHTS.value
    for index, event in enumerate(events):
        if event.kind != "alloc" or _category(categories, event.source) != weights:
            return index
    return len(events)


def replicated_events(
    model_config: Any, train_config: TrainConfig, device: str
) -> tuple[list[Event], dict[Hashable, str], Trace]:
    """(events of one rank's DDP steps, category by storage key, the single-GPU trace), cached."""
    check_replicated(train_config)
    key = json.dumps([model_config.to_json_string(use_diff=False), train_config.traced().to_dict(), device],
                     sort_keys=True)
    if key not in _EVENTS_CACHE:
        trace, events = full_depth_events(model_config, single_gpu_config(train_config), device)
        layout = cached_layout(model_config, train_config)
        ddp, rebuild = construction_events(layout), rebuild_events(layout)
        categories: dict[Hashable, str] = dict(trace.categories)
        for event in ddp + rebuild:
            if event.kind == "alloc":
                broadcast = isinstance(event.source, tuple) and event.source[0] == "ddp-broadcast"
                categories[event.source] = Category.TEMPORARIES.value if broadcast else DDP_BUCKETS
        split = weights_prefix(events, trace.categories)
        events = events[:split] + ddp + events[split:]
        step_two = after_first_optimizer_step(events, categories)
        old_buckets = [Event.free(("ddp-bucket", number)) for number in range(len(layout.bucket_bytes))]
        _EVENTS_CACHE[key] = (events[:step_two] + rebuild + events[step_two:] + old_buckets, categories, trace)
    return _EVENTS_CACHE[key]


def estimate_replicated(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the per-GPU peak of `train_config` (strategy "ddp", num_gpus > 1) as `accelerate launch`
    + Trainer run it: the single-GPU step plus DDP's construction broadcast and gradient buckets."""
    started = time.perf_counter()
    device = device or default_trace_device()
    events, categories, trace = replicated_events(model_config, train_config, device)
    context_bytes += collective_context_bytes(train_config)
    num_layers = num_layers_of(model_config) or trace.traced_layers
    return estimate_of_events(train_config, events, categories, trace_device=trace.device or device,
                              trace_note=trace.note, traced_layers=trace.traced_layers,
                              paged_bytes=paged_bytes_at_depth(trace, num_layers),
                              host_bytes=offloaded_host_bytes(model_config, train_config, trace),
                              num_layers=num_layers, started=started,
                              context_bytes=context_bytes, workspace_bytes=workspace_bytes)


def fits_under(model_config: Any, estimate: Estimate, usable_bytes: int, device: str | None = None) -> bool:
    """Replay one rank's DDP step against a device of `usable_bytes`, releasing the cache on pressure as torch does."""
    events, _, _ = replicated_events(model_config, estimate.config, device or estimate.trace_device)
    capacity = usable_bytes - estimate.workspace_bytes - estimate.context_bytes
    return capacity > 0 and allocator.simulate(events, capacity_bytes=capacity,
                                               expandable=estimate.config.expandable_segments).fits
