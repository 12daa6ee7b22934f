"""`memtune fit`: probe -> search (estimate + throughput) -> verify -> plan. Builds a FitResult; prints nothing.

Three situations:
- a GPU is here and no budget is given: fit what the GPU has free, verify with real trial steps;
- a budget (or a card name) is given: fit that; with a GPU here the trial runs under a per-process
  memory fraction that emulates the budget;
- no GPU and no budget: plan for each common card size (16, 24, 40, 48, 80 GiB), without trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtune.config import (
    DEFAULT_INTER_NODE_GBPS,
    HOST_BUDGET_FRACTION,
    KNOWN_GPUS,
    NO_BF16_GPUS,
    Adapter,
    Policy,
    TrainConfig,
    format_bytes,
    gpu_card,
    known_gpu,
    margin_for,
    option_of,
    parse_bytes,
)
from memtune.errors import UsageError, listed
from memtune.measure import memory
from memtune.measure.probe import GpuInfo, ProbeResult
from memtune.measure.verify import measure as measure_trial
from memtune.plan import Plan
from memtune.predict import cache, throughput, zero, zero_layout
from memtune.predict.bound import state_lower_bound
from memtune.predict.epoch import over_an_epoch
from memtune.predict.estimate import (
    DEFAULT_CONTEXT_BYTES,
    DEFAULT_WORKSPACE_BYTES,
    Estimate,
    check_trace_device,
    estimate,
    fits_under,
)
from memtune.predict.peak import default_trace_device
from memtune.predict.trace import num_layers_of
from memtune.run.data_plan import DataPlan
from memtune.run.launch import MAIN_PROCESS_IP, LaunchFiles, write_launch_files
from memtune.search.choose import (
    COMMON_CARDS,
    COMMON_CARDS_WITHOUT_BF16,
    FITS,
    TOO_BIG,
    VERIFIED,
    Candidate,
    SearchResult,
    choose_strategy,
    explain_choice,
    host_problem,
    search,
)
from memtune.search.verdict import Verdict, judge
from memtune.sources import ModelSource

logger = logging.getLogger("memtune.fit")
"""`auto_fit` logs here, at DEBUG, what the libraries said while it worked (`quiet_libraries`)."""


def attention_fields(attn: str | None, capability: str | None) -> dict[str, Any]:
    """The TrainConfig fields of fit's --attn and of the card planned for (its compute capability: which SDPA
    kernels it has), set on every configuration the search predicts, tries and saves."""
    return {"attn": attn, "gpu_capability": capability}


class ModelPredictor:
    """The default `search.Predictor`: traced memory (`predict.estimate`) and the FLOP model (`predict.throughput`)."""

    def __init__(self, model_config: Any, num_parameters: int, speed: throughput.GpuSpeed, *, device: str | None = None,
                 context_bytes: int = DEFAULT_CONTEXT_BYTES, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 note: Callable[[str], None] | None = None, on_card: dict[str, Any] | None = None):
        self.model_config = model_config
        self.on_card = on_card or {}
        """TrainConfig fields every configuration is predicted with: fit's --attn and the card's compute capability
        (`attention_fields`)."""
        # FLOPs counted on the model (predict.flops); the closed form, with a note, where the count fails
        self.shape = throughput.ModelShape.of(model_config, num_parameters, count=True,
                                              note=None if note is None else lambda text: note(f"note: {text}"))
        self.speed = speed
        self.device = device
        self.context_bytes = context_bytes
        self.workspace_bytes = workspace_bytes
        self.note = note
        """Told once, in words, when a trace had to fall back to the other trace path (`Estimate.trace_note`)."""
        self._notes: set[str] = set()
        self._cache: dict[TrainConfig, Estimate] = {}
        self._model_key = model_config.to_json_string(use_diff=False)

    def _disk_key(self, kind: str, config: TrainConfig, *more: Any) -> str:
        """The disk cache's key (`predict.cache.key_of`) of `config` on this model and trace device; `more` for what
        else the entry depends on (a device's size)."""
        return cache.key_of(kind, self._model_key, config.to_dict(), self.device or default_trace_device(), *more)

    def memory(self, config: TrainConfig) -> Estimate:
        """The predicted step of `config` (one GPU, DDP, FSDP2 or DeepSpeed ZeRO: `predict.estimate` dispatches),
        kept in the process and on disk (`predict.cache`, kind "estimate"): a second fit of the same model and
        configuration reads the finished estimate, without extending a trace or replaying the allocator."""
        config = config.replace(**self.on_card)
        if config not in self._cache:
            started = time.perf_counter()
            key = self._disk_key("estimate", config)
            stored = cache.load(key)
            if isinstance(stored, tuple) and len(stored) == 3 and isinstance(stored[0], Estimate):
                found = rebased(stored[0], self.context_bytes - stored[1], self.workspace_bytes - stored[2])
                found = dataclasses.replace(found, seconds=time.perf_counter() - started)  # this prediction's time
            else:
                found = estimate(self.model_config, config, device=self.device, context_bytes=self.context_bytes,
                                 workspace_bytes=self.workspace_bytes)
                cache.store(key, (found, self.context_bytes, self.workspace_bytes))
            self._cache[config] = found
            trace_note = self._cache[config].trace_note
            if trace_note and self.note is not None and trace_note not in self._notes:
                self._notes.add(trace_note)
                self.note(f"note: {trace_note}")
        return self._cache[config]

    @property
    def num_layers(self) -> int:
        """The model's decoder layers (`choose.fewest_checkpointed` bisects over them)."""
        return self.shape.num_layers

    def fits(self, estimate_: Estimate, usable_bytes: int) -> bool:
        """`estimate.fits_under`: the step replayed against a device of `usable_bytes`, releasing the
        cache under pressure as torch does (the sharded estimate's total must fit). Kept on disk (kind "fits") by
        the estimate's configuration and `usable_bytes`: the replay needs the full-depth events."""
        capacity = usable_bytes - estimate_.workspace_bytes - estimate_.context_bytes  # what the replay gets
        key = self._disk_key("fits", estimate_.config, estimate_.trace_device, capacity)
        found = cache.load(key)
        if not isinstance(found, bool):
            found = fits_under(self.model_config, estimate_, usable_bytes, self.device)
            cache.store(key, found)
        return found

    def tokens_per_second(self, config: TrainConfig) -> float:
        return throughput.tokens_per_second(self.shape, config, self.speed)

    def settled_tokens_per_second(self, estimate_: Estimate, usable_bytes: int) -> float:
        """Tokens/s once the memory is known: a paged optimizer's state is evicted only as far as the pool's
        peak and the state overflow `usable_bytes` together (`throughput.optimizer_seconds`)."""
        overflow = max(0, estimate_.total_bytes + estimate_.paged_bytes - usable_bytes)
        return throughput.tokens_per_second(self.shape, estimate_.config, self.speed, evicted_bytes=overflow)

    def nvme_bytes(self, config: TrainConfig) -> int:
        """Bytes one rank of a DeepSpeed ZeRO-3 plan swaps to NVMe (`zero_layout.nvme_bytes`: fp32 master, moments and
        gradient, and the 16-bit parameters where they are offloaded); 0 for any other plan."""
        if config.zero is None or config.offload == "none" or config.zero.offload_device != "nvme":
            return 0
        layout = zero.cached_layout(self.model_config, config)
        return zero_layout.nvme_bytes(layout, zero.knobs_of(config, zero.hidden_size_of(self.model_config)))

    def state_bytes(self, config: TrainConfig) -> int:
        """`bound.state_lower_bound`: weights + gradients + optimizer state, a floor under the traced peak."""
        return state_lower_bound(self.shape, config)


def rebased(found: Estimate, context_change: int, workspace_change: int) -> Estimate:
    """`found` (a cached estimate) with `context_change` more bytes of CUDA context and `workspace_change` more of
    cuBLAS workspaces (both may be negative): the probe of another process measures a slightly different context,
    and neither enters the traced step, only the totals and the "overhead" category (`peak.estimate_of_events`,
    `eval_peak.eval_estimate_of_events`)."""
    if not context_change and not workspace_change:
        return found
    change = context_change + workspace_change

    def moved(breakdown: dict[str, int]) -> dict[str, int]:
        return {**breakdown, "overhead": breakdown.get("overhead", 0) + change} if "overhead" in breakdown \
            else dict(breakdown)

    evaluation = found.evaluation
    if evaluation is not None:
        evaluation = dataclasses.replace(evaluation, context_bytes=evaluation.context_bytes + context_change,
                                         workspace_bytes=evaluation.workspace_bytes + workspace_change,
                                         breakdown=moved(evaluation.breakdown))
    return dataclasses.replace(found, context_bytes=found.context_bytes + context_change,
                               workspace_bytes=found.workspace_bytes + workspace_change,
                               breakdown=moved(found.breakdown), evaluation=evaluation)


@dataclass
class PlanResult:
    """What `memtune plan` found: one configuration's predicted memory, and its verdict against a budget
    (`search.verdict.judge`, the same as `memtune fit` gives the same configuration)."""

    source: ModelSource
    estimate: Estimate
    budget_label: str
    num_parameters: int
    verdict: Verdict | None = None
    """None when no budget was given."""
    tokens_per_second: float | None = None
    """Predicted tokens/s over all GPUs (`predict.throughput`); over several machines it rests on `inter_node_gbps`."""
    inter_node_gbps: float | None = None
    """The network rate of each machine the throughput assumed (Gb/s, --inter-node-gbps); None on one machine."""
    data: DataPlan | None = None
    """The training data's lengths and worst batch (`--data`), at the micro-batch predicted; None without --data."""
    explanation: SearchResult | None = None
    """`memtune plan --explain`: the configuration as the one candidate of a search (`chosen`), with its alternatives
    (the configuration with one thing changed, `search.choose.explain_choice`) against the budget; None otherwise."""

    @property
    def budget_bytes(self) -> int | None:
        return None if self.verdict is None else self.verdict.budget_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.verdict is None else self.verdict.fits

    def plan(self, gpu_name: str | None = None, trust_remote_code: bool = False) -> Plan:
        """The predicted configuration as a plan file's Plan (`memtune plan --out`: what `memtune run` launches on
        each machine), not verified on a GPU. Raises UsageError without a budget (the OOM guard steps down from
        it)."""
        if self.verdict is None:
            raise UsageError("a plan to run needs the memory it was planned for: give --budget or --gpu")
        return Plan(model=self.source.name, train_config=self.estimate.config, budget_bytes=self.verdict.budget_bytes,
                    margin_bytes=self.verdict.margin_bytes, predicted_total_bytes=self.estimate.total_bytes,
                    predicted_host_bytes=self.estimate.host_bytes,
                    predicted_tokens_per_second=self.tokens_per_second or 0.0, gpu=gpu_name or "",
                    trust_remote_code=trust_remote_code)


@dataclass
class CardPlan:
    """No GPU and no budget: the search against one common card size, or why that card was not planned."""

    card: str
    budget_bytes: int
    search: SearchResult | None
    skipped: str = ""
    """Why the card was not planned (a pinned bf16 precision on a card without bf16); empty when it was."""


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
    policy: Policy | None = None
    """The policy as the user gave it (pins and forbidden rungs), for the reproduce line."""
    data: DataPlan | None = None
    """The training data's lengths and worst batch (`--data`), at the chosen micro-batch; None without --data."""
    seconds: float = 0.0
    inter_node_gbps: float | None = None
    """Over several machines (--nodes): the network rate of each machine the throughput assumed (Gb/s one way,
    --inter-node-gbps, not measured); None on one machine."""
    cached_trials: list[TrainConfig] = field(default_factory=list)
    """Configurations whose trial steps were not run again: a measurement of the same step on the same card under
    the same budget was in the disk cache (`cached_trial`); their candidates' notes say "verified earlier (cached
    measurement)"."""
    launch_files: LaunchFiles | None = None
    """Over several machines: the launch files written next to the saved plan (`run.launch.write_launch_files`:
    one accelerate config per machine, torchrun and SLURM scripts, LAUNCH.txt), None otherwise."""

    @property
    def fits(self) -> bool:
        if self.card_plans:
            return any(card.search is not None and card.search.chosen is not None for card in self.card_plans)
        return self.search is not None and self.search.chosen is not None


@contextlib.contextmanager
def emulated_budget(gpu: GpuInfo | None, budget_bytes: int) -> Iterator[None]:
    """Cap torch's pool so a trial on a bigger GPU runs out of memory where `budget_bytes` would.

    The fraction bounds the whole process's pool, so what the process already holds there (a notebook's
    tensors, a benchmark's ballast) is added to the budget: the trial itself gets `budget_bytes` minus the
    CUDA context, not that minus what was there before."""
    import torch

    if gpu is None or budget_bytes >= gpu.budget_bytes:
        yield
        return
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(gpu.index) if getter is not None else (gpu.memory_fraction or 1.0)
    held = torch.cuda.memory_reserved(gpu.index)
    fraction = min(1.0, max(0.0, (budget_bytes - gpu.context_bytes + held) / gpu.total_bytes))
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
    evaluation: dict[str, Any] | None = None,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
    data: DataPlan | None = None,
    explain: bool = True,
    on_chosen: Callable[[str], None] | None = None,
) -> FitResult:
    """Choose, verify and save the plan. See the module docstring for the three situations.

    `explain`: predict the alternatives that explain the choice (`search.choose.explain_choice`, the "why this one"
    table) once the plan is saved and the choice told to `on_chosen` (`chosen_words`: the configuration, verified or
    not, and the plan's path): they never delay the plan file. Their seconds are `SearchResult.explain_seconds`; each
    alternative is told to `progress` in one line. Not for the common-card plans (no GPU, no budget).

    A second fit of the same model, configuration and card reads what did not change from the disk cache
    (`predict.cache`; MEMTUNE_NO_CACHE=1 turns it off): each finished estimate and replay (`ModelPredictor`), the FLOP
    counts (`predict.flops`) and each trial measurement that fitted (`cached_trial`: the same GPU, driver, budget and
    libraries; its candidate's note says "verified earlier (cached measurement)").

    `evaluation`: the TrainConfig eval fields (`EvalOptions.fields`; eval_batch_size None for auto is given as
    "auto") added to the chosen plan once the search is done (`plan_evaluation`).

    Several machines (`policy.num_nodes` > 1, --nodes): the search splits the effective batch over every GPU of every
    machine and times the collectives over `inter_node_gbps` per machine (Gb/s one way, an assumption, said in the
    search's notes); trial steps (this machine only) are skipped; a saved plan gets its launch files in the plan's
    folder (`run.launch.write_launch_files`), with what to fill in among the notes.

    `data`: the training data's batches (`run.data_plan`, `--data`): the search, the trials and the plan use the
    worst batch's row length (`DataPlan.row_tokens`, at most `seq_len`) instead of `seq_len`; `seq_len` stays the
    task's (the reproduce line's --seq-len)."""
    from memtune.measure.probe import probe

    started = time.perf_counter()
    result = FitResult(source, num_parameters, seq_len, effective_batch_size, policy=policy, data=data)
    seq_len = traced_seq_len(seq_len, data)
    result.probe = probe_result if probe_result is not None else probe()
    gpu = result.probe.gpus[0] if result.probe.available else None
    result.gpu = gpu
    context = gpu.context_bytes if gpu else DEFAULT_CONTEXT_BYTES
    workspace = memory.warm_up() if gpu and verify else DEFAULT_WORKSPACE_BYTES
    speed = throughput.gpu_speed(gpu.name if gpu else (gpu_name or "H100"))
    several_machines = policy.num_nodes > 1
    if several_machines:  # as plan_configuration: the collectives cross the network at this rate (an assumption)
        speed = speed.scaled(inter_node_bytes_per_second=inter_node_gbps * 1e9 / 8)
        result.inter_node_gbps = inter_node_gbps
    if gpu is not None:
        policy = _with(policy, bf16_supported=gpu.bf16_supported and policy.bf16_supported)
        if gpu.host_copy_bytes_per_second:  # measured here: offloaded activations and state move at this rate
            speed = speed.scaled(pcie_bytes_per_second=gpu.host_copy_bytes_per_second)
        if policy.host_budget_bytes is None:
            policy = _with(policy, host_budget_bytes=host_budget_here())
    elif gpu_name is not None and known_gpu(gpu_name)[0] in NO_BF16_GPUS:
        policy = _with(policy, bf16_supported=False)
        if progress and policy.precision is None:  # pinned bf16 is refused by policy.validate: exit 2
            progress(f"note: {known_gpu(gpu_name)[0]} has no bf16: planning fp16-mixed / fp16 instead of bf16")
    on_card = attention_fields(policy.attn, gpu.capability if gpu else
                               (gpu_card(gpu_name).capability if gpu_name else None))
    on_card["packed_rows"] = data is not None and data.packed_rows  # traced as the loader batches (data_plan)
    policy.validate(effective_batch_size)  # before the checks below read its fields
    if policy.nvme_path is not None and policy.nvme_budget_bytes is None:
        policy = _with(policy, nvme_budget_bytes=nvme_free_bytes(policy.nvme_path))
    check_sequence_length(source.config, seq_len)
    check_trace_device(trace_device)
    if policy.use_adapter is not False:
        check_adapter_targets(source.config, policy.adapter)
    pinned = policy.gradient_checkpointing
    if pinned is not None and not isinstance(pinned, bool):
        layers = checkpoint_layers_for(source.config, pinned, "--checkpointing")
        policy = _with(policy, gradient_checkpointing=True if layers is None else layers)
    predictor = ModelPredictor(source.config, num_parameters, speed, device=trace_device,
                               context_bytes=context, workspace_bytes=workspace, note=progress, on_card=on_card)

    if budget_bytes is None and gpu is None:
        for card, size in COMMON_CARDS.items():
            if progress:
                progress(f"planning for {card}")
            card_policy = _with(policy, bf16_supported=False) if card in COMMON_CARDS_WITHOUT_BF16 else policy
            if not card_policy.bf16_supported and policy.precision in ("bf16-mixed", "bf16"):
                result.card_plans.append(CardPlan(card, size, None, skipped=(
                    f"not planned: --precision {policy.precision} needs bf16, which these cards lack")))
                continue
            card_predictor = predictor
            if card in COMMON_CARDS_WITHOUT_BF16:  # T4 (7.5) and V100 (7.0): the same SDPA kernels, no flash
                card_predictor = ModelPredictor(source.config, num_parameters, speed, device=trace_device,
                                                context_bytes=context, workspace_bytes=workspace, note=progress,
                                                on_card=attention_fields(policy.attn, "7.0"))
            found = search(
                card_predictor,
                seq_len,
                effective_batch_size,
                size,
                card_policy,
                trial=None,
                explain=False,
                progress=progress,
            )
            if several_machines:
                found.notes.append(network_note(policy, inter_node_gbps))
            result.card_plans.append(CardPlan(card, size, found))
        result.seconds = time.perf_counter() - started
        return result

    if budget_bytes is None:
        assert gpu is not None  # no GPU and no budget returned above
        budget_bytes = gpu.budget_bytes
        budget_label = f"{gpu.name}: {format_bytes(budget_bytes)} usable"
    result.budget_bytes, result.budget_label = budget_bytes, budget_label

    trial = None
    if gpu is not None and verify:
        def run_trial(config: TrainConfig) -> memory.Measurement:
            with emulated_budget(gpu, budget_bytes):
                return measure_trial(source.config, config, steps=trial_steps)

        def trial(config: TrainConfig) -> memory.Measurement:
            assert gpu is not None and budget_bytes is not None
            found, from_cache = cached_trial(source.config, config.replace(**on_card), gpu, budget_bytes, trial_steps,
                                             run_trial, torch_cuda=result.probe.torch_cuda if result.probe else "")
            if from_cache:
                result.cached_trials.append(config)
                if progress:
                    progress(f"{CACHED_TRIAL}: {found.tokens_per_second:,.0f} tokens/s measured, not run again")
            return found

    result.search = search(
        predictor, seq_len, effective_batch_size, budget_bytes, policy, trial=trial, explain=False, progress=progress
    )
    if several_machines:
        result.search.notes.append(network_note(policy, inter_node_gbps))
    for candidate in result.search.candidates:
        if candidate.config in result.cached_trials and candidate.measurement is not None:
            candidate.note = CACHED_TRIAL + (f"; {candidate.note}" if candidate.note else "")
    chosen = result.search.chosen
    if chosen is not None and data is not None:
        result.data = data.with_micro_batch(chosen.config.micro_batch_size)
    if chosen is not None:
        measured = chosen.measurement if chosen.measurement is not None and chosen.measurement.fits else None
        train_config, predicted_total = chosen.config.replace(**on_card), chosen.predicted_total_bytes or 0
        if evaluation:
            train_config, predicted_total = plan_evaluation(
                source.config, train_config, evaluation, budget_bytes - result.search.margin_bytes, predicted_total,
                device=trace_device, context_bytes=context, workspace_bytes=workspace, progress=progress)
        result.plan = Plan(
            model=source.name,
            train_config=train_config,
            budget_bytes=budget_bytes,
            margin_bytes=result.search.margin_bytes,
            predicted_total_bytes=predicted_total,
            predicted_host_bytes=0 if chosen.estimate is None else chosen.estimate.host_bytes,
            predicted_tokens_per_second=chosen.predicted_tokens_per_second,
            measured_peak_reserved_bytes=None if measured is None else measured.peak_reserved_bytes,
            measured_tokens_per_second=None if measured is None else measured.tokens_per_second,
            gpu=gpu.name if gpu else (gpu_name or ""),
            fallbacks=result.search.fallbacks,
            trust_remote_code=source.trust_remote_code,
            packing=data.packing if data is not None else Plan.packing,
        )
        if plan_path is not None:
            result.plan_path = result.plan.save(plan_path)
            if train_config.num_nodes > 1:
                result.launch_files = write_launch_files(result.plan_path.parent, train_config, result.plan_path,
                                                         model_config=source.config)
                result.search.notes.append(launch_note(result.launch_files, result.plan_path))
        if on_chosen is not None:
            on_chosen(chosen_words(result))
        if explain:
            tell = progress or (lambda message: None)
            tell("explaining the choice: predicting it with one thing changed")
            explain_choice(result.search, predictor, policy)
            for alternative in result.search.alternatives:
                fits = "fits" if alternative.fits else "too big"
                tell(f"why this one: {alternative.change}: {format_bytes(alternative.predicted_total_bytes)} "
                     f"({fits}), {alternative.predicted_tokens_per_second:,.0f} tokens/s predicted")
    result.seconds = time.perf_counter() - started
    return result


CACHED_TRIAL = "verified earlier (cached measurement)"
"""A candidate's note, and the choice's line, when its trial measurement came from the disk cache (`cached_trial`)."""


def cached_trial(model_config: Any, config: TrainConfig, gpu: GpuInfo, budget_bytes: int, steps: int,
                 run: Callable[[TrainConfig], memory.Measurement], *,
                 torch_cuda: str = "") -> tuple[memory.Measurement, bool]:
    """The trial measurement of `config` (`run(config)`) and whether it came from the disk cache (`predict.cache`,
    kind "trial") instead of being run: a measurement that fitted is kept there, keyed by the model config, the
    configuration, the GPU's name, total bytes and driver, torch's CUDA version (`torch_cuda`), the budget the trial
    ran under (`budget_bytes`, the emulated cap when it is under the card's, `emulated_budget`), the trial's `steps`
    and, through `cache.fingerprint`, the versions of torch, transformers, peft, bitsandbytes and torchao and
    memtune's own source. A run out of memory is not kept: it runs again. MEMTUNE_NO_CACHE=1 runs every trial."""
    key = cache.key_of("trial", model_config.to_json_string(use_diff=False), config.to_dict(), gpu.name,
                       gpu.total_bytes, gpu.driver_version, torch_cuda, budget_bytes, steps)
    stored = cache.load(key)
    if isinstance(stored, memory.Measurement) and stored.fits:
        return stored, True
    found = run(config)
    if found.fits:
        cache.store(key, found)
    return found, False


def chosen_words(result: FitResult) -> str:
    """The choice in one progress line, told before the explanation is predicted: the configuration, whether trial
    steps verified it (with the measured tokens/s) and where the plan was saved."""
    assert result.search is not None and result.search.chosen is not None
    chosen = result.search.chosen
    measured = chosen.measurement if chosen.measurement is not None and chosen.measurement.fits else None
    how = CACHED_TRIAL if chosen.config in result.cached_trials else "verified"
    verified = (f"{how}, {measured.tokens_per_second:,.0f} tokens/s measured" if chosen.status == VERIFIED
                and measured is not None else f"{chosen.predicted_tokens_per_second:,.0f} tokens/s predicted")
    saved = f"; plan saved to {result.plan_path}" if result.plan_path is not None else ""
    return f"chosen: {chosen.config.describe()} ({verified}){saved}"


def network_note(policy: Policy, inter_node_gbps: float) -> str:
    """The network assumption of a search over several machines, in words (a note of the search)."""
    return (f"tokens/s over {policy.num_nodes} machines of {policy.num_gpus} GPU{'s' * (policy.num_gpus > 1)} assume "
            f"{inter_node_gbps:g} Gb/s of network per machine, one way (an assumption, not measured: "
            "--inter-node-gbps); the per-GPU memory does not depend on it")


def launch_note(files: LaunchFiles, plan_path: Path) -> str:
    """What to fill in and run on each machine, in one line (all of `files.steps` are in its LAUNCH.txt)."""
    machines = len(files.accelerate_configs)
    return (f"launch files for {machines} machines in {files.directory} (every step: {files.instructions.name}): fill "
            f"in main_process_ip ({MAIN_PROCESS_IP}) with the address of machine 0 in each accelerate_machine*.yaml, "
            f"then on each machine R, 0 to {machines - 1}: accelerate launch --config_file "
            f"{files.directory}/accelerate_machine{{R}}.yaml -m memtune run {shlex.quote(str(plan_path.resolve()))} "
            f"(or {files.torchrun_script.name}, or SLURM: {files.sbatch_script.name})")


def traced_seq_len(seq_len: int, data: DataPlan | None) -> int:
    """The sequence length a step is traced and searched at: the worst batch's row length of the training data
    (`DataPlan.row_tokens`: --seq-len for concat, the longest truncated document for none and padding-free, the
    fullest packed row for bfd), else `seq_len` (every batch micro-batch x seq_len, as `memtune run` packs)."""
    return seq_len if data is None else data.row_tokens


def plan_evaluation(
    model_config: Any,
    train_config: TrainConfig,
    evaluation: dict[str, Any],
    usable_bytes: int,
    predicted_total_bytes: int,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    progress: Callable[[str], None] | None = None,
) -> tuple[TrainConfig, int]:
    """The chosen plan with Trainer's evaluation added (`fit --eval-batch-size auto|N`), and the predicted total
    (bytes) of training and evaluation together. `evaluation` holds the TrainConfig eval fields, eval_batch_size
    "auto" to choose it (`predict.evaluation.with_eval_batch`: the largest that fits `usable_bytes`). The search
    itself plans the training step; evaluation runs after it with the same weights and optimizer state, so it is
    predicted for the configuration chosen. A configuration evaluation is not predicted for (FSDP, CPU offload,
    DeepSpeed) keeps no eval fields, with a note. Raises NothingFitsError (exit 3) when evaluation does not fit:
    at eval batch 1 for auto, or at the batch given."""
    from memtune.errors import NothingFitsError
    from memtune.predict.evaluation import estimate_evaluation, with_eval_batch

    fields = dict(evaluation)
    auto = fields.get("eval_batch_size") == "auto"
    if auto:
        fields["eval_batch_size"] = train_config.micro_batch_size
    try:
        config = train_config.replace(**fields)
    except UsageError as error:
        if progress:
            progress(f"note: evaluation is not planned for the chosen {train_config.describe()}: {error}")
        return train_config, predicted_total_bytes
    if auto:
        config = with_eval_batch(model_config, config, usable_bytes, device=device, context_bytes=context_bytes,
                                 workspace_bytes=workspace_bytes)
    found = estimate_evaluation(model_config, config, device=device, usable_bytes=usable_bytes,
                                context_bytes=context_bytes, workspace_bytes=workspace_bytes)
    if found.fits is False:
        raise NothingFitsError(
            f"evaluation at --eval-batch-size {config.eval_batch_size} needs {format_bytes(found.total_bytes)} beside "
            f"the chosen training plan, {format_bytes(usable_bytes)} usable: use --eval-batch-size auto or a smaller "
            "one, or --eval-logits none", shortfall_bytes=found.total_bytes - usable_bytes,
            suggestions=["--eval-batch-size auto", "--eval-logits none"])
    if progress:
        progress(f"evaluation: eval batch {config.eval_batch_size} (logits: {config.eval_logits}), peak "
                 f"{format_bytes(found.total_bytes)} predicted (training's {format_bytes(predicted_total_bytes)}); "
                 "the trial measures the training steps only")
    return config, max(predicted_total_bytes, found.total_bytes)


def nvme_free_bytes(nvme_path: str) -> int:
    """Free bytes on the file system of `nvme_path` (shutil.disk_usage), which DeepSpeed's NVMe offload swaps to.
    Raises UsageError (exit 2) when the path is not an existing directory."""
    path = Path(nvme_path).expanduser()
    if not path.is_dir():
        raise UsageError(f"--nvme-path {nvme_path!r} is not an existing directory: give a directory on a local NVMe "
                         "drive (DeepSpeed swaps the offloaded state into it), e.g. --nvme-path /local_nvme")
    return shutil.disk_usage(path).free


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")
"""Config fields that give a model's longest sequence, in the order transformers' configs use them."""
MAX_SEQ_LEN = 1 << 20
"""Sequences longer than this are refused when the config names no limit of its own (1,048,576 tokens)."""


def check_sequence_length(model_config: Any, seq_len: int) -> None:
    """Raise UsageError when `seq_len` exceeds the positions the model config allows (gpt2: n_positions 1024;
    RoPE models: max_position_embeddings), or MAX_SEQ_LEN when it names none: a plan at that length would
    be refused by `memtune run` (position index out of range) after minutes of tracing."""
    for name in POSITION_FIELDS:
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if seq_len > limit:
                raise UsageError(f"--seq-len {seq_len} is longer than the model allows ({name} = {limit}): "
                                 f"use --seq-len {limit} or less, or a config with more positions")
            return
    if seq_len > MAX_SEQ_LEN:
        raise UsageError(f"--seq-len {seq_len} is over {MAX_SEQ_LEN:,} tokens and the model config names no limit "
                         f"({', '.join(POSITION_FIELDS)}): use a shorter sequence")


def checkpoint_layers_for(model_config: Any, layers: int | None, flag: str) -> int | None:
    """`layers` decoder layers to checkpoint on this model: None (all) for every one of them; UsageError (exit
    2) for more than it has, naming `flag` (--checkpointing, --checkpoint-layers, the plan's field)."""

    total = num_layers_of(model_config)
    if layers is None or not total or layers < total:
        return layers
    if layers == total:
        return None
    every = "--checkpointing" if flag == "--checkpoint-layers" else "--checkpointing on"  # plan's flag, fit's word
    raise UsageError(f"{flag} {layers}: the model has {total} decoder layers; checkpoint at most {total} "
                     f"(all of them: {every})")


def check_adapter_targets(model_config: Any, adapter: Adapter) -> None:
    """Raise UsageError when LoRA `target_modules` (other than "all-linear") match no module of the model,
    by peft's own matching rule (`peft.tuners.tuners_utils.check_target_module_exists`) on the model built
    on the meta device (no memory, no weights). peft itself would fail later, inside the trace, with
    "Target modules ... not found in the base model"."""
    if adapter.kind != "lora" or adapter.target_modules == "all-linear":
        return
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    from memtune.recipe.step import peft_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    lora = peft_config(TrainConfig(seq_len=1, adapter=adapter))
    names = [name for name, _ in model.named_modules() if name]
    if any(check_target_module_exists(lora, name) for name in names):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if name and hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2
                     and not isinstance(module, torch.nn.Embedding)})
    targets = adapter.target_modules if isinstance(adapter.target_modules, str) else ",".join(adapter.target_modules)
    raise UsageError(f"--lora-targets {targets} match no module of this {model_config.model_type} model: "
                     f"its weight matrices are {', '.join(linear)} (or use all-linear)")


def _with(policy: Policy, **changes: Any) -> Policy:
    return dataclasses.replace(policy, **changes)


def _source_of(model_or_name: Any, trust_remote_code: bool = False) -> tuple[ModelSource, int]:
    """A ModelSource and parameter count for a MODEL name/path or a model object the user built."""
    from memtune.sources import resolve, source_parameters

    if isinstance(model_or_name, (str, Path)):
        source = resolve(str(model_or_name), trust_remote_code=trust_remote_code, shapes_only=True)
        return source, source_parameters(source)
    config = getattr(model_or_name, "config", None)
    if config is None or not hasattr(model_or_name, "parameters"):
        raise UsageError(f"auto_fit needs a model name, a local directory or a transformers model object, "
                         f"got {type(model_or_name).__name__}")
    base = model_or_name.get_base_model() if hasattr(model_or_name, "get_base_model") else model_or_name
    name = getattr(config, "_name_or_path", "") or type(base).__name__
    return ModelSource(name=name, config=config, origin="object"), sum(p.numel() for p in base.parameters())


API_SWITCHES = {"--lora": "use_adapter=True", "--no-lora": "use_adapter=False",
                "--prefix": 'adapter=Adapter(kind="prefix")'}
"""The CLI's adapter switches (cli's AdapterChoice) as auto_fit keyword arguments."""
API_KEYWORDS = {  # flag: (the keyword in words, the keyword argument with the value)
    "--seq-len": ("seq_len", "seq_len={}"), "--batch-size": ("batch_size", "batch_size={}"),
    "--budget": ("budget", 'budget="{}"'), "--gpu": ("gpu", 'gpu="{}"'), "--nodes": ("nodes", "nodes={}"),
    "--inter-node-gbps": ("inter_node_gbps", "inter_node_gbps={}"),
    "--lora-rank": ("the adapter's rank", "adapter=Adapter(rank={})"),
    "--lora-targets": ("the adapter's target_modules", 'adapter=Adapter(target_modules="{}")'),
}
"""The CLI's options that are auto_fit's own keywords or `Adapter` fields."""
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*(?: [^\s,;:()]+)?")
"""A flag and the word after it (its value, where it is one)."""


def api_words(message: str) -> str:
    """A UsageError's message in auto_fit's words: each CLI flag it names becomes the keyword argument, with the
    value after it where the flag takes that value ("or choose --optim adamw_torch_fused" -> 'or choose
    optimizer="adamw_torch_fused"', "--no-8bit-optim" -> "allow_8bit_optimizer=False", "--checkpointing on" ->
    "gradient_checkpointing=True"). The Policy flags come from the fields' `Option`s, as the CLI parser's do
    (`config.policy_flags` goes the other way); a word after a flag that is not one of its values stays a word
    ("set --margin to change it" -> "set margin_bytes to change it")."""
    fields = {option_of(f).flag_of(f.name, f.default): f for f in dataclasses.fields(Policy)}

    def keyword(found: re.Match[str]) -> str:
        flag, _, value = found.group().partition(" ")
        rest = f" {value}" if value else ""
        if flag in API_SWITCHES:
            return API_SWITCHES[flag] + rest
        field_ = fields.get(flag)
        if field_ is None and flag in API_KEYWORDS:
            name, with_value = API_KEYWORDS[flag]
            known = value[:1].isdigit() or (flag == "--gpu" and value.lower() in map(str.lower, KNOWN_GPUS))
            return with_value.format(value) if known else name + rest
        if field_ is None:
            return found.group()
        option = option_of(field_)
        if field_.default is True:  # a --no-... switch
            return f"{field_.name}=False{rest}"
        if option.words is not None and value in option.words:
            meaning = option.words[value]
            return f"{field_.name}=" + (f'"{meaning}"' if isinstance(meaning, str) else str(meaning))
        if option.choices is not None and value in option.choices:
            return f"{field_.name}=" + (value if option.parse is int else f'"{value}"')
        if value[:1].isdigit():
            return f"{field_.name}={option.parse(value) if option.parse is parse_bytes else value}"
        return f"{field_.name}{rest}"

    return FLAG.sub(keyword, message)


POLICY_OPTIONS = {f.name for f in dataclasses.fields(Policy)} - {"bf16_supported", "num_gpus"}
POLICY_ALIASES = {"allow_quantized": "allow_quantized_base", "nodes": "num_nodes"}
"""auto_fit keywords that name a Policy field in fewer words (issue 13 asks for allow_quantized=..., issue 15 for
nodes=...)."""


def auto_fit(
    model_or_name: Any,
    seq_len: int = 1024,
    batch_size: int = 8,
    budget: str | int | None = None,
    *,
    gpu: str | None = None,
    verify: bool = True,
    plan_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
    explain: bool = False,
    **policy: Any,
) -> Plan:
    """The fastest plan that fits, for a model name, local directory or model object. Prints nothing.

        plan = memtune.auto_fit("Qwen/Qwen2.5-0.5B", seq_len=1024, batch_size=32)
        model = plan.prepare(model)
        trainer = plan.trainer(model=model, args=plan.training_arguments(output_dir="out"), train_dataset=ds)

    `budget` ("24GiB", or bytes) or `gpu` (a known card name) plans for memory other than the GPU
    here. `policy` takes `Policy` fields (the CLI's flags, named as in `memtune.Policy`): precision="fp32",
    gradient_checkpointing=True, micro_batch_size=4, use_adapter=False (full fine-tuning only),
    allow_offload=False, optimizer="adamw_bnb_8bit" (transformers' optim names), allow_8bit_optimizer=False,
    allow_pure_16bit=False, allow_quantized=False (no QLoRA base; the short name of allow_quantized_base),
    quantized_base=4 (only a 4-bit base, LoRA), strategy="deepspeed" (DeepSpeed ZeRO; with zero_stage=3,
    offload="optimizer" or "parameters", offload_device="nvme" with nvme_path="/local_nvme"; needs the deepspeed
    extra, which the search otherwise tries where installed), margin_bytes=..., min_micro_batch_size=...
    nodes=M plans M machines of num_gpus GPUs each (the batch split over all of them); inter_node_gbps is then the
    network rate of each machine the speed model assumes (Gb/s one way, default 400; not measured), and a plan saved
    at plan_path gets its launch files beside it (`run.launch.write_launch_files`).
    explain=True also predicts the alternatives that explain the choice (after the plan is made: seconds more), each
    told to `progress` in one line; off by default, as the plan does not keep them.
    trust_remote_code=True allows a model name or directory
    whose config is custom code (auto_map): it runs the model's own Python. A model object should not
    be on the GPU yet: its memory would be counted twice. What the libraries warn meanwhile is kept off
    stderr (`quiet_libraries`) and logged at DEBUG on the "memtune.fit" logger. Raises NothingFitsError
    (with the shortfall and suggestions) when no configuration fits.
    """
    from memtune.errors import NothingFitsError

    problems = []
    for alias, name in POLICY_ALIASES.items():
        if alias in policy and name in policy:
            problems.append(f"give {alias} or {name}, not both (the same option)")
        elif alias in policy:
            policy[name] = policy.pop(alias)
    unknown = sorted(set(policy) - POLICY_OPTIONS)
    if unknown:
        problems.append(f"unknown options {unknown}; policy options are {sorted(POLICY_OPTIONS)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if budget is not None and gpu is not None:
        problems.append(f"give budget or gpu, not both (got budget={budget!r}, gpu={gpu!r})")
    if budget is not None and not isinstance(budget, str) and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        problems.append(f"budget must be a quantity such as '24GiB' or a positive number of bytes, got {budget!r}")
    rate = inter_node_gbps
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0 or rate == float("inf"):
        problems.append(f"inter_node_gbps must be a positive rate in Gb/s, got {rate!r}: e.g. 400 (one 400 Gb/s "
                        "InfiniBand or RoCE port per machine)")
    if problems:
        raise UsageError(listed("auto_fit", problems))
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else budget
    if gpu is not None:
        _, budget_bytes = known_gpu(gpu, flag="gpu", budget_flag="budget")
    try:
        with quiet_libraries() as said:
            source, num_parameters = _source_of(model_or_name, trust_remote_code)
            result = fit_model(source, num_parameters, seq_len, batch_size, budget_bytes=budget_bytes,
                               gpu_name=gpu, policy=Policy(**policy), verify=verify, plan_path=plan_path,
                               progress=progress, inter_node_gbps=float(inter_node_gbps), explain=explain)
    except UsageError as error:  # the checks below the API speak the CLI's words: say its keywords instead
        error.args = (api_words(str(error)), *error.args[1:])
        raise
    for line in said:
        logger.debug("while fitting: %s", line)
    if result.plan is not None:
        return result.plan
    search_ = result.search
    if search_ is None:  # no GPU and no budget: say which cards would do
        fitting = [card.card for card in result.card_plans
                   if card.search is not None and card.search.chosen is not None]
        raise UsageError("no GPU is visible and no budget was given: pass budget='24GiB' or gpu='A100-80GB'"
                         + (f" (it would fit on {', '.join(fitting)})" if fitting else ""))
    raise NothingFitsError(
        f"nothing fits {format_bytes(search_.budget_bytes)}: short by {format_bytes(search_.shortfall_bytes)}",
        shortfall_bytes=search_.shortfall_bytes, suggestions=search_.suggestions,
    )


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[list[str]]:
    """Keep what transformers, peft, torch and huggingface_hub print off stderr while `auto_fit` works (it
    promises to print nothing), and give it back as lines: each Python warning once ("FutureWarning:
    ..."), transformers' log records of WARNING and above ("transformers.modeling_utils: ..."). Their
    progress bars (tqdm, e.g. "Loading checkpoint shards") are switched off.

    Everything is put back on leaving, also after an error: the warnings filters and `showwarning`
    (`warnings.catch_warnings`), the handlers of the "transformers" logger and the progress-bar switches
    of transformers and huggingface_hub. The list is complete once the block has ended."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    lines: list[str] = []
    # torchao's import logs each of its C++ extensions built for another torch or GPU, and torch's pytree an
    # enum torchao registers: memtune uses torchao's Python optimizers only
    quieted = {name: logging.getLogger(name).level for name in ("torchao", "torch.utils._pytree")}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.ERROR)
    library_logger = logging.getLogger("transformers")  # transformers' root logger (propagate=False)
    handlers = library_logger.handlers[:]
    bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_disabled = are_progress_bars_disabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded, not shown: each kept once below
        library_logger.handlers = [_Collect(lines)]
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
        try:
            yield lines
        finally:
            library_logger.handlers = handlers
            for name, level in quieted.items():
                logging.getLogger(name).setLevel(level)
            if bars:
                transformers_logging.enable_progress_bar()  # which switches huggingface_hub's on too
            (disable_progress_bars if hub_bars_disabled else enable_progress_bars)()
            seen = set()
            for warning in caught:
                line = f"{warning.category.__name__}: {warning.message}"
                if line not in seen:
                    seen.add(line)
                    lines.append(line)


def plan_configuration(
    source: ModelSource,
    num_parameters: int,
    train_config: TrainConfig,
    budget_bytes: int | None,
    budget_label: str = "",
    *,
    strategy_auto: bool = False,
    trace_device: str | None = None,
    gpu_name: str | None = None,
    policy: Policy = Policy(),
    note: Callable[[str], None] | None = None,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
    data: DataPlan | None = None,
    explain: bool = False,
) -> PlanResult:
    """`memtune plan`: the predicted memory of one configuration and its verdict against `budget_bytes`
    less the policy's margin (`search.verdict.judge`: what `memtune fit` decides for the same
    configuration); None budget: no verdict.

    strategy_auto: with several GPUs, predict DDP and FSDP and keep the faster that fits
    (`search.choose.choose_strategy`); `note` is told why. The throughput model uses the speed of
    `gpu_name` (default H100) and, over several machines (`TrainConfig.num_nodes`), `inter_node_gbps` per machine
    (an assumption, `predict.throughput`), then also reported. Traces on fake tensors: no GPU and no weights are
    needed. `data` (`--data`): the step is traced at the worst batch's row length (`traced_seq_len`) and the result
    records the data's lengths and worst batch at the micro-batch predicted. `explain` (needs a budget): also predict
    the configuration with each technique of the ladder switched the other way (`PlanResult.explanation`), after the
    verdict; raises UsageError without a budget.
    """
    if explain and budget_bytes is None:
        raise UsageError("--explain compares each change against a budget: give --budget or --gpu, or drop --explain")
    train_config = train_config.replace(seq_len=traced_seq_len(train_config.seq_len, data),
                                        packed_rows=data is not None and data.packed_rows)
    check_sequence_length(source.config, train_config.seq_len)
    check_trace_device(trace_device)
    if train_config.adapter is not None:
        check_adapter_targets(source.config, train_config.adapter)
    train_config = train_config.replace(checkpoint_layers=checkpoint_layers_for(
        source.config, train_config.checkpoint_layers, "--checkpoint-layers"))
    speed = throughput.gpu_speed(gpu_name or "H100").scaled(inter_node_bytes_per_second=inter_node_gbps * 1e9 / 8)
    predictor = ModelPredictor(source.config, num_parameters, speed, device=trace_device,
                               note=None if note is None else lambda words: note(words.removeprefix("note: ")))
    margin_bytes = 0 if budget_bytes is None else margin_for(budget_bytes, policy)
    if strategy_auto:
        train_config, estimate, why = choose_strategy(predictor, train_config, budget_bytes, margin_bytes=margin_bytes)
        if why and note is not None:
            note(why)
    else:
        estimate = predictor.memory(train_config)
    if data is not None:  # batches of varying shape fragment the cache over an epoch (predict.epoch)
        estimate = over_an_epoch(source.config, estimate, data.epoch_row_tokens(estimate.config.micro_batch_size),
                                 estimate.trace_device)
    if note is not None and estimate.host_bytes:
        problem = host_problem(estimate.config, estimate, Policy(host_budget_bytes=host_budget_here()), 0)
        if problem:
            note(f"on this machine {problem}: the plan needs a host with more memory, or less offloaded")
    verdict = None if budget_bytes is None else judge(predictor, estimate, budget_bytes, margin_bytes)
    result = PlanResult(source, estimate, budget_label, num_parameters, verdict,
                        tokens_per_second=predictor.tokens_per_second(estimate.config),
                        data=None if data is None else data.with_micro_batch(estimate.config.micro_batch_size))
    if train_config.num_nodes > 1:
        result.inter_node_gbps = inter_node_gbps
    if explain and verdict is not None and budget_bytes is not None:
        result.explanation = plan_explanation(predictor, estimate, verdict, budget_bytes, policy)
    return result


def plan_explanation(predictor: ModelPredictor, estimate_: Estimate, verdict: Verdict, budget_bytes: int,
                     policy: Policy) -> SearchResult:
    """`memtune plan --explain`: the planned configuration as the chosen one of a search of one candidate, with the
    alternatives (`search.choose.explain_choice`: each technique of the ladder switched the other way, pinned ones
    excepted) predicted against `budget_bytes` less the verdict's margin."""
    config = estimate_.config
    planned = Candidate(config, predictor.tokens_per_second(config), estimate=estimate_,
                        status=FITS if verdict.fits else TOO_BIG)
    found = SearchResult(config.seq_len, config.effective_batch_size, budget_bytes, verdict.margin_bytes,
                         candidates=[planned], chosen=planned, estimates=1)
    explain_choice(found, predictor, _with(policy, num_gpus=config.num_gpus, num_nodes=config.num_nodes))
    return found


def host_budget_here() -> int | None:
    """HOST_BUDGET_FRACTION of the memory this machine has available (`measure.probe.host_available_bytes`): what
    pinned host memory a plan may hold here; None where it cannot be read."""
    from memtune.measure.probe import host_available_bytes

    available = host_available_bytes()
    return None if available is None else int(HOST_BUDGET_FRACTION * available)
