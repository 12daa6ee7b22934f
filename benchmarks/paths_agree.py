"""Do the two trace paths agree? Every architecture of the CPU test matrix, predicted on fake CUDA tensors and
on the GPU-free CPU emulation, side by side (needs a GPU for the first; no GPU memory is used).

    PYTHONPATH=. python benchmarks/paths_agree.py --out $OUT/paths_agree.json

The configs are benchmarks/cases.py's ARCHITECTURES scaled up to hidden 512 (8 heads of 64, 4 KV heads),
MLP 1024, 4 decoder layers and a 32,000-token vocabulary, 2 x 512 tokens, in the four configurations of
tests/test_architectures.py. Prints one row per case: both paths' peak allocated and reserved, their
ratio, and which path really ran (a failed trace falls back to the other path with a note).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import TINY_ARCHITECTURES as ARCHITECTURES  # noqa: E402
from memtune.config import Adapter, TrainConfig  # noqa: E402
from memtune.predict.estimate import estimate  # noqa: E402

SCALE = {"hidden_size": 512, "n_embd": 512, "intermediate_size": 1024, "ffn_dim": 1024, "num_attention_heads": 8,
         "n_head": 8, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 4, "n_layer": 4,
         "vocab_size": 32000, "max_position_embeddings": 1024, "n_positions": 1024, "word_embed_proj_dim": 512,
         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "rotary_dim": 32}
CONFIGURATIONS = {
    "fp32": TrainConfig(seq_len=512, micro_batch_size=2),
    "bf16-mixed": TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16"),
    "bf16+lora": TrainConfig(seq_len=512, micro_batch_size=2, weights_dtype="bf16", adapter=Adapter(rank=16)),
    "checkpointing": TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", gradient_checkpointing=True),
}


def config_of(model_type: str):
    from transformers import AutoConfig

    settings = {key: SCALE.get(key, value) for key, value in ARCHITECTURES[model_type].items()}
    if model_type == "falcon":
        settings["hidden_size"] = 512
    return AutoConfig.for_model(model_type, **settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--architectures", nargs="*", default=list(ARCHITECTURES))
    args = parser.parse_args()
    import torch
    import transformers

    rows = []
    for model_type in args.architectures:
        for name, train_config in CONFIGURATIONS.items():
            row: dict = {"model_type": model_type, "configuration": name}
            for path in ("cuda", "cpu"):
                started = time.perf_counter()
                try:
                    result = estimate(config_of(model_type), train_config, device=path)
                except Exception as error:  # noqa: BLE001 - recorded per case, the benchmark goes on
                    row[f"{path}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    continue
                row[f"{path}_allocated_bytes"] = result.peak_allocated_bytes
                row[f"{path}_reserved_bytes"] = result.peak_reserved_bytes
                row[f"{path}_ran_on"] = result.trace_device
                row[f"{path}_note"] = result.trace_note
                row[f"{path}_seconds"] = time.perf_counter() - started
            if "cuda_reserved_bytes" in row and "cpu_reserved_bytes" in row:
                row["reserved_ratio"] = row["cuda_reserved_bytes"] / row["cpu_reserved_bytes"]
                row["allocated_ratio"] = row["cuda_allocated_bytes"] / row["cpu_allocated_bytes"]
            rows.append(row)
            print(f"{model_type:12s} {name:14s} "
                  + (f"cuda/cpu reserved {row['reserved_ratio']:.4f} allocated {row['allocated_ratio']:.4f}"
                     f"  ran on {row['cuda_ran_on']}/{row['cpu_ran_on']}" if "reserved_ratio" in row
                     else f"errors: {row.get('cuda_error', '')} | {row.get('cpu_error', '')}"), flush=True)
    compared = [row for row in rows if "reserved_ratio" in row]
    gaps = [abs(row["reserved_ratio"] - 1) for row in compared]
    allocated_gaps = [abs(row["allocated_ratio"] - 1) for row in compared]
    summary = {
        "cases": len(rows), "compared": len(compared),
        "reserved_within_1pct": sum(gap <= 0.01 for gap in gaps),
        "allocated_within_1pct": sum(gap <= 0.01 for gap in allocated_gaps),
        "identical": sum(row["cuda_reserved_bytes"] == row["cpu_reserved_bytes"]
                         and row["cuda_allocated_bytes"] == row["cpu_allocated_bytes"] for row in compared),
        "median_reserved_gap": statistics.median(gaps) if gaps else None,
        "max_reserved_gap": max(gaps) if gaps else None,
        "max_allocated_gap": max(allocated_gaps) if allocated_gaps else None,
    }
    environment = {"torch": torch.__version__, "transformers": transformers.__version__,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    Path(args.out).write_text(json.dumps({"environment": environment, "summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
