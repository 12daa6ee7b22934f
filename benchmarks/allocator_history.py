"""Record the CUDA caching allocator's own history during sharded trial steps, for comparing with the trace.

    python benchmarks/allocator_history.py --out $OUT/history.json      # on a host with 2 GPUs

Runs `torchrun --nproc-per-node 2` of this script (1 for `--offload-1gpu`); rank 0 records
`torch.cuda.memory._record_memory_history` (no stack traces) around `memtune.measure.sharded.measure_sharded`
for each case and writes, per case, every allocator event as [action, address, size, stream] with the measured
peaks. `--compare FILE` (no GPU) replays a recorded file: the real events through memtune's allocator model, per
stream, against the real reserved peak, and the real allocations per stream against `sharding.trace_sharded`'s,
so that an error in the predicted events and an error in the allocator model can be told apart.

`--trainer` records the same during `memtune run`'s Trainer (accelerate launch, FSDP2) instead, for
TRAINER_CASE: history from train begin, peaks as the run summary reports them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig  # noqa: E402
from memtune.predict.trace import Event  # noqa: E402

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("qwen2.5-0.5b 8x1024", "Qwen/Qwen2.5-0.5B", dict(seq_len=1024, micro_batch_size=8)),
    ("llama-3.2-1b 2x2048", "meta-llama/Llama-3.2-1B", dict(seq_len=2048, micro_batch_size=2)),
    ("llama-3.2-1b 2x1024 accum2 ckpt", "meta-llama/Llama-3.2-1B",
     dict(seq_len=1024, micro_batch_size=2, grad_accum_steps=2, gradient_checkpointing=True)),
]
TRAINER_CASE = ("qwen2.5-0.5b 8x1024 (Trainer)", "Qwen/Qwen2.5-0.5B", dict(seq_len=1024, micro_batch_size=8))
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map", "segment_unmap",
           "snapshot", "oom")


def config_of(fields: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{"amp": "bf16", "num_gpus": 2, **fields})


DDP_CASE = ("qwen2.5-0.5b 1x1024 accum4 ddp", "Qwen/Qwen2.5-0.5B",
            dict(seq_len=1024, micro_batch_size=1, grad_accum_steps=4, strategy="ddp"))


DDP_CHECK = [  # configurations the DDP model was not fitted to (benchmarks/ddp.py measured 1024-token steps)
    ("qwen2.5-0.5b 2x2048 ddp", "Qwen/Qwen2.5-0.5B", dict(seq_len=2048, micro_batch_size=2, strategy="ddp")),
    ("llama-3.2-1b 2x2048 ckpt ddp", "meta-llama/Llama-3.2-1B",
     dict(seq_len=2048, micro_batch_size=2, gradient_checkpointing=True, strategy="ddp")),
    ("qwen2.5-1.5b 1x2048 accum2 ddp", "Qwen/Qwen2.5-1.5B",
     dict(seq_len=2048, micro_batch_size=1, grad_accum_steps=2, strategy="ddp")),
]


OFFLOAD_1GPU = [  # issue 14: FSDP2 CPU offload on one GPU measured exact with the chunked loss, +11% with Liger's
    (f"llama-3.2-1b 2x2048 ckpt offload 1gpu {loss}", "meta-llama/Llama-3.2-1B",
     dict(seq_len=2048, micro_batch_size=2, gradient_checkpointing=True, offload="parameters", num_gpus=1, loss=loss))
    for loss in ("chunked", "liger")
]


def worker(out: Path, cases: list | None = None, every_rank: bool = False) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from memtune.measure.sharded import measure_sharded
    from memtune.sources import catalog_config

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=datetime.timedelta(seconds=120))
    rows = []
    record = every_rank or local_rank == 0
    for name, model, fields in cases or CASES:
        config = config_of(fields)
        if record:
            torch.cuda.memory._record_memory_history(context=None, max_entries=2_000_000)
        measured = measure_sharded(catalog_config(model), config, steps=3, accumulation_limit=None)
        if record:
            rows.append(history_row(name, model, config, measured.to_dict()))
            rows[-1]["rank"] = local_rank
            target = out if local_rank == 0 else out.with_name(f"{out.stem}.rank{local_rank}{out.suffix}")
            target.write_text(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                                       "actions": ACTIONS, "cases": rows}))
            print(f"[history] {name}: {len(rows[-1]['events'])} events, reserved "
                  f"{measured.peak_reserved_bytes / GIB:.2f} GiB", flush=True)
    dist.destroy_process_group()


def history_row(name: str, model: str, config: TrainConfig, measured: dict[str, Any]) -> dict[str, Any]:
    """Stop recording; the case with every recorded allocator event as [action, address, size, stream]."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    return {"case": name, "model": model, "config": config.to_dict(), "measured": measured,
            "events": [[ACTIONS.index(e["action"]) if e["action"] in ACTIONS else -1, e["addr"], e["size"], e["stream"]]
                       for e in trace]}


def trainer_worker(plan_path: Path, out: Path) -> None:
    """One rank of `accelerate launch`: memtune's runner for 3 steps, rank 0 recording from train begin."""
    import tempfile

    import torch
    from transformers import TrainerCallback

    from memtune.plan import Plan
    from memtune.run.runner import run_plan

    class Record(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if args.process_index == 0:
                torch.cuda.memory._record_memory_history(context=None, max_entries=2_000_000)

    plan = Plan.load(plan_path)
    summary = run_plan(plan, output_dir=tempfile.mkdtemp(prefix="memtune-history-"), max_steps=3, save_steps=1000,
                       callbacks=[Record()], progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        name, model, _ = TRAINER_CASE
        measured = {
            "peak_allocated_bytes": summary.peak_allocated_bytes,
            "peak_reserved_bytes": summary.peak_reserved_bytes,
        }
        row = history_row(name, model, plan.train_config, measured)
        out.write_text(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "actions": ACTIONS,
                                   "cases": [row]}))
        print(f"[history] {name}: {len(row['events'])} events, reserved {summary.peak_reserved_bytes / GIB:.2f} GiB",
              flush=True)


def launch_trainer(out: Path) -> None:
    import tempfile

    from memtune.plan import Plan
    from memtune.run.launch import write_accelerate_config
    from memtune.sources import catalog_config

    name, model, fields = TRAINER_CASE
    work = Path(tempfile.mkdtemp(prefix="memtune-history-"))
    config = config_of(fields)
    plan = Plan(model=model, train_config=config, budget_bytes=int(130 * GIB))
    plan.save(work / "plan.json")
    yaml_path = write_accelerate_config(work / "fsdp.yaml", config, model_config=catalog_config(model))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path),
               str(Path(__file__).resolve()), "--trainer-worker", str(work / "plan.json"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, env=env, timeout=300, check=False)


def launch(out: Path, extra: list[str], gpus: int = 2) -> None:
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
               str(Path(__file__).resolve()), "--worker", "--out", str(out), *extra]
    subprocess.run(command, env=env, timeout=300, check=False)


# ---- replay (no GPU) ------------------------------------------------------------------------------


def real_events(events: list[list[int]]) -> tuple[list[Event], int]:
    """Allocator-model events (each block with its stream) from the recorded history, and the largest
    reserved total the history shows (segment_alloc/segment_free). Sizes are as requested: the
    allocator model rounds them."""
    out: list[Event] = []
    live: dict[int, Event] = {}  # address -> its alloc
    reserved = peak_reserved = 0
    next_id = 0
    for action, address, size, stream in events:
        name = ACTIONS[action] if action >= 0 else ""
        if name == "alloc":
            live[address] = Event.alloc(next_id, size, stream=stream)
            out.append(live[address])
            next_id += 1
        elif name == "free_completed" and address in live:
            allocated = live.pop(address)
            out.append(Event.free(allocated.storage, stream=allocated.stream))
        elif name in ("segment_alloc", "segment_map"):
            reserved += size
            peak_reserved = max(peak_reserved, reserved)
        elif name in ("segment_free", "segment_unmap"):
            reserved -= size
    return out, peak_reserved


def compare(path: Path) -> None:
    from collections import Counter

    from memtune.predict import allocator
    from memtune.predict.fsdp import cached_trace_sharded, simulate_streams
    from memtune.predict.trace import rounded
    from memtune.sources import catalog_config

    data = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
    for row in data["cases"]:
        events, history_peak = real_events(row["events"])
        by_stream: dict[int, list[Event]] = {}
        for event in events:
            by_stream.setdefault(event.stream, []).append(event)
        model_alloc = allocator.simulate(events).peak_allocated_bytes
        per_stream = {stream: allocator.simulate(ev).peak_reserved_bytes for stream, ev in by_stream.items()}
        measured = row["measured"]
        print(f"\n{row['case']}: measured reserved {measured['peak_reserved_bytes'] / GIB:.2f} GiB, "
              f"allocated {measured['peak_allocated_bytes'] / GIB:.2f}; history segments peak {history_peak / GIB:.2f}")
        print(
            f"  real events through memtune's allocator: allocated {model_alloc / GIB:.2f}, reserved "
            f"{sum(per_stream.values()) / GIB:.2f} = "
            + " + ".join(f"s{s}:{v / GIB:.2f}" for s, v in per_stream.items())
        )
        config = TrainConfig.from_dict(row["config"])
        trace = cached_trace_sharded(catalog_config(row["model"]), config)
        predicted_alloc, predicted_reserved = simulate_streams(trace.events)
        print(f"  memtune's trace: allocated {predicted_alloc / GIB:.2f}, reserved {predicted_reserved / GIB:.2f}")
        real_sizes = Counter(rounded(event.num_bytes) for event in events if event.kind == "alloc")
        traced_sizes = Counter(event.num_bytes for event in trace.events if event.kind == "alloc")
        steps_real = sum(real_sizes.values())
        print(f"  allocations: real {steps_real} (3 steps + set-up), traced {sum(traced_sizes.values())} (2 steps)")
        for size in sorted(set(real_sizes) | set(traced_sizes), reverse=True)[:25]:
            print(
                f"    {size / 2**20:10.1f} MiB  real {real_sizes.get(size, 0):5d}  "
                f"traced {traced_sizes.get(size, 0):5d}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="allocator_history.json")
    parser.add_argument("--worker", action="store_true", help="internal: one torchrun rank")
    parser.add_argument("--ddp", action="store_true", help="record DDP_CASE on every rank instead of CASES")
    parser.add_argument("--ddp-check", action="store_true", help="DDP_CHECK instead of CASES (rank 0 records)")
    parser.add_argument("--offload-1gpu", action="store_true", help="OFFLOAD_1GPU on one GPU instead of CASES")
    parser.add_argument("--compare", type=Path, help="replay a recorded file (no GPU)")
    parser.add_argument("--trainer", action="store_true", help="record memtune run's Trainer instead of the trial")
    parser.add_argument("--trainer-worker", type=Path, metavar="PLAN", help="internal: one accelerate rank")
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare)
    if args.trainer_worker:
        return trainer_worker(args.trainer_worker, Path(args.out))
    if args.trainer:
        return launch_trainer(Path(args.out))
    if args.worker:
        cases = [DDP_CASE] if args.ddp else DDP_CHECK if args.ddp_check else OFFLOAD_1GPU if args.offload_1gpu else None
        return worker(Path(args.out), cases, every_rank=args.ddp)
    flags = ["--ddp"] * args.ddp + ["--ddp-check"] * args.ddp_check + ["--offload-1gpu"] * args.offload_1gpu
    launch(Path(args.out), flags, gpus=1 if args.offload_1gpu else 2)


if __name__ == "__main__":
    main()
