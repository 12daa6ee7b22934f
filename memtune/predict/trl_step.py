"""TRL's SFT and DPO training steps on fake tensors: what `SFTTrainer.compute_loss` and `DPOTrainer._compute_loss`
allocate, without TRL installed (`trace.trace_step` calls `trl_loss` for `TrainConfig.trainer` "sft" and "dpo").

What TRL 1.16 runs (trl/trainer/sft_trainer.py, dpo_trainer.py, utils.py `add_fused_lm_head`,
kernels/chunked_logprob.py `ChunkedLogProbFunction`):

- Both trainers patch the causal LM's forward with a fused LM head: `model(..., labels, fused_lm_head=True)` runs the
  backbone, keeps the hidden states of the positions whose next-token label is not -100 (`hidden[mask]`, a copy:
  N x hidden in the backbone's output dtype) and projects them through the LM head in tiles of 4,096 tokens x
  32,768 vocabulary entries into one reused buffer (`mm_buf`, compute dtype), folding each tile into per-token
  statistics (seven fp32 N-vectors) with a Triton kernel. The full logits never exist. The per-token outputs
  (log-probs; SFT adds entropy and top-1, DPO's policy entropy, mean logit and top-1) are scattered back to
  [rows, seq_len - 1]. Backward recomputes each tile into the same kind of buffer and accumulates the gradients in
  fp32: the hidden states' (N x hidden) and, when the head trains, the head weight's (vocab x hidden), then casts
  them to their dtypes; the index and slice of the hidden states give a [rows, seq_len - 1, hidden] and a
  [rows, seq_len, hidden] gradient.
- SFT's loss is the sum of -log-probs over the labelled tokens divided by their count (loss_type "nll"; "dft"
  multiplies by the detached probabilities: two more [rows, seq_len - 1] fp32 tensors, left out). Packed and
  padding-free batches are one row of micro_batch_size x seq_len tokens.
- DPO concatenates chosen and rejected into one batch of 2 x micro_batch_size rows, runs the policy's fused forward,
  then the reference's under no_grad: a frozen second model (built with the policy's dtype, `ref_model_init_kwargs
  ["dtype"] = self.model.dtype`, log-probs only), the policy itself with peft's adapter disabled when it trains an
  adapter (the same weights, no second copy), or nothing with `precompute_ref_log_probs` (the log-probs were
  computed before training and come with the batch). The loss ("sigmoid") and every other `loss_type` work on
  per-sequence scalars (2 x micro-batch numbers): none changes the peak; `use_weighting` (WPO) adds one per-token
  output (`log_sum_sq_probs`, an N-vector), left out.

This module is the allocation twin of that head (`FusedHeadTwin`): the same tensors in the same order, no values
(Triton kernels cannot run on fake tensors, and TRL's torch fallback for devices without Triton allocates tile-sized
fp32 temporaries the kernel does not). Known limitations: every position but the last of each row is taken as
labelled (the upper bound: a prompt's tokens are not, so a DPO or completion-only SFT step with long prompts holds
less); the metrics' small tensors (entropy x mask, token counts) are left out; padding-free batches are traced as one
causal row with no mask (flash-attention's varlen kernels keep that memory; SDPA with packed position_ids builds a
block-diagonal mask that is not traced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from memtune.config import TrainConfig
from memtune.recipe import step as recipe
from memtune.recipe.loss import causal_lm_of

TOKEN_CHUNK_SIZE = 4096
"""Tokens per projection tile (trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE)."""
VOCAB_CHUNK_SIZE = 32768
"""Vocabulary entries per projection tile (trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE)."""
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
"""SFTTrainer's fused-head outputs (`add_fused_lm_head(outputs=...)` in sft_trainer.py)."""
DPO_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
"""DPOTrainer's policy outputs (dpo_trainer.py, without use_weighting)."""
REFERENCE_OUTPUTS = ("log_probs",)
"""A separate reference model's (`add_fused_lm_head(self.ref_model)`: the default outputs)."""
STATISTICS = 7
"""fp32 N-vectors of the online log-sum-exp (running max, sum of exp, x-sum, squares, z-sum, max before the target,
target logit)."""


def trl_batch(model_config: Any, train_config: TrainConfig, device: str | torch.device) -> torch.Tensor:
    """The input_ids of one micro-batch as TRL's collators make it: [2 x micro, seq_len] for DPO (chosen, then
    rejected), [1, micro x seq_len] for packed or padding-free SFT, [micro, seq_len] otherwise."""
    vocab = int(getattr(model_config, "vocab_size", 32000))
    rows, length = train_config.micro_batch_size, train_config.seq_len
    if train_config.trainer == "dpo":
        rows *= 2
    elif train_config.sft_batches != "padded":
        rows, length = 1, rows * length
    return torch.randint(0, vocab, (rows, length), device=device)


class FusedHeadTwin(torch.autograd.Function):
    """The allocations of TRL's fused LM head (module docstring) from the backbone's last hidden state
    [rows, seq_len, hidden] to the per-token outputs [rows, seq_len - 1], forward and backward; no values."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, outputs: tuple[str, ...],
                compute_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        rows, length, width = hidden.shape
        tokens, device = rows * (length - 1), hidden.device
        mask = torch.empty(rows, length - 1, dtype=torch.bool, device=device)  # labels != -100
        picked = torch.empty(tokens, width, dtype=hidden.dtype, device=device)  # hidden_states[mask]
        targets = torch.empty(tokens, dtype=torch.int64, device=device)  # labels[mask]
        statistics = [torch.empty(tokens, dtype=torch.float32, device=device) for _ in range(STATISTICS)]
        _tiles(picked, weight, compute_dtype)
        vector = _vector_maker(tokens, device)
        temporary = vector()  # log(sum_exp)
        log_z = vector()
        del temporary
        per_token = {"log_probs": vector()}
        entropy = None
        if "entropy" in outputs:
            temporary = vector()  # x_sum_exp / sum_exp
            entropy = per_token["entropy"] = vector()
            del temporary
        if "mean_logits" in outputs:
            per_token["mean_logits"] = vector()
        if "is_top1" in outputs:
            first, second = vector(torch.bool), vector(torch.bool)
            per_token["is_top1"] = vector(torch.bool)
            del first, second
        del statistics
        ctx.save_for_backward(picked, weight, targets, log_z, log_z if entropy is None else entropy, mask)
        ctx.compute_dtype, ctx.shape = compute_dtype, hidden.shape
        scattered = []
        for name in outputs:  # x.new_zeros(mask.shape).masked_scatter(mask, x): a zeros tensor, then its copy
            dtype = per_token[name].dtype
            zeros = torch.empty(rows, length - 1, dtype=dtype, device=device)
            scattered.append(torch.empty(rows, length - 1, dtype=dtype, device=device))
            del zeros
        del per_token
        ctx.mark_non_differentiable(*[tensor for name, tensor in zip(outputs, scattered, strict=True)
                                      if name in ("mean_logits", "is_top1")])
        return tuple(scattered)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        picked, weight, targets, log_z, entropy, mask = ctx.saved_tensors
        tokens, width = picked.shape
        rows, length, _ = ctx.shape
        device = picked.device
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        selected = torch.empty(tokens, dtype=torch.float32, device=device)  # grad.masked_select(mask)
        grad_hidden = torch.empty(tokens, width, dtype=torch.float32, device=device) if needs_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if needs_weight else None
        _tiles(picked, weight, ctx.compute_dtype)
        del selected
        if grad_weight is not None and weight.dtype != torch.float32:
            grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)  # .to(weight.dtype)
        grad_input = None
        if grad_hidden is not None:
            if picked.dtype != torch.float32:
                grad_hidden = torch.empty(tokens, width, dtype=picked.dtype, device=device)  # .to(hidden.dtype)
            indexed = torch.empty(rows, length - 1, width, dtype=picked.dtype, device=device)  # index backward
            del grad_hidden
            grad_input = torch.empty(rows, length, width, dtype=picked.dtype, device=device)  # slice backward
            del indexed
        return grad_input, grad_weight, None, None


def _vector_maker(tokens: int, device: torch.device) -> Callable[..., torch.Tensor]:
    """A maker of per-token vectors (fp32 unless told) of `tokens` entries on `device`."""

    def make(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(tokens, dtype=dtype, device=device)

    return make


def _tiles(picked: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """The tile loop of `ChunkedLogProbFunction` (forward and backward alike): one [4096, 32768] buffer in the
    compute dtype, each token chunk of the hidden states and each vocabulary chunk of the weight cast to it when
    their dtype differs (a copy each, freed when the next replaces it)."""
    tokens, width = picked.shape
    vocab = weight.shape[0]
    buffer = torch.empty(min(tokens, TOKEN_CHUNK_SIZE), VOCAB_CHUNK_SIZE, dtype=compute_dtype, device=picked.device)
    chunk = None
    for start in range(0, tokens, TOKEN_CHUNK_SIZE):
        size = min(TOKEN_CHUNK_SIZE, tokens - start)
        if picked.dtype != compute_dtype:
            chunk = torch.empty(size, width, dtype=compute_dtype, device=picked.device)
        if weight.dtype != compute_dtype:
            for vocab_start in range(0, vocab, VOCAB_CHUNK_SIZE):
                rows = min(VOCAB_CHUNK_SIZE, vocab - vocab_start)
                cast = torch.empty(rows, width, dtype=compute_dtype, device=picked.device)
                del cast
    del buffer, chunk


def fused_forward(model: torch.nn.Module, input_ids: torch.Tensor, train_config: TrainConfig,
                  outputs: tuple[str, ...], on_head: Callable[[torch.Tensor], None] | None = None,
                  ) -> tuple[torch.Tensor, ...]:
    """`model(input_ids, labels, fused_lm_head=True)` of TRL's patched forward: the backbone (LoRA layers, the
    checkpointing of the model included), then the fused head's twin. `on_head(hidden)` is called where the head
    starts (the trace's category hook). Returns the per-token outputs named in `outputs`, [rows, seq_len - 1]."""
    causal_lm: Any = causal_lm_of(model)  # a transformers PreTrainedModel
    backbone = causal_lm.base_model  # transformers: getattr(self, base_model_prefix), as TRL's "base_model"
    hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    head = causal_lm.get_output_embeddings()
    if on_head is not None:
        on_head(hidden)
    amp = train_config.amp
    compute_dtype = recipe.TORCH_DTYPES[amp] if amp != "none" else hidden.dtype
    return FusedHeadTwin.apply(hidden, head.weight, outputs, compute_dtype)


def trl_loss(model: torch.nn.Module, reference: torch.nn.Module | None, input_ids: torch.Tensor,
             train_config: TrainConfig, on_head: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The loss of one micro-batch of TRL's SFT or DPO step (module docstring), for `.backward()`. `reference`: the
    frozen reference model of a DPO step with a full copy, else None (the adapter is disabled on `model` itself, or
    the log-probs are precomputed). Raises ValueError for the causal-LM trainer (`recipe.forward_loss` is its)."""
    if train_config.trainer == "sft":
        (log_probs, entropy, top1) = fused_forward(model, input_ids, train_config, SFT_OUTPUTS, on_head)
        del entropy, top1
        return -log_probs.sum() / log_probs.numel()
    if train_config.trainer != "dpo":
        raise ValueError(f"trl_loss: trainer {train_config.trainer!r} is not TRL's (sft or dpo)")
    log_probs, *metrics = fused_forward(model, input_ids, train_config, DPO_POLICY_OUTPUTS, on_head)
    chosen, rejected = log_probs.sum(dim=1).chunk(2, dim=0)
    if train_config.precompute_ref_log_probs:
        ref_chosen = torch.empty_like(chosen)  # from the batch
        ref_rejected = torch.empty_like(rejected)
    else:
        with torch.no_grad():
            if reference is not None:
                ref_outputs = fused_forward(reference, input_ids, train_config, REFERENCE_OUTPUTS)
            else:
                with _adapter_disabled(model):
                    ref_outputs = fused_forward(model, input_ids, train_config, DPO_POLICY_OUTPUTS)
            ref_chosen, ref_rejected = ref_outputs[0].sum(dim=1).chunk(2, dim=0)
            del ref_outputs
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    del metrics
    return -torch.nn.functional.logsigmoid(0.1 * delta).mean()  # loss_type "sigmoid", DPOConfig beta 0.1


def _adapter_disabled(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """peft's `disable_adapter()` (TRL's `use_adapter(model, None)`), or nothing for a model without one."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()
