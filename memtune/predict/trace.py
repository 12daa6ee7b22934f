"""One training step under fake tensors -> the allocation events it makes, by memory category.

The model is built from its config inside `FakeTensorMode`: tensors carry shapes, dtypes and
devices but no data, so a 70B model costs no memory. A dispatch mode sees every aten op and
records each new storage (rounded up to 512 bytes, as the CUDA caching allocator does) and, through a
weak reference, the moment it is freed (`StorageCounter`, which the sharded trace in fsdp.py extends).
The result is the same stream of allocations and frees a real step makes (`Event`s), which
`allocator.simulate` turns into peak allocated and reserved memory. A deep model is traced at a few
layers (`traced_depth`) and its events extended to full depth (`extend`).

Two devices:
- "cuda": fake CUDA tensors. Autocast, SDPA kernel choice and dropout run exactly as on the GPU.
  Needs a CUDA build of torch and a visible GPU (autograd's engine touches the device).
- "cpu": fake CPU tensors plus `emulation.CudaEmulation`, a function mode that makes the CPU trace do
  what CUDA would: autocast's fp32 op list, the fused SDPA kernels (flash / memory-efficient) instead of
  the math fallback, and dropout with a 1-byte mask. This path needs no GPU (laptops, CI).

Known limitations: allocations made inside kernels (flash-attention backward's accumulators, cuBLAS
workspaces) are not seen; `estimate` adds them as overhead. Data-dependent ops (`.item()`) can fail
under fake tensors, on one path and not the other (OPT's `aten._local_scalar_dense` on fake CUDA):
single.cached_trace then traces on the other path, and says so.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from memtune.config import BITSANDBYTES_OPTIMIZERS, PAGED_OPTIMIZERS, TORCHAO_OPTIMIZERS, TrainConfig
from memtune.errors import UsageError
from memtune.predict import eval_step, liger, quantized, trl_step
from memtune.predict.emulation import IN_ATTENTION, AttentionScope, CudaEmulation, GpuKernels
from memtune.predict.events import (  # noqa: E402,F401 - re-exported: the trace's own vocabulary
    BLOCK_BYTES,
    COMPUTE_STREAM,
    NO_LAYER,
    Category,
    Event,
    rounded,
)
from memtune.recipe import step as recipe
from memtune.recipe.loss import causal_lm_of


@dataclass
class Trace:
    """The allocation events of a traced step, with the role of every storage."""

    events: list[Event] = field(default_factory=list)
    categories: dict[Hashable, str] = field(default_factory=dict)
    """`Event.source` -> breakdown key: a `Category` or another key (FSDP's buffers, DDP's buckets)."""
    num_layers: int = 0
    """Decoder layers of the model the events describe."""
    traced_layers: int = 0
    """Decoder layers actually traced (fewer than num_layers when the trace was extended)."""
    period: int = 1
    """Layers repeat with this period (2 for alternating sliding/full attention)."""
    world_size: int = 1
    """GPUs of the job (one rank's events are traced)."""
    peak_allocated_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    """Live bytes by category at the moment of the allocated peak (`StorageCounter.finish`)."""
    device: str = ""
    """Where the step was traced: "cuda" (fake CUDA tensors) or "cpu" (CUDA emulation)."""
    note: str = ""
    """Why it was traced there when another path was asked for (single.cached_trace's fallback), else ""."""
    host_bytes: dict[int, int] = field(default_factory=dict)
    """Pinned host memory holding the offloaded inputs of checkpointed layers (`TrainConfig.offload_activations`)
    at the end of one micro-batch's forward, by decoder layer, in torch's pinned blocks (`host_block`): see
    `offload_to_host`; `host_bytes_at_depth` for the full model."""
    paged_bytes: dict[int, int] = field(default_factory=dict)
    """Optimizer state in CUDA unified memory (paged optimizers), outside the events, by the decoder layer of
    its parameter (NO_LAYER outside them): see `traced_optimizer`; `paged_bytes_at_depth` for the full model."""
    autotune_clones: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    """Storages that are Inductor's autotuning clones of a compiled kernel's in-place arguments, each as (the
    kernel's first launch, the argument's position): made only while they fit under the peak so far
    (`budget_autotune_clones`, applied to the full model's events)."""
    eval_first_storage: int | None = None
    """The first storage Trainer's evaluation loop made (`eval_step.trace_evaluation`, after the training steps when
    `TrainConfig.eval_batch_size` is set): every storage from this id on is evaluation's; None without evaluation."""


KERNEL_ALLOCATION_ORDER: dict[Any, tuple[int, ...]] = {
    # aten/src/ATen/native/cuda/Dropout.cu `dropout_cuda`: the mask is allocated before the output.
    torch.ops.aten.native_dropout.default: (1, 0),
}
"""Ops whose CUDA kernel allocates its outputs in another order than it returns them: output indices in
the kernel's allocation order. A fake op's outputs all exist when it returns, so the trace records them
in this order; where two outputs go to the large pool, the order decides which free block each takes."""


def _plain_tensors(items: list[Any]) -> list[Any]:
    """`items` with every traceable wrapper subclass (torchao's quantised optimizer state) replaced by the plain
    tensors that hold its storage (`__tensor_flatten__`), recursively; DTensors (`to_local`, which the caller
    takes) and other items as they are."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, torch.Tensor) and is_traceable_wrapper_subclass(item) and not hasattr(item, "to_local"):
            names, _ = item.__tensor_flatten__()
            out += _plain_tensors([getattr(item, name) for name in names])
        else:
            out.append(item)
    return out


def kernel_allocation_order(func: Any, outputs: list[Any]) -> list[Any]:
    """`outputs` (an op's flattened results) in the order its CUDA kernel allocates them
    (`KERNEL_ALLOCATION_ORDER`; others as returned)."""
    order = KERNEL_ALLOCATION_ORDER.get(func)
    if order is None or len(outputs) < len(order):
        return outputs
    return [outputs[index] for index in order] + outputs[len(order):]


class StorageCounter(TorchDispatchMode):
    """A dispatch mode that records every new storage an op creates and, through a weakref callback,
    when it dies: the events of `Trace`, tagged with the decoder layer running now (`layer_stack`, kept
    by forward hooks; `base_layer` outside any layer) and the current `phase` as category.

    The plain trace (`trace_step`) uses it as is; the sharded trace (fsdp.py) adds storage resizes,
    streams and host residency. Empty storages are not recorded: the caching allocator serves a 0-byte
    request without a block (CUDACachingAllocator.cpp `allocate`: size 0 returns an empty pointer).
    """

    def __init__(self) -> None:
        super().__init__()
        self.trace = Trace()
        self.layer_stack: list[int] = []
        self.base_layer = NO_LAYER
        self.phase: str = Category.WEIGHTS
        self.closed = False
        """Set when the trace is complete: storages that die later (garbage collection) are not recorded."""
        self.interrupted: KeyboardInterrupt | None = None
        """A Ctrl-C that arrived inside the weakref callback `_free`, raised again at the next op or `finish`."""
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> its current id
        self._excluded: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storages outside the caching allocator
        self.recording = True
        """False inside `outside_pool`."""
        self._refs: dict[int, weakref.ref] = {}  # id -> the weak reference whose callback records the free
        self._sizes: dict[int, int] = {}  # id -> bytes, while allocated
        self._streams: dict[int, int] = {}  # id -> stream
        self._alloc_index: dict[int, int] = {}  # id -> index of its alloc event
        self._next_id = 0
        self._live_bytes = 0
        self._peak_event = 0
        self.in_place_sums = True
        """Record autograd's gradient sums as the GPU makes them (`_engine_sums_in_place`)."""
        self._node: Any = None  # the autograd node whose ops are being recorded (backward only)
        self._node_first_id = 0  # the first storage id made while it runs

    @property
    def layer(self) -> int:
        return self.layer_stack[-1] if self.layer_stack else self.base_layer

    def stream(self) -> int:
        """The stream new storages are allocated on."""
        return COMPUTE_STREAM

    # -- recording ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.raise_interrupt()
        if self.in_place_sums:
            self._note_node()
        out = func(*args, **(kwargs or {}))
        if not self.recording:
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor) and not is_traceable_wrapper_subclass(item):
                    self._excluded[item.untyped_storage()] = True
            return out
        if func is torch.ops.aten.add.Tensor and self._engine_sums_in_place(args, out):
            self._reuse(args[0], out)
        elif (func is torch.ops.aten.add.Tensor and IN_ATTENTION.get() and len(args) == 2
              and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor)
              and args[0].shape == out.shape and args[0].dtype == out.dtype):
            self._reuse(args[0], out)  # emulation.MATH_MASK_ADD: in place on the GPU
        for item in kernel_allocation_order(func, tree_flatten(out)[0]):
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out

    def _engine_sums_in_place(self, args: tuple[Any, ...], out: Any) -> bool:
        """Whether this `add` is autograd summing two gradients of one tensor in place on a real GPU.

        When a second gradient reaches a node's input, the engine adds it into the first in place if it holds
        the first's last reference and storage, and the first is dense and not a subclass
        (`accumulate` / `can_accumulate_inplace` in torch/csrc/autograd/input_buffer.cpp); otherwise it adds
        out of place. Fake tensors are subclasses, so on them every such sum allocates. Here the sum counts as
        in place when, in backward, `old + new` adds a gradient made before the running node began (so not a
        sum inside a backward formula) whose storage is as unshared as the fresh result's and that is no view
        and dense. That is every residual-stream sum in a decoder, and a tied embedding/LM head under
        autocast (its head gradient comes fresh out of the cast), but not the tied weight in fp32, where the
        head's gradient is a transposed view. On the H200 (Llama-3.2-1B bf16-mixed, benchmarks/single_history.py)
        the GPU made no allocation for the residual sums, and with them recorded out of place the trace's
        allocator placed one 64 MiB gradient differently and needed one 1002 MiB segment less than the GPU.

        Only with grad mode off, as the engine runs a node and sums its outputs into the next node's inputs unless
        backward builds a graph (torch/csrc/autograd/engine.cpp `evaluate_function`, under the graph task's grad
        mode, create_graph). A checkpointed layer's recomputation runs inside backward with grad mode on, and its
        residual add (`residual + hidden_states`, the saved layer input + the attention output) matched every other
        condition: the trace made it in place where the GPU allocates (H200, LoRA on a bf16 base at 4 x 8192 with
        every layer checkpointed: one hidden-sized tensor missing at the peak, Llama-3.2-1B -1.2% and Qwen2.5-1.5B
        -8.4% of the measured peak reserved; benchmarks/results/single_history_lora8192_h200.json.gz)."""
        if not self.in_place_sums or torch._C._current_graph_task_id() == -1 or torch.is_grad_enabled():
            return False  # the engine sums with grad mode off; a checkpoint's recomputation runs with it on
        if len(args) != 2 or not isinstance(out, torch.Tensor):
            return False
        old, new = args
        if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)
                and old.shape == new.shape == out.shape and old.dtype == new.dtype == out.dtype):
            return False
        storage_id = self._ids.get(old.untyped_storage())
        if storage_id is None or storage_id >= self._node_first_id or old._base is not None:
            return False
        if not _dense(old):
            return False
        use_count = torch._C._storage_Use_Count
        return bool(use_count(old.untyped_storage()._cdata) == use_count(out.untyped_storage()._cdata))

    def _note_node(self) -> None:
        """In backward, remember where the running autograd node's own storages begin (`_engine_sums_in_place`)."""
        if torch._C._current_graph_task_id() == -1:
            return
        node = torch._C._current_autograd_node()
        if node is not self._node:
            self._node = node
            self._node_first_id = self._next_id

    def _reuse(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Record `new` as living in `old`'s storage (an in-place add on the GPU): no alloc, and the
        memory is freed when `new` dies, not `old`."""
        storage_id = self._ids.get(old.untyped_storage())
        if storage_id is None or storage_id not in self._sizes:
            return
        storage = new.untyped_storage()
        self._ids[storage] = storage_id
        self._refs[storage_id] = weakref.ref(storage, functools.partial(self._free, storage_id))

    def track(self, tensor: torch.Tensor, category: str | None = None) -> int | None:
        """Record the tensor's storage if it is new; its id (None for an empty storage or a DTensor,
        whose local tensor the inner op records)."""
        if is_traceable_wrapper_subclass(tensor):
            return None
        storage = tensor.untyped_storage()
        if storage in self._ids:
            return self._ids[storage]
        if storage.nbytes() == 0 or storage in self._excluded:
            return None
        return self._alloc(storage, storage.nbytes(), category)

    @contextlib.contextmanager
    def outside_pool(self) -> Iterator[None]:
        """Storages made inside are not recorded, now or later (memory outside the caching allocator: paged
        optimizer state): ops that write into them in place are not allocations either."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def _alloc(self, storage: Any, num_bytes: int, category: str | None) -> int:
        size = rounded(num_bytes)
        storage_id = self._next_id
        self._next_id += 1
        self._ids[storage] = storage_id
        self._refs[storage_id] = weakref.ref(storage, functools.partial(self._free, storage_id))
        self._sizes[storage_id] = size
        self._streams[storage_id] = stream = self.stream()
        self.trace.categories[storage_id] = category or self.phase
        self._alloc_index[storage_id] = len(self.trace.events)
        self.trace.events.append(Event.alloc(storage_id, size, self.layer, stream))
        self._live_bytes += size
        if self._live_bytes > self.trace.peak_allocated_bytes:
            self.trace.peak_allocated_bytes = self._live_bytes
            self._peak_event = len(self.trace.events)
        return storage_id

    def _free(self, storage_id: int, ref: weakref.ref | None = None) -> None:
        """Record the death of a storage (the weakref callback of `_alloc`, or a resize to 0 bytes).

        Python prints what a weakref callback raises as "Exception ignored" and drops it, so a Ctrl-C that
        lands here would be lost and the search would run on: it is kept in `interrupted` and raised again
        by the next op (`__torch_dispatch__`) or by `finish`."""
        try:
            if self.closed or (ref is not None and self._refs.get(storage_id) is not ref):
                return  # after the trace, or the storage's bytes live on in another tensor (see `_reuse`)
            size = self._sizes.pop(storage_id, None)
            if size is None:
                return
            self._refs.pop(storage_id, None)
            self._live_bytes -= size
            self.trace.events.append(Event.free(storage_id, self.layer, self._streams[storage_id]))
        except KeyboardInterrupt as interrupt:
            self.interrupted = interrupt

    def raise_interrupt(self) -> None:
        """Raise the KeyboardInterrupt that `_free` kept, once."""
        if self.interrupted is not None:
            interrupt, self.interrupted = self.interrupted, None
            raise interrupt

    def storage_ids(self, tensors: Any) -> list[int]:
        """The ids of the storages of these tensors (a DTensor's local shard), those recorded."""
        ids = []
        for item in _plain_tensors(tree_flatten(tensors)[0]):
            if isinstance(item, torch.Tensor):
                local = item.to_local() if hasattr(item, "to_local") else item
                storage_id = self._ids.get(local.untyped_storage())
                if storage_id is not None:
                    ids.append(storage_id)
        return ids

    def retag(self, tensors: Any, category: str) -> None:
        """Re-label storages once their role is known (gradients after backward, optimizer state)."""
        for storage_id in self.storage_ids(tensors):
            self.trace.categories[storage_id] = category

    def relayer(self, tensors: Any, layer: int) -> None:
        """Move the alloc events of these storages into `layer`'s region (optimizer state belongs to its
        parameter's layer)."""
        for storage_id in self.storage_ids(tensors):
            index = self._alloc_index.get(storage_id)
            if index is not None:
                self.trace.events[index] = self.trace.events[index]._replace(layer=layer)

    def finish(self) -> Trace:
        """Label the live bytes at the allocated peak by their final category. Raises the KeyboardInterrupt
        that arrived in `_free` after the last op."""
        self.raise_interrupt()
        live: dict[Hashable, int] = {}
        for event in self.trace.events[: self._peak_event]:
            if event.kind == "alloc":
                live[event.storage] = event.num_bytes
            else:
                live.pop(event.storage, None)
        breakdown: dict[str, int] = {}
        for storage_id, size in live.items():
            category = self.trace.categories[storage_id]
            breakdown[category] = breakdown.get(category, 0) + size
        self.trace.peak_breakdown = breakdown
        return self.trace


def meta_to_fake(
    model: torch.nn.Module, fake_mode: Any, device: torch.device, counter: StorageCounter | None = None,
    layer_of: dict[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Replace every meta parameter and buffer by a fake tensor on `device`, keeping tied weights tied.

    With a `counter`, each new tensor is recorded as weights of its layer (`layer_of`: id of a meta
    tensor -> layer). Returns {id(fake): meta} so callers can look up what was recorded about the meta
    tensor. Build on the meta device first: peft's adapter layers call `.to()`, which under
    FakeTensorMode fails with "_apply(): Couldn't swap Linear.weight".
    """
    converted: dict[int, torch.Tensor] = {}
    originals: dict[int, torch.Tensor] = {}
    layer_of = layer_of or {}

    def convert(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor  # made fake already (a quantised layer's packed weight, predict/quantized.py)
        if id(tensor) not in converted:
            if counter is not None:
                counter.base_layer = layer_of.get(id(tensor), NO_LAYER)
            fake = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, tensor, device)
            if is_param:
                fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
            if counter is not None:
                counter.track(fake, Category.WEIGHTS)
            converted[id(tensor)] = fake
            originals[id(fake)] = tensor
        return converted[id(tensor)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = cast(torch.nn.Parameter, convert(param, True))  # is_param: a Parameter
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = convert(buffer, False)
    if counter is not None:
        counter.base_layer = NO_LAYER
    return originals


def packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' `masking_utils.find_packed_sequence_indices` for rows known to be packed: the same ops (the
    diff of the positions, `!= 1`, its cumsum: which document each token belongs to), without the read of the values
    that decides "not packed" (fake tensors have none; the read is answered True in the mask code, FULL_BATCHES,
    which would say every row holds one document)."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    return (position_diff != 1).cumsum(-1)


def assume_unpacked_batches(packed: bool = False) -> contextlib.AbstractContextManager:
    """Make transformers' mask code decide on fake tensors as it decides on the real, full batches.

    masking_utils takes a fake tensor for tracing (`is_tracing`) and then keeps a full causal mask
    instead of reading the attention mask, so SDPA would lose its fused causal kernels where the real step
    drops the mask: transformers 5.17's OPT builds an all-ones mask for an unpadded batch, which the GPU
    run reads (`_ignore_causal_mask_sdpa`, `fast_all`) and skips. Here masking_utils' `is_tracing` ignores
    fake tensors, its boolean reads are answered as the real batch answers them (emulation.FULL_BATCHES:
    every token real), and it is told the batches are not packed (`find_packed_sequence_indices`), which it
    would otherwise find out by reading position_ids. `packed` (`TrainConfig.packed_rows`): the rows are packed, their
    position_ids restarting (`recipe.step.packed_position_ids`): the mask code is told which tokens share a document
    (`packed_sequence_indices`) and builds the block-diagonal mask the real step builds, which keeps SDPA off its
    flash kernel and, with grouped KV heads, off SDPA's own GQA (transformers `use_gqa_in_sdpa`: keys and values are
    repeated to every query head first)."""
    from unittest import mock

    try:
        import transformers.masking_utils as masking_utils
    except ImportError:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if hasattr(masking_utils, "find_packed_sequence_indices"):
        find_packed = packed_sequence_indices if packed else (lambda position_ids: None)
        stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices", find_packed))
    is_tracing = getattr(masking_utils, "is_tracing", None)
    if is_tracing is not None:
        stack.enter_context(mock.patch.object(masking_utils, "is_tracing", lambda tensor=None: is_tracing(None)))
    return stack


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the first ModuleList as long as the config's num_hidden_layers."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (depth is None or len(module) == depth):
            return list(module)
    return []


def layer_period(model_config: Any) -> int:
    """Smallest p such that layer i and i+p have the same type (sliding/full attention patterns)."""
    types = list(getattr(model_config, "layer_types", None) or [])
    for period in range(1, len(types) + 1):
        if all(types[i] == types[i % period] for i in range(len(types))):
            return period
    return 1


# -- the depth rule ---------------------------------------------------------------------------------

PLAIN_PERIODS = 3
"""Layer periods the single-GPU trace holds: a first, a template and a last block (`extend`)."""


def num_layers_of(model_config: Any) -> int:
    """The model's decoder layers (config.num_hidden_layers; 0 when the config has none)."""
    return int(getattr(model_config, "num_hidden_layers", 0) or 0)


def traced_depth(depth: int, period: int, periods: int = PLAIN_PERIODS) -> int:
    """How many of a model's `depth` layers are traced: `periods` periods of the layer pattern plus the
    remainder (depth - periods * period) % period, so the traced and the full model end on the same
    layer type; or every layer when the model is that shallow. Memory is affine in depth, and so is
    the event stream: the extender repeats the traced template block to reach `depth`.

    The single-GPU trace (`extend`) needs 3 periods. The sharded trace (fsdp.extend_sharded) needs 5,
    because FSDP's gathered parameters, prefetch and reduce-scatter buffers cross one layer boundary:
    its template block must have a generic (neither first nor last) block on each side.
    """
    shallow = periods * period + (depth - periods * period) % period
    return depth if depth <= shallow else shallow


def shallow_config(model_config: Any, num_layers: int) -> Any:
    """A copy of `model_config` with only `num_layers` decoder layers (per-layer lists cut to match)."""
    config = model_config.__class__.from_dict(model_config.to_dict())
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    return config


# -- layer tagging -----------------------------------------------------------------------------------


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a nested structure of arguments or outputs, or None."""
    for item in tree_flatten(value)[0]:
        if isinstance(item, torch.Tensor):
            return item
    return None


def host_block(num_bytes: int) -> int:
    """The pinned host block torch's caching host allocator gives a request of `num_bytes`: rounded up to a power
    of two (aten/src/ATen/core/CachingHostAllocator.h `allocate`, below its default round threshold)."""
    return 1 << max(0, num_bytes - 1).bit_length() if num_bytes > 0 else 0


def offload_to_host(layers: list[torch.nn.Module], counter: StorageCounter) -> None:
    """Make each checkpointed decoder layer's saved inputs leave the traced device, as `recipe.step.offloaded_
    checkpoint` (torch's `save_on_cpu`) does on the GPU, and record the pinned host memory they take.

    The recipe's function cannot be traced as it is: on the CPU path its host copy would be one more CPU tensor,
    counted as device memory, and its copy back (`.to(device)`) a no-op. This one replaces each layer's
    `_gradient_checkpointing_func` with the same checkpoint under saved-tensor hooks whose pack makes a host
    tensor outside the caching allocator's pool (`StorageCounter.outside_pool`), so the device tensor dies as on
    the GPU, and whose unpack allocates the device copy that the recomputation reads. `Trace.host_bytes[i]` is the
    largest of layer i's packs over the traced micro-batches (every micro-batch's packs live from its forward to
    its backward, one micro-batch at a time), in `host_block`s."""
    from torch.utils.checkpoint import checkpoint

    def offloaded(index: int) -> Any:
        def checkpoint_on_host(function: Any, *args: Any, **kwargs: Any) -> Any:
            packed = [0]

            def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
                with counter.outside_pool():
                    host = torch.empty(tensor.size(), dtype=tensor.dtype, device="cpu")
                packed[0] += host_block(host.numel() * host.element_size())
                return tensor.device, host

            def unpack(saved: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
                device, host = saved
                return torch.empty(host.size(), dtype=host.dtype, device=device)  # the copy back: a new block

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                output = checkpoint(function, *args, **kwargs)
            counter.trace.host_bytes[index] = max(counter.trace.host_bytes.get(index, 0), packed[0])
            return output

        return functools.partial(checkpoint_on_host, use_reentrant=False)

    for index, layer in enumerate(layers):
        if hasattr(layer, "_gradient_checkpointing_func"):
            layer._gradient_checkpointing_func = offloaded(index)


def _layer_hooks(layers: list[torch.nn.Module], counter: StorageCounter) -> list[Any]:
    """Tag events with the decoder layer running them, in forward (module hooks) and backward
    (a pre-hook on the grad_fn of each layer's output fires when that layer's backward starts).

    The module hooks skip calls made during backward. transformers 5.17's GradientCheckpointingLayer
    checkpoints `__call__`, so a layer's hooks run again when backward recomputes it, and non-reentrant
    checkpointing stops that recomputation early (torch/utils/checkpoint.py `_StopRecomputationError`) before
    the forward hook runs: the layer stack kept one stale entry per layer and every later event went to
    the wrong layer (Llama-3.2-3B, 16 x 1024 with checkpointing and the chunked loss: the extension of the
    3-layer trace to 6 layers gave 18.58 GiB allocated where the 6-layer trace itself has 17.89; to 28 layers
    with paged_adamw_8bit, 36.70 GiB reserved where the H200 measured 29.45 and 5.24's trace gives 29.45).
    5.24 checkpoints `forward`, inside the hooks, so they never run in backward there.

    Why not torch's `torch.distributed._tools.mod_tracker.ModTracker` (global module hooks, and gradient
    hooks on a module's outputs and inputs for backward): under torch 2.13 and FakeTensorMode it gives
    this trace's attribution exactly (every alloc and free inside forward and backward of a 3-layer
    Llama, fp32 and bf16-mixed with checkpointing), but not the sharded trace's: its global hooks run
    before FSDP's own, so 136 of the 960 step events (weights and optimizer state aside) of a 2-GPU,
    3-layer step fall in another layer or outside any (FSDP's gathers and reshards, the events between
    two layers that `fsdp.extend_sharded` needs inside one); and its attribution under torch 2.11 (the
    GPU machine) could not be checked. Both traces keep their module hooks, whose figures are measured.
    """

    def set_base(index: int) -> Any:
        def hook(*_: Any) -> None:
            counter.base_layer = index

        return hook

    def pre(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if in_backward():
                return  # a checkpointed layer recomputed in its own backward: base_layer is that layer already
            counter.layer_stack.append(index)
            if index == 0:
                hidden = first_tensor((args, kwargs))
                if hidden is not None and hidden.grad_fn is not None and torch.is_grad_enabled():
                    hidden.grad_fn.register_prehook(set_base(NO_LAYER))

        return hook

    def post(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if in_backward():
                return
            counter.layer_stack.pop()
            hidden = first_tensor(output)
            if hidden is not None and hidden.grad_fn is not None and torch.is_grad_enabled():
                hidden.grad_fn.register_prehook(set_base(index))

        return hook

    def in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(index), with_kwargs=True))
    return handles


def _logits_hook(counter: StorageCounter) -> Any:
    """A forward pre-hook for the LM head: what follows is logits and loss, until the head's input has
    its gradient. The chunked loss calls the head again in backward (checkpoint recomputation), chunk
    by chunk; the gradient hook hands the rest of backward back to the decoder layers."""

    def back_to_temporaries(grad: torch.Tensor) -> None:
        counter.phase = Category.TEMPORARIES

    def hook(module: torch.nn.Module, args: tuple) -> None:
        counter.phase = Category.LOGITS
        hidden = first_tensor(args)
        if hidden is not None and hidden.requires_grad and torch.is_grad_enabled():
            hidden.register_hook(back_to_temporaries)

    return hook


# -- the trace ---------------------------------------------------------------------------------


PAGED_MIN_ELEMENTS = 100_000
"""bitsandbytes pages the state of a parameter of at least this many elements (Optimizer8bit.get_state_buffer:
`p.numel() < 1e5` stays in torch's pool)."""


def traced_optimizer(
    model: torch.nn.Module, train_config: TrainConfig, counter: StorageCounter,
    layer_of_param: dict[int, int] | None = None,
) -> Any:
    """`recipe.make_optimizer` for a model of fake tensors, inside the trace's modes (fused AdamW on either path,
    as on the GPU). Its state and step temporaries are then recorded as any op's outputs.

    bitsandbytes optimizers need two things here. Their constructor computes the 8-bit quantisation maps from
    data (`create_dynamic_map`, which fake tensors cannot run): it runs with fake mode unset, so the two maps
    (256 fp32 each) are real CPU tensors; the first step moves them to the parameters' device, as on the GPU.
    Paged optimizers (`PAGED_OPTIMIZERS`) put the state of every parameter of >= `PAGED_MIN_ELEMENTS` elements in
    CUDA unified memory (cudaMallocManaged through bitsandbytes' `get_paged`), outside torch's caching
    allocator: it is not in `torch.cuda.memory_reserved`, and the driver migrates its pages between host and
    GPU on demand, evicting them when cudaMalloc needs the room. So it does not count towards the predicted
    peak: it is made as ordinary fake tensors here, left out of the events, and its size is kept in
    `Trace.paged_bytes` by the layer `layer_of_param` (id of a parameter -> layer) gives its parameter (the GPU
    holds up to that much more, evictable, when memory is free). Smaller
    parameters' state is ordinary device memory and is counted.

    Known limitations: foreach AdamW (adamw_torch) keeps its per-parameter `step` counters on the host; the
    trace counts them as device memory (512 bytes per parameter tensor: ~75 KiB for a 16-layer model).
    bitsandbytes never frees paged state (`get_paged` has no matching free), so a process that builds several
    paged optimizers (a search's trials) keeps the earlier ones' state in unified memory."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if train_config.optimizer in TORCHAO_OPTIMIZERS:
        from torchao.optim import subclass_4bit, subclass_8bit

        with unset_fake_temporarily():  # the quantisation maps are computed from data once (lru_cache): real here
            for module in (subclass_8bit, subclass_4bit):
                module.get_qmap_signed(), module.get_qmap_unsigned()
        return _state_only_step(recipe.make_optimizer(model, train_config), train_config.optimizer, counter)
    if train_config.optimizer not in BITSANDBYTES_OPTIMIZERS:
        return recipe.make_optimizer(model, train_config, fused=True)
    with unset_fake_temporarily():
        optimizer: Any = recipe.make_optimizer(model, train_config)
    if train_config.optimizer in PAGED_OPTIMIZERS:
        def state_buffer(param: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            if param.numel() < PAGED_MIN_ELEMENTS:
                return torch.zeros_like(param, dtype=dtype)
            with counter.outside_pool():
                buffer = torch.zeros_like(param, dtype=dtype)
            layer = (layer_of_param or {}).get(id(param), NO_LAYER)
            paged = counter.trace.paged_bytes
            paged[layer] = paged.get(layer, 0) + buffer.untyped_storage().nbytes()
            return buffer

        optimizer.get_state_buffer = state_buffer
    return optimizer


AUTOTUNED_ARGUMENTS: dict[str, tuple[list[list[tuple[float, bool]]], list[list[tuple[float, bool]]]]] = {
    "adamw_torch_8bit": ([[], [(1, False), (1, False), (0, True), (0, True), (1, False), (1, False)]],
                         [[(4 / 256, False)]]),
    "adamw_torch_4bit": ([[(0, True), (0, True)], [(0.5, False)]], [[(4 / 128, False)]]),
}
"""The Triton kernels of torchao's compiled update (`single_param_adam`, torch 2.11, torchao 0.18) that autotune
at their first launch, in launch order: the first ones, then those that launch after the first moment is freed
(`_compiled_update_buffers` says where). Each kernel's mutated arguments are (bytes per element of the parameter,
True where the argument has the parameter's own dtype instead): AdamW8bit's first kernel writes nothing in place
(it only holds the flush buffer), its update kernel the two moments' uint8 codes (1 byte per element, twice each)
and two parameter-sized tensors, its last one fp32 scales (one per 256-element block); AdamW4bit's write two
parameter-sized tensors, then the 4-bit codes, then one fp32 scale per 128-element block. Recorded on the H200
with fp32 and bf16 parameters of every Llama-3.2-1B shape, with and without stochastic rounding, with the memory
allocated when each kernel benchmarked (benchmarks/inductor_autotune.py, results/inductor_autotune_h200.json)."""
AUTOTUNE_CONFIGS = 2
"""Configs each of those kernels benchmarks (Inductor's pointwise/reduction heuristics gave 2 for every one)."""
AUTOTUNE_FLUSH_BYTES = 60 * 2**20
"""The benchmarker's L2 flush buffer (torch/_inductor/runtime/benchmarking.py `benchmark_gpu`: the device's L2
size in int32s): the H200's 60 MiB, where the rule was measured. Other cards' L2 is 40-126 MiB."""


def _compiled_update_buffers(param: torch.Tensor, optimizer_name: str, block_size: int, counter: StorageCounter,
                             first_launch: bool) -> None:
    """Allocate and free what torchao's compiled update (`single_param_adam` under torch.compile, torch 2.11)
    holds while it updates one parameter with quantised state, in its order (H200, the allocator's history of
    a step of a 128256 x 2048 and an 8192 x 2048 parameter, fp32 and bf16 alike; `_tao_history` in
    benchmarks/results/optimizer_step_h200.json): two new fp32 block scales (numel / block_size each) and the
    two moments dequantised to fp32 (4 bytes per element each); for the 4-bit state also two 8-byte-per-element
    buffers: 8 bytes per element in all for AdamW8bit, 24 for AdamW4bit, which max_memory_allocated during the
    step confirms on whole models (8.03-8.06 and 24.0 bytes per element of the largest parameter,
    benchmarks/optimizer_step.py). They are freed in the recorded order: AdamW8bit both moments then both
    scales; AdamW4bit each moment's moment, wide buffer and scale in turn.

    At the `first_launch` of the compiled update for a parameter size its kernels autotune (`_autotune`): the
    first ones (`AUTOTUNED_ARGUMENTS`) while AdamW8bit's buffers are held (the whole-model histories of
    Llama-3.2-1B, results/single_history_torchao8_h200.json) and before AdamW4bit's are made (Qwen2.5-0.5B,
    results/single_history_qwen_tao4_h200.json.gz; the Llama-shaped parameters stepped alone autotuned them with the
    buffers held, which predicts the Llama steps equally well and Qwen's 5.6% high), the last one after the first
    moment is freed (all of benchmarks/inductor_autotune.py's recordings)."""
    numel, device = param.numel(), param.device
    first, after_first_moment = AUTOTUNED_ARGUMENTS[optimizer_name]

    def fp32(elements: int) -> torch.Tensor:
        return torch.empty(elements, dtype=torch.float32, device=device)

    if optimizer_name == "adamw_torch_8bit":
        scale_m, scale_v = fp32(numel // block_size), fp32(numel // block_size)
        moment_m, moment_v = fp32(numel), fp32(numel)
        if first_launch:
            _autotune(param, first, counter)
        del moment_m, moment_v
        if first_launch:
            _autotune(param, after_first_moment, counter)
        del scale_m, scale_v
        return
    if first_launch:
        _autotune(param, first, counter)
    scale_m, scale_v = fp32(numel // block_size), fp32(numel // block_size)
    moment_m, moment_v = fp32(numel), fp32(numel)
    wide_m, wide_v = fp32(2 * numel), fp32(2 * numel)
    del moment_m, wide_m
    if first_launch:
        _autotune(param, after_first_moment, counter)
    del scale_m, moment_v, wide_v, scale_v


def _autotune(param: torch.Tensor, kernels: list[list[tuple[float, bool]]], counter: StorageCounter) -> None:
    """What Inductor allocates when the compiled kernels of one update launch for the first time (a cold cache:
    the winning config is then cached on disk by the kernel's source, `autotune_local_cache`, and a later
    process does not benchmark; H200, Llama-3.2-1B with AdamW8bit: 19.48 GiB reserved cold, 17.77 warm).

    torch/_inductor/runtime/triton_heuristics.py `CachingAutotuner.benchmark_all_configs` benchmarks each config
    (`bench`); `benchmark_gpu` (runtime/benchmarking.py) makes one warm-up call, allocates the L2 flush buffer
    and times more calls; each call clones the kernel's mutated arguments in order (`maybe_clone_args`) and
    frees them when it returns (in reverse: Python drops a list's items from the end). Only arguments that fit
    under the peak so far are cloned, the rest are copied to the host (`copy_args_to_cpu_if_needed`: budget =
    max_memory_allocated - memory_allocated): that budget depends on the whole model's peak, so the clones are
    recorded here with their positions (`Trace.autotune_clones`) and `budget_autotune_clones` keeps, in the
    full model's events, those that fit. Repeated calls reuse the same blocks: two per config are traced."""
    numel, dtype = param.numel(), param.dtype
    for arguments in kernels:
        group = len({kernel for kernel, _ in counter.trace.autotune_clones.values()})
        for _ in range(AUTOTUNE_CONFIGS):
            flush = None
            for _ in range(2):  # the warm-up call, then the timed ones with the flush buffer held
                clones = []
                for position, (per_element, own_dtype) in enumerate(arguments):
                    clone = (torch.empty(numel, dtype=dtype, device=param.device) if own_dtype
                             else torch.empty(max(1, int(numel * per_element)), dtype=torch.uint8,
                                              device=param.device))
                    storage_id = counter.track(clone, Category.TEMPORARIES)
                    if storage_id is not None:
                        counter.trace.autotune_clones[storage_id] = (group, position)
                    clones.append(clone)
                counter.retag(clones, Category.TEMPORARIES)
                while clones:
                    clones.pop()
                if flush is None:
                    flush = torch.empty(AUTOTUNE_FLUSH_BYTES, dtype=torch.uint8, device=param.device)
                    counter.retag([flush], Category.TEMPORARIES)
            del flush


def _state_only_step(optimizer: Any, optimizer_name: str, counter: StorageCounter) -> Any:
    """A torchao AdamW8bit / AdamW4bit whose `step` makes the state the real step makes, and no update.

    The real step (torchao/optim/adam.py `_AdamBase.step`) creates each parameter's two moments on its first
    step with `_new_buffer` (an OptimState8bit / OptimState4bit of uint8 codes, one fp32 scale per block and a
    256-entry fp32 map: parameters under 4096 elements, or not a multiple of the block, get plain zeros_like),
    then runs `torch.compile(single_param_adam)`, which fake tensors cannot: the update writes the parameter and
    the state in place, so memory is the state (made here by torchao's own `_new_buffer`) plus what the
    compiled kernel holds while it runs (`_compiled_update_buffers`, one parameter at a time), and at the first
    update of each parameter size (the compiled code is specialised to it: `dynamic=False`), its kernels'
    autotuning (`_autotune`)."""
    launched: set[tuple[int, torch.dtype]] = set()

    @torch.no_grad()
    def step(closure: Any = None) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = optimizer._new_buffer(param, True)
                    state["exp_avg_sq"] = optimizer._new_buffer(param, False)
                if is_traceable_wrapper_subclass(state["exp_avg"]):
                    size = (param.numel(), param.dtype)
                    _compiled_update_buffers(param, optimizer_name, optimizer.block_size, counter,
                                             first_launch=size not in launched)
                    launched.add(size)

    optimizer.step = step
    return optimizer


def budget_autotune_clones(events: list[Event], clones: dict[Hashable, tuple[int, int]]) -> list[Event]:
    """`events` without the autotuning clones (`Trace.autotune_clones`) that Inductor copies to the host instead:
    at each kernel's first clone, its budget is the peak allocated so far minus what is allocated, and its
    arguments take it in order, each cloned on the GPU while it fits (triton_heuristics.py
    `copy_args_to_cpu_if_needed`). So the clones never raise the allocated peak; they change reserved memory
    when they land in new segments. Applied to the full model's events, whose peak decides."""
    if not clones:
        return events
    sizes = {clones[event.source]: event.num_bytes for event in events
             if event.kind == "alloc" and event.source in clones}
    kept: dict[int, set[int]] = {}
    dropped: set[Hashable] = set()
    live_sizes: dict[Hashable, int] = {}
    out: list[Event] = []
    live = peak = 0
    for event in events:
        if event.kind == "alloc":
            key = clones.get(event.source)
            if key is not None:
                group, position = key
                if group not in kept:
                    budget, kept[group] = peak - live, set()
                    for (other, index), size in sorted(sizes.items()):
                        if other == group and size <= budget:
                            kept[group].add(index)
                            budget -= size
                if position not in kept[group]:
                    dropped.add(event.storage)
                    continue
            live_sizes[event.storage] = event.num_bytes
            live += event.num_bytes
            peak = max(peak, live)
        elif event.storage in dropped:
            dropped.discard(event.storage)
            continue
        else:
            live -= live_sizes.pop(event.storage, 0)
        out.append(event)
    return out


def _dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: some order of its dimensions is contiguous (c10 TensorImpl
    `is_non_overlapping_and_dense`), as a transpose is and a slice or an expand is not."""
    expected = 1
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def trace_step(model_config: Any, train_config: TrainConfig, device: str = "cpu", steps: int = 2,
               seq_lens: Sequence[int] = ()) -> Trace:
    """Trace `steps` optimizer steps of `train_config` on one GPU (`device` "cuda": fake CUDA tensors;
    "cpu": fake CPU tensors with `CudaEmulation`) and return the allocation events, at the depth of
    `model_config` (trace a `shallow_config` and `extend` for deep models). With `train_config.eval_batch_size`
    set, Trainer's evaluation loop follows the steps (`eval_step.trace_evaluation`).

    `seq_lens`: one optimizer step per entry instead, step k's micro-batches of `seq_lens[k]` tokens per row (an epoch
    of batches of varying length, in the loader's order: `predict.epoch`); empty: `steps` steps of seq_len."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    emulate = device == "cpu"
    counter = StorageCounter()
    counter.trace.device = device
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    amp_device = "cpu" if emulate else "cuda"
    capability = train_config.gpu_capability  # the card's SDPA kernels (emulation.sdpa_backend)
    emulation = CudaEmulation(capability) if emulate else AttentionScope(capability)
    model = recipe.build_model(model_config, train_config, "meta")  # then fake tensors: see meta_to_fake
    layers = decoder_layers(model)
    unpacked = assume_unpacked_batches(train_config.packed_rows)
    counter.trace.num_layers = counter.trace.traced_layers = len(layers)
    counter.trace.period = layer_period(model_config)
    layer_of = {id(t): index for index, layer in enumerate(layers) for t in [*layer.parameters(), *layer.buffers()]}
    reference = _reference_model(model_config, train_config)  # on meta: built outside the modes, as the policy
    reference_layer_of = {} if reference is None else {
        id(t): index for index, layer in enumerate(decoder_layers(reference))
        for t in [*layer.parameters(), *layer.buffers()]}
    with unpacked, fake_mode, counter, GpuKernels(), emulation, quantized.quantized_step(train_config, emulate):
        quantized.fake_quantized_weights(model, train_config, torch.device(device), counter, layer_of)
        param_meta = meta_to_fake(model, fake_mode, torch.device(device), counter, layer_of)
        layer_of_param = {id(p): layer_of.get(id(meta), NO_LAYER) for p in model.parameters()
                          if (meta := param_meta.get(id(p))) is not None}
        optimizer = traced_optimizer(model, train_config, counter, layer_of_param)
        if reference is not None:
            meta_to_fake(reference, fake_mode, torch.device(device), counter, reference_layer_of)
        if train_config.trainer != "causal-lm" and train_config.adapter is not None and \
                train_config.gradient_checkpointing:  # TRL: "enable input gradients" for PEFT with checkpointing
            cast(Any, causal_lm_of(model)).enable_input_require_grads()  # a transformers PreTrainedModel
        if train_config.offload_activations:
            offload_to_host(layers, counter)
        get_head = getattr(model, "get_output_embeddings", None)  # a transformers PreTrainedModel's LM head
        head = get_head() if get_head is not None else None
        hooks = _layer_hooks(layers, counter)
        if reference is not None:  # the reference's layers share the policy's indices: `extend` repeats both
            hooks += _layer_hooks(decoder_layers(reference), counter)
        if head is not None:
            hooks.append(head.register_forward_pre_hook(_logits_hook(counter)))
        if train_config.loss == "liger":  # Liger's kernels cannot run on fake tensors: its allocation-equivalent twin
            logits_hook = _logits_hook(counter)
            liger.substitute_liger(model, lambda hidden: logits_hook(head, (hidden,)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step_seq_len in seq_lens or [train_config.seq_len] * steps:
            make_batch = recipe.random_batch if train_config.trainer == "causal-lm" else trl_step.trl_batch
            shape = train_config.replace(seq_len=step_seq_len)
            batches = [make_batch(model_config, shape, device) for _ in range(min(train_config.grad_accum_steps, 2))]
            counter.retag(batches, Category.ACTIVATIONS)
            step_config = train_config.replace(grad_accum_steps=len(batches))
            for input_ids in batches:
                counter.phase = Category.ACTIVATIONS
                with recipe.linear_context(train_config):  # through backward too: a recomputed forward runs there
                    with recipe.amp_context(train_config, amp_device):
                        if train_config.trainer == "causal-lm":
                            loss = recipe.forward_loss(model, input_ids, input_ids, train_config)
                        else:  # TRL's fused head has no module call: the category hook is called at its start
                            loss = trl_step.trl_loss(model, reference, input_ids, train_config,
                                                     lambda hidden: _logits_hook(counter)(head, (hidden,)))
                        loss = loss / step_config.grad_accum_steps
                    counter.phase = Category.TEMPORARIES
                    loss.backward()
                counter.base_layer = NO_LAYER
                counter.retag([p.grad for p in trainable if p.grad is not None], Category.GRADIENTS)
                del loss
            counter.phase = Category.OPTIMIZER
            optimizer.step()
            counter.retag(list(optimizer.state.values()), Category.OPTIMIZER)
            for param, state in optimizer.state.items():
                # Optimizer state is created per parameter, in order: give it its parameter's layer.
                counter.relayer(list(state.values()), layer_of.get(id(param_meta.get(id(param))), NO_LAYER))
            optimizer.zero_grad(set_to_none=True)
            del batches, input_ids
        if train_config.eval_batch_size is not None:  # Trainer.evaluate mid-training: after a step, grads freed
            eval_step.trace_evaluation(model, model_config, train_config, device, amp_device, counter)
        for hook in hooks:
            hook.remove()
        counter.retag([p for p in model.parameters()], Category.WEIGHTS)
        trace = counter.finish()
        del model, optimizer, trainable, reference
    return trace


def _reference_model(model_config: Any, train_config: TrainConfig) -> torch.nn.Module | None:
    """DPOTrainer's separate reference model on the meta device (`trace_step` makes it fake, its weights recorded by
    decoder layer so that `extend` repeats them with the policy's), or None where the step has none
    (`TrainConfig.reference`): a frozen copy of the policy's architecture in the policy's weights dtype
    (dpo_trainer.py builds it with `dtype=self.model.dtype`), in eval mode, without gradients, checkpointing or
    adapter."""
    if train_config.reference != "full copy":
        return None
    plain = train_config.replace(adapter=None, gradient_checkpointing=False, checkpoint_layers=None,
                                 offload_activations=False, trainer="causal-lm")
    reference = recipe.build_model(model_config, plain, "meta")
    reference.requires_grad_(False)
    reference.eval()
    return reference


def model_type_of(model_config: Any) -> str:
    return str(getattr(model_config, "model_type", None) or type(model_config).__name__)


def describe_failure(error: BaseException, limit: int = 200) -> str:
    """The exception class and the first line of its message (torch's can run to a page), shortened."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def untraceable(model_config: Any, failures: list[str], hint: str = "") -> UsageError:
    """The error for a model no trace path can run: its type, each path's failure, torch's and
    transformers' versions, and what to try (`hint`, besides other versions)."""
    from importlib.metadata import PackageNotFoundError, version

    def version_of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return UsageError(
        f"memtune cannot trace a training step of model type {model_type_of(model_config)!r}: " + "; ".join(failures)
        + f" (torch {version_of('torch')}, transformers {version_of('transformers')}). Try "
        + (f"{hint} or " if hint else "") + "another torch/transformers version; please report the model type "
        "and this message"
    )


def between_layers_to_layer(events: list[Event]) -> list[Event]:
    """The events with each free made between two layers given to the layer that just ran, where the
    storage was made by the layer before that one: in forward the decoder loop drops the previous layer's
    output when the next layer returns (`hidden_states = layer(hidden_states)`; with a frozen LoRA base
    nothing saves it), after the layer's forward hook and before the next layer's, where no layer is
    running (NO_LAYER). Tagged so, `extend` repeats the free with each copy of the template instead of
    freeing every copy's storage once, after the last copy."""
    made = {event.storage: event.layer for event in events if event.kind == "alloc"}
    out = list(events)
    for index in range(1, len(out)):
        event, before = out[index], out[index - 1]
        if (event.kind == "free" and event.layer == NO_LAYER and before.layer != NO_LAYER
                and made.get(event.storage, NO_LAYER) == before.layer - 1 >= 0):
            out[index] = event._replace(layer=before.layer)
    return out


def boundary_pairs(events: list[Event], period: int, start: int | None = None,
                   ) -> tuple[dict[Hashable, Hashable], set[Hashable]]:
    """Storages whose life crosses from one layer into a neighbouring one at the template's edges, paired
    (`extend`).

    A storage made outside the template and freed inside it "enters" it: made in a layer before (a
    checkpointed layer's saved input, the previous layer's output, freed by this layer's backward; a residual
    freed by the next layer's forward) or after it (a gradient that backward passes down a layer). One made in
    the template and freed outside it "leaves". In the extended model each copy of the template frees what its
    neighbour made: the copy next to the traced neighbour frees the traced storage, every other copy its
    neighbouring copy's counterpart of it, the storage made in the template at the same layer distance, in the
    same layer of the period and of the same size (the k-th such storage with the k-th, in the order they
    were made). Returns {entering storage: its leaving counterpart} and the leaving storages that have one;
    groups that differ in number or sizes are left out (`extend` then frees them as before). The template is
    layers [start, start + period), [period, 2 * period) by default."""
    start = period if start is None else start
    template = range(start, start + period)
    made: dict[Hashable, tuple[int, int, int]] = {}  # storage -> (layer, bytes, index of its alloc)
    groups: dict[tuple[bool, int, int], list[tuple[int, Hashable, int]]] = {}
    for index, event in enumerate(events):
        if event.kind == "alloc":
            made[event.storage] = (event.layer, event.num_bytes, index)
            continue
        alloc_layer, size, made_at = made.pop(event.storage, (NO_LAYER, 0, 0))
        if alloc_layer == NO_LAYER or event.layer == NO_LAYER or alloc_layer == event.layer:
            continue
        distance, phase = alloc_layer - event.layer, alloc_layer % period
        if event.layer in template and alloc_layer not in template:
            groups.setdefault((True, distance, phase), []).append((made_at, event.storage, size))
        elif alloc_layer in template and event.layer not in template:
            groups.setdefault((False, distance, phase), []).append((made_at, event.storage, size))
    entering: dict[Hashable, Hashable] = {}
    for (enters, distance, phase), group in groups.items():
        inside, outside = sorted(group), sorted(groups.get((False, distance, phase), []))
        if enters and [size for *_, size in inside] == [size for *_, size in outside]:
            entering.update({before: after for (_, before, _), (_, after, _) in zip(inside, outside, strict=True)})
    return entering, set(entering.values())


def paged_bytes_at_depth(trace: Trace, num_layers: int) -> int:
    """`trace.paged_bytes` of the model `num_layers` deep: the template layers [p, 2p) repeated as `extend`
    repeats their events."""
    return bytes_at_depth(trace.paged_bytes, trace.period, trace.traced_layers, num_layers)


def host_bytes_at_depth(trace: Trace, checkpointed: int, traced_checkpointed: int | None = None) -> int:
    """`trace.host_bytes` with `checkpointed` offloaded layers, from a trace whose first `traced_checkpointed`
    layers (default: all traced layers) were checkpointed: their template layers [p, 2p) repeated, as
    `single.partial_events` extends their events."""
    traced = trace.traced_layers if traced_checkpointed is None else traced_checkpointed
    return bytes_at_depth(trace.host_bytes, trace.period, traced, checkpointed)


def bytes_at_depth(by_layer: dict[int, int], period: int, traced_layers: int, num_layers: int) -> int:
    """Per-layer bytes of a trace `traced_layers` deep, at `num_layers`: layers [period, 2 period) repeated (the
    template of `extend`), when the trace holds enough periods to have been extended."""
    copies = max(0, (num_layers - traced_layers) // period) if traced_layers >= PLAIN_PERIODS * period else 0
    template = sum(size for layer, size in by_layer.items() if period <= layer < 2 * period)
    return sum(size for layer, size in by_layer.items() if layer < traced_layers) + copies * template


def extend(trace: Trace, num_layers: int) -> list[Event]:
    """The events of the same step on a model `num_layers` deep, from a trace of a shallower one.

    The trace must hold at least 3 periods of layers (`traced_depth`): layers [p, 2p) are the template,
    repeated in place (in order in forward and optimizer regions, in reverse in backward); layers >= 2p
    are shifted up. A free refers to the copy of its allocation at the same layer distance, and a free
    outside any layer (zero_grad) of a template allocation is repeated for every copy. A storage whose life
    crosses the template's edge into a neighbouring layer (a checkpointed layer's saved input, a residual, a
    gradient passed down) is freed by each copy's neighbour, through its counterpart in the template
    (`boundary_pairs`); before, the last layer freed every copy's at once and the copies freed none. Each copy gets a
    storage of its own; `Event.source` keeps the traced storage, the key of `trace.categories`.
    Raises ValueError for a trace of fewer than 3 periods that must be extended.
    """
    return extend_events(trace.events, trace.period, trace.traced_layers, num_layers)


def extend_events(events: list[Event], period: int, traced_layers: int, num_layers: int,
                  start: int | None = None) -> list[Event]:
    """`extend` on an event stream of `traced_layers` layers, repeating the template block of layers
    [start, start + period) (default [period, 2 * period)) to reach `num_layers`: layers below it stay, layers
    above it are shifted up. The template needs a block of its kind below and above it (partial checkpointing
    extends twice, once inside the checkpointed layers and once inside the others: `single.partial_events`)."""
    p, traced = period, traced_layers
    start = p if start is None else start
    copies = (num_layers - traced) // p
    if copies <= 0:
        return list(events)
    if start < p or traced < start + 2 * p:
        raise ValueError(f"extending needs a block of {p} layer(s) below and above the template at layer {start}, "
                         f"got a trace of {traced} layers")
    top = start + p
    template = range(start, top)
    events = between_layers_to_layer(events)
    region = {event.storage: event.layer for event in events if event.kind == "alloc"}
    entering, leaving = boundary_pairs(events, p, start)

    def shift_of(layer: int, copy: int) -> int:
        if layer in template:
            return copy * p
        return copies * p if layer >= top else 0

    out: list[Event] = []
    live: set[tuple[Hashable, int]] = set()

    def emit(event: Event, copy: int) -> None:
        sid, layer = event.storage, event.layer
        if event.kind == "alloc":
            key = (sid, shift_of(layer, copy))
            live.add(key)
            out.append(event._replace(storage=hash(key)))
            return
        alloc_layer = region.get(sid, NO_LAYER)
        if alloc_layer == NO_LAYER:
            keys = [(sid, 0)]
        elif sid in entering and layer in template:
            if alloc_layer < layer:  # made before the template: by the copy before this one, or traced before
                keys = [(sid, 0)] if copy == 0 else [(entering[sid], (copy - 1) * p)]
            else:  # made after it (a gradient in backward): by the copy after this one, or traced after
                keys = [(sid, copies * p)] if copy == copies else [(entering[sid], (copy + 1) * p)]
        elif sid in leaving and layer != NO_LAYER and layer not in template:
            # the outermost copy's; the other copies' were freed by their neighbouring copies
            keys = [(sid, copies * p)] if layer >= top else [(sid, 0)]
        elif layer == NO_LAYER or (layer not in template and alloc_layer in template):
            if alloc_layer in template:
                keys = [(sid, c * p) for c in range(copies + 1)]
            else:
                keys = [(sid, shift_of(alloc_layer, 0))]
        else:
            target = layer + shift_of(layer, copy) + (alloc_layer - layer)  # same distance as traced
            if alloc_layer in template:
                keys = [(sid, target - alloc_layer)] if 0 <= target - alloc_layer <= copies * p else []
            else:
                keys = [(sid, shift_of(alloc_layer, 0))]
        for key in keys:
            if key in live:
                live.discard(key)
                out.append(event._replace(storage=hash(key)))

    index = 0
    while index < len(events):
        if events[index].layer not in template:
            emit(events[index], 0)
            index += 1
            continue
        end = index
        while end < len(events) and events[end].layer in template:
            end += 1
        run = events[index:end]
        following = next((e.layer for e in events[end:] if e.layer != NO_LAYER), None)
        descending = following is not None and following < start
        for copy in (range(copies, -1, -1) if descending else range(copies + 1)):
            for event in run:
                emit(event, copy)
        index = end
    return out
