"""Predicted vs measured peak memory of one training step, for the accuracy cases.

On a GPU machine (measures, then predicts with both trace paths):
    PYTHONPATH=. python3 benchmarks/accuracy.py --measure --paths cuda cpu --out benchmarks/results/accuracy.json
Anywhere (predicts with the GPU-free path against recorded measurements):
    PYTHONPATH=. python3 benchmarks/accuracy.py --ground-truth tests/data/ground_truth_h200.json --paths cpu

Measured values are deltas over the allocator's state before each trial, with cuBLAS workspaces
created beforehand (`measure.memory.warm_up`), so they compare with `Estimate.peak_*_bytes` directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import accuracy_cases, model_config  # noqa: E402
from memtune.predict.estimate import estimate  # noqa: E402

GIB = 1 << 30


def summarize(rows: list[dict], path: str, key: str) -> dict:
    errors = [abs(r[f"{path}_{key}_error"]) for r in rows if f"{path}_{key}_error" in r]
    if not errors:
        return {}
    return {"cases": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="measure on this machine's GPU first")
    parser.add_argument("--ground-truth", default="", help="recorded measurements (JSON from --measure)")
    parser.add_argument("--paths", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results/accuracy.json")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()

    cases = accuracy_cases()[: args.limit or None]
    if args.measure:
        from benchmarks.ground_truth import environment, measure_cases

        measured = {"environment": environment(), "cases": measure_cases(cases)}
    else:
        measured = json.loads(Path(args.ground_truth).read_text())
    by_name = {row["case"]: row for row in measured["cases"]}

    rows = []
    for case in cases:
        truth = by_name.get(case.name)
        if not truth or not truth.get("fits"):
            continue
        row = {"case": case.name, "measured_allocated_bytes": truth["peak_allocated_bytes"],
               "measured_reserved_bytes": truth["peak_reserved_bytes"]}
        for path in args.paths:
            started = time.perf_counter()
            try:
                predicted = estimate(model_config(case), case.config, device=path)
            except Exception as error:  # noqa: BLE001 - report and continue
                row[f"{path}_error"] = f"{type(error).__name__}: {error}"[:300]
                continue
            row[f"{path}_allocated_bytes"] = predicted.peak_allocated_bytes
            row[f"{path}_reserved_bytes"] = predicted.peak_reserved_bytes
            row[f"{path}_seconds"] = time.perf_counter() - started
            for key in ("allocated", "reserved"):
                row[f"{path}_{key}_error"] = row[f"{path}_{key}_bytes"] / row[f"measured_{key}_bytes"] - 1
        rows.append(row)
        line = f"{case.name:58s} meas {row['measured_reserved_bytes'] / GIB:7.3f}"
        for path in args.paths:
            if f"{path}_reserved_bytes" in row:
                line += (
                    f" | {path} {row[f'{path}_reserved_bytes'] / GIB:7.3f}"
                    f" ({100 * row[f'{path}_reserved_error']:+5.1f}%"
                    f" alloc {100 * row[f'{path}_allocated_error']:+5.1f}%)"
                )
            else:
                line += f" | {path} FAILED {row.get(f'{path}_error', '')[:60]}"
        print(line, flush=True)

    summary = {path: {key: summarize(rows, path, key) for key in ("allocated", "reserved")} for path in args.paths}
    result = {"environment": measured["environment"], "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.measure:
        truth_path = Path(args.out).with_name("ground_truth.json")
        truth_path.write_text(json.dumps(measured, indent=1))
    print("\npath  quantity   cases  median|err|  max|err|")
    for path, quantities in summary.items():
        for key, stats in quantities.items():
            if stats:
                print(f"{path:5s} {key:10s} {stats['cases']:5d}  {100 * stats['median_abs_error']:9.2f}%  "
                      f"{100 * stats['max_abs_error']:7.2f}%")


if __name__ == "__main__":
    main()
