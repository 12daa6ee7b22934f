"""The DeepSpeed ZeRO memory model (predict/zero.py, zero_layout.py, zero_gather.py): its model states against the
memo's formulas on a tiny Llama, the order of the stages, offload, the IPG bucket, gradient accumulation, LoRA,
the ZeRO-3 coordinator replica, and the 1 x H200 probe's measured peaks reproduced from the rules alone
(docs/deepspeed-zero.md §6)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from benchmarks.cases import tiny_llama
from memtune.config import TrainConfig, Zero
from memtune.errors import UsageError
from memtune.predict import zero, zero_gather, zero_layout
from memtune.predict.estimate import estimate
from memtune.predict.events import Category, Event, rounded

MIB = 1 << 20
WEIGHTS, GRADIENTS, OPTIMIZER = Category.WEIGHTS.value, Category.GRADIENTS.value, Category.OPTIMIZER.value
STATE_KEYS = (WEIGHTS, GRADIENTS, OPTIMIZER, zero_layout.ZERO_BUCKETS)


def deepspeed_config(stage: int, num_gpus: int = 1, offload: str = "none", **knobs: object) -> TrainConfig:
    return TrainConfig(seq_len=16, micro_batch_size=2, amp="bf16", strategy="deepspeed", num_gpus=num_gpus,
                       offload=offload, zero=Zero(stage=stage, **knobs))  # type: ignore[arg-type]


def live_by_category(events: list[Event], categories: dict[Hashable, str]) -> dict[str, int]:
    """Bytes still allocated at the end of the events, by breakdown key."""
    live: dict[Hashable, tuple[str, int]] = {}
    for event in events:
        if event.kind == "alloc":
            category = categories.get(event.source, Category.TEMPORARIES)
            live[event.storage] = (getattr(category, "value", category), event.num_bytes)
        else:
            live.pop(event.storage, None)
    totals: dict[str, int] = {}
    for category, size in live.values():
        totals[category] = totals.get(category, 0) + size
    return totals


def category_peak(events: list[Event], categories: dict[Hashable, str], *keys: str) -> int:
    """The most bytes of the breakdown keys `keys` alive at once."""
    live, peak, sizes = 0, 0, {}
    for event in events:
        category = getattr(categories.get(event.source), "value", categories.get(event.source))
        if event.kind == "alloc" and category in keys:
            sizes[event.storage] = event.num_bytes
            live += event.num_bytes
            peak = max(peak, live)
        elif event.kind == "free":
            live -= sizes.pop(event.storage, 0)
    return peak


def power_of_two(num_bytes: int) -> int:
    """The smallest power of two >= num_bytes (torch's pinned host allocator rounds each request to it)."""
    size = 1
    while size < num_bytes:
        size *= 2
    return size


def test_pinned_buffers_round_up_to_a_power_of_two():
    assert [zero_layout.pinned_bytes(n) for n in (0, 1, 4096, 4097, 3 * 2**30)] == [0, 1, 4096, 8192, 4 * 2**30]


def parameter_counts(model_config) -> tuple[list[int], int]:
    """(every parameter's numel, the largest), counted on a meta model built here with transformers itself."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    numels = [p.numel() for p in model.parameters()]
    return numels, max(numels)


def memo_states(numels: list[int], stage: int, num_gpus: int, offload: str, bucket_elements: int) -> dict[str, int]:
    """The memo's persistent GPU model states of one rank after a step (§2.1 / §2.2), from parameter counts: ZeRO-1/2
    `T*b` flat (padded to 2N) + `4T/N` master + 2 x `4T/N` Adam, or `L*b` staging under offload; ZeRO-3 `b*P/N`
    partitions (none under parameter offload), `rbs*b` IPG, `b*T/N` gradient partitions + `12T/N` unless offloaded."""
    total, b = sum(numels), 2
    part = -(-total // num_gpus)
    if stage in (1, 2):
        flat = -(-total // (2 * num_gpus)) * 2 * num_gpus * b
        if offload != "none":
            return {WEIGHTS: rounded(flat), GRADIENTS: rounded(max(numels) * b)}
        return {WEIGHTS: rounded(flat), OPTIMIZER: 3 * rounded(4 * part)}
    states = {zero_layout.ZERO_BUCKETS: rounded(bucket_elements * b)}
    if offload != "parameters":
        states[WEIGHTS] = rounded(sum(-(-n // num_gpus) * b for n in numels))
    if offload == "none":
        states[GRADIENTS] = rounded(b * part)
        states[OPTIMIZER] = 3 * rounded(4 * part)
    return states


CASES = [(stage, offload) for stage in (1, 2, 3) for offload in ("none", "optimizer", "parameters")
         if offload != "parameters" or stage == 3]


@pytest.mark.parametrize("num_gpus", [1, 2])
@pytest.mark.parametrize(("stage", "offload"), CASES)
def test_model_states_are_the_memos_formulas(stage, offload, num_gpus):
    """After two steps, what a rank still holds of each model state is the memo's formula from the parameter counts."""
    model_config = tiny_llama()
    config = deepspeed_config(stage, num_gpus, offload)
    events, categories, _, _, knobs = zero.zero_step_events(model_config, config, "cpu")
    held = {key: size for key, size in live_by_category(events, categories).items() if key in STATE_KEYS}
    numels, _ = parameter_counts(model_config)
    assert knobs.reduce_bucket_elements == model_config.hidden_size ** 2  # transformers' "auto"
    assert held == memo_states(numels, stage, num_gpus, offload, knobs.reduce_bucket_elements)


def test_stages_at_two_gpus_hold_less_in_turn():
    """At N=2, the most model states (weights, gradients, optimizer, buckets) a rank holds at once: ZeRO-3 less than
    ZeRO-2 (its parameters partitioned; at rest its b*P/N parameters + b*T/N gradient partitions + IPG equal ZeRO-2's
    b*T flat parameters + IPG, but ZeRO-2 adds grads_in_partition from the first flush to the step); ZeRO-1 as much
    as ZeRO-2 (both peak in the step), but it keeps every autograd gradient until backward ends: more gradients."""
    model_config = tiny_llama()
    states, gradients = {}, {}
    for stage in (1, 2, 3):
        events, categories, *_ = zero.zero_step_events(
            model_config, deepspeed_config(stage, 2, reduce_bucket_size=4096, overlap_comm=False), "cpu")
        states[stage] = category_peak(events, categories, *STATE_KEYS)
        gradients[stage] = category_peak(events, categories, GRADIENTS)
    numels, _ = parameter_counts(model_config)
    assert states[3] < states[2] == states[1]
    assert states[2] - states[3] > sum(numels) // 2  # about b*T/N minus the IPG bucket
    assert gradients[2] < gradients[1]
    assert gradients[1] - gradients[2] > sum(numels)  # most of the bf16 gradients (2 bytes each) at once


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_moves_the_optimizer_to_the_host(stage):
    """Optimizer offload takes master + Adam (12T/N) off the GPU and puts the memo's host formula in host_bytes:
    (16+b)T/N, with the L*b staging buffer for ZeRO-1/2, each pinned buffer rounded up to a power of two as torch's
    host allocator does (ZeRO-1/2 pin master, gradient, bf16 staging and L*b; ZeRO-3 the fp32 gradient and the bf16
    gradient partitions)."""
    model_config = tiny_llama()
    numels, largest = parameter_counts(model_config)
    part = -(-sum(numels) // 2)
    on_gpu = estimate(model_config, deepspeed_config(stage, 2), device="cpu")
    offloaded = estimate(model_config, deepspeed_config(stage, 2, "optimizer"), device="cpu")
    assert on_gpu.host_bytes == 0
    if stage < 3:
        expected = 8 * part + 2 * power_of_two(4 * part) + power_of_two(2 * part) + power_of_two(2 * largest)
    else:
        expected = 12 * part + power_of_two(4 * part) + power_of_two(2 * part)
    assert offloaded.host_bytes == expected
    assert expected >= (16 + 2) * part  # the memo's unrounded formula is the floor
    events, categories, *_ = zero.zero_step_events(model_config, deepspeed_config(stage, 2, "optimizer"), "cpu")
    assert OPTIMIZER not in live_by_category(events, categories)
    assert category_peak(events, categories, OPTIMIZER) == 0  # no GPU allocation in the offloaded step


@pytest.mark.parametrize(("stage", "overlap", "buckets"), [(1, False, 1), (2, False, 1), (2, True, 2), (3, True, 1),
                                                            (3, False, 1)])
def test_ipg_bucket_follows_reduce_bucket_size(stage, overlap, buckets):
    """The IPG bucket is reduce_bucket_size x b bytes (elements, not bytes), doubled by overlap_comm for ZeRO-1/2
    only; the reduce-scatter's cat copy of a bucket adds at most one more under ZeRO-3."""
    model_config = tiny_llama()
    for elements in (4096, 20000):
        events, categories, *_ = zero.zero_step_events(
            model_config, deepspeed_config(stage, 2, reduce_bucket_size=elements, overlap_comm=overlap), "cpu")
        peak = category_peak(events, categories, zero_layout.ZERO_BUCKETS)
        if stage < 3:
            assert peak == buckets * rounded(elements * 2)
        else:
            assert rounded(elements * 2) < peak <= 2 * rounded(elements * 2)
            assert live_by_category(events, categories)[zero_layout.ZERO_BUCKETS] == rounded(elements * 2)


def test_estimate_dispatches_deepspeed_to_zero():
    model_config = tiny_llama()
    config = deepspeed_config(3, 2, "optimizer")
    assert estimate(model_config, config, device="cpu").to_dict() | {"seconds": 0} == \
        zero.estimate_zero(model_config, config, device="cpu").to_dict() | {"seconds": 0}
    with pytest.raises(UsageError, match="strategy 'deepspeed'"):
        zero.estimate_zero(model_config, TrainConfig(seq_len=16), device="cpu")


# ---- ZeRO-3's coordinator ------------------------------------------------------------------------------------

def three_layers() -> zero_layout.ZeroLayout:
    params = tuple(zero_layout.ZeroParam(1000, 2, True) for _ in range(3)) + (zero_layout.ZeroParam(10, 2, True),)
    modules = tuple(zero_layout.ZeroModule(i, (i,)) for i in range(3)) + (zero_layout.ZeroModule(2, (3,)),)
    return zero_layout.ZeroLayout(params, 2, 2, modules)


def test_first_step_releases_every_module_and_later_steps_keep_reused_ones():
    """Step 1 (no recorded trace) releases each module's parameters after it; from step 2 a parameter used again
    within max_reuse_distance elements stays gathered (the forward's layers into backward); the small one persists."""
    layout, visits = three_layers(), [0, 1, 2, 3, 3, 2, 1, 0]
    knobs = zero_layout.ZeroKnobs(stage=3, prefetch_bucket_elements=0, param_persistence_threshold=10)
    available: set[int] = set()
    persistent = zero_layout.persistent_params(layout, knobs)
    first = zero_gather.gather_schedule(layout, knobs, visits, available, persistent, complete_trace=False)
    assert [v.released for v in first] == [[0], [1], [2], [], [], [2], [1], [0]]
    assert available == {3}
    second = zero_gather.gather_schedule(layout, knobs, visits, available, persistent, complete_trace=True)
    assert [v.released for v in second][:3] == [[], [], []]  # all reused in backward within 1e9 elements
    assert [v.gathered for v in second][3:] == [[], [], [], [], []]
    near = zero_layout.ZeroKnobs(stage=3, prefetch_bucket_elements=0, param_persistence_threshold=10,
                                 max_reuse_distance=1500)
    third = zero_gather.gather_schedule(layout, near, visits, set(persistent), persistent, complete_trace=True)
    assert [v.released for v in third][:3] == [[0], [1], []]  # only layer 2 is used again within 1500 elements


def test_prefetch_is_capped_by_the_prefetch_bucket_and_max_live():
    layout, visits = three_layers(), [0, 1, 2, 2, 1, 0]
    prefetch = zero_layout.ZeroKnobs(stage=3, prefetch_bucket_elements=1500, param_persistence_threshold=0,
                              max_reuse_distance=0)
    plan = zero_gather.gather_schedule(layout, prefetch, visits, set(), set(), complete_trace=True)
    assert plan[0].gathered == [[0], [1, 2]]  # prefetch stops once it holds >= 1500 elements
    capped = zero_layout.ZeroKnobs(stage=3, prefetch_bucket_elements=1500, param_persistence_threshold=0,
                            max_reuse_distance=0, max_live_parameters=1000)
    assert zero_gather.gather_schedule(layout, capped, visits, set(), set(), complete_trace=True)[0].gathered == [[0]]


# ---- the 1 x H200 probe (memo §6), from the rules alone ---------------------------------------------------------

PROBE_ELEMENTS = 4096 * 4096
"""The probe's model: 8 x Linear(4096, 4096, bias=False), bf16, batch 8 x 4096, N = 1, 3 steps."""
PROBE_LAYERS = 8
PROBE_ACTIVATION_BYTES = 8 * 4096 * 2
WORKSPACE_MIB = 64.0
"""Allocated from the first backward on in every probe run: two 32 MiB cuBLAS workspaces (memo §6, inferred there);
memtune counts them in workspace_bytes, outside the events, so they are added to the prediction here."""

# Measured on 1 x H200 (torch 2.11, DeepSpeed 0.19.8) by benchmarks/deepspeed_probe.py, copied from the RESULT lines
# of benchmarks/results/deepspeed_probe_h200.txt (MiB): allocated after init, then the second step's backward peak and
# optimizer-step peak (`phases` bwd_end_peak[1] and step_end_peak[1]).
PROBE_MEASURED = {
    "z1": (768.0, 3066.1, 2880.1),
    "z1_rb5e7": (768.0, 2399.4, 2880.1),
    "z2": (768.0, 3066.1, 2880.1),
    "z2_rb5e7": (768.0, 2239.8, 2880.1),
    "z2_overlap_rb5e7": (768.0, 2335.2, 2880.1),
    "z2_cpuopt": (288.0, 1434.1, 352.1),
    "z2_cpuopt_rb5e7": (288.0, 607.8, 352.1),
    "z3": (1978.0, 3322.1, 3834.1),
    "z3_rb5e7_pf5e6": (1119.4, 2303.7, 2975.4),
    "z3_cpuopt": (1210.0, 1690.1, 1274.1),
    "z3_cpuopt_rb5e7": (352.0, 672.4, 416.1),
    "z3_cpu_both": (954.0, 1466.1, 1018.1),
    "z3_cpu_both_rb5e7": (96.0, 608.4, 160.1),
}
PROBE_KNOBS = {
    "z1": dict(stage=1), "z1_rb5e7": dict(stage=1, reduce_bucket_elements=50_000_000),
    "z2": dict(stage=2), "z2_rb5e7": dict(stage=2, reduce_bucket_elements=50_000_000),
    "z2_overlap_rb5e7": dict(stage=2, reduce_bucket_elements=50_000_000, overlap_comm=True),
    "z2_cpuopt": dict(stage=2, offload_optimizer="cpu"),
    "z2_cpuopt_rb5e7": dict(stage=2, offload_optimizer="cpu", reduce_bucket_elements=50_000_000),
    "z3": dict(stage=3),
    "z3_rb5e7_pf5e6": dict(stage=3, reduce_bucket_elements=50_000_000, prefetch_bucket_elements=5_000_000),
    "z3_cpuopt": dict(stage=3, offload_optimizer="cpu"),
    "z3_cpuopt_rb5e7": dict(stage=3, offload_optimizer="cpu", reduce_bucket_elements=50_000_000),
    "z3_cpu_both": dict(stage=3, offload_optimizer="cpu", offload_parameters="cpu"),
    "z3_cpu_both_rb5e7": dict(stage=3, offload_optimizer="cpu", offload_parameters="cpu",
                              reduce_bucket_elements=50_000_000),
}


def probe_trace(steps: int = 2) -> tuple[list[Event], dict[Hashable, str]]:
    """What the single-GPU trace of the probe's step looks like: 8 bf16 weights; per step the input and one
    activation per layer, backward producing each layer's weight gradient and input gradient in reverse, a marker
    allocation at backward's end, Adam's state in the first step, the gradients freed by zero_grad."""
    events: list[Event] = []
    categories: dict[Hashable, str] = {}

    def alloc(key: Hashable, size: int, category: Category, layer: int = -1) -> None:
        categories[key] = category.value
        events.append(Event.alloc(key, size, layer))

    for i in range(PROBE_LAYERS):
        alloc(("weight", i), 2 * PROBE_ELEMENTS, Category.WEIGHTS)
    for step in range(steps):
        alloc(("input", step), PROBE_ACTIVATION_BYTES, Category.ACTIVATIONS)
        for i in range(PROBE_LAYERS):
            alloc(("output", step, i), PROBE_ACTIVATION_BYTES, Category.ACTIVATIONS, i)
        for i in reversed(range(PROBE_LAYERS)):
            alloc(("grad", step, i), 2 * PROBE_ELEMENTS, Category.GRADIENTS, i)
            alloc(("grad_input", step, i), PROBE_ACTIVATION_BYTES, Category.TEMPORARIES, i)
            events.append(Event.free(("output", step, i), i))
            if i + 1 < PROBE_LAYERS:
                events.append(Event.free(("grad_input", step, i + 1), i))
        events += [Event.free(("grad_input", step, 0)), Event.free(("input", step))]
        alloc(("backward_end", step), 512, Category.TEMPORARIES)
        events.append(Event.free(("backward_end", step)))
        for i in range(PROBE_LAYERS if step == 0 else 0):
            alloc(("adam", i), 4 * PROBE_ELEMENTS, Category.OPTIMIZER, i)
        events += [Event.free(("grad", step, i)) for i in range(PROBE_LAYERS)]
    return events, categories


def probe_phases(events: list[Event]) -> tuple[float, float, float]:
    """(allocated after init, second step's backward peak, its optimizer-step peak), MiB."""
    live, sizes, series, marks = 0, {}, [], {}
    for event in events:
        if event.kind == "alloc":
            if isinstance(event.storage, tuple) and event.storage[0] in ("input", "backward_end"):
                marks[event.storage] = len(series)
            sizes[event.storage] = event.num_bytes
            live += event.num_bytes
        else:
            live -= sizes.pop(event.storage, 0)
        series.append(live)
    init = series[marks[("input", 0)] - 1]
    backward = max(series[marks[("input", 1)]:marks[("backward_end", 1)]])
    step = max(series[marks[("backward_end", 1)]:])
    return init / MIB, backward / MIB, step / MIB


@pytest.mark.parametrize("name", sorted(PROBE_MEASURED))
def test_rules_reproduce_the_h200_probe(name):
    """The memo's rules, replayed on the probe's step, give the measured allocated figures to 1 MiB (the probe's
    activations, ~0.5 MiB, are sketched): after init, and the second step's backward and optimizer-step peaks."""
    params = tuple(zero_layout.ZeroParam(PROBE_ELEMENTS, 2, True) for _ in range(PROBE_LAYERS))
    layout = zero_layout.ZeroLayout(params, 1, 2, tuple(zero_layout.ZeroModule(i, (i,)) for i in range(PROBE_LAYERS)))
    events, categories = zero.zero_events(*probe_trace(), layout, zero_layout.ZeroKnobs(**PROBE_KNOBS[name]))
    init, backward, step = probe_phases(events)
    measured_init, measured_backward, measured_step = PROBE_MEASURED[name]
    assert init == pytest.approx(measured_init, abs=1.0)
    assert backward + WORKSPACE_MIB == pytest.approx(measured_backward, abs=1.0)
    assert step + WORKSPACE_MIB == pytest.approx(measured_step, abs=1.0)


def test_event_layers_number_the_extended_layers():
    """`extend` keeps the template's layer tag on its copies; event_layers numbers them: a 4-layer Llama traced at 3
    runs layers 0, 1, 2, 3 in forward and 3, 2, 1, 0 in backward."""
    from itertools import groupby

    from memtune.predict import single

    model_config = tiny_llama(4)
    trace, events = single.full_depth_events(model_config, zero.single_gpu_config(deepspeed_config(3, 2)), "cpu")
    assert trace.traced_layers == 3
    layers = zero_gather.event_layers(trace, events, 4)
    backward_end, _ = zero.step_positions(events, trace.categories)[0]
    start = next(i for i, event in enumerate(events) if trace.categories[event.source] != WEIGHTS)
    runs = [layer for layer, _ in groupby(layers[start:backward_end]) if layer >= 0]
    assert runs == [0, 1, 2, 3, 3, 2, 1, 0]


def test_zero3_gathers_one_module_in_step_one_and_keep_reused_layers_from_step_two():
    """At N=2, ZeRO-3's gathered parameters: from the second step every parameter stays gathered from its forward to
    its backward (max_reuse_distance 1e9 > the model), so all of them are gathered at once; with
    max_reuse_distance 0 and no prefetch, never more than a few modules'."""
    model_config = tiny_llama(4)
    numels, largest = parameter_counts(model_config)
    everything = sum(rounded(2 * n) for n in numels)
    events, categories, *_ = zero.zero_step_events(model_config, deepspeed_config(3, 2), "cpu")
    assert category_peak(events, categories, zero_layout.ZERO_GATHERED) >= everything
    events, categories, *_ = zero.zero_step_events(
        model_config, deepspeed_config(3, 2, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0), "cpu")
    persistent = sum(rounded(2 * n) for n in numels if n <= 10 * model_config.hidden_size)
    assert category_peak(events, categories, zero_layout.ZERO_GATHERED) <= persistent + 4 * rounded(2 * largest)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_accumulation_runs_the_hooks_every_micro_batch(stage):
    """With grad_accum_steps 2 the trace's second micro-batch accumulates fresh gradients into `.grad`; step_marks
    finds them (as many as the first micro-batch's, of the same sizes), each micro-batch of ZeRO-1/2 allocates its
    IPG bucket again, ZeRO-2/3 reduce them in the hooks, and the states after the step are as with one micro-batch."""
    model_config = tiny_llama()
    config = deepspeed_config(stage, 2, overlap_comm=False).replace(grad_accum_steps=2)
    from memtune.predict import single

    trace, events = single.full_depth_events(model_config, zero.single_gpu_config(config), "cpu")
    marks = zero.step_marks(events, trace.categories, zero_gather.event_layers(trace, events, 2))
    assert len(marks) == 2 and all(len(mark.gradients) == 2 for mark in marks)
    for mark in marks:
        first, second = mark.gradients
        assert [events[i].num_bytes for i in first] == [events[i].num_bytes for i in second]
        assert mark.backward_ends[0] < second[0] < mark.backward_ends[1] <= mark.step_at
    def bucket_allocations(config: TrainConfig) -> tuple[list[Event], dict[Hashable, str], int]:
        out, categories, *_ = zero.zero_step_events(model_config, config, "cpu")
        return out, categories, sum(1 for e in out if e.kind == "alloc"
                                    and categories.get(e.source) == zero_layout.ZERO_BUCKETS)

    out, categories, accumulated = bucket_allocations(config)
    _, _, single_micro_batch = bucket_allocations(config.replace(grad_accum_steps=1))
    if stage < 3:
        assert (accumulated, single_micro_batch) == (4, 2)  # one bucket per micro-batch, 2 steps
    else:  # one persistent bucket; each micro-batch's flushes copy it (reduce-scatter's cat)
        assert accumulated - 1 == 2 * (single_micro_batch - 1)
    numels, _ = parameter_counts(model_config)
    held = {key: size for key, size in live_by_category(out, categories).items() if key in STATE_KEYS}
    assert held == memo_states(numels, stage, 2, "none", model_config.hidden_size ** 2)


def test_lora_keeps_the_frozen_base_whole_under_zero_1_2_and_partitions_it_under_zero_3():
    """LoRA (memo §5): ZeRO-1/2 flatten and partition only the adapters, the frozen base stays as loaded on every
    GPU; ZeRO-3 partitions every parameter (the frozen ones each as zero.Init made it, the adapters defragmented into
    one flat buffer: stage3.py 913-972); master and Adam are the adapters' 12T/N either way."""
    from memtune.config import Adapter

    model_config = tiny_llama()
    for stage in (2, 3):
        config = deepspeed_config(stage, 2).replace(adapter=Adapter(rank=4))
        events, categories, _, layout, _ = zero.zero_step_events(model_config, config, "cpu")
        trainable = [p.numel for p in layout.params if p.trainable]
        frozen = [p.numel for p in layout.params if not p.trainable]
        assert 0 < sum(trainable) < sum(frozen) // 10
        held = live_by_category(events, categories)
        if stage == 2:
            flat = -(-sum(trainable) // 4) * 4 * 2
            assert held[WEIGHTS] == rounded(flat) + sum(rounded(2 * n) for n in frozen)
        else:
            assert held[WEIGHTS] == rounded(sum(-(-n // 2) * 2 for n in trainable)) + sum(
                rounded(-(-n // 2) * 2) for n in frozen)
        assert held[OPTIMIZER] == 3 * rounded(4 * -(-sum(trainable) // 2))


def test_nvme_offload_host_and_disk_bytes():
    """ZeRO-Infinity (ZeRO-3 to NVMe, memo §2.2 host): the pinned swap pool 4 x fp32 x min(sub_group, T/N) plus the
    bf16 gradient partitions on the host, 16T/N on the NVMe drive; parameters to NVMe add the 5 x 1e8 x b pool on
    the host and b*P/N on the drive. ZeRO-1/2 have no swapper."""
    layout = zero_layout.ZeroLayout(tuple(zero_layout.ZeroParam(n, 2, True) for n in (3_000_000, 1_000_000)), 2, 2)
    optimizer = zero_layout.ZeroKnobs(stage=3, offload_optimizer="nvme", sub_group_size=1_000_000)
    pool, gradients = 4 * power_of_two(4 * 1_000_000), power_of_two(2 * 2_000_000)
    assert zero_layout.host_bytes(layout, optimizer) == pool + gradients
    assert zero_layout.nvme_bytes(layout, optimizer) == 16 * 2_000_000
    both = zero_layout.ZeroKnobs(stage=3, offload_optimizer="nvme", offload_parameters="nvme", sub_group_size=1_000_000)
    assert zero_layout.host_bytes(layout, both) == pool + gradients + 5 * power_of_two(100_000_000 * 2)
    assert zero_layout.nvme_bytes(layout, both) == 16 * 2_000_000 + 2 * 2_000_000
    assert zero_layout.nvme_bytes(layout, zero_layout.ZeroKnobs(stage=2, offload_optimizer="nvme")) == 0


def test_fits_under_compares_the_total():
    from memtune.predict.estimate import fits_under

    model_config = tiny_llama()
    found = estimate(model_config, deepspeed_config(2, 2), device="cpu")
    assert fits_under(model_config, found, found.total_bytes)
    assert not fits_under(model_config, found, found.total_bytes - 1)


@pytest.mark.parametrize("overlap_comm", [True, False])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_the_reduction_allocates_on_the_reduction_stream_with_overlap_comm(overlap_comm, offload):
    """ZeRO-2's reduction (grads_in_partition, or the offload's fp32 copies) runs under `reduction_stream` with
    overlap_comm (stage_1_and_2.py reduce_ipg_grads), so its blocks live in that stream's pool, freed on it; without
    overlap_comm on the compute stream. The H200 histories of issue 15 showed the blocks there."""
    events, categories, _, layout, _ = zero.zero_step_events(
        tiny_llama(), deepspeed_config(2, 1, offload, overlap_comm=overlap_comm), "cpu")
    stream = zero_layout.REDUCE_STREAM if overlap_comm else 0
    flushed = GRADIENTS if offload == "none" else Category.TEMPORARIES.value
    part = rounded(2 * layout.partition(layout.trainable_elements))
    reduced = [e for e in events if e.kind == "alloc" and e.stream == stream and e.layer != -2
               and key_of(categories, e) == flushed
               and (offload != "none" or e.num_bytes == part)]
    assert reduced
    allocs = {e.storage: e.stream for e in events if e.kind == "alloc"}
    assert all(e.stream == allocs[e.storage] for e in events if e.kind == "free" and e.storage in allocs)
    if overlap_comm:
        assert not any(e.stream == stream for e in events if e.kind == "alloc" and
                       key_of(categories, e) in (WEIGHTS, OPTIMIZER))


def test_zero2_init_clones_the_partition_and_zeroes_a_gradient_for_the_master():
    """Without offload, `deepspeed.initialize` makes the fp32 master as `.detach().clone().to(fp32)` (a bf16 clone
    freed after: stage_1_and_2.py:559-561) and `initialize_optimizer_states` gives it a zero fp32 .grad it drops
    again (934-951): two transients before the first step, which decide which cached blocks the step reuses."""
    events, categories, _, layout, _ = zero.zero_step_events(tiny_llama(), deepspeed_config(2), "cpu")
    part = layout.partition(layout.trainable_elements)
    optimizer_allocs = [e.num_bytes for e in events if e.kind == "alloc"
                        and key_of(categories, e) == OPTIMIZER]
    assert optimizer_allocs[:3] == [rounded(2 * part), rounded(4 * part), rounded(4 * part)]


def key_of(categories: dict[Hashable, str], event: Event) -> str | None:
    """The breakdown key of an event's storage (a Category's value or a ZeRO key), None when uncategorised."""
    category = categories.get(event.source)
    return getattr(category, "value", category)


def test_zero3_linear_keeps_a_frozen_layers_input_and_gives_the_same_gradients():
    """Under `recipe.linear_context` with `Adapter.base_saves_input` (what memtune's ZeRO-3 prediction sets), F.linear
    is DeepSpeed ZeRO-3's: a frozen layer's input is saved for backward (torch's own linear saves only the weight
    then), and the input's gradient is unchanged. Outside the context F.linear is torch's again."""
    from memtune.config import Adapter
    from memtune.recipe import step as recipe

    layer = torch.nn.Linear(8, 4)
    layer.requires_grad_(False)
    x = torch.randn(3, 5, 8, requires_grad=True)
    expected_output = layer(x)
    (expected,) = torch.autograd.grad(expected_output.sum(), x)
    config = deepspeed_config(3).replace(adapter=Adapter(base_saves_input=True))
    with recipe.linear_context(config):
        output = layer(x)
    assert torch.nn.functional.linear is not recipe._linear_saving_input
    assert any(saved is x for saved in output.grad_fn.saved_tensors)
    addmm = expected_output.grad_fn.next_functions[0][0]  # torch's: view <- addmm, which drops a frozen mat2's mat1
    assert type(addmm).__name__ == "AddmmBackward0" and addmm._saved_mat1 is None
    (got,) = torch.autograd.grad(output.sum(), x)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(got, expected)


def test_zero3_lora_trace_holds_the_base_layers_inputs_zero2_does_not():
    """ZeRO-3 + LoRA: the trace keeps the frozen base layers' inputs (ZeRO-3's F.linear) and peft's fp32 adapters;
    ZeRO-2 casts the adapters to the model dtype. So at the same micro-batch ZeRO-3 holds more activations."""
    from memtune.config import Adapter

    model_config = tiny_llama()
    peaks = {}
    for stage in (2, 3):
        config = deepspeed_config(stage).replace(adapter=Adapter(rank=4))
        single = zero.single_gpu_config(config)
        assert single.adapter.base_saves_input == (stage == 3)
        assert single.adapter.autocast_adapter_dtype == (stage == 3)
        events, categories, *_ = zero.zero_step_events(model_config, config, "cpu")
        peaks[stage] = category_peak(events, categories, Category.ACTIVATIONS.value)
    assert peaks[3] > peaks[2]


@pytest.mark.parametrize("fields", [{"gradient_checkpointing": True}, {"loss": "chunked"}])
def test_zero3_lora_traces_with_recomputation(fields):
    """ZeRO-3's F.linear stays in place through backward, where checkpointing (and the chunked loss) run the forward
    again: the recomputation saves the same tensors as the first forward (torch.utils.checkpoint checks it)."""
    from memtune.config import Adapter

    config = deepspeed_config(3).replace(adapter=Adapter(rank=4), **fields)
    events, categories, *_ = zero.zero_step_events(tiny_llama(), config, "cpu")
    assert category_peak(events, categories, Category.ACTIVATIONS.value) > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_state_floor_of_a_zero_plan_is_below_its_prediction_and_partitioned(stage):
    """`bound.state_lower_bound` of a ZeRO plan: per GPU, partitioned by stage (not the full model state, which made
    the search drop ZeRO plans that fit), and never above the predicted peak allocated."""
    from memtune.predict.bound import state_lower_bound
    from memtune.predict.throughput import ModelShape

    model_config = tiny_llama()
    numels, _ = parameter_counts(model_config)
    shape = ModelShape.of(model_config, sum(numels))
    one, four = deepspeed_config(stage, 1), deepspeed_config(stage, 4)
    assert state_lower_bound(shape, four) < state_lower_bound(shape, one)
    assert state_lower_bound(shape, four) <= estimate(model_config, four, device="cpu").peak_allocated_bytes
