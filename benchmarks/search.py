"""memtune's search vs accelerate's find_executable_batch_size vs doubling + bisection, under memory caps.

    PYTHONPATH=. python3 benchmarks/search.py --out benchmarks/results/search_h100.json

Each case (model, sequence length, wanted batch, cap) emulates a smaller GPU on this one with
torch.cuda.set_per_process_memory_fraction(cap / total); the cap bounds torch's pool, as a card of
`cap` + CUDA context would. In one process, side by side:

- memtune: `fit_model` with the budget the probe reports (the cap plus this process's context),
  trial steps to verify. "seconds" is the wall time to the verified fit (probe, tracing, search,
  trials); predicting the alternatives that explain the choice afterwards is reported apart.
- FEBS: `accelerate.utils.find_executable_batch_size` from the wanted batch, bf16 autocast, no
  checkpointing (what `Trainer(auto_find_batch_size=True, bf16=True)` runs); the batch shrinks x0.9
  per OOM and gradient accumulation is not adjusted (transformers PR #33281 is open).
- bisection: Lightning's BatchSizeFinder "binsearch" mode: from 1, double until OOM (or the wanted
  batch), then bisect; bf16 autocast, no checkpointing.

Every trial of FEBS and bisection is what memtune's verification runs: build the model with random
weights, run `--steps` optimizer steps (memtune.verify.measure). Afterwards each method's final
configuration is measured again, under the same cap, for 3 steps: that is the tokens/s reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig  # noqa: E402
from memtune.search.choose import Policy  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    seq_len: int
    batch_size: int
    cap_gib: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.batch_size}x{self.seq_len} @{self.cap_gib}GiB"


CASES = [
    Case("gpt2-medium", 1024, 32, 8),
    Case("smollm2-360m", 2048, 16, 8),
    Case("qwen2.5-0.5b", 1024, 32, 16),
    Case("gpt2-large", 1024, 16, 16),
    Case("llama-3.2-1b", 1024, 32, 24),
    Case("qwen2.5-1.5b", 1024, 16, 40),
]


POLICY = Policy(allow_offload=False)
"""Offload is left out of this comparison: the batch-size finders cannot offload either."""


def set_cap(case: Case) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(case.cap_gib * GIB / total, 0)


def plain_bf16(case: Case, micro_batch_size: int) -> TrainConfig:
    """What a batch-size finder tries: bf16 autocast, no checkpointing, no accumulation."""
    return TrainConfig(seq_len=case.seq_len, micro_batch_size=micro_batch_size, amp="bf16")


def run_memtune(case: Case, source, num_parameters: int, steps: int) -> dict:
    from memtune.fit import fit_model
    from memtune.measure.probe import probe

    set_cap(case)
    started = time.perf_counter()
    gpu = probe().gpus[0]
    budget = case.cap_gib * GIB + gpu.context_bytes
    result = fit_model(source, num_parameters, case.seq_len, case.batch_size, budget_bytes=budget,
                       budget_label=f"cap {case.cap_gib} GiB", trial_steps=steps, policy=POLICY)
    seconds = time.perf_counter() - started
    search = result.search
    chosen = search.chosen
    return {
        "method": "memtune",
        "seconds": seconds - search.explain_seconds,
        "seconds_with_explanation": seconds,
        "explain_seconds": search.explain_seconds,
        "trials": search.trials,
        "ooms": search.trial_ooms,
        "estimates": search.estimates,
        "search_seconds": search.seconds,
        "config": None if chosen is None else chosen.config.to_dict(),
        "description": None if chosen is None else chosen.config.describe(),
        "predicted_total_bytes": None if chosen is None else chosen.predicted_total_bytes,
        "trial_total_bytes": None if chosen is None else chosen.measured_total_bytes,
        "predicted_tokens_per_second": None if chosen is None else chosen.predicted_tokens_per_second,
        "candidates": [
            {
                "description": c.config.describe(),
                "status": c.status,
                "predicted_total_bytes": c.predicted_total_bytes,
                "predicted_tokens_per_second": c.predicted_tokens_per_second,
            }
            for c in search.candidates
            if c.status != "not evaluated"
        ],
        "budget_bytes": budget,
    }


def run_febs(case: Case, model_config, steps: int) -> dict:
    import torch
    from accelerate.utils import find_executable_batch_size

    from memtune.measure import verify

    set_cap(case)
    tried: list[tuple[int, bool]] = []
    started = time.perf_counter()

    @find_executable_batch_size(starting_batch_size=case.batch_size)
    def attempt(batch_size: int) -> TrainConfig:
        config = plain_bf16(case, batch_size)
        measurement = verify.measure(model_config, config, steps=steps)
        tried.append((batch_size, measurement.fits))
        if not measurement.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. " + measurement.error)
        return config

    try:
        config, error = attempt(), ""
    except RuntimeError as failure:  # "No executable batch size found, reached zero."
        config, error = None, str(failure)
    return {"method": "febs", "seconds": time.perf_counter() - started, "trials": len(tried),
            "ooms": sum(1 for _, fits in tried if not fits), "tried": tried, "error": error,
            "config": None if config is None else config.to_dict(),
            "description": None if config is None else config.describe()}


def run_bisection(case: Case, model_config, steps: int) -> dict:
    from memtune.measure import verify

    set_cap(case)
    tried: list[tuple[int, bool]] = []
    started = time.perf_counter()

    def fits(batch_size: int) -> bool:
        ok = verify.measure(model_config, plain_bf16(case, batch_size), steps=steps).fits
        tried.append((batch_size, ok))
        return ok

    low, high, size = 0, None, 1
    while True:  # Lightning's _run_binary_scaling: double until failure, then bisect
        if fits(size):
            low = size
            if high is None:
                if size >= case.batch_size:
                    break
                size = min(2 * size, case.batch_size)
                continue
        else:
            high = size
        if high is not None:
            if high - low <= 1:
                break
            size = (low + high) // 2
    config = plain_bf16(case, low) if low else None
    return {"method": "bisection", "seconds": time.perf_counter() - started, "trials": len(tried),
            "ooms": sum(1 for _, ok in tried if not ok), "tried": tried,
            "config": None if config is None else config.to_dict(),
            "description": None if config is None else config.describe()}


def measure_final(case: Case, model_config, row: dict) -> None:
    from memtune.measure import verify

    if row["config"] is None:
        row["tokens_per_second"] = 0.0
        return
    set_cap(case)
    measurement = verify.measure(model_config, TrainConfig.from_dict(row["config"]), steps=3, accumulation_limit=None)
    row["tokens_per_second"] = measurement.tokens_per_second if measurement.fits else 0.0
    row["final_peak_reserved_bytes"] = measurement.peak_reserved_bytes
    row["final_fits"] = measurement.fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per trial, for every method (default 2)")
    parser.add_argument("--cases", type=int, nargs="*", default=None, help="indices into CASES (default all)")
    args = parser.parse_args()

    import torch

    from benchmarks.ground_truth import environment
    from memtune.measure import memory
    from memtune.sources import parameter_count, resolve

    env = environment()
    memory.warm_up()
    rows = []
    for index in args.cases if args.cases is not None else range(len(CASES)):
        case = CASES[index]
        source = resolve(case.model)
        methods = [run_memtune(case, source, parameter_count(source.config), args.steps),
                   run_febs(case, source.config, args.steps), run_bisection(case, source.config, args.steps)]
        for row in methods:
            measure_final(case, source.config, row)
        rows.append({"case": case.name, "model": case.model, "seq_len": case.seq_len, "batch_size": case.batch_size,
                     "cap_bytes": case.cap_gib * GIB, "methods": methods})
        print(f"\n{case.name}", flush=True)
        for row in methods:
            print(f"  {row['method']:10s} {row['trials']:3d} trials {row['ooms']:3d} OOMs {row['seconds']:7.1f} s "
                  f"{row['tokens_per_second']:9.0f} tok/s  {row['description']}", flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"environment": env, "steps_per_trial": args.steps, "cases": rows}, indent=1)
        )
    summary(rows)


def summary(rows: list[dict]) -> None:
    print(
        f"\n{'case':42s} {'memtune trials/OOMs/s':>22s} {'FEBS trials/OOMs/s':>20s} {'time ratio':>10s} "
        f"{'tok/s vs FEBS':>13s}"
    )
    for row in rows:
        m, f = row["methods"][0], row["methods"][1]
        ratio = m["seconds"] / f["seconds"] if f["seconds"] else float("nan")
        speed = m["tokens_per_second"] / f["tokens_per_second"] if f["tokens_per_second"] else float("inf")
        print(
            f"{row['case']:42s} {m['trials']:>7d}/{m['ooms']}/{m['seconds']:6.1f} "
            f"{f['trials']:>8d}/{f['ooms']}/{f['seconds']:6.1f} "
            f"{ratio:10.2f} {speed:13.2f}"
        )


if __name__ == "__main__":
    main()
