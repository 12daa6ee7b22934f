"""Measured tokens/s of architectures outside the catalog and the speed model's calibration set.

    PYTHONPATH=. python3 benchmarks/speed_heldout.py --out benchmarks/results/speed_heldout_h200.json

The speed model (memtune/predict/throughput.py) is fitted to catalog models (benchmarks/calibrate_throughput.py);
this measures the architectures of benchmarks/cases.py REAL_ARCHITECTURES (published per-layer shapes, depth cut
where marked there; the mixture-of-experts entries are left out: the speed model does not model routing) under a
few configurations of the ladder, so the model's error can be stated on models it was not fitted to
(benchmarks/speed_error.py reads this file). Never fit coefficients to it.

Each configuration runs `--steps` optimizer steps (memtune.measure.verify.measure, random weights, random tokens,
2 micro-batches per step); tokens/s is the median over the steps after the first. Results are written after every
case, so a run stopped by `--budget-seconds` keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import REAL_ARCHITECTURES, SEALED_ARCHITECTURES, Case, model_config  # noqa: E402
from memtune.config import Adapter, TrainConfig  # noqa: E402

SKIPPED_TYPES = ("mixtral", "qwen3_moe")


def configurations(seq_len: int) -> list[TrainConfig]:
    """bf16-mixed at 3 micro-batches, checkpointing, the chunked loss, both, and LoRA on a bf16 base."""
    mixed = TrainConfig(seq_len=seq_len, amp="bf16", grad_accum_steps=2)
    return [
        mixed.replace(micro_batch_size=1),
        mixed.replace(micro_batch_size=4),
        mixed.replace(micro_batch_size=4, gradient_checkpointing=True),
        mixed.replace(micro_batch_size=4, loss="chunked"),
        mixed.replace(micro_batch_size=16, gradient_checkpointing=True, loss="chunked"),
        TrainConfig(seq_len=seq_len, micro_batch_size=8, grad_accum_steps=2, weights_dtype="bf16",
                    gradient_checkpointing=True, adapter=Adapter()),
    ]


def cases(seq_len: int, types: list[str] | None, architectures: dict | None = None) -> list[Case]:
    found = []
    full_depth_first = sorted((architectures or REAL_ARCHITECTURES).items(),
                              key=lambda item: item[1]["num_layers"] is not None)
    for model_type, entry in full_depth_first:
        if model_type in SKIPPED_TYPES or (types and model_type not in types):
            continue
        settings = {**entry["settings"], "num_hidden_layers": entry["published_layers"]}
        for config in configurations(seq_len):
            found.append(Case(entry["shapes_of"], entry["num_layers"], config, model_type=model_type,
                              settings=settings))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--types", nargs="*", default=None, help="model_types of REAL_ARCHITECTURES (default all)")
    parser.add_argument("--set", choices=("real", "sealed"), default="real",
                        help="real: REAL_ARCHITECTURES (the first held-out set); sealed: SEALED_ARCHITECTURES")
    parser.add_argument("--budget-seconds", type=float, default=480.0, help="stop starting cases after this")
    args = parser.parse_args()

    import torch

    from memtune.measure import memory
    from memtune.measure.verify import measure

    memory.warm_up()
    major, minor = torch.cuda.get_device_capability()
    environment = {"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}",
                   "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    out = {"environment": environment, "steps": args.steps, "cases": []}
    started = time.perf_counter()
    print(f"{'case':64} {'tokens/s':>10} {'peak GiB':>9}")
    architectures = SEALED_ARCHITECTURES if args.set == "sealed" else REAL_ARCHITECTURES
    for case in cases(args.seq_len, args.types, architectures):
        if time.perf_counter() - started > args.budget_seconds:
            print(f"budget of {args.budget_seconds:.0f} s reached: stopping")
            break
        result = measure(model_config(case), case.config, steps=args.steps)
        row = {"case": case.name, "model": case.model, "model_type": case.model_type, "num_layers": case.num_layers,
               "config": case.config.to_dict(), "fits": result.fits, "tokens_per_second": result.tokens_per_second,
               "step_seconds": result.step_seconds, "tokens_per_step": result.tokens_per_step,
               "peak_reserved_bytes": result.peak_reserved_bytes, "error": result.error}
        out["cases"].append(row)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"{case.name:64} {result.tokens_per_second:10.0f} {result.peak_reserved_bytes / 2**30:9.1f}",
              flush=True)
    out["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
