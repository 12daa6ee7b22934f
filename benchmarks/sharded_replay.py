"""Replay the recorded sharded (FSDP2 / CPU offload) H200 measurements against the current predictions, without a GPU.

    MEMTUNE_NO_CACHE=1 PYTHONPATH=.:<transformers 5.17>:<liger-kernel> python benchmarks/sharded_replay.py

Reads the measured peaks of results/loss_2gpu_h200.json, results/loss_2gpu_liger_h200.json (their FSDP rows) and
results/fsdp_2gpu_h200.json (the trial cases and the offload cases), predicts each configuration on the GPU-free
path (`memtune.predict.estimate.estimate(..., device="cpu")`) and prints measured and predicted peak reserved
(GiB) with the errors of reserved and allocated. Use the GPU machine's transformers (5.17) to reproduce its traces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def recorded() -> list[tuple[str, str, dict, dict]]:
    """(case, model, configuration, measured) of every recorded sharded measurement that fit."""
    rows = []
    for name in ("loss_2gpu_h200.json", "loss_2gpu_liger_h200.json"):
        for row in json.loads((RESULTS / name).read_text())["rows"]:
            if row["config"].get("strategy") != "ddp" and row.get("measured", {}).get("fits"):
                rows.append((row["case"], row["model"], row["config"], row["measured"]))
    fsdp = json.loads((RESULTS / "fsdp_2gpu_h200.json").read_text())
    for row in [*fsdp["worker"]["cases"], *fsdp["offload"]]:
        if row.get("fits") and "config" in row:
            rows.append((row["case"], row["model"], row["config"], row))
    return rows


def main() -> None:
    from memtune.predict.estimate import estimate
    from memtune.sources import catalog_config

    print(f"{'case':50s} {'measured':>8s} {'predicted':>9s} {'reserved':>8s} {'allocated':>9s}")
    for case, model, config, measured in recorded():
        found = estimate(catalog_config(model), TrainConfig.from_dict(config), device="cpu")
        reserved, allocated = measured["peak_reserved_bytes"], measured["peak_allocated_bytes"]
        print(f"{case:50s} {reserved / GIB:8.2f} {found.peak_reserved_bytes / GIB:9.2f} "
              f"{100 * (found.peak_reserved_bytes - reserved) / reserved:+7.2f}% "
              f"{100 * (found.peak_allocated_bytes - allocated) / allocated:+8.2f}%", flush=True)


if __name__ == "__main__":
    main()
