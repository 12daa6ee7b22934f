"""Host RAM of FSDP2 CPU offload: predicted (`predict.estimate.fsdp_offload_host_bytes`) vs measured, on one GPU.

    PYTHONPATH=. python3 benchmarks/fsdp_host.py --out benchmarks/results/fsdp_host_h200.json

Each case runs in a fresh process: CUDA and the cuBLAS workspaces first (`measure.memory.warm_up`), then memtune's
own trial of the plan (`measure.sharded.measure_sharded`: the model built and prepared as accelerate prepares it,
FSDP2 with CPUOffloadPolicy(pin_memory=True) for offload "parameters", 3 steps). The measured host RAM of an offload
case is its process's resident set after the optimizer step of steps 2-3 (read inside the trial: once it returns,
the optimizer state is freed and glibc gives large blocks back to the system) less that of the same model and
precision without offload (the twin, FSDP2 on the GPU): what the libraries and the CUDA context take is in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, Adapter, TrainConfig  # noqa: E402

MODELS = (("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"), ("llama-3.2-1b", "meta-llama/Llama-3.2-1B"))


def cases() -> list[tuple[str, str, TrainConfig, str]]:
    """(name, catalog model, configuration, twin's name): per model bf16-mixed and LoRA on a bf16 base, each with
    and without CPU offload, 2 x 1024 tokens, checkpointing (the activations stay small beside the state)."""
    out = []
    for label, model in MODELS:
        for kind, base in (("full", TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16",
                                                gradient_checkpointing=True)),
                           ("lora", TrainConfig(seq_len=1024, micro_batch_size=2, weights_dtype="bf16",
                                                gradient_checkpointing=True, adapter=Adapter()))):
            twin = f"{label} {kind} fsdp"
            out.append((twin, model, base, ""))
            out.append((f"{label} {kind} fsdp offload", model, base.replace(offload="parameters"), twin))
    return out


def worker(case_path: str, result_path: str) -> None:
    import psutil

    from memtune.measure import memory, sharded
    from memtune.sources import catalog_config

    case = json.loads(Path(case_path).read_text())
    memory.warm_up()
    start = psutil.Process().memory_info().rss
    after_steps: list[int] = []
    original = sharded.fsdp_train_step

    def step_then_rss(*args: Any, **kwargs: Any) -> Any:  # the trial frees the state before it returns: read it here
        done = original(*args, **kwargs)
        after_steps.append(psutil.Process().memory_info().rss)
        return done

    sharded.fsdp_train_step = step_then_rss
    found = sharded.measure_sharded(catalog_config(case["model"]), TrainConfig.from_dict(case["config"]), steps=3)
    Path(result_path).write_text(json.dumps({
        "fits": found.fits, "error": found.error, "rss_start_bytes": start, "rss_after_steps": after_steps,
        "rss_bytes": max(after_steps[1:] or after_steps or [0]), "peak_reserved_bytes": found.peak_reserved_bytes,
        "tokens_per_second": found.tokens_per_second}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-measure", action="store_true", help="predictions only (no GPU)")
    args = parser.parse_args()

    from memtune.predict.estimate import fsdp_offload_host_bytes
    from memtune.sources import catalog_config

    rows: list[dict] = []
    print(f"{'case':34} {'predicted GiB':>13} {'measured GiB':>12} {'error':>7}")
    for name, model, config, twin in cases():
        row: dict = {"case": name, "model": model, "config": config.to_dict(),
                     "predicted_host_bytes": fsdp_offload_host_bytes(catalog_config(model), config)}
        if not args.no_measure:
            with tempfile.TemporaryDirectory() as folder:
                case_path, result_path = Path(folder) / "case.json", Path(folder) / "result.json"
                case_path.write_text(json.dumps({"model": model, "config": config.to_dict()}))
                done = subprocess.run([sys.executable, __file__, "--worker", str(case_path), str(result_path)],
                                      capture_output=True, text=True, timeout=600)
                row["measured"] = (json.loads(result_path.read_text()) if result_path.exists()
                                   else {"fits": False, "error": done.stderr[-1500:]})
        twin_row = next((r for r in rows if r["case"] == twin), None)
        line = f"{name:34} {row['predicted_host_bytes'] / GIB:13.2f}"
        measured = row.get("measured", {})
        if twin and measured.get("fits"):
            paired = twin_row is not None and twin_row.get("measured", {}).get("fits")
            # without a twin, the growth from the worker's start: the model's own host copy counts too (an upper bound)
            base = twin_row["measured"]["rss_bytes"] if paired else measured["rss_start_bytes"]
            taken = measured["rss_bytes"] - base
            row["measured_host_bytes"], row["host_error"] = taken, (row["predicted_host_bytes"] - taken) / taken
            row["baseline"] = "twin" if paired else "start"
            line += f" {taken / GIB:12.2f} {100 * row['host_error']:+6.1f}%" + ("" if paired else " (vs start)")
        print(line, flush=True)
        rows.append(row)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
