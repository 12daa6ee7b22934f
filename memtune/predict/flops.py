"""FLOPs, memory traffic and kernels per token of a training step, counted on fake tensors by torch's FlopCounterMode.

The speed model (`predict.throughput`) turns these into seconds. A closed form (2 x matmul parameters per token
forward, Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Sec. 2.1, plus causal attention) misses
what differs between architectures: head_dim x heads != hidden (Qwen3, Gemma), eager attention that computes the
masked half (Gemma-2), LoRA's frozen weights needing no weight gradient, mixture-of-experts routing only k experts,
and the elementwise work (qk-norms, extra norms, activations, casts) that small models spend their time on. So
the count is taken from the model itself (`count_flops`):

1. A shallow copy of the model is built on the meta device: a first decoder layer and one more of each layer type
   (`layer_types`: sliding/full attention), as the configuration trains it (the adapter, the attention
   implementation, the precision), and made fake (`trace.meta_to_fake`). Micro-batches of 1 and 2 sequences of
   seq_len tokens run forward and backward on the trace's fake CPU step (CUDA's SDPA kernel choice and autocast,
   `emulation.CudaEmulation`; unpadded batches) under `torch.utils.flop_counter.FlopCounterMode`
   (torch/utils/flop_counter.py: 2 x m x n x k per matmul, mm/addmm/bmm/baddbmm and the fused attention kernels;
   elementwise ops count nothing) and a dispatch mode that counts the other kernels' bytes and every kernel
   launched (TRAFFIC), both per module.
2. Each later layer of a type counts as the middle layer of that type (the first layer, whose input needs no
   gradient under LoRA, computes less and is kept as it is); the LM head is its module's count. FLOPs per token
   come from the 1-sequence pass; bytes per token from the difference of the two passes, and what does not grow
   with tokens (autocast's casts of fp32 weights) per micro-batch.
3. Causal attention: torch counts the fused SDPA kernels' full s^2 scores ("We aren't accounting for causal
   attention here"); the flash and memory-efficient kernels skip the masked tiles when called causal without a
   mask, so their formulas here are scaled by the share computed (`attention_share`, `CAUSAL_TILE`), backward
   included (torch's backward formula counts the scores' recomputation: 2.5 x forward). With a mask (a sliding
   window shorter than the sequence) they compute every tile; eager attention (transformers'
   `eager_attention_forward`) and SDPA's math path are plain matmuls, counted whole, as they run.

Per token, at micro-batch 1: FLOPs are linear in the micro-batch. What a configuration adds is the speed model's
arithmetic, not another count: checkpointing recomputes the layers' forward once more (Chen et al. 2016), a chunked
loss recomputes the head's forward (`recipe.loss`). Counts are cached in the process and on disk (`predict.cache`)
per (model config, seq_len, adapter, attention implementation, card capability, precision); one count costs
~0.2-1 s on a 2-core CPU.

When the count fails (a model whose code fake tensors cannot run, an op without a fake kernel), `flop_count`
returns the caller's fallback (`closed_form`) with a note saying so; it never raises.

Known limitations: mixture-of-experts matmuls are counted through `aten._grouped_mm` (transformers' "grouped_mm"
experts; `GROUPED_MM`) or as the ops they run; layers that differ other than by `layer_types` (e.g. dense layers
among MoE ones) count as the first type; flash-attn (`--attn flash_attention_2`, traced as SDPA) is counted as SDPA
runs, so a sliding window shorter than the sequence counts every tile where flash-attn skips those outside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memtune.config import TrainConfig
from memtune.predict import cache

logger = logging.getLogger("memtune.flops")

CAUSAL_TILE = 128
"""Query and key tile of the fused attention kernels, in tokens (an assumption: flash-attention 2/3's forward block
for head_dim <= 128 on sm80+, kBlockM = kBlockN = 128): a tile on the diagonal is computed whole, one above it
skipped, so causal attention over s = n x 128 tokens computes (n + 1) / 2n of the scores, not exactly half."""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token of one micro-batch's forward and backward at one sequence length, the whole depth."""

    layers_forward: float
    """The decoder layers' forward, attention included."""
    layers_backward: float
    """Their backward: input gradients, and weight gradients of the trained weights only (none for a LoRA base)."""
    head_forward: float
    """The LM head's forward (and any matmul outside the layers)."""
    head_backward: float
    attention_forward: float
    """Of `layers_forward`, the attention scores and their product with the values."""
    attention: str
    """How attention was counted, in words."""
    bytes_forward: float = 0.0
    """Bytes the layers' kernels other than matmuls read and write per token in forward (TRAFFIC)."""
    bytes_backward: float = 0.0
    fixed_bytes_forward: float = 0.0
    """Bytes per micro-batch whatever its tokens, forward: autocast's casts of the weights, LoRA's of its adapters."""
    fixed_bytes_backward: float = 0.0
    launches_forward: float = 0.0
    """Kernels the layers launch per micro-batch in forward, matmuls included (TRAFFIC)."""
    launches_backward: float = 0.0
    counted: bool = True
    """False: the closed form (`closed_form`), because the count failed or was not asked for."""
    note: str = ""
    """Why the count failed, when it did."""

    @property
    def forward(self) -> float:
        return self.layers_forward + self.head_forward

    @property
    def backward(self) -> float:
        return self.layers_backward + self.head_backward


CLOSED_FORM_TRAFFIC = {
    # (bytes forward, bytes backward) per token per layer per hidden unit, (kernels forward, backward) per layer,
    # counted on Llama-3.2-1B at 1024 tokens (bf16 autocast over fp32 weights; LoRA r16 all-linear on bf16 weights)
    "full": (191.0, 431.0, 48.0, 87.0),
    "lora": (485.0, 651.0, 80.0, 121.0),
}
"""The closed form's stand-in for the counted traffic and kernels (`closed_form`)."""
AUTOCAST_CAST_BYTES = 6
"""Bytes per layer parameter autocast moves each forward (and again in backward, casting the gradient): an fp32
read and a 16-bit write."""


def closed_form(num_layers: int, hidden_size: int, vocab_size: int, matmul_parameters: int, seq_len: int,
                frozen: bool, note: str = "", autocast_casts: bool = False) -> FlopCount:
    """The closed form the count replaces: 2 FLOPs per matmul parameter per token forward (Kaplan et al. 2020, Sec.
    2.1), the LM head's vocab x hidden among them; causal attention 2 x layers x seq_len x hidden per token forward
    (half of full attention's 4 s h, as fused kernels skip the masked half); backward 2x forward (input and weight
    gradients), 1x for frozen (LoRA) weights. Traffic and kernels: a Llama layer's (`CLOSED_FORM_TRAFFIC`), and
    `autocast_casts` (fp32 weights under autocast) AUTOCAST_CAST_BYTES per layer parameter each way."""
    head = 2.0 * vocab_size * hidden_size
    attention = 2.0 * num_layers * seq_len * hidden_size
    layer_parameters = matmul_parameters - vocab_size * hidden_size
    layers = 2.0 * layer_parameters + attention
    factor = 1.0 if frozen else 2.0
    forward_bytes, backward_bytes, forward_kernels, backward_kernels = CLOSED_FORM_TRAFFIC["lora" if frozen else "full"]
    casts = AUTOCAST_CAST_BYTES * layer_parameters if autocast_casts and not frozen else 0.0
    return FlopCount(layers_forward=layers, layers_backward=factor * layers, head_forward=head,
                     head_backward=factor * head, attention_forward=attention,
                     attention="closed form: half of 4 x seq_len x hidden per layer",
                     bytes_forward=forward_bytes * num_layers * hidden_size,
                     bytes_backward=backward_bytes * num_layers * hidden_size,
                     fixed_bytes_forward=casts, fixed_bytes_backward=casts,
                     launches_forward=forward_kernels * num_layers, launches_backward=backward_kernels * num_layers,
                     counted=False, note=note)


def attention_share(seq_len_q: int, seq_len_k: int, skips_masked: bool) -> float:
    """The share of the s_q x s_k causal scores a kernel computes: all of them unless it skips the masked tiles
    (`CAUSAL_TILE`); then the tiles on or below the diagonal, (n + 1) / 2n of n x n tiles."""
    if not skips_masked or seq_len_q != seq_len_k or seq_len_q <= 1:
        return 1.0
    tiles = -(-seq_len_q // CAUSAL_TILE)
    return (tiles + 1) / (2 * tiles)


def compute_dtype_name(config: TrainConfig) -> str:
    """The dtype the matmuls (and attention) run in: the autocast dtype, else the weights'."""
    return config.amp if config.amp != "none" else config.weights_dtype


def counting_config(config: TrainConfig) -> TrainConfig:
    """What the count depends on: one sequence of `seq_len` tokens, the adapter, the attention implementation, the
    card (its SDPA kernels) and the precision (SDPA's flash kernel needs 16-bit inputs); no checkpointing, the
    standard loss (the speed model adds their recomputation), no quantisation (a 4-/8-bit base dequantises and runs
    the same matmuls)."""
    return TrainConfig(seq_len=config.seq_len, micro_batch_size=1, adapter=config.adapter, attn=config.attn,
                       gpu_capability=config.gpu_capability, weights_dtype=config.weights_dtype, amp=config.amp)


_COUNTS: dict[str, FlopCount] = {}
"""In-process cache of `flop_count`, by `_key`."""


def _key(model_config: Any, config: TrainConfig) -> str:
    counting = counting_config(config)
    if counting.adapter is not None:  # fields that change what is saved, not what is computed
        counting = counting.replace(adapter=dataclasses.replace(counting.adapter, base_saves_input=False))
    return json.dumps(["flops", model_config.to_json_string(use_diff=False), counting.to_dict()], sort_keys=True)


def flop_count(model_config: Any, config: TrainConfig, fallback: Callable[[str], FlopCount],
               note: Callable[[str], None] | None = None) -> FlopCount:
    """FLOPs per token of `config`'s micro-batch on the model of `model_config` (`count_flops`), cached in the
    process and on disk; when the count fails, `fallback(reason)` (the closed form) and `note` is told once why."""
    key = _key(model_config, config)
    if key in _COUNTS:
        return _COUNTS[key]
    stored = cache.load(key)
    if isinstance(stored, FlopCount):
        _COUNTS[key] = stored
        return stored
    try:
        count = count_flops(model_config, config)
    except Exception as error:  # noqa: BLE001 - any failure of the fake step: the closed form stands in
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        message = (f"FLOPs of {getattr(model_config, 'model_type', 'this model')} counted by the closed form "
                   f"(2 x parameters + attention): FlopCounterMode failed ({reason})")
        logger.debug(message)
        if note is not None:
            note(message)
        count = fallback(message)
        _COUNTS[key] = count
        return count
    cache.store(key, count)
    _COUNTS[key] = count
    return count


@dataclass(frozen=True)
class _Pass:
    """One micro-batch of a shallow model (`_count_shallow`), not per token: per decoder layer, by index, and last
    the LM head, the FLOPs, attention FLOPs, bytes moved and kernels launched (TRAFFIC) of forward and backward."""

    layers: dict[str, list[float]]


def count_flops(model_config: Any, config: TrainConfig) -> FlopCount:
    """Count FLOPs, traffic and kernels (module docstring). Raises whatever the fake step raises."""
    from memtune.predict.trace import num_layers_of

    num_layers = num_layers_of(model_config)
    if num_layers < 1:
        raise ValueError(f"the model config has no decoder layers (num_hidden_layers={num_layers})")
    types = list(getattr(model_config, "layer_types", None) or [])[:num_layers]
    type_of = [types[index] if types else "" for index in range(num_layers)]
    distinct = list(dict.fromkeys(type_of))
    # a shallow model of a first layer and one middle layer of each type (under LoRA the first layer's input needs
    # no gradient, so it computes less): layer 1 + distinct.index(type) stands for every later layer of that type
    shallow_types = [type_of[0], *distinct] if types else []
    one, two, kernels = _count_shallow(model_config, 1 + len(distinct), shallow_types, counting_config(config))
    middle = {kind: 1 + index for index, kind in enumerate(distinct)}

    def whole_depth(micro: _Pass, metric: str) -> float:  # the layers and the head
        per_layer = micro.layers[metric]
        first_deficit = per_layer[0] - per_layer[middle[type_of[0]]]
        return first_deficit + sum(per_layer[middle[kind]] for kind in type_of) + per_layer[-1]

    tokens = config.seq_len

    def per_token(metric: str) -> float:  # the slope from 1 to 2 sequences a micro-batch
        return (whole_depth(two, metric) - whole_depth(one, metric)) / tokens

    def fixed(metric: str) -> float:  # what one micro-batch moves whatever its tokens (autocast's weight casts)
        return max(0.0, 2 * whole_depth(one, metric) - whole_depth(two, metric))

    attention = "; ".join(sorted(kernels)) or "every score computed (eager attention or SDPA's math path: matmuls)"
    head_forward, head_backward = one.layers["forward"][-1], one.layers["backward"][-1]
    return FlopCount(
        layers_forward=(whole_depth(one, "forward") - head_forward) / tokens,
        layers_backward=(whole_depth(one, "backward") - head_backward) / tokens,
        head_forward=head_forward / tokens, head_backward=head_backward / tokens,
        attention_forward=whole_depth(one, "attention_forward") / tokens, attention=attention,
        bytes_forward=per_token("bytes_forward"), bytes_backward=per_token("bytes_backward"),
        fixed_bytes_forward=fixed("bytes_forward"), fixed_bytes_backward=fixed("bytes_backward"),
        launches_forward=whole_depth(one, "launches_forward"), launches_backward=whole_depth(one, "launches_backward"))


def _at_depth(model_config: Any, depth: int, layer_types: list[str]) -> Any:
    """A copy of `model_config` with `depth` decoder layers of `layer_types` (when it has layer types)."""
    config = model_config.__class__.from_dict(model_config.to_dict())
    config.num_hidden_layers = depth
    if layer_types:
        config.layer_types = list(layer_types)
    return config


ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")
"""Ops whose forward FLOPs inside a decoder layer are its attention (`FlopCount.attention_forward`): the fused
kernels, and the batched matmuls of eager attention and of SDPA's math path."""


def _count_shallow(model_config: Any, depth: int, layer_types: list[str],
                   counting: TrainConfig) -> tuple[_Pass, _Pass, set[str]]:
    """Micro-batches of 1 and of 2 sequences of seq_len tokens of the model cut to `depth` layers of `layer_types`
    (`_Pass` each),
    and how attention was counted, on the trace's fake CPU step: CUDA's SDPA kernel choice and autocast
    (`emulation.CudaEmulation`), unpadded batches."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from memtune.predict.emulation import CudaEmulation, GpuKernels
    from memtune.predict.trace import assume_unpacked_batches, decoder_layers, meta_to_fake
    from memtune.recipe import step
    from memtune.recipe.loss import causal_lm_of

    shallow = _at_depth(model_config, depth, layer_types)
    model = step.build_model(shallow, counting, "meta")
    head = getattr(causal_lm_of(model), "get_output_embeddings", lambda: None)()
    layers = decoder_layers(model)
    if len(layers) != depth:
        raise ValueError(f"found {len(layers)} decoder layers in a model built with {depth}")
    # FlopCounterMode's per-module table names a module by the root's class name and its path
    name_of = {id(module): f"{type(model).__name__}.{name}" for name, module in model.named_modules()}
    names: list[str | None] = [name_of[id(layer)] for layer in layers]
    names.append(name_of.get(id(head)) if head is not None else None)
    kernels: set[str] = set()
    passes = []
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with assume_unpacked_batches(), fake_mode, GpuKernels():
        meta_to_fake(model, fake_mode, torch.device("cpu"))
        for sequences in (1, 2):
            input_ids = step.random_batch(shallow, counting.replace(micro_batch_size=sequences), "cpu")
            traffic = _traffic_mode()(names)
            with FlopCounterMode(display=False, custom_mapping=custom_formulas(kernels)) as counter, \
                    CudaEmulation(counting.gpu_capability), traffic:
                with step.amp_context(counting, "cpu"):
                    loss = step.forward_loss(model, input_ids, input_ids, counting)
                forward = _by_module(counter, names)
                attention = _by_module(counter, [*names[:-1], None], ATTENTION_OPS)
                bytes_forward, launches_forward = list(traffic.bytes), list(traffic.launches)
                loss.backward()
            backward = _minus(_by_module(counter, names), forward)
            for parameter in model.parameters():
                parameter.grad = None  # the second pass computes gradients anew, as after an optimizer step
            passes.append(_Pass(
                layers={"forward": forward, "backward": backward, "attention_forward": attention,
                        "bytes_forward": bytes_forward, "bytes_backward": _minus(traffic.bytes, bytes_forward),
                        "launches_forward": launches_forward,
                        "launches_backward": _minus(traffic.launches, launches_forward)}))
    return passes[0], passes[1], kernels


def _minus(after: list[float], before: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


def _by_module(counter: Any, names: list[str | None], ops: tuple[str, ...] | None = None) -> list[float]:
    """FLOPs FlopCounterMode attributed so far to each named module (None: 0), of `ops` only when given."""
    counts = counter.get_flop_counts()
    return [float(sum(flops for op, flops in counts.get(name, {}).items()
                      if ops is None or getattr(op, "__name__", str(op)).split(".")[0] in ops))
            if name is not None else 0.0 for name in names]


def custom_formulas(kernels: set[str]) -> dict[Any, Any]:
    """FlopCounterMode formulas in place of torch's for the fused SDPA kernels, which count the full s^2 scores
    (torch/utils/flop_counter.py `sdpa_flop`: "We aren't accounting for causal attention here"): times the share
    they compute (`attention_share`: causal, the masked tiles skipped); and for `aten._grouped_mm`, which torch does
    not count (GROUPED_MM). `kernels` collects, in words, how attention was counted."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def share(kernel: str, query: Any, key: Any, is_causal: bool) -> float:
        fraction = attention_share(query[2], key[2], bool(is_causal))
        masked = "masked tiles skipped" if is_causal else "every score computed"
        kernels.add(f"{kernel} attention ({masked}: {fraction:.0%} of s^2 at {query[2]} tokens)")
        return fraction

    def flash(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN202
        return int(share("flash", query, key, is_causal) * sdpa_flop_count(query, key, value))

    def efficient(query, key, value, attn_bias=None, compute_log_sumexp=False, dropout_p=0.0, is_causal=False,  # noqa: ANN001, ANN202
                  *args, out_shape=None, **kwargs):
        return int(share("efficient", query, key, is_causal) * sdpa_flop_count(query, key, value))

    def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,  # noqa: ANN001, ANN202
                       dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
        fraction = attention_share(query[2], key[2], bool(is_causal))
        return int(fraction * sdpa_backward_flop_count(grad_out, query, key, value))

    def efficient_backward(grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,  # noqa: ANN001, ANN202
                           dropout_p=0.0, grad_input_mask=None, is_causal=False, *args, out_shape=None, **kwargs):
        fraction = attention_share(query[2], key[2], bool(is_causal))
        return int(fraction * sdpa_backward_flop_count(grad_out, query, key, value))

    formulas: dict[Any, Any] = {
        aten._scaled_dot_product_flash_attention: flash,
        aten._scaled_dot_product_efficient_attention: efficient,
        aten._scaled_dot_product_flash_attention_backward: flash_backward,
        aten._scaled_dot_product_efficient_attention_backward: efficient_backward,
    }
    if hasattr(aten, "_grouped_mm"):
        formulas[aten._grouped_mm] = _grouped_mm_flop
    return formulas


GROUPED_MM = """aten._grouped_mm(a, b, offs): transformers' mixture-of-experts matmul. Each row of a 2-D `a` (tokens x
experts chosen, by k) meets one group's k x n matrix of a 3-D `b`: 2 x rows x k x n, whatever the routing; for
the weight gradient (2-D x 2-D, one output per group) 2 x m x k x n over the groups' shared k."""


def _grouped_mm_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]


NO_KERNEL_OPS = frozenset({
    "detach", "lift_fresh", "_local_scalar_dense", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "_unsafe_view", "alias", "split", "split_with_sizes", "unbind", "chunk", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_to_copy_nonblocking", "set_", "resize_",
    "_has_compatible_shallow_copy_type", "lift",
})
"""aten ops that launch no kernel and move no memory: allocations, metadata and views (also every op whose schema
says it returns a view, `is_view`; prim ops such as `prim.device` are skipped too)."""
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_backward",
                        "_scaled_dot_product_efficient_attention_backward", "_grouped_mm", "_scaled_mm"})
"""Ops timed by their FLOPs: one kernel each, their memory traffic not counted again."""


def _element_bytes(tensor: Any) -> int:
    """Bytes a kernel reads or writes of `tensor`: its elements, a broadcast (stride-0) dimension once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


@functools.cache
def _traffic_mode() -> Any:
    """The dispatch mode that counts, per decoder layer, the kernels launched and the bytes that elementwise and
    reduction kernels read and write (TRAFFIC), built on first use (torch is imported lazily)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.module_tracker import ModuleTracker

    class Traffic(TorchDispatchMode):
        def __init__(self, module_names: list[str | None]) -> None:
            super().__init__()
            self.index = {name: index for index, name in enumerate(module_names) if name is not None}
            self.bytes = [0.0] * len(module_names)
            self.launches = [0.0] * len(module_names)
            self.tracker = ModuleTracker()

        def __enter__(self) -> Any:
            self.tracker.__enter__()
            return super().__enter__()

        def __exit__(self, *args: Any) -> None:
            super().__exit__(*args)
            self.tracker.__exit__(*args)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.namespace != "aten" or func.is_view or name in NO_KERNEL_OPS:
                return out
            layers = [self.index[parent] for parent in self.tracker.parents if parent in self.index]
            if not layers:
                return out
            layer = max(layers)
            self.launches[layer] += 1
            if name not in MATMUL_OPS:
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                           if isinstance(t, torch.Tensor)]
                self.bytes[layer] += sum(_element_bytes(t) for t in tensors)
            return out

    return Traffic


TRAFFIC = """What the layers' kernels other than matmuls move: each op's tensor inputs and outputs, read and written
once (a roofline view of PyTorch's unfused elementwise kernels, softmax, norms, casts, eager attention's s^2 scores and
mask), and every op that launches a kernel (matmuls too), counted on the same fake step as the FLOPs."""
