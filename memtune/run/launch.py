"""Launching a plan over several GPUs (or with CPU offload) through accelerate: the launcher config,
the launch command and the Trainer arguments. Three strategies:
FSDP2 full sharding (also the engine of CPU offload), DDP (a full replica per GPU) and DeepSpeed ZeRO.

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
- One GPU: accelerate applies the FSDP plugin only for multi-device distributed types
  (state.py:986-1016); torchrun's LOCAL_RANK makes even a single CUDA process MULTI_GPU
  (state.py:769-791), so `accelerate launch` with num_processes 1 runs FSDP (offload included),
  while a plain `python` run (DistributedType.NO) or a CPU-only machine silently ignores it.

How the model is wrapped and stepped (FSDP2 units, mixed precision, CPU offload, DDP) is in
`recipe.parallel`, which the trace, the trials and this launch all follow.

DDP (strategy "ddp", accelerate 1.15 / transformers 5.17-5.24):
- The launcher config says `distributed_type: MULTI_GPU`; `accelerate launch` then starts
  num_processes workers through torchrun (commands/launch.py: `args.multi_gpu` from the config's
  distributed_type, 1229-1243; `multi_gpu_launcher`), with ACCELERATE_MIXED_PRECISION from
  `mixed_precision` and no FSDP variables (utils/launch.py `prepare_multi_gpu_env`).
- Trainer fills accelerate's DDP handler (DistributedDataParallelKwargs; `_build_accelerator_args`,
  trainer.py 749-766 in 5.24): only find_unused_parameters unless other ddp_* TrainingArguments are
  set, and it defaults to True for a model without gradient checkpointing. A causal LM uses every
  parameter in every step, so `ddp_training_arguments` sets ddp_find_unused_parameters=False: no
  autograd-graph search after each forward, and the bucket layout `predict.ddp` models (one bucket
  per dtype until the first rebuild).

DeepSpeed (strategy "deepspeed", DeepSpeed 0.19.8 / accelerate 1.15 / transformers 5.24; docs/deepspeed-zero.md):
- The launcher config says `distributed_type: DEEPSPEED` with `deepspeed_config.deepspeed_config_file` (the JSON of
  `deepspeed_config`) and `zero3_init_flag` (ZeRO-3: from_pretrained partitions while loading, zero.Init). With a
  config file, accelerate refuses the yaml keys the JSON owns (gradient_accumulation_steps, gradient_clipping,
  zero_stage, offload_*_device, nvme_path, zero3_save_16bit_model, mixed_precision:
  `DeepSpeedPlugin._deepspeed_config_checks`, accelerate utils/dataclasses.py:1507-1532), so it sets none of them.
- TrainingArguments(deepspeed=<the same JSON>) makes Trainer run it (training_args.py:1705-1715) and fills the
  "auto" batch, accumulation and clipping values from its own fields (integrations/deepspeed.py:136-192): one
  source for both. Every ZeRO knob is written as a number (`Zero.resolved`) when the model config is known.
- The optimizer: without offload, no "optimizer" block, so Trainer builds the plan's AdamW (fused or foreach) and
  ZeRO wraps it (torch's AdamW is in ZERO_SUPPORTED_OPTIMIZERS, runtime/zero/utils.py:45-48). With offload the
  block is required: DeepSpeed refuses a client optimizer under offload (engine.py:2342-2347,
  zero_force_ds_cpu_optimizer) and builds DeepSpeedCPUAdam from {"type": "AdamW"} (engine.py:2384-2397; a g++ JIT
  build of ~40 s the first time on a machine).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from memtune.config import TrainConfig, require_deepspeed
from memtune.errors import UsageError
from memtune.recipe.parallel import check_supported
from memtune.search.ladder import STRATEGY

FSDP_VERSION = 2
ACCELERATE_MIXED_PRECISION = {"none": "no", "bf16": "bf16", "fp16": "fp16"}


# ---- what the launcher and the Trainer are told -------------------------------------------------


def wrap_class_names(model_config: Any) -> list[str]:
    """The decoder layer classes FSDP wraps: the model class's `_no_split_modules` (what accelerate's
    TRANSFORMER_BASED_WRAP falls back to, fsdp_utils.py:940-950), read without building the model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    return list(getattr(model_class, "_no_split_modules", None) or [])


def _one_machine(distributed_type: str, num_processes: int) -> dict[str, Any]:
    """The launcher keys every strategy shares: `num_processes` processes on this machine's GPUs."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": num_processes,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "main_training_function": "main",
    }


def accelerate_config(
    train_config: TrainConfig, num_gpus: int | None = None, *, model_config: Any = None
) -> dict[str, Any]:
    """The accelerate launcher config (what `accelerate config` writes): data parallel (MULTI_GPU) for
    strategy "ddp", else FSDP2 full sharding (CPU offload included).

    `num_gpus` defaults to `train_config.num_gpus`. With `model_config`, the decoder layer class is
    named explicitly; without it accelerate falls back to the model's `_no_split_modules`.
    """
    if train_config.deepspeed:
        raise UsageError("a DeepSpeed plan's launcher config names its JSON: use deepspeed_accelerate_config")
    check_supported(train_config)
    num_processes = num_gpus or train_config.num_gpus
    common: dict[str, Any] = {
        **_one_machine("MULTI_GPU" if train_config.replicated else "FSDP", num_processes),
        "mixed_precision": ACCELERATE_MIXED_PRECISION[train_config.amp],
        "downcast_bf16": "no",
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
    """Write `accelerate_config(...)` as YAML to `path` and return the path. A DeepSpeed plan also gets its JSON,
    DEEPSPEED_CONFIG_FILE beside the YAML (`write_deepspeed_config`), which the YAML names."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if train_config.deepspeed:
        json_path = write_deepspeed_config(path.parent / DEEPSPEED_CONFIG_FILE, train_config, model_config=model_config)
        config = deepspeed_accelerate_config(train_config, json_path, num_gpus)
    else:
        config = accelerate_config(train_config, num_gpus, model_config=model_config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- DeepSpeed ------------------------------------------------------------------------------------


DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
"""The DeepSpeed JSON's name, beside the accelerate YAML that `write_accelerate_config` writes for it."""
HIDDEN_SIZE_KNOBS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
"""The knobs whose "auto" transformers fills from the model's hidden size (integrations/deepspeed.py:202-242)."""


def hidden_size_of(model_config: Any) -> int | None:
    """The hidden size transformers' "auto" reads (integrations/deepspeed.py:211-222): `hidden_size`, else the
    largest of `hidden_sizes`, else the same in `text_config`; None when there is none."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if config is None:
            continue
        if isinstance(getattr(config, "hidden_size", None), int):
            return int(config.hidden_size)
        if getattr(config, "hidden_sizes", None):
            return int(max(config.hidden_sizes))
    return None


def deepspeed_config(train_config: TrainConfig, *, model_config: Any = None) -> dict[str, Any]:
    """The DeepSpeed JSON (as a dict) that runs `train_config` (strategy "deepspeed") under Trainer.

    zero_optimization: the stage, overlap_comm, contiguous_gradients and the size knobs, in elements, as
    `Zero.resolved` gives them for the model's hidden size (with `model_config`); without it the knobs left None
    and filled from the hidden size are written "auto", which Trainer resolves to the same numbers from the
    loaded model (integrations/deepspeed.py:232-242), and the others get DeepSpeed's defaults as numbers.
    ZeRO-1/2 get allgather_bucket_size, ZeRO-3 its stage3_* knobs, sub_group_size and
    stage3_gather_16bit_weights_on_model_save (Trainer then saves a loadable checkpoint). offload "optimizer"
    gives offload_optimizer, "parameters" offload_param too, on `zero.offload_device` with pinned host
    buffers (and nvme_path for NVMe). bf16 / fp16 follow the plan's autocast dtype, as the TrainingArguments
    `Plan.training_arguments` writes (Trainer raises on a mismatch); batch, accumulation and clipping are "auto"
    (Trainer fills them). The optimizer block is written with offload only (module docstring).

    Raises UsageError for a plan whose strategy is not "deepspeed"."""
    zero = train_config.zero
    if not train_config.deepspeed or zero is None:
        raise UsageError(f"a DeepSpeed config is for strategy 'deepspeed', got {train_config.describe()}")
    hidden_size = hidden_size_of(model_config) if model_config is not None else None
    if hidden_size is not None:
        sizes: dict[str, Any] = dict(zero.resolved(hidden_size))
    else:  # "auto" where transformers resolves it from the model, DeepSpeed's defaults (as numbers) elsewhere
        sizes = dict(zero.resolved(1))  # the hidden-size knobs among these are replaced just below
        sizes.update({name: getattr(zero, name) if getattr(zero, name) is not None else "auto"
                      for name in HIDDEN_SIZE_KNOBS})
    optimization: dict[str, Any] = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": sizes["reduce_bucket_size"],
    }
    if zero.stage == 3:
        for name in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                     "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size"):
            optimization[name] = sizes[name]
        optimization["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        optimization["allgather_bucket_size"] = sizes["allgather_bucket_size"]
    if train_config.offload != "none":
        place: dict[str, Any] = {"device": zero.offload_device, "pin_memory": True}
        if zero.offload_device == "nvme":
            place["nvme_path"] = zero.nvme_path
        optimization["offload_optimizer"] = dict(place)
        if train_config.offload == "parameters":
            optimization["offload_param"] = dict(place)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": train_config.amp == "bf16"},
        "fp16": {"enabled": train_config.amp == "fp16"},
        "zero_optimization": optimization,
    }
    if train_config.offload != "none":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def write_deepspeed_config(path: str | Path, train_config: TrainConfig, *, model_config: Any = None) -> Path:
    """Write `deepspeed_config(...)` as JSON to `path` and return the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deepspeed_config(train_config, model_config=model_config), indent=2) + "\n")
    return path


def deepspeed_accelerate_config(train_config: TrainConfig, deepspeed_config_file: str | Path,
                                num_gpus: int | None = None) -> dict[str, Any]:
    """The accelerate launcher config of a DeepSpeed plan: distributed_type DEEPSPEED, the JSON at
    `deepspeed_config_file` (written absolute, so the launch may start elsewhere), zero3_init_flag for ZeRO-3,
    `num_gpus` (default `train_config.num_gpus`) processes; none of the keys the JSON owns (module docstring).
    Raises UsageError for a plan whose strategy is not "deepspeed"."""
    if not train_config.deepspeed or train_config.zero is None:
        raise UsageError(f"a DeepSpeed launcher config is for strategy 'deepspeed', got {train_config.describe()}")
    return {
        **_one_machine("DEEPSPEED", num_gpus or train_config.num_gpus),
        "deepspeed_config": {
            "deepspeed_config_file": str(Path(deepspeed_config_file).resolve()),
            "zero3_init_flag": train_config.zero.stage == 3,
        },
    }


def deepspeed_training_arguments(train_config: TrainConfig, *, model_config: Any = None) -> dict[str, Any]:
    """TrainingArguments keyword arguments that make Trainer run the plan with DeepSpeed: `deepspeed`, the dict of
    `deepspeed_config`. Raises UsageError with the install command when DeepSpeed is missing (TrainingArguments
    would fail on its import otherwise) and for a plan whose strategy is not "deepspeed"."""
    require_deepspeed(train_config)
    return {"deepspeed": deepspeed_config(train_config, model_config=model_config)}


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
    (Trainer's default without gradient checkpointing), and its buckets are laid out as `predict.ddp` models."""
    check_supported(train_config)
    if not train_config.replicated:
        raise UsageError(f"DDP arguments are for strategy 'ddp' over several GPUs, got {train_config.describe()}")
    return STRATEGY.trainer_arguments(train_config)
