"""Training over several GPUs (or with CPU offload) through accelerate: launcher config, launch
command, Trainer arguments, and a trial that measures what a step takes per GPU. Two strategies:
FSDP2 full sharding (also the engine of CPU offload) and DDP (a full replica per GPU).

    write_accelerate_config("fsdp.yaml", train_config, model_config=config)
    subprocess.run(launch_command("fsdp.yaml", ["run", "plan.json"]))   # accelerate launch ... -m memtune run plan.json

What accelerate 1.15.0 and transformers 5.17 / 5.24 really do (read from their sources):

- `accelerate launch` turns the YAML's `fsdp_config` into `FSDP_*` environment variables
  (accelerate/utils/launch.py:304-331: ACCELERATE_USE_FSDP=true, FSDP_VERSION, FSDP_OFFLOAD_PARAMS, ...)
  and starts the processes through torchrun (accelerate/commands/launch.py:1399, multi_gpu_launcher),
  even for one process. The launcher's default FSDP version is 1 (launch.py:513-519, and
  FullyShardedDataParallelPlugin reads FSDP_VERSION with default "1", utils/dataclasses.py:1830-1831),
  so the config must say `fsdp_version: 2`.
- transformers' Trainer builds `Accelerator(fsdp_plugin=None)` unless TrainingArguments(fsdp=...) is
  set (trainer.py:851-859 in 5.24); Accelerator then creates the plugin from the launcher's
  environment (accelerate/accelerator.py:388-392). So `accelerate launch` alone makes the Trainer
  shard; `fsdp_training_arguments` gives the equivalent TrainingArguments for runs without the
  launcher config (transformers defaults to FSDP2 there: training_args.py:2826 in 5.24, 2784 in 5.17).
  Either way Trainer needs a process group (trainer.py:477-478 "Using fsdp only works in distributed
  training"), which torchrun provides even for one process.
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
- One GPU: accelerate applies the FSDP plugin only for multi-device distributed types
  (state.py:986-1016); torchrun's LOCAL_RANK makes even a single CUDA process MULTI_GPU
  (state.py:769-791), so `accelerate launch` with num_processes 1 runs FSDP (offload included),
  while a plain `python` run (DistributedType.NO) or a CPU-only machine silently ignores it.
- CPU offload is CPUOffloadPolicy(pin_memory=True) (dataclasses.py:2178-2191): sharded parameters,
  their gradients, and therefore the optimizer state and step, live on the CPU.
- Gradient accumulation: Trainer enters `accelerator.no_sync` for every micro-batch but the last
  (trainer.py:1903-1915), which for FSDP2 is `set_requires_gradient_sync(False)`
  (accelerator.py:1166-1171): unsharded gradients accumulate on the GPU until the last micro-batch.

`apply_fsdp` and `fsdp_train_step` reproduce that preparation and step without an Accelerator, so the
fake-tensor trace (`sharding`) and the trial here run the same thing the launched Trainer runs.

DDP (strategy "ddp", accelerate 1.15 / transformers 5.17-5.24):
- The launcher config says `distributed_type: MULTI_GPU`; `accelerate launch` then starts
  num_processes workers through torchrun (commands/launch.py: `args.multi_gpu` from the config's
  distributed_type, 1229-1243; `multi_gpu_launcher`), with ACCELERATE_MIXED_PRECISION from
  `mixed_precision` and no FSDP variables (utils/launch.py `prepare_multi_gpu_env`).
- `Accelerator.prepare_model` (accelerator.py 1824-1835, 1883-1902) wraps the model's forward in
  autocast when mixed precision is on (`native_amp`), then wraps the model in
  `torch.nn.parallel.DistributedDataParallel(model, device_ids=[local rank], output_device=local rank,
  **ddp_handler.to_kwargs())`, where to_kwargs keeps only values that differ from
  DistributedDataParallelKwargs' defaults (utils/dataclasses.py 78-88; broadcast_buffers=True,
  bucket_cap_mb=25, find_unused_parameters=False, gradient_as_bucket_view=False, static_graph=False).
- Trainer fills that handler (`_build_accelerator_args`, trainer.py 749-766 in 5.24): only
  find_unused_parameters unless other ddp_* TrainingArguments are set, and it defaults to True for a
  model without gradient checkpointing. A causal LM uses every parameter in every step, so
  `ddp_training_arguments` sets ddp_find_unused_parameters=False: no autograd-graph search after each
  forward, and the bucket layout `replicate` models (one bucket per dtype until the first rebuild).
- Gradient accumulation: Trainer runs every micro-batch but the last under `accelerator.no_sync`,
  which for DDP is `model.no_sync()`: no all-reduce until the last micro-batch's backward.
`build_replicated_model` and `ddp_train_step` do the same without an Accelerator, for the trial.
"""

from __future__ import annotations

import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memtune.config import TrainConfig
from memtune.errors import NoGpuError, UsageError

FSDP_VERSION = 2
ACCELERATE_MIXED_PRECISION = {"none": "no", "bf16": "bf16", "fp16": "fp16"}
TRIAL_TIMEOUT_SECONDS = 300
"""How long a rank of a spawned multi-GPU trial waits in a collective before giving up (a rank that
ran out of memory leaves the others waiting)."""


def check_supported(train_config: TrainConfig) -> None:
    """Raise UsageError, naming every problem at once, for configurations FSDP or DDP through accelerate cannot run."""
    problems = []
    if train_config.replicated:
        if train_config.loss != "standard":
            problems.append(
                f"loss {train_config.loss!r} calls the backbone and the LM head directly, past DDP's wrapper, whose "
                "forward arms the gradient all-reduce: the GPUs would train apart; use loss 'standard' with DDP"
            )
        if problems:
            raise UsageError("; ".join(problems))
        return
    if train_config.offload == "optimizer":
        problems.append(
            "offload 'optimizer' (optimizer state only on the CPU) is DeepSpeed ZeRO-Offload, which memtune does not "
            "drive; FSDP's CPU offload moves parameters, gradients and optimizer state: use offload 'parameters'"
        )
    if train_config.loss != "standard":
        problems.append(
            f"loss {train_config.loss!r} runs the backbone and the LM head outside the root module, which FSDP2 refuses "
            "('FSDP requires a single root module'): use loss 'standard' when sharding or offloading"
        )
    if problems:
        raise UsageError("; ".join(problems))


# ---- what the launcher and the Trainer are told -------------------------------------------------


def wrap_class_names(model_config: Any) -> list[str]:
    """The decoder layer classes FSDP wraps: the model class's `_no_split_modules` (what accelerate's
    TRANSFORMER_BASED_WRAP falls back to, fsdp_utils.py:940-950), read without building the model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    return list(getattr(model_class, "_no_split_modules", None) or [])


def accelerate_config(train_config: TrainConfig, num_gpus: int | None = None, *, model_config: Any = None) -> dict[str, Any]:
    """The accelerate launcher config (what `accelerate config` writes): data parallel (MULTI_GPU) for
    strategy "ddp", else FSDP2 full sharding (CPU offload included).

    `num_gpus` defaults to `train_config.num_gpus`. With `model_config`, the decoder layer class is
    named explicitly; without it accelerate falls back to the model's `_no_split_modules`.
    """
    check_supported(train_config)
    num_processes = num_gpus or train_config.num_gpus
    common: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if train_config.replicated else "FSDP",
        "mixed_precision": ACCELERATE_MIXED_PRECISION[train_config.amp],
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": num_processes,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if train_config.replicated:
        if num_processes < 2:
            raise UsageError(f"DDP needs 2 or more processes, got num_gpus={num_processes}")
        return common
    fsdp: dict[str, Any] = {
        "fsdp_version": FSDP_VERSION,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,  # full sharding: parameters are gathered again in backward
        "fsdp_offload_params": train_config.offload == "parameters",
        "fsdp_state_dict_type": "FULL_STATE_DICT",  # a checkpoint that from_pretrained can load
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,  # memtune checkpoints through transformers (TrainConfig)
    }
    if model_config is not None and wrap_class_names(model_config):
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = ",".join(wrap_class_names(model_config))
    return {**common, "fsdp_config": fsdp}


def write_accelerate_config(
    path: str | Path, train_config: TrainConfig, num_gpus: int | None = None, *, model_config: Any = None
) -> Path:
    """Write `accelerate_config(...)` as YAML to `path` and return the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(accelerate_config(train_config, num_gpus, model_config=model_config), sort_keys=False))
    return path


def launch_command(config_path: str | Path, args: list[str], *, module: str = "memtune") -> list[str]:
    """`accelerate launch --config_file CONFIG -m memtune ARGS...`, through this interpreter so that the
    launcher and the workers use the same environment as the caller."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), "-m", module, *args]


def fsdp_training_arguments(train_config: TrainConfig, *, model_config: Any = None) -> dict[str, Any]:
    """TrainingArguments keyword arguments that make Trainer shard the same way without the launcher
    config (the process group must still come from torchrun / accelerate launch)."""
    check_supported(train_config)
    if train_config.replicated:
        raise UsageError("a DDP plan (strategy 'ddp') is not sharded: use ddp_training_arguments")
    fsdp_config: dict[str, Any] = {
        "version": FSDP_VERSION,
        "reshard_after_forward": True,
        "cpu_offload": train_config.offload == "parameters",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
    }
    if model_config is not None and wrap_class_names(model_config):
        fsdp_config["transformer_layer_cls_to_wrap"] = wrap_class_names(model_config)
    return {"fsdp": True, "fsdp_config": fsdp_config}


def ddp_training_arguments(train_config: TrainConfig) -> dict[str, Any]:
    """TrainingArguments keyword arguments for a DDP plan: every parameter of a causal LM gets a gradient
    in every step, so DDP need not search the autograd graph for unused ones after each forward
    (Trainer's default without gradient checkpointing), and its buckets are laid out as `replicate` models."""
    check_supported(train_config)
    if not train_config.replicated:
        raise UsageError(f"DDP arguments are for strategy 'ddp' over several GPUs, got {train_config.describe()}")
    return {"ddp_find_unused_parameters": False}


DDP_KWARGS: dict[str, Any] = {"find_unused_parameters": False}
"""What DistributedDataParallel gets from Trainer + accelerate with `ddp_training_arguments`: all of
torch's defaults (accelerate drops values equal to its defaults; find_unused_parameters=False is one)."""


# ---- the replicated model and step (DDP) ----------------------------------------------------------


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
    peaks either way: the extra copy was DDP's old buckets, see replicate.rebuild_events.)
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from memtune import recipe

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

    from memtune import recipe

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


# ---- the sharded model and step (what the launched Trainer runs) ---------------------------------


def mixed_precision_policy(train_config: TrainConfig) -> Any:
    """accelerate's FSDP2 policy for the config's amp (dataclasses.py:2131-2142): compute, reduce and
    output in the amp dtype; without amp FSDP computes in the storage dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if train_config.amp == "none":
        return MixedPrecisionPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[train_config.amp]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)


def _final_norm(model: Any) -> Any:
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
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

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
    tail = [_final_norm(model), *([input_embed] if tied else []), output_embed]
    tail = [module for module in tail if module is not None and not isinstance(module, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    if not isinstance(model, FSDPModule):
        fully_shard(model, **{key: value for key, value in kwargs.items() if key != "reshard_after_forward"})
    return model


def fsdp_train_step(
    model: Any, optimizer: Any, batches: list[Any], train_config: TrainConfig, scaler: Any = None, read_loss: bool = True
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
    from memtune.recipe import optimizer_step

    optimizer_step(optimizer, scaler)
    return total


def build_sharded_model(model_config: Any, train_config: TrainConfig, device: str, mesh: Any) -> Any:
    """Random-weight model sharded on `device`, built as the Trainer's is: on the CPU first (here without
    initialising, fast), then sharded so that only shards reach the GPU; shards then get N(0, 0.02)."""
    import torch

    from memtune import recipe

    model = recipe.build_model(model_config, train_config, "cpu", initialise=False)
    apply_fsdp(model, train_config, mesh=mesh, pin_memory=device != "cpu")
    fill_random(model)
    return model


# ---- the trial -----------------------------------------------------------------------------------


def measure_sharded(
    model_config: Any, train_config: TrainConfig, steps: int = 3, device: str | None = None,
    accumulation_limit: int | None = 2,
) -> Any:
    """Run `steps` optimizer steps over `num_gpus` GPUs - FSDP2-sharded, or replicated with DDP for
    strategy "ddp" - and measure per-GPU peak memory (the largest over ranks).

    With `accumulation_limit`, a step accumulates at most that many micro-batches (as `verify.measure`):
    the first holds its unsharded gradients (no_sync), the last reduces them, so two reach the peak of
    any accumulation; tokens_per_step then describes the shortened step.

    - Inside a process group of `num_gpus` ranks (torchrun, accelerate launch): every rank must call
      this; it runs collectively.
    - `num_gpus == 1` without a process group: one is created for the trial (nccl on CUDA, gloo on
      CPU) and destroyed afterwards.
    - `num_gpus > 1` without a process group: one process per GPU is spawned.
    On CPU the steps run (gloo) but there are no memory statistics: peaks are 0.
    Returns a `verify.Measurement`; out-of-memory is `fits=False`, other errors propagate.
    """
    import torch
    import torch.distributed as dist

    check_supported(train_config)
    if accumulation_limit is not None and train_config.grad_accum_steps > accumulation_limit:
        train_config = train_config.replace(grad_accum_steps=accumulation_limit)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoGpuError("trial steps need a CUDA GPU and none is visible; use `memtune plan` to predict without one")
    world_size = train_config.num_gpus
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise UsageError(f"the process group has {dist.get_world_size()} ranks but the configuration asks for "
                             f"{world_size} GPUs: launch with --nproc-per-node {world_size}")
        return _trial(model_config, train_config, steps, device)
    if world_size == 1:
        _init_process_group(device, f"file://{tempfile.mkdtemp(prefix='memtune-pg-')}/store", 0, 1)
        try:
            return _trial(model_config, train_config, steps, device)
        finally:
            dist.destroy_process_group()
    if device.startswith("cuda") and torch.cuda.device_count() < world_size:
        raise NoGpuError(f"a {world_size}-GPU trial needs {world_size} GPUs, {torch.cuda.device_count()} are visible")
    return _spawn_trial(model_config, train_config, steps, device)


def _init_process_group(device: str, init_method: str, rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo", init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=TRIAL_TIMEOUT_SECONDS),
    )


def _trial(model_config: Any, train_config: TrainConfig, steps: int, device: str) -> Any:
    """The collective trial on this rank (DDP or FSDP, as the configuration says); returns this rank's
    Measurement (max over ranks when N > 1)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from memtune import recipe, verify

    cuda = device.startswith("cuda")
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        device = f"cuda:{torch.cuda.current_device()}"
        verify.warm_up()
        verify.release_memory()
        allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    result = verify.Measurement(fits=True, tokens_per_step=train_config.effective_batch_size * train_config.seq_len)
    model = optimizer = scaler = None
    try:
        if train_config.replicated:
            # DDP: measured from before the model is built, as the estimate starts from an empty device
            # (the weights, the construction broadcast and the buckets are in its events).
            model = build_replicated_model(model_config, train_config, device)
            optimizer = recipe.make_optimizer(model)

            def step(*args: Any, **kwargs: Any) -> float:
                return ddp_train_step(*args, device_type=device_type, **kwargs)
        else:
            mesh = init_device_mesh(device_type, (dist.get_world_size(),))
            model = build_sharded_model(model_config, train_config, device, mesh)
            optimizer = recipe.make_optimizer(model, fused=True)
            step = fsdp_train_step
            if cuda:
                # Sharding moved each unit to the GPU whole before cutting it: drop that from the cache and
                # the peak, so the trial measures the steps (the estimate starts from the shards too).
                verify.release_memory()
        scaler = torch.amp.GradScaler(device_type) if train_config.amp == "fp16" else None
        for _ in range(steps):
            batches = [recipe.random_batch(model_config, train_config, device) for _ in range(train_config.grad_accum_steps)]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, optimizer, batches, train_config, scaler=scaler)
            if cuda:
                torch.cuda.synchronize()
            result.step_seconds.append(time.perf_counter() - start)
            del batches
    except Exception as error:  # noqa: BLE001 - OOM is a result, everything else is re-raised
        if not verify.is_oom(error):
            raise
        result.fits = False
        result.error = str(error).splitlines()[0][:300]
    finally:
        if cuda:
            result.peak_allocated_bytes = torch.cuda.max_memory_allocated() - allocated_before
            result.peak_reserved_bytes = torch.cuda.max_memory_reserved() - reserved_before
            result.alloc_retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries_before
        del model, optimizer, scaler
        gc.collect()
        verify.release_memory()
        if cuda:
            result.library_workspace_bytes = torch.cuda.memory_allocated() - allocated_before
    if dist.get_world_size() > 1:
        result = _max_over_ranks(result, device)
    return result


def _max_over_ranks(result: Any, device: str) -> Any:
    """Largest peaks over the ranks, all-rank `fits`, slowest step times: what decides the plan."""
    import torch
    import torch.distributed as dist

    values = torch.tensor([result.peak_allocated_bytes, result.peak_reserved_bytes, result.alloc_retries,
                           int(not result.fits)], dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    seconds = torch.tensor(result.step_seconds or [0.0], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    result.peak_allocated_bytes, result.peak_reserved_bytes, result.alloc_retries = (int(v) for v in values[:3].tolist())
    result.fits = not bool(values[3].item())
    result.step_seconds = seconds.tolist() if result.step_seconds else []
    return result


def _spawn_worker(rank: int, world_size: int, init_method: str, payload: dict[str, Any], out_dir: str) -> None:
    from memtune.config import TrainConfig as Config
    from memtune.sources import config_from_dict

    _init_process_group(payload["device"], init_method, rank, world_size)
    try:
        measured = _trial(config_from_dict(payload["model_config"]), Config.from_dict(payload["train_config"]),
                          payload["steps"], payload["device"])
        if rank == 0:
            Path(out_dir, "measurement.json").write_text(json.dumps(measured.to_dict()))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _spawn_trial(model_config: Any, train_config: TrainConfig, steps: int, device: str) -> Any:
    import torch.multiprocessing as mp

    from memtune import verify

    world_size = train_config.num_gpus
    with tempfile.TemporaryDirectory(prefix="memtune-trial-") as out_dir:
        payload = {"model_config": {"model_type": model_config.model_type, **model_config.to_diff_dict()},
                   "train_config": train_config.to_dict(), "steps": steps, "device": device}
        try:
            mp.start_processes(_spawn_worker, args=(world_size, f"file://{out_dir}/store", payload, out_dir),
                               nprocs=world_size, start_method="spawn", join=True)
        except mp.ProcessRaisedException as error:
            if any(marker in str(error) for marker in verify.OOM_MARKERS):
                return verify.Measurement(fits=False, error=str(error).strip().splitlines()[-1][:300])
            raise
        data = json.loads(Path(out_dir, "measurement.json").read_text())
    data.pop("tokens_per_second", None)
    return verify.Measurement(**data)
