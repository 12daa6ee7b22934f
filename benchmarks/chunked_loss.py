"""Standard vs chunked loss on a GPU: predicted and measured peak reserved memory, and tokens/s.

    python3 benchmarks/chunked_loss.py --out benchmarks/results/chunked_loss_h100.json
    python3 benchmarks/chunked_loss.py --out /tmp/chunked_loss_dry.json --dry-run   # no GPU: CPU estimates only

Models are catalog configs at full depth with random weights (Qwen2.5-0.5B: 152k vocabulary,
Llama-3.2-1B: 128k), bf16-mixed with and without gradient checkpointing. Each configuration is
measured with `verify.measure` (3 steps) and predicted with `estimate` (trace on fake CUDA tensors).
With --sweep, the chunked loss is also measured at other chunk sizes (`memtune.loss.CHUNK_TOKENS`
is the default being checked); those rows are measured only, as the estimate cache is keyed by
configuration, not by chunk size.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import TrainConfig  # noqa: E402
from memtune.measure import memory, verify  # noqa: E402
from memtune.predict.estimate import estimate  # noqa: E402
from memtune.recipe import loss
from memtune.recipe import step as recipe
from memtune.sources import catalog_config  # noqa: E402

GIB = 1 << 30
# (catalog hub id, micro-batch size): 4 x seq of Qwen2.5-0.5B and 2 x seq of Llama-3.2-1B fit an
# 80 GB card with the standard loss and no checkpointing at seq 2048.
MODELS = [("Qwen/Qwen2.5-0.5B", 4), ("meta-llama/Llama-3.2-1B", 2)]
SEQ_LENS = (1024, 2048)
SWEEP_CHUNK_TOKENS = (256, 1024, 2048)


def grid() -> list[tuple[str, TrainConfig]]:
    cases = []
    for (model, micro_batch), seq_len, checkpointing, loss_kind in itertools.product(
        MODELS, SEQ_LENS, (False, True), ("standard", "chunked")
    ):
        config = TrainConfig(seq_len=seq_len, micro_batch_size=micro_batch, amp="bf16",
                             gradient_checkpointing=checkpointing, loss=loss_kind)
        cases.append((model, config))
    return cases


def run_case(model: str, config: TrainConfig, device: str, measure: bool, predict: bool = True) -> dict:
    """One row: the prediction and (on a GPU) the measurement; an error is recorded, not raised."""
    chunk_tokens = loss.CHUNK_TOKENS if config.loss == "chunked" else None
    row = {"model": model, "config": config.to_dict(), "chunk_tokens": chunk_tokens}
    model_config = catalog_config(model)
    if predict:
        started = time.perf_counter()
        try:
            predicted = estimate(model_config, config, device=device)
            row["predicted_reserved_bytes"] = predicted.peak_reserved_bytes
            row["predicted_allocated_bytes"] = predicted.peak_allocated_bytes
            row["predicted_breakdown"] = predicted.breakdown
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
            row["predict_error"] = f"{type(error).__name__}: {error}"[:300]
        row["predict_seconds"] = time.perf_counter() - started
    if measure:
        measure_into(row, model_config, config)
    return row


def measure_into(row: dict, model_config: object, config: TrainConfig) -> None:
    """3 measured steps of `config` (`verify.measure`) into `row` as measured_* keys (measure_error on a failure),
    and measure_seconds."""
    started = time.perf_counter()
    try:
        measured = verify.measure(model_config, config, steps=3)
        row.update({f"measured_{key}": value for key, value in measured.to_dict().items()})
    except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
        row["measure_error"] = f"{type(error).__name__}: {error}"[:300]
    row["measure_seconds"] = time.perf_counter() - started


def sweep(device: str, measure: bool) -> Iterator[dict]:
    """The chunked loss at other chunk sizes, with checkpointing (where the loss dominates the peak)."""
    for (model, micro_batch), chunk_tokens in itertools.product(MODELS, SWEEP_CHUNK_TOKENS):
        config = TrainConfig(seq_len=2048, micro_batch_size=micro_batch, amp="bf16",
                             gradient_checkpointing=True, loss="chunked")
        sized = functools.partial(loss.chunked_causal_lm_loss, chunk_tokens=chunk_tokens)
        with mock.patch.object(recipe, "chunked_causal_lm_loss", sized):
            row = run_case(model, config, device, measure, predict=False)
        row["chunk_tokens"] = chunk_tokens
        yield row


def gib(row: dict, key: str) -> str:
    return f"{row[key] / GIB:8.2f}" if key in row else "       -"


def describe(row: dict) -> str:
    config = row["config"]
    return (f"{row['model'].split('/')[-1]:14s} {config['micro_batch_size']:>4d}x{config['seq_len']:<4d} "
            f"{'yes' if config['gradient_checkpointing'] else 'no':4s}")


COLUMNS = f"{'model':14s} {'tokens':>9s} {'ckpt':4s}"
HEADER = f"{COLUMNS} {'loss':8s} {'chunk':>5s} {'pred GiB':>8s} {'meas GiB':>8s} {'error':>6s} {'tok/s':>8s}"
SAVINGS_HEADER = f"{COLUMNS} {'pred GiB':>8s} {'meas GiB':>8s} {'speed':>6s}"


def format_row(row: dict) -> str:
    error = ""
    if "predicted_reserved_bytes" in row and row.get("measured_fits"):
        error = f"{100 * (row['predicted_reserved_bytes'] / row['measured_peak_reserved_bytes'] - 1):+5.1f}%"
    elif row.get("measured_fits") is False:
        error = "OOM"
    speed = f"{row['measured_tokens_per_second']:8.0f}" if row.get("measured_fits") else "       -"
    failure = row.get("predict_error") or row.get("measure_error") or ""
    return (f"{describe(row)} {row['config']['loss']:8s} {row['chunk_tokens'] or '':>5} "
            f"{gib(row, 'predicted_reserved_bytes')} {gib(row, 'measured_peak_reserved_bytes')} {error:>6s} {speed}"
            + (f"  {failure[:70]}" if failure else ""))


def savings(rows: list[dict]) -> list[dict]:
    """Chunked vs standard for each configuration: reserved bytes saved (predicted, measured), speed ratio."""

    def case(row: dict) -> tuple:
        config = row["config"]
        return row["model"], config["seq_len"], config["micro_batch_size"], config["gradient_checkpointing"]

    standard_rows = {case(row): row for row in rows if row["config"]["loss"] == "standard"}
    pairs = []
    for chunked in (row for row in rows if row["config"]["loss"] == "chunked"):
        standard = standard_rows[case(chunked)]
        pair = {"model": chunked["model"], "config": {**chunked["config"], "loss": None}}
        for key in ("predicted_reserved_bytes", "measured_peak_reserved_bytes"):
            if key in standard and key in chunked:
                pair[f"{key}_saved"] = standard[key] - chunked[key]
        if standard.get("measured_fits") and chunked.get("measured_fits"):
            speed = chunked["measured_tokens_per_second"] / standard["measured_tokens_per_second"]
            pair["tokens_per_second_ratio"] = speed
        pairs.append(pair)
    return pairs


def format_saving(pair: dict) -> str:
    ratio = f"{pair['tokens_per_second_ratio']:6.3f}" if "tokens_per_second_ratio" in pair else "     -"
    return (f"{describe(pair)} {gib(pair, 'predicted_reserved_bytes_saved')} "
            f"{gib(pair, 'measured_peak_reserved_bytes_saved')} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the environment and every row")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: predict with the CPU trace path, measure nothing")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also measure chunk sizes {SWEEP_CHUNK_TOKENS} at seq 2048 with checkpointing (6 trials)")
    args = parser.parse_args()

    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        import torch

        env = {"dry_run": True, "torch": torch.__version__}
    else:
        from benchmarks.ground_truth import environment

        env = environment()
        env["workspace_bytes"] = memory.warm_up()
    print(HEADER, flush=True)
    rows = []
    for model, config in grid():
        rows.append(run_case(model, config, device, measure=not args.dry_run))
        print(format_row(rows[-1]), flush=True)
    pairs = savings(rows)
    print("\nchunked vs standard: peak reserved saved (GiB), tokens/s ratio\n" + SAVINGS_HEADER)
    for pair in pairs:
        print(format_saving(pair))
    sweep_rows = []
    if args.sweep:
        print("\nchunk-size sweep (measured only)\n" + HEADER, flush=True)
        for row in sweep(device, measure=not args.dry_run):
            sweep_rows.append(row)
            print(format_row(row), flush=True)
    env["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "rows": rows, "savings": pairs, "sweep": sweep_rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{len(rows) + len(sweep_rows)} rows in {env['seconds']:.0f} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
