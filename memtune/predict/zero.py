"""Predicted per-GPU peak memory of DeepSpeed ZeRO stage 1, 2 or 3 (with CPU / NVMe offload) training steps.

    estimate_zero(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=2, strategy="deepspeed", zero=Zero(3)))

As `ddp.py`: every rank runs the single-GPU step on its micro-batch, so the single-GPU trace
(`single.full_depth_events`) gives the activations, logits, temporaries and the order in which backward
produces the gradients. Its model states (weights, gradients, optimizer state and the optimizer's
temporaries) are replaced by what ZeRO holds, and ZeRO's own buffers are inserted as events where
DeepSpeed allocates them; the result is replayed per stream (`fsdp.simulate_streams`). The sizes are
`zero_layout`'s rules, ZeRO-3's gathers `zero_gather`'s replica of its coordinator; this module puts them in order.

Every rule below was read in DeepSpeed 0.19.8's source (`deepspeed/runtime/...`; file:line as in
docs/deepspeed-zero.md, the memo of issue 15) and the N=1 rules were measured on one H200 to
< 0.5 MiB on a 134M-parameter model (tests/test_zero.py reproduces those figures from these rules). Notation:
T trainable and P all parameters (elements), N ranks, b bytes of the 16-bit model dtype, rbs the reduce bucket
(elements: every DeepSpeed bucket knob counts elements).

ZeRO-1/2 (`zero/stage_1_and_2.py`): the trainable parameters flattened into one bf16 buffer `T*b` (503-524;
the model's own copies are freed after: an init transient), fp32 master `4T/N` (559-561), Adam's two moments
`8T/N` made inside the first step; in backward the IPG bucket `rbs*b` (x2 with overlap_comm, 3256-3281) from
the first gradient hook to the end of backward (924-932), `grads_in_partition` `b*T/N` at the first flush
(2186-2198); ZeRO-1 keeps every autograd gradient to the accumulation boundary and buckets them then
(958-981); the step's flat bf16 copy `b*T/N` and fp32 gradient `4T/N` (3117-3141). Under optimizer offload: no
master, Adam or gradient partition on the GPU, a staging buffer `L*b` (659-661) and two fp32 copies of each
parameter's partition slice at the flush (1873-1912).

ZeRO-3 (`zero/stage3.py`, `partition_parameters.py`, `partitioned_param_coordinator.py`): parameter
partitions `b*P/N` (967-972), the small parameters (numel <= persistence threshold) kept gathered, one
persistent IPG bucket `rbs*b` (780-784), gradient partitions `b*T/N` (786-801), master and Adam `12T/N`
(1157-1170); parameters gathered per module (a flat all-gather buffer and per-parameter copies:
partition_parameters.py:795, 1343-1361), prefetched up to min(max_live, prefetch_bucket) from the second step
(coordinator 452-481), kept while reused within max_reuse_distance (632-660); at each bucket flush a `torch.cat`
copy of the bucket (comm/coalesced_collectives.py:100-122); the step per sub-group `(b+4)*S` (2683-2735).

Gradient accumulation: the trace's later micro-batch adds fresh gradients into `.grad`; they are found by size
and layer (`step_marks`) and go through the hooks as the first micro-batch's do (ZeRO-1 accumulates them and
reduces at the boundary only); ZeRO-3's coordinator replays each micro-batch.

Outside the events: cuBLAS workspaces and the CUDA context as for one GPU, NCCL's buffers with N > 1
(`peak.NCCL_BYTES`, measured for torch's DDP/FSDP, not for DeepSpeed's communicator).

Known limitations (not modelled): the ZeRO-3 gather granularity inside a decoder layer (its modules' gathers
are spread evenly over the layer's events: the trace has no module marks); the re-gather of checkpointed
layers' recomputation (a layer is gathered once for its backward); ZeRO-1/2 offload's per-micro-batch copies
through the staging buffer (the buffer is counted); at most two reductions in flight (stage3.py:462: one cat
copy at a time here); torch AdamW's foreach step is one state-sized fp32 temporary (memtune's description of
adamw_torch, not read in torch for a flat partition); the init transient of ZeRO-3 without zero.Init (the full
model on the GPU before partitioning: memtune's runner loads under zero.Init); LoRA under ZeRO is only inferred
in the memo (frozen weights as loaded for ZeRO-1/2, partitioned for ZeRO-3); N >= 2 is not measured.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from memtune.config import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, DTYPE_BYTES, TrainConfig
from memtune.errors import UsageError
from memtune.predict.events import NO_LAYER, Category, Event
from memtune.predict.fsdp import simulate_streams
from memtune.predict.peak import Estimate, collective_context_bytes, default_trace_device, estimate_of_events
from memtune.predict.single import full_depth_events, offloaded_host_bytes
from memtune.predict.trace import Trace, decoder_layers, model_type_of, num_layers_of, paged_bytes_at_depth
from memtune.predict.zero_gather import StorageKeys, event_layers, gather_events, gather_schedule, module_regions
from memtune.predict.zero_layout import (
    AFTER_LAYERS,
    BEFORE_LAYERS,
    REDUCE_STREAM,
    ZERO2_OFFLOAD_TRANSIENT_COPIES,
    ZERO3_OFFLOAD_TRANSIENT_FP32,
    ZERO_BUCKETS,
    ZeroKnobs,
    ZeroLayout,
    ZeroModule,
    ZeroParam,
    flat_bit16_bytes,
    gathers_cost_memory,
    gradient_partition_bytes,
    host_bytes,
    ipg_bucket_bytes,
    ipg_bucket_count,
    master_bytes,
    persistent_params,
    sub_groups,
)

# -- events --------------------------------------------------------------------------------------------------

def init_events(layout: ZeroLayout, knobs: ZeroKnobs, keys: StorageKeys) -> tuple[list[Event], set[int]]:
    """What `deepspeed.initialize` leaves on the GPU, in its order, with the init transients; and the ZeRO-3
    persistent parameters (fetched at their first use)."""
    b, events = layout.bytes_per_element, []
    weights, grads, optimizer = Category.WEIGHTS.value, Category.GRADIENTS.value, Category.OPTIMIZER.value
    if knobs.stage in (1, 2):
        # The model moved to the GPU (engine.py:2077-2094), then flattened: both held a moment (453, 511-525).
        moved = [keys.alloc(weights, p.numel * p.element_bytes) for p in layout.params]
        events += moved + [keys.alloc(weights, flat_bit16_bytes(layout))]
        events += [Event.free(e.storage) for e, p in zip(moved, layout.params, strict=True) if p.trainable]
        if knobs.offloads_optimizer:
            events.append(keys.alloc(grads, layout.largest_trainable * b))  # temp_grad_buffer_for_gpu_offload
        else:
            # The master partition is `.detach().clone().to(fp32)` of the bf16 partition: the clone is a transient
            # (559-561); `initialize_optimizer_states` gives it a zero fp32 .grad and drops it again (934-951).
            clone = keys.alloc(optimizer, gradient_partition_bytes(layout))
            events += [clone, keys.alloc(optimizer, master_bytes(layout)), Event.free(clone.storage)]
            zeros = keys.alloc(optimizer, master_bytes(layout))
            events += [zeros, Event.free(zeros.storage)]
        return events, set()
    if not knobs.offloads_parameters:
        # zero.Init partitions each parameter as the model is built; `_create_fp16_partitions_with_defragmentation`
        # (913-972) moves the trainable partitions to the host, empties the cache and copies them back into one
        # flat buffer (runtime/zero/utils.py `defragment`): what is cached afterwards is the frozen parameters'
        # partitions (LoRA's base) and the flat buffer, each in segments of their own.
        events += [keys.alloc(weights, layout.partition(p.numel) * p.element_bytes)
                   for p in layout.params if not p.trainable]
        flat = sum(layout.partition(p.numel) * p.element_bytes for p in layout.params if p.trainable)
        events.append(keys.alloc(weights, flat))
    # `_setup_for_real_optimizer` (761-800): the fp32 partitions, the optimizer states' init, the IPG bucket, then the
    # flat gradient partitions; the H200 histories of issue 15 show this order.
    if not knobs.offloads_optimizer:
        # `_create_fp32_partitions` (1157-1170): per sub-group `converted = fp16.to(fp32)` and its `.clone()`; each
        # `converted` lives until the next one is made (the loop variable), the last until the function returns.
        previous: Event | None = None
        for size in sub_groups(layout, knobs):
            converted = keys.alloc(optimizer, 4 * size)
            events.append(converted)
            if previous is not None:
                events.append(Event.free(previous.storage))
            events.append(keys.alloc(optimizer, 4 * size))
            previous = converted
        if previous is not None:
            events.append(Event.free(previous.storage))
        buffer = keys.alloc(grads, 4 * max(sub_groups(layout, knobs)))  # init-only gradient_buffer, 1304-1368
        events += [buffer, Event.free(buffer.storage)]
    events.append(keys.alloc(ZERO_BUCKETS, ipg_bucket_bytes(layout, knobs)))
    if not knobs.offloads_optimizer:
        events.append(keys.alloc(grads, gradient_partition_bytes(layout)))
    return events, persistent_params(layout, knobs)


def step_events(layout: ZeroLayout, knobs: ZeroKnobs, keys: StorageKeys, first: bool,
                gradient_partition: Event | None) -> list[Event]:
    """The optimizer step's GPU allocations (none under optimizer offload: the CPU Adam runs on pinned host
    buffers, 3078-3097). ZeRO-1/2 (3099-3145): flat bf16 copy, its fp32 cast, the copy freed,
    `grads_in_partition` freed, Adam's moments made (first step), the fp32 gradient freed. ZeRO-3 per sub-group
    (2683-2735): the same without freeing the persistent gradient partitions."""
    if knobs.offloads_optimizer:
        return []
    b, optimizer, events = layout.bytes_per_element, Category.OPTIMIZER.value, []
    for size in sub_groups(layout, knobs):  # made inside optimizer.step(): the trace's optimizer category
        copy, fp32 = keys.alloc(optimizer, b * size), keys.alloc(optimizer, 4 * size)
        events += [copy, fp32, Event.free(copy.storage)]
        if gradient_partition is not None:
            events.append(Event.free(gradient_partition.storage, stream=gradient_partition.stream))
            gradient_partition = None
        if first:
            events += [keys.alloc(optimizer, 4 * size) for _ in range(2)]
        if knobs.foreach_optimizer:
            temporary = keys.alloc(optimizer, 4 * size)
            events += [temporary, Event.free(temporary.storage)]
        events.append(Event.free(fp32.storage))
    return events


@dataclass
class Reducer:
    """The gradient path of one rank through backward and the step: ZeRO's gradient hooks replayed on the
    trace's gradients (each `Event` of category gradients, in production order)."""

    layout: ZeroLayout
    knobs: ZeroKnobs
    keys: StorageKeys
    buckets: list[Event] = field(default_factory=list)
    in_bucket: list[int] = field(default_factory=list)
    """Elements of each gradient in the current bucket."""
    pending: list[Event] = field(default_factory=list)
    """ZeRO-1 without reduction in backward: gradients kept until backward ends."""
    partition: Event | None = None
    held: Event | None = None
    """ZeRO-1/2 with gradient accumulation: the previous micro-batch's grads_in_partition, which `.grad` views keep
    alive after `_release_ipg_buffers` dropped it (924-932) until this micro-batch's flushes have copied every
    gradient into the new one (2184-2200)."""
    steps: int = 0

    @property
    def reduces_in_backward(self) -> bool:
        """ZeRO-2, ZeRO-3, and ZeRO-1 with overlap_comm reduce in the hooks (stage_1_and_2.py:2290)."""
        return self.knobs.stage != 1 or self.knobs.overlaps

    def _elements(self, gradient: Event) -> int:
        return max(1, gradient.num_bytes // self.layout.bytes_per_element)

    def hook(self) -> Iterator[Event]:
        """A gradient hook: the first one of a micro-batch sets up the bucket(s) (ZeRO-1/2, `setup_buckets` from
        `process_gradients`, 2284-2291; ZeRO-3's one is persistent)."""
        if self.knobs.stage != 3 and not self.buckets:
            self.buckets = [self.keys.alloc(ZERO_BUCKETS, ipg_bucket_bytes(self.layout, self.knobs))
                            for _ in range(ipg_bucket_count(self.knobs))]
            yield from self.buckets

    def gradient(self, event: Event) -> Iterator[Event]:
        """A gradient produced by autograd: copied into the bucket (a full bucket flushed first) and freed, or, where
        nothing is reduced in backward (ZeRO-1), kept to the gradient-accumulation boundary as `.grad`."""
        yield from self.hook()
        yield event
        if not self.reduces_in_backward:
            self.pending.append(event)
            return
        yield from self._add(event)

    def _add(self, gradient: Event) -> Iterator[Event]:
        elements = self._elements(gradient)
        if self.in_bucket and sum(self.in_bucket) + elements > self.knobs.reduce_bucket_elements:
            yield from self.flush()
        self.in_bucket.append(elements)
        yield Event.free(gradient.storage)

    def flush(self) -> Iterator[Event]:
        """Reduce the bucket: ZeRO-1/2 copy this rank's part into `grads_in_partition` (made at the first
        flush), or under offload two fp32 copies of each parameter's slice; ZeRO-3 `torch.cat` the bucket
        (unless it is one tensor divisible by N) and partition it, under offload with `(b+8)` bytes per
        element of each parameter's partition on the way to the host."""
        if not self.in_bucket:
            return
        layout, b = self.layout, self.layout.bytes_per_element
        temporaries = Category.TEMPORARIES.value
        # With overlap_comm the whole reduction runs on the reduction stream, so its blocks live in that stream's
        # pool (stage_1_and_2.py `reduce_ipg_grads` 2239-2249, stage3.py `__reduce_and_partition_ipg_grads`); the
        # H200 histories of issue 15 show grads_in_partition and the offload copies there.
        stream = REDUCE_STREAM if self.knobs.overlaps else 0
        if self.knobs.stage == 3:
            single = len(self.in_bucket) == 1 and self.in_bucket[0] % layout.num_ranks == 0
            elements = -(-sum(self.in_bucket) // layout.num_ranks) * layout.num_ranks
            cat = None if single else self.keys.alloc(ZERO_BUCKETS, elements * b, stream)
            if cat is not None:
                yield cat
            if self.knobs.offloads_optimizer:
                for numel in self.in_bucket:
                    copy = self.keys.alloc(temporaries, (b + ZERO3_OFFLOAD_TRANSIENT_FP32) * layout.partition(numel),
                                           stream)
                    yield from (copy, Event.free(copy.storage, stream=stream))
            if cat is not None:
                yield Event.free(cat.storage, stream=stream)
        elif self.knobs.offloads_optimizer:
            slice_limit = layout.partition(layout.trainable_elements)
            for numel in self.in_bucket:
                copies = [self.keys.alloc(temporaries, 4 * min(numel, slice_limit), stream)
                          for _ in range(ZERO2_OFFLOAD_TRANSIENT_COPIES)]
                yield from copies
                yield from (Event.free(copy.storage, stream=stream) for copy in copies)
        elif self.partition is None:
            self.partition = self.keys.alloc(Category.GRADIENTS.value, gradient_partition_bytes(layout), stream)
            yield self.partition
        self.in_bucket = []

    def backward_end(self, boundary: bool = True) -> Iterator[Event]:
        """The backward epilogue: the last bucket is flushed and ZeRO-1/2 release their IPG buckets (924-932), every
        micro-batch; ZeRO-1 (no reduction in backward) buckets its accumulated gradients at the accumulation
        `boundary` only (`reduce_gradients` from the engine's allreduce_gradients, 958-981)."""
        if boundary or self.reduces_in_backward:
            for gradient in self.pending[::-1]:  # the parameters' order: the reverse of backward's
                yield from self._add(gradient)
            self.pending = []
            yield from self.flush()
        yield from (Event.free(bucket.storage) for bucket in self.buckets)
        self.buckets = []
        if self.held is not None:
            yield Event.free(self.held.storage, stream=self.held.stream)
            self.held = None
        if not boundary and self.partition is not None:  # the next micro-batch's first flush makes a new one
            self.held, self.partition = self.partition, None

    def step(self) -> Iterator[Event]:
        self.steps += 1
        yield from step_events(self.layout, self.knobs, self.keys, self.steps == 1, self.partition)
        self.partition = None


# -- the step's events -----------------------------------------------------------------------------------------

def _category(categories: dict[Hashable, str], event: Event) -> str | None:
    category = categories.get(event.source)
    return getattr(category, "value", category)


def step_positions(events: list[Event], categories: dict[Hashable, str]) -> list[tuple[int, int]]:
    """(end of the first micro-batch's backward, optimizer step) as event indices, per traced step: the step at the
    first free of a gradient (optimizer.zero_grad, after the step's own events), backward's end at the first
    allocation after the step's last gradient (the epilogue runs once backward's nodes are done and their
    temporaries freed)."""
    gradients, positions, last = Category.GRADIENTS.value, [], None
    storages: set[Hashable] = set()
    for index, event in enumerate(events):
        if event.kind == "alloc" and _category(categories, event) == gradients:
            last = index
            storages.add(event.storage)
        elif event.kind == "free" and event.storage in storages and last is not None:
            end = next((j for j in range(last + 1, index) if events[j].kind == "alloc"), index)
            positions.append((end, index))
            last = None
    return positions


@dataclass
class StepMarks:
    """Where one traced optimizer step's micro-batches produce their gradients and end their backward."""

    gradients: list[list[int]]
    """Per micro-batch, the indices of the allocations of its parameters' gradients: the first micro-batch's are
    the `.grad`s (category gradients); a later one's are the fresh gradients autograd adds into them (temporaries
    in the trace, matched to the first micro-batch's by size and layer, in order)."""
    backward_ends: list[int]
    """Per micro-batch, the first allocation after its last gradient."""
    step_at: int


def step_marks(events: list[Event], categories: dict[Hashable, str], layers: list[int]) -> list[StepMarks]:
    """`StepMarks` of each traced step (a trace runs min(grad_accum_steps, 2) micro-batches per step)."""
    marks, start = [], 0
    gradients, optimizer, temporaries = (Category.GRADIENTS.value, Category.OPTIMIZER.value,
                                         Category.TEMPORARIES.value)
    for first_end, step_at in step_positions(events, categories):
        first = [i for i in range(start, step_at)
                 if events[i].kind == "alloc" and _category(categories, events[i]) == gradients]
        optimizer_at = next((i for i in range(first_end, step_at)
                             if events[i].kind == "alloc" and _category(categories, events[i]) == optimizer), step_at)
        signature = [(events[i].num_bytes, layers[i]) for i in first]
        micro, ends, current = [first], [first_end], list[int]()
        for i in range(first[-1] + 1, optimizer_at):
            event = events[i]
            if (event.kind == "alloc" and _category(categories, event) == temporaries
                    and (event.num_bytes, layers[i]) == signature[len(current)]):
                current.append(i)
                if len(current) == len(signature):
                    micro.append(current)
                    ends.append(next((j for j in range(i + 1, optimizer_at) if events[j].kind == "alloc"),
                                     optimizer_at))
                    current = []
        marks.append(StepMarks(micro, ends, step_at))
        start = step_at
    return marks


def zero_events(events: list[Event], categories: dict[Hashable, str], layout: ZeroLayout, knobs: ZeroKnobs,
                layers: list[int] | None = None) -> tuple[list[Event], dict[Hashable, str]]:
    """One rank's ZeRO steps from the single-GPU step's events (weights, gradients and optimizer state by their
    categories): the weights and optimizer events dropped, ZeRO's initialisation in place of the weights,
    each gradient passed through ZeRO's hooks (`Reducer`), the backward epilogue and the step at the trace's
    points, and under ZeRO-3 the gathers and releases of every module (`gather_schedule`) in the regions of
    their decoder layers (`layers`: each event's, `event_layers`; default the events' own tags). The last module of
    backward is released after the backward epilogue: inferred from the H200 probe with parameters offloaded
    (memo §6: the epilogue's flush held one more gathered layer, 32 MiB, at both bucket sizes), not read in the
    source. Returns (events, breakdown key by storage)."""
    layers = [event.layer for event in events] if layers is None else layers
    keys = StorageKeys()
    weights, optimizer, gradients = Category.WEIGHTS.value, Category.OPTIMIZER.value, Category.GRADIENTS.value
    inserts: dict[int, list[tuple[tuple[int, ...], Any]]] = {}

    def insert(index: int, order: tuple[int, ...], item: Any) -> None:
        inserts.setdefault(index, []).append((order, item))

    first_weight = next((i for i, e in enumerate(events) if e.kind == "alloc" and _category(categories, e) == weights),
                        0)
    init, persistent = init_events(layout, knobs, keys)
    insert(first_weight, (-1, 0, 0, 0), init)
    start = first_weight
    while start < len(events) and events[start].kind == "alloc" and _category(categories, events[start]) == weights:
        start += 1
    marks = step_marks(events, categories, layers)
    if gathers_cost_memory(layout, knobs):
        available: set[int] = set()
        live: dict[int, Hashable] = {}
        for step, mark in enumerate(marks):
            for micro, backward_end in enumerate(mark.backward_ends):
                regions = module_regions(layout, layers, start, backward_end)  # the optimizer's events lie after
                schedule = gather_schedule(layout, knobs, [module for module, _, _ in regions], available,
                                           persistent, complete_trace=step > 0 or micro > 0)
                for seq, ((module, begin, finish), visit) in enumerate(zip(regions, schedule, strict=True)):
                    layer = layout.modules[module].unit if layout.modules[module].unit >= 0 else NO_LAYER
                    before, after = gather_events(layout, visit, live, keys, layer)
                    insert(begin, (step, micro, 0, 2 * seq), before)
                    if seq == len(regions) - 1:  # backward's last module is released after the epilogue (below)
                        insert(backward_end, (step, micro, 1, 1), after)
                    else:
                        insert(finish, (step, micro, 0, 2 * seq + 1), after)
                start = backward_end
            start = mark.step_at
    later_gradients: set[int] = set()
    for step, mark in enumerate(marks):
        for micro, backward_end in enumerate(mark.backward_ends):
            boundary = micro == len(mark.backward_ends) - 1
            insert(backward_end, (step, micro, 1, 0), "boundary_end" if boundary else "backward_end")
        insert(mark.step_at, (step, len(mark.backward_ends), 2, 0), "step")
        later_gradients.update(i for micro in mark.gradients[1:] for i in micro)
    reducer = Reducer(layout, knobs, keys)
    out: list[Event] = []
    dropped: set[Hashable] = set()

    def run_inserts(index: int) -> None:
        for _, item in sorted(inserts.get(index, []), key=lambda pair: pair[0]):
            if item in ("backward_end", "boundary_end"):
                out.extend(reducer.backward_end(boundary=item == "boundary_end"))
            elif item == "step":
                out.extend(reducer.step())
            else:
                out.extend(item)

    for index, event in enumerate(events):
        run_inserts(index)
        category = _category(categories, event)
        if event.kind == "alloc" and category in (weights, optimizer):
            dropped.add(event.storage)
        elif event.kind == "alloc" and category == gradients:
            dropped.add(event.storage)  # its free is the reducer's
            out.extend(reducer.gradient(event))
        elif index in later_gradients and reducer.reduces_in_backward:
            dropped.add(event.storage)  # a later micro-batch's fresh gradient goes through the hooks too
            out.extend(reducer.gradient(event))
        elif index in later_gradients:  # ZeRO-1 accumulates it into .grad as the trace does
            out.extend(reducer.hook())
            out.append(event)
        elif event.kind != "free" or event.storage not in dropped:
            out.append(event)
    run_inserts(len(events))
    return out, {**categories, **keys.categories}


# -- from a model and a TrainConfig ----------------------------------------------------------------------------

def knobs_of(train_config: TrainConfig, hidden_size: int) -> ZeroKnobs:
    """The ZeroKnobs of a DeepSpeed `train_config`: its `zero` with every size resolved for the model
    (`Zero.resolved`: the numbers memtune writes into DeepSpeed's JSON) and its offload in ZeRO's words."""
    zero = train_config.zero
    if zero is None or not train_config.deepspeed:
        raise UsageError(f"the ZeRO estimate is for strategy 'deepspeed' with zero=Zero(...), got "
                         f"{train_config.describe()}: use memtune.predict.estimate.estimate for any configuration")
    sizes = zero.resolved(hidden_size)
    offload = zero.offload_device if train_config.offload != "none" else "none"
    return ZeroKnobs(
        stage=zero.stage, reduce_bucket_elements=sizes["reduce_bucket_size"], overlap_comm=zero.overlap_comm,
        contiguous_gradients=zero.contiguous_gradients or offload != "none",  # forced under offload, 300
        prefetch_bucket_elements=sizes["stage3_prefetch_bucket_size"],
        param_persistence_threshold=sizes["stage3_param_persistence_threshold"],
        max_live_parameters=sizes["stage3_max_live_parameters"], max_reuse_distance=sizes["stage3_max_reuse_distance"],
        sub_group_size=sizes["sub_group_size"], offload_optimizer=offload,
        offload_parameters=offload if train_config.offload == "parameters" else "none",
        foreach_optimizer=train_config.optimizer == "adamw_torch" and offload == "none")


def model_bytes_per_element(train_config: TrainConfig) -> int:
    """b: DeepSpeed trains the model in the autocast dtype when bf16 / fp16 is enabled (memtune's JSON enables it
    from `amp`; engine.py casts the module), else in the weights' dtype."""
    return DTYPE_BYTES[train_config.amp if train_config.amp != "none" else train_config.weights_dtype]


def single_gpu_config(train_config: TrainConfig) -> TrainConfig:
    """The step each rank runs, traced on one GPU: the model in DeepSpeed's dtype without autocast (DeepSpeed's
    bf16 / fp16 mode casts the module; accelerate applies no autocast under DeepSpeed), no wrapper, no offload.
    An adapter keeps peft's fp32 weights under ZeRO-3 only: the engine casts every parameter of a model not built
    under zero.Init (ZeRO-1/2) and none of one that was (engine.py `_cast_module_mixed_precision`, 1851-1862);
    measured on the H200 (issue 15): Llama-3.2-1B LoRA keeps fp32 inputs of its adapted layers under ZeRO-3 only.
    Under ZeRO-3 the frozen base layers also keep their inputs: zero.Init replaces F.linear by DeepSpeed's, which
    saves them (`Adapter.base_saves_input`, traced by `recipe.linear_context`)."""
    dtype = train_config.amp if train_config.amp != "none" else train_config.weights_dtype
    adapter = train_config.adapter
    if adapter is not None and train_config.zero is not None and train_config.zero.stage != 3:
        adapter = dataclasses.replace(adapter, autocast_adapter_dtype=False)
    elif adapter is not None and train_config.zero is not None:  # ZeRO-3's F.linear (recipe.linear_context)
        adapter = dataclasses.replace(adapter, base_saves_input=True)
    return train_config.replace(num_gpus=1, num_nodes=1, strategy="fsdp", zero=None, offload="none",
                                weights_dtype=dtype, amp="none", stochastic_rounding=False, adapter=adapter)


def layout_of(model: Any, num_ranks: int, bytes_per_element: int) -> ZeroLayout:
    """The ZeroLayout of a model (meta tensors are fine): its parameters (deduplicated, in order, floating ones in
    DeepSpeed's dtype) and, in registration order, every module with parameters of its own, placed in its decoder
    layer or before / after them."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    layer_of = {id(module): number for number, layer in enumerate(decoder_layers(model)) for module in layer.modules()}
    modules, seen_layer = [], False
    for module in model.modules():
        unit = layer_of.get(id(module))
        seen_layer = seen_layer or unit is not None
        own = tuple(index[id(p)] for p in module.parameters(recurse=False) if id(p) in index)
        if own:
            modules.append(ZeroModule(unit if unit is not None else AFTER_LAYERS if seen_layer else BEFORE_LAYERS, own))
    zero_params = tuple(ZeroParam(p.numel(), bytes_per_element if p.is_floating_point() else p.element_size(),
                                  p.requires_grad) for p in params)
    return ZeroLayout(zero_params, num_ranks, bytes_per_element, tuple(modules))


_LAYOUT_CACHE: dict[str, ZeroLayout] = {}
_EVENTS_CACHE: dict[str, tuple[list[Event], dict[Hashable, str], Trace, ZeroLayout, ZeroKnobs]] = {}


def cached_layout(model_config: Any, train_config: TrainConfig) -> ZeroLayout:
    """`layout_of` the full-depth model built on the meta device (the adapter applied), cached."""
    from memtune.recipe import step as recipe

    single = single_gpu_config(train_config)
    key = json.dumps([model_config.to_json_string(use_diff=False), single.weights_dtype,
                      single.to_dict()["adapter"], train_config.world_size], sort_keys=True)
    if key not in _LAYOUT_CACHE:
        model = recipe.build_model(model_config, single, "meta")
        _LAYOUT_CACHE[key] = layout_of(model, train_config.world_size, model_bytes_per_element(train_config))
    return _LAYOUT_CACHE[key]


def hidden_size_of(model_config: Any) -> int:
    """H for Zero.resolved's "auto" sizes, as transformers reads it: hidden_size, a text_config's, or the largest of
    hidden_sizes (integrations/deepspeed.py:232-242)."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        size = getattr(config, "hidden_size", None)
        if isinstance(size, int):
            return size
    sizes = getattr(model_config, "hidden_sizes", None)
    if sizes:
        return int(max(sizes))
    raise UsageError(f"the DeepSpeed estimate needs the model's hidden_size for ZeRO's bucket sizes; "
                     f"{model_type_of(model_config)} config has none: set Zero's bucket sizes explicitly")


def zero_step_events(model_config: Any, train_config: TrainConfig, device: str
                     ) -> tuple[list[Event], dict[Hashable, str], Trace, ZeroLayout, ZeroKnobs]:
    """(one rank's events, breakdown key by storage, the single-GPU trace, the layout, the knobs), cached."""
    key = json.dumps([model_config.to_json_string(use_diff=False), train_config.traced().to_dict(), device],
                     sort_keys=True)
    if key not in _EVENTS_CACHE:
        knobs = knobs_of(train_config, hidden_size_of(model_config))
        trace, events = full_depth_events(model_config, single_gpu_config(train_config), device)
        layout = cached_layout(model_config, train_config)
        num_layers = num_layers_of(model_config) or trace.traced_layers
        if 0 < train_config.checkpointed_layers(num_layers) < num_layers:  # extended twice: the tags as they are
            layers = [event.layer for event in events]
        else:
            layers = event_layers(trace, events, num_layers)
        zero, categories = zero_events(events, trace.categories, layout, knobs, layers)
        _EVENTS_CACHE[key] = (zero, categories, trace, layout, knobs)
    return _EVENTS_CACHE[key]


def estimate_zero(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the per-GPU peak of `train_config` (strategy "deepspeed", ZeRO stage 1-3, `num_gpus` ranks, optional
    CPU / NVMe offload) as DeepSpeed 0.19.8 runs it, replayed per stream (`fsdp.simulate_streams`); host_bytes is
    ZeRO's host RAM per rank (`host_bytes`) plus offloaded activations. Raises UsageError for a configuration
    that is not a DeepSpeed one."""
    started = time.perf_counter()
    device = device or default_trace_device()
    events, categories, trace, layout, knobs = zero_step_events(model_config, train_config, device)
    peaks = simulate_streams(events, train_config.expandable_segments)
    num_layers = num_layers_of(model_config) or trace.traced_layers
    host = host_bytes(layout, knobs, train_config.grad_accum_steps) + offloaded_host_bytes(
        model_config, single_gpu_config(train_config), trace)
    return estimate_of_events(train_config, events, categories, peaks=peaks, trace_device=trace.device or device,
                              trace_note=trace.note, traced_layers=trace.traced_layers, num_layers=num_layers,
                              paged_bytes=paged_bytes_at_depth(trace, num_layers), host_bytes=host, started=started,
                              context_bytes=context_bytes + collective_context_bytes(train_config),
                              workspace_bytes=workspace_bytes)
