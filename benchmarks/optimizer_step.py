"""The optimizer step on its own, per implementation: the state it keeps, what it holds while it runs, its time.

Calibrates `memtune.predict.throughput.OPTIMIZER_STEP_BYTES` / `PER_TENSOR_SECONDS` (the speed model's optimizer
step) and `memtune.predict.trace.TORCHAO_STEP_TEMPORARY_BYTES` (torchao's compiled update), which were
assumed, not measured.

For each model (random weights at the published shapes, built on the GPU) and weight dtype (fp32: the master
weights of bf16-mixed; bf16: pure bf16), every parameter gets a random gradient, then each optimizer, as
`memtune.recipe.step.make_optimizer` builds it (Trainer's classes and arguments), runs 7 steps:
- `state_bytes`: torch.cuda.memory_allocated after the first step minus before the optimizer (paged optimizers
  keep their large state in CUDA unified memory, outside it);
- `step_temporary_bytes`: max_memory_allocated during a later step minus memory_allocated before it;
- `first_step_seconds` (state creation; torch.compile for torchao) and `step_seconds` (median of steps 3-7);
- `predicted_seconds`: `throughput.optimizer_seconds` for the same configuration on this card.
Paged optimizers run last in each process: bitsandbytes never frees their unified memory.

    PYTHONPATH=. python3 benchmarks/optimizer_step.py --out $OUT/optimizer_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import OPTIMIZERS, PAGED_OPTIMIZERS  # noqa: E402

MODELS = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"]
STEPS = 7


def available(name: str) -> bool:
    """Whether the package `name` needs is installed (`config.require_extra`)."""
    from memtune.config import require_extra
    from memtune.errors import UsageError

    try:
        require_extra(name)
    except UsageError:
        return False
    return True


def measure_model(model_name: str, dtype_name: str, optimizers: list[str]) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from memtune.config import TrainConfig
    from memtune.measure.probe import probe
    from memtune.predict.throughput import ModelShape, gpu_speed, optimizer_seconds
    from memtune.recipe import step as recipe
    from memtune.sources import catalog_config

    config = catalog_config(model_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    num_parameters = sum(p.numel() for p in model.parameters())
    shape = ModelShape.of(config, num_parameters)
    speed = gpu_speed(probe().gpus[0].name)
    rows = []
    for name in optimizers:
        train_config = TrainConfig(seq_len=1024, optimizer=name, weights_dtype=dtype_name,
                                   amp="bf16" if dtype_name == "fp32" else "none")
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        optimizer = recipe.make_optimizer(model, train_config)
        seconds = []
        temporary = 0
        state = 0
        for index in range(STEPS):
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            optimizer.step()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            if index == 0:
                state = torch.cuda.memory_allocated() - before
            else:
                temporary = max(temporary, torch.cuda.max_memory_allocated() - allocated)
        row = {
            "model": model_name, "weights_dtype": dtype_name, "optimizer": name, "parameters": num_parameters,
            "tensors": sum(1 for _ in model.parameters()),
            "state_bytes": state, "state_bytes_per_parameter": state / num_parameters,
            "step_temporary_bytes": temporary,
            "largest_parameter_elements": max(p.numel() for p in model.parameters()),
            "first_step_seconds": seconds[0], "step_seconds": statistics.median(seconds[2:]),
            "predicted_seconds": optimizer_seconds(shape, train_config, speed, evicted_bytes=0),
        }
        rows.append(row)
        print(f"{model_name:26s} {dtype_name:4s} {name:18s} state {state / num_parameters:5.2f} B/param  "
              f"temp {temporary / 2**20:8.1f} MiB  step {row['step_seconds'] * 1e3:7.1f} ms "
              f"(predicted {row['predicted_seconds'] * 1e3:7.1f})  first {seconds[0]:6.2f} s", flush=True)
        del optimizer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    args = parser.parse_args()
    from benchmarks.ground_truth import environment

    names = [name for name in args.optimizers if available(name)]
    names = [n for n in names if n not in PAGED_OPTIMIZERS] + [n for n in names if n in PAGED_OPTIMIZERS]
    rows = []
    for model_name in args.models:
        for dtype_name in args.dtypes:
            rows += measure_model(model_name, dtype_name, names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
