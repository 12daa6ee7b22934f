"""FSDP through accelerate on a 2-GPU host: measured per-GPU peaks against `estimate_sharded`.

One command on a host with 2 GPUs (about 5 minutes; writes JSON as it goes, prints a table):
    python benchmarks/fsdp.py --out benchmarks/results/fsdp_h100x2.json

It runs, in order:
1. `torchrun --nproc-per-node 2 benchmarks/fsdp.py --worker`: FSDP2 full-shard steps of small models
   through accelerate's own `Accelerator.prepare` (what `accelerate launch` + Trainer do) and through
   `memtune.measure.sharded.measure_sharded` (memtune's copy of that preparation), then Llama-3.1-8B
   full fine-tuning (bf16-mixed, checkpointing) for 5 steps (50 steps through `memtune run`: see the
   README): per-GPU peak and tokens/s. Meanwhile the
   parent process computes the predictions on the CPU.
2. In the parent process: single-GPU CPU-offload trials (`measure_sharded`, num_gpus=1, its own
   one-rank process group).
3. `accelerate launch --config_file <written by memtune>` running HF Trainer for 3 steps: on 2 GPUs
   (FSDP2 from the launcher's environment) and on 1 GPU with CPU offload; records what Trainer did.

Predictions only, anywhere (no GPU):
    python benchmarks/fsdp.py --predict-only --gpus 1 2 4 8 --out benchmarks/results/fsdp_llama8b_predictions.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig  # noqa: E402

BIG_MODEL = "meta-llama/Llama-3.1-8B"

# (name, catalog model, TrainConfig fields, path, steps). path "accelerate": Accelerator.prepare;
# "memtune": measure.sharded.measure_sharded. All 2-GPU cases are bf16-mixed (one Accelerator per process).
MULTI_GPU_CASES: list[tuple[str, str, dict[str, Any], str, int]] = [
    ("qwen2.5-0.5b 4x2048", "Qwen/Qwen2.5-0.5B", dict(seq_len=2048, micro_batch_size=4), "accelerate", 3),
    ("llama-3.2-1b 2x2048", "meta-llama/Llama-3.2-1B", dict(seq_len=2048, micro_batch_size=2), "accelerate", 3),
    (
        "llama-3.2-1b 2x2048 (memtune wrap)",
        "meta-llama/Llama-3.2-1B",
        dict(seq_len=2048, micro_batch_size=2),
        "memtune",
        3,
    ),
    (
        "qwen2.5-1.5b 4x2048 ckpt",
        "Qwen/Qwen2.5-1.5B",
        dict(seq_len=2048, micro_batch_size=4, gradient_checkpointing=True),
        "accelerate",
        3,
    ),
    (
        "llama-3.2-1b 2x1024 accum2 ckpt",
        "meta-llama/Llama-3.2-1B",
        dict(seq_len=1024, micro_batch_size=2, grad_accum_steps=2, gradient_checkpointing=True),
        "memtune",
        3,
    ),
    (
        "llama-3.1-8b 1x2048 ckpt",
        BIG_MODEL,
        dict(seq_len=2048, micro_batch_size=1, gradient_checkpointing=True),
        "memtune",
        5,
    ),
]
# Run only when the 8B bf16-mixed case does not fit: weights, gradients and AdamW state in bf16.
BIG_FALLBACK = ("llama-3.1-8b 1x2048 ckpt bf16 weights", BIG_MODEL,
                dict(seq_len=2048, micro_batch_size=1, gradient_checkpointing=True, weights_dtype="bf16", amp="none"),
                "memtune", 5)
OFFLOAD_CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("llama-3.2-1b 2x2048 ckpt offload, 1 GPU", "meta-llama/Llama-3.2-1B",
     dict(seq_len=2048, micro_batch_size=2, gradient_checkpointing=True), 3),
    ("llama-3.2-3b 2x2048 ckpt offload, 1 GPU", "meta-llama/Llama-3.2-3B",
     dict(seq_len=2048, micro_batch_size=2, gradient_checkpointing=True), 3),
]
TRAINER_CHECKS: dict[str, tuple[str, dict[str, Any]]] = {
    "trainer-2gpu": ("Qwen/Qwen2.5-0.5B", dict(seq_len=1024, micro_batch_size=2, num_gpus=2)),
    "trainer-1gpu-offload": (
        "Qwen/Qwen2.5-0.5B",
        dict(seq_len=1024, micro_batch_size=2, num_gpus=1, offload="parameters"),
    ),
}


def config_of(fields: dict[str, Any], **changes: Any) -> TrainConfig:
    return TrainConfig(**{"weights_dtype": "fp32", "amp": "bf16", **fields, **changes})


def model_config(name: str) -> Any:
    from memtune.sources import catalog_config

    return catalog_config(name)


def environment() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_total_bytes=torch.cuda.get_device_properties(0).total_memory)
    return info


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


# ---- predictions (CPU) ----------------------------------------------------------------------------


def predict(name: str, config: TrainConfig) -> dict[str, Any]:
    from memtune.predict.fsdp import estimate_sharded

    started = time.perf_counter()
    try:
        estimate = estimate_sharded(model_config(name), config)
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"peak_allocated_bytes": estimate.peak_allocated_bytes, "peak_reserved_bytes": estimate.peak_reserved_bytes,
            "total_bytes": estimate.total_bytes, "breakdown": estimate.breakdown,
            "seconds": time.perf_counter() - started}


def predict_all(out: Path) -> None:
    rows = {}
    for name, model, fields, _, _ in MULTI_GPU_CASES:
        rows[name] = predict(model, config_of(fields, num_gpus=2))
        write(out, rows)
    rows[BIG_FALLBACK[0]] = predict(BIG_MODEL, config_of(BIG_FALLBACK[2], num_gpus=2))
    for name, model, fields, _ in OFFLOAD_CASES:
        rows[name] = predict(model, config_of(fields, num_gpus=1, offload="parameters"))
        rows[name + " (no offload)"] = predict(model, config_of(fields, num_gpus=1))
        write(out, rows)
    for name, (model, fields) in TRAINER_CHECKS.items():
        rows[name] = predict(model, config_of(fields))
        write(out, rows)
    from memtune.predict.estimate import estimate

    big = config_of(MULTI_GPU_CASES[-1][2])
    single = estimate(model_config(BIG_MODEL), big, device="cpu")
    rows["llama-3.1-8b on one GPU (unsharded estimate)"] = {"peak_reserved_bytes": single.peak_reserved_bytes,
                                                            "total_bytes": single.total_bytes}
    write(out, rows)


def predict_only(args: argparse.Namespace) -> None:
    """Per-GPU predictions for the 8B configuration at several GPU counts (no GPU needed)."""
    from memtune.config import KNOWN_GPUS

    fields = MULTI_GPU_CASES[-1][2]
    rows = []
    for gpus in args.gpus:
        for precision in ("bf16-mixed", "bf16"):
            config = config_of(fields, num_gpus=gpus, **({} if precision == "bf16-mixed" else
                                                        {"weights_dtype": "bf16", "amp": "none"}))
            row = {"model": BIG_MODEL, "gpus": gpus, "precision": precision, "config": config.to_dict(),
                   **predict(BIG_MODEL, config)}
            row["fits_h100_80gb"] = "total_bytes" in row and row["total_bytes"] <= KNOWN_GPUS["H100-80GB"]
            rows.append(row)
            print(f"{gpus} GPUs {precision:10s} per-GPU total {row.get('total_bytes', 0) / GIB:6.2f} GiB "
                  f"(reserved {row.get('peak_reserved_bytes', 0) / GIB:6.2f}) fits H100-80GB: {row['fits_h100_80gb']}")
    write(Path(args.out), {"environment": environment(), "trace_device": "cpu", "predictions": rows})


# ---- measurements (GPU) ---------------------------------------------------------------------------


def accelerate_trial(accelerator: Any, name: str, config: TrainConfig, steps: int) -> dict[str, Any]:
    """Steps of a model prepared by accelerate itself (Accelerator.prepare, FSDP2 plugin)."""
    import contextlib

    import torch
    import torch.distributed as dist

    from memtune.measure import memory
    from memtune.recipe import step as recipe

    memory.warm_up()
    memory.release_memory()
    allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    row: dict[str, Any] = {"fits": True, "step_seconds": []}
    model = optimizer = None
    try:
        model = recipe.build_model(model_config(name), config, "cpu", initialise=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        # The plugin keeps the layer class it found in the first model it prepared (dataclasses.py:2087-2090):
        # let it look again, or a second architecture fails with "Could not find the transformer layer class".
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = None
        model, optimizer = accelerator.prepare(model, optimizer)
        with torch.no_grad():
            for param in model.parameters():
                (param.to_local() if hasattr(param, "to_local") else param).normal_(0.0, 0.02)
        memory.release_memory()
        device = torch.device("cuda", torch.cuda.current_device())
        for _ in range(steps):
            batches = [recipe.random_batch(model_config(name), config, device) for _ in range(config.grad_accum_steps)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for index, input_ids in enumerate(batches):
                sync = index == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(input_ids=input_ids, labels=input_ids).loss / len(batches)
                    accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            row["step_seconds"].append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001
        if not memory.is_oom(error):
            raise
        row.update(fits=False, error=str(error).splitlines()[0][:300])
    finally:
        peaks = torch.tensor([torch.cuda.max_memory_allocated() - allocated_before,
                              torch.cuda.max_memory_reserved() - reserved_before, int(not row["fits"])], device="cuda")
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        row.update(peak_allocated_bytes=int(peaks[0]), peak_reserved_bytes=int(peaks[1]), fits=not bool(peaks[2]))
        accelerator.free_memory()
        del model, optimizer
        memory.release_memory()
    return row


def worker(args: argparse.Namespace) -> None:
    """One rank of `torchrun --nproc-per-node 2`."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from memtune.measure.sharded import measure_sharded

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    free_before, _ = torch.cuda.mem_get_info()
    # A rank that runs out of memory alone leaves the other in a collective: give up after 90 s.
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=datetime.timedelta(seconds=90))
    dist.barrier()  # the NCCL communicator and its buffers exist from here on
    free_after, _ = torch.cuda.mem_get_info()
    out = Path(args.out)
    result: dict[str, Any] = {"environment": environment(), "world_size": dist.get_world_size(),
                              "nccl_bytes": free_before - free_after - torch.cuda.memory_reserved(),
                              "cases": []}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_offload=False,
                                            state_dict_type="FULL_STATE_DICT")
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16")
    cases = list(MULTI_GPU_CASES)
    while cases:
        name, model, fields, path, steps = cases.pop(0)
        config = config_of(fields, num_gpus=dist.get_world_size())
        started = time.perf_counter()
        try:
            if path == "accelerate":
                row = accelerate_trial(accelerator, model, config, steps)
            else:
                row = measure_sharded(model_config(model), config, steps=steps, accumulation_limit=None).to_dict()
        except Exception as error:  # noqa: BLE001 - recorded; both ranks fail alike (same code, same shapes)
            row = {"fits": False, "error": f"{type(error).__name__}: {error}"[:500], "step_seconds": [],
                   "peak_allocated_bytes": 0, "peak_reserved_bytes": 0}
        row.update(
            case=name,
            model=model,
            path=path,
            config=config.to_dict(),
            wall_seconds=time.perf_counter() - started,
            tokens_per_step=config.effective_batch_size * config.seq_len,
        )
        timed = sorted(row["step_seconds"][1:] or row["step_seconds"])
        row["tokens_per_second"] = row["tokens_per_step"] / timed[len(timed) // 2] if timed else 0.0
        if rank == 0:
            result["cases"].append(row)
            write(out, result)
            print(f"[worker] {name}: fits={row['fits']} reserved {row['peak_reserved_bytes'] / GIB:.2f} GiB "
                  f"tokens/s {row['tokens_per_second']:.0f} ({row['wall_seconds']:.0f}s)", flush=True)
        if name == MULTI_GPU_CASES[-1][0] and not row["fits"]:
            cases.append(BIG_FALLBACK)
    dist.destroy_process_group()


def trainer_check(args: argparse.Namespace) -> None:
    """Under `accelerate launch`: HF Trainer, 3 steps; does it shard, offload, and what does it peak at?"""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import Trainer, TrainingArguments

    from memtune.recipe import step as recipe

    name, fields = TRAINER_CHECKS[args.trainer_check]
    config = config_of(fields)
    model = recipe.build_model(model_config(name), config, "cpu")
    data = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(0, model.config.vocab_size, (config.seq_len,)) for _ in range(16))]
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=3,
        per_device_train_batch_size=config.micro_batch_size,
        bf16=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    plugin = trainer.accelerator.state.fsdp_plugin
    seen = {"is_fsdp_enabled": trainer.is_fsdp_enabled, "fsdp_version": getattr(plugin, "fsdp_version", None),
            "offload_policy": type(getattr(plugin, "cpu_offload", None)).__name__,
            "mixed_precision_policy": repr(getattr(plugin, "mixed_precision_policy", None)),
            "reshard_after_forward": getattr(plugin, "reshard_after_forward", None)}
    started = time.perf_counter()
    trainer.train()
    layers = trainer.model.model.layers
    seen.update(
        model_is_fsdp=isinstance(trainer.model, FSDPModule),
        layer_is_fsdp=isinstance(layers[0], FSDPModule),
        world_size=dist.get_world_size(),
        config=config.to_dict(),
        train_seconds=time.perf_counter() - started,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(),
        peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        param_device=str(next(trainer.model.parameters()).device),
    )
    if dist.get_rank() == 0:
        write(Path(args.out), seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/fsdp_2gpu.json")
    parser.add_argument("--worker", action="store_true", help="internal: one torchrun rank")
    parser.add_argument("--trainer-check", choices=list(TRAINER_CHECKS), help="internal: under accelerate launch")
    parser.add_argument("--predict-only", action="store_true", help="CPU predictions for the 8B model, no GPU")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts for --predict-only")
    parser.add_argument("--skip", nargs="*", default=[], choices=["worker", "offload", "trainer"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.trainer_check:
        return trainer_check(args)
    if args.predict_only:
        return predict_only(args)
    orchestrate(args)


def orchestrate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="memtune-fsdp-"))
    script = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4"}
    started = time.perf_counter()
    result: dict[str, Any] = {}
    worker_process = None
    if "worker" not in args.skip:
        worker_process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                           script, "--worker", "--out", str(work / "worker.json")], env=env)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, threads))  # the predictions run beside the GPU workers: leave them the cores
    predict_all(work / "predictions.json")
    torch.set_num_threads(threads)  # the offload trials' optimizer step runs on the CPU
    result["predictions"] = json.loads((work / "predictions.json").read_text())
    local = Path(__file__).resolve().parent / "results" / "fsdp_2gpu_predictions_cpu_local.json"
    if local.exists():  # the same predictions made on the development machine (its torch/transformers)
        result["predictions_local"] = json.loads(local.read_text())
    print(f"[bench] predictions done at {time.perf_counter() - started:.0f}s", flush=True)
    if worker_process is not None:
        try:
            worker_process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            worker_process.kill()
            result["worker_error"] = "timed out after 240 s"
        if (work / "worker.json").exists():
            result["worker"] = json.loads((work / "worker.json").read_text())
        result["worker_returncode"] = worker_process.returncode
    write(out, result)
    print(f"[bench] 2-GPU worker done at {time.perf_counter() - started:.0f}s", flush=True)
    if "offload" not in args.skip:
        result["offload"] = offload_trials()
        write(out, result)
        print(f"[bench] offload trials done at {time.perf_counter() - started:.0f}s", flush=True)
    if "trainer" not in args.skip:
        result["trainer"] = trainer_checks(work, script, env)
        write(out, result)
    result["environment"] = environment()
    result["wall_seconds"] = time.perf_counter() - started
    write(out, result)
    print_table(result)


def offload_trials() -> list[dict[str, Any]]:
    from memtune.measure.sharded import measure_sharded

    rows = []
    for name, model, fields, steps in OFFLOAD_CASES:
        config = config_of(fields, num_gpus=1, offload="parameters")
        started = time.perf_counter()
        try:
            row = measure_sharded(model_config(model), config, steps=steps).to_dict()
        except Exception as error:  # noqa: BLE001 - recorded
            row = {"fits": False, "error": f"{type(error).__name__}: {error}"[:300]}
        row.update(case=name, model=model, config=config.to_dict(), wall_seconds=time.perf_counter() - started)
        rows.append(row)
        print(f"[bench] {name}: {row.get('peak_reserved_bytes', 0) / GIB:.2f} GiB reserved, "
              f"{row.get('tokens_per_second', 0):.0f} tokens/s", flush=True)
    return rows


def trainer_checks(work: Path, script: str, env: dict[str, str]) -> dict[str, Any]:
    from memtune.run.launch import write_accelerate_config

    rows: dict[str, Any] = {}
    for check, (model, fields) in TRAINER_CHECKS.items():
        config = config_of(fields)
        yaml_path = write_accelerate_config(work / f"{check}.yaml", config, model_config=model_config(model))
        out = work / f"{check}.json"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path), script,
                   "--trainer-check", check, "--out", str(out)]
        started = time.perf_counter()
        try:
            completed = subprocess.run(command, env=env, timeout=110, capture_output=True, text=True)
            rows[check] = json.loads(out.read_text()) if out.exists() else {
                "error": (completed.stderr or completed.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            rows[check] = {"error": "timed out after 110 s"}
        rows[check]["accelerate_config"] = yaml_path.read_text()
        rows[check]["wall_seconds"] = time.perf_counter() - started
        print(
            f"[bench] {check}: {json.dumps({k: v for k, v in rows[check].items() if k != 'accelerate_config'})[:400]}",
            flush=True,
        )
    return rows


def print_table(result: dict[str, Any]) -> None:
    """GiB per GPU; predictions made on this host ("pred"), and on the development machine ("local")."""
    predictions = result.get("predictions", {})
    local = result.get("predictions_local", {})
    print(f"\n{'case':44s} {'path':10s} {'meas alloc':>10s} {'pred alloc':>10s} {'meas resv':>10s} {'pred resv':>10s} "
          f"{'resv err':>8s} {'local resv':>10s} {'tok/s':>8s}")

    def line(name: str, path: str, row: dict[str, Any], predicted: dict[str, Any]) -> None:
        measured_reserved = row.get("peak_reserved_bytes", 0)
        predicted_reserved = predicted.get("peak_reserved_bytes", 0)
        error = (
            f"{100 * (predicted_reserved / measured_reserved - 1):+.1f}%"
            if measured_reserved and predicted_reserved
            else "-"
        )
        print(
            f"{name:44s} {path:10s} {row.get('peak_allocated_bytes', 0) / GIB:10.2f} "
            f"{predicted.get('peak_allocated_bytes', 0) / GIB:10.2f} {measured_reserved / GIB:10.2f} "
            f"{predicted_reserved / GIB:10.2f} {error:>8s} "
            f"{local.get(name, {}).get('peak_reserved_bytes', 0) / GIB:10.2f} "
            f"{row.get('tokens_per_second', 0):8.0f}"
            + ("" if row.get("fits", True) else f"  FAILED: {row.get('error', '')[:80]}")
            + (f"  prediction failed: {predicted['error'][:80]}" if "error" in predicted else "")
        )

    for row in result.get("worker", {}).get("cases", []):
        line(row["case"], row["path"], row, predictions.get(row["case"], {}))
    for row in result.get("offload", []):
        line(row["case"], "memtune", row, predictions.get(row["case"], {}))
    for check, row in result.get("trainer", {}).items():
        line(check, "Trainer", row, predictions.get(check, {}))
    single = predictions.get("llama-3.1-8b on one GPU (unsharded estimate)", {})
    if single:
        print(f"\nllama-3.1-8b on one GPU, unsharded: predicted {single['total_bytes'] / GIB:.1f} GiB per GPU")
    print(
        f"NCCL memory per rank (outside torch's pool): {result.get('worker', {}).get('nccl_bytes', 0) / GIB:.2f} GiB; "
        f"wall {result.get('wall_seconds', 0):.0f}s"
    )


if __name__ == "__main__":
    main()
