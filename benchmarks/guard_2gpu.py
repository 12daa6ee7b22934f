"""The OOM guard on 2 GPUs: both ranks run out of memory in the same step and step down together.

One command on a host with 2 GPUs (about 4 minutes; writes JSON, prints a table):
    python benchmarks/guard_2gpu.py --out $OUT/guard.json

Two launches of `memtune.run.runner.run_plan` (its PlanTrainer is a GuardedTrainer: the guard is attached
through the Trainer subclass) under `accelerate launch` with the FSDP2 config that
`memtune.run.launch.write_accelerate_config` writes (what `memtune run` relaunches itself with), on a
catalog model with random weights (default Qwen/Qwen2.5-0.5B, no download):
1. "guarded": the plan's micro-batch 8 x 1 with the fallback 2 x 4. Each rank first measures both
   configurations without a cap (`memtune.measure.sharded.measure_sharded`, collective), and the cap is the
   middle of the two peaks. After `--oom-after-steps` optimizer steps each rank calls
   `torch.cuda.set_per_process_memory_fraction(cap / total memory)`: the next step runs out of memory on
   both ranks, the guard agrees, resets FSDP2, steps down and redoes the step.
2. "direct": the same seed and data, starting at the configuration the guard ended with, under the same
   cap from the same step: its loss curve should match the guarded one (bf16 compute: up to rounding).

Each launch has a timeout (`--launch-timeout-seconds`); a launch that exceeds it is killed with its
process group and recorded as timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "Qwen/Qwen2.5-0.5B"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="JSON results file (required unless --worker)")
    parser.add_argument("--model", default=MODEL, help=f"a memtune catalog model (random weights); default {MODEL}")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=1024,
        help="tokens per sequence; 1024 packs the sample corpus into 79 sequences, 5 steps of 16 per epoch",
    )
    parser.add_argument(
        "--micro-batch", type=int, default=8, help="the plan's micro-batch (runs out of memory under the cap)"
    )
    parser.add_argument("--fallback-micro-batch", type=int, default=2,
                        help="the fallback's micro-batch (fits under the cap); accumulation keeps micro x accumulation")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument(
        "--oom-after-steps",
        type=int,
        default=2,
        help="optimizer steps completed before the memory cap is set (the next step runs out of memory)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--launch-timeout-seconds", type=int, default=270,
                        help="each accelerate launch is killed after this long (two launches)")
    parser.add_argument(
        "--work-dir", type=Path, help="folder for configs, runs and per-rank records (default: a temporary one)"
    )
    parser.add_argument("--worker", choices=["guarded", "direct"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and args.out is None:
        parser.error("--out is required")
    if args.micro_batch % args.fallback_micro_batch:
        parser.error(f"--fallback-micro-batch {args.fallback_micro_batch} must divide --micro-batch {args.micro_batch}")
    return args


def configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the plan's configuration, the fallback): the same effective batch, bf16 mixed precision, 2 GPUs."""
    from memtune.config import TrainConfig

    plan = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, grad_accum_steps=1,
                       weights_dtype="fp32", amp="bf16", num_gpus=2)
    fallback = plan.replace(micro_batch_size=args.fallback_micro_batch,
                            grad_accum_steps=args.micro_batch // args.fallback_micro_batch)
    return plan, fallback


# ---- the parent: two launches, then the comparison ---------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    from memtune.plan import Plan
    from memtune.run import launch as launch_config
    from memtune.sources import resolve

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="memtune-guard-2gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    plan_config, fallback = configs(args)
    model_config = resolve(args.model).config
    accelerate_yaml = launch_config.write_accelerate_config(
        work / "accelerate_fsdp.yaml", plan_config, model_config=model_config
    )
    result: dict[str, Any] = {"model": args.model, "settings": {key: str(value) if isinstance(value, Path) else value
                                                                for key, value in vars(args).items()},
                              "accelerate_config": accelerate_yaml.read_text(), "work_dir": str(work), "runs": {}}

    guarded_plan = Plan(args.model, plan_config, 0, fallbacks=[fallback])
    result["runs"]["guarded"] = launch("guarded", guarded_plan, None, args, work, accelerate_yaml)
    save(result, args.out)
    calibration = result["runs"]["guarded"].get("calibration") or {}
    fraction = calibration.get("memory_fraction")
    final = _final_config(result["runs"]["guarded"])
    if fraction is None or final is None:
        result["note"] = "the guarded run gave no memory cap or final configuration: the direct run was not started"
    else:
        from memtune.config import TrainConfig

        direct_plan = Plan(args.model, TrainConfig.from_dict(final), 0)
        result["runs"]["direct"] = launch("direct", direct_plan, fraction, args, work, accelerate_yaml)
    result["checks"] = checks(result, args)
    save(result, args.out)
    render(result)
    return 0 if result["checks"].get("passed") else 1


def launch(
    name: str, plan: Any, fraction: float | None, args: argparse.Namespace, work: Path, accelerate_yaml: Path
) -> dict[str, Any]:
    """One `accelerate launch` of this script's worker; returns what its ranks recorded."""
    from memtune.run import launch as launch_config

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"plan": plan.to_dict(), "memory_fraction": fraction, "fallback": configs(args)[1].to_dict()}
    (folder / "payload.json").write_text(json.dumps(payload, indent=2))
    command = launch_config.launch_command(accelerate_yaml, [
        "--worker", name, "--work-dir", str(folder), "--model", args.model, "--seq-len", str(args.seq_len),
        "--micro-batch", str(args.micro_batch), "--fallback-micro-batch", str(args.fallback_micro_batch),
        "--steps", str(args.steps), "--oom-after-steps", str(args.oom_after_steps), "--seed", str(args.seed),
    ], module="benchmarks.guard_2gpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    log = (folder / "launch.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        returncode = process.wait(timeout=args.launch_timeout_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)  # the launcher and its worker ranks: one session
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        returncode = process.returncode
    log.close()
    record: dict[str, Any] = {"returncode": returncode, "timed_out": timed_out,
                              "launch_seconds": round(time.perf_counter() - start, 1),
                              "log_tail": (folder / "launch.log").read_text(errors="replace")[-4000:], "ranks": {}}
    for rank_file in sorted(folder.glob("rank*.json")):
        record["ranks"][rank_file.stem] = json.loads(rank_file.read_text())
    if (folder / "calibration.json").is_file():
        record["calibration"] = json.loads((folder / "calibration.json").read_text())
    summary_file = folder / "run" / "run_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        record["summary"] = {
            key: summary.get(key)
            for key in (
                "status",
                "global_step",
                "max_steps",
                "loss_curve",
                "memory_bands",
                "peak_allocated_bytes",
                "peak_reserved_bytes",
                "train_seconds",
                "wall_seconds",
                "final_train_config",
                "guard_events",
                "notes",
                "error",
            )
        }
    print(f"[{name}] exit {returncode}{' (timed out)' if timed_out else ''} after {record['launch_seconds']} s",
          file=sys.stderr, flush=True)
    return record


def _final_config(run: dict[str, Any]) -> dict[str, Any] | None:
    summary = run.get("summary") or {}
    return summary.get("final_train_config")


def checks(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What the run should show; `passed` when all hold."""
    guarded = result["runs"].get("guarded", {})
    direct = result["runs"].get("direct", {})
    summary = guarded.get("summary") or {}
    events = [event for event in summary.get("guard_events") or [] if event.get("kind") == "oom"]
    # The OOM messages name each rank's own GPU, so the ranks agree on what they did, not on the text.
    rank_events = [
        [
            (event["step"], event["from_config"], event["to_config"], event["redone_micro_batches"], event["ranks"])
            for event in rank.get("guard_events") or []
        ]
        for rank in guarded.get("ranks", {}).values()
    ]
    found: dict[str, Any] = {
        "guarded_completed": summary.get("status") == "completed" and summary.get("global_step") == args.steps,
        "stepped_down": bool(events) and all(event.get("to_config") for event in events),
        "on_both_ranks": bool(events) and all(sorted(event.get("ranks") or []) == [0, 1] for event in events),
        "ranks_agree": len(rank_events) == 2 and rank_events[0] == rank_events[1],
        "oom_step": events[0]["step"] + 1 if events else None,
    }
    direct_summary = direct.get("summary") or {}
    found["direct_completed"] = (
        direct_summary.get("status") == "completed" and direct_summary.get("global_step") == args.steps
    )
    guarded_curve = dict((int(step), loss) for step, loss in summary.get("loss_curve") or [])
    direct_curve = dict((int(step), loss) for step, loss in direct_summary.get("loss_curve") or [])
    common = sorted(set(guarded_curve) & set(direct_curve))
    differences = [abs(guarded_curve[step] - direct_curve[step]) for step in common]
    found["loss_steps_compared"] = len(common)
    found["loss_max_abs_difference"] = max(differences) if differences else None
    # bf16 compute with other micro-batch boundaries: the curves agree to rounding, not bit for bit.
    found["losses_match"] = bool(differences) and len(common) == args.steps and max(differences) < 0.05
    found["passed"] = all(found[key] for key in ("guarded_completed", "stepped_down", "on_both_ranks", "ranks_agree",
                                                  "direct_completed", "losses_match"))
    return found


def save(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def render(result: dict[str, Any]) -> None:
    """A short table on stdout."""
    from memtune.config import TrainConfig, format_bytes

    calibration = result["runs"].get("guarded", {}).get("calibration") or {}
    if calibration:
        print(f"{calibration.get('device', '?')}: {format_bytes(calibration['total_memory_bytes'])} per GPU; "
              f"trial peaks {format_bytes(calibration['plan_peak_reserved_bytes'])} (micro-batch "
              f"{calibration['plan_micro_batch']}) and {format_bytes(calibration['fallback_peak_reserved_bytes'])} "
              f"(micro-batch {calibration['fallback_micro_batch']}); cap {format_bytes(calibration['cap_bytes'])} "
              f"(fraction {calibration['memory_fraction']:.4f}) after step {result['settings']['oom_after_steps']}")
    print(
        f"{'run':<8} {'exit':>4} {'status':<10} {'steps':>5} {'final configuration':<44} "
        f"{'peak reserved':>13} {'wall s':>7}"
    )
    for name, run in result["runs"].items():
        summary = run.get("summary") or {}
        final = summary.get("final_train_config")
        peak = summary.get("peak_reserved_bytes")
        status = "timed out" if run.get("timed_out") else summary.get("status", "-")
        print(
            f"{name:<8} {run.get('returncode')!s:>4} {status:<10} "
            f"{summary.get('global_step', '-')!s:>5} {(TrainConfig.from_dict(final).describe() if final else '-'):<44} "
            f"{(format_bytes(peak) if peak else '-'):>13} {summary.get('wall_seconds') or 0:>7.1f}"
        )
        for event in summary.get("guard_events") or []:
            if event.get("kind") == "oom":
                to = event.get("to_config")
                print(
                    f"  guard: step {event['step'] + 1} ranks {event.get('ranks')}: micro-batch "
                    f"{event['from_config'].get('micro_batch_size')} -> "
                    f"{to.get('micro_batch_size') if to else 'gave up'} "
                    f"({event.get('redone_micro_batches')} micro-batches redone)"
                )
    guarded = dict(
        (int(step), loss)
        for step, loss in (result["runs"].get("guarded", {}).get("summary") or {}).get("loss_curve") or []
    )
    direct = dict(
        (int(step), loss)
        for step, loss in (result["runs"].get("direct", {}).get("summary") or {}).get("loss_curve") or []
    )
    if guarded:
        print("step  " + "  ".join(f"{step:>7}" for step in sorted(guarded)))
        print("guard " + "  ".join(f"{guarded[step]:>7.4f}" for step in sorted(guarded)))
        if direct:
            print("direct" + "  ".join(f"{direct.get(step, float('nan')):>7.4f}" for step in sorted(guarded)))
    checks_found = result.get("checks", {})
    print("checks: " + ", ".join(f"{key}={value}" for key, value in checks_found.items()))


# ---- a worker rank (under accelerate launch) -----------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from rich.console import Console
    from transformers import TrainerCallback

    from memtune.config import TrainConfig
    from memtune.plan import Plan
    from memtune.run.runner import run_plan

    state = PartialState()  # the launcher's NCCL process group; one GPU per rank
    rank = state.process_index
    folder = args.work_dir
    payload = json.loads((folder / "payload.json").read_text())
    plan = Plan.from_dict(payload["plan"])
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    record: dict[str, Any] = {"rank": rank, "device": torch.cuda.get_device_name(device), "total_memory_bytes": total,
                              "torch": torch.__version__}
    fraction = payload["memory_fraction"]
    if args.worker == "guarded":
        calibration = calibrate(plan.train_config, TrainConfig.from_dict(payload["fallback"]), plan.model, total)
        calibration["device"] = record["device"]
        fraction = calibration["memory_fraction"]
        record["calibration"] = calibration
        if rank == 0:
            (folder / "calibration.json").write_text(json.dumps(calibration, indent=2))

    class CapMemory(TrainerCallback):
        """After `--oom-after-steps` optimizer steps: give the cache back and cap this process's memory."""

        def on_step_end(self, targs: Any, tstate: Any, control: Any, **kwargs: Any) -> None:
            if tstate.global_step == args.oom_after_steps:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(fraction, device)
                record["cap_set_at_step"] = tstate.global_step

    status = 0
    try:
        summary = run_plan(plan, output_dir=folder / "run", max_steps=args.steps, seed=args.seed, save_steps=1000,
                           callbacks=[CapMemory()], console=Console(stderr=True))
        record["guard_events"] = summary.guard_events
        record["loss_curve"] = summary.loss_curve
        record["peak_reserved_bytes"] = summary.peak_reserved_bytes
        record["final_train_config"] = summary.final_train_config
    except Exception as error:  # noqa: BLE001 - recorded for the parent; the exit status says it failed
        record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        status = 3
    (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=2))
    if status == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return status


def calibrate(plan_config: Any, fallback: Any, model: str, total_memory_bytes: int) -> dict[str, Any]:
    """Per-GPU peaks of both configurations without a cap (collective trials), and the cap between them."""
    from memtune.measure.sharded import measure_sharded
    from memtune.sources import resolve

    model_config = resolve(model).config
    measured = {name: measure_sharded(model_config, config, steps=2)
                for name, config in (("plan", plan_config), ("fallback", fallback))}
    plan_peak = measured["plan"].peak_reserved_bytes
    fallback_peak = measured["fallback"].peak_reserved_bytes
    cap = (plan_peak + fallback_peak) // 2
    return {
        "total_memory_bytes": total_memory_bytes,
        "plan_micro_batch": plan_config.micro_batch_size, "fallback_micro_batch": fallback.micro_batch_size,
        "plan_peak_reserved_bytes": plan_peak, "fallback_peak_reserved_bytes": fallback_peak,
        "plan_fits_uncapped": measured["plan"].fits, "fallback_fits_uncapped": measured["fallback"].fits,
        "cap_bytes": cap, "memory_fraction": cap / total_memory_bytes,
        "gap_is_wide": plan_peak > 1.3 * fallback_peak,
    }


if __name__ == "__main__":
    sys.exit(main())
