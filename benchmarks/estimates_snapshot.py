"""Print the CPU-path estimates of a fixed set of configurations, to diff before and after a refactor.

    PYTHONPATH=. python benchmarks/estimates_snapshot.py > /tmp/before.txt
    ... change the code ...
    PYTHONPATH=. python benchmarks/estimates_snapshot.py > /tmp/after.txt && diff /tmp/before.txt /tmp/after.txt

Each line is one configuration as the search sees it (`fit.ModelPredictor`: single GPU, DDP replica or
FSDP shard/offload): peak allocated, peak reserved, workspaces, context and the breakdown at the peak
(bytes), then the `fits` verdict at four usable sizes (the total, 90% of it, the peak allocated + fixed + 256 MiB,
the peak allocated),
which exercises the replay with cache release. Models: gpt2 and Llama-3.2-1B / Qwen2.5-0.5B from the
catalog, and the tiny Llama of the tests. Takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import tiny_llama  # noqa: E402
from memtune.config import Adapter, TrainConfig  # noqa: E402
from memtune.fit import ModelPredictor  # noqa: E402
from memtune.predict import throughput  # noqa: E402
from memtune.sources import catalog_config, parameter_count  # noqa: E402

BF16 = {"weights_dtype": "fp32", "amp": "bf16"}
GPT2, QWEN, LLAMA = "gpt2", "qwen2.5-0.5b", "meta-llama/Llama-3.2-1B"
CASES: list[tuple[str, Any, TrainConfig]] = [
    ("gpt2", lambda: catalog_config(GPT2), TrainConfig(seq_len=512, micro_batch_size=4)),
    ("gpt2", lambda: catalog_config(GPT2),
     TrainConfig(seq_len=512, micro_batch_size=4, gradient_checkpointing=True, **BF16)),
    ("gpt2", lambda: catalog_config(GPT2), TrainConfig(seq_len=512, micro_batch_size=2, num_gpus=2, **BF16)),
    ("tiny-llama-2", lambda: tiny_llama(2), TrainConfig(seq_len=64, micro_batch_size=2)),
    ("tiny-llama-2", lambda: tiny_llama(2), TrainConfig(seq_len=64, micro_batch_size=2, num_gpus=4)),
    ("tiny-llama-8", lambda: tiny_llama(8), TrainConfig(seq_len=64, micro_batch_size=2, **BF16)),
    ("tiny-llama-8", lambda: tiny_llama(8), TrainConfig(seq_len=64, micro_batch_size=2, num_gpus=4, **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN), TrainConfig(seq_len=1024, micro_batch_size=2, **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=1024, micro_batch_size=4, weights_dtype="bf16", gradient_checkpointing=True,
                 adapter=Adapter())),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=1024, micro_batch_size=2, loss="chunked", **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=512, micro_batch_size=2, grad_accum_steps=4, **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=1024, micro_batch_size=2, num_gpus=2, strategy="ddp", **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=1024, micro_batch_size=2, num_gpus=2, grad_accum_steps=2, **BF16)),
    ("qwen2.5-0.5b", lambda: catalog_config(QWEN),
     TrainConfig(seq_len=1024, micro_batch_size=2, offload="parameters", **BF16)),
    ("llama-3.2-1b", lambda: catalog_config(LLAMA), TrainConfig(seq_len=512, micro_batch_size=1)),
    ("llama-3.2-1b", lambda: catalog_config(LLAMA),
     TrainConfig(seq_len=1024, micro_batch_size=2, gradient_checkpointing=True, adapter=Adapter(), **BF16)),
    ("llama-3.2-1b", lambda: catalog_config(LLAMA),
     TrainConfig(seq_len=1024, micro_batch_size=2, num_gpus=2, strategy="ddp", adapter=Adapter(), **BF16)),
    ("llama-3.2-1b", lambda: catalog_config(LLAMA),
     TrainConfig(seq_len=1024, micro_batch_size=2, num_gpus=2, gradient_checkpointing=True, **BF16)),
]


def main() -> None:
    speed = throughput.gpu_speed("H100")
    for name, make_config, config in CASES:
        model_config = make_config()
        predictor = ModelPredictor(model_config, parameter_count(model_config), speed, device="cpu")
        estimate = predictor.memory(config)
        breakdown = " ".join(f"{key}={value}" for key, value in sorted(estimate.breakdown.items()))
        fixed = estimate.workspace_bytes + estimate.context_bytes
        usable = (estimate.total_bytes, estimate.total_bytes * 9 // 10,
                  estimate.peak_allocated_bytes + fixed + (1 << 28), estimate.peak_allocated_bytes)
        fits = "".join("y" if predictor.fits(estimate, size) else "n" for size in usable)
        print(f"{name} [{config.describe()}] allocated={estimate.peak_allocated_bytes} "
              f"reserved={estimate.peak_reserved_bytes} workspace={estimate.workspace_bytes} "
              f"context={estimate.context_bytes} layers={estimate.traced_layers}/{estimate.num_layers} "
              f"fits={fits} {breakdown}", flush=True)


if __name__ == "__main__":
    main()
