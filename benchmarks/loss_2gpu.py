"""The fused losses with several GPUs (issue 14, item 3): predicted vs measured per-GPU peak reserved and tokens/s,
standard, chunked and (with liger-kernel installed) Liger's loss side by side, under FSDP2 and DDP on 2 GPUs and
under FSDP CPU offload on one.

The chunked loss now runs inside the causal LM's forward (`recipe.loss.use_chunked_loss`), so the DDP and FSDP
wrappers see it. Each case is measured by `memtune.measure.sharded.measure_sharded` (one spawned process per GPU,
3 full optimizer steps, the peak the largest over ranks) and predicted by `memtune.predict.estimate.estimate` on
both trace paths; the speed model's tokens/s (the card's rates, the host copy rate measured here for offload) stands
beside the measured. Models are catalog configs with random weights, bf16-mixed, fused AdamW.

On a 2-GPU machine (about 4 minutes):
    PYTHONPATH=. python3 benchmarks/loss_2gpu.py --out $OUT/loss_2gpu_h200.json
Predictions only (no GPU, CPU path): add --no-measure --paths cpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig  # noqa: E402


def cases() -> list[tuple[str, str, TrainConfig]]:
    """(name, catalog model, configuration): each with the standard and the chunked loss, and Liger's fused loss
    where liger-kernel is installed."""
    from memtune.config import liger_available

    bases = [
        ("qwen2.5-0.5b 4x2048 fsdp", "Qwen/Qwen2.5-0.5B",
         TrainConfig(seq_len=2048, micro_batch_size=4, amp="bf16", num_gpus=2, strategy="fsdp")),
        ("llama-3.2-1b 2x2048 fsdp", "meta-llama/Llama-3.2-1B",
         TrainConfig(seq_len=2048, micro_batch_size=2, amp="bf16", num_gpus=2, strategy="fsdp")),
        ("qwen2.5-0.5b 4x2048 ddp", "Qwen/Qwen2.5-0.5B",
         TrainConfig(seq_len=2048, micro_batch_size=4, amp="bf16", num_gpus=2, strategy="ddp")),
        ("llama-3.2-1b 2x2048 ddp ckpt", "meta-llama/Llama-3.2-1B",
         TrainConfig(seq_len=2048, micro_batch_size=2, amp="bf16", num_gpus=2, strategy="ddp",
                     gradient_checkpointing=True)),
        ("llama-3.2-1b 2x2048 ckpt offload 1gpu", "meta-llama/Llama-3.2-1B",
         TrainConfig(seq_len=2048, micro_batch_size=2, amp="bf16", gradient_checkpointing=True,
                     offload="parameters")),
    ]
    losses = ("standard", "chunked", "liger") if liger_available() else ("standard", "chunked")
    return [(f"{name} {loss}", model, config.replace(loss=loss)) for name, model, config in bases for loss in losses]


def predict(model: str, config: TrainConfig, path: str) -> dict:
    from memtune.predict.estimate import estimate
    from memtune.sources import catalog_config

    started = time.perf_counter()
    try:
        found = estimate(catalog_config(model), config, device=path)
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"peak_reserved_bytes": found.peak_reserved_bytes, "peak_allocated_bytes": found.peak_allocated_bytes,
            "total_bytes": found.total_bytes, "host_bytes": found.host_bytes, "breakdown": found.breakdown,
            "seconds": time.perf_counter() - started}


def predicted_tokens_per_second(model: str, config: TrainConfig, gpu: str, host_copy_rate: float | None) -> float:
    from memtune.predict import throughput
    from memtune.sources import catalog_config, parameter_count

    model_config = catalog_config(model)
    speed = throughput.gpu_speed(gpu)
    if host_copy_rate:
        speed = speed.scaled(pcie_bytes_per_second=host_copy_rate)
    return throughput.tokens_per_second(throughput.ModelShape.of(model_config, parameter_count(model_config)),
                                        config, speed)


def measure(model: str, config: TrainConfig) -> dict:
    from memtune.measure.sharded import measure_sharded
    from memtune.sources import catalog_config

    started = time.perf_counter()
    try:
        found = measure_sharded(catalog_config(model), config, steps=3, accumulation_limit=None)
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"fits": False, "error": f"{type(error).__name__}: {error}"[:300]}
    return {**found.to_dict(), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/loss_2gpu.json")
    parser.add_argument("--paths", nargs="+", default=["cuda", "cpu"], choices=["cuda", "cpu"])
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--match", default="", help="only cases whose name has this text")
    parser.add_argument("--gpu", default="H200", help="the card whose rates the speed model uses")
    args = parser.parse_args()
    host_copy_rate = None
    if not args.no_measure:
        from memtune.measure.probe import host_copy_rate as measure_host_copy_rate

        host_copy_rate = measure_host_copy_rate()
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'case':48s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s}" for path in args.paths)
          + " | tok/s measured predicted", flush=True)
    for name, model, config in cases():
        if args.match not in name:
            continue
        row: dict = {"case": name, "model": model, "config": config.to_dict(),
                     "predicted_tokens_per_second": predicted_tokens_per_second(model, config, args.gpu,
                                                                                host_copy_rate)}
        for path in args.paths:
            row[path] = predict(model, config, path)
        if not args.no_measure:
            row["measured"] = measure(model, config)
        measured = row.get("measured", {})
        line = f"{name:48s} {reserved_columns(row, args.paths)}"
        line += f" | {measured.get('tokens_per_second') or 0:9,.0f} {row['predicted_tokens_per_second']:9,.0f}"
        print(line, flush=True)
        rows.append(row)
        out.write_text(json.dumps({"host_copy_rate": host_copy_rate, "rows": rows}, indent=1))
    print_summary(rows, args.paths)
    print(f"wrote {out}", file=sys.stderr)


def reserved_columns(row: dict, paths: list[str]) -> str:
    """The measured peak reserved (GiB) and, per trace path, the predicted one with its error; each error is also
    kept in the row as `<path>_reserved_error` (a fraction of the measured peak)."""
    measured = row.get("measured", {})
    line = f"{measured.get('peak_reserved_bytes', 0) / GIB:8.2f}"
    for path in paths:
        predicted = row[path].get("peak_reserved_bytes")
        if predicted and measured.get("fits"):
            row[f"{path}_reserved_error"] = (predicted - measured["peak_reserved_bytes"]) / measured[
                "peak_reserved_bytes"]
        error = row.get(f"{path}_reserved_error")
        shown = f"{100 * error:+6.2f}%" if error is not None else f"{'-':>7s}"
        line += f" | {(predicted or 0) / GIB:8.2f} {shown}"
    return line


def print_summary(rows: list[dict], paths: list[str]) -> None:
    """Per trace path: the cases compared, the median and the largest |error| of peak reserved."""
    for path in paths:
        errors = [abs(row[f"{path}_reserved_error"]) for row in rows if f"{path}_reserved_error" in row]
        if errors:
            print(f"{path}: {len(errors)} cases, median |error| {100 * statistics.median(errors):.2f}%, "
                  f"max {100 * max(errors):.2f}%")


if __name__ == "__main__":
    main()
