"""Training then evaluation through transformers' Trainer, where evaluation is the peak: predicted vs measured
(issue 16, item 2).

Each case is a short run the way users run one, set up through memtune's Plan API in a fresh process:

    plan = Plan(MODEL, train_config, budget_bytes=...)       # train_config carries eval_batch_size / eval_logits
    model = plan.prepare(AutoModelForCausalLM.from_config(config, dtype=bf16).cuda())   # random weights, LoRA
    Trainer(model, plan.training_arguments(max_steps=2, eval_strategy="steps", eval_steps=2, ...),
            train_dataset=..., eval_dataset=<eval_sequences sequences>, compute_metrics=...).train()

Trainer evaluates once, after the second optimizer step (mid-training: weights, optimizer state and cached
segments alive). A callback resets the peak counters when that step ends, so the run's peak (train + evaluate)
and evaluation's own peak are both measured (`torch.cuda.max_memory_reserved` / `max_memory_allocated`, deltas
over the state after cuBLAS's workspaces were made and before the model was built). With eval_logits "keep" or
"accumulate_cpu" a no-op compute_metrics is given, as Trainer.evaluate keeps logits only with one
(trainer.py `evaluate`: prediction_loss_only=True without compute_metrics).

Predicted: `estimate(config, train_config)` (the run: training then evaluation in one trace) and its
`Estimate.evaluation` (evaluation's own peak), on both trace paths (fake CUDA and the CPU emulation).

On the GPU machine (about 3 minutes on one H200; 5 cases, each run in its own process):
    PYTHONPATH=. python3 benchmarks/eval_step.py --out $OUT/eval_step_h200.json
Predictions only (any machine; the fake-CUDA path only where a GPU is visible):
    PYTHONPATH=. python3 benchmarks/eval_step.py --no-measure --out /tmp/eval_step_predicted.json
The Trainer flow of every case on a tiny Llama on the CPU (nothing measured):
    PYTHONPATH=. python3 benchmarks/eval_step.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import Adapter, TrainConfig  # noqa: E402

GIB = 1 << 30
MODEL = "Qwen/Qwen2.5-0.5B"
LORA = {"seq_len": 2048, "micro_batch_size": 1, "weights_dtype": "bf16", "amp": "bf16", "adapter": Adapter()}
"""LoRA r16 all-linear on a bf16 base under bf16 autocast (Trainer bf16=True), micro-batch 1 x 2048 tokens."""
CASES: dict[str, TrainConfig] = {
    "lora eval 8 keep 16 seqs": TrainConfig(**LORA, eval_batch_size=8, eval_logits="keep", eval_sequences=16),
    "lora eval 4 keep 12 seqs": TrainConfig(**LORA, eval_batch_size=4, eval_logits="keep", eval_sequences=12),
    "lora eval 16 loss only": TrainConfig(**LORA, eval_batch_size=16, eval_logits="none", eval_sequences=32),
    "lora eval 16 accumulate_cpu": TrainConfig(**LORA, eval_batch_size=16, eval_logits="accumulate_cpu",
                                               eval_sequences=16),
    "full bf16-mixed eval 8 loss only": TrainConfig(seq_len=2048, micro_batch_size=1, weights_dtype="fp32",
                                                    amp="bf16", gradient_checkpointing=True, eval_batch_size=8,
                                                    eval_logits="none", eval_sequences=16),
}
"""name: the configuration, its eval fields included. The kept logits are fp32 (accelerate's convert_outputs_to_fp32
under autocast): 2048 tokens x 151,936 x 4 bytes = 1.16 GiB per sequence, and the last concatenation holds the old
and the new container at once. 12 sequences at 4 take 3 eval steps, each concatenation larger than the last: the
earlier containers' segments stay cached. (Kept small enough to measure beside another benchmark on one H200.)"""
TRAIN_STEPS = 2


def run_one(name: str, dry_run: bool = False) -> dict[str, Any]:
    """Train TRAIN_STEPS steps of case `name` through Trainer with one evaluation after the last; measured peaks
    (bytes, over the state before the model was built): the run's and evaluation's own. `dry_run`: the same run of
    a tiny Llama at 64 tokens on the CPU, no memory measured (checks the flow anywhere)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    from memtune.plan import Plan
    from memtune.sources import catalog_config

    train_config = CASES[name]
    measured: dict[str, Any] = {"evaluated": False}
    if dry_run:
        from benchmarks.cases import tiny_llama

        config = tiny_llama(2)
        train_config = train_config.replace(seq_len=64)
        plan = Plan(MODEL, train_config, budget_bytes=GIB)

        def peak(kind: str) -> int:
            return 0

        def reset() -> None:
            pass
    else:
        from memtune.measure.memory import warm_up

        config = catalog_config(MODEL)
        plan = Plan(MODEL, train_config, budget_bytes=torch.cuda.get_device_properties(0).total_memory)
        warm_up()
        torch.cuda.reset_peak_memory_stats()
        before = {"reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated()}

        def peak(kind: str) -> int:
            current = torch.cuda.max_memory_reserved() if kind == "reserved" else torch.cuda.max_memory_allocated()
            return current - before[kind]

        def reset() -> None:
            torch.cuda.reset_peak_memory_stats()

    class Peaks(TrainerCallback):
        """At the last step's end (Trainer evaluates right after it): training's peaks, then reset the counters."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == TRAIN_STEPS:
                measured["train_peak_reserved_bytes"] = peak("reserved")
                measured["train_peak_allocated_bytes"] = peak("allocated")
                reset()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            measured["evaluated"] = True
            measured["eval_peak_reserved_bytes"] = peak("reserved")
            measured["eval_peak_allocated_bytes"] = peak("allocated")
            if not dry_run:
                measured["eval_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if train_config.weights_dtype == "bf16" else torch.float32
    with torch.device("cpu" if dry_run else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = plan.prepare(model)
    generator = torch.Generator().manual_seed(0)

    def sequences(count: int) -> list[dict[str, torch.Tensor]]:
        samples = [torch.randint(0, config.vocab_size, (train_config.seq_len,), generator=generator)
                   for _ in range(count)]
        return [{"input_ids": ids, "labels": ids.clone()} for ids in samples]

    keeps_logits = train_config.eval_logits != "none"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        args = plan.training_arguments(output_dir=output, max_steps=TRAIN_STEPS, eval_strategy="steps",
                                       eval_steps=TRAIN_STEPS, save_strategy="no", logging_strategy="no",
                                       disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, callbacks=[Peaks()],
                          train_dataset=sequences(TRAIN_STEPS * train_config.effective_batch_size),
                          eval_dataset=sequences(train_config.eval_sequences or train_config.eval_batch_size or 1),
                          compute_metrics=(lambda prediction: {}) if keeps_logits else None)
        trainer.train()
    measured["run_peak_reserved_bytes"] = max(measured.get("train_peak_reserved_bytes", 0),
                                              measured.get("eval_peak_reserved_bytes", 0))
    measured["seconds"] = time.perf_counter() - started
    measured["training_arguments"] = {name: getattr(args, name) for name in (
        "per_device_eval_batch_size", "eval_accumulation_steps", "prediction_loss_only")}
    return measured


def predict(train_config: TrainConfig, device: str) -> dict[str, Any]:
    """Predicted peaks (bytes) on one trace path: the run's and evaluation's own; or the error."""
    from memtune.predict.estimate import estimate
    from memtune.sources import catalog_config

    started = time.perf_counter()
    try:
        result = estimate(catalog_config(MODEL), train_config, device=device)
    except Exception as error:  # noqa: BLE001 - a failed trace keeps its row
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    evaluation = result.evaluation
    assert evaluation is not None, "every case plans an evaluation"
    return {"run_peak_reserved_bytes": result.peak_reserved_bytes,
            "train_peak_reserved_bytes": evaluation.train_peak_reserved_bytes,
            "eval_peak_reserved_bytes": evaluation.peak_reserved_bytes,
            "eval_peak_allocated_bytes": evaluation.peak_allocated_bytes,
            "eval_breakdown": evaluation.breakdown, "seconds": time.perf_counter() - started}


def errors(row: dict[str, Any], device: str) -> None:
    """Relative errors of `row[device]`'s predictions against the measured peaks, in place."""
    measured = row.get("measured", {})
    for key in ("run_peak_reserved_bytes", "eval_peak_reserved_bytes", "eval_peak_allocated_bytes"):
        if measured.get(key) and row[device].get(key):
            row[device][key.replace("_bytes", "_error")] = row[device][key] / measured[key] - 1


def print_table(rows: list[dict[str, Any]], devices: list[str]) -> None:
    """One line per case: measured run / eval peak reserved, then each path's prediction and error (GiB)."""
    header = f"{'case':34s} {'measured run':>12s} {'eval':>8s}"
    for device in devices:
        header += f" | {device + ' run':>9s} {'err':>6s} {'eval':>7s} {'err':>6s}"
    print(header)
    for row in rows:
        measured = row.get("measured", {})
        line = f"{row['case']:34s}"
        if measured:
            line += (f" {measured.get('run_peak_reserved_bytes', 0) / GIB:12.2f}"
                     f" {measured.get('eval_peak_reserved_bytes', 0) / GIB:8.2f}")
        else:
            line += f" {row.get('measured_error', 'not measured')[:21]:>21s}"
        for device in devices:
            predicted = row.get(device, {})
            if "error" in predicted:
                line += f" | {device} failed: {predicted['error'][:40]}"
                continue
            run_error, eval_error = predicted.get("run_peak_reserved_error"), predicted.get("eval_peak_reserved_error")
            line += (f" | {predicted['run_peak_reserved_bytes'] / GIB:9.2f}"
                     f" {'' if run_error is None else f'{100 * run_error:+.1f}%':>6s}"
                     f" {predicted['eval_peak_reserved_bytes'] / GIB:7.2f}"
                     f" {'' if eval_error is None else f'{100 * eval_error:+.1f}%':>6s}")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/eval_step.json")
    parser.add_argument("--match", default="", help="only cases whose name has this text")
    parser.add_argument("--no-measure", action="store_true", help="predict only (no GPU run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run each case's Trainer flow on a tiny Llama on the CPU (no memory measured), then exit")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        Path(args.row_out).write_text(json.dumps(run_one(args.one)))
        return
    if args.dry_run:
        for name in CASES:
            if args.match in name:
                done = run_one(name, dry_run=True)
                print(f"{name}: evaluated {done['evaluated']}, {done['training_arguments']}")
        return

    import torch

    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    rows = []
    for name, train_config in CASES.items():
        if args.match not in name:
            continue
        row: dict[str, Any] = {"case": name, "config": train_config.to_dict()}
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            # the GPU run in its own process (a clean allocator) while this one predicts (fake tensors, no GPU memory)
            child = None if args.no_measure else subprocess.Popen(
                [sys.executable, __file__, "--one", name, "--row-out", out.name],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for device in devices:
                row[device] = predict(train_config, device)
            if child is not None:
                try:
                    _, stderr = child.communicate(timeout=240)
                except subprocess.TimeoutExpired:
                    child.kill()
                    _, stderr = child.communicate()
                if child.returncode == 0:
                    row["measured"] = json.loads(Path(out.name).read_text())
                else:
                    row["measured_error"] = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        for device in devices:
            errors(row, device)
        rows.append(row)
        write(args, rows)  # after every case: a run cut short keeps what it measured
        print(f"{name}: done", flush=True)
    print_table(rows, devices)
    print(f"wrote {args.out}", file=sys.stderr)


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import torch

    from benchmarks.ground_truth import environment

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    where = environment() if torch.cuda.is_available() else {"gpu": None, "torch": torch.__version__}
    out_path.write_text(json.dumps({"environment": where, "model": MODEL, "train_steps": TRAIN_STEPS,
                                    "measured": not args.no_measure, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
