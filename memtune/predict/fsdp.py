"""Predicted per-GPU peak memory of FSDP2 full sharding over N GPUs, optionally with CPU offload.

    estimate_sharded(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=4))

Approach: run the real thing on fake tensors. One rank of an N-rank job is traced in one process:
a "fake" process group of world size N (torch's collective-free backend) lets FSDP2's `fully_shard`
shard the model exactly as accelerate prepares it (`recipe.parallel.apply_fsdp`), and the step is the
same function the trial runs (`recipe.parallel.fsdp_train_step`). Every storage FSDP2 creates is then
seen as it is on the GPU: 1/N parameter shards, the all-gather input and output buffers, the
gathered (unsharded) parameters of the units in use, including the implicit forward and explicit
backward prefetch, the reduce-scatter buffers, the sharded fp32 gradients, the unsharded
gradients held across micro-batches (Trainer's no_sync), and the optimizer state of the shards.

Three things the plain step trace (`trace.trace_step`) does not need are added here:
- FSDP2 frees and re-allocates gathered parameters by resizing their storage
  (`_fsdp_param.free_storage` / `alloc_storage`); `UntypedStorage.resize_` is watched during the trace.
- FSDP2 allocates on its own CUDA streams (all-gather copy-in, reduce-scatter). The caching allocator
  keeps free blocks per stream, so each stream's allocations are replayed through their own
  `allocator.simulate` and the reserved peaks add up (reserved memory only grows while nothing is
  released, so the sum of per-stream peaks is the peak of the sum). The stream is read from
  `torch.cpu.current_stream()`, which FSDP2 switches on the CPU device just as on CUDA.
- With `offload="parameters"` the trace runs on one fake device, so residency is decided by role:
  parameter shards, the optimizer step and its state stay on the host and are dropped from the
  device stream; each sharded gradient is freed from the device right after it is produced (its
  device-to-host copy); a host-to-device copy of a shard (`shard.to(device)` in
  `FSDPParam.all_gather_inputs`) becomes a real device copy.

Deep models are traced with five periods of layers (`trace.traced_depth` with SHARDED_PERIODS) and
extended to full depth (`extend_sharded`): gathered parameters and prefetch buffers cross layer
boundaries, which `trace.extend` would misplace, so frees are matched by layer distance and by
position within identical layers.

The counter is `trace.StorageCounter` (the plain trace's), with resizes, streams and host residency
added (`ShardedCounter`); the events are `trace.Event`s with their stream, so that one event type and
one `peak.estimate_of_events` serve every estimate.

Known limitations: NCCL's own buffers are outside torch's allocator: `peak.NCCL_BYTES` (measured
with 2 GPUs) is added to the context;
the trace always runs on the CPU (CUDA emulation), whatever the machine; LoRA under FSDP is wrapped
like the dense model, not with transformers' peft-specific wrap policy; cross-stream cache releases
under memory pressure are not modelled (the per-stream sum is exact only below capacity).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from memtune.config import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, TrainConfig
from memtune.errors import MemtuneError
from memtune.predict import allocator, cache, liger
from memtune.predict.emulation import CudaEmulation, GpuKernels
from memtune.predict.peak import Estimate, collective_context_bytes, estimate_of_events
from memtune.predict.trace import (
    COMPUTE_STREAM,
    NO_LAYER,
    Category,
    Event,
    StorageCounter,
    Trace,
    assume_unpacked_batches,
    decoder_layers,
    describe_failure,
    first_tensor,
    layer_period,
    meta_to_fake,
    num_layers_of,
    rounded,
    shallow_config,
    traced_depth,
    untraceable,
)
from memtune.recipe import step as recipe
from memtune.recipe.parallel import apply_fsdp, check_supported, final_norm, fsdp_train_step

FSDP_BUFFERS = "fsdp_buffers"
"""Breakdown key: gathered (unsharded) parameters and FSDP's all-gather / reduce-scatter buffers."""
SHARDED_PERIODS = 5
"""Layer periods the sharded trace holds (`trace.traced_depth`): a first block, three generic ones whose
middle one is the template, and a last one. FSDP's buffers cross one layer boundary, so the template's
neighbours must be generic layers too (`extend_sharded`)."""


class ShardedCounter(StorageCounter):
    """`trace.StorageCounter` plus storage resizes (FSDP's free/re-gather), streams and host residency.

    Autograd's in-place gradient sums (`StorageCounter.in_place_sums`) apply here as on one GPU. They matter where
    a tied embedding's two gradients meet and the LM head's is not a view: Liger's fused loss returns its
    grad_weight as a fresh tensor, which the engine sums into in place (H200, Llama-3.2-1B 2 x 2048 with
    checkpointing and CPU offload on 1 GPU: +11.05% reserved, +2.2% allocated with the sums out of place, -0.04%
    and exact with them; benchmarks/results/history_offload_1gpu_liger_h200.json.gz). Every other measured sharded
    case is unchanged by the rule (results/fsdp_2gpu_h200.json, loss_2gpu_h200.json).
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = Category.WEIGHTS.value
        self.host: set[int] = set()
        """Storage ids that live on the host (offload): left out of the device stream."""
        self.optimizer_ids: set[int] = set()
        """Storage ids allocated during optimizer.step (on the host when offloaded)."""
        self._stream_index: dict[int, int] = {}  # id(stream object) -> stream index
        self._default_stream = torch.cpu.current_stream()
        self.resized: set[int] = set()

    def stream(self) -> int:
        """FSDP2 switches streams on the CPU device as on CUDA: read `torch.cpu.current_stream()`."""
        stream = torch.cpu.current_stream()
        if stream is self._default_stream:
            return COMPUTE_STREAM
        return self._stream_index.setdefault(id(stream), len(self._stream_index) + 1)

    def _alloc(self, storage: Any, num_bytes: int, category: str | None) -> int:
        storage_id = super()._alloc(storage, num_bytes, category)
        if self.phase == Category.OPTIMIZER.value:
            self.optimizer_ids.add(storage_id)
        return storage_id

    def resize(self, storage: Any, num_bytes: int) -> None:
        """A storage resized in place: FSDP2 frees (size 0) and re-allocates gathered parameters this way."""
        current = self._ids.get(storage)
        if current is not None:
            self.resized.add(current)  # its first allocation (torch.empty) was a gathered parameter too
        if current is not None and current in self._sizes:
            if rounded(num_bytes) == self._sizes[current]:
                return
            self._free(current)
        if num_bytes > 0:
            self.resized.add(self._alloc(storage, num_bytes, FSDP_BUFFERS))


@contextlib.contextmanager
def _watch_resizes(counter: ShardedCounter) -> Iterator[None]:
    original = torch.UntypedStorage.resize_

    def resize_(storage: Any, size: int) -> Any:
        result = original(storage, size)
        counter.resize(storage, int(size))
        return result

    # FSDP2 frees and refills its unsharded parameters' storage with resize_ (no new tensor is made), so the
    # counter must see the call itself; patching the method for the trace's duration is the only hook there is.
    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


class _HostToDevice(TorchFunctionMode):
    """Offload on one fake device: `host_tensor.to(device)` is a no-op there, but on the GPU it is a copy."""

    def __init__(self, counter: ShardedCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and out is args[0] and _names_device(args[1:], kwargs):
            ids = self.counter.storage_ids(args[0])
            if ids and ids[0] in self.counter.host:
                return args[0].clone()
        return out


def _names_device(args: tuple, kwargs: dict) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)


@contextlib.contextmanager
def _fake_process_group(world_size: int) -> Iterator[Any]:
    """A collective-free process group of `world_size` ranks in this process (this process is rank 0)."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the "fake" backend
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "estimate_sharded traces with a fake process group and cannot run inside an initialised one; "
            "estimate before init_process_group or in another process"
        )
    # init_process_group replaces sys.excepthook with one that prefixes "[rank0]: " to every line
    # (torch/distributed/distributed_c10d.py) and destroy_process_group leaves it: put the user's back.
    excepthook = sys.excepthook
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


def _tag_layers(layers: list[torch.nn.Module], counter: ShardedCounter) -> list[Any]:
    """Tag events with the decoder layer they belong to, FSDP's own work for the layer included.

    Registered after `fully_shard`: the pre-hook is prepended so that FSDP's all-gather of the layer
    falls inside the layer; a prepended post-hook puts a backward hook on the output before FSDP's
    pre-backward hook (tensor hooks run in order), so the backward unshard and prefetch are tagged too;
    an appended post-hook leaves the layer after FSDP has resharded it; until the next layer starts,
    events stay with the layer just left, so that every generic layer makes the same events.
    (torch's ModTracker cannot order itself around FSDP's hooks: see trace._layer_hooks.)
    """

    def set_base(index: int) -> Any:
        def hook(_: torch.Tensor) -> None:
            counter.base_layer = index

        return hook

    def pre(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            counter.layer_stack.append(index)
            hidden = first_tensor((args, kwargs))
            if index == 0 and hidden is not None and hidden.requires_grad and torch.is_grad_enabled():
                hidden.register_hook(set_base(NO_LAYER))

        return hook

    def before_fsdp(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = first_tensor(output)
            if hidden is not None and hidden.requires_grad and torch.is_grad_enabled():
                hidden.register_hook(set_base(index))

        return hook

    def leave(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            counter.layer_stack.pop()
            if not counter.layer_stack:  # what dies between two layers (the previous hidden state) is this layer's
                counter.base_layer = index

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(index), with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_hook(before_fsdp(index), with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_hook(leave(index), with_kwargs=True, always_call=True))
    return handles


def trace_sharded(model_config: Any, train_config: TrainConfig, steps: int = 2) -> Trace:
    """Events of `steps` sharded optimizer steps on one rank of `train_config.world_size` (all machines' GPUs), at
    full depth.

    A model deeper than SHARDED_PERIODS layer periods is traced at that depth (`trace.traced_depth`) and
    extended (`extend_sharded`); if its layers do not repeat exactly, it is traced at full depth instead.
    Raises UsageError for a configuration FSDP through accelerate cannot run, RuntimeError inside an
    initialised process group.
    """
    depth = num_layers_of(model_config)
    period = layer_period(model_config)
    traced = traced_depth(depth, period, SHARDED_PERIODS)
    if traced < depth:
        shallow = _trace(shallow_config(model_config, traced), train_config, steps)
        events = extend_sharded(shallow, depth, period)
        if events is not None:
            return Trace(events=events, categories=shallow.categories, num_layers=depth, traced_layers=traced,
                         period=period, world_size=shallow.world_size)
    return _trace(model_config, train_config, steps)


def _trace(model_config: Any, train_config: TrainConfig, steps: int) -> Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    check_supported(train_config)
    offload = train_config.offload == "parameters"
    counter = ShardedCounter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = recipe.build_model(model_config, train_config, "meta")
    layers = decoder_layers(model)
    counter.trace.num_layers = counter.trace.traced_layers = len(layers)
    counter.trace.period = layer_period(model_config)
    counter.trace.world_size = train_config.world_size  # FSDP2 shards over every rank of every machine
    micro_batches = min(train_config.grad_accum_steps, 3)
    with _fake_process_group(train_config.world_size) as mesh, assume_unpacked_batches(), fake_mode:
        # The model never exists unsharded on the device (Trainer loads it on the CPU, fully_shard
        # moves shards): shard first, then start counting with the shards already in place.
        meta_to_fake(model, fake_mode, torch.device("cpu"))
        apply_fsdp(model, train_config, mesh=mesh, pin_memory=False)
        if train_config.loss == "liger":  # Liger's kernels cannot run on fake tensors: its allocation-equivalent twin
            liger.substitute_liger(model)
        layer_of = {id(p): index for index, layer in enumerate(layers) for p in [*layer.parameters(), *layer.buffers()]}
        optimizer = recipe.make_optimizer(model, train_config, fused=True)
        hooks = _tag_layers(layers, counter)
        trainable = [p for p in model.parameters() if p.requires_grad]

        def set_phase(phase: str) -> Any:
            return lambda *_: setattr(counter, "phase", phase)

        hooks.append(model.register_forward_pre_hook(set_phase(Category.ACTIVATIONS.value)))
        hooks.append(model.register_forward_hook(set_phase(Category.TEMPORARIES.value)))
        norm = final_norm(model)
        if norm is not None:

            def logits_phase(module: Any, args: tuple, output: Any) -> None:
                # What follows the final norm is logits and loss, until the norm's output has its gradient (as
                # trace._logits_hook does from the head's input). Not a hook on the head: under FSDP the chunked
                # loss multiplies by the head's gathered weight without calling it (recipe.loss._head_logits).
                counter.phase = Category.LOGITS.value
                if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
                    output.register_hook(set_phase(Category.TEMPORARIES.value))

            hooks.append(norm.register_forward_hook(logits_phase))

        def before_step(*_: Any) -> None:
            counter.retag([p.grad for p in trainable if p.grad is not None], Category.GRADIENTS.value)
            counter.phase = Category.OPTIMIZER.value

        def after_step(stepped: torch.optim.Optimizer, *_: Any) -> None:
            for param, state in stepped.state.items():
                counter.retag(list(state.values()), Category.OPTIMIZER.value)
                counter.relayer(list(state.values()), layer_of.get(id(param), NO_LAYER))
            counter.phase = Category.TEMPORARIES.value

        hooks.append(optimizer.register_step_pre_hook(before_step))
        hooks.append(optimizer.register_step_post_hook(after_step))
        host_copies = _HostToDevice(counter) if offload else contextlib.nullcontext()
        with counter, _watch_resizes(counter), GpuKernels(), CudaEmulation(train_config.gpu_capability), host_copies:
            for item in [*model.parameters(), *model.buffers()]:
                counter.base_layer = layer_of.get(id(item), NO_LAYER)
                local = item.to_local() if hasattr(item, "to_local") else item
                storage_id = counter.track(local, Category.WEIGHTS.value)
                if offload and storage_id is not None and isinstance(item, torch.nn.Parameter):
                    counter.host.add(storage_id)
            counter.base_layer = NO_LAYER
            for _ in range(steps):
                counter.phase = Category.ACTIVATIONS.value
                batches = [recipe.random_batch(model_config, train_config, "cpu") for _ in range(micro_batches)]
                fsdp_train_step(model, optimizer, batches, train_config, read_loss=False)
                counter.base_layer = NO_LAYER
                del batches
            for hook in hooks:
                hook.remove()
            trainable.clear()  # the step hooks hold the list
            del model, optimizer, layers
            gc.collect()  # FSDP's state holds reference cycles: free what the model held, inside the trace
            counter.closed = True
            counter.raise_interrupt()  # a Ctrl-C that landed in a weakref callback during that collection
    trace = counter.trace
    for storage_id in counter.resized:
        trace.categories[storage_id] = FSDP_BUFFERS
    for event in trace.events:
        on_fsdp_stream = event.kind == "alloc" and event.stream != COMPUTE_STREAM
        if on_fsdp_stream and trace.categories[event.source] != Category.GRADIENTS.value:
            trace.categories[event.source] = FSDP_BUFFERS
    if offload:
        trace.events = _offloaded(trace, counter.host | counter.optimizer_ids)
    return trace


def extend_sharded(trace: Trace, depth: int, period: int) -> list[Event] | None:
    """The events of the same sharded steps on a `depth`-layer model, from a trace of SHARDED_PERIODS
    periods (+ remainder, `trace.traced_depth`).

    Traced blocks of `period` layers: first [0, p), generic [p, 4p) whose middle block [2p, 3p) is the
    template, last [4p, T). The template's runs of events are repeated in place, in order in forward
    and reverse in backward. Gathered parameters, prefetch and reduce-scatter buffers and hidden states
    cross one layer boundary, so a free is matched to the allocation at the same layer distance; when
    that allocation belongs to a template copy but was traced in a neighbouring generic layer, the
    storage with the same position in the template layer's matching run stands in for it (generic
    layers make identical events, which is checked). Each copy gets a storage of its own and its real
    layer; `Event.source` keeps the traced storage (the key of `trace.categories`). Returns None when
    the layers do not repeat exactly, or a free reaches further than the generic layers; the caller
    then traces at full depth.
    """
    p, traced = period, trace.traced_layers
    copies = (depth - traced) // p + 1  # template blocks in the extended model
    if traced < SHARDED_PERIODS * p or (depth - traced) % p or copies < 2:
        return None
    shift = depth - traced
    template = range(2 * p, 3 * p)
    generic = range(p, 4 * p)

    visits: dict[int, list[list[Event]]] = {}
    events = trace.events
    start = 0
    for index in range(1, len(events) + 1):
        if index == len(events) or events[index].layer != events[start].layer:
            visits.setdefault(events[start].layer, []).append(events[start:index])
            start = index
    # position of each alloc inside the visits of its layer, and the reverse lookup
    where: dict[Hashable, tuple[int, int, int]] = {}
    by_position: dict[tuple[int, int, int], Hashable] = {}
    for layer, layer_visits in visits.items():
        for number, visit in enumerate(layer_visits):
            for position, event in enumerate(visit):
                if event.kind == "alloc":
                    where[event.storage] = (layer, number, position)
                    by_position[(layer, number, position)] = event.storage

    def signature(layer: int) -> list[list[tuple]]:
        return [[(event.kind, event.num_bytes, event.stream,
                  trace.categories.get(event.source) if event.kind == "alloc" else None)
                 for event in visit] for visit in visits.get(layer, [])]

    for layer in generic:
        if signature(layer) != signature(2 * p + layer % p):
            return None

    def real(layer: int, copy: int) -> int:
        if layer in template:
            return layer + copy * p
        return layer + shift if layer >= 3 * p else layer

    def traced_of(real_layer: int) -> int:
        if real_layer < 2 * p:
            return real_layer
        if real_layer < 2 * p + copies * p:
            return 2 * p + (real_layer - 2 * p) % p
        return real_layer - shift

    out: list[Event] = []
    live: dict[tuple[Hashable, int], Event] = {}  # (traced storage, real layer) -> its copy's alloc
    next_id = 0

    def emit(event: Event, copy: int) -> bool:
        nonlocal next_id
        sid, layer = event.storage, event.layer
        here = NO_LAYER if layer == NO_LAYER else real(layer, copy)
        if event.kind == "alloc":
            live[(sid, here)] = copied = event._replace(storage=next_id, layer=here)
            next_id += 1
            out.append(copied)
            return True
        alloc_layer = where.get(sid, (NO_LAYER, 0, 0))[0]
        if alloc_layer == NO_LAYER:
            targets = [(sid, NO_LAYER)]
        elif layer == NO_LAYER:  # outside the layers (zero_grad, teardown): every copy goes
            if alloc_layer in template:
                targets = [(sid, real(alloc_layer, c)) for c in range(copies)]
            else:
                targets = [(sid, real(alloc_layer, 0))]
        else:
            origin = here + (alloc_layer - layer)
            stand_in = traced_of(origin)
            if stand_in == alloc_layer:
                targets = [(sid, origin)]
            elif stand_in in generic and alloc_layer in generic and stand_in % p == alloc_layer % p:
                _, number, position = where[sid]
                targets = [(by_position[(stand_in, number, position)], origin)]
            else:
                return False
        for key in targets:
            if key in live:
                copied = live.pop(key)
                out.append(Event("free", copied.storage, 0, here, copied.source, copied.stream))
        return True

    index = 0
    while index < len(events):
        if events[index].layer not in template:
            if not emit(events[index], 0):
                return None
            index += 1
            continue
        end = index
        while end < len(events) and events[end].layer in template:
            end += 1
        following = next((e.layer for e in events[end:] if e.layer != NO_LAYER), None)
        order = range(copies - 1, -1, -1) if following is not None and following < 2 * p else range(copies)
        for copy in order:
            for event in events[index:end]:
                if not emit(event, copy):
                    return None
        index = end
    return out


def _offloaded(trace: Trace, host: set[int]) -> list[Event]:
    """The device's events under CPU offload: host storages left out, sharded gradients freed from the
    device as soon as they are made (FSDP copies them to the host in the same post-backward)."""
    gradients = {sid for sid, category in trace.categories.items() if category == Category.GRADIENTS.value}
    events: list[Event] = []
    for event in trace.events:
        if event.storage in host or (event.kind == "free" and event.storage in gradients):
            continue
        events.append(event)
        if event.kind == "alloc" and event.storage in gradients:
            events.append(Event.free(event.storage, event.layer, event.stream))
    return events


# ---- the estimate ---------------------------------------------------------------------------------

_TRACE_CACHE: dict[str, Trace] = {}


def cached_trace_sharded(model_config: Any, train_config: TrainConfig) -> Trace:
    """`trace_sharded` of the configuration, cached per (model config, configuration), in the process and on disk
    (`predict.cache`, as the single-GPU traces: a second plan of the same sharded step reads it)."""
    key = json.dumps(["sharded", model_config.to_json_string(use_diff=False), train_config.traced().to_dict()],
                     sort_keys=True)
    if key not in _TRACE_CACHE:
        stored = cache.load(key)
        if stored is not None:
            _TRACE_CACHE[key] = stored
            return stored
        try:
            _TRACE_CACHE[key] = trace_sharded(model_config, train_config)
            cache.store(key, _TRACE_CACHE[key])
        except MemtuneError:
            raise
        except Exception as error:  # the sharded trace has one path (CPU): no fallback, a clear error
            failure = f"the sharded (FSDP) trace on the cpu path failed: {describe_failure(error)}"
            raise untraceable(model_config, [failure], "--strategy ddp (or one GPU) without --offload") from error
    return _TRACE_CACHE[key]


def simulate_streams(events: list[Event], expandable: bool = False) -> tuple[int, int]:
    """(peak allocated, peak reserved), each stream's blocks replayed through a cache of their own (with
    `expandable`, a segment of their own)."""
    by_stream: dict[int, list[Event]] = {}
    for event in events:
        by_stream.setdefault(event.stream, []).append(event)
    peak_allocated = allocator.simulate(events).peak_allocated_bytes
    peak_reserved = sum(allocator.simulate(stream_events, expandable=expandable).peak_reserved_bytes
                        for stream_events in by_stream.values())
    return peak_allocated, peak_reserved


def estimate_sharded(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the per-GPU peak of `train_config` trained with FSDP2 full sharding over `world_size` GPUs
    (CPU offload with `offload="parameters"`), as `accelerate launch` + Trainer run it.

    `device` is accepted for symmetry with `estimate.estimate`; the sharded trace always runs on the
    CPU with CUDA emulation (FSDP's streams and storage resizes are followed there). Whether it fits a
    budget is `Estimate.fits(budget)`: conservative, as the per-stream caches are never released here
    (under pressure torch releases wholly free segments and retries).
    """
    started = time.perf_counter()
    context_bytes += collective_context_bytes(train_config)
    trace = cached_trace_sharded(model_config, train_config)
    peaks = simulate_streams(trace.events, train_config.expandable_segments)
    return estimate_of_events(train_config, trace.events, trace.categories, peaks=peaks, trace_device="cpu",
                              traced_layers=trace.traced_layers, num_layers=trace.num_layers,
                              started=started, context_bytes=context_bytes, workspace_bytes=workspace_bytes)
