"""Predicted per-GPU peak memory of FSDP2 full sharding over N GPUs, optionally with CPU offload.

    estimate_sharded(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=4))

Approach: run the real thing on fake tensors. One rank of an N-rank job is traced in one process:
a "fake" process group of world size N (torch's collective-free backend) lets FSDP2's `fully_shard`
shard the model exactly as accelerate prepares it (`distributed.apply_fsdp`), and the step is the
same function the trial runs (`distributed.fsdp_train_step`). Every storage FSDP2 creates is then
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

Deep models are traced with five periods of layers and extended to full depth (`extend_sharded`):
gathered parameters and prefetch buffers cross layer boundaries, which `trace.extend` would
misplace, so frees are matched by layer distance and by position within identical layers.

Known limitations: NCCL's own buffers are outside torch's allocator: `estimate.NCCL_BYTES` (measured
with 2 GPUs) is added to the context;
the trace always runs on the CPU (CUDA emulation), whatever the machine; LoRA under FSDP is wrapped
like the dense model, not with transformers' peft-specific wrap policy; cross-stream cache releases
under memory pressure are not modelled (the per-stream sum is exact only below capacity).
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from memtune.config import TrainConfig
from memtune.predict import allocator
from memtune.predict.estimate import (
    DEFAULT_CONTEXT_BYTES,
    DEFAULT_WORKSPACE_BYTES,
    Estimate,
    collective_context_bytes,
    estimate_of_events,
    num_layers_of,
)
from memtune.predict.trace import (
    NO_LAYER,
    Category,
    CudaEmulation,
    LayerTaggedDispatch,
    rounded,
)

FSDP_BUFFERS = "fsdp_buffers"
"""Breakdown key: gathered (unsharded) parameters and FSDP's all-gather / reduce-scatter buffers."""
COMPUTE_STREAM = 0


@dataclass
class ShardedTrace:
    """Allocation events of one rank's sharded steps: ("alloc", id, bytes, layer) / ("free", id, 0, layer)."""

    events: list[tuple[str, int, int, int]] = field(default_factory=list)
    categories: dict[int, str] = field(default_factory=dict)
    """Storage id -> breakdown key (a `Category` value or FSDP_BUFFERS)."""
    streams: dict[int, int] = field(default_factory=dict)
    """Storage id -> the stream it was allocated on (COMPUTE_STREAM = the default stream)."""
    num_layers: int = 0
    traced_layers: int = 0
    """Decoder layers actually traced (fewer than num_layers when the trace was extended)."""
    world_size: int = 1


class _ShardedCounter(LayerTaggedDispatch):
    """Like `trace.StorageCounter`, plus storage resizes (FSDP's free/re-gather), streams and host residency."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = ShardedTrace()
        self.phase: str = Category.WEIGHTS.value
        self.host: set[int] = set()
        """Storage ids that live on the host (offload): left out of the device stream."""
        self.optimizer_ids: set[int] = set()
        """Storage ids allocated during optimizer.step (on the host when offloaded)."""
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> its current id
        self._live: dict[int, int] = {}  # id -> bytes, while allocated
        self._next_id = 0
        self._alloc_index: dict[int, int] = {}  # id -> index of its alloc event
        self._streams: dict[int, int] = {}  # id(stream object) -> stream index
        self._default_stream = torch.cpu.current_stream()
        self.resized: set[int] = set()
        self.closed = False
        """Set when the trace is complete: storages that die later (garbage collection) are not recorded."""

    def _stream(self) -> int:
        stream = torch.cpu.current_stream()
        if stream is self._default_stream:
            return COMPUTE_STREAM
        return self._streams.setdefault(id(stream), len(self._streams) + 1)

    def _alloc(self, storage: Any, num_bytes: int, category: str | None) -> int:
        storage_id = self._next_id
        self._next_id += 1
        self._ids[storage] = storage_id
        weakref.finalize(storage, self._free, storage_id)
        self._live[storage_id] = rounded(num_bytes)
        self.trace.categories[storage_id] = category or self.phase
        self.trace.streams[storage_id] = self._stream()
        if self.phase == Category.OPTIMIZER.value:
            self.optimizer_ids.add(storage_id)
        self._alloc_index[storage_id] = len(self.trace.events)
        self.trace.events.append(("alloc", storage_id, rounded(num_bytes), self.layer))
        return storage_id

    def _free(self, storage_id: int) -> None:
        if not self.closed and self._live.pop(storage_id, None) is not None:
            self.trace.events.append(("free", storage_id, 0, self.layer))

    def track(self, tensor: torch.Tensor, category: str | None = None) -> int | None:
        if is_traceable_wrapper_subclass(tensor):  # a DTensor: its local tensor is tracked by the inner op
            return None
        storage = tensor.untyped_storage()
        if storage in self._ids:
            return self._ids[storage]
        if storage.nbytes() == 0:
            return None
        return self._alloc(storage, storage.nbytes(), category)

    def resize(self, storage: Any, num_bytes: int) -> None:
        """A storage resized in place: FSDP2 frees (size 0) and re-allocates gathered parameters this way."""
        current = self._ids.get(storage)
        if current is not None:
            self.resized.add(current)  # its first allocation (torch.empty) was a gathered parameter too
        if current is not None and current in self._live:
            if rounded(num_bytes) == self._live[current]:
                return
            self._free(current)
        if num_bytes > 0:
            self.resized.add(self._alloc(storage, num_bytes, FSDP_BUFFERS))

    def storage_ids(self, tensors: Any) -> list[int]:
        ids = []
        for item in tree_flatten(tensors)[0]:
            if isinstance(item, torch.Tensor):
                local = item.to_local() if hasattr(item, "to_local") else item
                storage_id = self._ids.get(local.untyped_storage())
                if storage_id is not None:
                    ids.append(storage_id)
        return ids

    def retag(self, tensors: Any, category: str) -> None:
        for storage_id in self.storage_ids(tensors):
            self.trace.categories[storage_id] = category

    def relayer(self, tensors: Any, layer: int) -> None:
        """Move the alloc events of these storages into `layer` (optimizer state belongs to its parameter's layer)."""
        for storage_id in self.storage_ids(tensors):
            index = self._alloc_index.get(storage_id)
            if index is not None:
                kind, sid, size, _ = self.trace.events[index]
                self.trace.events[index] = (kind, sid, size, layer)


@contextlib.contextmanager
def _watch_resizes(counter: _ShardedCounter) -> Iterator[None]:
    original = torch.UntypedStorage.resize_

    def resize_(storage: Any, size: int) -> Any:
        result = original(storage, size)
        counter.resize(storage, int(size))
        return result

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


class _HostToDevice(TorchFunctionMode):
    """Offload on one fake device: `host_tensor.to(device)` is a no-op there, but on the GPU it is a copy."""

    def __init__(self, counter: _ShardedCounter) -> None:
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
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def _first_tensor(value: Any) -> torch.Tensor | None:
    for item in tree_flatten(value)[0]:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _tag_layers(layers: list[torch.nn.Module], counter: _ShardedCounter) -> list[Any]:
    """Tag events with the decoder layer they belong to, FSDP's own work for the layer included.

    Registered after `fully_shard`: the pre-hook is prepended so that FSDP's all-gather of the layer
    falls inside the layer; a prepended post-hook puts a backward hook on the output before FSDP's
    pre-backward hook (tensor hooks run in order), so the backward unshard and prefetch are tagged too;
    an appended post-hook leaves the layer after FSDP has resharded it; until the next layer starts,
    events stay with the layer just left, so that every generic layer makes the same events.
    """

    def set_base(index: int) -> Any:
        def hook(_: torch.Tensor) -> None:
            counter.base_layer = index

        return hook

    def pre(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            counter.layer_stack.append(index)
            hidden = _first_tensor((args, kwargs))
            if index == 0 and hidden is not None and hidden.requires_grad and torch.is_grad_enabled():
                hidden.register_hook(set_base(NO_LAYER))

        return hook

    def before_fsdp(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = _first_tensor(output)
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


def traced_depth(depth: int, period: int) -> int:
    """Five periods of layers (a first, three generic and a last block) plus the remainder, or all."""
    shallow = 5 * period + (depth - 5 * period) % period
    return depth if depth <= shallow else shallow


def trace_sharded(model_config: Any, train_config: TrainConfig, steps: int = 2) -> ShardedTrace:
    """Events of `steps` sharded optimizer steps on one rank of `train_config.num_gpus`, at full depth.

    A model deeper than five layer periods is traced at that depth and extended (`extend_sharded`);
    if its layers do not repeat exactly, it is traced at full depth instead.
    """
    from memtune.predict.estimate import shallow_config
    from memtune.predict.trace import layer_period

    depth = num_layers_of(model_config)
    period = layer_period(model_config)
    traced = traced_depth(depth, period)
    if traced < depth:
        extended = extend_sharded(_trace(shallow_config(model_config, traced), train_config, steps), depth, period)
        if extended is not None:
            return extended
    return _trace(model_config, train_config, steps)


def _trace(model_config: Any, train_config: TrainConfig, steps: int) -> ShardedTrace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtune.predict.trace import (
        StorageCounter,
        _assume_unpacked_batches,
        _meta_to_fake,
        decoder_layers,
    )
    from memtune.recipe import step as recipe
    from memtune.recipe.parallel import apply_fsdp, check_supported, fsdp_train_step

    check_supported(train_config)
    offload = train_config.offload == "parameters"
    counter = _ShardedCounter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = recipe.build_model(model_config, train_config, "meta")
    layers = decoder_layers(model)
    counter.trace.num_layers = counter.trace.traced_layers = len(layers)
    counter.trace.world_size = train_config.num_gpus
    micro_batches = min(train_config.grad_accum_steps, 3)
    with _fake_process_group(train_config.num_gpus) as mesh, _assume_unpacked_batches(), fake_mode:
        # The model never exists unsharded on the device (Trainer loads it on the CPU, fully_shard
        # moves shards): shard first, then start counting with the shards already in place.
        _meta_to_fake(model, fake_mode, torch.device("cpu"), StorageCounter(), {})
        apply_fsdp(model, train_config, mesh=mesh, pin_memory=False)
        layer_of = {id(p): index for index, layer in enumerate(layers) for p in [*layer.parameters(), *layer.buffers()]}
        optimizer = recipe.make_optimizer(model, fused=True)
        hooks = _tag_layers(layers, counter)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        trainable = [p for p in model.parameters() if p.requires_grad]

        def set_phase(phase: str) -> Any:
            return lambda *_: setattr(counter, "phase", phase)

        hooks.append(model.register_forward_pre_hook(set_phase(Category.ACTIVATIONS.value)))
        hooks.append(model.register_forward_hook(set_phase(Category.TEMPORARIES.value)))
        if head is not None:
            hooks.append(head.register_forward_pre_hook(set_phase(Category.LOGITS.value)))

        def before_step(*_: Any) -> None:
            counter.retag([p.grad for p in trainable if p.grad is not None], Category.GRADIENTS.value)
            counter.phase = Category.OPTIMIZER.value

        def after_step(*_: Any) -> None:
            for param, state in optimizer.state.items():
                counter.retag(list(state.values()), Category.OPTIMIZER.value)
                counter.relayer(list(state.values()), layer_of.get(id(param), NO_LAYER))
            counter.phase = Category.TEMPORARIES.value

        hooks.append(optimizer.register_step_pre_hook(before_step))
        hooks.append(optimizer.register_step_post_hook(after_step))
        host_copies = _HostToDevice(counter) if offload else contextlib.nullcontext()
        with counter, _watch_resizes(counter), CudaEmulation(), host_copies:
            for item in [*model.parameters(), *model.buffers()]:
                counter.base_layer = layer_of.get(id(item), NO_LAYER)
                storage_id = counter.track(item.to_local() if hasattr(item, "to_local") else item, Category.WEIGHTS.value)
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
            del model, optimizer, trainable, head, layers
            gc.collect()  # FSDP's state holds reference cycles: free what the model held, inside the trace
            counter.closed = True
    trace = counter.trace
    for storage_id in counter.resized:
        trace.categories[storage_id] = FSDP_BUFFERS
    for storage_id, stream in trace.streams.items():
        if stream != COMPUTE_STREAM and trace.categories[storage_id] != Category.GRADIENTS.value:
            trace.categories[storage_id] = FSDP_BUFFERS
    if offload:
        trace.events = _offloaded(trace, counter.host | counter.optimizer_ids)
    return trace


def extend_sharded(trace: ShardedTrace, depth: int, period: int) -> ShardedTrace | None:
    """The events of the same sharded steps on a `depth`-layer model, from a trace of 5 periods (+ remainder).

    Traced blocks of `period` layers: first [0, p), generic [p, 4p) whose middle block [2p, 3p) is the
    template, last [4p, T). The template's runs of events are repeated in place, in order in forward
    and reverse in backward. Gathered parameters, prefetch and reduce-scatter buffers and hidden states
    cross one layer boundary, so a free is matched to the allocation at the same layer distance; when
    that allocation belongs to a template copy but was traced in a neighbouring generic layer, the
    storage with the same position in the template layer's matching run stands in for it (generic
    layers make identical events, which is checked). Returns None when the layers do not repeat
    exactly, or a free reaches further than the generic layers; the caller then traces at full depth.
    """
    p, traced = period, trace.num_layers
    copies = (depth - traced) // p + 1  # template blocks in the extended model
    if traced < 5 * p or (depth - traced) % p or copies < 2:
        return None
    shift = depth - traced
    template = range(2 * p, 3 * p)
    generic = range(p, 4 * p)

    visits: dict[int, list[list[tuple]]] = {}
    events = trace.events
    start = 0
    for index in range(1, len(events) + 1):
        if index == len(events) or events[index][3] != events[start][3]:
            visits.setdefault(events[start][3], []).append(events[start:index])
            start = index
    # position of each alloc inside the visits of its layer, and the reverse lookup
    where: dict[int, tuple[int, int, int]] = {}
    by_position: dict[tuple[int, int, int], int] = {}
    for layer, layer_visits in visits.items():
        for number, visit in enumerate(layer_visits):
            for position, (kind, sid, _, _) in enumerate(visit):
                if kind == "alloc":
                    where[sid] = (layer, number, position)
                    by_position[(layer, number, position)] = sid

    def signature(layer: int) -> list[list[tuple]]:
        return [[(kind, size, trace.streams.get(sid), trace.categories.get(sid) if kind == "alloc" else None)
                 for kind, sid, size, _ in visit] for visit in visits.get(layer, [])]

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

    out = ShardedTrace(num_layers=depth, traced_layers=traced, world_size=trace.world_size)
    keys: dict[tuple[int, int], int] = {}

    def emit(event: tuple, copy: int) -> bool:
        kind, sid, size, layer = event
        here = NO_LAYER if layer == NO_LAYER else real(layer, copy)
        if kind == "alloc":
            new_id = len(out.categories)
            keys[(sid, here)] = new_id
            out.categories[new_id] = trace.categories[sid]
            out.streams[new_id] = trace.streams[sid]
            out.events.append(("alloc", new_id, size, here))
            return True
        alloc_layer = where.get(sid, (NO_LAYER, 0, 0))[0]
        if alloc_layer == NO_LAYER:
            targets = [(sid, NO_LAYER)]
        elif layer == NO_LAYER:  # outside the layers (zero_grad, teardown): every copy goes
            targets = [(sid, real(alloc_layer, c)) for c in range(copies)] if alloc_layer in template else [(sid, real(alloc_layer, 0))]
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
            new_id = keys.pop(key, None)
            if new_id is not None:
                out.events.append(("free", new_id, 0, here))
        return True

    index = 0
    while index < len(events):
        if events[index][3] not in template:
            if not emit(events[index], 0):
                return None
            index += 1
            continue
        end = index
        while end < len(events) and events[end][3] in template:
            end += 1
        following = next((e[3] for e in events[end:] if e[3] != NO_LAYER), None)
        order = range(copies - 1, -1, -1) if following is not None and following < 2 * p else range(copies)
        for copy in order:
            for event in events[index:end]:
                if not emit(event, copy):
                    return None
        index = end
    return out


def _offloaded(trace: ShardedTrace, host: set[int]) -> list[tuple]:
    """The device's events under CPU offload: host storages left out, sharded gradients freed from the
    device as soon as they are made (FSDP copies them to the host in the same post-backward)."""
    gradients = {sid for sid, category in trace.categories.items() if category == Category.GRADIENTS.value}
    events: list[tuple] = []
    for event in trace.events:
        kind, storage_id, _, layer = event
        if storage_id in host or (kind == "free" and storage_id in gradients):
            continue
        events.append(event)
        if kind == "alloc" and storage_id in gradients:
            events.append(("free", storage_id, 0, layer))
    return events


# ---- the estimate ---------------------------------------------------------------------------------

_TRACE_CACHE: dict[str, ShardedTrace] = {}


def cached_trace_sharded(model_config: Any, train_config: TrainConfig) -> ShardedTrace:
    key = json.dumps([model_config.to_json_string(use_diff=False), train_config.to_dict()], sort_keys=True)
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = trace_sharded(model_config, train_config)
    return _TRACE_CACHE[key]


def simulate_streams(trace: ShardedTrace) -> tuple[int, int]:
    """(peak allocated, peak reserved), each stream's blocks replayed through a cache of their own."""
    by_stream: dict[int, list[tuple]] = {}
    for event in trace.events:
        by_stream.setdefault(trace.streams[event[1]], []).append(event)
    peak_allocated = allocator.simulate(trace.events).peak_allocated_bytes
    peak_reserved = sum(allocator.simulate(events).peak_reserved_bytes for events in by_stream.values())
    return peak_allocated, peak_reserved


def estimate_sharded(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the per-GPU peak of `train_config` trained with FSDP2 full sharding over `num_gpus` GPUs
    (CPU offload with `offload="parameters"`), as `accelerate launch` + Trainer run it.

    `device` is accepted for symmetry with `estimate.estimate`; the sharded trace always runs on the
    CPU with CUDA emulation (FSDP's streams and storage resizes are followed there). Whether it fits a
    budget is `Estimate.fits(budget)`: conservative, as the per-stream caches are never released here
    (under pressure torch releases wholly free segments and retries).
    """
    started = time.perf_counter()
    context_bytes += collective_context_bytes(train_config)
    trace = cached_trace_sharded(model_config, train_config)
    return estimate_of_events(train_config, trace.events, trace.categories, peaks=simulate_streams(trace), sid_field=1,
                              trace_device="cpu", traced_layers=trace.traced_layers, num_layers=trace.num_layers,
                              started=started, context_bytes=context_bytes, workspace_bytes=workspace_bytes)


def estimate_any(model_config: Any, train_config: TrainConfig, **kwargs: Any) -> Estimate:
    """The estimate for how the configuration runs: `replicate.estimate_replicated` for DDP (strategy
    "ddp" over several GPUs), `estimate_sharded` for FSDP (num_gpus > 1 or CPU offload), else `estimate.estimate`."""
    if train_config.replicated:
        from memtune.predict.ddp import estimate_replicated

        return estimate_replicated(model_config, train_config, **kwargs)
    if train_config.sharded:
        return estimate_sharded(model_config, train_config, **kwargs)
    from memtune.predict.estimate import estimate

    return estimate(model_config, train_config, **kwargs)
