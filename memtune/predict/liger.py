"""Liger-Kernel's fused linear cross-entropy on fake tensors: an allocation-equivalent stand-in for the trace.

Liger's forward cannot run under FakeTensorMode: it reads the number of counted tokens with `.item()` (data that
fake tensors do not have) and launches Triton kernels on the data pointers. The trace needs only its allocations
and frees, in their order, sizes and dtypes, so `TracedLigerFunction` repeats exactly the tensor operations of
liger-kernel 0.8.5's `fused_linear_cross_entropy_forward` (liger_kernel/ops/fused_linear_cross_entropy.py, lines
51-415: chunk rule at 103-106, buffers at 108-125, the count at 131-132, the logits buffer at 150-155, the chunk
loop at 156-389, the end at 391-415) on the path memtune calls it with (`recipe.loss.liger_fused_linear_cross_entropy`:
reduction "sum", no class weights, z-loss, token scaling or accuracy, `ce_impl=None`), and leaves out only what
allocates nothing: the cross-entropy kernel (which writes the loss and the logits' gradient in place), the
`.item()` (its 0-dim sum is kept: a block), `torch.mm(out=...)` and `torch.addmm(out=...)` into existing buffers.
Backward (lines 418-464) scales the stored gradients in place after comparing the incoming gradient with a new
0-dim `torch.tensor(1.0)`; the loss memtune returns is divided by the token count, so the scaling always runs.

The device-dependent branches are taken as on an NVIDIA GPU of compute capability 8 or more (A100, H100, H200:
`torch.addmm(..., out_dtype=torch.float32)` accumulates the weight gradient in place, torch >= 2.8) whatever
device the trace runs on (fake CUDA or the CPU emulation):
- `_can_use_mm_out` (lines 32-48): the head matmul writes into one (chunk x vocab) buffer allocated once when the
  hidden states and the weight share a dtype and autocast (if on) computes in it: pure bf16, fp32, LoRA on a
  16-bit base under its own autocast; under mixed precision (fp32 hidden states and weights, bf16 autocast) every
  chunk allocates its logits (bf16) and its input-gradient product (bf16, copied into the fp32 buffer);
- the weight gradient: an fp32 or 16-bit accumulator of the weight's shape, allocated in forward (it lives from
  the loss to the optimizer step); fp32 logits (fp32 training without autocast) take Liger's fallback, a
  weight-sized product per chunk.

Known limitations: older GPUs (compute capability < 8) and ROCm take other branches (a weight-sized fp32
temporary per chunk under mixed precision) that are not modelled; allocations inside Triton's kernels are none;
the chunk rule is 0.8.5's (`chunk_mem_const` 1), which 0.5-0.8 share (`inc_factor = cdiv(V, H)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memtune.recipe.loss import FUSED_LOSS, IGNORE_INDEX, causal_lm_of

HALF_DTYPES = (torch.float16, torch.bfloat16)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (triton.next_power_of_2), 1 for n <= 1."""
    return 1 << max(0, n - 1).bit_length()


def liger_chunk_size(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy for `tokens` (batch x sequence) rows: transient logits
    bounded by about tokens x hidden elements, so inc_factor = ceil(V / H) chunks' worth, rounded up to a power of
    two and at most `tokens` (ops/fused_linear_cross_entropy.py lines 103-106, chunk_mem_const 1). Qwen2.5-0.5B
    (V 151,936, H 896) at 4 x 1024: 32 tokens per chunk, 128 chunks; Llama-3.2-1B (128,256, 2048): 128, 32."""
    inc_factor = math.ceil(vocab_size / hidden_size)
    return min(next_power_of_2(math.ceil(tokens / inc_factor)), tokens)


def liger_num_chunks(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """How many chunks Liger's forward runs for `tokens` rows (`liger_chunk_size`)."""
    return math.ceil(tokens / liger_chunk_size(tokens, vocab_size, hidden_size))


def writes_logits_in_place(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Liger's `_can_use_mm_out` on a CUDA GPU, in a forward without grad mode: the head matmul goes into one
    preallocated buffer when the hidden states and the weight share a float dtype and autocast, if on, computes
    in that dtype (lines 32-48)."""
    if hidden.dtype != weight.dtype or hidden.dtype not in (*HALF_DTYPES, torch.float32):
        return False
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return hidden.dtype == torch.get_autocast_dtype(device_type)
    return True


class TracedLigerFunction(torch.autograd.Function):
    """`LigerFusedLinearCrossEntropyFunction` as far as memory goes (module docstring): the same tensors, allocated
    and freed in the same order, values left undefined. Arguments: (tokens, hidden) inputs, (vocab, hidden) weight,
    (tokens,) int64 targets, the bias or None, the softcap (unused: applied inside Liger's kernel)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        input_requires_grad = hidden.requires_grad
        weight_needs_grad = weight.requires_grad
        tokens, _ = hidden.shape
        vocab = weight.shape[0]
        chunk_size = liger_chunk_size(tokens, vocab, hidden.shape[1])

        grad_input = torch.zeros_like(hidden)  # line 108
        grad_weight = grad_bias = None
        if input_requires_grad:  # accum_dtype None: the parameters' dtypes (lines 114-121)
            grad_weight = torch.zeros_like(weight) if weight_needs_grad else None
            grad_bias = torch.zeros_like(bias) if bias is not None else None
        loss_1d = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)  # line 125
        target_mask = target != IGNORE_INDEX  # line 131, alive to the end of the function
        target_mask.sum()  # line 132: .item() of this sum, which fake tensors cannot give
        in_place = writes_logits_in_place(hidden, weight)
        logits_storage = (torch.empty((chunk_size, vocab), dtype=hidden.dtype, device=hidden.device)
                          if in_place and (bias is None or bias.dtype == hidden.dtype) else None)  # lines 150-155

        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            input_chunk = hidden[start:end]
            if logits_storage is not None:
                logits_chunk = logits_storage[: end - start]  # torch.mm(..., out=logits_chunk): in place
                if bias is not None:
                    logits_chunk.add_(bias)
            else:
                logits_chunk = input_chunk @ weight.t()  # the ambient autocast's dtype
                if bias is not None:
                    logits_chunk = logits_chunk + bias
            logits_chunk = logits_chunk.contiguous()
            # liger_cross_entropy_kernel: the loss into loss_1d and the logits' gradient into logits_chunk, in place.
            grad_logits_chunk = logits_chunk
            del logits_chunk
            if input_requires_grad and not (in_place and grad_logits_chunk.dtype == grad_input.dtype):
                grad_input[start:end] = grad_logits_chunk @ weight  # else torch.mm(..., out=grad_input[...])
            if grad_weight is not None:
                if grad_logits_chunk.dtype in HALF_DTYPES and grad_weight.dtype in (torch.float32,
                                                                                    grad_logits_chunk.dtype):
                    # torch.addmm(grad_weight, grad_logits.t(), input_chunk, out=grad_weight[, out_dtype=fp32]):
                    # in place, after aligning the input chunk's dtype with the logits' (lines 325-361)
                    aligned = input_chunk.to(grad_logits_chunk.dtype) if input_chunk.dtype != grad_logits_chunk.dtype \
                        else input_chunk
                    del aligned
                else:  # the fallback (lines 362-375): a weight-sized product per chunk
                    grad_weight += torch.mm(grad_logits_chunk.t(), input_chunk).float()
            if grad_bias is not None and input_requires_grad:
                torch.add(input=grad_bias, other=grad_logits_chunk.sum(dim=0), out=grad_bias, alpha=1.0)
            del grad_logits_chunk, input_chunk
        del logits_storage  # line 391

        loss = torch.sum(loss_1d)
        del loss_1d, target_mask
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)  # line 412: the same tensor (accum_dtype None)
        ctx.save_for_backward(grad_input.detach(), grad_weight.detach() if grad_weight is not None else None,
                              grad_bias.detach() if grad_bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        one = torch.tensor(1.0, device=grad_output.device)  # line 420: torch.equal(grad_output, this); never 1 here
        del one
        # element_mul_kernel scales grad_input, grad_weight and grad_bias in place (lines 421-462).
        return grad_input, grad_weight, None, grad_bias, None


def traced_fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                      bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """The trace's `recipe.loss.liger_fused_linear_cross_entropy`: `TracedLigerFunction`, the summed loss."""
    return TracedLigerFunction.apply(hidden, weight, target, bias, softcap)


def substitute_liger(model: nn.Module, before: Callable[[torch.Tensor], None] | None = None) -> None:
    """Make the Liger forward of the causal LM in `model` (`recipe.loss.use_chunked_loss(kind="liger")`) call the
    stand-in instead of Liger's kernels (its FUSED_LOSS attribute); `before(hidden)` runs first, with the
    flattened hidden states (the trace tags what follows as logits: Liger never calls the head module, whose
    pre-hook the other losses fire)."""

    def fused(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
              softcap: float | None) -> torch.Tensor:
        if before is not None:
            before(hidden)
        return traced_fused_linear_cross_entropy(hidden, weight, target, bias, softcap)

    setattr(causal_lm_of(model), FUSED_LOSS, fused)
