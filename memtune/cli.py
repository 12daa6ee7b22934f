"""memtune's command line: parse, call, render. No logic lives here.

    memtune fit | plan | run | probe | models

Exit codes: 0 fitted / ran (or nothing to check), 1 unexpected failure, 2 bad usage or input,
3 nothing fits (the shortfall and what would fit are printed), 130 interrupted (a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from rich.console import Console

from memtune.config import (
    DEFAULT_SAVE_STEPS,
    KNOWN_GPUS,
    PRECISIONS,
    SAVE_TOTAL_LIMIT,
    Adapter,
    Policy,
    TrainConfig,
    format_bytes,
    known_gpu,
    parse_bytes,
    precision_config,
)
from memtune.errors import MemtuneError, UsageError
from memtune.report import html as html_report
from memtune.report import json as json_report
from memtune.report import terminal as report

EPILOG_PLAN = """examples:
  memtune plan gpt2 --seq-len 512 --batch-size 8 --budget 16GiB
  memtune plan qwen2.5-0.5b --seq-len 1024 --batch-size 32 --micro-batch-size 4 --precision bf16-mixed --checkpointing --gpu RTX4090-24GB
  memtune plan meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 16 --micro-batch-size 1 --lora --precision bf16 --budget 24GiB --json
  memtune plan meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 8 --micro-batch-size 1 --precision bf16-mixed --checkpointing --gpu H100-80GB --gpus 4
  memtune plan qwen2.5-1.5b --seq-len 2048 --batch-size 16 --micro-batch-size 4 --precision bf16-mixed --gpu H100-80GB --gpus 4 --strategy auto

MODEL is a catalog name (see `memtune models`), a hub id, or a local directory with config.json.
Memory depends on shapes only: nothing is downloaded beyond config.json and no GPU is needed.

exit codes: 0 fits (or no budget given), 1 unexpected failure, 2 bad usage or input, 3 does not fit.
"""


EPILOG_FIT = """examples:
  memtune fit qwen2.5-0.5b --seq-len 1024 --batch-size 32                  # the GPU here: fit, verify, save the plan
  memtune fit meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 16 --gpu RTX4090-24GB   # a card you don't have
  memtune fit gpt2 --seq-len 1024 --batch-size 64 --budget 8GiB --precision fp32 --no-lora
  memtune fit ./my-model-dir --batch-size 16 --json > fit.json             # stdout carries only the JSON
  memtune fit qwen2.5-0.5b                                                 # no GPU, no budget: which common cards fit
  memtune fit qwen2.5-1.5b --seq-len 2048 --batch-size 32 --gpu H100-80GB --gpus 2   # DDP or FSDP over 2 GPUs

The search keeps the effective batch (--batch-size = micro-batch x accumulation x GPUs) and tries,
fastest predicted first: micro-batch/accumulation, bf16 (or fp16) mixed precision, gradient
checkpointing, a chunked loss, CPU offload, and with --gpus N a full replica per GPU (DDP) or FSDP
sharding of the model state. LoRA (or --prefix) is used only when nothing else fits,
unless you ask for it (--lora). Pin any choice (--precision fp32, --checkpointing off, ...) and it
is kept. The winner is verified with real trial steps when a GPU is here, and saved to --plan-out
for `memtune run`.

exit codes: 0 a plan fits, 1 unexpected failure, 2 bad usage or input, 3 nothing fits (the
shortfall and what would fit are printed).
"""


EPILOG_RUN = """examples:
  memtune run plans/qwen2.5-0.5b.json --data train.jsonl --max-steps 500
  memtune run plan.json --data corpus/ --text-field content --output-dir runs/exp1
  memtune run plan.json --output-dir runs/exp1 --resume        # after Ctrl-C or a crash

Without --data, a small sample corpus shipped with memtune is used (to try a plan end to end).
Ctrl-C finishes the current optimizer step and saves a checkpoint; --resume continues from it.
exit codes: 0 ran, 1 unexpected failure, 2 bad usage or input, 3 out of memory with no lighter
configuration left (the last step is saved), 130 interrupted (checkpoint saved).
"""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The `memtune run` options (cli.py makes the subparser; cmd_run executes it)."""
    parser.add_argument("plan", metavar="PLAN", help="plan file written by `memtune fit` (JSON)")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="training text: JSON Lines (.jsonl), JSON, plain text (.txt) or a directory of them "
                             "(default: memtune's small sample corpus)")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where checkpoints, the trained model or adapter, the tokenizer and run_summary.json go "
                             "(default: memtune-runs/<model name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint-N in --output-dir at step N+1")
    parser.add_argument("--text-field", default="text", help="the JSON field that holds the text (default: text)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps in all, earlier runs of a resumed directory included "
                             "(default: one pass over the data)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="peak learning rate, linear decay (default 2e-4 with LoRA, 2e-5 for full fine-tuning)")
    parser.add_argument("--save-steps", type=int, default=DEFAULT_SAVE_STEPS,
                        help=f"checkpoint every N optimizer steps; the last {SAVE_TOTAL_LIMIT} are kept "
                             f"(default {DEFAULT_SAVE_STEPS})")
    parser.add_argument("--seed", type=int, default=42, help="seed for weights, data order and dropout (default 42)")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON instead of a table")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtune",
        description="Predict, and avoid, CUDA out-of-memory in fine-tuning.",
        epilog="start here: memtune fit MODEL --seq-len 1024 --batch-size 32   (see memtune fit --help)\n\n"
               "exit codes: 0 fitted/ran, 1 unexpected failure, 2 bad usage or input, 3 nothing fits, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser(
        "plan", help="predict the peak GPU memory of one training configuration (no GPU needed)",
        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("model", metavar="MODEL", help="catalog name, hub id or local directory with config.json")
    plan.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    plan.add_argument("--batch-size", type=int, default=8,
                      help="effective batch in sequences per optimizer step (default 8)")
    plan.add_argument("--micro-batch-size", type=int, default=None,
                      help="sequences per forward/backward; the rest is gradient accumulation "
                           "(default: the whole batch). Reduce it to 4, 2, 1 if you OOM")
    plan.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                      help="fp32; bf16-mixed / fp16-mixed = fp32 weights + autocast (Trainer bf16=True); "
                           "bf16 / fp16 = weights stored in 16 bits (default fp32)")
    plan.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (recompute activations)")
    plan.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    plan.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    plan.add_argument("--lora-targets", default="all-linear", help="peft target_modules, comma-separated (default all-linear)")
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--budget", help="device memory to fit in, e.g. 24GiB, 24GB (=24e9 bytes), 24000MiB")
    budget.add_argument("--gpu", help=f"a known card instead of --budget: {', '.join(KNOWN_GPUS)}")
    plan.add_argument("--trace-device", choices=["cpu", "cuda"], default=None,
                      help="trace on fake CUDA tensors (needs a GPU) or on CPU with CUDA emulation "
                           "(default: cuda when a GPU is visible)")
    plan.add_argument("--gpus", type=int, default=1,
                      help="GPUs to train on (see --strategy); --batch-size is split over them; the GPUs need not be "
                           "present (default 1)")
    plan.add_argument("--strategy", choices=["fsdp", "ddp", "auto"], default="fsdp",
                      help="with --gpus N: fsdp shards weights, gradients and optimizer state over the GPUs (default); "
                           "ddp keeps a full replica on each GPU (faster, needs the whole training state per GPU); "
                           "auto predicts both and takes the faster that fits the budget")
    plan.add_argument("--offload", choices=["none", "parameters"], default="none",
                      help="parameters: FSDP CPU offload of parameters, gradients and optimizer state")
    plan.add_argument("--json", action="store_true", help="print one JSON document instead of tables")

    fit = commands.add_parser(
        "fit", help="find the fastest training configuration that fits, verify it, save the plan",
        epilog=EPILOG_FIT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("model", metavar="MODEL", help="catalog name, hub id or local directory with config.json")
    fit.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    fit.add_argument("--batch-size", type=int, default=8,
                     help="effective batch in sequences per optimizer step, kept exactly (default 8)")
    budget = fit.add_mutually_exclusive_group()
    budget.add_argument("--budget", help="memory to fit in instead of the GPU's free memory, e.g. 24GiB or 24GB")
    budget.add_argument("--gpu", help=f"plan for a known card: {', '.join(KNOWN_GPUS)}")
    fit.add_argument("--gpus", type=int, default=None,
                     help="GPUs to train on; above 1, --batch-size is split over them and the search tries a replica "
                          "per GPU (DDP) and FSDP sharding (see --strategy) (default: the GPUs visible here, or 1; "
                          "with --budget/--gpu they need not be present)")
    pins = fit.add_argument_group("pin a choice (default: the search chooses)")
    pins.add_argument("--precision", choices=list(PRECISIONS), default=None, help="keep this precision")
    pins.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto", help="gradient checkpointing")
    pins.add_argument("--micro-batch-size", type=int, default=None, help="keep this micro-batch (must divide --batch-size)")
    pins.add_argument("--loss", choices=["auto", "standard", "chunked"], default="auto",
                      help="chunked computes the LM head and loss in chunks, never holding all fp32 logits")
    pins.add_argument("--offload", choices=["auto", "none", "parameters"], default="auto",
                      help="parameters: FSDP CPU offload of parameters, gradients and optimizer state (slow)")
    pins.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto",
                      help="with --gpus N: ddp keeps a full replica on each GPU (no parameter gathering), fsdp shards "
                           "weights, gradients and optimizer state; auto tries both and keeps the fastest that fits")
    policy = fit.add_argument_group("policy")
    policy.add_argument("--lora", action="store_true", help="train LoRA adapters even if full fine-tuning fits")
    policy.add_argument("--prefix", action="store_true", help="use prefix tuning instead of LoRA as the adapter rung")
    policy.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    policy.add_argument("--lora-targets", default="all-linear", help="peft target_modules, comma-separated (default all-linear)")
    policy.add_argument("--no-lora", action="store_true", help="never use an adapter (full fine-tuning only)")
    policy.add_argument("--full-finetune-only", action="store_true", help="same as --no-lora")
    policy.add_argument("--no-offload", action="store_true", help="never offload to the CPU")
    policy.add_argument("--no-chunked-loss", action="store_true", help="never chunk the loss")
    policy.add_argument("--min-micro-batch-size", type=int, default=1, help="smallest micro-batch to consider (default 1)")
    policy.add_argument("--margin", default=None,
                        help="memory kept free below the budget, e.g. 2GiB (default 5%% of the budget, at least 256MiB)")
    run = fit.add_argument_group("verification and output")
    run.add_argument("--no-verify", action="store_true", help="skip the real trial steps on the GPU")
    run.add_argument("--trial-steps", type=int, default=2, help="optimizer steps per trial (1-3, default 2)")
    run.add_argument("--plan-out", default="memtune-plan.json", help="where to save the plan (default memtune-plan.json)")
    run.add_argument("--report", default=None, metavar="FILE.html", help="also write the report as a self-contained HTML page")
    run.add_argument("--trace-device", choices=["cpu", "cuda"], default=None, help="see `memtune plan --help`")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of tables")

    run.add_argument("--run", action="store_true", help="train with the plan right away (same as `memtune run PLAN`)")
    run.add_argument("--data", default=None, metavar="FILE", help="with --run: training text (.jsonl, .txt or a folder; "
                     "default: memtune's sample corpus)")
    run.add_argument("--output-dir", default=None, metavar="DIR", help="with --run: where the model and checkpoints go")
    run.add_argument("--max-steps", type=int, default=None, help="with --run: optimizer steps (default: one pass over the data)")

    run_command = commands.add_parser(
        "run", help="train with a saved plan (HF Trainer), with the OOM guard; Ctrl-C checkpoints, --resume continues",
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run_command)

    probe = commands.add_parser("probe", help="what the GPU here has: total, free, other processes, bf16, CUDA context")
    probe.add_argument("--json", action="store_true", help="print JSON")

    models = commands.add_parser("models", help="list the built-in catalog of model configs (works offline)")
    models.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    problems = []
    gpus = args.gpus
    if gpus < 1:
        problems.append(f"--gpus must be >= 1, got {gpus}")
        gpus = 1
    per_gpu = args.batch_size // gpus
    if args.batch_size % gpus:
        problems.append(f"--batch-size {args.batch_size} is not a multiple of --gpus {gpus}: each GPU takes an equal share")
    micro = args.micro_batch_size or per_gpu or 1
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if micro < 1:
        problems.append(f"--micro-batch-size must be >= 1, got {micro}")
    elif per_gpu >= 1 and per_gpu % micro:
        problems.append(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {micro} x --gpus {gpus}: the "
            f"effective batch would change; pick a divisor such as {max(d for d in range(1, micro + 1) if per_gpu % d == 0)}"
        )
    if args.seq_len < 1:
        problems.append(f"--seq-len must be >= 1, got {args.seq_len}")
    if problems:
        raise UsageError("; ".join(problems))
    weights, amp = precision_config(args.precision)
    adapter = None
    if args.lora:
        targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
        adapter = Adapter(rank=args.lora_rank, alpha=2 * args.lora_rank, target_modules=targets)
    return TrainConfig(
        seq_len=args.seq_len, micro_batch_size=micro, grad_accum_steps=max(1, per_gpu // micro),
        weights_dtype=weights, amp=amp, gradient_checkpointing=args.checkpointing, adapter=adapter,
        num_gpus=gpus, offload=args.offload, strategy="fsdp" if args.strategy == "auto" else args.strategy,
    )


def _budget(args: argparse.Namespace) -> tuple[int | None, str]:
    if args.budget:
        value = parse_bytes(args.budget)
        return value, f"budget {format_bytes(value)}"
    if args.gpu:
        name, total_bytes = known_gpu(args.gpu)
        return total_bytes, f"{name} ({format_bytes(total_bytes)})"
    return None, ""


def cmd_plan(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.config import margin_for
    from memtune.fit import ModelPredictor, PlanResult
    from memtune.predict import throughput
    from memtune.search.choose import choose_strategy
    from memtune.search.verdict import judge
    from memtune.sources import parameter_count, resolve

    train_config = _train_config(args)
    budget_bytes, budget_label = _budget(args)
    source = resolve(args.model)
    if source.note:
        err.print(f"note: {source.note}")
    num_parameters = parameter_count(source.config)
    # The predictor picks the estimate for the strategy (single GPU, DDP, FSDP) and replays it against the budget.
    predictor = ModelPredictor(source.config, num_parameters, throughput.gpu_speed(args.gpu or "H100"), device=args.trace_device)
    with err.status("tracing one training step on fake tensors...", spinner="dots") if err.is_terminal else contextlib.nullcontext():
        margin_bytes = 0 if budget_bytes is None else margin_for(budget_bytes, Policy())
        if args.strategy == "auto":
            train_config, estimate, why = choose_strategy(predictor, train_config, budget_bytes, margin_bytes=margin_bytes)
            if why:
                err.print(f"note: {why}", highlight=False)
        else:
            estimate = predictor.memory(train_config)
        verdict = None if budget_bytes is None else judge(predictor, estimate, budget_bytes, margin_bytes)
    result = PlanResult(source, estimate, budget_label, num_parameters, verdict)
    if args.json:
        print(json_report.render_plan_json(result))
    else:
        report.render_plan(result, out)
    return 3 if result.fits is False else 0


def _policy(args: argparse.Namespace) -> Policy:
    problems = []
    if args.lora and (args.no_lora or args.full_finetune_only):
        problems.append("--lora contradicts --no-lora/--full-finetune-only: keep one")
    if not 1 <= args.trial_steps <= 3:
        problems.append(f"--trial-steps must be 1, 2 or 3, got {args.trial_steps}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        problems.append(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.batch_size < 1 or args.seq_len < 1:
        problems.append(f"--batch-size and --seq-len must be >= 1, got {args.batch_size} and {args.seq_len}")
    if problems:
        raise UsageError("; ".join(problems))
    if args.prefix:
        adapter = Adapter(kind="prefix")
    else:
        targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
        adapter = Adapter(rank=args.lora_rank, alpha=2 * args.lora_rank, target_modules=targets)
    no_adapter = args.no_lora or args.full_finetune_only
    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = max(1, torch.cuda.device_count()) if not (args.budget or args.gpu) else 1
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    return Policy(
        num_gpus=gpus,
        precision=args.precision,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.checkpointing],
        micro_batch_size=args.micro_batch_size,
        loss=None if args.loss == "auto" else args.loss,
        offload=None if args.offload == "auto" else args.offload,
        strategy=None if args.strategy == "auto" else args.strategy,
        adapter=adapter,
        use_adapter=True if (args.lora or args.prefix) and not no_adapter else (False if no_adapter else None),
        allow_offload=not args.no_offload,
        allow_chunked_loss=not args.no_chunked_loss,
        min_micro_batch_size=args.min_micro_batch_size,
        margin_bytes=parse_bytes(args.margin) if args.margin else None,
    )


def cmd_fit(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.fit import fit_model
    from memtune.sources import parameter_count, resolve

    policy = _policy(args)
    policy.validate(args.batch_size)
    budget_bytes, budget_label = _budget(args)
    source = resolve(args.model)
    if source.note:
        err.print(f"note: {source.note}")
    with report.progress_printer(err) as progress:
        result = fit_model(
            source, parameter_count(source.config), args.seq_len, args.batch_size,
            budget_bytes=budget_bytes, budget_label=budget_label, gpu_name=args.gpu, policy=policy,
            verify=not args.no_verify, trial_steps=args.trial_steps, trace_device=args.trace_device,
            plan_path=args.plan_out, progress=progress,
        )
    if args.json:
        print(json_report.render_fit_json(result))
    else:
        report.render_fit(result, out)
    if args.report:
        path = html_report.write_html(result, args.report)
        err.print(f"report written to {path}")
    if not result.fits:
        return 3
    if args.run:
        from memtune.run.runner import cmd_run

        if result.plan_path is None:
            raise UsageError("--run needs a plan for one GPU or budget: give --budget or --gpu, or run on a GPU")
        run_args = argparse.Namespace(plan=str(result.plan_path), data=args.data, output_dir=args.output_dir, resume=False,
                                      text_field="text", max_steps=args.max_steps, learning_rate=None,
                                      save_steps=DEFAULT_SAVE_STEPS, seed=42, json=False)
        return cmd_run(run_args, out, err)
    return 0


def cmd_probe(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.measure.probe import probe

    result = probe()
    if args.json:
        print(json_report.render_probe_json(result))
    else:
        report.render_probe(result, out)
    return 0


def _cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.run.runner import cmd_run  # imports the Trainer: only for `run`

    return cmd_run(args, out, err)


def cmd_models(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.sources import catalog

    entries = catalog()
    if args.json:
        print(json_report.render_models_json(entries))
    else:
        report.render_models(entries, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    out = Console()
    err = Console(stderr=True)
    try:
        commands = {"fit": cmd_fit, "plan": cmd_plan, "run": _cmd_run, "probe": cmd_probe, "models": cmd_models}
        return commands[args.command](args, out, err)
    except MemtuneError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False)
        return error.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
