"""One meaning of "fits": `memtune plan` and `memtune fit` give the same verdict on the same configuration."""

from __future__ import annotations

import json

import pytest

from memtune.cli import main
from memtune.config import MIB, TrainConfig
from memtune.predict.estimate import Estimate
from memtune.search.verdict import judge

PINNED = ["--seq-len", "256", "--batch-size", "4", "--micro-batch-size", "2", "--precision", "bf16-mixed"]


class Replay:
    """A replay that fits when the live peak (allocated + workspaces + context) is under the capacity."""

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
        return estimate.peak_allocated_bytes + estimate.workspace_bytes + estimate.context_bytes <= usable_bytes


def estimate(allocated: int, reserved: int) -> Estimate:
    return Estimate(TrainConfig(seq_len=8), allocated, reserved, workspace_bytes=0, context_bytes=0)


def test_the_verdict_replays_against_the_budget_less_the_margin():
    step = estimate(allocated=900 * MIB, reserved=1000 * MIB)
    fits = judge(Replay(), step, budget_bytes=1200 * MIB, margin_bytes=256 * MIB)
    assert fits.fits and fits.usable_bytes == 944 * MIB and fits.spare_bytes == -56 * MIB and fits.shortfall_bytes == 0
    short = judge(Replay(), step, budget_bytes=1100 * MIB, margin_bytes=256 * MIB)
    assert not short.fits and short.shortfall_bytes == 156 * MIB
    assert not judge(Replay(), step, budget_bytes=256 * MIB, margin_bytes=256 * MIB).fits  # nothing usable


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_plan_and_fit_agree_on_the_same_configuration(capsys, tmp_path):
    _, unbounded = run_json(capsys, ["plan", "gpt2", *PINNED, "--checkpointing", "--trace-device", "cpu", "--json"])
    total = unbounded["estimate"]["total_bytes"]
    for budget in (total + 2048 * MIB, total + 300 * MIB, total + 200 * MIB, total, total // 2):
        plan_code, plan = run_json(capsys, ["plan", "gpt2", *PINNED, "--checkpointing", "--trace-device", "cpu",
                                            "--budget", f"{budget}B", "--json"])
        fit_code, fit = run_json(capsys, ["fit", "gpt2", *PINNED, "--checkpointing", "on", "--loss", "standard",
                                          "--optim", "adamw_torch_fused", "--expandable-segments", "off",
                                          "--offload", "none", "--offload-activations", "off", "--no-lora",
                                          "--trace-device", "cpu", "--budget", f"{budget}B", "--no-verify",
                                          "--plan-out", str(tmp_path / "plan.json"), "--json"])
        assert plan["fits"] == fit["fits"], f"budget {budget}: plan says {plan['fits']}, fit says {fit['fits']}"
        assert (plan_code == 0) == (fit_code == 0)
        assert plan["usable_bytes"] == fit["search"]["usable_bytes"]
        considered = [c for c in fit["search"]["candidates"] if c["predicted_total_bytes"] is not None]
        if not considered:  # ruled out untraced: its weights, gradients and optimizer state alone are over
            assert [c["status"] for c in fit["search"]["candidates"]] == ["too big (state alone)"]
            assert not fit["fits"] and budget == total // 2
            continue
        assert [c["predicted_total_bytes"] for c in considered] == [total]
