"""Trainer's evaluation loop on the traced model: what a mid-training `Trainer.evaluate()` allocates.

`trace.trace_step` calls `trace_evaluation` after its training steps when `TrainConfig.eval_batch_size` is set,
inside the same fake-tensor and dispatch modes, so the eval steps' allocations follow the training step's in one
event stream, as on the GPU: the weights, the optimizer state and the caching allocator's segments of training
are alive, and the gradients are not (Trainer's training loop calls `model.zero_grad()` after each optimizer step,
set_to_none by default, before `_maybe_log_save_evaluate` evaluates: transformers 5.24 trainer.py). What one eval
step does (trainer.py `evaluation_loop` and `prediction_step`, accelerate 1.15):

1. the batch (input_ids and labels, each [eval_batch_size, seq_len] int64) is on the GPU;
2. `model.eval()`, then the model's own forward with labels under `torch.no_grad()` and the training autocast
   (accelerate wraps the forward in it): no activations are saved, no checkpointing runs, dropout is off;
3. with mixed precision accelerate's `convert_outputs_to_fp32` copies the 16-bit logits to fp32
   (operations.py `convert_to_fp32`), so the logits Trainer keeps are fp32 under autocast;
4. the loss is repeated eval_batch_size times and concatenated into `all_losses`; with logits kept
   (`TrainConfig.eval_logits` "keep" or "accumulate_cpu"), the logits and labels are concatenated into
   `all_preds` / `all_labels` (`EvalLoopContainer.add` -> `nested_concat` -> `torch.cat`: the old and the new
   tensor exist together while the copy runs);
5. "accumulate_cpu" (eval_accumulation_steps=1) moves the containers to the host and drops the step's tensors
   after every step; otherwise the step's `losses, logits, labels` stay referenced by the loop's variables until
   the next step returns.

Without logits kept on the GPU every step after the first allocates the same: `TRACED_EVAL_STEPS` steps are traced.
With logits kept ("keep") each step's concatenation needs a larger block than any before it, so the allocator's
history matters (segments of earlier containers stay cached and later forwards reuse them): every step is traced,
up to `MAX_TRACED_KEPT_STEPS`; beyond that the containers start with the earlier steps' logits as one tensor each
(their size at the last steps, where the peak is), which leaves out the cached segments of those earlier steps (a
history that large outgrows any GPU, where torch releases the cache and retries, as `evaluation.estimate_evaluation`
replays with a device size). Known limitations: the allocator's cache release after each
"accumulate_cpu" step (`torch.cuda.empty_cache()`) is not replayed (it lowers reserved memory, never the peak);
the small tensors of `pad_across_processes` and the last training batch still referenced are left out; a
compute_metrics that runs on the GPU is not seen (Trainer calls it on host arrays).
"""

from __future__ import annotations

from typing import Any

import torch

from memtune.config import TrainConfig
from memtune.recipe import step as recipe

TRACED_EVAL_STEPS = 2
"""Eval steps traced without logits kept on the GPU: the second one runs with the first one's tensors still
referenced (the steady state)."""
MAX_TRACED_KEPT_STEPS = 8
"""Eval steps traced at most with logits kept on the GPU ("keep"); more steps start from one preallocated container."""
EVAL_CATEGORY = "evaluation"
"""The breakdown key of what an eval step allocates (activations, logits, loss)."""
KEPT_LOGITS_CATEGORY = "eval logits kept"
"""The breakdown key of Trainer's eval containers (logits, labels and losses of the steps so far) on the GPU."""


def logits_dtype(model: torch.nn.Module, train_config: TrainConfig) -> torch.dtype:
    """The dtype of the logits Trainer receives: fp32 under autocast (accelerate's `convert_outputs_to_fp32`),
    else the LM head's weight dtype."""
    if train_config.amp != "none":
        return torch.float32
    weight = getattr(output_embeddings(model), "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head of a transformers model or its peft wrapper (`get_output_embeddings`), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, torch.nn.Module) else None


def to_fp32_outputs(outputs: Any, train_config: TrainConfig) -> dict[str, Any]:
    """The model's outputs as Trainer sees them: a dict, its 16-bit tensors copied to fp32 under autocast
    (accelerate operations.py `convert_to_fp32`, applied by `Accelerator.prepare_model` with mixed precision)."""
    items = dict(outputs.items()) if hasattr(outputs, "items") else {"loss": outputs[0], "logits": outputs[1]}
    if train_config.amp == "none":
        return items
    return {name: value.float() if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)
            else value for name, value in items.items()}


def _concat(kept: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """`EvalLoopContainer.add` with concatenation (trainer_pt_utils.py `nested_concat`): the first step's tensor
    itself, then torch.cat along the batch."""
    return new if kept is None else torch.cat((kept, new), dim=0)


def trace_evaluation(model: torch.nn.Module, model_config: Any, train_config: TrainConfig, device: str,
                     amp_device: str, counter: Any) -> None:
    """Run Trainer's evaluation loop (module docstring) on the traced `model` inside the trace's modes, after its
    training steps: eval steps of `train_config.eval_batch_size` sequences (how many: module docstring). `counter`
    is the trace's `StorageCounter`: the first storage it makes here is kept in `Trace.eval_first_storage`, and
    every eval storage is tagged `EVAL_CATEGORY` or `KEPT_LOGITS_CATEGORY`."""
    batch_size = train_config.eval_batch_size
    if batch_size is None:
        return
    eval_config = train_config.replace(micro_batch_size=batch_size)
    steps = train_config.eval_steps
    keep_logits = train_config.eval_logits != "none"
    traced_steps = min(steps, MAX_TRACED_KEPT_STEPS if train_config.eval_logits == "keep" else TRACED_EVAL_STEPS)
    counter.trace.eval_first_storage = counter._next_id
    counter.phase = KEPT_LOGITS_CATEGORY
    all_losses = all_preds = all_labels = None
    earlier = steps - traced_steps if train_config.eval_logits == "keep" else 0
    if earlier:  # the containers after the steps not traced: one tensor each, as their last concatenation left them
        head = output_embeddings(model)
        weight = getattr(head, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(model_config.vocab_size)
        all_losses = torch.empty(earlier * batch_size, dtype=torch.float32, device=device)
        all_preds = torch.empty(earlier * batch_size, train_config.seq_len, vocab,
                                dtype=logits_dtype(model, train_config), device=device)
        all_labels = torch.empty(earlier * batch_size, train_config.seq_len, dtype=torch.int64, device=device)
    kept_ids: set[int] = set(counter.storage_ids([all_losses, all_preds, all_labels]))
    model.eval()
    losses = logits = labels = None
    for _ in range(traced_steps):
        counter.phase = EVAL_CATEGORY
        input_ids = recipe.random_batch(model_config, eval_config, device)
        batch_labels = recipe.random_batch(model_config, eval_config, device)
        with torch.no_grad(), recipe.amp_context(train_config, amp_device):
            outputs = model(input_ids=input_ids, labels=batch_labels)
        with torch.no_grad():
            items = to_fp32_outputs(outputs, train_config)
            del outputs
            losses = items.pop("loss").detach().mean()
            logits = items.pop("logits", None) if keep_logits else None
            del items
            labels = batch_labels if keep_logits else None
            counter.phase = KEPT_LOGITS_CATEGORY
            losses = losses.repeat(batch_size)
            all_losses = _concat(all_losses, losses)
            if logits is not None and labels is not None:
                all_preds = _concat(all_preds, logits)
                all_labels = _concat(all_labels, labels)
            kept_ids.update(counter.storage_ids([all_losses, all_preds, all_labels]))
            if train_config.eval_logits == "accumulate_cpu":  # to_cpu_and_numpy, then `del losses, logits, ...`
                all_losses = all_preds = all_labels = None
                losses = logits = labels = None
        del input_ids, batch_labels
    del losses, logits, labels, all_losses, all_preds, all_labels
    model.train()
    first = counter.trace.eval_first_storage
    for storage_id in list(counter.trace.categories):
        if isinstance(storage_id, int) and storage_id >= first:
            counter.trace.categories[storage_id] = (KEPT_LOGITS_CATEGORY if storage_id in kept_ids
                                                    else EVAL_CATEGORY)
