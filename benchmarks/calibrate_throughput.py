"""Fit the speed model's coefficients (memtune/throughput.py) to measured training steps.

    python benchmarks/calibrate_throughput.py [tests/data/ground_truth_h200.json ...]

Reads measured steps (tokens/s per configuration, from benchmarks/ground_truth.py or
benchmarks/oracle.py), counts each model's FLOPs, traffic and kernels (memtune/predict/flops.py),
fits the efficiency coefficients of `GpuSpeed` by bounded least squares on log(step time), and
prints them with the median, 80th-percentile and max error of the fit. The printed values are
the defaults in memtune/predict/throughput.py (the 80th percentile is its SPEED_ERROR_BAND);
rerun this after measuring a new card.
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

FITTED = {
    # coefficient: (lower, upper) bound of the fit
    "bf16_efficiency": (0.3, 0.75),  # the best dense bf16 GEMMs on an H100/H200 reach ~700-750 of 989 TFLOP/s
    "fp32_efficiency": (0.3, 0.95),
    "logits_traffic": (16.0, 400.0),  # at least the fp32 logits and their gradient, each written and read once
    "traffic_factor": (1.0, 4.0),  # bytes cannot move faster than the card's bandwidth
    "kernel_seconds": (2e-6, 60e-6),
    "chunk_seconds": (1e-6, 5e-3),
}
"""The fitted coefficients of `GpuSpeed` and their bounds: the calibration's models are small (<= 1.5B parameters
but for 8 layers of Phi-3 and 6 of Gemma-2), their steps mostly bound by kernel launches, so the data alone would
drive the bf16 matmul efficiency to infinity; it is held to what the card's GEMMs reach."""


def _shape(model: str, num_layers: int | None = None) -> ModelShape:
    config = resolve(model).config
    if num_layers:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return ModelShape.of(config, parameter_count(config), count=True)


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
            shape = ModelShape.of(config, parameter_count(config), count=True)
            rows.append((shape, train, train.effective_batch_size * train.seq_len / case["tokens_per_second"]))
    return gpu, rows


def errors(speed, rows) -> np.ndarray:
    """Relative error of the predicted step time (= of the tokens/s, inverted) of every row."""
    return np.array([step_seconds(shape, train, speed) / seconds - 1 for shape, train, seconds in rows])


def pairwise_errors(speed, rows) -> np.ndarray:
    """Relative error of the predicted speed ratio of every two rows of one model (the same shape): what ranking
    two configurations of a model rests on, a model-wide bias cancelled."""
    by_model: dict[tuple, list[tuple[float, float]]] = {}
    for shape, train, seconds in rows:
        key = (shape.num_parameters, shape.num_layers, shape.hidden_size, shape.vocab_size)
        tokens = train.effective_batch_size * train.seq_len
        by_model.setdefault(key, []).append((tokens / step_seconds(shape, train, speed), tokens / seconds))
    errors_ = [(predicted_a / predicted_b) / (measured_a / measured_b) - 1
               for pairs in by_model.values() for index, (predicted_a, measured_a) in enumerate(pairs)
               for predicted_b, measured_b in pairs[index + 1:]]
    return np.array(errors_)


def summary(errors_: np.ndarray) -> str:
    absolute = np.abs(errors_)
    return (f"median |error| {np.median(absolute):.1%}, 80th percentile {np.percentile(absolute, 80):.1%}, "
            f"max {np.max(absolute):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*",
                        default=["tests/data/ground_truth_h200.json", "benchmarks/results/oracle_h200.json"])
    args = parser.parse_args()
    gpu, rows = load_rows(args.paths)
    base = gpu_speed(gpu)
    lower = np.log([bounds[0] for bounds in FITTED.values()])
    upper = np.log([bounds[1] for bounds in FITTED.values()])
    start = np.clip(np.log([getattr(base, name) for name in FITTED]), lower + 1e-9, upper - 1e-9)

    def residuals(log_values: np.ndarray) -> np.ndarray:
        speed = dataclasses.replace(base, **dict(zip(FITTED, np.exp(log_values), strict=True)))
        return np.array([np.log(step_seconds(shape, train, speed) / seconds) for shape, train, seconds in rows])

    before = errors(base, rows)
    fit = least_squares(residuals, start, bounds=(lower, upper))
    speed = dataclasses.replace(base, **dict(zip(FITTED, np.exp(fit.x), strict=True)))
    after = errors(speed, rows)
    print(f"{len(rows)} measured steps on {gpu}")
    print(f"current defaults: {summary(before)}")
    print(f"fitted:           {summary(after)}")
    print(f"ratio of two configurations of one model, fitted: {summary(pairwise_errors(speed, rows))}")
    for name in FITTED:
        print(f"    {name} = {getattr(speed, name):.4g}")


if __name__ == "__main__":
    main()
