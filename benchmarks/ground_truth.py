"""Measure the accuracy cases on a real GPU: peak allocated/reserved and step time per case.

    PYTHONPATH=. python3 benchmarks/ground_truth.py --out tests/data/ground_truth_h100.json

The JSON is the ground truth that `benchmarks/accuracy.py` and the CPU test suite compare the
estimator against. With --traces DIR it also saves the allocator's event trace of a few cases
(torch.cuda.memory._record_memory_history) for offline comparison with the traced allocations.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import accuracy_cases, model_config  # noqa: E402
from memtune.measure import memory, verify  # noqa: E402


def environment() -> dict:
    import peft
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "context_bytes": context_bytes(),
    }


def context_bytes() -> int:
    """Device memory used by this process beyond torch's reserved pool (CUDA context, kernels)."""
    import pynvml
    import torch

    torch.zeros(1, device="cuda")
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    if not used or used[0] is None:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used) - torch.cuda.memory_reserved()
    return int(used[0]) - torch.cuda.memory_reserved()


def measure_cases(cases: list, traces: str = "", trace_every: int = 8) -> list[dict]:
    """Measure each case with `verify.measure` (3 steps); an error in one case is recorded, not raised."""
    import torch

    env_workspace = memory.warm_up()
    rows = []
    for index, case in enumerate(cases):
        record = bool(traces) and index % trace_every == 0
        if record:
            torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python", context=None)
        row = {"case": case.name, "model": case.model, "num_layers": case.num_layers, "config": case.config.to_dict()}
        try:
            row.update(verify.measure(model_config(case), case.config, steps=3).to_dict())
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
            row.update({"fits": False, "error": f"{type(error).__name__}: {error}"[:500]})
        row["workspace_bytes"] = env_workspace
        if record:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            events = [(e["action"], e["addr"], e["size"]) for e in snapshot["device_traces"][0]]
            path = Path(traces) / f"trace_{index:03d}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as handle:
                json.dump({"case": row["case"], "events": events}, handle)
            row["trace_file"] = path.name
        rows.append(row)
        gib = 1 << 30
        print(f"[{index + 1}/{len(cases)}] {case.name:60s} alloc {row.get('peak_allocated_bytes', 0) / gib:7.3f} "
              f"reserved {row.get('peak_reserved_bytes', 0) / gib:7.3f} GiB  "
              f"{row.get('tokens_per_second', 0):9.0f} tok/s  {row.get('error', '')[:80]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--traces", default="", help="folder for allocator traces of a few cases")
    parser.add_argument("--limit", type=int, default=0, help="measure only the first N cases")
    args = parser.parse_args()
    env = environment()
    started = time.perf_counter()
    rows = measure_cases(accuracy_cases()[: args.limit or None], args.traces)
    env["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
