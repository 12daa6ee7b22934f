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

Several machines (`TrainConfig.num_nodes`, `memtune plan --nodes M --gpus N --out DIR`, `write_launch_files`): the
engines distribute, memtune writes their configs. accelerate's `num_processes` counts every machine's processes and
its launcher starts num_processes // num_machines on each, through torchrun with --nnodes, --node-rank (the
config's machine_rank) and --master-addr/--master-port (main_process_ip/port; utils/launch.py:210-224), or for
DeepSpeed with deepspeed_multinode_launcher "standard" the same way (commands/launch.py:1060-1082). One config per
machine differs only in machine_rank; main_process_ip is a placeholder to fill in (`MAIN_PROCESS_IP`), or given on
`accelerate launch`'s command line (--machine_rank, --main_process_ip override the file), as the SLURM script does.

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

import shlex
import sys
from dataclasses import dataclass
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


MAIN_PROCESS_IP = "FILL_IN_IP_OF_MACHINE_0"
"""The placeholder written for `main_process_ip` over several machines: the address of machine_rank 0 that every
machine reaches (accelerate passes it to torchrun as --master-addr, utils/launch.py:213-224)."""
MAIN_PROCESS_PORT = 29500
"""`main_process_port` over several machines: torchrun's default port; any free port, the same on every machine."""


def _machines(distributed_type: str, num_processes: int, num_machines: int = 1,
              machine_rank: int = 0) -> dict[str, Any]:
    """The launcher keys every strategy shares: `num_processes` processes in all (accelerate's num_processes counts
    every machine's: it starts num_processes // num_machines on each, accelerate 1.15 utils/launch.py:113, 217), on
    `num_machines` machines, this file being machine `machine_rank`'s. Over several machines the rendezvous is
    accelerate's static one at main_process_ip:main_process_port (written as placeholders to fill in)."""
    keys: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "num_processes": num_processes,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "main_training_function": "main",
    }
    if num_machines > 1:
        keys.update(main_process_ip=MAIN_PROCESS_IP, main_process_port=MAIN_PROCESS_PORT)
    return keys


def accelerate_config(
    train_config: TrainConfig, num_gpus: int | None = None, *, model_config: Any = None, machine_rank: int = 0
) -> dict[str, Any]:
    """The accelerate launcher config (what `accelerate config` writes): data parallel (MULTI_GPU) for
    strategy "ddp", else FSDP2 full sharding (CPU offload included).

    `num_gpus` (GPUs per machine) defaults to `train_config.num_gpus`; a plan over `train_config.num_nodes` machines
    gets the file of machine `machine_rank` (`_machines`). With `model_config`, the decoder layer class is
    named explicitly; without it accelerate falls back to the model's `_no_split_modules`.
    """
    if train_config.deepspeed:
        raise UsageError("a DeepSpeed plan's launcher config names its JSON: use deepspeed_accelerate_config")
    check_supported(train_config)
    num_processes = (num_gpus or train_config.num_gpus) * train_config.num_nodes
    common: dict[str, Any] = {
        **_machines("MULTI_GPU" if train_config.replicated else "FSDP", num_processes, train_config.num_nodes,
                    machine_rank),
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
    path: str | Path, train_config: TrainConfig, num_gpus: int | None = None, *, model_config: Any = None,
    machine_rank: int = 0,
) -> Path:
    """Write `accelerate_config(...)` (machine `machine_rank`'s, over several machines) as YAML to `path` and return
    the path. A DeepSpeed plan also gets its JSON, DEEPSPEED_CONFIG_FILE beside the YAML (`write_deepspeed_config`),
    which the YAML names."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if train_config.deepspeed:
        json_path = write_deepspeed_config(path.parent / DEEPSPEED_CONFIG_FILE, train_config, model_config=model_config)
        config = deepspeed_accelerate_config(train_config, json_path, num_gpus, machine_rank=machine_rank)
    else:
        config = accelerate_config(train_config, num_gpus, model_config=model_config, machine_rank=machine_rank)
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
    buffers (and nvme_path for NVMe; parameters on NVMe get a swap buffer_size that holds their largest partition,
    `zero_layout.nvme_param_buffer_elements`, when `model_config` is given). bf16 / fp16 follow the plan's
    autocast dtype, as the TrainingArguments `Plan.training_arguments` writes (Trainer raises on a mismatch);
    batch, accumulation and clipping are "auto" (Trainer fills them). The optimizer block is written with offload
    only (module docstring).

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
            if zero.offload_device == "nvme" and model_config is not None:  # each partition fits one swap buffer
                from memtune.predict import zero as zero_predict
                from memtune.predict.zero_layout import nvme_param_buffer_elements

                layout = zero_predict.cached_layout(model_config, train_config)
                optimization["offload_param"]["buffer_size"] = nvme_param_buffer_elements(layout)
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
                                num_gpus: int | None = None, *, machine_rank: int = 0) -> dict[str, Any]:
    """The accelerate launcher config of a DeepSpeed plan: distributed_type DEEPSPEED, the JSON at
    `deepspeed_config_file` (written absolute, so the launch may start elsewhere), zero3_init_flag for ZeRO-3,
    `num_gpus` (default `train_config.num_gpus`) processes per machine; none of the keys the JSON owns (module
    docstring). Over several machines, machine `machine_rank`'s file, with deepspeed_multinode_launcher "standard":
    accelerate then starts each machine's processes through torchrun, as for FSDP and DDP (commands/launch.py:1060-1082
    `deepspeed_launcher`, utils/launch.py:488-493), instead of DeepSpeed's pdsh launcher, which needs a hostfile and
    ssh between the machines. Raises UsageError for a plan whose strategy is not "deepspeed"."""
    if not train_config.deepspeed or train_config.zero is None:
        raise UsageError(f"a DeepSpeed launcher config is for strategy 'deepspeed', got {train_config.describe()}")
    deepspeed: dict[str, Any] = {
        "deepspeed_config_file": str(Path(deepspeed_config_file).resolve()),
        "zero3_init_flag": train_config.zero.stage == 3,
    }
    if train_config.num_nodes > 1:
        deepspeed["deepspeed_multinode_launcher"] = "standard"
    return {
        **_machines("DEEPSPEED", (num_gpus or train_config.num_gpus) * train_config.num_nodes, train_config.num_nodes,
                    machine_rank),
        "deepspeed_config": deepspeed,
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


# ---- several machines: the files a user runs on each -----------------------------------------------


LAUNCH_ENVIRONMENT_PREFIXES = ("ACCELERATE_", "FSDP_")
"""The environment `accelerate launch` gives its processes for a config (the strategy's settings), which a plain
torchrun launch must set itself; MASTER_ADDR/PORT and the ranks come from torchrun's own options."""


@dataclass(frozen=True)
class LaunchFiles:
    """What `write_launch_files` wrote into `directory`, and what the user must fill in and run."""

    directory: Path
    accelerate_configs: tuple[Path, ...]
    """One accelerate config per machine: machine_rank 0, 1, ... in file order."""
    torchrun_script: Path
    """Sets accelerate's environment for the config and runs torchrun; reads NODE_RANK and MASTER_ADDR."""
    sbatch_script: Path
    """A SLURM batch script: one `accelerate launch` per machine through srun, rank and address from SLURM."""
    instructions: Path
    torchrun_line: str
    steps: tuple[str, ...]
    """What to fill in and run, one line each (also at the top of `instructions`)."""


def launch_environment(config_path: str | Path, args: list[str]) -> dict[str, str]:
    """The environment variables `accelerate launch --config_file CONFIG -m memtune ARGS` sets for its processes
    (`LAUNCH_ENVIRONMENT_PREFIXES`, and OMP_NUM_THREADS), computed by accelerate's own launcher code (accelerate 1.15
    commands/launch.py `_validate_launch_command`, utils/launch.py `prepare_multi_gpu_env` /
    `prepare_deepspeed_cmd_env`), not rewritten here: a torchrun launch with them runs what accelerate would."""
    # accelerate ships no type information (no py.typed)
    from accelerate.commands.launch import (  # type: ignore[import-untyped]
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import (  # type: ignore[import-untyped]
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
    )

    parsed = launch_command_parser().parse_args(["--config_file", str(config_path), "-m", "memtune", *args])
    parsed, defaults, mixed_precision_from_config = _validate_launch_command(parsed)
    if parsed.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher (launch.py:1393-1398)
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        fields += ["mixed_precision"] if mixed_precision_from_config else []
        parsed.deepspeed_fields_from_accelerate_config = ",".join(fields)
        environment = prepare_deepspeed_cmd_env(parsed)[1]
    else:
        environment = prepare_multi_gpu_env(parsed)
    return {name: value for name, value in sorted(environment.items())
            if name.startswith(LAUNCH_ENVIRONMENT_PREFIXES) or name == "OMP_NUM_THREADS"}


def write_launch_files(directory: str | Path, train_config: TrainConfig, plan_path: str | Path, *,
                       model_config: Any = None) -> LaunchFiles:
    """Write into `directory` the files that launch the saved plan at `plan_path` (`memtune run PLAN`) on each of
    `train_config.num_nodes` machines of `num_gpus` GPUs: the engines distribute it, memtune only writes their
    configs.

    - accelerate_machine{R}.yaml for each machine R: `accelerate_config` (or the DeepSpeed one, with its JSON
      beside) with num_machines, machine_rank R and num_processes = every machine's GPUs; main_process_ip is the
      placeholder MAIN_PROCESS_IP, main_process_port MAIN_PROCESS_PORT: fill in machine 0's address;
    - torchrun.sh: accelerate's environment for that config (`launch_environment`) and the torchrun line
      (--nnodes, --nproc-per-node, --node-rank $NODE_RANK, --master-addr $MASTER_ADDR, --master-port);
    - memtune.sbatch: SLURM, one task per machine (srun), each running `accelerate launch` with its own config,
      --machine_rank $SLURM_NODEID and the first node of the job as main process;
    - LAUNCH.txt: what to fill in and how to start it (`LaunchFiles.steps`).

    The paths written are absolute: the directory must be at the same path on every machine (a shared file
    system, or a copy). Raises UsageError for a plan that runs as one process (one GPU, no offload, no DeepSpeed:
    `memtune run PLAN` needs no launcher)."""
    if train_config.world_size == 1 and train_config.offload == "none" and not train_config.deepspeed:
        raise UsageError(f"a plan on one GPU without offload runs as `memtune run PLAN`, no launcher: got "
                         f"{train_config.describe()}; give --gpus N (and --nodes M) for launch files")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    plan = str(Path(plan_path).resolve())
    nodes, gpus = train_config.num_nodes, train_config.num_gpus
    configs = tuple(write_accelerate_config(directory / f"accelerate_machine{rank}.yaml", train_config,
                                            model_config=model_config, machine_rank=rank) for rank in range(nodes))
    run = ["run", plan]
    environment = launch_environment(configs[0], run)
    port = MAIN_PROCESS_PORT
    torchrun_line = (f"torchrun --nnodes={nodes} --nproc-per-node={gpus} --node-rank=$NODE_RANK "
                     f"--master-addr=$MASTER_ADDR --master-port=${{MASTER_PORT:-{port}}} "
                     f"-m memtune run {shlex.quote(plan)}")
    single = nodes == 1
    torchrun = ["#!/bin/bash",
                f"# memtune: {train_config.describe()} -- run this on each of the {nodes} machine(s).",
                "# The variables below are what `accelerate launch` sets for accelerate_machine0.yaml (computed by",
                "# accelerate's own launcher code), so a plain torchrun runs the same strategy.",
                "set -euo pipefail",
                ': "${NODE_RANK:=0}"' if single else
                f': "${{NODE_RANK:?set NODE_RANK to the rank of this machine, 0 to {nodes - 1}}}"',
                ': "${MASTER_ADDR:=127.0.0.1}"' if single else
                ': "${MASTER_ADDR:?set MASTER_ADDR to the address of machine 0 (NODE_RANK=0)}"',
                *(f"export {name}={shlex.quote(value)}" for name, value in environment.items()),
                f"exec {torchrun_line}", ""]
    torchrun_script = directory / "torchrun.sh"
    torchrun_script.write_text("\n".join(torchrun))
    torchrun_script.chmod(0o755)
    # srun's bash -c takes one single-quoted command: the paths inside it in double quotes
    launch_line = (f'exec accelerate launch --config_file "{directory}/accelerate_machine${{SLURM_NODEID}}.yaml" '
                   '--machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" '
                   f'-m memtune run "{plan}"')
    sbatch = ["#!/bin/bash",
              "#SBATCH --job-name=memtune",
              f"#SBATCH --nodes={nodes}",
              "#SBATCH --ntasks-per-node=1",
              f"#SBATCH --gpus-per-node={gpus}",
              "#SBATCH --exclusive",
              f"# memtune: {train_config.describe()}",
              "# One task per machine: each runs `accelerate launch`, which starts that machine's GPU processes. srun",
              "# gives a task one CPU unless told (Slurm 22.05+ does not pass sbatch's CPUs on to srun): every CPU",
              "# of the machine goes to its task, for the GPU processes and their data loaders.",
              "set -euo pipefail",
              'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export MASTER_PORT={port}",
              f"srun --kill-on-bad-exit=1 --cpus-per-task=\"$SLURM_CPUS_ON_NODE\" bash -c '{launch_line}'", ""]
    sbatch_script = directory / "memtune.sbatch"
    sbatch_script.write_text("\n".join(sbatch))
    where = "" if single else (" - on every machine at this same path (a shared file system, or a copy), with the "
                               "plan, the model and the data")
    steps = (
        f"files in {directory}{where}",
        *([] if single else [
            f"fill in main_process_ip: {MAIN_PROCESS_IP} -> the address of machine 0 that every machine reaches, in "
            f"each accelerate_machine*.yaml (main_process_port {port}: any free port of machine 0, the same in "
            "every file)"]),
        *(f"machine {rank}: accelerate launch --config_file {config} -m memtune run {shlex.quote(plan)}"
          for rank, config in enumerate(configs)),
        "or with torchrun, on each machine: "
        + ("" if single else f"NODE_RANK=<0..{nodes - 1}> MASTER_ADDR=<address of machine 0> ")
        + f"bash {torchrun_script}",
        f"or with SLURM, once: sbatch {sbatch_script} (rank and address come from SLURM)",
        "add --data FILE --output-dir DIR (on a shared file system) to `memtune run` as usual",
    )
    instructions = directory / "LAUNCH.txt"
    instructions.write_text("\n".join([f"memtune launch files: {train_config.describe()}, "
                                       f"{nodes} machine(s) x {gpus} GPU(s)", *steps,
                                       "", "torchrun line (torchrun.sh sets accelerate's environment first):",
                                       torchrun_line, ""]))
    return LaunchFiles(directory, configs, torchrun_script, sbatch_script, instructions, torchrun_line, steps)
