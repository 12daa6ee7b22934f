"""The escalation ladder and the choice: the fastest configuration that fits, proven by a trial.

Candidates keep the effective batch the user asked for (micro-batch x accumulation x GPUs) and
vary what costs no quality or little: the micro-batch, mixed precision, gradient checkpointing,
a chunked loss, CPU offload, and over several GPUs how they share the work: a full replica per GPU
(DDP: fastest, no parameter gathering) or FSDP full sharding (a fraction of the model state per GPU),
with CPU offload on top of FSDP. Adapters (LoRA, prefix tuning) change *what* is trained, so they are
tried only when nothing else fits, unless the user asks for them.

How the choice is made, cheaply:
1. Rank every candidate by predicted tokens/s (`throughput`, an analytic model: no tracing).
2. Walk down that ranking and predict memory (`estimate`, a fake-tensor trace) one candidate at
   a time. A candidate that needs at least as much memory as one already too big (a larger
   micro-batch, or one technique fewer, than a failure) is skipped without tracing.
3. The first candidate predicted to fit under budget - margin is, by construction, the fastest
   that fits. With a GPU it is then verified by real trial steps; if the trial runs out of memory
   the walk goes on from there (at most `max_trials` trials).
4. Too close to call: when the next candidate that fits is predicted within the speed model's error band
   (`speed_error_band`) of the verified one, it is verified too and the one measured faster is chosen
   (`measure_both`); without trials the prediction decides.
5. The explanation (the winner with one technique changed, `explain_choice`) comes after the choice: `memtune fit`
   saves the plan first.

Within a family (the same configuration but for the micro-batch), memory is affine in the micro-batch:
after two traced micro-batches the others are extrapolated (`extrapolate`), and a third is traced only where
its extrapolated peak is within the margin of the budget or below (`extrapolation_limit`).

Pure: memory predictions, speed predictions and trials are injected (`Predictor`, `trial`), so the
walk is tested on a CPU with fakes that assert the exact sequence of candidates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from memtune.config import (
    DEFAULT_OPTIMIZER,
    GIB,
    HOST_BUDGET_FRACTION,
    KNOWN_GPUS,
    OFFLOAD_ORDER,
    PAGED_OPTIMIZERS,
    STRATEGIES,
    Policy,
    TrainConfig,
    bitsandbytes_available,
    format_bytes,
    margin_for,
)
from memtune.errors import UsageError, listed
from memtune.measure.memory import Measurement
from memtune.predict.events import DDP_BUCKETS
from memtune.predict.peak import Estimate
from memtune.search import ladder
from memtune.search.verdict import judge

EXTRAPOLATION_SLACK = 1.10
"""A candidate whose memory, extrapolated from the traced micro-batches of the same family (`extrapolate`),
exceeds the usable budget by more than this factor is not traced, where only one micro-batch of the family was
traced (`extrapolation_limit`: with two, the budget itself). Memory is affine in the micro-batch (state is
fixed, activations scale), and the slack covers the allocator's rounding and the cruder one-point figure; a wrong
skip can only cost speed, never a fit that was not checked."""
DEFAULT_SPEED_ERROR_BAND = 0.10
"""The speed model's error band (fraction of tokens/s) where `predict.throughput` names none
(`throughput.SPEED_ERROR_BAND`, when present, is the one used: `speed_error_band`)."""
FIXED_CATEGORIES = ("weights", "gradients", "optimizer", DDP_BUCKETS)
"""Breakdown categories that do not grow with the micro-batch. Not "overhead": it holds the allocator's
fragmentation, which grows with the activations (Mistral-7B, 4-bit base, micro-batch 8: most of its overhead),
besides the workspaces and context, which `extrapolate` adds as fixed."""

# Candidate statuses, in the words the report shows.
NOT_EVALUATED = "not evaluated"
TOO_BIG = "too big"
SKIPPED = "too big (implied)"
STATE_ALONE = "too big (state alone)"
EXTRAPOLATED = "too big (extrapolated)"
FITS = "fits"
TRIAL_OOM = "out of memory in trial"
VERIFIED = "verified"
MEASURED_FASTER = "measured faster"
MEASURED_SLOWER = "measured slower"


class Predictor(Protocol):
    """Memory and speed predictions for one model; `search` calls nothing else. A predictor may also offer
    `state_bytes(config) -> int`, a floor under the peak found without tracing (`predict.bound`): a candidate
    whose floor is over the usable budget is then skipped untraced."""

    def memory(self, config: TrainConfig) -> Estimate: ...

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool: ...

    def tokens_per_second(self, config: TrainConfig) -> float: ...


Trial = Callable[[TrainConfig], Measurement]


@dataclass
class Candidate:
    config: TrainConfig
    predicted_tokens_per_second: float
    estimate: Estimate | None = None
    status: str = NOT_EVALUATED
    note: str = ""
    measurement: Measurement | None = None
    state_bytes: int | None = None
    """Its weights + gradients + optimizer state, where the search skipped it for them (STATE_ALONE)."""

    @property
    def predicted_total_bytes(self) -> int | None:
        return None if self.estimate is None else self.estimate.total_bytes

    @property
    def measured_total_bytes(self) -> int | None:
        if self.measurement is None or self.estimate is None or not self.measurement.fits:
            return None
        return self.measurement.peak_reserved_bytes + self.estimate.workspace_bytes + self.estimate.context_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "description": self.config.describe(),
            "status": self.status,
            "note": self.note,
            "predicted_total_bytes": self.predicted_total_bytes,
            "predicted_tokens_per_second": self.predicted_tokens_per_second,
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "measurement": None if self.measurement is None else self.measurement.to_dict(),
            "measured_total_bytes": self.measured_total_bytes,
        }


@dataclass
class Alternative:
    """The winner with one technique changed: what it would need, save or cost. Explains the choice."""

    change: str
    """In plain words, e.g. "no gradient accumulation (micro-batch 32)", "+ gradient checkpointing"."""
    config: TrainConfig
    predicted_total_bytes: int
    predicted_tokens_per_second: float
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "config": self.config.to_dict(),
            "predicted_total_bytes": self.predicted_total_bytes,
            "predicted_tokens_per_second": self.predicted_tokens_per_second,
            "fits": self.fits,
        }


@dataclass
class SearchResult:
    seq_len: int
    effective_batch_size: int
    budget_bytes: int
    margin_bytes: int
    candidates: list[Candidate] = field(default_factory=list)
    """Every candidate considered, fastest predicted first (per stage: full fine-tuning, then adapters)."""
    chosen: Candidate | None = None
    alternatives: list[Alternative] = field(default_factory=list)
    fallbacks: list[TrainConfig] = field(default_factory=list)
    """Configurations with the same effective batch that need no more memory than the winner, fastest first."""
    measured_both: list[Candidate] = field(default_factory=list)
    """The two candidates verified because their predicted tokens/s were too close to call (`measure_both`), the
    one measured faster first; empty otherwise."""
    trials: int = 0
    trial_ooms: int = 0
    estimates: int = 0
    seconds: float = 0.0
    """Wall time of the whole search, explanation included (once `explain_choice` has run)."""
    explain_seconds: float = 0.0
    """Of which: predicting the alternatives that explain the choice (`explain_choice`, after the choice)."""
    shortfall_bytes: int = 0
    """When nothing fits: how much more than the usable budget the smallest candidate needs."""
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Rungs left out because an optional package is missing (`ladder.skipped`), one line each."""

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.margin_bytes

    @property
    def evaluated(self) -> list[Candidate]:
        return [c for c in self.candidates if c.estimate is not None]

    def smallest_need(self) -> tuple[Candidate, int, bool] | None:
        """(candidate, bytes, whether the bytes are only a floor) of the candidate that needs least: the smallest
        predicted total, or, where nothing was traced, the smallest state alone (STATE_ALONE: weights +
        gradients + optimizer state, a floor under its need). None when nothing was judged."""
        if self.evaluated:
            smallest = min(self.evaluated, key=lambda c: c.predicted_total_bytes or 0)
            return smallest, smallest.predicted_total_bytes or 0, False
        floors = [c for c in self.candidates if c.status == STATE_ALONE and c.state_bytes]
        if not floors:
            return None
        # of equal floors the last (slowest: the smallest micro-batch, checkpointed) needs least beyond its state
        smallest = min(reversed(floors), key=lambda c: c.state_bytes or 0)
        return smallest, smallest.state_bytes or 0, True

    @property
    def throughput_error(self) -> float | None:
        """(predicted - measured) / measured tokens/s of the verified winner."""
        chosen = self.chosen
        if chosen is None or chosen.measurement is None or not chosen.measurement.tokens_per_second:
            return None
        measured = chosen.measurement.tokens_per_second
        return (chosen.predicted_tokens_per_second - measured) / measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "effective_batch_size": self.effective_batch_size,
            "budget_bytes": self.budget_bytes,
            "margin_bytes": self.margin_bytes,
            "usable_bytes": self.usable_bytes,
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates if c.status != NOT_EVALUATED],
            "candidates_not_evaluated": sum(1 for c in self.candidates if c.status == NOT_EVALUATED),
            "alternatives": [a.to_dict() for a in self.alternatives],
            "measured_both": [c.to_dict() for c in self.measured_both],
            "fallbacks": [config.to_dict() for config in self.fallbacks],
            "trials": self.trials,
            "trial_ooms": self.trial_ooms,
            "estimates": self.estimates,
            "seconds": self.seconds,
            "explain_seconds": self.explain_seconds,
            "throughput_error": self.throughput_error,
            "shortfall_bytes": self.shortfall_bytes,
            "suggestions": list(self.suggestions),
            "notes": list(self.notes),
        }


# -- the candidate space -------------------------------------------------------------------------


def needs_at_least(a: TrainConfig, b: TrainConfig) -> bool:
    """True when `a` surely needs at least as much memory as `b`: same model state, a larger or
    equal micro-batch, and no memory-saving technique that `b` lacks.

    Only within one strategy: a DDP replica usually needs far more than FSDP's shards, but not surely
    (FSDP keeps gathered units, prefetch and reduce-scatter buffers on streams of their own, and
    computes in the amp dtype instead of under autocast), so one never implies the other."""
    same = ((a.seq_len, a.weights_dtype, a.amp, a.adapter, a.num_gpus, a.num_nodes, a.strategy, a.zero, a.optimizer,
             a.quantization, a.expandable_segments)
            == (b.seq_len, b.weights_dtype, b.amp, b.adapter, b.num_gpus, b.num_nodes, b.strategy, b.zero, b.optimizer,
                b.quantization, b.expandable_segments))
    return (
        same
        and a.micro_batch_size >= b.micro_batch_size
        and a.checkpointing_rank <= b.checkpointing_rank
        # Liger's loss holds the weight gradient from forward on: not surely below the standard loss for few tokens
        and (a.loss == b.loss or (a.loss == "standard" and b.loss == "chunked"))
        and (b.offload_activations or not a.offload_activations)
        and OFFLOAD_ORDER[a.offload] <= OFFLOAD_ORDER[b.offload]
    )


def stages(policy: Policy) -> list[bool]:
    """Whether each stage trains an adapter: full fine-tuning first, adapters only if needed."""
    if policy.use_adapter is True or policy.quantized_base is not None:  # --qlora BITS implies LoRA
        return [True]
    if policy.use_adapter is False:
        return [False]
    return [False, True]


# -- the walk ------------------------------------------------------------------------------------


def search(
    predictor: Predictor,
    seq_len: int,
    effective_batch_size: int,
    budget_bytes: int,
    policy: Policy = Policy(),
    trial: Trial | None = None,
    explain: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Find the fastest configuration predicted to fit `budget_bytes` - margin, verified by `trial` if given.

    `explain`: predict the alternatives that explain the choice before returning (`explain_choice`); a caller that
    saves the plan first (`fit.fit_model`) passes False and calls `explain_choice` afterwards."""
    started = time.perf_counter()
    policy.validate(effective_batch_size)
    result = SearchResult(seq_len, effective_batch_size, budget_bytes, margin_for(budget_bytes, policy))
    say = progress or (lambda message: None)
    conflicts: list[set[str]] = []
    spaces = [ladder.candidate_space(seq_len, effective_batch_size, policy, with_adapter, conflicts)
              for with_adapter in stages(policy)]
    if not any(spaces):  # pinned options that exclude each other (--optim paged_adamw_8bit --offload parameters)
        every = set.intersection(*conflicts) if conflicts else set()  # what rules out each combination
        reasons = every or set.union(*conflicts) if conflicts else {"no combination of the options can run"}
        raise UsageError(listed("these options cannot run together", sorted(reasons)))
    result.notes = ladder.skipped(policy)  # after the options are known to run: never a note before an error
    for note in result.notes:
        say(note)
    for space in spaces:
        # Within a stage, by `ladder.tier`: fp32 master weights on the GPU, pure 16-bit, then offload; with an
        # adapter, a quantised base last. Inside a tier, state offloaded to NVMe after the CPU (`ladder.storage_rank`),
        # pure 16-bit rounding to nearest after the rest, and 4-bit optimizer state after 8-bit
        # (`ladder.quality_rank`).
        for group in sorted({walk_group(config) for config in space}):
            ranked = [Candidate(config, predictor.tokens_per_second(config))
                      for config in space if walk_group(config) == group]
            ranked.sort(key=lambda candidate: -candidate.predicted_tokens_per_second)  # stable: ties keep order
            result.candidates.extend(ranked)
            state = WalkState()
            result.chosen = _walk(ranked, predictor, result, policy, trial, say, state)
            if result.chosen is not None:
                result.chosen = measure_both(result.chosen, ranked, predictor, result, policy, trial, say, state)
                break
        if result.chosen is not None:
            break
    if result.chosen is not None:
        chosen = result.chosen.config
        result.fallbacks = [c.config for c in result.candidates
                            if c.config != chosen and needs_at_least(chosen, c.config) and c.status != TRIAL_OOM][:4]
    else:
        _explain_shortfall(result, predictor, policy)
    result.seconds = time.perf_counter() - started
    if explain:
        explain_choice(result, predictor, policy)
    return result


def explain_choice(result: SearchResult, predictor: Predictor, policy: Policy = Policy()) -> None:
    """Predict the alternatives that explain the choice (`SearchResult.alternatives`: the winner with each technique
    of the ladder switched the other way) and add their wall time to `result.seconds` and `result.explain_seconds`.
    Nothing to do when nothing was chosen or they were predicted already. Off the critical path: `memtune fit`
    saves and reports the plan before it calls this (`fit.fit_model`); traces the search made are reused."""
    if result.chosen is None or result.alternatives:
        return
    explaining = time.perf_counter()
    result.alternatives = _alternatives(result, predictor, policy)
    seconds = time.perf_counter() - explaining
    result.explain_seconds += seconds
    result.seconds += seconds


def walk_group(config: TrainConfig) -> tuple[int, int, tuple[int, int]]:
    """The order in which `search` walks groups of candidates, each group fastest first: `ladder.tier`, then
    `ladder.storage_rank`, then `ladder.quality_rank`."""
    return ladder.tier(config), ladder.storage_rank(config), ladder.quality_rank(config)


def host_ranks(config: TrainConfig) -> int:
    """Ranks of one machine that each hold the host memory of `Estimate.host_bytes`: every DDP rank pins its own
    offloaded inputs, every DeepSpeed rank its own ZeRO state (`predict.zero_layout.host_bytes` is per rank), every
    FSDP2 rank its offloaded shards (`predict.estimate.fsdp_offload_host_bytes`); 1 otherwise."""
    sharded_offload = config.sharded and config.offload != "none"
    return config.num_gpus if config.replicated or config.deepspeed or sharded_offload else 1


def host_problem(config: TrainConfig, estimate: Estimate, policy: Policy, nvme_bytes: int) -> str:
    """Why `config` cannot run on this machine's host although its GPU memory may fit: the pinned host memory of all
    its ranks over `policy.host_budget_bytes`, or the bytes it swaps to NVMe (`nvme_bytes`, one rank's) over the free
    space at --nvme-path (`policy.nvme_budget_bytes`). "" when neither, or when neither budget is known."""
    host = estimate.host_bytes * host_ranks(config)
    if policy.host_budget_bytes is not None and host > policy.host_budget_bytes:
        what = ("ZeRO's offloaded state needs" if config.deepspeed else
                "FSDP2's offloaded shards (weights, gradients, optimizer state) need" if config.offload != "none" else
                "its offloaded activations need")
        return (f"{what} {format_bytes(host)} of host memory (all ranks), over the "
                f"{format_bytes(policy.host_budget_bytes)} allowed (--host-memory; by default "
                f"{HOST_BUDGET_FRACTION:.0%} of what a GPU machine has available)")
    disk = nvme_bytes * config.num_gpus
    if policy.nvme_budget_bytes is not None and disk > policy.nvme_budget_bytes:
        return (f"its NVMe offload needs {format_bytes(disk)} at {policy.nvme_path} (all ranks), over the "
                f"{format_bytes(policy.nvme_budget_bytes)} free there")
    return ""


def family(config: TrainConfig) -> tuple[TrainConfig, bool]:
    """Configurations that differ only in micro-batch and accumulation. With and without accumulation
    are apart: with it, every gradient is alive while the next micro-batch runs, which changes the
    shape of the peak, not just its size."""
    return config.replace(micro_batch_size=1, grad_accum_steps=1), config.grad_accum_steps > 1


def extrapolate(members: list[Estimate], micro_batch_size: int,
                bytes_of: Callable[[Estimate], int] | None = None) -> tuple[int, str]:
    """Total bytes (or `bytes_of` each estimate, e.g. `allocations_alone`) at another micro-batch of the same family
    (`members`: traced estimates), and where the figure came from in words.

    With two traced micro-batches, the line through the two nearest: memory is affine in the micro-batch
    (the intercept holds the state and whatever does not grow with it, such as a dequantised weight or the
    cuBLAS workspace). With one, the fixed part (FIXED_CATEGORIES + workspaces + context) plus the rest scaled
    by the micro-batch; a constant temporary then scales too, which underestimates a smaller micro-batch (it is
    traced: that costs time, never a fit). Counting the allocator's fragmentation as fixed overestimated one:
    Mistral-7B on a 4-bit base at 4 x 2048 came out at ~19.6 GiB from micro-batch 8, traced at 16.1 GiB."""
    size = bytes_of or (lambda estimate: estimate.total_bytes)
    nearest = sorted(members, key=lambda e: abs(e.config.micro_batch_size - micro_batch_size))[:2]
    if len(nearest) == 2:
        (a, b) = sorted(nearest, key=lambda e: e.config.micro_batch_size)
        slope = (size(b) - size(a)) / (b.config.micro_batch_size - a.config.micro_batch_size)
        return (int(size(a) + slope * (micro_batch_size - a.config.micro_batch_size)),
                f"from micro-batches {a.config.micro_batch_size} and {b.config.micro_batch_size}")
    traced = nearest[0]
    fixed = (sum(traced.breakdown.get(category, 0) for category in FIXED_CATEGORIES)
             + traced.workspace_bytes + traced.context_bytes)
    per_sequence = (size(traced) - fixed) / traced.config.micro_batch_size
    return int(fixed + per_sequence * micro_batch_size), f"from micro-batch {traced.config.micro_batch_size}"


def without_optimizer(estimate: Estimate) -> int:
    """A lower bound of what the same step needs with another optimizer: its total less the optimizer state
    live at its peak (another optimizer changes only that state and the step's own temporaries, and the
    peak of a step that fits with less state is at least the rest)."""
    return estimate.total_bytes - estimate.breakdown.get("optimizer", 0)


def allocations_alone(estimate: Estimate) -> int:
    """Peak allocated + workspaces + context: what no allocator mode lays out in less (reserved >= allocated)."""
    return estimate.peak_allocated_bytes + estimate.workspace_bytes + estimate.context_bytes


def extrapolation_limit(traced_micro_batches: int, result: SearchResult) -> float:
    """Bytes above which a candidate's peak extrapolated from `traced_micro_batches` traced members of its family
    (`extrapolate`) marks it too big untraced. With two or more, the budget: the line through two traced
    micro-batches is trusted, so a third trace is spent only where the figure is within the margin of the budget or
    below (issue 17: "trace two points per family and extrapolate the rest, verified by a third trace only where
    the extrapolated value is within the margin of the budget"). With one, EXTRAPOLATION_SLACK x the usable budget
    (the one-point figure scales a constant temporary too)."""
    if traced_micro_batches >= 2:
        return float(result.budget_bytes)
    return EXTRAPOLATION_SLACK * result.usable_bytes


@dataclass
class WalkState:
    """What a walk over one group of candidates has learnt, kept for a second walk over the rest of the group
    (`measure_both`): the configurations too big, and the estimates traced by family and by configuration."""

    too_big: list[TrainConfig] = field(default_factory=list)
    traced: dict[tuple[TrainConfig, bool], list[Estimate]] = field(default_factory=dict)
    traced_twins: dict[TrainConfig, Estimate] = field(default_factory=dict)


def _walk(ranked: list[Candidate], predictor: Predictor, result: SearchResult, policy: Policy,
          trial: Trial | None, say: Callable[[str], None], state: WalkState) -> Candidate | None:
    too_big, traced, traced_twins = state.too_big, state.traced, state.traced_twins
    state_bytes = getattr(predictor, "state_bytes", None)
    for candidate in ranked:
        config = candidate.config
        implied = next((failed for failed in too_big if needs_at_least(config, failed)), None)
        if implied is not None:
            candidate.status = SKIPPED
            candidate.note = f"needs at least as much as {implied.describe()}"
            continue
        floor = state_bytes(config) if state_bytes is not None else 0
        if floor > result.usable_bytes:
            candidate.status, candidate.state_bytes = STATE_ALONE, floor
            candidate.note = f"its weights, gradients and optimizer state alone need {format_bytes(floor)}"
            continue
        default_allocator = traced_twins.get(config.replace(expandable_segments=False))
        if config.expandable_segments and default_allocator is not None and (
                allocations_alone(default_allocator) > result.usable_bytes):
            candidate.status = SKIPPED
            candidate.note = (f"its allocations alone need {format_bytes(allocations_alone(default_allocator))}, "
                              "whichever the allocator's mode")
            continue
        twin = traced_twins.get(config.replace(optimizer=DEFAULT_OPTIMIZER, stochastic_rounding=False))
        if twin is not None and config.optimizer != DEFAULT_OPTIMIZER and without_optimizer(twin) > result.usable_bytes:
            candidate.status = SKIPPED
            candidate.note = (f"needs more than {format_bytes(without_optimizer(twin))} without any optimizer state "
                              f"(as {twin.config.describe()})")
            continue
        members = traced.get(family(config), [])
        if members:
            extrapolated, source = extrapolate(members, config.micro_batch_size)
            if extrapolated > extrapolation_limit(len(members), result):
                candidate.status = EXTRAPOLATED
                candidate.note = f"~{format_bytes(extrapolated)}, {source}"
                continue
        default_family = family(config.replace(expandable_segments=False))
        defaults = traced.get(default_family, []) if config.expandable_segments else []
        if defaults and not members:  # no trace of its own mode yet: the default mode's allocations bound both
            extrapolated, source = extrapolate(defaults, config.micro_batch_size, allocations_alone)
            if extrapolated > extrapolation_limit(len(defaults), result):
                candidate.status = EXTRAPOLATED
                candidate.note = (f"its allocations alone ~{format_bytes(extrapolated)} whichever the allocator's "
                                  f"mode, {source} of the default allocator")
                continue
        say(f"predicting {config.describe()}")
        candidate.estimate = predictor.memory(config)
        traced.setdefault(family(config), []).append(candidate.estimate)
        traced_twins[config] = candidate.estimate
        result.estimates += 1
        if not judge(predictor, candidate.estimate, result.budget_bytes, result.margin_bytes).fits:
            candidate.status = TOO_BIG
            too_big.append(config)
            continue
        nvme = getattr(predictor, "nvme_bytes", None)
        problem = host_problem(config, candidate.estimate, policy, nvme(config) if nvme is not None else 0)
        if problem:
            candidate.status = TOO_BIG  # for the host, not the GPU: implies nothing about the others
            candidate.note = problem
            continue
        candidate.status = FITS
        steadier = steadier_allocator(candidate, ranked, predictor, result, policy, say)
        if steadier is not None:
            candidate = steadier
        fewer = fewest_checkpointed(candidate, predictor, result, policy, say)
        settle = getattr(predictor, "settled_tokens_per_second", None)
        for fitting in ([fewer] if fewer is not None else []) + [candidate]:
            if settle is not None and config.optimizer in PAGED_OPTIMIZERS:  # its paging charge depends on the room
                assert fitting.estimate is not None
                fitting.predicted_tokens_per_second = settle(fitting.estimate, result.usable_bytes)
            if trial is None:
                return fitting
            unverifiable = not_verifiable(fitting.config, result, policy)
            if unverifiable:
                fitting.note = unverifiable
                return fitting
            if _verify(fitting, trial, result, say):
                return fitting
            too_big.append(fitting.config)
    return None


def not_verifiable(config: TrainConfig, result: SearchResult, policy: Policy) -> str:
    """Why `config` gets no trial steps, as the candidate's note ("not verified: ..."); "" when it can have them."""
    if config.deepspeed:  # measure.verify's trial steps run one process without DeepSpeed
        return "not verified: trial steps do not run DeepSpeed plans yet (memtune run does)"
    if config.trainer != "causal-lm":  # measure.verify's trial steps run memtune's step (recipe.step)
        return ("not verified: trial steps run memtune's causal-LM step, not TRL's; memtune run --trainer "
                f"{config.trainer} runs it")
    if config.num_nodes > 1:  # trial steps run the GPUs of this machine only
        return (f"not verified: trial steps run on this machine, the plan spans "
                f"{config.num_nodes} (its run on them does)")
    if result.trials >= policy.max_trials:
        return f"not verified: the limit of {policy.max_trials} trials was reached"
    return ""


def _verify(fitting: Candidate, trial: Trial, result: SearchResult, say: Callable[[str], None]) -> bool:
    """Run `trial` on a candidate predicted to fit: True (VERIFIED) when it ran within the budget, else False with
    the candidate marked TRIAL_OOM and why in its note (an OOM counted in `result.trial_ooms`)."""
    say(f"trial steps of {fitting.config.describe()}")
    fitting.measurement = trial(fitting.config)
    result.trials += 1
    measured = fitting.measured_total_bytes
    if fitting.measurement.fits and measured is not None and measured <= result.budget_bytes:
        fitting.status = VERIFIED
        return True
    if not fitting.measurement.fits:
        result.trial_ooms += 1
        fitting.note = fitting.measurement.error
    else:
        fitting.note = f"measured {format_bytes(measured or 0)}, over the budget"
    fitting.status = TRIAL_OOM
    return False


def speed_error_band() -> float:
    """The speed model's error band, a fraction of tokens/s: `throughput.SPEED_ERROR_BAND` where the speed model
    states one, else DEFAULT_SPEED_ERROR_BAND. Imported here: the throughput model imports torch (through
    `predict.liger`), which `memtune models` and `--help` do not load (tests/test_startup.py)."""
    from memtune.predict import throughput

    return float(getattr(throughput, "SPEED_ERROR_BAND", DEFAULT_SPEED_ERROR_BAND))


def techniques(config: TrainConfig) -> TrainConfig:
    """`config` without what the walk settles itself once a candidate fits (the allocator's mode, `steadier_allocator`;
    the number of checkpointed layers, `fewest_checkpointed`): two configurations equal here run the same kernels."""
    return config.replace(expandable_segments=False, checkpoint_layers=None)


def measure_both(leader: Candidate, ranked: list[Candidate], predictor: Predictor, result: SearchResult,
                 policy: Policy, trial: Trial | None, say: Callable[[str], None], state: WalkState) -> Candidate:
    """The verified `leader` of the walk, or the next candidate that fits when the two are too close to call and the
    runner-up is measured faster.

    Too close to call: the runner-up (the next candidate of the same group predicted to fit, found by walking on from
    the leader with the same `state`, without trials, among those that differ from it in more than `techniques`) is
    predicted at least (1 - `speed_error_band()`) of the leader's tokens/s. Then it gets trial steps too, within
    `policy.max_trials`, and of the two that ran within the budget the one measured faster is chosen;
    `result.measured_both` holds both, the faster first, and their notes give both figures. Nothing happens without
    `trial`, when the leader is not verified, or when no trial is left: the prediction decides. Nor after a trial ran
    out of memory: the predictions at the budget's edge are then in doubt, and a second measurement is a speed-up
    worth less than another OOM (issue 17's target: 0 OOMs).

    The walk on stops at the first candidate predicted below the band: candidates are ranked fastest first, so it
    traces only candidates within it. Known limitation: trial steps accumulate at most 2 micro-batches
    (`measure.verify.measure`), so a runner-up with more accumulation has its optimizer's share over-counted."""
    if trial is None or leader.status != VERIFIED or result.trials >= policy.max_trials or result.trial_ooms:
        return leader
    floor = (1.0 - speed_error_band()) * leader.predicted_tokens_per_second
    close = [candidate for candidate in ranked
             if candidate.status == NOT_EVALUATED and candidate.predicted_tokens_per_second >= floor
             and techniques(candidate.config) != techniques(leader.config)]
    runner_up = _walk(close, predictor, result, policy, None, say, state) if close else None
    if runner_up is None or runner_up.predicted_tokens_per_second < floor:
        return leader
    unverifiable = not_verifiable(runner_up.config, result, policy)
    if unverifiable or not _verify(runner_up, trial, result, say):
        runner_up.note = runner_up.note or unverifiable
        return leader
    assert leader.measurement is not None and runner_up.measurement is not None
    leader_speed, runner_up_speed = leader.measurement.tokens_per_second, runner_up.measurement.tokens_per_second
    faster, slower = (runner_up, leader) if runner_up_speed > leader_speed else (leader, runner_up)  # a tie: leader
    result.measured_both = [faster, slower]
    band = speed_error_band()
    for one, other, word in ((faster, slower, MEASURED_FASTER), (slower, faster, MEASURED_SLOWER)):
        assert one.measurement is not None and other.measurement is not None
        one.note = (f"{word}: {one.measurement.tokens_per_second:,.0f} tokens/s measured, "
                    f"{other.measurement.tokens_per_second:,.0f} for {other.config.describe()} (predicted "
                    f"{one.predicted_tokens_per_second:,.0f} and {other.predicted_tokens_per_second:,.0f}, within the "
                    f"speed model's {band:.0%})")
    return faster


def steadier_allocator(candidate: Candidate, ranked: list[Candidate], predictor: Predictor, result: SearchResult,
                       policy: Policy, say: Callable[[str], None]) -> Candidate | None:
    """The same configuration with expandable segments, when the candidate (the default allocator) fits only because
    the allocator would release its cache under pressure and the expandable twin fits without (`ladder.AllocatorMode`):
    the same speed, without the releases (each a synchronising cudaFree and a retry) and without the least certain
    kind of fit (`fewest_checkpointed` says why). None otherwise, or when the policy pins the mode."""
    config = candidate.config
    estimate = candidate.estimate
    if (policy.expandable_segments is not None or config.expandable_segments or estimate is None
            or estimate.total_bytes <= result.usable_bytes):
        return None
    twin = next((c for c in ranked if c.config == config.replace(expandable_segments=True)), None)
    if twin is None or twin.status != NOT_EVALUATED:
        return None
    say(f"predicting {twin.config.describe()}")
    twin.estimate = predictor.memory(twin.config)
    result.estimates += 1
    if twin.estimate.total_bytes > result.usable_bytes:
        twin.status, twin.note = TOO_BIG, "needs the allocator to release its cache too"
        return None
    twin.status = FITS
    twin.note = "fits without the allocator releasing its cache, where the default allocator needs it"
    candidate.note = (f"fits only by releasing the allocator's cache (peak {format_bytes(estimate.total_bytes)} "
                      "without); expandable segments fit without")
    return twin


def fewest_checkpointed(candidate: Candidate, predictor: Predictor, result: SearchResult, policy: Policy,
                        say: Callable[[str], None]) -> Candidate | None:
    """For a fitting candidate that checkpoints every decoder layer, the same with the fewest layers that still
    fit (the first k of L, `TrainConfig.checkpoint_layers`), as a new candidate listed just before it; None when
    checkpointing is pinned, the candidate does not checkpoint every layer, its model has under 2 layers, it
    runs under FSDP (not modelled), or only every layer fits.

    The walk reaches a checkpointed candidate only after the same without checkpointing was found too big (it is
    faster, so ranked first): k = 0 is too big and k = L fits. Memory falls with every checkpointed layer, so a
    search finds the fewest, most predictions from one trace (`single.partial_events`): first where the line through
    k = 0 (the walk traced it) and k = L crosses the budget (`interpolated_layers`: memory is affine in k), then
    steps of 1, 2, 4 ... from there until the answer flips, then a bisection; a good guess is settled in 2
    predictions instead of log2(L). Speed falls with every recomputed layer, so it is also the fastest of them.

    A k counts as fitting only when its predicted peak, without the allocator releasing its cache, stays under the
    usable budget (`Estimate.total_bytes`), stricter than `judge`, which lets a step fit by releasing it: the
    bisection lands at the budget's edge by design, and there a step that fits only by releasing its cache is
    the least certain prediction (H200, Gemma-2-2B 16 x 1024 bf16-mixed, chunked loss, 64 GiB: 18 of 26 layers,
    predicted 70.1 GiB uncapped, passed a 2-step trial with 2 cache releases and ran out of memory in a 3-step
    run, benchmarks/results/partial_search_gemma2_64gib_edge_h200.json)."""
    config = candidate.config
    num_layers = int(getattr(predictor, "num_layers", 0) or 0)
    if (policy.gradient_checkpointing is not None or not config.gradient_checkpointing
            or config.checkpoint_layers is not None or num_layers < 2 or config.sharded):
        return None
    low, high, fitting = 0, num_layers, None
    assert candidate.estimate is not None
    points = {num_layers: candidate.estimate.total_bytes}
    try:
        plain = None if config.offload_activations else config.replace(gradient_checkpointing=False,
                                                                       checkpoint_layers=None)
    except UsageError:  # a combination that needs checkpointing
        plain = None
    none = next((c.estimate for c in result.candidates if c.estimate is not None and c.config == plain), None)
    if none is not None:  # the same without checkpointing, traced by the walk before (too big)
        points[0] = none.total_bytes
    guess = interpolated_layers(points, low, high, result.usable_bytes)
    middle = (low + high) // 2 if guess is None else guess
    step, galloping, last = 1, guess is not None, None  # without a guess: a plain bisection
    while high - low > 1:
        trying = config.replace(checkpoint_layers=middle)
        say(f"predicting {trying.describe()}")
        estimate = predictor.memory(trying)
        result.estimates += 1
        points[middle] = estimate.total_bytes
        fits = (estimate.total_bytes <= result.usable_bytes
                and judge(predictor, estimate, result.budget_bytes, result.margin_bytes).fits)
        if fits:
            high, fitting = middle, estimate
        else:
            low = middle
        # from the guess, steps of 1, 2, 4 ... towards the other side until the answer flips, then bisect: a good
        # guess is settled by its neighbour, a poor one costs about twice log2 of its error
        galloping = galloping and last in (None, fits)
        if galloping:
            step = 1 if last is None else 2 * step
            middle = max(high - step, low + 1) if fits else min(low + step, high - 1)
        else:
            middle = (low + high) // 2
        last = fits
    if fitting is None:
        return None
    fewer = Candidate(fitting.config, predictor.tokens_per_second(fitting.config), status=FITS, estimate=fitting)
    fewer.note = (f"checkpoints {high} of the {num_layers} layers: the fewest that fit ({high - 1} did not), so "
                  "the fewest recomputed")
    candidate.note = f"fits, but checkpointing {high} of its {num_layers} layers fits too and recomputes less"
    # at its rank by speed (the table lists the fastest first): among the faster ones found too big, before this one
    at = result.candidates.index(candidate)
    while at > 0 and result.candidates[at - 1].predicted_tokens_per_second < fewer.predicted_tokens_per_second:
        at -= 1
    result.candidates.insert(at, fewer)
    return fewer


def interpolated_layers(points: dict[int, int], low: int, high: int, usable_bytes: int) -> int | None:
    """The number of checkpointed layers `fewest_checkpointed` predicts first in (low, high): where the line through
    the two known points (layers -> predicted total bytes) nearest the budget crosses `usable_bytes`, rounded up
    (memory falls with each layer checkpointed: the first that fits) and kept inside the interval. None without two
    points or a falling line: bisect. Memory is affine in the layers checkpointed (each one keeps its input instead
    of its activations, `single.partial_events`), so the guess and its neighbour usually settle it: 2 predictions
    instead of log2(L) (Qwen3-1.7B's 28 layers: 5)."""
    known = sorted(points, key=lambda layers: (abs(points[layers] - usable_bytes), layers))[:2]
    if len(known) < 2:
        return None
    (a, b) = sorted(known)
    slope = (points[b] - points[a]) / (b - a)
    if slope >= 0:
        return None
    crossing = a + (usable_bytes - points[a]) / slope
    return min(high - 1, max(low + 1, math.ceil(crossing)))


def _predict(predictor: Predictor, result: SearchResult, config: TrainConfig) -> Estimate:
    for candidate in result.candidates:
        if candidate.config == config and candidate.estimate is not None:
            return candidate.estimate
    result.estimates += 1
    return predictor.memory(config)


def _alternatives(result: SearchResult, predictor: Predictor, policy: Policy) -> list[Alternative]:
    """The winner with each technique of the ladder switched the other way (pinned ones excepted)."""
    assert result.chosen is not None
    found = []
    for change, config in ladder.alternatives(result.chosen.config, policy, result.effective_batch_size):
        try:
            estimate = _predict(predictor, result, config)
        except UsageError as error:  # an alternative that cannot be traced explains less; the choice stands
            result.notes.append(f"the alternative '{change}' was not predicted: {str(error).splitlines()[0][:200]}")
            continue
        found.append(Alternative(change, config, estimate.total_bytes, predictor.tokens_per_second(config),
                                 judge(predictor, estimate, result.budget_bytes, result.margin_bytes).fits))
    return found


def _explain_shortfall(result: SearchResult, predictor: Predictor, policy: Policy) -> None:
    """Nothing fits: how far off the smallest candidate is, and what would fit instead. When none was traced
    (the state alone of each is over the budget), the smallest state stands for it: a floor, said as one."""
    found = result.smallest_need()
    if found is None:
        return
    smallest, smallest_bytes, floor = found
    need = smallest_bytes + result.margin_bytes
    result.shortfall_bytes = max(0, need - result.budget_bytes)
    cards = [name for name, size in sorted(KNOWN_GPUS.items(), key=lambda item: item[1])
             if size - margin_for(size, policy) >= smallest_bytes]
    if floor:  # only a lower bound: no card is named that was not checked
        result.suggestions.append(
            f"a GPU with well over {format_bytes(need)} (the state alone; check a card with --gpu NAME) "
            f"for {smallest.config.describe()}"
        )
    elif cards:
        result.suggestions.append(
            f"a GPU with {format_bytes(need)} or more (e.g. {cards[0]}) with {smallest.config.describe()}"
        )
    else:
        result.suggestions.append(
            f"{format_bytes(need)} is more than any single card: shard over several GPUs (FSDP, --gpus N, and over "
            "several machines --nodes M)"
        )
    if policy.use_adapter is False:
        result.suggestions.append("allow LoRA (drop --no-lora / --full-finetune-only)")
    if not policy.allow_quantized_base and bitsandbytes_available() and ladder.world_size(policy) == 1:
        result.suggestions.append("allow a 4-bit or 8-bit base under LoRA (drop --no-qlora)")
    if not policy.allow_offload:
        result.suggestions.append("allow CPU offload (drop --no-offload): slower, but the state moves to the host")
    if floor:
        return  # a shorter sequence does not shrink the state
    config = smallest.config
    for divisor in (2, 4):
        shorter = config.replace(seq_len=max(1, config.seq_len // divisor))
        estimate = _predict(predictor, result, shorter)
        if judge(predictor, estimate, result.budget_bytes, result.margin_bytes).fits:
            result.suggestions.append(
                f"a shorter sequence: --seq-len {shorter.seq_len} fits ({format_bytes(estimate.total_bytes)})"
            )
            break
    if result.shortfall_bytes <= result.margin_bytes:  # a smaller margin can close it
        result.suggestions.append(f"the whole budget: it is {format_bytes(result.budget_bytes)}, with a margin of "
                                  f"{format_bytes(result.margin_bytes)} (set --margin to change it)")


# -- one configuration, either strategy (memtune plan --strategy auto) ------------------------------


def choose_strategy(predictor: Predictor, config: TrainConfig, budget_bytes: int | None, *,
                    margin_bytes: int) -> tuple[TrainConfig, Estimate, str]:
    """Of DDP and FSDP for `config` (several GPUs of the job, `TrainConfig.world_size`: also one GPU on each of several
    machines; no offload, standard loss), the faster predicted one
    that fits `budget_bytes` less `margin_bytes` (`verdict.judge`); FSDP when neither fits or no budget is
    given (then DDP is not predicted).
    Returns the configuration, its estimate, and why it was chosen in words ("" when there was no choice)."""
    if config.world_size < 2 or config.offload != "none" or config.loss != "standard":
        return config, predictor.memory(config), ""
    fsdp = config.replace(strategy="fsdp")
    if budget_bytes is None:
        return (
            fsdp,
            predictor.memory(fsdp),
            "strategy auto: FSDP, as no budget says whether a replica per GPU (DDP) fits",
        )
    options = [config.replace(strategy=strategy) for strategy in STRATEGIES]
    estimates = {option: predictor.memory(option) for option in options}
    speeds = {option: predictor.tokens_per_second(option) for option in options}
    fitting = [option for option in options if judge(predictor, estimates[option], budget_bytes, margin_bytes).fits]
    chosen = max(fitting, key=lambda option: speeds[option]) if fitting else fsdp
    words = ", ".join(f"{option.strategy.upper()} {format_bytes(estimates[option].total_bytes)} per GPU "
                      f"({'fits' if option in fitting else 'too big'}), {speeds[option]:,.0f} tokens/s predicted"
                      for option in options)
    why = "the faster that fits" if fitting else "neither fits, FSDP as by default"
    return chosen, estimates[chosen], f"strategy auto: {chosen.strategy.upper()}, {why} ({words})"


# -- planning for cards that are not here --------------------------------------------------------

COMMON_CARDS_WITHOUT_BF16 = frozenset({"16 GiB (T4, V100-16GB)"})
"""Common card sizes whose cards lack bf16 (T4: compute capability 7.5, V100: 7.0): planned in fp16 or fp32."""
COMMON_CARDS = {
    "16 GiB (T4, V100-16GB)": 16 * GIB,
    "24 GiB (RTX 4090, A10, L4)": 24 * GIB,
    "40 GiB (A100-40GB)": 40 * GIB,
    "48 GiB (L40S, A6000)": 48 * GIB,
    "80 GiB (A100-80GB, H100)": 80 * GIB,
}
