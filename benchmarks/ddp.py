"""DDP against FSDP on a 2-GPU host: measured per-GPU peaks and tokens/s next to memtune's predictions.

One command on a host with 2 GPUs (about 4-5 minutes; writes JSON as it goes, prints a table at the end):
    python benchmarks/ddp.py --out benchmarks/results/ddp_2gpu.json

It runs, in order:
1. `torchrun --nproc-per-node 2 benchmarks/ddp.py --worker`: the NCCL all-reduce and all-gather bus
   bandwidth (what throughput.py assumes: interconnect rate x collective_efficiency), the NCCL memory
   per rank, then for 3 catalog models with random weights (Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-1.5B),
   bf16-mixed, 1024 tokens, effective batch 8 (per GPU micro-batch 4, or micro-batch 1 x 4 accumulated),
   with and without gradient checkpointing: `measure.sharded.measure_sharded` - the step memtune verifies
   and Trainer runs - under DDP and under FSDP2: per-GPU peak allocated/reserved (max over ranks) and
   tokens/s. Meanwhile this process predicts every case on the CPU (replicate / sharding estimates).
2. `accelerate launch --config_file <memtune's DDP config>`: HF Trainer with Plan.training_arguments for
   3 steps: does it wrap DDP with the kwargs memtune assumes, with the buckets it models, at what peak?
   While the worker runs, this process also predicts tokens/s for the card (named by NVML, no CUDA
   context) and runs memtune's search (predictions only) for each model at the card's memory and at
   24 GiB; afterwards each choice is set against the fastest measured configuration that fits
   (measured peak reserved + workspaces + context against the budget less the margin).
3. If time is left: the DDP predictions again on fake CUDA tensors (trace_device "cuda").

Each case is guarded (an error is recorded, the run goes on); the launched processes have timeouts.
Elsewhere (no GPU):
    python benchmarks/ddp.py --predict-only --out /tmp/ddp_predictions.json
    python benchmarks/ddp.py --fit-fsdp-unit benchmarks/results/fsdp_2gpu_h200.json [benchmarks/results/ddp_2gpu.json]
The last recomputes throughput.FSDP_UNIT_SECONDS from measured FSDP steps (the median per unit and micro-batch).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fsdp import environment, model_config, write  # noqa: E402
from memtune.config import GIB, TrainConfig  # noqa: E402

MODELS = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B"]
SEQ_LEN = 1024
EFFECTIVE_BATCH = 8
SHAPES = [(4, 1), (1, 4)]
"""(micro-batch, accumulation) per GPU: 4 x 1 and 1 x 4 keep the effective batch 8 over 2 GPUs."""
STEPS = 4
"""Optimizer steps per trial; the first is warm-up (tokens/s: median of the others)."""
SEARCH_BUDGETS = {"24GiB": 24 * GIB}
"""Besides the card's own memory."""
TRAINER_CHECK = ("Qwen/Qwen2.5-0.5B", dict(seq_len=SEQ_LEN, micro_batch_size=4, amp="bf16", num_gpus=2, strategy="ddp"))
WORKER_TIMEOUT_SECONDS = 230
WORKER_DEADLINE_SECONDS = 190
"""The worker starts no new case after this many seconds (both ranks agree through a broadcast)."""
TRAINER_TIMEOUT_SECONDS = 100
TOTAL_SECONDS = 290
"""Optional passes (CUDA-trace predictions) are skipped after this."""
COLLECTIVE_TIMEOUT_SECONDS = 90
"""A rank that failed alone leaves the other in a collective: the process group gives up after this."""


def short(name: str) -> str:
    return name.split("/")[-1].lower()


def cases(num_gpus: int = 2) -> list[tuple[str, str, TrainConfig]]:
    """(case name, model, configuration) for DDP and FSDP of every model and shape, DDP first."""
    rows = []
    for model in MODELS:
        for micro, accum in SHAPES:
            for checkpointing in (False, True):
                base = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=micro, grad_accum_steps=accum, amp="bf16",
                                   gradient_checkpointing=checkpointing, num_gpus=num_gpus)
                name = f"{short(model)} {micro}x{SEQ_LEN} accum{accum}{' ckpt' if checkpointing else ''}"
                for strategy in ("ddp", "fsdp"):
                    rows.append((name, model, base.replace(strategy=strategy)))
    return rows


def key(name: str, config: TrainConfig) -> str:
    return f"{name} | {config.strategy}"


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


# ---- predictions (CPU) ----------------------------------------------------------------------------


def predict_memory(model: str, config: TrainConfig, device: str = "cpu") -> dict[str, Any]:
    from memtune.predict.estimate import estimate as estimate_for

    started = time.perf_counter()
    try:
        estimate = estimate_for(model_config(model), config, device=device)
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"error": error_text(error)}
    return {
        "peak_allocated_bytes": estimate.peak_allocated_bytes,
        "peak_reserved_bytes": estimate.peak_reserved_bytes,
        "total_bytes": estimate.total_bytes,
        "workspace_bytes": estimate.workspace_bytes,
        "context_bytes": estimate.context_bytes,
        "breakdown": estimate.breakdown,
        "trace_device": estimate.trace_device,
        "seconds": time.perf_counter() - started,
    }


def predict_all(
    out: Path, device: str = "cpu", strategies: tuple[str, ...] = ("ddp", "fsdp"), deadline: float | None = None
) -> dict:
    rows: dict[str, Any] = {}
    for name, model, config in cases():
        if config.strategy not in strategies:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            rows[key(name, config)] = {"error": "skipped: out of time"}
            continue
        rows[key(name, config)] = predict_memory(model, config, device)
        write(out, rows)
    return rows


def predict_speeds(gpu_name: str) -> dict[str, float]:
    from memtune.predict import throughput
    from memtune.sources import parameter_count

    speed = throughput.gpu_speed(gpu_name)
    result = {}
    for name, model, config in cases():
        shape = throughput.ModelShape.of(model_config(model), parameter_count(model_config(model)))
        result[key(name, config)] = throughput.tokens_per_second(shape, config, speed)
    return result


# ---- measurements (GPU, one torchrun rank) --------------------------------------------------------


def bus_bandwidth(device: Any) -> dict[str, Any]:
    """NCCL busbw (nccl-tests' definition): all-reduce 2(n-1)/n x bytes / t, all-gather (n-1)/n x bytes / t."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    result: dict[str, Any] = {}
    for name, num_bytes in (("all_reduce_fp32", 256 * 1024 * 1024), ("all_gather_bf16", 256 * 1024 * 1024)):
        try:
            op: Callable[[], Any]
            if name.startswith("all_reduce"):
                tensor = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
                op = functools.partial(dist.all_reduce, tensor)
                factor = 2 * (world - 1) / world
            else:
                shard = torch.ones(num_bytes // 2 // world, dtype=torch.bfloat16, device=device)
                tensor = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
                op = functools.partial(dist.all_gather_into_tensor, tensor, shard)
                factor = (world - 1) / world
            for _ in range(3):
                op()
            torch.cuda.synchronize()
            started = time.perf_counter()
            repeats = 10
            for _ in range(repeats):
                op()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / repeats
            result[name] = {
                "bytes": num_bytes,
                "seconds": seconds,
                "bus_bytes_per_second": factor * num_bytes / seconds,
            }
        except Exception as error:  # noqa: BLE001
            result[name] = {"error": error_text(error)}
        finally:
            tensor = shard = None  # noqa: F841
            torch.cuda.empty_cache()
    return result


def worker(args: argparse.Namespace) -> None:
    """One rank of `torchrun --nproc-per-node 2`: the collectives, then every case through measure_sharded."""
    import torch
    import torch.distributed as dist

    from memtune.measure.sharded import measure_sharded

    started = time.perf_counter()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    free_before, _ = torch.cuda.mem_get_info()
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS))
    dist.barrier()  # the NCCL communicator and its buffers exist from here on
    free_after, _ = torch.cuda.mem_get_info()
    out = Path(args.out)
    result: dict[str, Any] = {"environment": environment(), "world_size": dist.get_world_size(),
                              "nccl_bytes": free_before - free_after - torch.cuda.memory_reserved(), "cases": []}
    result["bandwidth"] = bus_bandwidth(device)
    if rank == 0:
        write(out, result)
        print(f"[worker] bus bandwidth: {json.dumps(result['bandwidth'])}", flush=True)
    for name, model, config in cases(dist.get_world_size()):
        late = torch.tensor([int(time.perf_counter() - started > WORKER_DEADLINE_SECONDS)], device=device)
        dist.broadcast(late, 0)  # both ranks skip together, or a collective would wait for the other
        row: dict[str, Any] = {"case": name, "model": model, "strategy": config.strategy, "config": config.to_dict(),
                               "tokens_per_step": config.effective_batch_size * config.seq_len}
        if late.item():
            row.update(fits=None, error="skipped: out of time")
        else:
            case_started = time.perf_counter()
            try:
                measured = measure_sharded(model_config(model), config, steps=STEPS, accumulation_limit=None)
                row.update(measured.to_dict())
            except Exception as error:  # noqa: BLE001 - both ranks run the same code on the same shapes
                row.update(fits=False, error=error_text(error), peak_allocated_bytes=0, peak_reserved_bytes=0,
                           step_seconds=[], tokens_per_second=0.0)
            row["wall_seconds"] = time.perf_counter() - case_started
        if rank == 0:
            result["cases"].append(row)
            write(out, result)
            print(f"[worker] {name} {config.strategy}: fits={row.get('fits')} reserved "
                  f"{row.get('peak_reserved_bytes', 0) / GIB:.2f} GiB tokens/s {row.get('tokens_per_second', 0):.0f} "
                  f"{row.get('error', '')[:120]}", flush=True)
    dist.destroy_process_group()


def trainer_check(args: argparse.Namespace) -> None:
    """Under `accelerate launch` with memtune's DDP config: HF Trainer with the plan's arguments, 3 steps."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Trainer

    from memtune.plan import Plan
    from memtune.recipe import step as recipe

    name, fields = TRAINER_CHECK
    config = TrainConfig(**fields)
    plan = Plan(model=name, train_config=config, budget_bytes=0)
    model = recipe.build_model(model_config(name), config, "cpu")  # as Plan.prepare leaves it; Trainer moves it
    data = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(0, model.config.vocab_size, (config.seq_len,)) for _ in range(64))]
    arguments = plan.training_arguments(output_dir=tempfile.mkdtemp(), max_steps=3, save_strategy="no", logging_steps=1,
                                        disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=data)
    started = time.perf_counter()
    trainer.train()
    wrapped = trainer.model_wrapped
    seen: dict[str, Any] = {"config": config.to_dict(), "world_size": dist.get_world_size(),
                            "wrapper": type(wrapped).__name__, "is_ddp": isinstance(wrapped, DistributedDataParallel),
                            "is_fsdp_enabled": trainer.is_fsdp_enabled, "train_seconds": time.perf_counter() - started,
                            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                            "ddp_find_unused_parameters": arguments.ddp_find_unused_parameters}
    if isinstance(wrapped, DistributedDataParallel):
        logged = wrapped._get_ddp_logging_data()
        seen.update(find_unused_parameters=wrapped.find_unused_parameters,
                    gradient_as_bucket_view=wrapped.gradient_as_bucket_view,
                    bucket_logging={k: v for k, v in logged.items() if "bucket" in k})
    if dist.get_rank() == 0:
        write(Path(args.out), seen)


# ---- orchestration --------------------------------------------------------------------------------


def run_with_timeout(
    command: list[str], env: dict[str, str], timeout: float, capture: bool = True
) -> tuple[int | None, str]:
    """Run `command` in its own process group; on timeout kill the whole group (torchrun's workers too).
    Returns (exit code or None on timeout, the output's tail when captured)."""
    pipe = subprocess.PIPE if capture else None
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=pipe, stderr=subprocess.STDOUT if capture else None, text=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, (output or "")[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, f"timed out after {timeout:.0f} s\n" + (output or "")[-3000:]


def orchestrate(args: argparse.Namespace) -> None:
    import threading

    import torch

    started = time.perf_counter()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="memtune-ddp-"))
    script = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4"}
    result: dict[str, Any] = {"seq_len": SEQ_LEN, "effective_batch_size": EFFECTIVE_BATCH, "steps": STEPS}
    worker_output: dict[str, Any] = {}

    def run_worker() -> None:
        code, text = run_with_timeout([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script,
                                       "--worker", "--out", str(work / "worker.json")], env, WORKER_TIMEOUT_SECONDS,
                                      capture=False)
        worker_output.update(returncode=code, output_tail=text)

    thread = None
    if "worker" not in args.skip:
        thread = threading.Thread(target=run_worker)
        thread.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, threads))  # the predictions run beside the GPU workers: leave them the cores
    result["predictions"] = predict_all(work / "predictions.json")
    write(out, result)
    print(f"[bench] CPU predictions done at {time.perf_counter() - started:.0f}s", flush=True)
    gpu, gpu_total = gpu_identity()
    try:
        result["predicted_tokens_per_second"] = predict_speeds(gpu)
        result["speed_model"] = {"gpu": gpu, **speed_model(gpu)}
        result["searches"] = searches(gpu, gpu_total)
    except Exception as error:  # noqa: BLE001
        result["search_error"] = error_text(error)
    torch.set_num_threads(threads)
    write(out, result)
    print(f"[bench] searches done at {time.perf_counter() - started:.0f}s", flush=True)
    if thread is not None:
        thread.join()
        result["worker_process"] = worker_output
        if (work / "worker.json").exists():
            result["worker"] = json.loads((work / "worker.json").read_text())
        if worker_output.get("returncode") != 0:
            print(f"[bench] worker: {worker_output.get('output_tail', '')[-1500:]}", flush=True)
    write(out, result)
    print(f"[bench] 2-GPU worker done at {time.perf_counter() - started:.0f}s", flush=True)
    if "trainer" not in args.skip:
        result["trainer"] = trainer_check_run(work, script, env)
        write(out, result)
    for row in result.get("searches", []):
        set_against_measurements(row, result)
    write(out, result)
    if torch.cuda.is_available() and "cuda-trace" not in args.skip:
        result["predictions_cuda"] = predict_all(work / "predictions_cuda.json", "cuda", ("ddp",),
                                                 deadline=started + TOTAL_SECONDS)
    result["comparison"] = compare(result)
    result["environment"] = environment()
    result["wall_seconds"] = time.perf_counter() - started
    write(out, result)
    print_table(result)


def trainer_check_run(work: Path, script: str, env: dict[str, str]) -> dict[str, Any]:
    from memtune.run.launch import write_accelerate_config

    name, fields = TRAINER_CHECK
    config = TrainConfig(**fields)
    yaml_path = write_accelerate_config(work / "ddp.yaml", config, model_config=model_config(name))
    out = work / "trainer.json"
    started = time.perf_counter()
    code, text = run_with_timeout([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path),
                                   script, "--trainer-check", "--out", str(out)], env, TRAINER_TIMEOUT_SECONDS)
    row: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"error": text[-1500:]}
    row.update(returncode=code, accelerate_config=yaml_path.read_text(), wall_seconds=time.perf_counter() - started)
    try:
        from memtune.predict.ddp import cached_layout

        row["predicted_bucket_bytes"] = list(cached_layout(model_config(name), config).bucket_bytes)
        row["prediction"] = predict_memory(name, config)
    except Exception as error:  # noqa: BLE001
        row["prediction_error"] = error_text(error)
    print(
        f"[bench] trainer check: {json.dumps({k: v for k, v in row.items() if k != 'accelerate_config'})[:600]}",
        flush=True,
    )
    return row


def speed_model(gpu: str) -> dict[str, float]:
    from memtune.predict import throughput

    speed = throughput.gpu_speed(gpu)
    return {"interconnect_bytes_per_second": speed.interconnect_bytes_per_second,
            "collective_efficiency": speed.collective_efficiency, "fsdp_unit_seconds": speed.fsdp_unit_seconds}


def measured_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        key(row["case"], TrainConfig.from_dict(row["config"])): row for row in result.get("worker", {}).get("cases", [])
    }


def gpu_identity() -> tuple[str, int | None]:
    """(name, total bytes) of GPU 0 from NVML, which makes no CUDA context; ("H100", None) without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else name), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:  # noqa: BLE001 - no NVML, no GPU: plan for an H100
        return "H100", None


def searches(gpu: str, gpu_total: int | None) -> list[dict[str, Any]]:
    """memtune's choice per model and budget (predictions only, no trials)."""
    from memtune.config import Policy
    from memtune.fit import ModelPredictor
    from memtune.predict import throughput
    from memtune.search.choose import search
    from memtune.sources import parameter_count

    budgets = dict(SEARCH_BUDGETS)
    if gpu_total:
        budgets["card"] = gpu_total
    policy = Policy(
        num_gpus=2, precision="bf16-mixed", use_adapter=False, allow_offload=False, allow_chunked_loss=False
    )
    rows = []
    for model in MODELS:
        predictor = ModelPredictor(model_config(model), parameter_count(model_config(model)), throughput.gpu_speed(gpu),
                                   device="cpu")
        for label, budget in budgets.items():
            row: dict[str, Any] = {"model": model, "budget": label, "budget_bytes": budget}
            try:
                found = search(predictor, SEQ_LEN, EFFECTIVE_BATCH, budget, policy, trial=None, explain=False)
            except Exception as error:  # noqa: BLE001
                row["error"] = error_text(error)
                rows.append(row)
                continue
            chosen = found.chosen
            row["chosen"] = None if chosen is None else {
                "config": chosen.config.to_dict(), "description": chosen.config.describe(),
                "predicted_total_bytes": chosen.predicted_total_bytes,
                "predicted_tokens_per_second": chosen.predicted_tokens_per_second}
            row.update(estimates=found.estimates, margin_bytes=found.margin_bytes, seconds=found.seconds)
            rows.append(row)
            print(f"[bench] search {short(model)} @ {label}: "
                  f"{row['chosen']['description'] if row.get('chosen') else 'nothing fits'}", flush=True)
    return rows


def set_against_measurements(row: dict[str, Any], result: dict[str, Any]) -> None:
    """The fastest measured case of the row's model that fits its budget, and the chosen one's measurement."""
    measured = measured_rows(result)
    fitting = []
    for name, model, config in cases():
        got = measured.get(key(name, config))
        if model != row["model"] or not got or not got.get("fits"):
            continue
        prediction = result.get("predictions", {}).get(key(name, config), {})
        overhead = prediction.get("workspace_bytes", 0) + prediction.get("context_bytes", 0)
        if got["peak_reserved_bytes"] + overhead <= row["budget_bytes"] - row.get("margin_bytes", 0):
            fitting.append((got.get("tokens_per_second", 0.0), name, config))
    if fitting:
        best = max(fitting, key=lambda item: item[0])
        row["measured_best"] = {"case": best[1], "strategy": best[2].strategy, "tokens_per_second": best[0]}
    chosen = TrainConfig.from_dict(row["chosen"]["config"]) if row.get("chosen") else None
    if chosen is not None:
        row["chosen_in_grid"] = any(config == chosen for _, _, config in cases())
        got = next((measured.get(key(name, config), {}) for name, model, config in cases()
                    if model == row["model"] and config == chosen), {})
        row["chosen_measured_tokens_per_second"] = got.get("tokens_per_second")
        row["chosen_fits_budget_measured"] = any(config == chosen for _, _, config in fitting) if got else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(result: dict[str, Any]) -> dict[str, Any]:
    """Per case: predicted / measured (reserved, allocated, tokens/s); per shape: DDP vs FSDP measured and predicted."""
    measured = measured_rows(result)
    predictions = result.get("predictions", {})
    cuda_predictions = result.get("predictions_cuda", {})
    speeds = result.get("predicted_tokens_per_second", {})
    rows, pairs = [], []
    by_case: dict[str, dict[str, Any]] = {}
    for name, _model, config in cases():
        k = key(name, config)
        got, predicted = measured.get(k, {}), predictions.get(k, {})
        row = {
            "case": name,
            "strategy": config.strategy,
            "fits": got.get("fits"),
            "error": got.get("error", ""),
            "measured_reserved_bytes": got.get("peak_reserved_bytes"),
            "measured_allocated_bytes": got.get("peak_allocated_bytes"),
            "predicted_reserved_bytes": predicted.get("peak_reserved_bytes"),
            "predicted_allocated_bytes": predicted.get("peak_allocated_bytes"),
            "predicted_reserved_bytes_cuda_trace": cuda_predictions.get(k, {}).get("peak_reserved_bytes"),
            "measured_tokens_per_second": got.get("tokens_per_second"),
            "predicted_tokens_per_second": speeds.get(k),
        }
        if got.get("fits"):
            row["reserved_ratio"] = ratio(row["predicted_reserved_bytes"], row["measured_reserved_bytes"])
            row["allocated_ratio"] = ratio(row["predicted_allocated_bytes"], row["measured_allocated_bytes"])
            row["reserved_ratio_cuda_trace"] = ratio(
                row["predicted_reserved_bytes_cuda_trace"], row["measured_reserved_bytes"]
            )
            row["tokens_per_second_ratio"] = ratio(
                row["predicted_tokens_per_second"], row["measured_tokens_per_second"]
            )
        rows.append(row)
        by_case.setdefault(name, {})[config.strategy] = row
    agree = 0
    for name, both in by_case.items():
        ddp, fsdp = both.get("ddp", {}), both.get("fsdp", {})
        pair = {
            "case": name,
            "measured_ddp_over_fsdp_tokens_per_second": ratio(
                ddp.get("measured_tokens_per_second"), fsdp.get("measured_tokens_per_second")
            ),
            "predicted_ddp_over_fsdp_tokens_per_second": ratio(
                ddp.get("predicted_tokens_per_second"), fsdp.get("predicted_tokens_per_second")
            ),
            "measured_ddp_over_fsdp_reserved": ratio(
                ddp.get("measured_reserved_bytes"), fsdp.get("measured_reserved_bytes")
            ),
            "predicted_ddp_over_fsdp_reserved": ratio(
                ddp.get("predicted_reserved_bytes"), fsdp.get("predicted_reserved_bytes")
            ),
        }
        if (
            ddp.get("fits")
            and fsdp.get("fits")
            and pair["measured_ddp_over_fsdp_tokens_per_second"]
            and pair["predicted_ddp_over_fsdp_tokens_per_second"]
        ):
            pair["ranking_agrees"] = (pair["measured_ddp_over_fsdp_tokens_per_second"] > 1) == (
                pair["predicted_ddp_over_fsdp_tokens_per_second"] > 1
            )
            agree += pair["ranking_agrees"]
        pairs.append(pair)
    ratios = [row["reserved_ratio"] for row in rows if row.get("reserved_ratio")]
    speed_ratios = [row["tokens_per_second_ratio"] for row in rows if row.get("tokens_per_second_ratio")]
    return {
        "rows": rows,
        "pairs": pairs,
        "ranking_agrees": agree,
        "ranking_compared": sum(1 for p in pairs if "ranking_agrees" in p),
        "median_reserved_ratio": statistics.median(ratios) if ratios else None,
        "median_tokens_per_second_ratio": statistics.median(speed_ratios) if speed_ratios else None,
        "fsdp_unit_residual_seconds": fsdp_unit_residuals(
            list(measured.values()), result.get("speed_model", {}).get("gpu", "H100")
        ),
    }


def print_table(result: dict[str, Any]) -> None:
    comparison = result.get("comparison", {})
    print(f"\n{'case':34s} {'strat':5s} {'meas resv':>9s} {'pred resv':>9s} {'ratio':>6s} {'meas alloc':>10s} "
          f"{'pred alloc':>10s} {'meas tok/s':>10s} {'pred tok/s':>10s} {'ratio':>6s}")
    for row in comparison.get("rows", []):
        def gib(value: Any) -> str:
            return f"{value / GIB:9.2f}" if value else f"{'-':>9s}"

        def number(value: Any, width: int = 6, digits: int = 2) -> str:
            return f"{value:{width}.{digits}f}" if value else f"{'-':>{width}s}"

        print(
            f"{row['case']:34s} {row['strategy']:5s} "
            f"{gib(row['measured_reserved_bytes'])} {gib(row['predicted_reserved_bytes'])} "
            f"{number(row.get('reserved_ratio'))} "
            f"{gib(row['measured_allocated_bytes'])} {gib(row['predicted_allocated_bytes'])} "
            f"{number(row['measured_tokens_per_second'], 10, 0)} {number(row['predicted_tokens_per_second'], 10, 0)} "
            f"{number(row.get('tokens_per_second_ratio'))}"
            + ("" if row["fits"] is not False else f"  FAILED: {row['error'][:70]}")
        )
    print(f"\nDDP / FSDP tokens/s, measured vs predicted (ranking agrees in {comparison.get('ranking_agrees')} of "
          f"{comparison.get('ranking_compared')}):")
    for pair in comparison.get("pairs", []):
        print(
            f"  {pair['case']:34s} measured {pair['measured_ddp_over_fsdp_tokens_per_second'] or 0:5.2f}x  "
            f"predicted {pair['predicted_ddp_over_fsdp_tokens_per_second'] or 0:5.2f}x   memory DDP/FSDP measured "
            f"{pair['measured_ddp_over_fsdp_reserved'] or 0:5.2f}x "
            f"predicted {pair['predicted_ddp_over_fsdp_reserved'] or 0:5.2f}x"
        )
    for row in result.get("searches", []):
        chosen = row.get("chosen") or {}
        print(
            f"search {short(row['model'])} @ {row['budget']}: "
            f"{chosen.get('description', row.get('error', 'nothing fits'))}"
            f" -> measured {row.get('chosen_measured_tokens_per_second') or '-'} tokens/s; "
            f"measured best {row.get('measured_best')}"
        )
    worker = result.get("worker", {})
    print(f"bus bandwidth: {json.dumps(worker.get('bandwidth', {}))}")
    print(f"NCCL memory per rank (outside torch's pool): {worker.get('nccl_bytes', 0) / GIB:.2f} GiB; "
          f"speed model {json.dumps(result.get('speed_model', {}))}")
    trainer = result.get("trainer", {})
    if trainer:
        print(
            f"Trainer check: wrapper {trainer.get('wrapper')}, "
            f"find_unused_parameters {trainer.get('find_unused_parameters')}, "
            f"buckets {trainer.get('bucket_logging', {}).get('bucket_sizes')} "
            f"(predicted {trainer.get('predicted_bucket_bytes')}), "
            f"peak reserved {trainer.get('peak_reserved_bytes', 0) / GIB:.2f} GiB "
            f"(predicted {trainer.get('prediction', {}).get('peak_reserved_bytes', 0) / GIB:.2f}) "
            f"{trainer.get('error', '')[:200]}"
        )
    print(f"median predicted/measured: reserved {comparison.get('median_reserved_ratio')}, "
          f"tokens/s {comparison.get('median_tokens_per_second_ratio')}; wall {result.get('wall_seconds', 0):.0f}s")


# ---- the FSDP per-unit term ------------------------------------------------------------------------


def fsdp_unit_residuals(rows: list[dict[str, Any]], gpu: str = "H200") -> dict[str, Any]:
    """(measured step - predicted step without fsdp_unit_seconds) / (FSDP units x micro-batches), per
    measured FSDP row ({"model", "config", "step_seconds" | "tokens_per_second", "tokens_per_step"})."""
    from memtune.predict import throughput
    from memtune.sources import parameter_count

    speed = throughput.gpu_speed(gpu).scaled(fsdp_unit_seconds=0.0)
    residuals = {}
    for row in rows:
        if not row.get("fits") or "config" not in row or "model" not in row:
            continue
        config = TrainConfig.from_dict(row["config"])
        if not config.sharded or config.offload != "none":
            continue
        timed = sorted(row.get("step_seconds", [])[1:] or row.get("step_seconds", []))
        if not timed:
            continue
        shape = throughput.ModelShape.of(model_config(row["model"]), parameter_count(model_config(row["model"])))
        measured = timed[len(timed) // 2]
        predicted = throughput.step_seconds(shape, config, speed)
        residuals[f"{row.get('case', row['model'])}"] = (measured - predicted) / (
            throughput.fsdp_units(shape) * config.grad_accum_steps
        )
    values = list(residuals.values())
    return {"gpu": gpu, "per_case": residuals, "median": statistics.median(values) if values else None}


def fit_fsdp_unit(paths: list[str], gpu: str) -> None:
    from memtune.predict.throughput import FSDP_UNIT_SECONDS

    rows: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows += data.get("worker", {}).get("cases", [])
    fitted = fsdp_unit_residuals(rows, gpu)
    for name, value in fitted["per_case"].items():
        print(f"{name:50s} {value * 1e3:7.3f} ms per unit and micro-batch")
    print(f"median: {fitted['median'] * 1e3 if fitted['median'] is not None else float('nan'):.3f} ms "
          f"(throughput.FSDP_UNIT_SECONDS is {FSDP_UNIT_SECONDS * 1e3:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/ddp_2gpu.json")
    parser.add_argument("--worker", action="store_true", help="internal: one torchrun rank")
    parser.add_argument("--trainer-check", action="store_true", help="internal: under accelerate launch")
    parser.add_argument("--predict-only", action="store_true", help="CPU predictions of every case, no GPU")
    parser.add_argument(
        "--fit-fsdp-unit", nargs="+", metavar="FILE", help="recompute FSDP_UNIT_SECONDS from measured FSDP steps"
    )
    parser.add_argument("--gpu", default="H200", help="with --fit-fsdp-unit: the card the steps were measured on")
    parser.add_argument("--skip", nargs="*", default=[], choices=["worker", "trainer", "cuda-trace"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.trainer_check:
        return trainer_check(args)
    if args.fit_fsdp_unit:
        return fit_fsdp_unit(args.fit_fsdp_unit, args.gpu)
    if args.predict_only:
        write(
            Path(args.out),
            {
                "environment": environment(),
                "predictions": predict_all(Path(args.out).with_suffix(".partial.json")),
                "predicted_tokens_per_second": predict_speeds(args.gpu),
            },
        )
        return None
    orchestrate(args)


if __name__ == "__main__":
    main()
