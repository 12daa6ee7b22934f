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

`use_chunked_loss` puts that loss inside the causal LM's own forward, as TRL and Liger do: the instance's
`forward` is replaced, so `model(input_ids=..., labels=...)` returns the chunked loss. One call path then
serves one GPU, DDP (whose forward arms the gradient all-reduce) and FSDP2 (whose root module's hooks
gather and free the shards); peft's wrappers end in a call of that instance, and accelerate's autocast
wrapper of forward (DDP, one GPU) encloses it.

The same forward computes Liger-Kernel's fused linear cross-entropy instead when asked (`kind="liger"`,
`liger_causal_lm_loss`): its Triton kernels compute the head, the loss and both gradients chunk by chunk in
forward (ops/fused_linear_cross_entropy.py of liger-kernel 0.8.5), so backward only scales the stored gradients.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtune.config import require_liger
from memtune.errors import UsageError

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
    logits = _head_logits(head, hidden)
    if scale != 1.0:
        logits = logits * scale
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)`; for a head that is part of an FSDP2 unit, the same product on its weight without calling it.

    The module is called where it can be, so that forward hooks see each chunk (predict/trace.py tags logits memory
    with a pre-hook on the output embedding) and a head that peft wraps computes as wrapped. Under FSDP2 a call per
    chunk, and again in each checkpointed recomputation, runs the unit's hooks every time: the first chunk's
    backward then reaches the unit's post-backward hook, which reshards it, and on torch 2.11 the next
    recomputation finds the weight sharded (H200, 2 GPUs: "aten.mm.default got mixed torch.Tensor and DTensor";
    torch 2.13 gathers it again). accelerate (and `recipe.parallel.apply_fsdp`) shards the head in one unit with the
    final norm, kept unsharded from forward to backward (reshard_after_forward=False): after the norm's forward
    the head's `weight` is the gathered parameter, and stays so until the unit's post-backward hook, which the
    norm's backward runs after every chunk's. Liger-Kernel's fused linear cross-entropy reads the weight the same
    way. A head still sharded there is a unit of its own: accelerate (`_find_final_norm`) finds no final norm in a
    peft model, so an untied head under LoRA is sharded alone, and nothing before it gathers it; it is called then,
    its own hooks gathering it for each chunk and recomputation."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(head, FSDPModule) or not isinstance(head, nn.Linear) or hasattr(head.weight, "device_mesh"):
        return head(hidden)
    return nn.functional.linear(hidden, head.weight, head.bias)


def gathered_weight(head: nn.Module) -> torch.Tensor:
    """The LM head's weight as a plain tensor: under FSDP2 the gathered parameter, which the final norm's unit holds
    from its forward to its post-backward hook (`_head_logits`). Raises RuntimeError if it is still a shard (a
    DTensor): the head was sharded in a unit of its own, or reshards after forward."""
    weight = head.weight
    if hasattr(weight, "device_mesh"):
        raise RuntimeError("the LM head's weight is sharded (a DTensor) where the fused loss needs it gathered: "
                           "shard the final norm and the head in one unit with reshard_after_forward=False, as "
                           "accelerate does")
    return weight


def liger_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    scale: float = 1.0,
    fused: Any = None,
) -> torch.Tensor:
    """The loss of transformers' `ForCausalLMLoss` on `head(hidden_states)`, by Liger-Kernel's fused linear
    cross-entropy: `fused(hidden, weight, targets, bias, softcap)` (default `liger_fused_linear_cross_entropy`)
    returns the summed loss of the flattened hidden states (tokens x hidden) against the shifted targets.

    Arguments as `chunked_causal_lm_loss`. Liger applies the softcap in its kernel (`HAS_SOFTCAPPING`); it has no
    logit scale, so `scale` multiplies the hidden states instead: (s x) W^T = s (x W^T), the same logits up to
    rounding (the model's own forward scales the logits in the head's dtype). `fused` is what the trace replaces
    (`predict.liger`): Liger's kernels cannot run on fake tensors.

    Raises UsageError when the head is not a plain `nn.Linear` (a LoRA layer or another wrapper on the head: Liger
    reads its weight and bias and would skip the adapter), or when Liger-Kernel or Triton is missing.
    """
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        raise UsageError(f"the Liger loss reads the LM head's weight directly, but the head is a "
                         f"{type(head).__name__} (an adapter on the head?): leave the LM head out of --lora-targets, "
                         "or use loss 'chunked'")
    fused = fused if fused is not None else liger_fused_linear_cross_entropy
    shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if scale != 1.0:
        hidden = hidden * scale
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = fused(hidden, gathered_weight(head), targets, head.bias, softcap)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def liger_fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (IGNORE_INDEX skipped), by
    `liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss` (reduction "sum", no
    z-loss, label smoothing or class weights). Imported here, at the first call (the `liger` extra). Raises
    UsageError when Liger-Kernel or Triton is not installed (`config.require_liger`'s words)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        require_liger()  # the UsageError with the install command
        raise

    loss_function = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
    return loss_function(weight, hidden, targets, bias)


CHUNKED_FORWARD = "_memtune_chunked_loss"
"""Attribute set on a causal LM whose forward `use_chunked_loss` replaced (its chunk size in tokens; 0 for Liger)."""
LOSS_KIND = "_memtune_loss_kind"
"""Attribute set with CHUNKED_FORWARD: which loss the forward computes, "chunked" or "liger" (`loss_of`)."""
FUSED_LOSS = "_memtune_fused_loss"
"""Attribute that, when set on the causal LM, replaces `liger_fused_linear_cross_entropy` in its Liger forward:
the trace's stand-in (`predict.liger`), as `predict.trace.offload_to_host` replaces a layer's checkpoint function."""


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model`: through DistributedDataParallel's `module` and peft's
    `get_base_model` (PeftModel -> the causal LM, also for prompt learning); `model` itself otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def use_chunked_loss(model: nn.Module, chunk_tokens: int = CHUNK_TOKENS, kind: str = "chunked") -> nn.Module:
    """Make the causal LM in `model` (`causal_lm_of`) compute the chunked loss in its own forward; returns `model`.

    `kind` "liger": the forward computes Liger-Kernel's fused linear cross-entropy instead (`liger_causal_lm_loss`;
    its own chunks, `chunk_tokens` unused), with the causal LM's FUSED_LOSS attribute, when set, in place of Liger
    (the trace's stand-in). Liger is imported at the first training forward (UsageError there when missing).

    The instance's `forward` becomes one that, given labels in training mode, runs the backbone (the module
    named by `base_model_prefix`, whose output is after the final norm), then `chunked_causal_lm_loss` on the
    LM head module, and returns `CausalLMOutputWithPast(loss=..., logits=None)`; without labels, or in eval
    mode, it is the class's forward. Idempotent. It keeps what the model's own forward does to the logits:
    Gemma-2's `final_logit_softcapping`, Cohere's and Granite's scaling (`logit_scale_of`); and what callers
    pass: peft prefix tuning's prompt cache (`past_key_values`) and other keyword arguments go to the backbone
    (`logits_to_keep` and `return_dict` are dropped: no logits are returned), and Trainer's
    `num_items_in_batch` (passed when the forward takes **kwargs, transformers' `model_accepts_loss_kwargs`)
    divides the summed loss as transformers' `ForCausalLMLoss` does.

    Under DDP the wrapper calls this instance, so its forward still arms the all-reduce. Under FSDP2 the chunks
    multiply by the LM head's gathered weight without calling the head's module (`_head_logits` says why): the
    unit of the final norm and the head is gathered once per micro-batch and its gradient reduced once, by the
    norm's post-backward hook. tests/test_distributed.py checks the loss and every gradient against the standard
    loss on two gloo ranks (DDP, FSDP2, FSDP2 with CPU offload; tied and untied heads).

    Raises UsageError for a model whose config rescales its logits in a way not known here (`logit_scale_of`), and
    ValueError for a model whose forward already computes the other kind (it cannot be undone).
    """
    if kind not in ("chunked", "liger"):
        raise ValueError(f"use_chunked_loss: kind must be 'chunked' or 'liger', got {kind!r}")
    causal_lm = causal_lm_of(model)
    if getattr(causal_lm, CHUNKED_FORWARD, None) is not None:
        if loss_of(causal_lm) != kind:
            raise ValueError(f"use_chunked_loss: this model's forward computes the {loss_of(causal_lm)} loss already, "
                             f"not {kind}: build the model again")
        return model
    config = causal_lm.config
    scale = logit_scale_of(config)
    softcap = getattr(config, "final_logit_softcapping", None)
    class_forward = type(causal_lm).forward

    def forward(self: Any, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, **kwargs: Any) -> Any:
        if labels is None or not self.training:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return class_forward(self, input_ids=input_ids, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        for name in ("logits_to_keep", "return_dict"):
            kwargs.pop(name, None)
        outputs = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kwargs)
        if kind == "liger":
            loss = liger_causal_lm_loss(outputs.last_hidden_state, self.get_output_embeddings(), labels,
                                        softcap=softcap, num_items_in_batch=num_items_in_batch, scale=scale,
                                        fused=getattr(self, FUSED_LOSS, None))
        else:
            loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.get_output_embeddings(), labels,
                                          chunk_tokens=chunk_tokens, softcap=softcap,
                                          num_items_in_batch=num_items_in_batch, scale=scale)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None))

    # A method of this instance: nn.Module.__call__ looks `forward` up on the instance first. (It and the
    # module refer to each other; the trials' gc.collect frees the pair.)
    causal_lm.forward = types.MethodType(forward, causal_lm)
    setattr(causal_lm, CHUNKED_FORWARD, chunk_tokens if kind == "chunked" else 0)
    setattr(causal_lm, LOSS_KIND, kind)
    return model


def uses_chunked_loss(model: nn.Module) -> bool:
    """Whether `use_chunked_loss` was applied to the causal LM in `model` (either kind)."""
    return getattr(causal_lm_of(model), CHUNKED_FORWARD, None) is not None


def loss_of(model: nn.Module) -> str:
    """The loss the causal LM in `model` computes in its forward: "standard", "chunked" or "liger"."""
    causal_lm = causal_lm_of(model)
    if getattr(causal_lm, CHUNKED_FORWARD, None) is None:
        return "standard"
    return str(getattr(causal_lm, LOSS_KIND, "chunked"))


def logit_scale_of(config: Any) -> float:
    """What the model's own forward multiplies its logits by before the loss: Cohere's `logit_scale`, 1 /
    Granite's `logits_scaling` (their modeling files, every cohere* and granite* model type), else 1. Raises
    UsageError for another model type that names one of them: where its forward applies it is not known here."""
    model_type = str(getattr(config, "model_type", ""))
    logit_scale = getattr(config, "logit_scale", None)
    logits_scaling = getattr(config, "logits_scaling", None)
    if model_type.startswith("cohere") and logit_scale is not None:
        return float(logit_scale)
    if model_type.startswith("granite") and logits_scaling is not None:
        return 1.0 / float(logits_scaling)
    rescaling = {name: value for name, value in (("logit_scale", logit_scale), ("logits_scaling", logits_scaling))
                 if value not in (None, 1, 1.0)}
    if rescaling:
        seen = ", ".join(f"{name}={value}" for name, value in rescaling.items())
        raise UsageError(f"the chunked loss does not support {model_type}, whose config rescales its logits ({seen}) "
                         "in a way memtune does not know: use loss='standard' for this model")
    return 1.0
