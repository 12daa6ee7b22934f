"""DeepSpeed ZeRO's own memory on one GPU, on a synthetic model: the probe behind issue 15's memo
(docs/deepspeed-zero.md §6) and the figures tests/test_zero.py reproduces (results/deepspeed_probe_h200.txt).

    PYTHONPATH=/tmp/dssite:. python3 benchmarks/deepspeed_probe.py      # a GPU with DeepSpeed (wheels: .whl/)

The model is 8 x Linear(4096, 4096, bias=False) (134,217,728 parameters), bf16, DeepSpeed's AdamW (FusedAdam, or
DeepSpeedCPUAdam under offload), micro-batch 8 x 4096 inputs, 3 steps through `deepspeed.initialize`'s engine. Each
configuration of CONFIGS runs in a process of its own and prints one `RESULT {json}` line: allocated after
initialisation and after the steps, the peak of each step, peak reserved, host RSS, and per phase (forward,
backward, step) the allocated memory at its end and its peak, for the first step (`phases0`) and the last
(`phases`), all in MiB. DeepSpeed 0.19.8 was read and measured (1 x H200, torch 2.11). The committed log was
recorded by this script's first version (a helper's scratch copy: the same configurations and measurement, written
tersely); this one has not been run on the GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 2**20
LAYERS, HIDDEN, BATCH = 8, 4096, 8
BUCKET = 50_000_000  # a reduce bucket of 5e7 elements, beside DeepSpeed's default 5e8
CPU = {"device": "cpu", "pin_memory": True}
CONFIGS = {  # name -> zero_optimization
    "z1": {"stage": 1},
    "z1_rb5e7": {"stage": 1, "reduce_bucket_size": BUCKET},
    "z2_rb5e7": {"stage": 2, "reduce_bucket_size": BUCKET},
    "z2_overlap_rb5e7": {"stage": 2, "reduce_bucket_size": BUCKET, "overlap_comm": True},
    "z2_cpuopt_rb5e7": {"stage": 2, "reduce_bucket_size": BUCKET, "offload_optimizer": {"device": "cpu"}},
    "z3_rb5e7_pf5e6": {"stage": 3, "reduce_bucket_size": BUCKET, "stage3_prefetch_bucket_size": 5_000_000},
    "z3_cpuopt_rb5e7": {"stage": 3, "reduce_bucket_size": BUCKET, "offload_optimizer": {"device": "cpu"}},
    "z2": {"stage": 2},
    "z2_cpuopt": {"stage": 2, "offload_optimizer": CPU},
    "z3": {"stage": 3},
    "z3_cpuopt": {"stage": 3, "offload_optimizer": CPU},
    "z3_cpu_both": {"stage": 3, "offload_optimizer": CPU, "offload_param": CPU},
    "z3_reuse0_rb5e7": {"stage": 3, "reduce_bucket_size": BUCKET, "stage3_max_reuse_distance": 0},
    "z3_cpu_both_rb5e7": {"stage": 3, "reduce_bucket_size": BUCKET, "offload_optimizer": {"device": "cpu"},
                          "offload_param": {"device": "cpu"}},
}


def probe(name: str) -> dict:
    """Run CONFIGS[name] for 3 steps on GPU 0 and return its figures (module docstring)."""
    import deepspeed
    import psutil
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + hash(name) % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(LAYERS)])
    parameters = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": CONFIGS[name],
              "steps_per_print": 10**9}
    started = time.time()
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    init_seconds = time.time() - started
    torch.cuda.synchronize()
    after_init = torch.cuda.memory_allocated()
    inputs = torch.randn(BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def end_and_peak() -> tuple[float, float]:
        """(allocated now, peak since the last call), MiB; the peak is reset."""
        torch.cuda.synchronize()
        now = (round(torch.cuda.memory_allocated() / MIB, 1), round(torch.cuda.max_memory_allocated() / MIB, 1))
        torch.cuda.reset_peak_memory_stats()
        return now

    phases, peaks = [], []
    for _ in range(3):
        torch.cuda.reset_peak_memory_stats()
        start = round(torch.cuda.memory_allocated() / MIB, 1)
        loss = engine(inputs).float().pow(2).mean()
        forward = end_and_peak()
        engine.backward(loss)
        backward = end_and_peak()
        engine.step()
        step = end_and_peak()
        phases.append({"start": start, "fwd_end_peak": forward, "bwd_end_peak": backward, "step_end_peak": step})
        peaks.append(max(forward[1], backward[1], step[1]))
    return {"name": name, "P": parameters, "init_s": round(init_seconds, 1), "alloc_after_init_MiB": after_init / MIB,
            "alloc_after_steps_MiB": torch.cuda.memory_allocated() / MIB, "peak_MiB": peaks,
            "reserved_MiB": torch.cuda.max_memory_reserved() / MIB,
            "rss_GiB": psutil.Process().memory_info().rss / 2**30, "P_bf16_MiB": parameters * 2 / MIB,
            "phases": phases[-1], "phases0": phases[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), help="run only this configuration, in this process")
    args = parser.parse_args()
    if args.config:
        print("RESULT", json.dumps(probe(args.config)), flush=True)
        return
    for name in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--config", name], capture_output=True, text=True,
                              timeout=240)
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        print(results[-1] if results else f"FAIL {name} rc={done.returncode}\n{(done.stdout + done.stderr)[-1500:]}",
              flush=True)


if __name__ == "__main__":
    main()
