"""DeepSpeed ZeRO (issue 15): predicted vs measured per-GPU peak memory of ZeRO-2 and ZeRO-3, with and without CPU
optimizer offload, on Qwen2.5-0.5B and Llama-3.2-1B (catalog configs, random weights, bf16) on 1 GPU, and on 2 with
torchrun where the machine has them.

Each case is measured in its own `torchrun` job (one process per GPU) through DeepSpeed's engine as memtune's run
path sets it up: the DeepSpeed JSON of `memtune.run.launch.deepspeed_config`, every "auto" filled as Trainer fills
it, ZeRO-3 models built under zero.Init (transformers' HfDeepSpeedConfig alive before the model, as Trainer's
TrainingArguments make it), torch's AdamW passed in without offload (what Trainer builds) and DeepSpeed's CPU Adam
from the JSON with it. The cuBLAS workspaces are made first (`measure.memory.warm_up`) and, with what was allocated
before the model, taken off the figures, as memtune's own trials do. Three steps; the compared figure is the largest
over ranks of the peak reserved (and allocated) of steps 2 and 3: ZeRO-3's prefetch and reuse follow the trace
recorded in step 1, so step 1 is not representative (memo §6). Predictions: `memtune.predict.estimate.estimate` on
both trace paths, with the host RAM ZeRO holds per rank (`Estimate.host_bytes`) beside the measured RSS.

GPU machine (DeepSpeed is not installed there; carry the wheels of .whl/ named in
docs/deepspeed-zero.md §7):
    pip install --no-deps --target /tmp/dssite deepspeed-0.19.8-py3-none-any.whl hjson-*.whl pydantic-*.whl \
        pydantic_core-*cp312*.whl annotated_types-*.whl typing_inspection-*.whl
    PYTHONPATH=/tmp/dssite:. python3 benchmarks/zero.py --out $OUT/zero_h200.json
(the first offload case JIT-builds DeepSpeedCPUAdam with g++, ~40 s; TORCH_EXTENSIONS_DIR keeps it.)
Predictions only (no GPU, no DeepSpeed): PYTHONPATH=. python3 benchmarks/zero.py --no-measure --paths cpu
With MEMTUNE_ZERO_HISTORY=FOLDER, rank 0 records every allocator event from the model's build to the last step
(`torch.cuda.memory._record_memory_history`) into FOLDER/<case>.json.gz, for replaying the reserved figure offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loss_2gpu import predict, print_summary, reserved_columns  # noqa: E402
from memtune.config import GIB, Adapter, TrainConfig, Zero  # noqa: E402

STEPS = 3


def cases(gpu_counts: list[int]) -> list[tuple[str, str, TrainConfig]]:
    """(name, catalog model, configuration): ZeRO-2 and ZeRO-3, without and with CPU optimizer offload, per model and
    GPU count; one ZeRO-2 offload case at DeepSpeed's own reduce_bucket_size 5e8 (954 MiB of IPG bucket)."""
    models = [("qwen2.5-0.5b 4x2048", "Qwen/Qwen2.5-0.5B", 4), ("llama-3.2-1b 2x2048", "meta-llama/Llama-3.2-1B", 2)]
    out = []
    for label, model, batch in models:
        for gpus in gpu_counts:
            for stage in (2, 3):
                for offload in ("none", "optimizer"):
                    config = TrainConfig(seq_len=2048, micro_batch_size=batch, amp="bf16", strategy="deepspeed",
                                         num_gpus=gpus, offload=offload, zero=Zero(stage=stage))
                    where = " cpu-opt" if offload != "none" else ""
                    out.append((f"{label} z{stage}{where} {gpus}gpu", model, config))
        out.append((f"{label} z2 cpu-opt rbs5e8 1gpu", model,
                    TrainConfig(seq_len=2048, micro_batch_size=batch, amp="bf16", strategy="deepspeed", num_gpus=1,
                                offload="optimizer", zero=Zero(stage=2, reduce_bucket_size=500_000_000))))
    return out


def zero(stage: int, micro_batch_size: int, **fields: object) -> TrainConfig:
    """A one-GPU ZeRO case at 2048 tokens, bf16 (DeepSpeed's bf16 mode), with `fields` on top."""
    return TrainConfig(seq_len=2048, micro_batch_size=micro_batch_size, amp="bf16", strategy="deepspeed", num_gpus=1,
                       zero=Zero(stage=stage), **fields)  # type: ignore[arg-type]


def validation_cases() -> list[tuple[str, str, TrainConfig]]:
    """Cases measured after the rules were set from `cases()` (1 GPU): a third model with checkpointing and gradient
    accumulation, ZeRO-1, LoRA under ZeRO-2 and ZeRO-3."""
    qwen15, llama1 = "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B"
    return [
        ("qwen2.5-1.5b 4x2048 ckpt z3 1gpu", qwen15, zero(3, 4, gradient_checkpointing=True)),
        ("qwen2.5-1.5b 4x2048 ckpt z2 cpu-opt ga2 1gpu", qwen15,
         zero(2, 4, gradient_checkpointing=True, offload="optimizer", grad_accum_steps=2)),
        ("qwen2.5-1.5b 2x2048 z1 1gpu", qwen15, zero(1, 2)),
        ("qwen2.5-0.5b 4x2048 z2 ga2 1gpu", "Qwen/Qwen2.5-0.5B", zero(2, 4, grad_accum_steps=2)),
        ("llama-3.2-1b 4x2048 lora z2 1gpu", llama1, zero(2, 4, adapter=Adapter())),
        ("llama-3.2-1b 4x2048 lora z3 1gpu", llama1, zero(3, 4, adapter=Adapter())),
    ]


def heldout_cases() -> list[tuple[str, str, TrainConfig]]:
    """Cases measured only after every rule was set from `cases()` and `validation_cases()` (1 GPU): combinations
    none of those had."""
    return [
        ("qwen2.5-1.5b 2x2048 ckpt z3 cpu-opt ga2 1gpu", "Qwen/Qwen2.5-1.5B",
         zero(3, 2, gradient_checkpointing=True, offload="optimizer", grad_accum_steps=2)),
        ("llama-3.2-1b 2x2048 ckpt lora z2 ga2 1gpu", "meta-llama/Llama-3.2-1B",
         zero(2, 2, gradient_checkpointing=True, adapter=Adapter(), grad_accum_steps=2)),
        ("qwen2.5-0.5b 4x2048 z1 cpu-opt 1gpu", "Qwen/Qwen2.5-0.5B", zero(1, 4, offload="optimizer")),
        ("llama-3.2-1b 2x2048 z3 ga2 1gpu", "meta-llama/Llama-3.2-1B", zero(3, 2, grad_accum_steps=2)),
    ]


def nvme_cases(nvme_path: str) -> list[tuple[str, str, TrainConfig]]:
    """ZeRO-Infinity on 1 GPU (`--nvme DIR`): ZeRO-3 without offload (the host twin), the optimizer state on NVMe,
    and the parameters too, at `nvme_path`. DeepSpeed's async_io op needs libaio (headers and library) to build."""
    on_nvme = Zero(stage=3, offload_device="nvme", nvme_path=nvme_path)
    out = []
    for label, model, batch in (("qwen2.5-0.5b 4x2048", "Qwen/Qwen2.5-0.5B", 4),
                                ("llama-3.2-1b 2x2048", "meta-llama/Llama-3.2-1B", 2)):
        out.append((f"{label} z3 1gpu", model, zero(3, batch)))
        out.append((f"{label} z3 nvme-opt 1gpu", model, zero(3, batch, offload="optimizer").replace(zero=on_nvme)))
        out.append((f"{label} z3 nvme-param 1gpu", model, zero(3, batch, offload="parameters").replace(zero=on_nvme)))
    return out


def nvme_predicted(model: str, config: TrainConfig) -> int:
    """What memtune's plan checks against the drive's free space (`fit.ModelPredictor.nvme_bytes`' rule)."""
    from memtune.predict import zero as zero_predict
    from memtune.predict import zero_layout
    from memtune.sources import catalog_config

    model_config = catalog_config(model)
    layout = zero_predict.cached_layout(model_config, config)
    return zero_layout.nvme_bytes(layout, zero_predict.knobs_of(config, zero_predict.hidden_size_of(model_config)))


def disk_bytes(folder: str) -> int:
    """Bytes of the files under `folder` (DeepSpeed's swap files), 0 when it does not exist."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# -- the measured side (GPU, DeepSpeed) ---------------------------------------------------------------------------

def deepspeed_json(config: TrainConfig, model_config: Any) -> dict:
    """The DeepSpeed JSON of the run path (`memtune.run.launch.deepspeed_config`, every ZeRO knob a number) with
    Trainer's "auto"s filled: the micro-batch, accumulation 1, clipping 1.0 (TrainingArguments' max_grad_norm),
    AdamW's lr / betas / eps / weight decay (its defaults, lr 1e-5)."""
    from memtune.run.launch import deepspeed_config

    written = deepspeed_config(config, model_config=model_config)
    written.update({"train_micro_batch_size_per_gpu": config.micro_batch_size,
                    "gradient_accumulation_steps": config.grad_accum_steps,
                    "train_batch_size": config.micro_batch_size * config.grad_accum_steps * config.num_gpus,
                    "gradient_clipping": 1.0})
    if "optimizer" in written:
        written["optimizer"]["params"] = {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    return written


def worker(case_path: str, result_path: str) -> None:
    """One rank of a measured case (started by torchrun): DeepSpeed's engine, STEPS steps, each step's peaks."""
    import deepspeed
    import psutil
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from memtune.measure import memory
    from memtune.recipe import step as recipe
    from memtune.sources import catalog_config

    case = json.loads(Path(case_path).read_text())
    config, model_config = TrainConfig.from_dict(case["config"]), catalog_config(case["model"])
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    deepspeed.init_distributed()
    rss_start = psutil.Process().memory_info().rss
    workspace_bytes = memory.warm_up()  # the cuBLAS workspaces, in segments of their own: outside the prediction
    allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    history = os.environ.get("MEMTUNE_ZERO_HISTORY")  # a folder: every allocator event of rank 0, model build on
    if history and rank == 0:
        torch.cuda.memory._record_memory_history(context=None, max_entries=3_000_000)
    written = deepspeed_json(config, model_config)
    zero3 = HfDeepSpeedConfig(written) if config.zero is not None and config.zero.stage == 3 else None  # zero.Init
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.adapter is not None:  # as memtune's recipe (and Trainer) wrap it: peft around the built model
        import peft

        model.config.use_cache = False
        model = peft.get_peft_model(model, recipe.peft_config(config))
    model.train()  # as Trainer does (dropout on)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = None
    if config.offload == "none":  # Trainer's own AdamW, wrapped by ZeRO
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=config.optimizer == "adamw_torch_fused")
    started = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=written,
                                      model_parameters=trainable if optimizer is None else None)
    init_seconds = time.perf_counter() - started
    after_init = torch.cuda.memory_allocated() - allocated_before
    peaks = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(STEPS):
        for _ in range(config.grad_accum_steps):  # DeepSpeed steps the optimizer at the accumulation boundary
            input_ids = recipe.random_batch(model_config, config, "cuda")
            loss = recipe.forward_loss(engine, input_ids, input_ids, config)
            engine.backward(loss)
            engine.step()
        torch.cuda.synchronize()
        peaks.append({"allocated": torch.cuda.max_memory_allocated() - allocated_before,
                      "reserved": torch.cuda.max_memory_reserved() - reserved_before})
        torch.cuda.reset_peak_memory_stats()
    result = {"rank": rank, "init_seconds": init_seconds, "workspace_bytes": workspace_bytes,
              "allocated_after_init": after_init, "steps": peaks,
              "rss_bytes": psutil.Process().memory_info().rss, "rss_start_bytes": rss_start,
              "nvme_disk_bytes": disk_bytes(config.zero.nvme_path) if config.zero and config.zero.nvme_path else 0,
              "deepspeed": deepspeed.__version__,
              "torch": torch.__version__, "json": written}
    Path(f"{result_path}.{rank}").write_text(json.dumps(result))
    if history and rank == 0:
        write_history(Path(history), case["name"], case["model"], config, result)
    del zero3


def write_history(folder: Path, name: str, model: str, config: TrainConfig, result: dict) -> None:
    """Stop recording; the case's allocator events as [action, address, size, stream] in allocator_history.py's
    format (its `--compare` reads them), gzipped, one file per case."""
    import gzip

    import torch

    from benchmarks.allocator_history import ACTIONS

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    events = [[ACTIONS.index(e["action"]) if e["action"] in ACTIONS else -1, e["addr"], e["size"], e["stream"]]
              for e in trace]
    steady = result["steps"][1:]
    measured = {"peak_reserved_bytes": max(step["reserved"] for step in steady),
                "peak_allocated_bytes": max(step["allocated"] for step in steady)}
    row = {"case": name, "model": model, "config": config.to_dict(), "measured": measured, "events": events}
    folder.mkdir(parents=True, exist_ok=True)
    data = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "actions": ACTIONS, "cases": [row]}
    (folder / (name.replace(" ", "_") + ".json.gz")).write_bytes(gzip.compress(json.dumps(data).encode()))


def measure(name: str, model: str, config: TrainConfig, timeout_seconds: int) -> dict:
    """Run the case under torchrun (num_gpus processes); the largest rank's step-2+ peaks. An NVMe case's swap
    folder is emptied afterwards (the next case would otherwise find the disk full)."""
    try:
        return _measure(name, model, config, timeout_seconds)
    finally:
        if config.zero is not None and config.zero.nvme_path:
            shutil.rmtree(config.zero.nvme_path, ignore_errors=True)
            Path(config.zero.nvme_path).mkdir(parents=True, exist_ok=True)


def _measure(name: str, model: str, config: TrainConfig, timeout_seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        case_path, result_path = Path(folder) / "case.json", Path(folder) / "result"
        case_path.write_text(json.dumps({"name": name, "model": model, "config": config.to_dict()}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.num_gpus}",
                   __file__, "--worker", str(case_path), str(result_path)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            return {"fits": False, "error": f"timed out after {timeout_seconds} s"}
        ranks = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("result.*"))]
        if done.returncode != 0 or len(ranks) != config.num_gpus:
            oom = "out of memory" in done.stderr.lower()
            # torchrun prefixes the workers' lines with "[rankN]:"; the worker's own exception comes first
            raised = [line for line in done.stderr.splitlines()
                      if re.match(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception)\b", line)]
            first = done.stderr.find("Traceback")
            return {"fits": False, "oom": oom, "raised": raised[:3] + raised[-1:],
                    "error": done.stderr[max(first, 0):][:3000] + "\n...\n" + done.stderr[-800:]}
    steady = [step for rank in ranks for step in rank["steps"][1:]]
    return {"fits": True, "peak_reserved_bytes": max(step["reserved"] for step in steady),
            "peak_allocated_bytes": max(step["allocated"] for step in steady),
            "first_step_reserved_bytes": max(rank["steps"][0]["reserved"] for rank in ranks),
            "rss_bytes": max(rank["rss_bytes"] for rank in ranks),
            "rss_start_bytes": max(rank.get("rss_start_bytes", 0) for rank in ranks), "ranks": ranks,
            "nvme_disk_bytes": sum(rank.get("nvme_disk_bytes", 0) for rank in ranks),
            "seconds": time.perf_counter() - started}


def host_column(row: dict, earlier: list[dict], path: str) -> str:
    """For an offload case: the host RAM ZeRO took, measured as the process RSS less that of the same model's
    no-offload case at the same stage and GPU count (an earlier row), or without one less the worker's RSS at its
    start, against the predicted `host_bytes`; the error is kept in the row as `host_error`."""
    measured, predicted = row.get("measured", {}), row[path].get("host_bytes")
    if not predicted or not measured.get("fits"):
        return ""
    config = row["config"]
    twins = [r for r in earlier if r["model"] == row["model"] and r["config"]["offload"] == "none"
             and r["config"]["zero"]["stage"] == config["zero"]["stage"]
             and r["config"]["num_gpus"] == config["num_gpus"]
             and r.get("measured", {}).get("fits")]
    if twins:
        taken = measured["rss_bytes"] - twins[0]["measured"]["rss_bytes"]
    elif measured.get("rss_start_bytes"):  # no twin: the growth from the worker's start (CUDA context made)
        taken = measured["rss_bytes"] - measured["rss_start_bytes"]
    else:
        return ""
    row["host_measured_bytes"], row["host_error"] = taken, (predicted - taken) / taken
    return f" vs {taken / GIB:6.2f} measured ({100 * row['host_error']:+.1f}%)"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    import torch

    gpus_here = torch.cuda.device_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/zero.json")
    parser.add_argument("--paths", nargs="+", default=["cuda", "cpu"] if gpus_here else ["cpu"],
                        choices=["cuda", "cpu"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[n for n in (1, 2) if n <= max(gpus_here, 1)],
                        help="GPU counts to plan and measure (2 needs two GPUs to measure)")
    parser.add_argument("--no-measure", action="store_true", help="predictions only (no GPU, no DeepSpeed)")
    parser.add_argument("--match", default="", help="only cases whose name has this text")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measured case")
    parser.add_argument("--validation", action="store_true",
                        help="the cases measured after the rules were set (validation_cases) instead of cases()")
    parser.add_argument("--heldout", action="store_true", help="heldout_cases() instead of cases()")
    parser.add_argument("--nvme", default="", metavar="DIR",
                        help="nvme_cases(DIR) instead of cases(): ZeRO-3 with offload to NVMe at DIR (needs libaio)")
    parser.add_argument("--measured", default="",
                        help="a JSON this script wrote on the GPU: predict again here against its measurements")
    args = parser.parse_args()
    recorded = {}
    if args.measured:
        args.no_measure = True
        recorded = {row["case"]: row["measured"] for row in json.loads(Path(args.measured).read_text())["rows"]}
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'case':40s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s}" for path in args.paths)
          + " | host GiB", flush=True)
    chosen = (validation_cases() if args.validation else heldout_cases() if args.heldout
              else nvme_cases(args.nvme) if args.nvme else cases(args.gpus))
    for name, model, config in chosen:
        if args.match not in name:
            continue
        row: dict = {"case": name, "model": model, "config": config.to_dict()}
        for path in args.paths:
            row[path] = predict(model, config, path)
        if config.zero is not None and config.zero.offload_device == "nvme" and config.offload != "none":
            row["nvme_predicted_bytes"] = nvme_predicted(model, config)
        if not args.no_measure:
            row["measured"] = measure(name, model, config, args.timeout)
        elif name in recorded:
            row["measured"] = recorded[name]
        line = f"{name:40s} {reserved_columns(row, args.paths)}"
        line += f" | {row[args.paths[0]].get('host_bytes', 0) / GIB:8.2f}{host_column(row, rows, args.paths[0])}"
        if "nvme_predicted_bytes" in row:
            on_disk = row.get("measured", {}).get("nvme_disk_bytes")
            line += f" | NVMe {row['nvme_predicted_bytes'] / GIB:.2f} GiB predicted" + (
                f", {on_disk / GIB:.2f} on disk" if on_disk is not None else "")
        print(line, flush=True)
        rows.append(row)
        out.write_text(json.dumps({"steps": STEPS, "rows": rows}, indent=1))
    print_summary(rows, args.paths)
    host_errors = [abs(row["host_error"]) for row in rows if "host_error" in row]
    if host_errors:
        print(f"host RAM: {len(host_errors)} offload cases, max |error| {100 * max(host_errors):.2f}%")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
