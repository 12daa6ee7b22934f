"""Fit the speed model's coefficients (memtune/throughput.py) to measured training steps.

    python benchmarks/calibrate_throughput.py [tests/data/ground_truth_h200.json ...]

Reads measured steps (tokens/s per configuration, from benchmarks/ground_truth.py or
benchmarks/oracle.py), fits the efficiency coefficients of `GpuSpeed` by least squares on
log(step time), and prints them with the median/max error of the fit. The printed values are
the defaults in memtune/throughput.py; rerun this after measuring a new card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import TrainConfig  # noqa: E402
from memtune.predict.throughput import ModelShape, gpu_speed, step_seconds  # noqa: E402
from memtune.sources import catalog_config, parameter_count, resolve  # noqa: E402

FITTED = ("bf16_efficiency", "fp32_efficiency", "logits_traffic", "launch_seconds",
          "checkpoint_overhead", "lora_overhead", "chunk_seconds")


def _shape(model: str, num_layers: int | None = None) -> ModelShape:
    config = resolve(model).config
    if num_layers:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return ModelShape.of(config, parameter_count(config))


def load_rows(paths: list[str]) -> tuple[str, list[tuple[ModelShape, TrainConfig, float]]]:
    """(shape, configuration as measured, seconds per step) from ground-truth or oracle files."""
    rows = []
    gpu = ""
    for path in paths:
        data = json.loads(Path(path).read_text())
        gpu = data["environment"]["gpu"]
        if "grid" in data["cases"][0]:  # benchmarks/oracle.py: steps accumulate at most `accumulation` micro-batches
            limit = data.get("accumulation", 4)
            for case in data["cases"]:
                shape = _shape(case["case"].split()[0])
                for point in case["grid"]:
                    if point["fits"] and point["tokens_per_second"]:
                        train = TrainConfig.from_dict(point["config"])
                        train = train.replace(grad_accum_steps=min(train.grad_accum_steps, limit))
                        rows.append(
                            (shape, train, train.effective_batch_size * train.seq_len / point["tokens_per_second"])
                        )
            continue
        for case in data["cases"]:
            if not case.get("fits") or not case.get("tokens_per_second"):
                continue
            config = catalog_config(case["model"])
            if case.get("num_layers"):
                config.num_hidden_layers = case["num_layers"]
                if getattr(config, "layer_types", None):
                    config.layer_types = config.layer_types[: case["num_layers"]]
            train = TrainConfig.from_dict(case["config"])
            shape = ModelShape.of(config, parameter_count(config))
            rows.append((shape, train, train.effective_batch_size * train.seq_len / case["tokens_per_second"]))
    return gpu, rows


def errors(speed, rows) -> np.ndarray:
    return np.array([step_seconds(shape, train, speed) / seconds - 1 for shape, train, seconds in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests/data/ground_truth_h200.json"])
    args = parser.parse_args()
    gpu, rows = load_rows(args.paths)
    base = gpu_speed(gpu)
    start = np.log([getattr(base, name) for name in FITTED])

    def residuals(log_values: np.ndarray) -> np.ndarray:
        speed = dataclasses.replace(base, **dict(zip(FITTED, np.exp(log_values), strict=True)))
        return np.array([np.log(step_seconds(shape, train, speed) / seconds) for shape, train, seconds in rows])

    before = errors(base, rows)
    fit = least_squares(residuals, start)
    speed = dataclasses.replace(base, **dict(zip(FITTED, np.exp(fit.x), strict=True)))
    after = errors(speed, rows)
    print(f"{len(rows)} measured steps on {gpu}")
    print(f"current defaults: median |error| {np.median(abs(before)):.1%}, max {np.max(abs(before)):.1%}")
    print(f"fitted:           median |error| {np.median(abs(after)):.1%}, max {np.max(abs(after)):.1%}")
    for name in FITTED:
        print(f"    {name} = {getattr(speed, name):.4g}")


if __name__ == "__main__":
    main()
