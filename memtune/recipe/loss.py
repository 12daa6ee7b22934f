"""Causal-LM cross-entropy computed in chunks of tokens, so the full logits never exist at once.

The standard loss materialises the LM head's output for every token: batch x seq x vocab values in
the compute dtype, an fp32 copy for the loss (transformers upcasts), the saved log-softmax and,
in backward, a gradient of each. At 4 x 1024 tokens and Qwen2.5's 151,936-token vocabulary that is
about 2.3 GiB per fp32 copy; for small models it is the largest item at the peak.

Here the flattened hidden states are split into chunks of `chunk_tokens`. Each chunk runs the head,
upcasts, applies Gemma-2's final-logit softcapping and sums its cross-entropy under non-reentrant
activation checkpointing: only the chunk's input (a view of the hidden states) is saved, and its
logits are recomputed in backward, one chunk at a time. The cost is one extra head matmul per chunk.
The same idea as Liger-Kernel's fused linear cross-entropy, without a custom kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# A chunk holds about 12 bytes per token and vocabulary entry at its peak in backward (the saved fp32
# log-softmax, the gradient arriving at it and the one leaving it): with 512 tokens, 0.9 GiB for
# Qwen2.5's 152k vocabulary, 1.5 GiB for Gemma's 256k, whatever the batch and sequence length.
# The head matmul of a chunk (2 x 512 x hidden x vocab: 140-270 GFLOP for 0.5B-1B models) is still
# large enough to keep a GPU busy, so chunking should cost mainly the recomputed matmul. Larger chunks
# leave more fragmentation behind in memtune's estimates (Gemma-2-2B, 4 x 1024 with checkpointing:
# 3.3 GiB more reserved with 1024 than with 512). `benchmarks/chunked_loss.py --sweep` measures
# the time and memory of other sizes on a GPU.
CHUNK_TOKENS = 512


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The loss of transformers' `ForCausalLMLoss` on `head(hidden_states)`, computed in chunks.

    hidden_states: (batch, seq, hidden), after the backbone's final norm.
    labels: (batch, seq) token ids; position t is predicted from position t-1; IGNORE_INDEX is skipped.
    softcap: the config's `final_logit_softcapping` (Gemma-2): logits -> softcap * tanh(logits / softcap).
    scale: logits -> logits * scale in the head's dtype, before the upcast, as Cohere's forward applies its
    `logit_scale` and Granite's divides by `logits_scaling` (modeling_cohere.py, modeling_granite.py).
    num_items_in_batch: divide the summed loss by this instead of by the number of counted tokens
    (gradient accumulation over micro-batches with different numbers of label tokens, as Trainer does).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    # Shift so that tokens < n predict n, as ForCausalLMLoss: pad the end with IGNORE_INDEX.
    shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = sum(
        checkpoint(_chunk_loss_sum, hidden_chunk, target_chunk, head, softcap, scale, use_reentrant=False)
        for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)
    )
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None, scale: float
) -> torch.Tensor:
    # Call the module (not its weight) so forward hooks see each chunk: predict/trace.py tags logits memory
    # with a pre-hook on the output embedding, and peft may wrap the head.
    logits = head(hidden)
    if scale != 1.0:
        logits = logits * scale
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
