"""FSDP2 and DDP as accelerate prepares them, and their training steps, without an Accelerator: the
fake-tensor trace (`predict.fsdp`, `predict.ddp`), the trials (`measure.sharded`) and the launched Trainer
(`run.launch` configs) all run the same thing. What accelerate 1.15 and transformers 5.17 / 5.24 do
(read from their sources):

- FSDP2 preparation (accelerate/utils/fsdp_utils.py:751-885, `fsdp2_prepare_model`): with mixed
  precision on, trainable parameters are upcast to fp32 (815-820); each module whose class is in the
  model's `_no_split_modules` (the decoder layer) becomes its own `fully_shard` unit with
  reshard_after_forward=True; an untied input embedding gets its own unit; the final norm and the
  LM head (plus the embedding when tied) form one unit with reshard_after_forward=False (857-879),
  so the (tied) embedding stays gathered from its first use until its backward; the root is sharded
  last with torch's default for the root (no reshard after forward, 881-885).
- Mixed precision "bf16" becomes MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16,
  output_dtype=bf16) (utils/dataclasses.py:2131-2142, set from state.py:1014-1015). In the FSDP2 path
  accelerate does not wrap the forward in autocast (`_prepare_fsdp2`, accelerator.py:1674-1760, never
  calls `prepare_model`), and Trainer relies on accelerate for autocast, so the step computes with
  bf16 parameters and no autocast.
- CPU offload is CPUOffloadPolicy(pin_memory=True) (dataclasses.py:2178-2191): sharded parameters,
  their gradients, and therefore the optimizer state and step, live on the CPU.
- Gradient accumulation: Trainer enters `accelerator.no_sync` for every micro-batch but the last
  (trainer.py:1903-1915), which for FSDP2 is `set_requires_gradient_sync(False)`
  (accelerator.py:1166-1171): unsharded gradients accumulate on the GPU until the last micro-batch.

`apply_fsdp` and `fsdp_train_step` reproduce that preparation and step without an Accelerator, so the
fake-tensor trace (`predict.fsdp`) and the trial (`measure.sharded`) run the same thing the launched Trainer runs.

DDP (strategy "ddp"):
- `Accelerator.prepare_model` (accelerator.py 1824-1835, 1883-1902) wraps the model's forward in
  autocast when mixed precision is on (`native_amp`), then wraps the model in
  `torch.nn.parallel.DistributedDataParallel(model, device_ids=[local rank], output_device=local rank,
  **ddp_handler.to_kwargs())`, where to_kwargs keeps only values that differ from
  DistributedDataParallelKwargs' defaults (utils/dataclasses.py 78-88; broadcast_buffers=True,
  bucket_cap_mb=25, find_unused_parameters=False, gradient_as_bucket_view=False, static_graph=False).
- Gradient accumulation: Trainer runs every micro-batch but the last under `accelerator.no_sync`,
  which for DDP is `model.no_sync()`: no all-reduce until the last micro-batch's backward.
`build_replicated_model` and `ddp_train_step` do the same without an Accelerator, for the trial.
"""

from __future__ import annotations

from typing import Any

from memtune.config import TrainConfig
from memtune.errors import UsageError

DDP_KWARGS: dict[str, Any] = {"find_unused_parameters": False}
"""What DistributedDataParallel gets from Trainer + accelerate with `ddp_training_arguments`: all of
torch's defaults (accelerate drops values equal to its defaults; find_unused_parameters=False is one)."""


def check_supported(train_config: TrainConfig) -> None:
    """Raise UsageError, naming every problem at once, for configurations FSDP or DDP through accelerate cannot run.
    Every loss runs: the chunked and Liger ones are inside the model's forward (`recipe.loss.use_chunked_loss`),
    which DDP's wrapper and FSDP2's root module call."""
    problems = []
    if train_config.replicated:
        return  # the fused losses are in the model's forward (recipe.loss.use_chunked_loss): DDP's forward calls it
    if train_config.offload == "optimizer":
        problems.append(
            "offload 'optimizer' (optimizer state only on the CPU) is DeepSpeed ZeRO-Offload, which memtune does not "
            "drive; FSDP's CPU offload moves parameters, gradients and optimizer state: use offload 'parameters'"
        )
    if problems:
        raise UsageError("; ".join(problems))


def fill_random(model: Any) -> Any:
    """Give an uninitialised model (its shards, under FSDP) N(0, 0.02) weights, where they are; returns it."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            (param.to_local() if hasattr(param, "to_local") else param).normal_(0.0, 0.02)
    return model


def build_replicated_model(model_config: Any, train_config: TrainConfig, device: str) -> Any:
    """Random-weight model on `device`, wrapped in DistributedDataParallel as accelerate wraps it (the
    model is on the device first; construction broadcasts rank 0's weights and allocates the buckets).

    Built on the CPU and moved, as `memtune run` and Trainer do, so that the weights reach the GPU the
    same way. (Building on the GPU was suspected of an extra weight copy; the H200 runs showed the same
    peaks either way: the extra copy was DDP's old buckets, see predict.ddp.rebuild_events.)
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from memtune.recipe import step as recipe

    check_supported(train_config)
    model = fill_random(recipe.build_model(model_config, train_config, "cpu", initialise=False).to(device))
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return DistributedDataParallel(model, device_ids=[index], output_device=index, **DDP_KWARGS)
    return DistributedDataParallel(model, **DDP_KWARGS)


def ddp_train_step(
    model: Any, optimizer: Any, batches: list[Any], train_config: TrainConfig, scaler: Any = None,
    read_loss: bool = True, device_type: str = "cuda",
) -> float:
    """One optimizer step as Trainer runs it under DDP: the forward under autocast (accelerate wraps the
    model's forward in it), every micro-batch but the last under `no_sync` (gradients all-reduced once,
    in the last backward), then step and zero_grad(set_to_none=True)."""
    import contextlib

    from memtune.recipe import step as recipe

    check_supported(train_config)
    total = 0.0
    for index, input_ids in enumerate(batches):
        synced = index == len(batches) - 1
        with contextlib.nullcontext() if synced else model.no_sync():
            with recipe.amp_context(train_config, device_type):
                loss = model(input_ids=input_ids, labels=input_ids).loss / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if read_loss:
            total += float(loss.detach())
        del loss
    recipe.optimizer_step(optimizer, scaler)
    return total


def mixed_precision_policy(train_config: TrainConfig) -> Any:
    """accelerate's FSDP2 policy for the config's amp (dataclasses.py:2131-2142): compute, reduce and
    output in the amp dtype; without amp FSDP computes in the storage dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if train_config.amp == "none":
        return MixedPrecisionPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[train_config.amp]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)


def final_norm(model: Any) -> Any:
    """The last *Norm child of the base model, as accelerate's `_find_final_norm` (fsdp_utils.py:733-748)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    found = None
    if base is not None:
        for _, module in base.named_children():
            if "Norm" in type(module).__name__:
                found = module
    return found


def apply_fsdp(model: Any, train_config: TrainConfig, *, mesh: Any = None, pin_memory: bool = True) -> Any:
    """Shard `model` in place with FSDP2 the way accelerate's `fsdp2_prepare_model` does; returns it."""
    import torch
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        OffloadPolicy,
        fully_shard,
    )

    check_supported(train_config)
    offload = CPUOffloadPolicy(pin_memory=pin_memory) if train_config.offload == "parameters" else OffloadPolicy()
    kwargs: dict[str, Any] = {"reshard_after_forward": True, "mp_policy": mixed_precision_policy(train_config),
                              "offload_policy": offload}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if train_config.amp != "none":  # fsdp_utils.py:815-820: fp32 master weights under mixed precision
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in reversed(list(model.modules())[1:]):
        if type(module).__name__ in names and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    input_embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = input_embed is not None and output_embed is not None and input_embed.weight is output_embed.weight
    if input_embed is not None and not tied and not isinstance(input_embed, FSDPModule):
        fully_shard(input_embed, **kwargs)
    tail = [final_norm(model), *([input_embed] if tied else []), output_embed]
    tail = [module for module in tail if module is not None and not isinstance(module, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    if not isinstance(model, FSDPModule):
        fully_shard(model, **{key: value for key, value in kwargs.items() if key != "reshard_after_forward"})
    return model


def fsdp_train_step(
    model: Any, optimizer: Any, batches: list[Any], train_config: TrainConfig, scaler: Any = None,
    read_loss: bool = True,
) -> float:
    """One optimizer step as the Trainer runs it under FSDP2: no autocast (FSDP's policy casts), gradient
    sync only on the last micro-batch, then step and zero_grad(set_to_none=True)."""
    check_supported(train_config)
    total = 0.0
    for index, input_ids in enumerate(batches):
        model.set_requires_gradient_sync(index == len(batches) - 1)
        loss = model(input_ids=input_ids, labels=input_ids).loss / len(batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if read_loss:
            total += float(loss.detach())
        del loss
    from memtune.recipe.step import optimizer_step

    optimizer_step(optimizer, scaler)
    return total


def build_sharded_model(model_config: Any, train_config: TrainConfig, device: str, mesh: Any) -> Any:
    """Random-weight model sharded on `device`, built as the Trainer's is: on the CPU first (here without
    initialising, fast), then sharded so that only shards reach the GPU; shards then get N(0, 0.02)."""

    from memtune.recipe import step as recipe

    model = recipe.build_model(model_config, train_config, "cpu", initialise=False)
    apply_fsdp(model, train_config, mesh=mesh, pin_memory=device != "cpu")
    fill_random(model)
    return model
