"""An epoch of batches of varying shape: the caching allocator's fragmentation over many steps, not one step's peak.

With `--packing none` (one document per row, padded to the micro-batch's longest) every step has its own shape. The
caching allocator keeps the blocks it cut for earlier, smaller batches in its segments; when the worst batch comes,
its large requests find no free block big enough and new segments are mapped, while the old ones stay reserved.
The peak reserved of an epoch is then above that of the worst batch traced alone: 13.53 GiB measured for
Qwen2.5-0.5B (40 steps, worst 2 x 1505 tokens) against 11.50 GiB for the worst step alone
(benchmarks/results/data_modes_h200.json).

`epoch_peaks` traces the steps of the epoch at their own shapes, in the order Trainer feeds them
(`run.data_plan.DataPlan.epoch_row_tokens`: accelerate's seeded sampler), one optimizer step each
(`trace.trace_step(seq_lens=...)`), extends them to the model's depth and replays them through the allocator model
(`allocator.simulate`), in the allocator mode of the configuration (`TrainConfig.expandable_segments`: one segment
per pool that grows, so blocks of any earlier shape are reused and the fragmentation is gone).

Known limitations: one GPU (the sharded and DDP paths trace one shape); the first EPOCH_STEPS micro-batches (and the
worst one) of the first epoch; partial checkpointing (`checkpoint_layers` set) and evaluation keep the worst step's
own peaks (their traces are laid out differently: `single.partial_events`, `eval_step`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from memtune.config import TrainConfig
from memtune.predict import allocator, cache
from memtune.predict.peak import Estimate
from memtune.predict.trace import (
    Trace,
    budget_autotune_clones,
    extend,
    layer_period,
    num_layers_of,
    shallow_config,
    trace_step,
    traced_depth,
)

_TRACES: dict[str, Trace] = {}


def epoch_trace(model_config: Any, train_config: TrainConfig, seq_lens: Sequence[int], device: str) -> Trace:
    """The shallow trace of one optimizer step per entry of `seq_lens` (tokens per row of that step's micro-batches),
    cached in the process and on disk (`predict.cache`) under the model, the configuration, the shapes and the path."""
    depth = traced_depth(num_layers_of(model_config), layer_period(model_config))
    key = json.dumps(["epoch", model_config.to_json_string(use_diff=False), depth, train_config.traced().to_dict(),
                      list(seq_lens), device], sort_keys=True)
    if key not in _TRACES:
        trace = cache.load(key)
        if trace is None:
            trace = trace_step(shallow_config(model_config, depth), train_config.traced(), device=device,
                               seq_lens=list(seq_lens))
            cache.store(key, trace)
        _TRACES[key] = trace
    return _TRACES[key]


def epoch_peaks(model_config: Any, train_config: TrainConfig, seq_lens: Sequence[int], device: str) -> tuple[int, int]:
    """(peak allocated, peak reserved) bytes of the steps of `seq_lens` replayed in that order through the allocator
    model of `train_config` (`expandable_segments` or not), at the model's full depth."""
    trace = epoch_trace(model_config, train_config, seq_lens, device)
    events = budget_autotune_clones(extend(trace, num_layers_of(model_config) or trace.traced_layers),
                                    trace.autotune_clones)
    simulated = allocator.simulate(events, expandable=train_config.expandable_segments)
    return simulated.peak_allocated_bytes, simulated.peak_reserved_bytes


def over_an_epoch(model_config: Any, estimate: Estimate, seq_lens: Sequence[int], device: str) -> Estimate:
    """`estimate` (the worst batch's step) with the peaks of the epoch's replay (`epoch_peaks`) where they are higher;
    the breakdown's overhead (reserved - allocated + workspaces + context) follows. `estimate` itself when
    `seq_lens` holds fewer than two shapes, or the configuration is not one GPU's plain step (`Known limitations`)."""
    config = estimate.config
    plain = config.world_size == 1 and not config.sharded and not config.deepspeed and config.eval_batch_size is None
    if len(set(seq_lens)) < 2 or not plain or (config.gradient_checkpointing and config.checkpoint_layers is not None):
        return estimate
    allocated, reserved = epoch_peaks(model_config, config, seq_lens, device)
    allocated, reserved = max(allocated, estimate.peak_allocated_bytes), max(reserved, estimate.peak_reserved_bytes)
    breakdown = dict(estimate.breakdown)
    if "overhead" in breakdown:
        breakdown["overhead"] = reserved - allocated + estimate.workspace_bytes + estimate.context_bytes
    return dataclasses.replace(estimate, peak_allocated_bytes=allocated, peak_reserved_bytes=reserved,
                               breakdown=breakdown)
