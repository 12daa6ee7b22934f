"""`memtune fit`: probe -> search (estimate + throughput) -> verify -> plan. Builds a FitResult; prints nothing.

Three situations:
- a GPU is here and no budget is given: fit what the GPU has free, verify with real trial steps;
- a budget (or a card name) is given: fit that; with a GPU here the trial runs under a per-process
  memory fraction that emulates the budget;
- no GPU and no budget: plan for each common card size (16, 24, 40, 48, 80 GiB), without trials.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtune import throughput
from memtune.config import TrainConfig, format_bytes
from memtune.estimate import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, Estimate, estimate, fits_under
from memtune.plan import Plan
from memtune.probe import GpuInfo, ProbeResult
from memtune.search import COMMON_CARDS, Policy, SearchResult, search
from memtune.sources import ModelSource


class ModelPredictor:
    """The default `search.Predictor`: traced memory (estimate.py) and the FLOP model (throughput.py)."""

    def __init__(self, model_config: Any, num_parameters: int, speed: throughput.GpuSpeed, *, device: str | None = None,
                 context_bytes: int = DEFAULT_CONTEXT_BYTES, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        self.model_config = model_config
        self.shape = throughput.ModelShape.of(model_config, num_parameters)
        self.speed = speed
        self.device = device
        self.context_bytes = context_bytes
        self.workspace_bytes = workspace_bytes
        self._cache: dict[TrainConfig, Estimate] = {}

    def memory(self, config: TrainConfig) -> Estimate:
        if config not in self._cache:
            kwargs = dict(device=self.device, context_bytes=self.context_bytes, workspace_bytes=self.workspace_bytes)
            if config.num_gpus > 1 or config.offload != "none":
                from memtune.sharding import estimate_sharded

                self._cache[config] = estimate_sharded(self.model_config, config, **kwargs)
            else:
                self._cache[config] = estimate(self.model_config, config, **kwargs)
        return self._cache[config]

    def fits(self, estimate_: Estimate, usable_bytes: int) -> bool:
        """Replay the step against a device of `usable_bytes`: under pressure torch's allocator frees
        its cached blocks and retries, so a step whose unconstrained peak reserved is above the
        budget can still fit; what must fit is the live memory plus unavoidable fragmentation."""
        config = estimate_.config
        if config.num_gpus > 1 or config.offload != "none":
            # the sharded model predicts a peak; there is no unsharded event stream to replay
            return estimate_.total_bytes <= usable_bytes
        return fits_under(self.model_config, estimate_, usable_bytes, self.device)

    def tokens_per_second(self, config: TrainConfig) -> float:
        return throughput.tokens_per_second(self.shape, config, self.speed)


@dataclass
class CardPlan:
    """No GPU and no budget: the search against one common card size."""

    card: str
    budget_bytes: int
    search: SearchResult


@dataclass
class FitResult:
    source: ModelSource
    num_parameters: int
    seq_len: int
    effective_batch_size: int
    probe: ProbeResult | None = None
    gpu: GpuInfo | None = None
    budget_bytes: int | None = None
    budget_label: str = ""
    search: SearchResult | None = None
    plan: Plan | None = None
    plan_path: Path | None = None
    card_plans: list[CardPlan] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        if self.card_plans:
            return any(card.search.chosen is not None for card in self.card_plans)
        return self.search is not None and self.search.chosen is not None


@contextlib.contextmanager
def emulated_budget(gpu: GpuInfo | None, budget_bytes: int) -> Iterator[None]:
    """Cap torch's pool so a trial on a bigger GPU runs out of memory where `budget_bytes` would."""
    import torch

    if gpu is None or budget_bytes >= gpu.budget_bytes:
        yield
        return
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(gpu.index) if getter is not None else (gpu.memory_fraction or 1.0)
    fraction = max(0.0, (budget_bytes - gpu.context_bytes) / gpu.total_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, gpu.index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, gpu.index)


def fit_model(
    source: ModelSource,
    num_parameters: int,
    seq_len: int,
    effective_batch_size: int,
    *,
    budget_bytes: int | None = None,
    budget_label: str = "",
    gpu_name: str | None = None,
    policy: Policy = Policy(),
    verify: bool = True,
    trial_steps: int = 2,
    trace_device: str | None = None,
    plan_path: str | Path | None = None,
    probe_result: ProbeResult | None = None,
    progress: Callable[[str], None] | None = None,
) -> FitResult:
    """Choose, verify and save the plan. See the module docstring for the three situations."""
    from memtune import verify as verify_module
    from memtune.probe import probe

    started = time.perf_counter()
    result = FitResult(source, num_parameters, seq_len, effective_batch_size)
    result.probe = probe_result if probe_result is not None else probe()
    gpu = result.probe.gpus[0] if result.probe.available else None
    result.gpu = gpu
    context = gpu.context_bytes if gpu else DEFAULT_CONTEXT_BYTES
    workspace = verify_module.warm_up() if gpu and verify else DEFAULT_WORKSPACE_BYTES
    speed = throughput.gpu_speed(gpu.name if gpu else (gpu_name or "H100"))
    if gpu is not None:
        policy = _with(policy, bf16_supported=gpu.bf16_supported and policy.bf16_supported)
    if importlib.util.find_spec("memtune.sharding") is None:
        policy = _with(policy, allow_offload=False)  # the offload memory model is not part of this build
    predictor = ModelPredictor(source.config, num_parameters, speed, device=trace_device,
                               context_bytes=context, workspace_bytes=workspace)

    if budget_bytes is None and gpu is None:
        for card, size in COMMON_CARDS.items():
            if progress:
                progress(f"planning for {card}")
            found = search(predictor, seq_len, effective_batch_size, size, policy, trial=None, explain=False, progress=progress)
            result.card_plans.append(CardPlan(card, size, found))
        result.seconds = time.perf_counter() - started
        return result

    if budget_bytes is None:
        budget_bytes = gpu.budget_bytes
        budget_label = f"{gpu.name}: {format_bytes(budget_bytes)} usable"
    result.budget_bytes, result.budget_label = budget_bytes, budget_label

    trial = None
    if gpu is not None and verify:
        def trial(config: TrainConfig) -> verify_module.Measurement:
            with emulated_budget(gpu, budget_bytes):
                return verify_module.measure(source.config, config, steps=trial_steps)

    result.search = search(predictor, seq_len, effective_batch_size, budget_bytes, policy, trial=trial, progress=progress)
    chosen = result.search.chosen
    if chosen is not None:
        measured = chosen.measurement if chosen.measurement is not None and chosen.measurement.fits else None
        result.plan = Plan(
            model=source.name,
            train_config=chosen.config,
            budget_bytes=budget_bytes,
            margin_bytes=result.search.margin_bytes,
            predicted_total_bytes=chosen.predicted_total_bytes or 0,
            predicted_tokens_per_second=chosen.predicted_tokens_per_second,
            measured_peak_reserved_bytes=None if measured is None else measured.peak_reserved_bytes,
            measured_tokens_per_second=None if measured is None else measured.tokens_per_second,
            gpu=gpu.name if gpu else (gpu_name or ""),
            fallbacks=result.search.fallbacks,
        )
        if plan_path is not None:
            result.plan_path = result.plan.save(plan_path)
    result.seconds = time.perf_counter() - started
    return result


def _with(policy: Policy, **changes: Any) -> Policy:
    import dataclasses

    return dataclasses.replace(policy, **changes)
