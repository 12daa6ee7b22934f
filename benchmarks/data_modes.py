"""The data modes on a GPU (issue 16, item 1): memtune's predicted peak for a data plan vs the peak measured over a
whole epoch of `memtune run --packing MODE`, for 3 models x 2 packing modes on a long-tailed corpus.

The corpus: `benchmarks/make_longtail.py`'s generator (seed 16; documents up to MAX_CHARS characters, so that the
longest document, ~3,500 tokens of memtune's sample tokenizer - catalog models carry none -, stays under SEQ_LEN and
the two modes differ), the first DOCUMENTS[mode] documents, so that an epoch is 20-60 optimizer steps:

- none: one document per row, padded to the longest of the micro-batch: worst batch MICRO x the longest document;
- bfd: TRL's best-fit-decreasing rows of up to SEQ_LEN tokens, padded to the longest row of the micro-batch,
  position_ids restarting per document: worst batch MICRO x SEQ_LEN (the rows are full). The modes differ most there:
  padding-free's worst batch (the MICRO longest documents in one row) is at most none's tokens, and Trainer's shuffle
  makes it only by chance (run/data_plan.py), so its epoch would not test the prediction.

Each case, as a user runs it (LoRA r16 on a bf16 base with random weights, bf16 autocast, micro-batch MICRO):
    predicted: memtune plan MODEL --seq-len SEQ_LEN --micro-batch-size MICRO --data FILE --packing MODE ... (the path
               `cli.cmd_plan` takes: `run.data_plan.plan_data`, then `fit.plan_configuration` traces the worst batch)
    measured:  memtune run PLAN --data FILE --packing MODE, one epoch (`run.runner.run_plan`, in a process of its own);
               the run's peak reserved over every step (run_summary.json's peak_reserved_bytes).
Also reported: `DataPlan.mask_bytes` (bfd under SDPA: the rows x 1 x N x N bool mask transformers builds from the
position_ids) and `bias_bytes`, the memory-efficient SDPA kernel's bf16 bias per attention layer, saved for the backward
(rows x N x N rounded up to 16 x 2 bytes x layers). Both are in the prediction since the step is traced with restarting
position_ids (`TrainConfig.packed_rows`; the H200 run of benchmarks/results/data_modes_h200.json predates that, its
"+mask" and "+bias" columns were the test of that hypothesis). The none cases' batches vary in length: the prediction
replays the epoch's steps in Trainer's order through the allocator model (`predict.epoch`); `epoch_steps_replayed`
says how many. With --measured, the same plan with expandable segments is also predicted (not measured).

On the GPU machine (about 2-3 minutes on one H200: 6 predictions on fake CUDA tensors; each case's run starts in a
process of its own when its prediction is made, at most --parallel 3 at once - 3 bfd runs together need ~80 GiB;
TRL for bfd - `pip install -e ".[trl]"`, or trl, datasets, dill and multiprocess wheels on PYTHONPATH):
    PYTHONPATH=.:/tmp/trlsite python3 benchmarks/data_modes.py --out $OUT/data_modes_h200.json
Predictions only (any machine, the CPU trace path):
    PYTHONPATH=.:/tmp/trlsite python3 benchmarks/data_modes.py --predict-only --out /tmp/data_modes_predicted.json
Predictions again against recorded measurements (the CPU trace path; `--paths cuda cpu` on a GPU machine):
    PYTHONPATH=. python3 benchmarks/data_modes.py --measured benchmarks/results/data_modes_h200.json \
        --out benchmarks/results/data_modes_cpu_path_after_fix.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import make_longtail  # noqa: E402
from memtune.config import Adapter, TrainConfig  # noqa: E402

GIB = 1 << 30
MODELS = ("qwen2.5-0.5b", "smollm2-360m", "llama-3.2-1b")
MODES = ("none", "bfd")
SEQ_LEN = 4096
MICRO = 2
MAX_CHARS = 8000
DOCUMENTS = {"none": 80, "bfd": 1200}
"""Documents per mode: an epoch of ~40 steps (none: 80 rows; bfd: ~66 full rows of 4,096 tokens), at MICRO 2."""
SEED = make_longtail.SEED
BUDGET_BYTES = 130 * GIB
"""What the plan is judged against (the run's OOM guard steps down only under it): more than any case needs."""


def train_config() -> TrainConfig:
    """LoRA r16 all-linear on a bf16 base, bf16 autocast, MICRO x SEQ_LEN (the data plan sets the traced length)."""
    return TrainConfig(seq_len=SEQ_LEN, micro_batch_size=MICRO, weights_dtype="bf16", amp="bf16", adapter=Adapter())


def write_corpus(mode: str, folder: Path) -> Path:
    """The first DOCUMENTS[mode] documents of the long-tailed corpus, as JSON Lines."""
    documents = make_longtail.make_documents(DOCUMENTS[mode], SEED, max_chars=MAX_CHARS)
    return make_longtail.write_jsonl(documents, folder / f"longtail_{mode}.jsonl")


def predict(model: str, mode: str, corpus: Path, trace_device: str, expandable: bool = False) -> dict[str, Any]:
    """memtune plan's prediction for the data plan (the path `memtune plan --data --packing` takes), with the plan file
    `memtune run` gets and the data plan's worst batch; `expandable`: the same plan with expandable segments."""
    from memtune.fit import plan_configuration
    from memtune.run.data_plan import plan_data
    from memtune.sources import resolve, source_parameters

    started = time.perf_counter()
    source = resolve(model, shapes_only=True)
    data = plan_data(source, corpus, SEQ_LEN, mode)
    config = train_config().replace(expandable_segments=expandable)
    result = plan_configuration(source, source_parameters(source), config, BUDGET_BYTES, "benchmark budget",
                                trace_device=trace_device, data=data)
    data = result.data or data.with_micro_batch(MICRO)
    rows, row_tokens = data.worst_batch()
    layers = int(source.config.num_hidden_layers)
    bias_bytes = 0 if data.mask_bytes == 0 else layers * rows * row_tokens * (16 * math.ceil(row_tokens / 16)) * 2
    return {
        "predicted_reserved_bytes": result.estimate.peak_reserved_bytes,
        "predicted_allocated_bytes": result.estimate.peak_allocated_bytes,
        "predicted_total_bytes": result.estimate.total_bytes,
        "traced_seq_len": result.estimate.config.seq_len,
        "worst_batch": [rows, row_tokens], "mask_bytes": data.mask_bytes, "bias_bytes": bias_bytes,
        "epoch_steps_replayed": len(data.epoch_row_tokens(MICRO)),
        "data": data.to_dict(), "trace_device": trace_device, "predict_seconds": time.perf_counter() - started,
        "plan": result.plan().to_dict(),
    }


def measure(plan_path: Path, corpus: Path, mode: str, output_dir: Path) -> dict[str, Any]:
    """One epoch of `memtune run PLAN --data CORPUS --packing MODE` (run_plan), no checkpoints; the summary's peaks and
    the largest batch Trainer fed (rows x tokens)."""
    from memtune.plan import Plan
    from memtune.run import data as data_module
    from memtune.run.runner import run_plan

    largest = [0, 0]
    make = data_module.collator_for

    def recording(packing: str, tokenizer: Any) -> Any:
        collate = make(packing, tokenizer)

        def collate_and_note(items: list) -> dict:
            batch = collate(items)
            rows, tokens = batch["input_ids"].shape
            if rows * tokens > largest[0] * largest[1]:
                largest[:] = [int(rows), int(tokens)]
            return batch
        return collate_and_note

    data_module.collator_for = recording  # this process runs one case; the batches are only looked at
    started = time.perf_counter()
    summary = run_plan(Plan.load(plan_path), data=str(corpus), packing=mode, output_dir=output_dir, progress=False,
                       save_steps=10**9, training_overrides={"save_strategy": "no"})
    return {"measured_reserved_bytes": summary.peak_reserved_bytes,
            "measured_allocated_bytes": summary.peak_allocated_bytes, "steps": summary.global_step,
            "rows": summary.num_sequences, "largest_batch": largest, "status": summary.status,
            "guard_events": summary.guard_events, "run_seconds": time.perf_counter() - started}


class Measurement:
    """`measure` of one case in a fresh Python process (a clean CUDA caching allocator per case), started at once and
    read by `result`. The peaks are the process's own, so cases may run side by side on one GPU while they fit."""

    def __init__(self, plan: dict[str, Any], corpus: Path, mode: str, folder: Path, name: str):
        plan_path = folder / f"{name}.plan.json"
        plan_path.write_text(json.dumps(plan))
        self.out = folder / f"{name}.measured.json"
        command = [sys.executable, __file__, "--measure", str(plan_path), "--corpus", str(corpus), "--mode", mode,
                   "--out", str(self.out)]
        self.log = folder / f"{name}.log"  # a file, not a pipe: a full pipe would stop the run
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> dict[str, Any]:
        self.process.wait(timeout=400)
        if self.process.returncode != 0 or not self.out.exists():
            return {"measured_error": self.log.read_text(errors="replace")[-1500:]}
        return json.loads(self.out.read_text())


def with_errors(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with the relative error (predicted / measured - 1) of the predicted peak reserved."""
    measured = row.get("measured_reserved_bytes")
    if measured and "predicted_reserved_bytes" in row:
        row["error"] = row["predicted_reserved_bytes"] / measured - 1
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """A short table: worst batch, measured and predicted peak reserved (GiB), the error (%)."""
    lines = [f"{'model':14s} {'mode':5s} {'worst':>11s} {'steps':>5s} {'measured':>8s} {'predicted':>9s} "
             f"{'error':>7s}"]
    for row in rows:
        measured = row.get("measured_reserved_bytes")
        error = row.get("error")
        batch_rows, batch_tokens = row.get("worst_batch", (0, 0))
        lines.append(
            f"{row['model']:14s} {row['mode']:5s} {f'{batch_rows} x {batch_tokens}':>11s} "
            f"{row.get('steps', '-')!s:>5s} {measured / GIB if measured else float('nan'):8.2f} "
            f"{row.get('predicted_reserved_bytes', 0) / GIB:9.2f} "
            f"{'-' if error is None else f'{100 * error:+.2f}%':>7s}")
    errors = [abs(row["error"]) for row in rows if row.get("error") is not None]
    if errors:
        lines.append(f"max |error| {100 * max(errors):.2f}% over {len(errors)} cases (target <= 5%)")
    return "\n".join(lines)


def against_measured(measured_path: Path, paths: list[str], models: list[str], modes: list[str]) -> dict[str, Any]:
    """Predict every recorded case again (`predict`, the plan's path) on each trace path of `paths` and compare with
    the measurements of the file at `measured_path` (a document this script wrote on the GPU): the relative errors of
    peak reserved and peak allocated (predicted / measured - 1). The corpus is made again from the recorded seed and
    sizes, as the measured run made it."""
    import torch

    recorded = json.loads(measured_path.read_text())
    if recorded.get("seed") != SEED or recorded.get("max_chars") != MAX_CHARS:
        sys.exit(f"{measured_path} was measured on another corpus (seed {recorded.get('seed')}, max_chars "
                 f"{recorded.get('max_chars')}; this script makes seed {SEED}, max_chars {MAX_CHARS})")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        corpora: dict[str, Path] = {}
        for case in recorded["cases"]:
            if case["model"] not in models or case["mode"] not in modes or "measured_reserved_bytes" not in case:
                continue
            if case["mode"] not in corpora:
                corpora[case["mode"]] = write_corpus(case["mode"], Path(scratch))
            row: dict[str, Any] = {key: case[key] for key in ("model", "mode", "worst_batch", "steps")
                                   if key in case}
            row["measured_reserved_bytes"] = case["measured_reserved_bytes"]
            row["measured_allocated_bytes"] = case["measured_allocated_bytes"]
            row["before"] = {"trace_device": recorded.get("trace_device"),
                             "predicted_reserved_bytes": case["predicted_reserved_bytes"],
                             "predicted_allocated_bytes": case["predicted_allocated_bytes"]}
            for path in paths:
                predicted = predict(case["model"], case["mode"], corpora[case["mode"]], path)
                row[path] = {key: predicted[key] for key in ("predicted_reserved_bytes", "predicted_allocated_bytes",
                                                             "traced_seq_len", "predict_seconds")}
                row[path]["epoch_steps_replayed"] = predicted["epoch_steps_replayed"]
                expandable = predict(case["model"], case["mode"], corpora[case["mode"]], path, expandable=True)
                row[path]["predicted_reserved_expandable_bytes"] = expandable["predicted_reserved_bytes"]
            for prediction in [row["before"], *(row[path] for path in paths)]:
                prediction["reserved_error"] = (prediction["predicted_reserved_bytes"]
                                                / row["measured_reserved_bytes"] - 1)
                prediction["allocated_error"] = (prediction["predicted_allocated_bytes"]
                                                 / row["measured_allocated_bytes"] - 1)
            rows.append(row)
            print(f"predicted {row['model']} {row['mode']}", file=sys.stderr, flush=True)
    errors = {path: max(abs(row[path]["reserved_error"]) for row in rows) for path in paths}
    return {"benchmark": "data_modes", "against": str(measured_path), "measured_on": recorded.get("gpu"),
            "measured_torch": recorded.get("torch"), "torch": torch.__version__, "paths": paths,
            "seconds": time.perf_counter() - started, "max_abs_reserved_error": errors, "cases": rows}


def measured_table(document: dict[str, Any]) -> str:
    """Predicted (before the fix, and now on each path) vs measured peak reserved and allocated (GiB, % error)."""
    paths = document["paths"]
    lines = [f"{'model':14s} {'mode':5s} {'meas res':>8s} {'before':>15s} "
             + " ".join(f"{path + ' res':>15s}" for path in paths) + f" {'meas alloc':>10s} "
             + " ".join(f"{path + ' alloc':>15s}" for path in paths)
             + " " + " ".join(f"{path + ' expandable':>15s}" for path in paths)]
    for row in document["cases"]:
        def cell(prediction: dict[str, Any], kind: str) -> str:
            return f"{prediction[f'predicted_{kind}_bytes'] / GIB:6.2f} {100 * prediction[f'{kind}_error']:+6.1f}%"
        lines.append(f"{row['model']:14s} {row['mode']:5s} {row['measured_reserved_bytes'] / GIB:8.2f} "
                     f"{cell(row['before'], 'reserved'):>15s} "
                     + " ".join(f"{cell(row[path], 'reserved'):>15s}" for path in paths)
                     + f" {row['measured_allocated_bytes'] / GIB:10.2f} "
                     + " ".join(f"{cell(row[path], 'allocated'):>15s}" for path in paths) + " "
                     + " ".join(f"{row[path]['predicted_reserved_expandable_bytes'] / GIB:15.2f}" for path in paths))
    for path, error in document["max_abs_reserved_error"].items():
        lines.append(f"max |reserved error| on the {path} path: {100 * error:.2f}% over {len(document['cases'])} "
                     "cases (target <= 5%); expandable: the same plans with expandable segments, predicted only")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predict-only", action="store_true", help="predict on the CPU trace path, measure nothing")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=("none", "bfd", "padding-free", "concat"))
    parser.add_argument("--out", default="benchmarks/results/data_modes.json")
    parser.add_argument("--parallel", type=int, default=3,
                        help="cases measured at once, each in its own process (their peaks are their own)")
    parser.add_argument("--measured", metavar="FILE", type=Path,
                        help="predict again and compare with the measurements recorded in FILE (no GPU needed)")
    parser.add_argument("--paths", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
                        help="trace paths for --measured (cuda: fake CUDA tensors, needs a CUDA build of torch)")
    parser.add_argument("--expandable", action="store_true",
                        help="plan (and so run) with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    parser.add_argument("--measure", metavar="PLAN", help=argparse.SUPPRESS)  # the per-case child process
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        with tempfile.TemporaryDirectory() as output_dir:
            result = measure(Path(args.measure), Path(args.corpus), args.mode, Path(output_dir))
        Path(args.out).write_text(json.dumps(result))
        return
    if args.measured:
        document = against_measured(args.measured, args.paths, args.models, args.modes)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
        print(measured_table(document))
        print(f"written to {args.out} ({document['seconds']:.0f} s)")
        return

    import torch

    measuring = not args.predict_only
    if measuring and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --predict-only, or on the GPU machine")
    trace_device = "cuda" if measuring else "cpu"
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    running: list[tuple[dict[str, Any], Measurement]] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        corpora = {mode: write_corpus(mode, folder) for mode in args.modes}
        for model in args.models:
            for mode in args.modes:
                row: dict[str, Any] = {"model": model, "mode": mode, "seq_len": SEQ_LEN, "micro_batch_size": MICRO,
                                       "documents": DOCUMENTS.get(mode, DOCUMENTS["none"]),
                                       "expandable_segments": args.expandable}
                try:
                    row.update(predict(model, mode, corpora[mode], trace_device, expandable=args.expandable))
                except Exception as error:  # noqa: BLE001 - report and go on
                    row["predicted_error"] = f"{type(error).__name__}: {error}"[:500]
                rows.append(row)
                print(f"predicted {model} {mode}: {row.get('predicted_reserved_bytes', 0) / GIB:.2f} GiB",
                      file=sys.stderr, flush=True)
                if measuring and "plan" in row:
                    while sum(not measurement.done() for _, measurement in running) >= args.parallel:
                        time.sleep(0.5)
                    running.append((row, Measurement(row["plan"], corpora[mode], mode, folder, f"{model}-{mode}")))
        for row, measurement in running:
            row.update(measurement.result())
            with_errors(row)
            print(f"measured {row['model']} {row['mode']}: {row.get('measured_reserved_bytes') or 0:,} bytes",
                  file=sys.stderr, flush=True)
    document = {"benchmark": "data_modes", "seconds": time.perf_counter() - started, "seq_len": SEQ_LEN,
                "micro_batch_size": MICRO, "max_chars": MAX_CHARS, "seed": SEED, "trace_device": trace_device,
                "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if measuring else None, "cases": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows))
    print(f"written to {args.out} ({document['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
