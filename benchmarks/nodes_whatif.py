"""What-if plans over several machines (issue 15 item 4): Llama-3.1-8B full fine-tuning on 1, 2 and 4 machines of
8 H100-80GB, predicted without the machines (no GPU, nothing measured).

    python benchmarks/nodes_whatif.py --out benchmarks/results/nodes_whatif.json

Each row is what `memtune plan` predicts for the same command line (`PlanOptions`, the CLI's own options):

    memtune plan meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 128 --micro-batch-size 4 \\
        --precision bf16-mixed --checkpointing --gpu H100-80GB --nodes M --gpus 8 [--inter-node-gbps G]

per-GPU peak memory (FSDP2 full sharding over M x 8 GPUs: the world size shards the model state) and the predicted
tokens/s over all GPUs, at the default network assumption (400 Gb/s per machine, `config.DEFAULT_INTER_NODE_GBPS`)
and at 3200 Gb/s (a DGX-class machine, one 400 Gb/s port per GPU). The effective batch is kept at 128 sequences:
the gradient accumulation shrinks as the machines grow. The throughput across machines is a model with a stated
assumption (`predict.throughput`), not a measurement.

Reading the memory: the model state (weights, gradients, AdamW state) shrinks with the world size, and with gradient
accumulation FSDP2 holds the unsharded gradients between micro-batches (Trainer's no_sync is
`set_requires_gradient_sync(False)`, `recipe.parallel`): on 4 machines the accumulation is gone, and so is that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import DEFAULT_INTER_NODE_GBPS, format_bytes  # noqa: E402
from memtune.options import PlanOptions, TaskOptions  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B"
CARD = "H100-80GB"
GPUS_PER_MACHINE = 8
MACHINES = (1, 2, 4)
FAST_NETWORK_GBPS = 3200.0
"""A DGX H100-class machine: eight 400 Gb/s ports, one per GPU."""
SHAPE = dict(seq_len=2048, batch_size=128)
PLAN = dict(micro_batch_size=4, precision="bf16-mixed", checkpointing=True)


def command(nodes: int, network_gbps: float) -> str:
    """The `memtune plan` command line of one row."""
    network = "" if network_gbps == DEFAULT_INTER_NODE_GBPS else f" --inter-node-gbps {network_gbps:g}"
    return (f"memtune plan {MODEL} --seq-len {SHAPE['seq_len']} --batch-size {SHAPE['batch_size']} "
            f"--micro-batch-size {PLAN['micro_batch_size']} --precision {PLAN['precision']} --checkpointing "
            f"--gpu {CARD} --nodes {nodes} --gpus {GPUS_PER_MACHINE}{network}")


def predict(nodes: int) -> dict[str, Any]:
    """One row: the plan document of `memtune plan --json` and the tokens/s at both network rates."""
    from memtune.fit import plan_configuration
    from memtune.report.json import plan_to_dict
    from memtune.sources import resolve, source_parameters

    options = PlanOptions(task=TaskOptions(model=MODEL, gpu=CARD, gpus=GPUS_PER_MACHINE, nodes=nodes, **SHAPE),
                          **PLAN)
    problems = options.problems()
    if problems:
        raise SystemExit("; ".join(problems))
    source = resolve(MODEL)
    budget_bytes, label = options.task.budget_and_label()
    row: dict[str, Any] = {"nodes": nodes, "gpus_per_node": GPUS_PER_MACHINE, "world_size": nodes * GPUS_PER_MACHINE}
    for network in (DEFAULT_INTER_NODE_GBPS, FAST_NETWORK_GBPS):
        result = plan_configuration(source, source_parameters(source), options.train_config(), budget_bytes, label,
                                    gpu_name=CARD, inter_node_gbps=network)
        row.setdefault("command", command(nodes, DEFAULT_INTER_NODE_GBPS))
        row.setdefault("plan", plan_to_dict(result))
        row.setdefault("per_gpu_total_bytes", result.estimate.total_bytes)
        row.setdefault("fits", result.fits)
        row.setdefault("train_config", result.estimate.config.to_dict())
        row.setdefault("predicted_tokens_per_second", {})[f"{network:g}_gbps"] = result.tokens_per_second
    if nodes > 1:
        row["launch"] = launch_files(result.estimate.config, source.config)
    return row


def launch_files(config: Any, model_config: Any) -> dict[str, Any]:
    """What `memtune plan ... --out DIR` writes for the row (`run.launch.write_launch_files`), DIR standing for the
    directory: machine 0's accelerate config, the torchrun line and the steps to fill in and run."""
    import tempfile

    import yaml

    from memtune.run.launch import write_launch_files

    with tempfile.TemporaryDirectory() as directory:
        files = write_launch_files(Path(directory) / "DIR", config, Path(directory) / "DIR" / "plan.json",
                                   model_config=model_config)
        prefix = str(files.directory.parent) + "/"
        return {"accelerate_machine0.yaml": yaml.safe_load(files.accelerate_configs[0].read_text()),
                "torchrun_line": files.torchrun_line.replace(prefix, ""),
                "steps": [step.replace(prefix, "") for step in files.steps]}


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a short table on stdout."""
    print(f"{MODEL}, full fine-tuning, bf16-mixed, checkpointing, FSDP2, {CARD}, "
          f"{SHAPE['batch_size']} x {SHAPE['seq_len']} tokens per step (predicted, no machines)")
    print(f"{'machines':>8} {'GPUs':>5} {'micro x accum':>13} {'per-GPU peak':>13} {'fits':>5} "
          f"{'tok/s @400Gb/s':>15} {'tok/s @3200Gb/s':>16}")
    for row in rows:
        config = row["train_config"]
        speeds = row["predicted_tokens_per_second"]
        print(f"{row['nodes']:>8} {row['world_size']:>5} "
              f"{config['micro_batch_size']:>6} x {config['grad_accum_steps']:<4} "
              f"{format_bytes(row['per_gpu_total_bytes']):>13} {str(row['fits']):>5} "
              f"{speeds[f'{DEFAULT_INTER_NODE_GBPS:g}_gbps']:>15,.0f} {speeds[f'{FAST_NETWORK_GBPS:g}_gbps']:>16,.0f}")
    print("one machine: the network rate is not used (NVLink within the machine); the tokens/s over several machines "
          "rest on the network rate assumed; with accumulation FSDP2 holds unsharded gradients between micro-batches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [predict(nodes) for nodes in MACHINES]
    print_table(rows)
    if args.out is not None:
        import torch
        import transformers

        document = {
            "what": "memtune plan over several machines, predicted without the machines (issue 15 item 4)",
            "network_assumption": f"{DEFAULT_INTER_NODE_GBPS:g} Gb/s per machine by default (--inter-node-gbps), "
                                  f"{FAST_NETWORK_GBPS:g} Gb/s for a DGX-class machine; not measured",
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "machine": "CPU only, no GPU"},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
