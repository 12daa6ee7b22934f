"""A quantised base (QLoRA) on fake tensors: bitsandbytes' packed weights and what its CUDA kernels allocate.

The model is built on the meta device by the recipe (recipe/quant.py: transformers' quantizer puts
`bnb.nn.Linear4bit` / `Linear8bitLt` in place of the linear layers, peft's prepare_model_for_kbit_training and
LoRA around them). `fake_quantized_weights` then gives each of those layers the tensors bitsandbytes' CUDA
quantisation leaves on the GPU, as fake tensors of the same shape and dtype, without a weight or a GPU:

- 4 bits (`functional.quantize_4bit`): the packed weight, uint8 [(out*in+1)//2, 1]; the 16-value code table
  (fp32, `get_4bit_type`); the scale of each 64-value block, fp32 [blocks], or with double quantisation
  (`compress_statistics`) the scales' mean (fp32, 0-dim), the scales in 8 bits (uint8 [blocks]) and their own
  fp32 scale per 256 (`quantize_blockwise`, blocksize 256) with a copy of the 256-value dynamic code (fp32).
- 8 bits (`Int8Params._quantize` -> `int8_vectorwise_quant`): the int8 weight [out, in] and its per-row scale
  SCB, fp32 [out].

The weight is a plain Parameter of the packed tensor with the QuantState attached (`weight.quant_state`), as
bitsandbytes' own `fix_4bit_weight_quant_state_from_module` rebuilds it: `Params4bit.__torch_function__` fails
under FakeTensorMode ("all __torch_dispatch__ handlers returned NotImplemented"). The 8-bit weight is a plain
Parameter with `CB` (itself) and `SCB` attached, which `Linear8bitLt.forward` moves into its MatmulLtState.

`BnbKernels` is a dispatch mode, entered around the traced step on both paths, that runs bitsandbytes'
ops (`torch.ops.bitsandbytes.*`) as its CUDA backend (bitsandbytes/backends/cuda/ops.py, 0.50.2) allocates:
the registered fake kernels allocate the output only, where the CUDA `gemm_4bit` of more than 1536 tokens
dequantises the whole weight first ([out, in] in the compute dtype) and multiplies with F.linear, and the
int8 matmul makes an int32 product, an fp16 result and a cast. `cuda_branch` makes the CPU trace take the
CUDA autograd function of 8-bit layers (`MatMul8bitLt`; bitsandbytes picks `MatMul8bitFp` for CPU tensors).

Known limitations: LLM.int8's outlier columns (inputs of magnitude >= threshold 6.0) depend on the data;
the trace assumes none (random weights at the benchmarks' scale have none; a trained model's few add an
[tokens, outliers] fp16 copy per layer). `gemm_4bit` of 5 to 1536 tokens picks its fused kernel or the
dequantise fallback by a per-architecture table (`_gemm_4bit_use_custom_cuda`); the trace takes the
fallback, sm90's (H100/H200) usual choice, and the fused kernel for at most 4 tokens only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memtune.config import TrainConfig
from memtune.recipe import quant
from memtune.recipe.step import TORCH_DTYPES

BLOCKSIZE_4BIT = 64
"""Values per scale of a 4-bit weight (transformers' BitsAndBytesConfig passes none: Params4bit's 64)."""
BLOCKSIZE_NESTED = 256
"""Scales per fp32 scale under double quantisation (`quantize_4bit`: quantize_blockwise(blocksize=256))."""
CODE_4BIT_VALUES = 16
DYNAMIC_CODE_VALUES = 256
GEMM_4BIT_FUSED_MAX_TOKENS = 4
"""bitsandbytes' `_GEMM_4BIT_CUSTOM_FLOOR_M`: up to this many rows `gemm_4bit` always runs its fused kernel (past
1536 rows, `_gemm_4bit_custom_max_m`, it always dequantises; between, a per-architecture table decides)."""


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's bitsandbytes linear layers (Linear4bit and Linear8bitLt), in module order."""
    bnb = quant.require_bitsandbytes()
    return [module for module in model.modules() if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def packed_4bit(out_features: int, in_features: int, weights_dtype: torch.dtype, quant_type: str,
                double_quant: bool, device: torch.device) -> tuple[torch.Tensor, Any]:
    """The packed weight and QuantState `functional.quantize_4bit` leaves on `device` for an [out, in] weight of
    `weights_dtype` (the QuantState's dtype: what backward dequantises to), made with torch.empty: under a fake
    mode, fake tensors of the same bytes."""
    from bitsandbytes.functional import QuantState

    numel = out_features * in_features
    blocks = -(numel // -BLOCKSIZE_4BIT)
    weight = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device)
    code = torch.empty(CODE_4BIT_VALUES, dtype=torch.float32, device=device)
    shape = torch.Size([out_features, in_features])
    if not double_quant:
        absmax = torch.empty(blocks, dtype=torch.float32, device=device)
        return weight, QuantState(absmax=absmax, shape=shape, code=code, blocksize=BLOCKSIZE_4BIT,
                                  quant_type=quant_type, dtype=weights_dtype)
    offset = torch.empty((), dtype=torch.float32, device=device)
    scales = torch.empty(blocks, dtype=torch.uint8, device=device)
    nested_absmax = torch.empty(-(blocks // -BLOCKSIZE_NESTED), dtype=torch.float32, device=device)
    nested_code = torch.empty(DYNAMIC_CODE_VALUES, dtype=torch.float32, device=device)
    state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=BLOCKSIZE_NESTED, dtype=torch.float32)
    return weight, QuantState(absmax=scales, shape=shape, code=code, blocksize=BLOCKSIZE_4BIT,
                              quant_type=quant_type, dtype=weights_dtype, offset=offset, state2=state2)


def fake_quantized_weights(model: nn.Module, train_config: TrainConfig, device: torch.device, counter: Any,
                           layer_of: dict[int, int]) -> int:
    """Give every bitsandbytes layer of the meta-built `model` its quantised weight as fake tensors on `device`
    (call it inside the trace's FakeTensorMode and StorageCounter: the counter records them as weights of the
    layer `layer_of` names for the meta weight). Returns how many layers were given weights."""
    quantization = train_config.quantization
    if quantization is None:
        return 0
    bnb = quant.require_bitsandbytes()
    weights_dtype = TORCH_DTYPES[train_config.weights_dtype]
    layers = quantized_layers(model)
    for module in layers:
        module = cast(Any, module)  # a bitsandbytes layer: its weight carries quant_type, compress_statistics
        meta_weight = module.weight
        counter.base_layer = layer_of.get(id(meta_weight), -1)
        out_features, in_features = module.out_features, module.in_features
        if isinstance(module, bnb.nn.Linear4bit):
            packed, state = packed_4bit(out_features, in_features, weights_dtype, meta_weight.quant_type,
                                        meta_weight.compress_statistics, device)
            weight = nn.Parameter(packed, requires_grad=False)
            weight.quant_state = state  # type: ignore[attr-defined]
            module.quant_state = state
            module.support_avx512bf16_for_cpu = False  # the CPU inference repacking is never the GPU's
        else:
            int8 = torch.empty((out_features, in_features), dtype=torch.int8, device=device)
            weight = nn.Parameter(int8, requires_grad=False)
            weight.CB = weight  # type: ignore[attr-defined]
            weight.SCB = torch.empty(out_features, dtype=torch.float32, device=device)  # type: ignore[attr-defined]
            weight.has_fp16_weights = False  # type: ignore[attr-defined]
        module._parameters["weight"] = weight
        layer_of[id(weight)] = counter.base_layer
    counter.base_layer = -1
    return len(layers)


# -- bitsandbytes' CUDA kernels, as they allocate ----------------------------------------------------------


def _gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Any, absmax: torch.Tensor, blocksize: int,
               quant_type: str, bias: torch.Tensor | None = None, absmax_8bit: torch.Tensor | None = None,
               absmax_code: torch.Tensor | None = None, absmax_offset: torch.Tensor | None = None) -> torch.Tensor:
    """backends/cuda/ops.py `gemm_4bit`: the fused kernel (output only) for few rows, else
    `_dequant_linear_fallback`: the nested scales in fp32 (+ offset), the whole weight dequantised to A's dtype,
    F.linear."""
    in_features = A.shape[-1]
    rows = A.numel() // in_features
    if rows <= GEMM_4BIT_FUSED_MAX_TOKENS and in_features % blocksize == 0:
        A = A.contiguous()
        return torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)
    scales = []  # the fallback's locals live until it returns: the nested scales in fp32, then + offset
    if absmax_8bit is not None and absmax_offset is not None:
        scales.append(torch.empty_like(absmax_8bit, dtype=torch.float32))
        scales.append(scales[0] + absmax_offset)
    dequantized = torch.empty(tuple(shapeB), dtype=A.dtype, device=A.device)
    output = torch.nn.functional.linear(A, dequantized, bias)
    del scales, dequantized
    return output


def _dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                     shape: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=A.device)


def _dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(A, dtype=dtype)


def _gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Any, absmax: torch.Tensor, code: torch.Tensor,
               blocksize: int) -> torch.Tensor:
    return torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)


def _int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, ...]:
    """CUDA: row scales, the int8 rows, and with a threshold the |A| >= threshold test (no outliers found)."""
    rows = A.numel() // A.shape[-1]
    row_stats = torch.empty(rows, dtype=torch.float32, device=A.device)
    out_row = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    outlier_cols = None
    if threshold > 0.0:
        outliers = A.abs() >= threshold
        found = outliers.any()
        del outliers, found
        outlier_cols = torch.empty(0, dtype=torch.int64, device=A.device)
    return out_row, row_stats, outlier_cols  # type: ignore[return-value]


def _int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32, device=A.device)


def _int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                     dtype: torch.dtype | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA: an fp16 result, the bias added unless fp16 (fused), then cast to `dtype`."""
    out = torch.empty_like(A, dtype=torch.float16)
    if bias is not None and bias.dtype != torch.float16:
        out.add_(bias)
    return out.to(dtype or torch.float16)


def _int8_scaled_mm(A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """backends/default/ops.py (CUDA runs the default): int32 product, then dequantised."""
    product = _int8_linear_matmul(A, B)
    return _int8_mm_dequant(product, row_stats, col_stats, dtype=dtype or torch.float16, bias=bias)


def _int8_mixed_scaled_mm(A: torch.Tensor, CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor,
                          SCB: torch.Tensor, outlier_cols: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """backends/default/ops.py without outlier columns: an empty subA and the int8 matmul."""
    sub_a = torch.empty(0, dtype=A.dtype, device=A.device)
    return _int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype), sub_a


_KERNELS: dict[str, Callable[..., Any]] = {
    "gemm_4bit": _gemm_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "dequantize_blockwise": _dequantize_blockwise,
    "gemv_4bit": _gemv_4bit,
    "int8_vectorwise_quant": _int8_vectorwise_quant,
    "int8_linear_matmul": _int8_linear_matmul,
    "int8_mm_dequant": _int8_mm_dequant,
    "int8_scaled_mm": _int8_scaled_mm,
    "int8_mixed_scaled_mm": _int8_mixed_scaled_mm,
}
"""bitsandbytes op name -> its CUDA allocations (the op's default overload is what a dispatch mode sees)."""


def _kernels() -> dict[Any, Callable[..., Any]]:
    return {getattr(torch.ops.bitsandbytes, name).default: kernel for name, kernel in _KERNELS.items()}


class BnbKernels(TorchDispatchMode):
    """Runs bitsandbytes' ops (`torch.ops.bitsandbytes.*`) as its CUDA backend allocates (the functions above),
    in place of their registered fake kernels; other ops pass through. A dispatch mode, entered above the trace's
    StorageCounter (which records what the functions allocate) as `emulation.GpuKernels` is: it sees the ops of
    backward and of checkpointing's recomputation too, on autograd's threads (fake CUDA) as on the caller's."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = _kernels()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kernel = self.kernels.get(func)
        if kernel is not None:
            return kernel(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _cuda_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, state: Any = None,
                 threshold: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`bitsandbytes.matmul` as it runs for CUDA tensors: MatMul8bitLt (the CPU picks MatMul8bitFp)."""
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    return MatMul8bitLt.apply(A, B, out, bias, state)


def quantized_step(train_config: TrainConfig, emulate: bool) -> contextlib.AbstractContextManager:
    """What the traced step of a quantised base runs under: `BnbKernels`, bitsandbytes' warnings quiet (its 8-bit
    matmul warns at every call that it casts inputs to fp16), and on the CPU path (`emulate`) the CUDA branch of
    `bitsandbytes.matmul`. A null context without quantization."""
    if train_config.quantization is None:
        return contextlib.nullcontext()
    bnb = quant.require_bitsandbytes()
    stack = contextlib.ExitStack()
    logger = logging.getLogger("bitsandbytes")
    stack.callback(logger.setLevel, logger.level)
    logger.setLevel(logging.ERROR)
    if emulate:
        stack.enter_context(mock.patch.object(bnb, "matmul", _cuda_matmul))
    stack.enter_context(BnbKernels())
    return stack
