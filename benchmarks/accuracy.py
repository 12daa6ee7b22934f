"""Predicted vs measured peak memory of one training step, for a suite of benchmark cases.

Suites (benchmarks/cases.py): accuracy (the catalog matrix, the default), large (large micro-batches
without memory pressure, issue 12 item 8), architectures (REAL_ARCHITECTURES: 13 architectures outside
the catalog at published shapes, 2 configurations each), all (the three).

On a GPU machine (measures, then predicts with both trace paths; the measurements are saved next to
--out as <out stem>_ground_truth.json, ground_truth.json for the accuracy suite):
    PYTHONPATH=. python3 benchmarks/accuracy.py --suite architectures --measure --paths cuda cpu
Anywhere (predicts with the GPU-free path against recorded measurements, or alone without --ground-truth):
    PYTHONPATH=. python3 benchmarks/accuracy.py --ground-truth tests/data/ground_truth_h200.json --paths cpu
    PYTHONPATH=. python3 benchmarks/accuracy.py --suite large --paths cpu --out /tmp/large.json

Measured values are deltas over the allocator's state before each trial, with cuBLAS workspaces
created beforehand (`measure.memory.warm_up`), so they compare with `Estimate.peak_*_bytes` directly.
A case whose measurement, config or trace fails keeps its row, with the error in it; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import (  # noqa: E402
    Case,
    accuracy_cases,
    large_batch_cases,
    model_config,
    real_architecture_cases,
)
from memtune.predict.estimate import estimate  # noqa: E402

GIB = 1 << 30
TOLERANCE = 0.05
"""Issue 12: configurations at real size agree with measurement within 5% (peak reserved)."""
SUITES = {
    "accuracy": accuracy_cases,
    "large": large_batch_cases,
    "architectures": real_architecture_cases,
    "all": lambda: accuracy_cases() + large_batch_cases() + real_architecture_cases(),
}


def summarize(rows: list[dict], path: str, key: str) -> dict:
    """Count, median and largest |relative error| of `path`'s peak `key` ("allocated"/"reserved"), and
    how many cases are within TOLERANCE of the measurement; {} where no case has both numbers."""
    errors = [abs(r[f"{path}_{key}_error"]) for r in rows if f"{path}_{key}_error" in r]
    if not errors:
        return {}
    return {"cases": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "within_5pct": sum(error <= TOLERANCE for error in errors)}


def case_row(case: Case, truth: dict | None, paths: list[str], breakdown: tuple[str, ...] = ()) -> dict:
    """One case's measured and predicted peaks (bytes), relative errors and per-path predict seconds, and the
    predicted bytes of each `breakdown` category at the peak (`{path}_{category}_bytes`); a failed measurement
    or trace is recorded as `measured_error` / `{path}_error`, never raised."""
    row: dict = {"case": case.name, "model": case.model, "model_type": case.model_type or model_type_of(case),
                 "num_layers": case.num_layers}
    if truth is None:
        row["measured_error"] = "not measured (no --measure, or no row of this case in --ground-truth)"
    elif not truth.get("fits"):
        row["measured_error"] = truth.get("error") or "did not fit (out of memory)"
    else:
        row["measured_allocated_bytes"] = truth["peak_allocated_bytes"]
        row["measured_reserved_bytes"] = truth["peak_reserved_bytes"]
    for path in paths:
        started = time.perf_counter()
        try:
            predicted = estimate(model_config(case), case.config, device=path)
        except Exception as error:  # noqa: BLE001 - report and continue
            row[f"{path}_error"] = f"{type(error).__name__}: {error}"[:300]
            row[f"{path}_seconds"] = time.perf_counter() - started
            continue
        row[f"{path}_seconds"] = time.perf_counter() - started
        row[f"{path}_allocated_bytes"] = predicted.peak_allocated_bytes
        row[f"{path}_reserved_bytes"] = predicted.peak_reserved_bytes
        row[f"{path}_ran_on"] = predicted.trace_device
        for category in breakdown:
            row[f"{path}_{category}_bytes"] = predicted.breakdown.get(category, 0)
        if predicted.trace_note:
            row[f"{path}_note"] = predicted.trace_note
        if "measured_reserved_bytes" in row:
            for key in ("allocated", "reserved"):
                row[f"{path}_{key}_error"] = row[f"{path}_{key}_bytes"] / row[f"measured_{key}_bytes"] - 1
    return row


def model_type_of(case: Case) -> str:
    """The transformers model_type of a catalog case ("" where its config cannot be built)."""
    try:
        return str(model_config(case).model_type)
    except Exception:  # noqa: BLE001 - the predict step records the error
        return ""


def format_row(row: dict, paths: list[str]) -> str:
    """One table line: case, measured reserved GiB, then per path predicted reserved GiB and error %."""
    measured = row.get("measured_reserved_bytes")
    line = f"{row['case'][:66]:66s} " + (f"{measured / GIB:8.2f}" if measured else f"{'-':>8s}")
    for path in paths:
        if f"{path}_reserved_bytes" not in row:
            line += f" | {path} FAILED {row.get(f'{path}_error', '')[:50]}"
            continue
        line += f" | {row[f'{path}_reserved_bytes'] / GIB:8.2f}"
        error = row.get(f"{path}_reserved_error")
        line += f" {100 * error:+6.1f}%" if error is not None else f" {'':7s}"
        line += f" {row[f'{path}_seconds']:5.1f}s"
    note = row.get("measured_error", "")
    if note and not note.startswith("not measured"):
        line += f"  [measure: {note[:60]}]"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="accuracy", help="which cases (default accuracy)")
    parser.add_argument("--measure", action="store_true", help="measure the suite on this machine's GPU first")
    parser.add_argument("--ground-truth", default="", help="recorded measurements (JSON from --measure); "
                        "without it and --measure, only predictions")
    parser.add_argument("--paths", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--out", default="", help="result JSON (default benchmarks/results/accuracy.json for the "
                        "accuracy suite, accuracy_<suite>.json next to it otherwise)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N cases of the suite")
    parser.add_argument("--match", nargs="+", default=[""], metavar="TEXT",
                        help="only cases whose name contains one of these texts (e.g. mistral: qwen3_moe:)")
    args = parser.parse_args()
    out = Path(args.out or ("benchmarks/results/accuracy.json" if args.suite == "accuracy"
                            else f"benchmarks/results/accuracy_{args.suite}.json"))

    cases = [case for case in SUITES[args.suite]() if any(text in case.name for text in args.match)]
    cases = cases[: args.limit or None]
    if args.measure:
        from benchmarks.ground_truth import environment, measure_cases

        measured = {"environment": environment(), "cases": measure_cases(cases)}
        out.parent.mkdir(parents=True, exist_ok=True)
        truth_name = "ground_truth.json" if args.suite == "accuracy" else f"{out.stem}_ground_truth.json"
        out.with_name(truth_name).write_text(json.dumps(measured, indent=1))
    elif args.ground_truth:
        measured = json.loads(Path(args.ground_truth).read_text())
    else:  # predictions only
        measured = {"environment": None, "cases": []}
    by_name = {row["case"]: row for row in measured["cases"]}

    print(f"{'case':66s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s} {'time':>6s}"
                                                   for path in args.paths), flush=True)
    rows = []
    for case in cases:
        rows.append(case_row(case, by_name.get(case.name), args.paths))
        print(format_row(rows[-1], args.paths), flush=True)

    summary = {path: {key: summarize(rows, path, key) for key in ("allocated", "reserved")} for path in args.paths}
    result = {"environment": measured.get("environment"), "suite": args.suite, "summary": summary, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("\npath  quantity   cases  median|err|  max|err|  within 5%")
    for path, quantities in summary.items():
        for key, stats in quantities.items():
            if stats:
                print(f"{path:5s} {key:10s} {stats['cases']:5d}  {100 * stats['median_abs_error']:9.2f}%  "
                      f"{100 * stats['max_abs_error']:7.2f}%  {stats['within_5pct']:3d}")
    for path in args.paths:
        reserved = summary[path]["reserved"]
        failed = sum(f"{path}_error" in row for row in rows)
        print(f"{path}: {reserved.get('within_5pct', 0)} of {reserved.get('cases', 0)} measured cases within 5% of "
              f"measured peak reserved; {failed} of {len(rows)} traces failed")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
