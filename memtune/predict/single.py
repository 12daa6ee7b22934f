"""Predicted peak memory of one GPU training without a wrapper: trace -> extend -> allocator -> peak.

    estimate_single(model_config, TrainConfig(seq_len=1024, micro_batch_size=4, amp="bf16"))

1. Trace the step on fake tensors (`trace.trace_step`) with a few decoder layers only
   (`trace.traced_depth`: three periods of the layer pattern, a first, a repeated and a last block).
2. Extend the trace to the model's depth by repeating the middle block (`trace.extend`); memory
   is affine in depth, and so is the event stream.
3. Replay the events through the caching-allocator model (`allocator.simulate`) for peak reserved.
4. Add what the trace cannot see: cuBLAS workspaces and the CUDA context (`peak.estimate_of_events`).

Traces are cached per (model config, traced depth, configuration, device), so a search reuses them;
DDP (ddp.py) builds on the same events, as every GPU of a replica runs this step. A configuration with an eval
batch traces Trainer's evaluation after the steps (`eval_step`): the peak is then the run's, and
`Estimate.evaluation` evaluation's own (`eval_peak`).
Pure: no CUDA memory is used; with a GPU present the trace runs on fake CUDA tensors.

When the trace fails on the path asked for (fake CUDA refuses a data-dependent op such as OPT's
`aten._local_scalar_dense`, or an op has no fake kernel), the other path is tried (the fake-CUDA one
only where torch sees a GPU) and the Trace says so in one line (`Trace.note`, then
`Estimate.trace_note`, for the caller to show); when both fail, a UsageError names the model type, the
failures and the torch and transformers versions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from memtune.config import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, TrainConfig
from memtune.errors import MemtuneError
from memtune.predict import allocator, cache
from memtune.predict.eval_peak import eval_estimate_of_events
from memtune.predict.peak import Estimate, default_trace_device, estimate_of_events
from memtune.predict.trace import (
    Event,
    Trace,
    budget_autotune_clones,
    describe_failure,
    extend,
    extend_events,
    host_bytes_at_depth,
    layer_period,
    model_type_of,
    num_layers_of,
    paged_bytes_at_depth,
    shallow_config,
    trace_step,
    traced_depth,
    untraceable,
)

_TRACE_CACHE: dict[str, Trace] = {}
_EVENTS_CACHE: dict[tuple[int, ...], list[Event]] = {}


def cached_trace(model_config: Any, train_config: TrainConfig, device: str, depth: int | None = None) -> Trace:
    """The shallow trace of `train_config` (`traced_depth` layers of `model_config`, or `depth`), cached."""
    depth = depth or traced_depth(num_layers_of(model_config), layer_period(model_config))
    train_config = train_config.traced()
    key = json.dumps([model_config.to_json_string(use_diff=False), depth, train_config.to_dict(), device],
                     sort_keys=True)
    if key not in _TRACE_CACHE:
        trace = cache.load(key)
        if trace is None:
            trace = _trace_with_fallback(shallow_config(model_config, depth), train_config, device)
            cache.store(key, trace)
        _TRACE_CACHE[key] = trace
        if trace.device != device:  # the other path's trace, without the note, for who asks for that path
            other_key = json.dumps([model_config.to_json_string(use_diff=False), depth, train_config.to_dict(),
                                    trace.device], sort_keys=True)
            _TRACE_CACHE.setdefault(other_key, dataclasses.replace(trace, note=""))
    return _TRACE_CACHE[key]


def other_trace_device(device: str) -> str | None:
    """The path to try when `device`'s trace fails: the CPU emulation after fake CUDA; fake CUDA after
    the CPU only where torch sees a GPU (without one, fake CUDA tensors cannot run autograd)."""
    import torch

    if device == "cuda":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def _trace_with_fallback(model_config: Any, train_config: TrainConfig, device: str) -> Trace:
    """`trace_step` on `device`, else on the other path with a note; a UsageError when no path traces.
    memtune's own errors (a configuration the recipe refuses) are the same on both paths: raised as they are."""
    try:
        return trace_step(model_config, train_config, device=device)
    except MemtuneError:
        raise
    except Exception as error:  # any failure of the traced step: torch's fake-tensor and dispatch errors vary
        first = error
    other = other_trace_device(device)
    failures = [f"the {device} trace failed: {describe_failure(first)}"]
    if other is not None:
        try:
            trace = trace_step(model_config, train_config, device=other)
        except MemtuneError:
            raise
        except Exception as error:
            failures.append(f"the {other} trace failed: {describe_failure(error)}")
        else:
            trace.note = (f"the {device} trace of {model_type_of(model_config)} failed ({describe_failure(first)}); "
                          f"traced on the {other} path instead")
            return trace
    hint = "" if other is not None else "--trace-device cuda on a GPU machine"
    raise untraceable(model_config, failures, hint) from first


def full_depth_events(model_config: Any, train_config: TrainConfig, device: str) -> tuple[Trace, list[Event]]:
    """The cached shallow trace and its events extended to the model's depth (built once per trace)."""
    num_layers = num_layers_of(model_config)
    if 0 < train_config.checkpointed_layers(num_layers) < num_layers:
        return partial_events(model_config, train_config, device)
    trace = cached_trace(model_config, train_config, device)
    depth = num_layers or trace.traced_layers
    key = (id(trace), depth)
    if key not in _EVENTS_CACHE:
        _EVENTS_CACHE[key] = budget_autotune_clones(extend(trace, depth), trace.autotune_clones)
    return trace, _EVENTS_CACHE[key]


def partial_events(model_config: Any, train_config: TrainConfig, device: str) -> tuple[Trace, list[Event]]:
    """`full_depth_events` with the first k of the model's L decoder layers checkpointed (`checkpoint_layers`).

    One shallow trace holds both kinds of layer: `traced_depth(k)` checkpointed ones, then `traced_depth(L - k)`
    others (each three periods, or all of them when there are that few). Its events are extended twice, each
    kind by repeating a template block inside its own run of layers (`trace.extend_events`): the others first,
    one period above their first block, then the checkpointed ones, one period above the first layer. Both
    lengths keep their phase in the layer pattern (`traced_depth`), so a model of alternating layer types
    still ends on the right one. Memory is affine in each run's length, as in depth."""
    num_layers, period = num_layers_of(model_config), layer_period(model_config)
    checkpointed = train_config.checkpointed_layers(num_layers)
    traced_checkpointed = traced_depth(checkpointed, period)
    traced_plain = traced_depth(num_layers - checkpointed, period)
    traced = traced_checkpointed + traced_plain
    trace = cached_trace(model_config, train_config.replace(checkpoint_layers=traced_checkpointed), device,
                         depth=traced)
    key = (id(trace), num_layers, checkpointed)
    if key not in _EVENTS_CACHE:
        events = trace.events
        plain_depth = traced_checkpointed + num_layers - checkpointed
        if traced_plain < num_layers - checkpointed:
            events = extend_events(events, period, traced, plain_depth, start=traced_checkpointed + period)
        if traced_checkpointed < checkpointed:
            events = extend_events(events, period, plain_depth, num_layers, start=period)
        _EVENTS_CACHE[key] = budget_autotune_clones(events, trace.autotune_clones)
    return trace, _EVENTS_CACHE[key]


def offloaded_host_bytes(model_config: Any, train_config: TrainConfig, trace: Trace) -> int:
    """The pinned host memory of the full model's offloaded activations (`trace.host_bytes_at_depth`), from the
    trace `full_depth_events` used: all layers checkpointed, or the first k (`partial_events`' first run)."""
    if not train_config.offload_activations:
        return 0
    num_layers = num_layers_of(model_config) or trace.traced_layers
    checkpointed = train_config.checkpointed_layers(num_layers)
    if checkpointed < num_layers:
        return host_bytes_at_depth(trace, checkpointed, traced_depth(checkpointed, layer_period(model_config)))
    return host_bytes_at_depth(trace, num_layers)


def estimate_single(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the peak memory of `train_config` on one GPU (its num_gpus and strategy are not read: the
    step as one GPU runs it). `device`: "cuda" or "cpu" trace (default: cuda when a GPU is visible)."""
    started = time.perf_counter()
    device = device or default_trace_device()
    trace, events = full_depth_events(model_config, train_config, device)
    num_layers = num_layers_of(model_config) or trace.traced_layers
    found = estimate_of_events(train_config, events, trace.categories, trace_device=trace.device or device,
                               trace_note=trace.note, paged_bytes=paged_bytes_at_depth(trace, num_layers),
                               host_bytes=offloaded_host_bytes(model_config, train_config, trace),
                               traced_layers=trace.traced_layers, num_layers=num_layers,
                               started=started, context_bytes=context_bytes, workspace_bytes=workspace_bytes)
    if train_config.eval_batch_size is not None:  # the events hold Trainer's evaluation after the steps (eval_step)
        found.evaluation = eval_estimate_of_events(train_config, events, trace.categories, trace.eval_first_storage,
                                                   trace_device=found.trace_device, context_bytes=context_bytes,
                                                   workspace_bytes=workspace_bytes)
    return found


def fits_under(model_config: Any, estimate: Estimate, usable_bytes: int, device: str | None = None) -> bool:
    """Replay the step against a device of `usable_bytes`, releasing the cache on pressure as torch does
    (`allocator.simulate` with a capacity): workspaces and context are taken off the capacity first."""
    _, events = full_depth_events(model_config, estimate.config, device or estimate.trace_device)
    capacity = usable_bytes - estimate.workspace_bytes - estimate.context_bytes
    return capacity > 0 and allocator.simulate(events, capacity_bytes=capacity,
                                               expandable=estimate.config.expandable_segments).fits
