"""Putting a model's distributed state back after a forward or backward raised, before the step is redone.

The OOM guard (`memtune.run.guard`) calls `reset_after_failed_step` after every rank ran out of memory in
the same attempt (or in a single process), then drops the gradients and redoes the step from its first
micro-batch. What a failed step leaves behind depends on the wrapper and on the torch version:

- FSDP2 (accelerate's `fsdp_version: 2`; memtune's multi-GPU and offload plans): modules with gathered
  parameters, FORWARD / PRE_BACKWARD training states, in-flight collective state and a queued-callback
  flag set (the autograd engine drops the post-backward callback of a failed backward). torch 2.13 resets
  all that with the root's `FSDPModule.reset_iter_state()`; torch 2.11 has no such method, and
  `_reset_iter_state` here does the same steps on 2.11's attributes. Either way the unsharded gradients
  that `no_sync` micro-batches accumulate are dropped too (neither torch does that).
- DDP: a backward that failed after the reducer was prepared leaves it expecting the rest of the
  reduction; `Reducer._reset_state()` clears that (`reset_ddp`).

A model with neither is left as it is. FSDP1 and DeepSpeed have no such reset: the guard only monitors there.
"""

from __future__ import annotations

from typing import Any

import torch


def reset_after_failed_step(model: Any) -> None:
    """Put `model`'s FSDP2 modules and DDP reducer back where a step starts after its forward or
    backward raised (see the module docstring). A model without either is left as it is."""
    reset_fsdp(model)
    reset_ddp(model)


def reset_fsdp(model: Any) -> int:
    """Every FSDP2 module of `model` back to IDLE and resharded, its in-flight collective state and the
    failed step's unsharded gradients dropped; returns how many FSDP modules there are.

    A forward or backward that raised skips FSDP's post-forward hook and the post-backward final
    callback (the autograd engine drops queued callbacks on error): parameter groups stay gathered in
    FORWARD or PRE_BACKWARD, the root keeps `iter_forward_root` (the next forward would skip its root
    pre-forward) and `post_backward_final_callback_queued` (the next backward would never queue the
    callback that reduces gradients). torch 2.13's `FSDPModule.reset_iter_state()` on the root clears
    all of it (_fully_shard.py, _fsdp_state.py `_reset_iter_state`, _fsdp_param_group.py
    `_reset_iter_state`); torch 2.11 lacks it, and `_reset_iter_state` below repeats those steps.
    Neither clears the unsharded gradients that `set_requires_gradient_sync(False)` micro-batches
    (accelerate's `no_sync`) accumulate on each FSDPParam until the syncing one reduce-scatters them:
    the step is redone from its first micro-batch, so they are dropped here.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return 0
    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in modules:
        state = module._get_fsdp_state()
        if state._is_root:  # None before the first forward (lazy init): nothing ran, nothing to reset
            if hasattr(module, "reset_iter_state"):
                module.reset_iter_state()
            else:
                _reset_iter_state(state)
    for module in modules:
        for group in fsdp_param_groups(module._get_fsdp_state()):
            for fsdp_param in group.fsdp_params:
                # Private on both versions (_fsdp_param.py): the no_sync accumulation in the reduce dtype,
                # or the unsharded parameter's own .grad.
                fsdp_param.unsharded_accumulated_grad = None
                if (unsharded := getattr(fsdp_param, "_unsharded_param", None)) is not None:
                    unsharded.grad = None
    return len(modules)


def _reset_iter_state(root_state: Any) -> None:
    """torch 2.13's FSDPState._reset_iter_state for torch 2.11, on 2.11's private attributes: one
    reduce-scatter state in the communication context instead of a list, one `_fsdp_param_group` per
    state instead of `_fsdp_param_groups`. Waits on the events of in-flight collectives (every rank
    issued the same ones when all ran out of memory), then resets the trackers and reshards."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    stream = root_state._device_handle.current_stream()

    def wait(event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    context = root_state._comm_ctx
    if (gathered := getattr(context, "all_gather_state", None)) is not None:
        wait(gathered.event)
        context.all_gather_state = None
    if (scattered := getattr(context, "reduce_scatter_state", None)) is not None:  # 2.11
        wait(scattered.event)
        context.reduce_scatter_state = None
    for scattered in getattr(context, "reduce_scatter_states", []):  # 2.13
        wait(scattered.event)
    getattr(context, "reduce_scatter_states", []).clear()
    context.post_forward_order.clear()
    for state in root_state._state_ctx.all_states:
        state._modules_to_run_forward.clear()
        state._training_state = TrainingState.IDLE
        for group in fsdp_param_groups(state):
            if (result := group._all_gather_result) is not None:
                wait(result.all_gather_event)
                if isinstance(result.all_gather_work, dist.distributed_c10d.Work):
                    result.all_gather_work.wait()
                group._all_gather_result = None
            wait(group._post_reduce_event)
            group._post_reduce_event = None
            if group._all_reduce_state is not None:
                wait(group._all_reduce_state.event)
                group._all_reduce_state = None
            if group._reshard_after_forward_event is not None:
                group._wait_all_gather_streams_on_event(group._reshard_after_forward_event)
                group._reshard_after_forward_event = None
            group._partial_reduce_output = None
            group._post_forward_indices.clear()
            group._training_state = TrainingState.IDLE
            group._to_sharded()
    root_state._state_ctx.iter_forward_root = None
    root_state._state_ctx.post_backward_final_callback_queued = False


def fsdp_param_groups(state: Any) -> list[Any]:
    """A state's FSDPParamGroups: torch 2.13 keeps a list (per-parameter meshes), 2.11 one or None."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def reset_ddp(model: Any) -> None:
    """DDP's reducer after a failed backward: `Reducer._reset_state()` (reducer.cpp: "Ensure forward can run
    despite previous backward not succeeding"; DDP's `_update_process_group` calls it to recover) clears
    `require_finalize_` and `expect_autograd_hooks_`, which a backward that failed after
    `prepare_for_backward` left set: the next forward would raise "Expected to have finished reduction in
    the prior iteration". Bucket all-reduces the failed backward launched (the same on every rank) must
    finish before the next backward writes the buckets again: on CUDA the guard's device synchronisation
    waits for them; gloo's barrier waits for all the group's earlier work."""
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if isinstance(module, DistributedDataParallel):
            module.reducer._reset_state()
            if not any(param.is_cuda for param in module.parameters()):
                torch.distributed.barrier(group=module.process_group)
