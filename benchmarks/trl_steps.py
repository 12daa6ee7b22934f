"""TRL's SFTTrainer and DPOTrainer: memtune's predicted peak reserved vs the measured one (issue 18).

Cases: two catalog models with random weights (Qwen2.5-0.5B, Llama-3.2-1B) x SFT packed / SFT padding-free /
DPO with LoRA (reference: the adapter disabled) / DPO of the full model (reference: a frozen full copy), plus DPO
with precomputed reference log-probs. Each case runs in its own process, set up through memtune's API as
`memtune run --trainer` sets it up (run/trl_run.py):

    plan = Plan(MODEL, train_config, budget_bytes=...)
    model = plan.prepare(AutoModelForCausalLM.from_config(config, dtype=...).cuda())   # DPO+LoRA: peft_config=
    trainer = GuardedSFTTrainer / GuardedDPOTrainer(model, plan.sft_config() / plan.dpo_config(), ...)
    trainer.train()                                                                     # TRAIN_STEPS steps

Data of exact lengths, so that every batch is micro-batch x seq_len tokens without padding: SFT gets pre-tokenised
rows of seq_len random ids (language modelling: every token labelled); DPO gets text whose tokens memtune's sample
tokenizer knows one by one (" a" and " the" are single tokens): a prompt of PROMPT_TOKENS tokens and chosen and
rejected completions of seq_len - PROMPT_TOKENS tokens with TRL's EOS, so the prompts' unlabelled tokens are few
(memtune's twin of TRL's fused head counts every position as labelled, `predict.trl_step`).

Measured: `torch.cuda.max_memory_reserved()` over the process's reserved memory after cuBLAS's workspaces were
made (`memtune.measure.memory.warm_up`) and the peak counters reset, before the model is built: the model, TRL's
set-up (with precomputed log-probs, their no_grad forwards) and the steps. Predicted: `estimate(...)
.peak_reserved_bytes` of the same TrainConfig (the same protocol: weights onward, workspaces and context apart).

On the GPU machine (TRL, datasets, pyarrow, pandas, xxhash, multiprocess, dill installed from wheels; about
3 minutes on one H200, two cases at a time):
    PYTHONPATH=. python3 benchmarks/trl_steps.py --out $OUT/trl_steps_h200.json
Predictions only, on any machine (no TRL needed):
    PYTHONPATH=. python3 benchmarks/trl_steps.py --predict-only
Every case's TRL flow on a tiny Llama on the CPU (TRL needed, nothing measured):
    PYTHONPATH=.:/tmp/trlsite python3 benchmarks/trl_steps.py --dry-run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import Adapter, TrainConfig  # noqa: E402

GIB = 1 << 30
MODELS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "llama-3.2-1b": "meta-llama/Llama-3.2-1B"}
TRAIN_STEPS = 4
PROMPT_TOKENS = 8
SFT = {"seq_len": 1024, "micro_batch_size": 4, "grad_accum_steps": 2, "weights_dtype": "fp32", "amp": "bf16",
       "gradient_checkpointing": True, "trainer": "sft"}
"""Full fine-tuning, bf16-mixed (SFTConfig bf16=True), checkpointing, 4 x 1024 tokens per micro-batch."""
DPO_LORA = {"seq_len": 1024, "micro_batch_size": 2, "grad_accum_steps": 2, "weights_dtype": "bf16", "amp": "bf16",
            "gradient_checkpointing": True, "adapter": Adapter(), "trainer": "dpo"}
"""LoRA r16 all-linear on a bf16 base: 2 pairs (4 sequences) of 1024 tokens per micro-batch."""
DPO_FULL = {"seq_len": 512, "micro_batch_size": 2, "grad_accum_steps": 2, "weights_dtype": "fp32", "amp": "bf16",
            "gradient_checkpointing": True, "trainer": "dpo"}
"""Full fine-tuning, bf16-mixed: the policy and its frozen fp32 copy (DPOTrainer's reference dtype is the model's)."""
CASES: dict[str, tuple[str, TrainConfig]] = {}
for _short, _model in MODELS.items():
    CASES[f"{_short} sft packed"] = (_model, TrainConfig(**SFT, sft_batches="packed"))
    CASES[f"{_short} sft padding-free"] = (_model, TrainConfig(**SFT, sft_batches="padding-free"))
    CASES[f"{_short} dpo lora"] = (_model, TrainConfig(**DPO_LORA))
    CASES[f"{_short} dpo full reference"] = (_model, TrainConfig(**DPO_FULL))
CASES["qwen2.5-0.5b dpo precomputed"] = (MODELS["qwen2.5-0.5b"], TrainConfig(**DPO_FULL,
                                                                              precompute_ref_log_probs=True))


def datasets_for(train_config: TrainConfig, vocab_size: int, rows: int) -> Any:
    """A datasets.Dataset of `rows` examples of exact length (module docstring)."""
    import tempfile

    import torch
    from datasets import load_dataset

    generator = torch.Generator().manual_seed(0)
    if train_config.trainer == "sft":
        ids = torch.randint(2, vocab_size, (rows, train_config.seq_len), generator=generator)
        examples = [{"input_ids": row} for row in ids.tolist()]
    else:
        completion = train_config.seq_len - PROMPT_TOKENS - 1  # TRL appends the EOS token
        examples = [{"prompt": " a" * PROMPT_TOKENS, "chosen": " the" * completion,
                     "rejected": " a" * completion}] * rows
    # through a JSON Lines file, as `memtune run` loads data: Dataset.from_dict's fingerprint fails to pickle some
    # pyarrow builds (MonthDayNano)
    path = Path(tempfile.mkdtemp()) / "data.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return load_dataset("json", data_files=str(path), split="train")


def run_one(name: str, dry_run: bool = False) -> dict[str, Any]:
    """TRAIN_STEPS optimizer steps of case `name` through TRL's guarded trainer; the measured peaks (bytes).
    `dry_run`: the same flow with a tiny Llama at 64 tokens on the CPU, nothing measured (checks it anywhere)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memtune.plan import Plan
    from memtune.run.data import sample_tokenizer
    from memtune.run.trl_run import guarded_trainer_class
    from memtune.sources import catalog_config

    model_name, train_config = CASES[name]
    device = "cpu" if dry_run else "cuda"
    if dry_run:
        from benchmarks.cases import tiny_llama

        config = tiny_llama(2)
        config.vocab_size = 2048  # the sample tokenizer's ids
        train_config = train_config.replace(seq_len=64)
    else:
        config = catalog_config(model_name)
    plan = Plan(model_name, train_config, budget_bytes=1 << 40)
    before = {"reserved": 0, "allocated": 0}
    if not dry_run:
        from memtune.measure.memory import warm_up

        warm_up()
        torch.cuda.reset_peak_memory_stats()
        before = {"reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated()}
    started = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if train_config.weights_dtype == "bf16" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kwargs: dict[str, Any] = {}
    overrides = {"output_dir": "/tmp/memtune-trl-steps", "max_steps": TRAIN_STEPS, "save_strategy": "no",
                 "logging_strategy": "no", "disable_tqdm": True, "report_to": "none", "dataloader_num_workers": 0}
    if train_config.trainer == "dpo":
        args = plan.dpo_config(**overrides)
        if train_config.adapter is not None:  # as run.trl_run: DPOTrainer wraps it, its reference is the base
            import dataclasses

            model = dataclasses.replace(plan, train_config=train_config.replace(adapter=None)).prepare(model)
            kwargs["peft_config"] = plan.lora_config()
        else:
            import copy

            reference = None if train_config.precompute_ref_log_probs else copy.deepcopy(model).requires_grad_(False)
            model = plan.prepare(model)
            kwargs["ref_model"] = reference
    else:
        args = plan.sft_config(**overrides)
        model = plan.prepare(model)
    rows = TRAIN_STEPS * train_config.effective_batch_size
    trainer = guarded_trainer_class(train_config.trainer)(
        model=model, args=args, train_dataset=datasets_for(train_config, config.vocab_size, rows),
        processing_class=sample_tokenizer(), oom_guard=plan.oom_guard(), **kwargs)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    if dry_run:
        return {"steps": int(trainer.state.global_step), "batch_shape": list(batch["input_ids"].shape)}
    return {"peak_reserved_bytes": torch.cuda.max_memory_reserved() - before["reserved"],
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() - before["allocated"],
            "batch_shape": list(batch["input_ids"].shape),
            "steps": int(trainer.state.global_step), "guard_events": [e.to_dict() for e in trainer.oom_guard.events],
            "seconds": time.perf_counter() - started}


def predict(name: str, device: str) -> dict[str, Any]:
    """memtune's prediction of case `name` on one trace path (bytes), or the error."""
    from memtune.predict.estimate import estimate
    from memtune.sources import catalog_config

    model_name, train_config = CASES[name]
    started = time.perf_counter()
    try:
        found = estimate(catalog_config(model_name), train_config, device=device)
    except Exception as error:  # noqa: BLE001 - a failed trace keeps its row
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"peak_reserved_bytes": found.peak_reserved_bytes, "peak_allocated_bytes": found.peak_allocated_bytes,
            "breakdown": found.breakdown, "seconds": time.perf_counter() - started}


def measure_in_subprocess(name: str) -> dict[str, Any]:
    """`run_one(name)` in a fresh process (its own CUDA context and allocator); {"error": ...} on failure."""
    command = [sys.executable, __file__, "--one", name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def print_table(rows: list[dict[str, Any]], devices: list[str]) -> None:
    """One line per case: measured peak reserved, each path's prediction and its error (GiB)."""
    header = f"{'case':36s} {'measured':>9s}" + "".join(f" | {device:>8s} {'error':>7s}" for device in devices)
    print(header)
    for row in rows:
        measured = row.get("measured", {})
        line = f"{row['case']:36s} " + (f"{measured['peak_reserved_bytes'] / GIB:9.2f}" if "peak_reserved_bytes"
                                        in measured else f"{'-':>9s}")
        for device in devices:
            predicted = row.get(device, {})
            if "error" in predicted:
                line += f" | failed: {predicted['error'][:30]}"
                continue
            error = predicted.get("error_fraction")
            line += f" | {predicted['peak_reserved_bytes'] / GIB:8.2f} " + (
                f"{100 * error:+6.1f}%" if error is not None else f"{'':>7s}")
        print(line)
    errors = [abs(row[device]["error_fraction"]) for row in rows for device in devices
              if "error_fraction" in row.get(device, {})]
    if errors:
        print(f"max |error| {100 * max(errors):.1f}% over {len(errors)} predictions (target <= 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--predict-only", action="store_true", help="no GPU, no TRL: predictions only")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="cases measured at once (separate processes)")
    parser.add_argument("--dry-run", action="store_true", help="every case's TRL flow on a tiny Llama on the CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(run_one(options.one)))
        return
    if options.dry_run:
        for name in options.cases:
            print(name, run_one(name, dry_run=True), flush=True)
        return
    import torch

    unknown = sorted(set(options.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; the cases are {list(CASES)}")
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    rows = [{"case": name, "model": CASES[name][0], "train_config": CASES[name][1].to_dict()} for name in options.cases]
    if not options.predict_only:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
            for row, measured in zip(rows, pool.map(measure_in_subprocess, options.cases), strict=True):
                row["measured"] = measured
    for row in rows:
        for device in devices:
            row[device] = predicted = predict(row["case"], device)
            measured = row.get("measured", {}).get("peak_reserved_bytes")
            if measured and "peak_reserved_bytes" in predicted:
                predicted["error_fraction"] = predicted["peak_reserved_bytes"] / measured - 1
    print_table(rows, devices)
    if options.out:
        Path(options.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
