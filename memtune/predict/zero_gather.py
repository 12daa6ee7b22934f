"""ZeRO-3's gathered parameters: a numel-only replica of DeepSpeed 0.19.8's partitioned-parameter coordinator
(`runtime/zero/partitioned_param_coordinator.py`: fetch, prefetch, release, reuse distance) and where each module's
gathers fall in a traced step (the regions of its decoder layer). Storage keys for ZeRO's own events too."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from memtune.predict.events import NO_LAYER, Event, rounded
from memtune.predict.trace import Trace
from memtune.predict.zero_layout import (
    AFTER_LAYERS,
    ALLGATHER_STREAM,
    BEFORE_LAYERS,
    ZERO_GATHERED,
    ZeroKnobs,
    ZeroLayout,
)


@dataclass
class StorageKeys:
    """Fresh storage keys for ZeRO's own allocations, and the breakdown key of each."""

    categories: dict[Hashable, str] = field(default_factory=dict)
    count: int = 0

    def alloc(self, category: str, num_bytes: int, stream: int = 0, layer: int = NO_LAYER) -> Event:
        self.count += 1
        key = ("zero", self.count)
        self.categories[key] = category
        return Event.alloc(key, rounded(num_bytes), layer, stream)


@dataclass
class GatherVisit:
    """One module's run as ZeRO-3's coordinator sees it: the parameter groups all-gathered before it (its own
    missing ones, then a prefetch) and the parameters released after it."""

    module: int
    gathered: list[list[int]]
    released: list[int]


def gather_schedule(layout: ZeroLayout, knobs: ZeroKnobs, visits: list[int], available: set[int],
                    persistent: set[int], complete_trace: bool) -> list[GatherVisit]:
    """A numel-only replica of partitioned_param_coordinator.py for one step's module `visits` (indices into
    layout.modules, forward then backward). `available` (parameter indices gathered now) is updated in place.

    - fetch_sub_module (310-420): the module's parameters not available are gathered.
    - From the second step (`complete_trace`, the order recorded in the first: 422): a prefetch walks the
      recorded parameter uses after this module, gathering those not available until it holds
      min(max_live_parameters - available elements, prefetch_bucket_size) elements (452-481); a use it walks
      past of a parameter already available keeps that parameter until then (the skipped-reuse rule).
    - release_sub_module / __params_to_release (497-500, 632-660): after the module, its non-persistent
      parameters are released, unless (complete trace) a module within the next max_reuse_distance elements
      of the recorded order uses them. The first step releases all of them.
    """
    numel = [p.numel for p in layout.params]
    uses = [(k, param) for k, module in enumerate(visits) for param in layout.modules[module].params]
    position, keep_until, plan = 0, dict[int, int](), []
    for k, module in enumerate(visits):
        params = list(dict.fromkeys(layout.modules[module].params))
        fetch = [p for p in params if p not in available]
        available.update(fetch)
        groups = [fetch] if fetch else []
        if complete_trace:
            while position < len(uses) and uses[position][0] <= k:
                position += 1
            budget = min(knobs.max_live_parameters - sum(numel[p] for p in available), knobs.prefetch_bucket_elements)
            prefetch, prefetching = [], 0
            while position < len(uses) and prefetching < budget:
                step_id, param = uses[position]
                position += 1
                if param not in available:
                    prefetch.append(param)
                    available.add(param)
                    prefetching += numel[param]
                keep_until[param] = max(keep_until.get(param, -1), step_id)
            if prefetch:
                groups.append(prefetch)
        release = {p for p in params if p not in persistent}
        if complete_trace:
            release = {p for p in release if keep_until.get(p, -1) <= k}
            traversed = 0
            for later in visits[k + 1:]:
                if traversed >= knobs.max_reuse_distance:
                    break
                for param in layout.modules[later].params:
                    release.discard(param)
                    traversed += numel[param]
        available.difference_update(release)
        plan.append(GatherVisit(module, groups, sorted(release)))
    return plan


def gather_events(layout: ZeroLayout, visit: GatherVisit, live: dict[int, Hashable], keys: StorageKeys,
                  layer: int) -> tuple[list[Event], list[Event]]:
    """(events before the module runs, events after it) for one visit: each group's flat all-gather buffer
    `sum(ceil(numel/N) * N) * b` (partition_parameters.py:1343-1361, N > 1 only), each parameter's own copy
    (`torch.cat` of its pieces, 795, or the host-to-device copy under parameter offload), the flat buffer freed;
    after the module, the released parameters freed. `live` maps a gathered parameter to its storage."""
    before: list[Event] = []
    for group in visit.gathered:
        flat = None
        if layout.num_ranks > 1:
            elements = sum(layout.partition(layout.params[p].numel) * layout.num_ranks * layout.params[p].element_bytes
                           for p in group)
            flat = keys.alloc(ZERO_GATHERED, elements, ALLGATHER_STREAM, layer)
            before.append(flat)
        for param in group:
            copy = keys.alloc(ZERO_GATHERED, layout.params[param].numel * layout.params[param].element_bytes,
                              ALLGATHER_STREAM, layer)
            live[param] = copy.storage
            before.append(copy)
        if flat is not None:
            before.append(Event.free(flat.storage, layer, ALLGATHER_STREAM))
    after = [Event.free(live.pop(param), layer, ALLGATHER_STREAM) for param in visit.released if param in live]
    return before, after


def _runs(layers: list[int], start: int, end: int, layer: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(first run, last run) of consecutive events of decoder `layer` in layers[start:end] (each event's layer), as
    [from, to) pairs: its forward and its backward in the trace (the layer hooks tag both)."""
    where = [index for index in range(start, end) if layers[index] == layer]
    if not where:
        return None
    first_end = where[0]
    while first_end < end and layers[first_end] == layer:
        first_end += 1
    last_start = where[-1]
    while last_start > start and layers[last_start - 1] == layer:
        last_start -= 1
    return (where[0], first_end), (last_start, where[-1] + 1)


def event_layers(trace: Trace, events: list[Event], num_layers: int) -> list[int]:
    """The decoder layer each event of `events` (the trace extended to `num_layers` by `trace.extend`) runs in.

    `extend` keeps the template's layer tag on every copy of it and names each copy's storage
    `hash((traced storage, layer shift))`: an allocation's shift gives its layer, and an event of a template tag
    runs in the layer of the last allocation of that tag. Events outside the layers keep NO_LAYER; a stream that was
    not extended (or extended twice, under partial checkpointing) keeps its tags."""
    period, traced = trace.period, trace.traced_layers
    copies = (num_layers - traced) // period
    if copies <= 0 or len(events) == len(trace.events):
        return [event.layer for event in events]
    template = range(period, 2 * period)

    def shift_of(layer: int, copy: int) -> int:  # as extend_events', for its default template
        if layer in template:
            return copy * period
        return copies * period if layer >= 2 * period else 0

    true_layer: dict[Hashable, int] = {}
    for event in trace.events:
        if event.kind == "alloc" and event.layer >= 0:
            for copy in range(copies + 1) if event.layer in template else (0,):
                shift = shift_of(event.layer, copy)
                true_layer[hash((event.storage, shift))] = event.layer + shift
    layers, current = [], dict[int, int]()
    for event in events:
        if event.layer >= 0 and event.kind == "alloc" and event.storage in true_layer:
            current[event.layer] = true_layer[event.storage]
        layers.append(current.get(event.layer, event.layer) if event.layer >= 0 else event.layer)
    return layers


def module_regions(layout: ZeroLayout, event_layer: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """One step's module visits in the trace as (module index, from, to): the embeddings before layer 0's forward,
    each decoder layer's modules over its forward run, the final norm and head over the first half of the events
    between the last layer's forward and its backward, and back in reverse (the head over the second half). A
    region holding several modules is split evenly by events (the trace has no module marks)."""
    by_unit: dict[int, list[int]] = {}
    for index, zero_module in enumerate(layout.modules):
        by_unit.setdefault(zero_module.unit, []).append(index)
    layers = sorted(unit for unit in by_unit if unit >= 0)
    runs = {layer: _runs(event_layer, start, end, layer) for layer in layers}
    forward: list[tuple[int, int, int]] = []  # (unit, from, to)
    backward: list[tuple[int, int, int]] = []
    found = [layer for layer in layers if runs[layer] is not None]
    if not found:
        forward = [(unit, start, start) for unit in (BEFORE_LAYERS, *layers, AFTER_LAYERS)]
        backward = [(unit, end, end) for unit in (AFTER_LAYERS, *layers[::-1], BEFORE_LAYERS)]
    else:
        first, last = runs[found[0]], runs[found[-1]]
        assert first is not None and last is not None
        forward.append((BEFORE_LAYERS, start, first[0][0]))
        for layer in layers:
            run = runs[layer]
            forward.append((layer, *run[0]) if run else (layer, forward[-1][2], forward[-1][2]))
        middle = (last[0][1] + last[1][0]) // 2
        forward.append((AFTER_LAYERS, last[0][1], middle))
        backward.append((AFTER_LAYERS, middle, last[1][0]))
        for layer in layers[::-1]:
            run = runs[layer]
            backward.append((layer, *run[1]) if run else (layer, backward[-1][2], backward[-1][2]))
        backward.append((BEFORE_LAYERS, first[1][1], end))
    regions: list[tuple[int, int, int]] = []
    for direction, units in ((1, forward), (-1, backward)):
        for unit, begin, finish in units:
            modules = by_unit.get(unit, [])[::direction]
            for j, module in enumerate(modules):
                size = finish - begin
                regions.append((module, begin + j * size // len(modules), begin + (j + 1) * size // len(modules)))
    return regions
