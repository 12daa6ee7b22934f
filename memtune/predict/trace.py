"""One training step under fake tensors -> the allocation events it makes, by memory category.

The model is built from its config inside `FakeTensorMode`: tensors carry shapes, dtypes and
devices but no data, so a 70B model costs no memory. A dispatch mode sees every aten op and
records each new storage (rounded up to 512 bytes, as the CUDA caching allocator does) and, through a
weak reference, the moment it is freed. The result is the same stream of allocations and frees a
real step makes, which `allocator.simulate` turns into peak allocated and reserved memory.

Two devices:
- "cuda": fake CUDA tensors. Autocast, SDPA kernel choice and dropout run exactly as on the GPU.
  Needs a CUDA build of torch and a visible GPU (autograd's engine touches the device).
- "cpu": fake CPU tensors plus `CudaEmulation`, a function mode that makes the CPU trace do what CUDA
  would: autocast's fp32 op list, the fused SDPA kernels (flash / memory-efficient) instead of the math
  fallback, and dropout with a 1-byte mask. This path needs no GPU (laptops, CI).

Known limitations: allocations made inside kernels (flash-attention backward's accumulators, cuBLAS
workspaces) are not seen; `estimate` adds them as overhead. Data-dependent ops (`.item()`) fail
under fake tensors; HF causal LMs do not use them in a training step.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from memtune.config import TrainConfig
from memtune.recipe import step as recipe

BLOCK_BYTES = 512  # the caching allocator rounds every request up to a multiple of 512 bytes


class Category(str, Enum):
    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    """The LM head's logits, the loss, and their gradients: large for 128k-256k vocabularies."""
    TEMPORARIES = "temporaries"
    OVERHEAD = "overhead"


def rounded(num_bytes: int) -> int:
    return max(BLOCK_BYTES, math.ceil(num_bytes / BLOCK_BYTES) * BLOCK_BYTES) if num_bytes else 0


NO_LAYER = -1


@dataclass
class Trace:
    """Allocation events of a traced step: ("alloc", id, bytes, layer) and ("free", id, 0, layer).

    `layer` is the decoder layer whose forward or backward was running (NO_LAYER outside them);
    `synthesize` uses it to extend a shallow trace to the model's full depth.
    """

    events: list[tuple[str, int, int, int]] = field(default_factory=list)
    num_layers: int = 0
    period: int = 1
    """Layers repeat with this period (2 for alternating sliding/full attention)."""
    categories: dict[int, Category] = field(default_factory=dict)
    peak_allocated_bytes: int = 0
    peak_breakdown: dict[Category, int] = field(default_factory=dict)
    """Live bytes by category at the moment of the allocated peak."""


class LayerTaggedDispatch(TorchDispatchMode):
    """A dispatch mode that hands every tensor an op returns to `track`, and knows the decoder layer
    running now (`layer_stack`, kept by forward hooks; `base_layer` outside any layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_stack: list[int] = []
        self.base_layer = NO_LAYER

    @property
    def layer(self) -> int:
        return self.layer_stack[-1] if self.layer_stack else self.base_layer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out

    def track(self, tensor: torch.Tensor, category: Any = None) -> Any:
        raise NotImplementedError


class StorageCounter(LayerTaggedDispatch):
    """Records every new storage an op creates and, through a weakref callback, when it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = Trace()
        self._ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self._sizes: dict[int, int] = {}
        self._next_id = 0
        self._live_bytes = 0
        self.phase = Category.WEIGHTS
        self._alloc_index: dict[int, int] = {}
        self.accumulate_in_place: set[tuple[int, ...]] = set()
        """Shapes of gradients that autograd sums in place on a real GPU but out of place on fake tensors.

        The engine adds a second gradient into the first in place (`can_accumulate_inplace`, torch's
        autograd/input_buffer.cpp) unless the tensors are a subclass, as fake tensors are. For a tied
        embedding/LM-head weight the two gradients are vocabulary x hidden: the fake trace would hold
        one more such tensor at the end of backward than the GPU does. Measured on the H200 this holds
        under autocast (the head's gradient arrives through the cast to the compute dtype, a fresh
        tensor), not in fp32, where the traced out-of-place sum matched (tests/data/ground_truth_h200.json)."""

    # -- recording ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten.add.Tensor and self.accumulate_in_place and isinstance(out, torch.Tensor)
                and tuple(out.shape) in self.accumulate_in_place and len(args) == 2
                and all(isinstance(a, torch.Tensor) and a.shape == out.shape and a.dtype == out.dtype for a in args)):
            self._reuse(args[0], out)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out

    def _reuse(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Record `new` as living in `old`'s storage (an in-place add on the GPU): no alloc, and the
        memory is freed when `new` dies, not `old`."""
        storage_id = self._ids.get(old.untyped_storage())
        if storage_id is None or storage_id not in self._sizes:
            return
        storage = new.untyped_storage()
        self._ids[storage] = storage_id
        self._refs[storage_id] = weakref.ref(storage, lambda ref, sid=storage_id: self._free(sid, ref))

    def track(self, tensor: torch.Tensor, category: Category | None = None) -> None:
        storage = tensor.untyped_storage()
        if storage in self._ids:
            return
        size = rounded(storage.nbytes())
        storage_id = self._next_id
        self._next_id += 1
        self._ids[storage] = storage_id
        self._refs[storage_id] = weakref.ref(storage, lambda ref, sid=storage_id: self._free(sid, ref))
        self._sizes[storage_id] = size
        self.trace.categories[storage_id] = category or self.phase
        self._alloc_index[storage_id] = len(self.trace.events)
        self.trace.events.append(("alloc", storage_id, size, self.layer))
        self._live_bytes += size
        if self._live_bytes > self.trace.peak_allocated_bytes:
            self.trace.peak_allocated_bytes = self._live_bytes
            self._peak_event = len(self.trace.events)

    def _free(self, storage_id: int, ref: weakref.ref | None = None) -> None:
        if ref is not None and self._refs.get(storage_id) is not ref:
            return  # the storage's bytes live on in another tensor (see `_reuse`)
        size = self._sizes.pop(storage_id, None)
        if size is None:
            return
        self._refs.pop(storage_id, None)
        self._live_bytes -= size
        self.trace.events.append(("free", storage_id, 0, self.layer))

    def retag(self, tensors: Any, category: Category) -> None:
        """Re-label storages once their role is known (gradients after backward, optimizer state)."""
        for item in tree_flatten(tensors)[0]:
            if isinstance(item, torch.Tensor):
                storage_id = self._ids.get(item.untyped_storage())
                if storage_id is not None:
                    self.trace.categories[storage_id] = category

    def relayer(self, tensors: Any, layer: int) -> None:
        """Move the alloc events of these storages into `layer`'s region."""
        for item in tree_flatten(tensors)[0]:
            if isinstance(item, torch.Tensor):
                storage_id = self._ids.get(item.untyped_storage())
                index = self._alloc_index.get(storage_id)
                if index is not None:
                    kind, sid, size, _ = self.trace.events[index]
                    self.trace.events[index] = (kind, sid, size, layer)

    def finish(self) -> Trace:
        """Label the live bytes at the allocated peak by their final category."""
        live: dict[int, int] = {}
        for kind, storage_id, size, _ in self.trace.events[: getattr(self, "_peak_event", 0)]:
            if kind == "alloc":
                live[storage_id] = size
            else:
                live.pop(storage_id, None)
        breakdown: dict[Category, int] = {}
        for storage_id, size in live.items():
            category = self.trace.categories[storage_id]
            breakdown[category] = breakdown.get(category, 0) + size
        self.trace.peak_breakdown = breakdown
        return self.trace


# -- CUDA behaviour on a CPU trace ---------------------------------------------------------------

# Ops that CUDA autocast runs in fp32 (aten/src/ATen/autocast_mode.cpp, "fp32" list): their
# floating inputs are cast to fp32. CPU autocast leaves them in the input dtype. The lower-precision
# list (linear, matmul, ...) is the same for both devices and is applied by CPU autocast itself.
_AUTOCAST_FP32 = {
    torch.nn.functional.layer_norm, torch.nn.functional.group_norm, torch.nn.functional.softplus,
    torch.nn.functional.cosine_similarity, torch.nn.functional.mse_loss, torch.layer_norm,
    torch.exp, torch.log, torch.rsqrt, torch.pow, torch.logsumexp,
    torch.Tensor.exp, torch.Tensor.log, torch.Tensor.rsqrt, torch.Tensor.pow, torch.Tensor.logsumexp,
}
# The "fp32_set_opt_dtype" policy: no input copy; the op is asked for an fp32 result instead,
# unless the caller already passed a dtype.
_AUTOCAST_FP32_DTYPE = {
    torch.nn.functional.softmax, torch.nn.functional.log_softmax, torch.softmax, torch.log_softmax,
    torch.cumsum, torch.cumprod, torch.sum, torch.prod, torch.Tensor.softmax, torch.Tensor.log_softmax,
    torch.Tensor.cumsum, torch.Tensor.sum, torch.Tensor.prod,
}


class CudaEmulation(TorchFunctionMode):
    """Make a trace on CPU fake tensors allocate what the same step allocates on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            # The mode is off inside its own handler, but checkpointing recomputes the forward in
            # backward: run the engine directly with the mode back on (Tensor.backward would recurse).
            loss = args[0]
            with self:
                engine = torch.autograd.Variable._execution_engine
                engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)
            return None
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        if func is torch.nn.functional.dropout:
            return _cuda_dropout(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            if func in _AUTOCAST_FP32:
                args, kwargs = _to_fp32((args, kwargs))
            elif func in _AUTOCAST_FP32_DTYPE and kwargs.get("dtype") is None and _is_low_precision(args):
                kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


def _is_low_precision(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.float16, torch.bfloat16)


def _to_fp32(tree: Any) -> Any:
    def cast(item: Any) -> Any:
        if isinstance(item, torch.Tensor) and item.dtype in (torch.float16, torch.bfloat16):
            return item.float()
        return item

    return torch.utils._pytree.tree_map(cast, tree)


def _cuda_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    # CUDA's fused dropout saves a 1-byte mask; the CPU kernel saves a noise tensor of the input's dtype.
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, training)[0]


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # noqa: ANN001
    """The SDPA kernel CUDA picks (torch sdp_utils): flash for fp16/bf16 without a mask, else
    memory-efficient, else (fp32 with grouped KV heads) the math path that saves the attention matrix."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    head_dim = query.shape[-1]
    grouped = enable_gqa and key.shape[-3] != query.shape[-3]
    low_precision = query.dtype in (torch.float16, torch.bfloat16)
    if low_precision and attn_mask is None and head_dim <= 256 and head_dim % 8 == 0:
        # Flash takes grouped KV heads natively; its outputs are the attention output and logsumexp.
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if not grouped and head_dim % 8 == 0:
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill(~bias, float("-inf"))
        if bias is not None:
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout_p, is_causal, scale=scale
        )[0]
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


def _meta_to_fake(
    model: torch.nn.Module, fake_mode: Any, device: torch.device, counter: StorageCounter, layer_of: dict[int, int]
) -> dict[int, torch.Tensor]:
    """Replace every meta parameter and buffer by a fake tensor on `device`, keeping tied weights tied.

    Returns {id(fake): meta} so callers can look up what was recorded about the meta tensor.
    """
    converted: dict[int, torch.Tensor] = {}
    originals: dict[int, torch.Tensor] = {}

    def convert(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
        if id(tensor) not in converted:
            counter.base_layer = layer_of.get(id(tensor), NO_LAYER)
            fake = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, tensor, device)
            if is_param:
                fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
            counter.track(fake, Category.WEIGHTS)
            converted[id(tensor)] = fake
            originals[id(fake)] = tensor
        return converted[id(tensor)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = convert(param, True)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = convert(buffer, False)
    counter.base_layer = NO_LAYER
    return originals


def _assume_unpacked_batches() -> contextlib.AbstractContextManager:
    """transformers checks position_ids for packed sequences, and on fake tensors (which it takes for
    tracing) cannot read them, so it keeps a full causal mask and SDPA loses its fused causal
    kernels. The traced batches are never packed: say so, as the real step finds out by reading."""
    from unittest import mock

    try:
        import transformers.masking_utils as masking_utils
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return contextlib.nullcontext()
    return mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)


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


def _first_tensor(value: Any) -> torch.Tensor | None:
    for item in tree_flatten(value)[0]:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _layer_hooks(layers: list[torch.nn.Module], counter: StorageCounter) -> list[Any]:
    """Tag events with the decoder layer running them, in forward (module hooks) and backward
    (a pre-hook on the grad_fn of each layer's output fires when that layer's backward starts)."""

    def set_base(index: int) -> Any:
        def hook(*_: Any) -> None:
            counter.base_layer = index

        return hook

    def pre(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            counter.layer_stack.append(index)
            if index == 0:
                hidden = _first_tensor((args, kwargs))
                if hidden is not None and hidden.grad_fn is not None and torch.is_grad_enabled():
                    hidden.grad_fn.register_prehook(set_base(NO_LAYER))

        return hook

    def post(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            counter.layer_stack.pop()
            hidden = _first_tensor(output)
            if hidden is not None and hidden.grad_fn is not None and torch.is_grad_enabled():
                hidden.grad_fn.register_prehook(set_base(index))

        return hook

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
        hidden = _first_tensor(args)
        if hidden is not None and hidden.requires_grad and torch.is_grad_enabled():
            hidden.register_hook(back_to_temporaries)

    return hook


# -- the trace ---------------------------------------------------------------------------------


def tied_gradient_shapes(model: Any) -> set[tuple[int, ...]]:
    """The shape of a trained weight shared by the input embedding and the LM head (its two gradients
    are summed in backward), or nothing."""
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inputs is None or outputs is None or inputs.weight is not outputs.weight or not inputs.weight.requires_grad:
        return set()
    return {tuple(inputs.weight.shape)}


def trace_step(model_config: Any, train_config: TrainConfig, device: str = "cpu", steps: int = 2) -> Trace:
    """Trace `steps` optimizer steps of `train_config` on fake tensors and return the allocation events."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    emulate = device == "cpu"
    counter = StorageCounter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    amp_device = "cpu" if emulate else "cuda"
    emulation = CudaEmulation() if emulate else contextlib.nullcontext()
    # Build (and wrap with peft) on the meta device, then swap in fake tensors: peft's adapter
    # layers call `.to()`, which under FakeTensorMode fails with "_apply(): Couldn't swap Linear.weight".
    model = recipe.build_model(model_config, train_config, "meta")
    layers = decoder_layers(model)
    unpacked = _assume_unpacked_batches()
    counter.trace.num_layers = len(layers)
    counter.trace.period = layer_period(model_config)
    if train_config.amp != "none":
        counter.accumulate_in_place = tied_gradient_shapes(model)
    layer_of = {id(t): index for index, layer in enumerate(layers) for t in [*layer.parameters(), *layer.buffers()]}
    with unpacked, fake_mode, counter, emulation:
        param_meta = _meta_to_fake(model, fake_mode, torch.device(device), counter, layer_of)
        optimizer = recipe.make_optimizer(model, fused=True)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hooks = _layer_hooks(layers, counter)
        if head is not None:
            hooks.append(head.register_forward_pre_hook(_logits_hook(counter)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for _ in range(steps):
            batches = [recipe.random_batch(model_config, train_config, device)
                       for _ in range(min(train_config.grad_accum_steps, 2))]
            counter.retag(batches, Category.ACTIVATIONS)
            step_config = train_config.replace(grad_accum_steps=len(batches))
            for input_ids in batches:
                counter.phase = Category.ACTIVATIONS
                with recipe.amp_context(train_config, amp_device):
                    loss = recipe.forward_loss(model, input_ids, input_ids, train_config) / step_config.grad_accum_steps
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
        for hook in hooks:
            hook.remove()
        counter.retag([p for p in model.parameters()], Category.WEIGHTS)
        trace = counter.finish()
        del model, optimizer, trainable
    return trace


def extend(trace: Trace, num_layers: int) -> list[tuple]:
    """The events of the same step on a model `num_layers` deep, from a trace of a shallower one.

    The trace must hold at least 3 periods of layers: layers [p, 2p) are the template, repeated
    in place (in order in forward and optimizer regions, in reverse in backward); layers >= 2p are
    shifted up. A free refers to the copy of its allocation at the same layer distance, and a free
    outside any layer (zero_grad) of a template allocation is repeated for every copy. Alloc events
    gain a fifth field, the traced storage id, so categories can be looked up in `trace.categories`.
    """
    p, traced = trace.period, trace.num_layers
    copies = (num_layers - traced) // p
    if copies <= 0:
        return [(*event, event[1]) if event[0] == "alloc" else event for event in trace.events]
    if traced < 3 * p:
        raise ValueError(f"extending needs a trace of >= {3 * p} layers, got {traced}")
    template = range(p, 2 * p)
    region = {sid: layer for kind, sid, _, layer in trace.events if kind == "alloc"}

    def shift_of(layer: int, copy: int) -> int:
        if layer in template:
            return copy * p
        return copies * p if layer >= 2 * p else 0

    out: list[tuple] = []
    live: set[tuple[int, int]] = set()

    def emit(event: tuple[str, int, int, int], copy: int) -> None:
        kind, sid, size, layer = event
        if kind == "alloc":
            key = (sid, shift_of(layer, copy))
            live.add(key)
            out.append(("alloc", hash(key), size, layer, sid))
            return
        alloc_layer = region.get(sid, NO_LAYER)
        if alloc_layer == NO_LAYER:
            keys = [(sid, 0)]
        elif layer == NO_LAYER or (layer not in template and alloc_layer in template):
            keys = [(sid, c * p) for c in range(copies + 1)] if alloc_layer in template else [(sid, shift_of(alloc_layer, 0))]
        else:
            target = layer + shift_of(layer, copy) + (alloc_layer - layer)  # same distance as traced
            if alloc_layer in template:
                keys = [(sid, target - alloc_layer)] if 0 <= target - alloc_layer <= copies * p else []
            else:
                keys = [(sid, shift_of(alloc_layer, 0))]
        for key in keys:
            if key in live:
                live.discard(key)
                out.append(("free", hash(key), 0, layer))

    events = trace.events
    index = 0
    while index < len(events):
        if events[index][3] not in template:
            emit(events[index], 0)
            index += 1
            continue
        end = index
        while end < len(events) and events[end][3] in template:
            end += 1
        run = events[index:end]
        following = next((e[3] for e in events[end:] if e[3] != NO_LAYER), None)
        descending = following is not None and following < p
        for copy in (range(copies, -1, -1) if descending else range(copies + 1)):
            for event in run:
                emit(event, copy)
        index = end
    return out
