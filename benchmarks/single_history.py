"""The CUDA caching allocator's own history of a one-GPU trial, against the trace: is a reserved error in
the predicted events or in the allocator model?

    PYTHONPATH=. python benchmarks/single_history.py --record --out $OUT/single_history.json   # on a GPU
    PYTHONPATH=. python benchmarks/single_history.py --compare benchmarks/results/single_history_h200.json
    PYTHONPATH=. python benchmarks/single_history.py --compare tests/data/single_history_expandable_h200.json.gz

`--record` runs `memtune.measure.verify.measure` (3 steps) for each case under
`torch.cuda.memory._record_memory_history` and writes every allocator event as [action, address, size]
plus, for allocations of 64 MiB or more, the innermost Python frames that made them. `--compare` (no
GPU) replays the real events through memtune's allocator model (`allocator.simulate`) against the
measured reserved peak, and lists, for the real history and for memtune's trace, every new segment of
64 MiB or more in order (its size and what asked for it): the first place the two lists part is where
the prediction goes wrong.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB  # noqa: E402
from memtune.predict.trace import Event  # noqa: E402

DEFAULT_CASES = [  # names of benchmarks/cases.py cases (any suite)
    "Qwen/Qwen2.5-0.5B 16x1024 bf16-mixed",
    "Qwen/Qwen2.5-0.5B 4x1024 fp32",
    "google/gemma-2-2b[6L] 2x1024 bf16+ckpt+lora",
    "gpt2 4x512 bf16-mixed",
    "falcon:tiiuae/falcon-7b[8L] 2x1024 bf16+ckpt+lora",
]
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
           "segment_unmap", "snapshot", "oom")
BIG = 64 * 2**20


def every_case() -> dict[str, Any]:
    """benchmarks/cases.py's cases of the accuracy, large and architectures suites, by name, benchmarks/lowbit.py's
    by its names (which say the optimizer and the quantised base), and benchmarks/activations.py's by its names."""
    from benchmarks.activations import SUITES
    from benchmarks.activations import case_name as activation_case_name
    from benchmarks.cases import accuracy_cases, large_batch_cases, real_architecture_cases
    from benchmarks.lowbit import CASES as LOWBIT_CASES
    from benchmarks.lowbit import case_name

    cases = {case.name: case for case in [*accuracy_cases(), *large_batch_cases(), *real_architecture_cases()]}
    activations = {activation_case_name(case): case for suite in SUITES.values() for case in suite}
    return cases | {case_name(case): case for case in LOWBIT_CASES} | activations


def cases_named(names: list[str]) -> list[Any]:
    every = every_case()
    unknown = [name for name in names if name not in every]
    if unknown:
        raise SystemExit(f"unknown case(s): {unknown}; see benchmarks/cases.py for the names")
    return [every[name] for name in names]


def record(out: Path, names: list[str]) -> None:
    import torch

    from benchmarks.cases import model_config
    from memtune.measure import memory, verify

    memory.warm_up()
    rows = []
    for name, case in zip(names, cases_named(names), strict=True):
        config = case.config
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python", context="alloc")
        measured = verify.measure(model_config(case), config, steps=3)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        events = []
        for entry in snapshot["device_traces"][0]:
            action = ACTIONS.index(entry["action"]) if entry["action"] in ACTIONS else -1
            frames = ""
            if entry["action"] == "alloc" and entry["size"] >= BIG:
                frames = " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}"
                                    for f in entry.get("frames", [])[:6])
            events.append([action, entry["addr"], entry["size"], frames])
        rows.append({"case": name, "config": config.to_dict(), "measured": measured.to_dict(), "events": events})
        print(f"{name}: reserved {measured.peak_reserved_bytes / GIB:.2f} GiB, allocated "
              f"{measured.peak_allocated_bytes / GIB:.2f} GiB, {len(events)} events", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"cases": rows}))  # after every case: a run cut short keeps what it recorded


def real_events(events: list[list[Any]]) -> tuple[list[Event], list[tuple[int, str]]]:
    """Allocator-model events from the history, and every new segment of BIG or more: (bytes, what asked)."""
    out: list[Event] = []
    live: dict[int, Event] = {}
    last_frames = ""
    segments = []
    for action, address, size, frames in events:
        name = ACTIONS[action] if action >= 0 else ""
        if name == "alloc":
            live[address] = Event.alloc(len(out), size)
            out.append(live[address])
            last_frames = frames
        elif name == "free_completed" and address in live:
            out.append(Event.free(live.pop(address).storage))
        elif name == "segment_alloc" and size >= BIG:
            segments.append((size, last_frames or "(the allocation that follows)"))
    return out, segments


def compare(path: Path) -> None:
    from benchmarks.cases import model_config
    from memtune.predict import allocator
    from memtune.predict.single import full_depth_events

    every = every_case()
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    for row in json.loads(text)["cases"]:
        case = every.get(row["case"])
        if case is None:
            print(f"\n{row['case']}: not a benchmarks/cases.py case name; skipped")
            continue
        events, real_segments = real_events(row["events"])
        # a history recorded with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True maps pages instead
        expandable = any(action == ACTIONS.index("segment_map") for action, *_ in row["events"])
        replay = allocator.simulate(events, expandable=expandable)
        measured = row["measured"]
        _, traced = full_depth_events(model_config(case), case.config, "cpu")
        predicted = allocator.simulate(traced, expandable=expandable)
        mode = " (expandable segments)" if expandable else ""
        print(f"\n{row['case']}{mode}: measured reserved {measured['peak_reserved_bytes'] / GIB:.2f} GiB, allocated "
              f"{measured['peak_allocated_bytes'] / GIB:.2f}\n  real events through memtune's allocator: "
              f"reserved {replay.peak_reserved_bytes / GIB:.2f}, allocated {replay.peak_allocated_bytes / GIB:.2f}"
              f"\n  memtune's trace (cpu path): reserved {predicted.peak_reserved_bytes / GIB:.2f}, allocated "
              f"{predicted.peak_allocated_bytes / GIB:.2f}")
        print("  real segments >= 64 MiB, in order:")
        for size, frames in real_segments:
            print(f"    {size / 2**20:9.1f} MiB  {frames[:150]}")
        print("  traced segments >= 64 MiB, in order:")
        simulated = allocator.CachingAllocator()
        addresses: dict[Any, int] = {}
        for index, event in enumerate(traced):
            if event.kind == "alloc":
                before = simulated.reserved
                addresses[event.storage] = simulated.malloc(event.num_bytes) or 0
                if simulated.reserved - before >= BIG:
                    print(f"    {(simulated.reserved - before) / 2**20:9.1f} MiB  event {index} of {len(traced)}, "
                          f"layer {event.layer}, request {event.num_bytes / 2**20:.1f} MiB")
            elif event.storage in addresses:
                simulated.free(addresses.pop(event.storage))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="record the histories (needs a GPU)")
    parser.add_argument("--out", type=Path, default=Path("single_history.json"))
    parser.add_argument("--compare", type=Path, help="replay a recorded file (no GPU)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="case names (benchmarks/cases.py)")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
    elif args.record:
        record(args.out, args.cases)
    else:
        parser.error("give --record (on a GPU) or --compare FILE")


if __name__ == "__main__":
    main()
