"""memtune's prediction against the same step run the way users run it: transformers.Trainer, loaded with
`from_pretrained`, set up through memtune's own Plan API (issue 13's quoted configurations).

For each case a random-weight checkpoint of the model's published shape is saved to a temporary directory
(nothing is downloaded), then, in a fresh process:

    plan = Plan(model, train_config, budget_bytes=...)
    model = AutoModelForCausalLM.from_pretrained(directory, **plan.model_kwargs())   # BitsAndBytesConfig for QLoRA
    model = plan.prepare(model)            # prepare_model_for_kbit_training, checkpointing, LoRA (peft)
    Trainer(model, plan.training_arguments(max_steps=3, ...), train_dataset=...).train()

and the peak reserved (`torch.cuda.max_memory_reserved`, a delta over the state after cuBLAS's workspaces were
made and before the model was loaded) is compared with `estimate(config, train_config)`'s
`peak_reserved_bytes` on both trace paths. Issue 13 quotes, for Llama-3.2-1B at 4 x 1024 with checkpointing:
24.4 GiB (fused AdamW, fp32 weights + bf16 autocast), 18.6 GiB (bitsandbytes AdamW8bit) and 28.0 GiB (4-bit
base, LoRA r16 all-linear, fused AdamW or PagedAdamW8bit).

On the GPU machine, with bitsandbytes installed:
    PYTHONPATH=. python3 benchmarks/trainer_check.py --out $OUT/trainer_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import Adapter, Quantization, TrainConfig  # noqa: E402

GIB = 1 << 30
MODEL = "meta-llama/Llama-3.2-1B"
BASE = {"seq_len": 1024, "micro_batch_size": 4, "gradient_checkpointing": True}
CASES: dict[str, tuple[TrainConfig, float]] = {
    "full bf16-mixed adamw_torch_fused": (TrainConfig(**BASE, weights_dtype="fp32", amp="bf16"), 24.4),
    "full bf16-mixed adamw_bnb_8bit": (TrainConfig(**BASE, weights_dtype="fp32", amp="bf16",
                                                   optimizer="adamw_bnb_8bit"), 18.6),
    "qlora 4-bit adamw_torch_fused": (TrainConfig(**BASE, weights_dtype="bf16", amp="bf16", adapter=Adapter(),
                                                  quantization=Quantization(bits=4)), 28.0),
    "qlora 4-bit paged_adamw_8bit": (TrainConfig(**BASE, weights_dtype="bf16", amp="bf16", adapter=Adapter(),
                                                 quantization=Quantization(bits=4), optimizer="paged_adamw_8bit"),
                                     28.0),
}
"""name: (configuration, the peak reserved GiB issue 13 quotes for it)."""


def save_checkpoint(directory: Path) -> None:
    """A random-weight bf16 checkpoint of MODEL's published shape (catalog config) in `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    from memtune.sources import catalog_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(catalog_config(MODEL), dtype=torch.bfloat16)
    model.save_pretrained(directory)


def run_one(name: str, directory: str) -> dict:
    """Train 3 steps of case `name` through Trainer from the checkpoint in `directory`; peak reserved bytes."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from memtune.measure.memory import warm_up
    from memtune.plan import Plan

    train_config, _ = CASES[name]
    plan = Plan(MODEL, train_config, budget_bytes=torch.cuda.get_device_properties(0).total_memory)
    warm_up()
    torch.cuda.reset_peak_memory_stats()
    reserved_before = torch.cuda.memory_reserved()
    allocated_before = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(directory, device_map="cuda", **plan.model_kwargs())
    model = plan.prepare(model)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else 32000
    samples = [torch.randint(0, vocab, (train_config.seq_len,), generator=generator) for _ in range(16)]
    dataset = [{"input_ids": ids, "labels": ids} for ids in samples]
    with tempfile.TemporaryDirectory() as output:
        args = plan.training_arguments(output_dir=output, max_steps=3, save_strategy="no", logging_strategy="no",
                                       dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=dataset).train()
    return {"peak_reserved_bytes": torch.cuda.max_memory_reserved() - reserved_before,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() - allocated_before}


def predict(train_config: TrainConfig, device: str) -> dict:
    """Predicted peak reserved / allocated bytes on one trace path, or the error."""
    from memtune.predict.estimate import estimate
    from memtune.sources import catalog_config

    try:
        result = estimate(catalog_config(MODEL), train_config, device=device)
    except Exception as error:  # noqa: BLE001 - a failed trace keeps its row
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"peak_reserved_bytes": result.peak_reserved_bytes, "peak_allocated_bytes": result.peak_allocated_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/trainer_check.json")
    parser.add_argument("--match", default="", help="only cases whose name has this text")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        Path(args.row_out).write_text(json.dumps(run_one(args.one, args.checkpoint)))
        return

    from benchmarks.ground_truth import environment

    rows = []
    with tempfile.TemporaryDirectory() as checkpoint:
        save_checkpoint(Path(checkpoint))
        for name, (train_config, quoted) in CASES.items():
            if args.match not in name:
                continue
            row: dict = {"case": name, "config": train_config.to_dict(), "issue_quoted_gib": quoted}
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                done = subprocess.run([sys.executable, __file__, "--one", name, "--checkpoint", checkpoint,
                                       "--row-out", out.name], capture_output=True, text=True, timeout=900)
                if done.returncode == 0:
                    row["measured"] = json.loads(Path(out.name).read_text())
                else:
                    row["measured_error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            for device in ("cuda", "cpu"):
                row[device] = predict(train_config, device)
                measured = row.get("measured", {}).get("peak_reserved_bytes")
                predicted = row[device].get("peak_reserved_bytes")
                if measured and predicted:
                    row[device]["reserved_error"] = predicted / measured - 1
            rows.append(row)
            line = f"{name:38s} quoted {quoted:5.1f} GiB"
            if "measured" in row:
                line += f" | measured {row['measured']['peak_reserved_bytes'] / GIB:6.2f} GiB"
            else:
                line += f" | measure failed: {row['measured_error'][:80]}"
            for device in ("cuda", "cpu"):
                if "peak_reserved_bytes" in row[device]:
                    line += f" | {device} {row[device]['peak_reserved_bytes'] / GIB:6.2f}"
                    if "reserved_error" in row[device]:
                        line += f" ({100 * row[device]['reserved_error']:+.1f}%)"
                else:
                    line += f" | {device} failed: {row[device]['error'][:60]}"
            print(line, flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"environment": environment(), "model": MODEL, "rows": rows}, indent=1))
    print(f"wrote {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
