"""CUDA's behaviour on a CPU trace: what the same step allocates on the GPU, made to happen on fake CPU tensors.

`CudaEmulation` is a torch function mode, entered around the traced step (trace.trace_step,
fsdp.trace_sharded) when the trace runs on the CPU. It changes four things that allocate differently
on the two devices: autocast's fp32 op list (aten/src/ATen/autocast_mode.cpp), the SDPA kernel CUDA
picks on the card planned for (`sdpa_backend`: flash, memory-efficient or the math fallback by compute
capability, dtype, head_dim and mask, torch sdp_utils), dropout (CUDA's
fused kernel saves a 1-byte mask) and an fp16 softmax with an fp32 result (CUDA's half_to_float kernel
makes no fp32 copy of the input).

`GpuKernels` is a dispatch mode entered on both paths (the fake-CUDA one too): it stands in for kernels
whose fake (meta) implementation refuses inputs the GPU kernel takes. Today one: `aten._grouped_mm`, the
mixture-of-experts matmul of transformers' "grouped_mm" experts (transformers/integrations/moe.py),
whose meta function accepts bf16 only while the CUDA kernel runs fp32 through its per-group fallback
(aten/src/ATen/native/cuda/GroupedBlas.cpp `_grouped_mm_fallback`): fp32 weights, and fp32 master
weights under bf16 autocast (the op is not autocast-enabled), would fail the trace. It answers a
read of a fake tensor's value where the real step's answer is known (`FULL_BATCHES`). And it makes the
temporaries that CUDA kernels allocate through the caching allocator and fake kernels do not: the boolean
mask of `_safe_softmax` (`safe_softmax_temporaries`, the math SDPA path) and the `grad * output` of softmax
backward (`softmax_backward_temporary`). Inside `AttentionScope` (fake-CUDA path) or the CPU path's math
kernel, trace.StorageCounter adds the math path's attention mask in place, as real tensors do
(`MATH_MASK_ADD`).

Known limitations: only the ops listed here are adjusted; a kernel choice CUDA makes elsewhere (cuDNN
convolutions, other fused kernels) is traced as the CPU makes it. The global-memory buffer of CUDA's
reductions (aten/src/ATen/native/cuda/Reduce.cuh: a `sum` over the token dimensions for a bias or norm
weight gradient, 8 bytes per input element in the H200 histories) is not made: its size follows the
reduction's launch configuration (the GPU's multiprocessor count), and it is freed before the next op.
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


# softmax / log_softmax of an fp16 input asked for an fp32 result: CUDA runs the fused half_to_float
# kernel on the fp16 input (aten/src/ATen/native/SoftMax.cpp `softmax(input, dim, dtype)`: is_cuda, Half,
# dtype Float), the CPU first copies the input to fp32. Half only: bf16 takes the copy on both devices.
_HALF_TO_FLOAT = {
    torch.nn.functional.softmax: torch.ops.aten._softmax.default,
    torch.softmax: torch.ops.aten._softmax.default,
    torch.Tensor.softmax: torch.ops.aten._softmax.default,
    torch.nn.functional.log_softmax: torch.ops.aten._log_softmax.default,
    torch.log_softmax: torch.ops.aten._log_softmax.default,
    torch.Tensor.log_softmax: torch.ops.aten._log_softmax.default,
}


def _half_to_float(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """CUDA's fused half_to_float softmax for `func(input, dim, dtype=float32)` on an fp16 input, else None."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dtype != torch.float16:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    positional_dtype = args[2] if len(args) > 2 and func not in (torch.nn.functional.softmax,
                                                                  torch.nn.functional.log_softmax) else None
    dtype = kwargs.get("dtype", positional_dtype)
    if dim is None or dtype != torch.float32:
        return None
    return _HALF_TO_FLOAT[func](args[0], dim, True)


def backward_in_mode(mode: TorchFunctionMode, loss: torch.Tensor) -> None:
    """`loss.backward()` for a function mode's handler of `Tensor.backward`: the mode is off inside its own
    handler, but checkpointing recomputes the forward in backward, so the engine runs with the mode back on
    (Tensor.backward itself would recurse into the handler)."""
    with mode:
        engine = torch.autograd.Variable._execution_engine
        engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)


DEFAULT_CAPABILITY = "9.0"
"""The compute capability traced when the card is not named (TrainConfig.gpu_capability None): Hopper, the H100/H200
that memtune's estimates are measured on."""


def _capability(capability: str | None) -> tuple[int, int]:
    major, _, minor = (capability or DEFAULT_CAPABILITY).partition(".")
    return int(major), int(minor or 0)


def sdpa_backend(capability: str | None, dtype: torch.dtype, head_dim: int, has_mask: bool, *,
                 same_batch: bool = True, same_heads: bool = True, enable_gqa: bool = False) -> str:
    """The kernel CUDA's `scaled_dot_product_attention` runs: "flash", "efficient" or "math", tried in that order as
    torch does (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `select_sdp_backend`, the default priority
    flash > mem-efficient > math; cuDNN, tried on Hopper by torch 2.11, makes the flash kernel's outputs and is
    counted as flash). `capability` is "major.minor" (None: `DEFAULT_CAPABILITY`).

    - flash (`use_flash_attention`): sm80 or newer (`check_sm_version`), fp16 or bf16 inputs
      (`check_flash_attention_dtype`), head_dim <= 256 and a multiple of 8 (`check_head_dim_size_flash`), no
      attention mask (`check_for_attn_mask`), one batch size and one number of heads unless `enable_gqa`
      (`check_batch_size_and_num_heads_dense`); it keeps the output and the logsumexp (batch x heads x L fp32);
    - mem-efficient (`use_mem_efficient_attention`): sm50 or newer, fp32/fp16 (bf16 from sm80), head_dim a
      multiple of `_gemm_alignment` (`check_head_dim_size_mem_efficient`: 8 for 16-bit inputs from sm70, 4 for
      fp32 from sm80), an additive mask allowed, one batch size and one number of heads (grouped KV heads: not
      taken, `check_batch_size_and_num_heads_dense<false>`); it keeps the logsumexp too;
    - math (`_scaled_dot_product_attention_math`): anything else. It materialises the batch x heads x L x S
      scores in forward (in fp32 for 16-bit inputs) and keeps the softmax for backward."""
    card = _capability(capability)
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if dtype == torch.bfloat16 and card < (8, 0):
        return "math"  # no bf16 kernels below sm80 (a bf16 request on such a card is planned as fp16 instead)
    if (card >= (8, 0) and sixteen_bit and not has_mask and head_dim <= 256 and head_dim % 8 == 0 and same_batch
            and (same_heads or enable_gqa)):
        return "flash"
    if card >= (5, 0) and same_batch and same_heads and head_dim % _gemm_alignment(card, sixteen_bit) == 0:
        return "efficient"
    return "math"


def _gemm_alignment(card: tuple[int, int], sixteen_bit: bool) -> int:
    """The head_dim multiple the memory-efficient kernel needs (sdp_utils.cpp `minimum_gemm_alignment`): 4 from
    sm80, raised to 128 bits of elements where tensor cores run (sm80+, or 16-bit inputs from sm70); else 1."""
    alignment = 4 if card >= (8, 0) else 1
    if card >= (8, 0) or (card >= (7, 0) and sixteen_bit):
        alignment = max(alignment, 128 // (16 if sixteen_bit else 32))
    return alignment


def card_sdpa_backends(capability: str | None) -> list[Any]:
    """The SDPA backends (torch.nn.attention.SDPBackend) that exist on a card of `capability`, for
    `torch.nn.attention.sdpa_kernel` on the fake-CUDA path, where torch picks among them as it would there: below
    sm80 no flash (nor cuDNN), so a trace on an H200 picks what a T4 or V100 picks (`sdpa_backend`)."""
    from torch.nn.attention import SDPBackend

    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if _capability(capability) >= (8, 0):
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, *backends]
    return backends


class CudaEmulation(TorchFunctionMode):
    """Make a trace on CPU fake tensors allocate what the same step allocates on CUDA, on a card of compute
    capability `capability` ("major.minor"; None: `DEFAULT_CAPABILITY`): its SDPA kernel (`sdpa_backend`)."""

    def __init__(self, capability: str | None = None) -> None:
        super().__init__()
        self.capability = capability

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return backward_in_mode(self, args[0])
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _fused_attention(*args, capability=self.capability, **kwargs)
        if func is torch.nn.functional.dropout:
            return _cuda_dropout(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            if func in _AUTOCAST_FP32:
                args, kwargs = _to_fp32((args, kwargs))
            elif func in _AUTOCAST_FP32_DTYPE and kwargs.get("dtype") is None and _is_low_precision(args):
                kwargs = {**kwargs, "dtype": torch.float32}
        if func in _HALF_TO_FLOAT:
            fused = _half_to_float(func, args, kwargs)
            if fused is not None:
                return fused
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


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,  # noqa: ANN001
                     *, capability=None):  # noqa: ANN001
    """What CUDA's `scaled_dot_product_attention` runs (torch aten/src/ATen/native/transformers/attention.cpp
    and cuda/sdp_utils.cpp), on CPU fake tensors:

    - under autocast the inputs are cast to the autocast dtype once and the kernel then runs with autocast
      off (the autocast wrapper excludes its own key), so the math path's fp32 upcast of fp16/bf16 inputs
      stays fp32, as on the GPU;
    - a boolean mask becomes an additive one of the query's dtype first (`convert_boolean_attn_mask`:
      `where(mask, 0, -inf)`), whichever kernel runs;
    - the kernel the card of `capability` picks (`sdpa_backend`): flash for fp16/bf16 without a mask on sm80+,
      else memory-efficient, else the math path that saves the attention matrix. Both fused kernels need query,
      key and value of one batch size and (memory-efficient always, flash unless `enable_gqa`) one number of
      heads: a key/value with fewer heads that only broadcasts, as Falcon's multi-query attention passes it, runs
      the math path.

    On Hopper torch 2.11 runs cuDNN attention where this picks flash (head_dim 256, bf16): its outputs and
    gradients have the same sizes (the H200 op logs of benchmarks/paths_diff.py), so the bytes agree."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask, torch.scalar_tensor(0.0, dtype=query.dtype),
                                torch.scalar_tensor(float("-inf"), dtype=query.dtype))
    with torch.autocast("cpu", enabled=False):
        return _attention_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, capability)


def _attention_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, capability):  # noqa: ANN001
    same_batch = query.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]
    same_heads = query.shape[-3] == key.shape[-3] == value.shape[-3]
    backend = sdpa_backend(capability, query.dtype, query.shape[-1], attn_mask is not None, same_batch=same_batch,
                           same_heads=same_heads, enable_gqa=enable_gqa)
    if backend == "flash":
        # Flash takes grouped KV heads natively; its outputs are the attention output and logsumexp.
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    if backend == "efficient":
        bias = attn_mask
        if bias is not None:
            bias = aligned_bias(bias)
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout_p, is_causal, scale=scale
        )[0]
    token = IN_ATTENTION.set(True)
    try:
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )[0]
    finally:
        IN_ATTENTION.reset(token)


MEM_EFFICIENT_ALIGNMENT = 16
"""Elements the memory-efficient kernel's bias strides must be multiples of (torch
aten/src/ATen/native/transformers/attention.cpp `preprocess_mask`: `mem_eff_alignment = 16`)."""


def aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """The attention bias as the memory-efficient kernel receives it (attention.cpp `preprocess_mask`): when a
    stride other than the last is not a multiple of MEM_EFFICIENT_ALIGNMENT (`aligned_tensor`), a copy padded on
    the last dimension to that multiple, sliced back to its length (`pad_bias`). The kernel's autograd node saves
    that bias for backward (torch derivatives.yaml, `_scaled_dot_product_efficient_attention`: its backward takes
    `attn_bias`), so the padded copy lives until the layer's backward: for a packed batch's rows x 1 x L x L mask,
    one bias in the compute dtype per attention layer."""
    if all(stride % MEM_EFFICIENT_ALIGNMENT == 0 for stride in bias.stride()[:-1]):
        return bias
    length = bias.shape[-1]
    padded = torch.nn.functional.pad(bias, (0, MEM_EFFICIENT_ALIGNMENT - length % MEM_EFFICIENT_ALIGNMENT))
    return padded[..., :length]


IN_ATTENTION: contextvars.ContextVar[bool] = contextvars.ContextVar("memtune_in_attention", default=False)
"""True while `scaled_dot_product_attention` runs in the trace (`AttentionScope` on the fake-CUDA path, the
math kernel of `_attention_kernel` on the CPU path): trace.StorageCounter then runs the math path's mask
add in place, as the GPU does (MATH_MASK_ADD)."""

MATH_MASK_ADD = """The math path adds the attention mask to the scores in place on real tensors and out of place on a
tensor subclass (torch aten/src/ATen/native/transformers/attention.cpp `_scaled_dot_product_attention_math`:
`if (at::areAnyTensorSubclassLike({attn, *attn_mask})) attn = attn.add(*attn_mask); else attn.add_(*attn_mask)`).
Fake tensors are subclass-like, so the trace would hold a second batch x heads x L x S score matrix that the
GPU never allocates, and free the first one earlier (H200 history, torch 2.11, Qwen2.5-0.5B fp32 and
Falcon-7B bf16: no allocation between the scores' `bmm` and `_softmax`). Inside SDPA the one `aten.add.Tensor`
of a tensor and something of its shape and dtype is that add."""


class AttentionScope(TorchFunctionMode):
    """Mark the calls of `scaled_dot_product_attention` on the fake-CUDA path (`IN_ATTENTION`), where torch
    itself picks the kernel and the math path's ops reach the dispatch modes one by one. Torch picks among the
    kernels a card of `capability` has (`card_sdpa_backends`, through `torch.nn.attention.sdpa_kernel`), so the
    GPU running the trace stands in for an older one."""

    def __init__(self, capability: str | None = None) -> None:
        super().__init__()
        self.capability = capability

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        from torch.nn.attention import sdpa_kernel

        if func is torch.Tensor.backward:
            return backward_in_mode(self, args[0])  # checkpointing's recomputed attention is marked too
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        token = IN_ATTENTION.set(True)
        try:
            with sdpa_kernel(card_sdpa_backends(self.capability)):
                return func(*args, **(kwargs or {}))
        finally:
            IN_ATTENTION.reset(token)


def safe_softmax_temporaries(scores: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """Allocate and free what CUDA's `_safe_softmax` allocates besides its output (torch
    aten/src/ATen/native/transformers/attention.cpp `_safe_softmax`, CompositeExplicitAutograd, so a real
    GPU runs its body while fake tensors take the one-output meta kernel): after `softmax`, a boolean
    `isneginf` of the scores' shape, its `all(dim, keepdim=True)` and a 0-dim zero; `where_out` then writes
    into the output, and the three are freed, last made first. For the math SDPA path at 4 x 1024 tokens and
    14 heads that is a 56 MiB mask next to the two 224 MiB fp32 score matrices (H200 history, torch 2.11)."""
    masked = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    rows_shape = list(scores.shape)
    if rows_shape:
        rows_shape[dim] = 1
    masked_rows = torch.empty(rows_shape, dtype=torch.bool, device=scores.device)
    zero = torch.empty((), dtype=out.dtype, device=out.device)
    del zero, masked_rows, masked


def softmax_backward_temporary(grad: torch.Tensor, output: torch.Tensor) -> None:
    """Allocate and free the product CUDA's softmax backward makes after its result (torch
    aten/src/ATen/native/cuda/SoftMax.cu `softmax_backward_cuda_out`: `Tensor tmp = grad * output;` before
    the kernel): a tensor of the gradient's shape, freed when the op returns. The fake kernel allocates
    the result only. In Falcon-7B's math attention, 2 x 1024 tokens, 71 heads, that is 568 MiB on top of the
    fp32 scores and their two gradients at the step's peak (H200 history, torch 2.11)."""
    tmp = torch.empty(torch.broadcast_shapes(grad.shape, output.shape), dtype=torch.result_type(grad, output),
                      device=grad.device)
    del tmp


class GpuKernels(TorchDispatchMode):
    """Run what the GPU kernel allocates where the fake kernel refuses the inputs: a grouped matmul of
    non-bf16 inputs. Autograd sits above this mode, so the node and what it saves are torch's own, and
    its backward (`_grouped_mm_mat1_backward` / `_mat2_backward`, torch's derivatives.yaml) comes back
    here as two more grouped matmuls."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _one_bool(args) and _in_mask_code():
            return True  # see FULL_BATCHES
        if func is torch.ops.aten.rand.default and len(args) == 1 and tuple(args[0]) == ():
            # See FULL_BATCHES: a constant fake scalar, which comparisons and reads see through.
            return torch.tensor(1.0, dtype=kwargs.get("dtype") or torch.float32, device=kwargs.get("device"))
        if func is torch.ops.aten._grouped_mm.default and not _bf16_pair(args):
            return grouped_mm_output(*args, **kwargs)
        if func is torch.ops.aten._softmax_backward_data.default:
            grad_input = func(*args, **kwargs)
            softmax_backward_temporary(args[0], args[1])
            return grad_input
        if func is torch.ops.aten._safe_softmax.default:
            out = func(*args, **kwargs)
            safe_softmax_temporaries(args[0], args[1] if len(args) > 1 else kwargs["dim"], out)
            return out
        return func(*args, **kwargs)


FULL_BATCHES = """Two reads of values the trace answers as the real step would, which fake tensors cannot:

- a boolean read of a one-element tensor inside transformers' mask code (transformers/masking_utils.py:
  `fast_all(attention_mask)`, `_ignore_causal_mask_sdpa`, `torch.all(attention_mask == 1)`) is True: the
  traced batches are full and unpadded, so every token is real (transformers 5.17's OPT builds an all-ones
  mask and reads it). Such a read anywhere else still fails the trace, and says so;
- a 0-dim `torch.rand` is the constant 1.0: LayerDrop (`torch.rand([]) < config.layerdrop`, OPT, BART,
  Whisper) then keeps every layer, exactly so for the default layerdrop 0 and the most memory otherwise."""


def _in_mask_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "transformers.masking_utils":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _one_bool(args: tuple) -> bool:
    return len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool \
        and args[0].numel() == 1


def _bf16_pair(args: tuple) -> bool:
    return len(args) >= 2 and all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in args[:2])


def grouped_mm_output(
    mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The output the CUDA grouped matmul allocates (torch/_meta_registrations.py
    `_create_grouped_mm_output_tensor` on a CUDA build): its last dimension padded to 16 bytes.
    The per-group fallback writes into it (`mm_out` per group) and allocates nothing else."""
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        assert offs is not None  # 2D x 2D: one output matrix per group of offs
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]
    elif mat_a.dim() == 2:
        size = [mat_a.size(0), mat_b.size(-1)]
    elif mat_b.dim() == 2:
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    dtype = out_dtype or mat_a.dtype
    alignment = max(1, 16 // dtype.itemsize)
    padded = (size[-1] + alignment - 1) // alignment * alignment
    stride = [size[1] * padded, padded, 1] if len(size) == 3 else [padded, 1]
    return torch.empty_strided(size, stride, dtype=dtype, device=mat_a.device)
