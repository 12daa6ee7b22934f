"""Real trial steps on the GPU: measure what a configuration really takes, then give the memory back.

The model is built from its config with random weights directly on the GPU (no download); the
step is `recipe.train_step`. Peaks are measured as deltas over the allocator's state before the
trial, so persistent library workspaces (cuBLAS) allocated by an earlier trial do not count twice;
`library_workspace_bytes` reports them when this trial created them.
"""

from __future__ import annotations

import time
from typing import Any

from memtune.config import TrainConfig
from memtune.errors import NoGpuError, UsageError
from memtune.measure.memory import Measurement, is_oom, release_memory, set_allocator_mode, warm_up


def measure(model_config: Any, train_config: TrainConfig, steps: int = 3, device: str = "cuda",
            accumulation_limit: int | None = 2) -> Measurement:
    """Run `steps` real optimizer steps of `train_config` and measure peak memory and step time.

    With `accumulation_limit`, a step accumulates at most that many micro-batches: from the second
    micro-batch on, every gradient is alive and the step's memory repeats itself, so 2 micro-batches
    reach the peak of any accumulation (the trace relies on the same fact), and a trial of 1 x 32
    costs 2 micro-batches, not 32. tokens_per_step and step_seconds then describe the shortened step
    (the optimizer's share is over-counted: a conservative tokens/s). None runs the full step.

    An out-of-memory error is caught and reported as `fits=False`; any other error propagates.
    Either way the memory the trial took is given back before returning. A DeepSpeed plan raises UsageError:
    trials do not run DeepSpeed yet.
    """
    if train_config.deepspeed:
        raise UsageError(f"trial steps do not run DeepSpeed plans yet, got {train_config.describe()}: run the plan "
                         "(memtune run) or measure strategy fsdp / ddp")
    if train_config.offload != "none" or train_config.num_gpus > 1:
        # Offload and multi-GPU run as FSDP through accelerate's preparation (`measure.sharded.measure_sharded`).
        from memtune.measure.sharded import measure_sharded

        return measure_sharded(model_config, train_config, steps=steps, device=device)
    import torch

    from memtune.recipe import step as recipe

    if not torch.cuda.is_available():
        raise NoGpuError("trial steps need a CUDA GPU and none is visible; use `memtune plan` to predict without one")
    set_allocator_mode(train_config.expandable_segments)  # each trial in its own plan's allocator mode
    warm_up()
    release_memory()
    allocated_before = torch.cuda.memory_allocated()
    reserved_before = torch.cuda.memory_reserved()
    retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    if accumulation_limit is not None and train_config.grad_accum_steps > accumulation_limit:
        train_config = train_config.replace(grad_accum_steps=accumulation_limit)
    result = Measurement(fits=True, tokens_per_step=train_config.effective_batch_size * train_config.seq_len)
    model = optimizer = scaler = None
    try:
        model = recipe.build_model(model_config, train_config, device)
        # Built on the GPU, a tied model allocates its LM head's own weight (vocabulary x hidden) and frees it
        # when the weights are tied; the cache keeps that block and the step's logits land in it (1.1 GiB for
        # Gemma-2's head, H200 history in benchmarks/results/single_history_h200.json). A model loaded with
        # from_pretrained and moved to the GPU, as `memtune run` and Trainer load one, never allocates it:
        # hand the block back so the trial holds what the run will.
        release_memory()
        optimizer = recipe.make_optimizer(model, train_config)
        scaler = torch.amp.GradScaler("cuda") if train_config.amp == "fp16" else None
        for _ in range(steps):
            batches = [recipe.random_batch(model_config, train_config, device)
                       for _ in range(train_config.grad_accum_steps)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            recipe.train_step(model, optimizer, batches, train_config, scaler=scaler)
            torch.cuda.synchronize()
            result.step_seconds.append(time.perf_counter() - start)
            del batches
    except Exception as error:  # noqa: BLE001 - OOM is a result, everything else is re-raised below
        if not is_oom(error):
            raise
        result.fits = False
        result.error = str(error).splitlines()[0][:300]
    finally:
        result.peak_allocated_bytes = torch.cuda.max_memory_allocated() - allocated_before
        result.peak_reserved_bytes = torch.cuda.max_memory_reserved() - reserved_before
        result.alloc_retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries_before
        del model, optimizer, scaler
        release_memory()
        result.library_workspace_bytes = torch.cuda.memory_allocated() - allocated_before
    return result
