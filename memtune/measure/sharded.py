"""Trial steps of a plan for several GPUs (or CPU offload): one process per rank, FSDP2 or DDP
prepared as accelerate prepares it (`recipe.parallel`), the peak per GPU taken as the max over ranks.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from memtune.config import TrainConfig
from memtune.errors import NoGpuError, UsageError
from memtune.recipe.parallel import (
    build_replicated_model,
    build_sharded_model,
    check_supported,
    ddp_train_step,
    fsdp_train_step,
)

TRIAL_TIMEOUT_SECONDS = 300
"""How long a rank of a spawned multi-GPU trial waits in a collective before giving up (a rank that
ran out of memory leaves the others waiting)."""


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
    Returns a `memory.Measurement`; out-of-memory is `fits=False`, other errors propagate.
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

    from memtune.measure import memory
    from memtune.recipe import step as recipe

    cuda = device.startswith("cuda")
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        device = f"cuda:{torch.cuda.current_device()}"
        memory.warm_up()
        memory.release_memory()
        allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    result = memory.Measurement(fits=True, tokens_per_step=train_config.effective_batch_size * train_config.seq_len)
    model = optimizer = scaler = None
    try:
        if train_config.replicated:
            # DDP: measured from before the model is built, as the estimate starts from an empty device
            # (the weights, the construction broadcast and the buckets are in its events).
            model = build_replicated_model(model_config, train_config, device)
            optimizer = recipe.make_optimizer(model, train_config)

            step: Callable[..., float] = functools.partial(ddp_train_step, device_type=device_type)
        else:
            mesh = init_device_mesh(device_type, (dist.get_world_size(),))
            model = build_sharded_model(model_config, train_config, device, mesh)
            optimizer = recipe.make_optimizer(model, train_config, fused=True)
            step = fsdp_train_step
            if cuda:
                # Sharding moved each unit to the GPU whole before cutting it: drop that from the cache and
                # the peak, so the trial measures the steps (the estimate starts from the shards too).
                memory.release_memory()
        scaler = torch.amp.GradScaler(device_type) if train_config.amp == "fp16" else None
        for _ in range(steps):
            batches = [recipe.random_batch(model_config, train_config, device)
                       for _ in range(train_config.grad_accum_steps)]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, optimizer, batches, train_config, scaler=scaler)
            if cuda:
                torch.cuda.synchronize()
            result.step_seconds.append(time.perf_counter() - start)
            del batches
    except Exception as error:  # noqa: BLE001 - OOM is a result, everything else is re-raised
        if not memory.is_oom(error):
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
        memory.release_memory()
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
    peaks = (int(v) for v in values[:3].tolist())
    result.peak_allocated_bytes, result.peak_reserved_bytes, result.alloc_retries = peaks
    result.fits = not bool(values[3].item())
    result.step_seconds = seconds.tolist() if result.step_seconds else []
    return result


def _spawn_worker(rank: int, world_size: int, init_method: str, payload: dict[str, Any], out_dir: str) -> None:
    """One spawned rank: the trial, rank 0's Measurement written to `out_dir/measurement.json`, then the
    process ends at once (`end_spawned_rank`). An exception propagates as usual: torch.multiprocessing's
    `_wrap` writes it to the file the parent raises from."""
    import torch.distributed as dist

    from memtune.sources import config_from_dict

    _init_process_group(payload["device"], init_method, rank, world_size)
    try:
        measured = _trial(config_from_dict(payload["model_config"]), TrainConfig.from_dict(payload["train_config"]),
                          payload["steps"], payload["device"])
        if rank == 0:
            Path(out_dir, "measurement.json").write_text(json.dumps(measured.to_dict()))
    finally:
        dist.destroy_process_group()
    end_spawned_rank()


def end_spawned_rank() -> NoReturn:
    """End a spawned rank whose work is done (results written and closed, process group destroyed) with
    `os._exit(0)`, skipping interpreter shutdown.

    DDP and FSDP2 keep their process group referenced after `destroy_process_group`: on torch 2.13 (CPU,
    gloo) the group's threads (`pt_gloo_runloop`, `gloo_tcp_loop`) were still running after it and after
    `gc.collect()`, while a plain all_reduce or a device mesh alone leave none. A process that then exits
    normally finalizes the interpreter and runs C++ static destructors with those threads alive. Now and then
    (full test suite, loaded 2-core machine) a spawned rank aborted with "terminate called without an active
    exception" (std::terminate from C++, SIGABRT), which `torch.multiprocessing` reports as a failed trial;
    that shutdown is the likely place (not reproduced in 140 spawned trials here, so not proven). `os._exit`
    ends every thread at once and runs no destructor: there is no shutdown left for them to race. stdout and
    stderr are flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn_trial(model_config: Any, train_config: TrainConfig, steps: int, device: str) -> Any:
    import torch.multiprocessing as mp

    from memtune.measure import memory

    world_size = train_config.num_gpus
    with tempfile.TemporaryDirectory(prefix="memtune-trial-") as out_dir:
        payload = {"model_config": {"model_type": model_config.model_type, **model_config.to_diff_dict()},
                   "train_config": train_config.to_dict(), "steps": steps, "device": device}
        try:
            mp.start_processes(_spawn_worker, args=(world_size, f"file://{out_dir}/store", payload, out_dir),
                               nprocs=world_size, start_method="spawn", join=True)
        except mp.ProcessRaisedException as error:
            if any(marker in str(error) for marker in memory.OOM_MARKERS):
                return memory.Measurement(fits=False, error=str(error).strip().splitlines()[-1][:300])
            raise
        data = json.loads(Path(out_dir, "measurement.json").read_text())
    data.pop("tokens_per_second", None)
    return memory.Measurement(**data)
