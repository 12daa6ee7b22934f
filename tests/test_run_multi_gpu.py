"""`memtune run` of a 2-GPU plan (FSDP and DDP) end to end: relaunched under accelerate, trained, saved, and every
rank exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memtune.config import TrainConfig
from memtune.plan import Plan

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_gpu_plan_trains_saves_and_exits(tmp_path: Path, strategy: str) -> None:
    plan = Plan(model="qwen2.5-0.5b", budget_bytes=40 << 30,
                train_config=TrainConfig(seq_len=512, micro_batch_size=2, grad_accum_steps=2, amp="bf16", num_gpus=2,
                                         strategy=strategy))
    plan.save(tmp_path / "plan.json")
    output = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}
    for name in ("ACCELERATE_USE_FSDP", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(name, None)
    # Before the fix the launcher never returned: rank 0 waited in the FSDP state-dict gather alone.
    completed = subprocess.run([sys.executable, "-m", "memtune", "run", str(tmp_path / "plan.json"), "--output-dir",
                                str(output), "--max-steps", "6", "--json"],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 6
    assert summary["tokens_per_step"] == 2 * 2 * 2 * 512
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]
    assert any(output.glob("*.safetensors")), sorted(p.name for p in output.iterdir())
    assert (output / ("accelerate_ddp.yaml" if strategy == "ddp" else "accelerate_fsdp.yaml")).is_file()
    engine = "DDP" if strategy == "ddp" else "FSDP"
    assert f"the plan needs {engine}" in completed.stderr
