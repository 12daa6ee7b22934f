"""`memtune run` on a real GPU: a plan run under a memory cap, and a run whose cap drops mid-way.

    PYTHONPATH=. python3 benchmarks/run_gpu.py --out benchmarks/results/run_gpu_h100.json

(a) The catalog model (default qwen2.5-0.5b, random weights) trains on the shipped sample corpus for
    --steps optimizer steps under `torch.cuda.set_per_process_memory_fraction` = --cap, with a plan
    built here (bf16-mixed + gradient checkpointing, micro-batch 2 x 8, 1024 tokens) or given with
    --plan (e.g. the one `memtune fit` saved). Records peak reserved against the prediction, tokens/s
    and the loss curve.
(b) A plan without checkpointing (micro-batch 4 x 4) starts under --cap-b-start; after --lower-at
    steps a callback lowers the cap to --cap-b-low and empties the cache (cached segments are reused
    without cudaMalloc, so a lower cap alone would not bite). The OOM guard must step down and the run
    complete; records what the guard did and tokens/s before and after.

Dry run anywhere (no cap; part (b) injects one OOM with a hook instead of lowering the cap):
    PYTHONPATH=. python3 benchmarks/run_gpu.py --device cpu --model DIR --steps 3 --seq-len 32 \\
        --micro-batch 2 --accum 2 --steps-b 4 --lower-at 2 --out /tmp/run_gpu_dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from memtune.config import TrainConfig, format_bytes, parse_bytes  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.run.runner import run_plan  # noqa: E402
from memtune.sources import resolve  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (tokens/s before and after a step-down)."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.ends.append((state.global_step, time.perf_counter()))

    def tokens_per_second(self, tokens_per_step: int, first: int, last: int) -> float | None:
        """Over steps first+1 .. last (the step ending at `first` is the time origin)."""
        times = dict(self.ends)
        if first not in times or last not in times or last <= first:
            return None
        return tokens_per_step * (last - first) / (times[last] - times[first])


class LowerCapAt(TrainerCallback):
    """After optimizer step `step`, cap this process to `cap_bytes` and give back the cached segments."""

    def __init__(self, step: int, cap_bytes: int):
        self.step, self.cap_bytes = step, cap_bytes
        self.reserved_before: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.reserved_before = torch.cuda.memory_reserved()
            set_cap(self.cap_bytes)
            torch.cuda.empty_cache()


class InjectOomAt(TrainerCallback):
    """CPU stand-in for LowerCapAt: from step `step` + 1, micro-batches larger than `above` raise OOM."""

    def __init__(self, step: int, above: int):
        self.step, self.above = step, above
        self.state: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.state = state
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, inputs: Any) -> None:
        if self.state.global_step >= self.step and inputs[0].shape[0] > self.above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by benchmarks/run_gpu.py --device cpu)")


def set_cap(cap_bytes: int) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), 0)


def environment() -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version(),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if torch.cuda.is_available():
        env.update(
            {
                "gpu": torch.cuda.get_device_name(0),
                "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory,
                "cuda": torch.version.cuda,
            }
        )
    return env


def predict(model: str, config: TrainConfig, device: str) -> dict[str, Any]:
    """memtune's estimate of `config` (fake-tensor trace; on CPU with CUDA emulation in a dry run)."""
    from memtune.predict.estimate import estimate

    try:
        result = estimate(resolve(model).config, config, device="cuda" if device == "cuda" else "cpu")
    except Exception as error:  # noqa: BLE001 - a failed prediction should not cost the measurement
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"peak_allocated_bytes": result.peak_allocated_bytes, "peak_reserved_bytes": result.peak_reserved_bytes,
            "total_bytes": result.total_bytes, "seconds": result.seconds}


def run_part(
    name: str, plan: Plan, args: argparse.Namespace, steps: int, callbacks: list, workdir: Path
) -> dict[str, Any]:
    clock = StepClock()
    started = time.perf_counter()
    row: dict[str, Any] = {"plan": plan.to_dict()}
    try:
        summary = run_plan(
            plan, data=args.data, output_dir=workdir / name, max_steps=steps, learning_rate=args.learning_rate,
            device=args.device, callbacks=[*callbacks, clock], save_steps=10**9,
            training_overrides={"save_strategy": "no"},  # no checkpoint writes in a timing run
        )
        row.update(summary.to_dict())
    except Exception as error:  # noqa: BLE001 - record and go on to the next part
        row["error"] = f"{type(error).__name__}: {error}"[:1000]
    row["seconds"] = time.perf_counter() - started
    row["step_end_times"] = clock.ends
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        row["device_used_bytes_after"] = total - free
        row["reserved_bytes_after"] = torch.cuda.memory_reserved()
        row["outside_pool_bytes"] = (total - free) - torch.cuda.memory_reserved()  # context, kernels, other processes
    row["_clock"] = clock
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="catalog name, hub id or local directory")
    parser.add_argument("--plan", default=None, help="plan file for part (a) instead of the built-in plan")
    parser.add_argument("--data", default=None, help="training data (default: memtune's sample corpus)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parts", default="ab", help="which parts to run: a, b or ab")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of part (a)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2, help="part (a) micro-batch; part (b) uses twice as many")
    parser.add_argument(
        "--accum", type=int, default=8, help="part (a) accumulation; part (b) keeps the effective batch"
    )
    parser.add_argument("--cap", default="16GiB", help="part (a) memory cap (set_per_process_memory_fraction)")
    parser.add_argument("--steps-b", type=int, default=60, help="optimizer steps of part (b)")
    parser.add_argument("--cap-b-start", default="30GiB", help="part (b) cap before the drop")
    parser.add_argument("--cap-b-low", default="18GiB", help="part (b) cap after the drop")
    parser.add_argument("--lower-at", type=int, default=20, help="part (b): lower the cap after this many steps")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu for a dry run")
    cuda = args.device == "cuda"
    results: dict[str, Any] = {"environment": environment(), "args": vars(args)}
    effective = args.micro_batch * args.accum
    workdir = Path(tempfile.mkdtemp(prefix="memtune-run-gpu-"))
    rows: list[tuple[str, dict[str, Any]]] = []

    if "a" in args.parts:
        if args.plan:
            plan = Plan.load(args.plan)
        else:
            config = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, grad_accum_steps=args.accum,
                                 amp="bf16", gradient_checkpointing=True)
            fallbacks = [config.replace(micro_batch_size=1, grad_accum_steps=effective)] if args.micro_batch > 1 else []
            plan = Plan(args.model, config, budget_bytes=parse_bytes(args.cap), fallbacks=fallbacks)
        prediction = predict(plan.model, plan.train_config, args.device)
        if not plan.predicted_total_bytes and "total_bytes" in prediction:
            plan.predicted_total_bytes = prediction["total_bytes"]
        if cuda:
            set_cap(parse_bytes(args.cap))
        row = run_part("a", plan, args, args.steps, [], workdir)
        row["prediction"] = prediction
        row["cap_bytes"] = parse_bytes(args.cap) if cuda else None
        rows.append(("a", row))
        if cuda:
            set_cap(torch.cuda.get_device_properties(0).total_memory)
            torch.cuda.empty_cache()

    if "b" in args.parts:
        micro = args.micro_batch * 2
        config = TrainConfig(seq_len=args.seq_len, micro_batch_size=micro, grad_accum_steps=max(1, effective // micro),
                             amp="bf16")
        per_device = config.micro_batch_size * config.grad_accum_steps
        fallbacks = [config.replace(micro_batch_size=micro // 2, grad_accum_steps=per_device // (micro // 2)),
                     config.replace(gradient_checkpointing=True),
                     config.replace(micro_batch_size=micro // 2, grad_accum_steps=per_device // (micro // 2),
                                    gradient_checkpointing=True)]
        plan = Plan(args.model, config, budget_bytes=parse_bytes(args.cap_b_start), fallbacks=fallbacks)
        prediction = {
            "plan": predict(args.model, config, args.device),
            "first_fallback": predict(args.model, fallbacks[0], args.device),
        }
        plan.predicted_total_bytes = prediction["plan"].get("total_bytes", 0)
        if cuda:
            set_cap(parse_bytes(args.cap_b_start))
            trigger: TrainerCallback = LowerCapAt(args.lower_at, parse_bytes(args.cap_b_low))
        else:
            trigger = InjectOomAt(args.lower_at, micro // 2)
        row = run_part("b", plan, args, args.steps_b, [trigger], workdir)
        row["prediction"] = prediction
        row["cap_bytes"] = {"start": parse_bytes(args.cap_b_start), "low": parse_bytes(args.cap_b_low),
                            "lowered_after_step": args.lower_at} if cuda else None
        row["reserved_before_drop"] = getattr(trigger, "reserved_before", None)
        tokens_per_step = config.effective_batch_size * config.seq_len
        clock = row["_clock"]
        row["tokens_per_second_before_drop"] = clock.tokens_per_second(tokens_per_step, 1, args.lower_at)
        row["tokens_per_second_after_drop"] = clock.tokens_per_second(tokens_per_step, args.lower_at + 2, args.steps_b)
        rows.append(("b", row))

    for name, row in rows:
        row.pop("_clock", None)
        results[f"part_{name}"] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"results: {args.out}   (outputs under {workdir})")


def print_table(results: dict[str, Any]) -> None:
    def size(value: Any) -> str:
        return format_bytes(value) if isinstance(value, (int, float)) and value else "-"

    env = results["environment"]
    print(f"\n{env.get('gpu', 'cpu')}  torch {env['torch']}  transformers {env['transformers']}")
    for name in ("part_a", "part_b"):
        row = results.get(name)
        if row is None:
            continue
        print(f"\n{name}: {TrainConfig.from_dict(row['plan']['train_config']).describe()}")
        if row.get("error"):
            print(f"  ERROR {row['error']}")
        curve = row.get("loss_curve") or []
        if curve:
            print(f"  steps {row['global_step']}  loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}  "
                  f"tokens/s {row['tokens_per_second']:,.0f}  wall {row['seconds']:.0f} s")
        prediction = row.get("prediction", {})
        prediction = prediction.get("plan", prediction)
        cap = row.get("cap_bytes")
        cap_text = (
            size(cap) if isinstance(cap, int) else (f"{size(cap['start'])} -> {size(cap['low'])}" if cap else "-")
        )
        print(
            f"  cap {cap_text}  peak reserved {size(row.get('peak_reserved_bytes'))}  "
            f"predicted reserved {size(prediction.get('peak_reserved_bytes'))}  "
            f"predicted total {size(prediction.get('total_bytes'))}  outside pool {size(row.get('outside_pool_bytes'))}"
        )
        for event in row.get("guard_events", []):
            if event["kind"] == "oom":
                after = TrainConfig.from_dict(event["to_config"]).describe() if event["to_config"] else "gave up"
                print(
                    f"  guard: OOM in step {event['step'] + 1} -> {after} "
                    f"(redid {event['redone_micro_batches']} micro-batches)"
                )
            else:
                print(f"  guard: {event['alloc_retries']} allocator retries by step {event['step']}")
        if name == "part_b":
            before, after = row.get("tokens_per_second_before_drop"), row.get("tokens_per_second_after_drop")
            print(f"  tokens/s before the drop {before or 0:,.0f}, after {after or 0:,.0f}")


if __name__ == "__main__":
    main()
