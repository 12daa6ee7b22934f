"""Partial and offloaded activation checkpointing on the GPU (issue 14): predicted vs measured peak memory and
tokens/s when the first k of a model's L decoder layers are checkpointed (`TrainConfig.checkpoint_layers`), and
(`--suite offload`) when the checkpointed layers' inputs wait in pinned host memory (`offload_activations`).

Cases: Qwen/Qwen2.5-0.5B (24 layers), meta-llama/Llama-3.2-1B (16) and google/gemma-2-2b (26, alternating
sliding/full attention) at their published shapes with random weights, bf16-mixed, fused AdamW, 4 x 1024 tokens,
k = 0, L/4, L/2, 3L/4 and L. Each is measured (`memtune.measure.verify.measure`, 3 steps, one after the other in
this process, as benchmarks/ground_truth.py does) and predicted on both trace paths; the speed model's tokens/s
(H200 rates) stands beside the measured ones.

The offload suite: the same three models at 4 x 1024, every layer and half of them checkpointed, with the inputs
offloaded; and Llama-3.2-1B at 8 x 4096 with the chunked loss, checkpointing with and without the offload (where
the saved inputs, 4 GiB, are the largest part of the activations). The predicted tokens/s use the host copy rate
`measure.probe.host_copy_rate` measures on this GPU (the H200 rates otherwise).

On the GPU machine:
    PYTHONPATH=. python3 benchmarks/activations.py --out $OUT/activations_h200.json
    PYTHONPATH=. python3 benchmarks/activations.py --suite offload --out $OUT/activations_offload_h200.json
Anywhere (predictions only, --paths cpu): add --no-measure; against recorded measurements: --measured FILE.JSONL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import Case, model_config, prediction_arguments  # noqa: E402
from memtune.config import Adapter, TrainConfig  # noqa: E402

GIB = 1 << 30
MODELS = {"Qwen/Qwen2.5-0.5B": 24, "meta-llama/Llama-3.2-1B": 16, "google/gemma-2-2b": 26}


def checkpointed_counts(num_layers: int) -> list[int]:
    """0, a quarter, a half, three quarters and all of the layers."""
    return sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers})


def case_config(layers: int, num_layers: int) -> TrainConfig:
    return TrainConfig(seq_len=1024, micro_batch_size=4, weights_dtype="fp32", amp="bf16",
                       gradient_checkpointing=layers > 0,
                       checkpoint_layers=layers if 0 < layers < num_layers else None)


CASES = [Case(model, None, case_config(layers, num_layers))
         for model, num_layers in MODELS.items() for layers in checkpointed_counts(num_layers)]
LAYERS = {**MODELS, "Qwen/Qwen2.5-1.5B": 28}
LONG_LORA = TrainConfig(seq_len=8192, micro_batch_size=4, weights_dtype="bf16", amp="bf16", adapter=Adapter(),
                        gradient_checkpointing=True, loss="chunked")
OFFLOAD_CASES = [
    *(Case(model, None, case_config(layers, num_layers).replace(offload_activations=True))
      for model, num_layers in MODELS.items() for layers in (num_layers, num_layers // 2)),
    *(Case(model, None, LONG_LORA.replace(offload_activations=offload))
      for model in ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B") for offload in (False, True)),
]
SUITES = {"partial": CASES, "offload": OFFLOAD_CASES}


def case_name(case: Case) -> str:
    config = case.config
    layers = config.checkpointed_layers(LAYERS[case.model])
    shape = f"{config.micro_batch_size}x{config.seq_len}" + (" chunked" if config.loss == "chunked" else "")
    precision = f"{config.weights_dtype} LoRA" if config.adapter else config.precision
    return (f"{case.model} {shape} {precision} "
            + f"ckpt {layers}/{LAYERS[case.model]}" + (" offloaded" if config.offload_activations else ""))


def measure(case: Case) -> dict:
    """Measure the case on this process's GPU (`verify.measure`, 3 steps: peaks are deltas over the allocator's
    state before the trial, which frees what it made); a failure becomes a row with the error."""
    import torch

    from memtune.measure.verify import measure as trial

    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    reset = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if reset is not None:
        reset()
    try:
        row = trial(model_config(case), case.config, steps=3).to_dict()
    except Exception as error:  # noqa: BLE001 - record and go on
        return {"fits": False, "error": f"{type(error).__name__}: {error}"[:300]}
    if host_stats is not None:  # torch's caching host allocator: the pinned blocks save_on_cpu took
        stats = host_stats()
        row["host_memory_stats"] = {key: value for key, value in stats.items()
                                    if key.startswith(("allocated_bytes", "reserved_bytes", "num_host_alloc"))}
    return row


def predicted_tokens_per_second(case: Case, gpu: str, host_copy_rate: float | None) -> float:
    from memtune.predict import throughput
    from memtune.sources import parameter_count

    config = model_config(case)
    shape = throughput.ModelShape.of(config, parameter_count(config))
    speed = throughput.gpu_speed(gpu)
    if host_copy_rate:
        speed = speed.scaled(pcie_bytes_per_second=host_copy_rate)
    return throughput.tokens_per_second(shape, case.config, speed)


def row_of(case: Case, measured: dict | None, paths: list[str], gpu: str, host_copy_rate: float | None) -> dict:
    from benchmarks.accuracy import case_row

    row = case_row(case, measured, paths)
    row.update(case=case_name(case), config=case.config.to_dict(),
               predicted_tokens_per_second=predicted_tokens_per_second(case, gpu, host_copy_rate))
    if case.config.offload_activations:
        from memtune.predict.estimate import estimate

        row["predicted_host_bytes"] = estimate(model_config(case), case.config, device=paths[0]).host_bytes
    if measured is not None and measured.get("fits"):
        row["measured_tokens_per_second"] = measured.get("tokens_per_second")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prediction_arguments(parser)
    parser.add_argument("--gpu", default="H200", help="the card whose rates the speed model uses (default H200)")
    parser.add_argument("--out", default="benchmarks/results/activations.json")
    parser.add_argument("--suite", choices=tuple(SUITES), default="partial")
    parser.add_argument("--host-copy-rate", type=float, default=None, metavar="BYTES_PER_S",
                        help="the host link's rate for the speed model (default: measured here on a GPU, else the "
                             "card's assumed rate)")
    args = parser.parse_args()
    cases = [case for case in SUITES[args.suite] if any(text in case_name(case) for text in args.match)]
    measured: dict[str, dict] = {}
    host_copy_rate = args.host_copy_rate
    if args.measured:
        measured = {row["case"]: row for row in map(json.loads, Path(args.measured).read_text().splitlines())}
    elif not args.no_measure:
        from memtune.measure import memory
        from memtune.measure.probe import host_copy_rate as measure_host_copy_rate

        memory.warm_up()  # cuBLAS workspaces first, as Plan.prepare does (measured peaks exclude them)
        host_copy_rate = host_copy_rate or measure_host_copy_rate()
        print(f"host copy rate: {host_copy_rate / 1e9:.1f} GB/s (pinned, the slower direction)", flush=True)
        raw = Path(args.out).with_suffix(".measured.jsonl")
        raw.parent.mkdir(parents=True, exist_ok=True)
        for case in cases:
            measured[case_name(case)] = measure(case)
            with raw.open("a") as file:
                file.write(json.dumps({"case": case_name(case), **measured[case_name(case)]}) + "\n")
    print(f"{'case':72s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s}" for path in args.paths)
          + " | tok/s measured predicted", flush=True)
    rows = []
    for case in cases:
        row = row_of(case, measured.get(case_name(case)), args.paths, args.gpu, host_copy_rate)
        rows.append(row)
        line = f"{row['case']:72s} {row.get('measured_reserved_bytes', 0) / GIB:8.2f}"
        for path in args.paths:
            error = row.get(f"{path}_reserved_error")
            line += (f" | {row.get(f'{path}_reserved_bytes', 0) / GIB:8.2f} "
                     + (f"{100 * error:+6.2f}%" if error is not None else f"{'-':>7s}"))
        speed = row.get("measured_tokens_per_second")
        line += f" | {speed or 0:9,.0f} {row['predicted_tokens_per_second']:9,.0f}"
        print(line, flush=True)
    summary = {}
    for path in args.paths:
        errors = [abs(row[f"{path}_reserved_error"]) for row in rows if f"{path}_reserved_error" in row]
        if errors:
            summary[path] = {"cases": len(errors), "median_abs_error": statistics.median(errors),
                             "max_abs_error": max(errors), "within_5pct": sum(e <= 0.05 for e in errors)}
            print(f"{path}: {len(errors)} cases, median |error| {100 * statistics.median(errors):.2f}%, "
                  f"max {100 * max(errors):.2f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu_rates": args.gpu, "host_copy_rate": host_copy_rate, "summary": summary,
                               "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
