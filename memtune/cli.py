"""memtune's command line: parse, call, render. No logic lives here.

    memtune fit | plan | run | probe | models

Every option comes from a field of an options dataclass in memtune.config (TaskOptions, PlanOptions,
FitOptions with Policy, RunOptions): `add_options` turns the field's type, default and `Option`
metadata into an argparse argument and its attribute docstring into the help, so `--help`, the Python
API and the saved plan cannot drift apart. `parse` gives back the command's options object.

Exit codes: 0 fitted / ran (or nothing to check), 1 unexpected failure, 2 bad usage or input,
3 nothing fits (the shortfall and what would fit are printed), 130 interrupted (a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import rich.markup
from rich.console import Console

from memtune.config import Policy, margin_for, option_of, parse_bytes
from memtune.errors import MemtuneError, UsageError, listed
from memtune.options import DataOptions, FitOptions, PlanOptions, RunOptions

# memtune.report (and through it the search and the plan) is imported by the commands that render: `memtune
# --help` builds the parser only. Nothing here imports torch, transformers or peft (tests/test_startup.py).

EPILOG_PLAN = """examples:
  memtune plan gpt2 --seq-len 512 --batch-size 8 --budget 16GiB
  memtune plan qwen2.5-0.5b --seq-len 1024 --batch-size 32 --micro-batch-size 4 --precision bf16-mixed --checkpointing --gpu RTX4090-24GB
  memtune plan meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 16 --micro-batch-size 1 --lora --precision bf16 --budget 24GiB --json
  memtune plan meta-llama/Llama-3.1-8B --seq-len 2048 --batch-size 8 --micro-batch-size 1 --precision bf16-mixed --checkpointing --gpu H100-80GB --gpus 4
  memtune plan qwen2.5-1.5b --seq-len 2048 --batch-size 16 --micro-batch-size 4 --precision bf16-mixed --gpu H100-80GB --gpus 4 --strategy auto
  memtune plan meta-llama/Llama-3.1-8B --seq-len 4096 --batch-size 32 --micro-batch-size 1 --precision bf16-mixed --checkpointing --gpu H100-80GB --nodes 2 --gpus 8 --out launch/
  memtune plan qwen2.5-0.5b --seq-len 2048 --batch-size 8 --micro-batch-size 1 --lora --precision bf16 --gpu RTX4090-24GB --eval-batch-size auto --eval-data eval.jsonl --eval-logits keep
  memtune plan qwen2.5-0.5b --seq-len 2048 --batch-size 16 --micro-batch-size 4 --precision bf16-mixed --gpu A100-80GB --data train.jsonl --packing none

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
  memtune fit ./my-model-dir --seq-len 4096 --batch-size 16 --gpu A100-80GB --data train.jsonl --packing bfd
                                                                           # plan for the data's worst batch

The search keeps the effective batch (--batch-size = micro-batch x accumulation x GPUs) and tries,
fastest predicted first: micro-batch/accumulation, bf16 (or fp16) mixed precision, gradient
checkpointing (of the fewest decoder layers that fit; with the checkpointed layers' inputs in pinned
host memory when that is not enough), a chunked loss (Liger's fused one too, when installed), the
allocator's expandable segments, CPU offload, an 8-bit or 4-bit AdamW (bitsandbytes, torchao), and with --gpus N a full
replica per GPU (DDP) or FSDP2 sharding of the model state; where DeepSpeed is installed, DeepSpeed
ZeRO-2 and ZeRO-3 too, with the optimizer (and ZeRO-3's parameters) offloaded to the CPU, also on one
GPU (--strategy deepspeed --zero-stage 3 --offload optimizer pins one; --offload-device nvme
--nvme-path DIR for ZeRO-Infinity when the host RAM is not enough). Pure 16-bit training (no fp32 master
weights) is tried only when nothing with them fits, LoRA (or --prefix) only when nothing else fits,
and LoRA on a 4-bit or 8-bit base (QLoRA, with bitsandbytes) after every other LoRA configuration,
unless you ask for them (--precision bf16, --lora, --qlora 4). Pin any choice (--precision fp32,
--checkpointing off, --checkpointing 12 for the first 12 layers, ...) and it is kept. The winner is
verified with real trial steps when a GPU is here, and saved to --plan-out for `memtune run`.

exit codes: 0 a plan fits, 1 unexpected failure, 2 bad usage or input, 3 nothing fits (the
shortfall and what would fit are printed).
"""


EPILOG_RUN = """examples:
  memtune run plans/qwen2.5-0.5b.json --data train.jsonl --max-steps 500
  memtune run plan.json --data corpus/ --text-field content --output-dir runs/exp1
  memtune run plan.json --output-dir runs/exp1 --resume        # after Ctrl-C or a crash

Without --data, a small sample corpus shipped with memtune is used (to try a plan end to end).
Ctrl-C finishes the current optimizer step and saves a checkpoint; --resume continues from it.
TRL runs (plans of --trainer sft|dpo) write no checkpoints yet: Ctrl-C stops them without one, and
--resume, --save-steps, --packing and --text-field are refused for them (exit 2).
exit codes: 0 ran, 1 unexpected failure, 2 bad usage or input, 3 out of memory with no lighter
configuration left (the last step is saved), 130 interrupted (checkpoint saved).
"""


# ---- options dataclass -> argparse ------------------------------------------------------------------


@functools.cache
def _classes_in(filename: str) -> dict[str, ast.ClassDef]:
    """{qualified name: its ClassDef} of every class of a Python file outside a function, the file parsed once per
    process: `inspect.getsource` parses the whole module again for each class (0.2-0.3 s of every `memtune --help`
    on a 2-core machine, for the 11 options dataclasses). {} when the file cannot be read."""
    try:
        tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    found: dict[str, ast.ClassDef] = {}

    def visit(statements: list[ast.stmt], prefix: str) -> None:
        for node in statements:
            if isinstance(node, ast.ClassDef):
                found[prefix + node.name] = node
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return found


def _class_node(klass: type) -> ast.ClassDef | None:
    """The ClassDef of `klass`, from its module's file (cached), else from `inspect.getsource` (a class defined
    inside a function); None when there is no source (a frozen application)."""
    try:
        filename = inspect.getsourcefile(klass)
    except TypeError:  # a built-in class
        return None
    node = _classes_in(filename).get(klass.__qualname__) if filename else None
    if node is not None:
        return node
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
    except (OSError, TypeError):
        return None
    return body if isinstance(body, ast.ClassDef) else None


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring, on one line} of a dataclass and its dataclass bases: the
    string literal under each field, as Sphinx autodoc and LitGPT's jsonargparse read them."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _class_node(klass)  # None without source (a frozen application): the options keep no help
        statements = body.body if body is not None else []
        for node, after in itertools.pairwise(statements):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _value_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(the type a value is parsed as, the values of a Literal or None) of a field's type, None removed."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        return str, typing.get_args(hint)
    return hint, None


def _default(field_: dataclasses.Field) -> Any:
    if field_.default is not dataclasses.MISSING:
        return field_.default
    if field_.default_factory is not dataclasses.MISSING:
        return field_.default_factory()
    return None


def _help(doc: str, default_text: str | None, note: str | None) -> str:
    text = doc.rstrip(".")
    if note:
        text += f"; {note}" if text else note
    if default_text:
        text += f" (default: {default_text})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, cls: type, group: str | None = None,
                sections: dict[str, Any] | None = None) -> None:
    """Add an argument for every field of the dataclass `cls` (nested dataclasses flattened, in order):

    - the flag: `Option.flag`, or --field-name (--no-field-name for a bool that defaults to True; "" for a
      positional argument); the destination is the field name;
    - the value: a switch for a bool, one of `Option.words` (auto/on/off), one of a Literal's values or
      `Option.choices`, else text converted by the type (int, float, str), or by `Option.parse` later;
    - the help: the field's attribute docstring, `Option.note` and the default (`Option.default_text`).
    """
    sections = {} if sections is None else sections
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field_ in dataclasses.fields(cls):
        option = option_of(field_)
        if not option.on_command_line:
            continue
        kind, literal = _value_type(hints[field_.name])
        where = option.group or group
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            add_options(parser, kind, where, sections)
            continue
        target: Any = parser
        if where:
            if where not in sections:
                sections[where] = parser.add_argument_group(where)
            target = sections[where]
        if option.exclusive:
            key = f"{where}/{option.exclusive}"
            if key not in sections:
                sections[key] = target.add_mutually_exclusive_group()
            target = sections[key]
        default = _default(field_)
        doc = docs.get(field_.name, "")
        flag = option.flag_of(field_.name, default if kind is bool else None)
        if not flag:
            target.add_argument(field_.name, metavar=option.metavar, help=_help(doc, None, option.note))
            continue
        settings: dict[str, Any] = {"dest": field_.name}
        default_text = option.default_text
        if option.words is not None:
            word = next(word for word, value in option.words.items() if value == default)
            settings.update(default=word, type=str.lower)  # the words are lowercase: ON means on
            if option.parse is None:
                settings.update(choices=list(option.words))
            else:  # words, or a value for `Option.parse` (--checkpointing 12)
                settings.update(metavar=option.metavar)
            default_text = default_text or word
        elif kind is bool:
            settings.update(action="store_false" if default else "store_true", default=default)
            if option.negatable:  # the default's own flag too: --explain beside --no-explain
                flag_of_default = option.flag_of(field_.name, not default)
                target.add_argument(flag_of_default, dest=field_.name, action="store_true" if default else
                                    "store_false", default=default, help="(the default)")
        else:
            choices = option.choices or literal
            metavar = option.metavar or (None if choices else flag.lstrip("-").replace("-", "_").upper())
            settings.update(type=str if option.parse else kind, default=default, metavar=metavar, choices=choices)
            if default_text is None and default is not None:
                default_text = str(default)
        target.add_argument(flag, help=_help(doc, default_text, option.note), **settings)


def options_from(cls: type, namespace: argparse.Namespace, problems: list[str]) -> Any:
    """The `cls` options dataclass from parsed arguments (the inverse of `add_options`). A value that
    `Option.parse` refuses is appended to `problems` and the field keeps its default."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field_ in dataclasses.fields(cls):
        option = option_of(field_)
        if not option.on_command_line:
            continue
        kind, _ = _value_type(hints[field_.name])
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[field_.name] = options_from(kind, namespace, problems)
            continue
        value = getattr(namespace, field_.name)
        if option.words is not None and value in option.words:
            value = option.words[value]
        elif option.parse is not None:
            try:
                value = option.parse(value) if value else None  # --margin "" is no margin given
            except UsageError as error:
                flag = option.flag_of(field_.name)
                negative = value.lstrip().startswith("-") and option.parse is parse_bytes
                problems.append(f"{flag} {value!r} is negative: give a positive quantity, e.g. {flag} 2GiB"
                                if negative else f"{flag}: {error}")
                continue
        values[field_.name] = value
    return cls(**values)


# ---- the parser ---------------------------------------------------------------------------------------

OPTIONS: dict[str, type] = {"plan": PlanOptions, "fit": FitOptions, "run": RunOptions}
"""The options dataclass of each command that has options beyond --json."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter (descriptions and epilogs kept as written) that never wraps a line inside a
    hyphenated word, so a flag named in an option's help (--no-8bit-optim) stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtune",
        description="Predict, and avoid, CUDA out-of-memory in fine-tuning.",
        epilog="start here: memtune fit MODEL --seq-len 1024 --batch-size 32   (see memtune fit --help)\n\n"
               "exit codes: 0 fitted/ran, 1 unexpected failure, 2 bad usage or input, 3 nothing fits, 130 interrupted",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    raw = HelpFormatter  # allow_abbrev=False: a flag of one command is not read as the prefix of another's
    plan = commands.add_parser("plan", help="predict the peak GPU memory of one training configuration (no GPU needed)",
                               epilog=EPILOG_PLAN, formatter_class=raw, allow_abbrev=False)
    add_options(plan, PlanOptions)
    fit = commands.add_parser("fit", help="find the fastest training configuration that fits, verify it, save the plan",
                              epilog=EPILOG_FIT, formatter_class=raw, allow_abbrev=False)
    add_options(fit, FitOptions)
    run = commands.add_parser(
        "run", help="train with a saved plan (HF Trainer or TRL's), with the OOM guard; Ctrl-C checkpoints, "
             "--resume continues (not TRL runs yet)",
        epilog=EPILOG_RUN, formatter_class=raw, allow_abbrev=False,  # fit --out is no --output-dir
    )
    add_options(run, RunOptions)
    probe = commands.add_parser("probe", help="what the GPU here has: total, free, other processes, bf16, CUDA context")
    probe.add_argument("--json", action="store_true", help="print JSON")
    models = commands.add_parser("models", help="list the built-in catalog of model configs (works offline)")
    models.add_argument("--json", action="store_true", help="print JSON")
    return parser


def attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with each value that starts with '-' joined to its option: `--budget -5GiB` becomes
    `--budget=-5GiB`, so that memtune's own check says what is wrong with it (argparse would read `-5GiB` as
    an option and only say "expected one argument"; it takes `-1` as a value but not `-1e-4`).

    Joined: a single-dash word that is no option name (`-h` stays an option), after an option of the
    command that takes a value (its full name or an abbreviation argparse would accept). A word starting
    with '--' is never a value (a forgotten value before the next option keeps argparse's message), and
    nothing after a bare `--` is touched."""
    subcommands = next((action.choices for action in parser._actions  # noqa: SLF001 - argparse keeps no public list
                        if isinstance(action, argparse._SubParsersAction)), {})  # noqa: SLF001
    command = next((word for word in argv if word in subcommands), None)
    if command is None:
        return list(argv)
    actions = subcommands[command]._actions  # noqa: SLF001
    names = {name for action in actions for name in action.option_strings}
    takes_value = {name for action in actions for name in action.option_strings if action.nargs != 0}

    def full_name(word: str) -> str | None:
        if word in names:
            return word
        matches = [name for name in names if word.startswith("--") and name.startswith(word)]
        return matches[0] if len(matches) == 1 else None

    result: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            result += [word, *words]
            break
        if full_name(word) in takes_value:
            value = next(words, None)
            if value is not None and value.startswith("-") and not value.startswith("--") and value not in names:
                result.append(f"{word}={value}")
                continue
            result.append(word)
            if value is not None:
                result.append(value)
            continue
        result.append(word)
    return result


def parse(argv: list[str] | None = None) -> tuple[str, Any]:
    """(command, its options) from the command line: a PlanOptions, FitOptions or RunOptions, or the
    argparse Namespace of probe and models. Every problem of the options is reported at once, in one
    UsageError (exit code 2); argparse's own errors (an unknown flag or choice) exit 2 through SystemExit.
    A value that starts with '-' reaches its option (`attach_dash_values`), so a negative number is
    checked like any other."""
    parser = build_parser()
    namespace = parser.parse_args(attach_dash_values(parser, sys.argv[1:] if argv is None else argv))
    cls = OPTIONS.get(namespace.command)
    if cls is None:
        return namespace.command, namespace
    problems: list[str] = []
    options = options_from(cls, namespace, problems)
    problems += options.problems() if hasattr(options, "problems") else []
    if problems:
        raise UsageError(listed("", problems))
    return namespace.command, options


# ---- the commands --------------------------------------------------------------------------------------


def log_library_lines(lines: list[str]) -> None:
    """What transformers, peft and torch warned while a command traced (`fit.quiet_libraries`: kept off stderr,
    as they speak of the random-weight model memtune builds, not the user's run), at DEBUG on "memtune.cli"."""
    for line in lines:
        logging.getLogger("memtune.cli").debug("library: %s", line)


def read_data(options: DataOptions, source: Any, seq_len: int, err: Console) -> Any:
    """The DataPlan of --data (`run.data_plan.plan_data`), with a progress bar on a terminal; None without --data."""
    if options.data is None:
        return None
    from memtune.report import terminal as report
    from memtune.run.data_plan import plan_data

    with report.tokenizing_progress(err) as progress:
        return plan_data(source, options.data, seq_len, options.packing, options.text_field, progress=progress,
                         note=lambda message: err.print(f"note: {message}", highlight=False))


def cmd_plan(options: PlanOptions, out: Console, err: Console) -> int:
    from memtune.fit import plan_configuration, quiet_libraries
    from memtune.report import json as json_report
    from memtune.report import terminal as report
    from memtune.sources import resolve, source_parameters

    task = options.task
    budget_bytes, budget_label = task.budget_and_label()
    missing = [problem for problem in (options.evaluation.data_problem(), options.training_data.data_problem())
               if problem]
    if missing:  # before the model is resolved and traced
        raise UsageError(listed("", missing))
    source = resolve(task.model, trust_remote_code=task.trust_remote_code, shapes_only=True)
    if source.note:
        err.print(f"note: {source.note}")
    data = read_data(options.training_data, source, task.seq_len, err)
    tracing = err.status("tracing one training step on fake tensors...", spinner="dots") if err.is_terminal else None
    train_config = options.train_config()
    with tracing or contextlib.nullcontext(), quiet_libraries() as said:  # library chatter: see log_library_lines
        if options.evaluation.auto and budget_bytes is not None:  # PlanOptions.problems: auto needs a budget
            from memtune.predict.evaluation import with_eval_batch

            train_config = with_eval_batch(source.config, train_config,
                                           budget_bytes - margin_for(budget_bytes, Policy()), device=task.trace_device)
        result = plan_configuration(
            source, source_parameters(source), train_config, budget_bytes, budget_label,
            strategy_auto=options.strategy == "auto", trace_device=task.trace_device, gpu_name=task.gpu,
            note=lambda message: err.print(f"note: {message}", highlight=False), inter_node_gbps=task.inter_node_gbps,
            data=data, explain=options.explain,
        )
    log_library_lines(said)
    if task.json:
        print(json_report.render_plan_json(result))
    else:
        report.render_plan(result, out)
    if options.out is not None:
        from memtune.run import launch

        plan_path = result.plan(task.gpu, task.trust_remote_code).save(Path(options.out) / "plan.json")
        files = launch.write_launch_files(options.out, result.estimate.config, plan_path, model_config=source.config)
        shown = err if task.json else out  # with --json, stdout carries the plan document alone
        shown.print(f"plan saved to {plan_path}; launch files for {files.directory.name}/:", highlight=False,
                    soft_wrap=True)
        for step in files.steps:
            shown.print(f"  {rich.markup.escape(step)}", highlight=False, soft_wrap=True)
    return 3 if result.fits is False else 0


def cmd_fit(options: FitOptions, out: Console, err: Console) -> int:
    from memtune.fit import fit_model, quiet_libraries
    from memtune.report import html as html_report
    from memtune.report import json as json_report
    from memtune.report import terminal as report
    from memtune.sources import resolve, source_parameters

    task = options.task
    policy = options.policy()
    budget_bytes, budget_label = task.budget_and_label()
    source = resolve(task.model, trust_remote_code=task.trust_remote_code, shapes_only=True)
    if source.note:
        err.print(f"note: {source.note}")
    missing = options.training_data.data_problem()
    if missing:  # before minutes of search, not after
        raise UsageError(missing)
    data = read_data(options.training_data, source, task.seq_len, err)
    evaluation = options.evaluation.fields(task.seq_len, 1)  # the eval batch for the micro-batch chosen: auto
    if evaluation and options.evaluation.auto:
        evaluation["eval_batch_size"] = "auto"
    with report.progress_printer(err) as progress, quiet_libraries() as said:
        result = fit_model(
            source, source_parameters(source), task.seq_len, task.batch_size,
            budget_bytes=budget_bytes, budget_label=budget_label, gpu_name=task.gpu, policy=policy,
            verify=options.verify, trial_steps=options.trial_steps, trace_device=task.trace_device,
            plan_path=options.plan_out, progress=progress,
            evaluation=evaluation or None, data=data, inter_node_gbps=task.inter_node_gbps, explain=options.explain,
            # the choice on stderr as soon as the plan is saved, before the seconds of the explanation
            on_chosen=(lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
            if options.explain else None,
        )
    log_library_lines(said)
    if task.json:
        print(json_report.render_fit_json(result))
    else:
        report.render_fit(result, out)
    if options.report:
        path = html_report.write_html(result, options.report)
        err.print(f"report written to {path}")
    if not result.fits:
        return 3
    if options.run:
        if result.plan_path is None:
            raise UsageError("--run needs a plan for one GPU or budget: give --budget or --gpu, or run on a GPU")
        # with --json, stdout carries the fit document alone: the run's summary table goes to stderr
        return cmd_run(options.run_options(str(result.plan_path)), err if task.json else out, err)
    return 0


def cmd_run(options: RunOptions, out: Console, err: Console) -> int:
    """0 completed, 130 interrupted (a checkpoint is saved); errors raise MemtuneError. A plan that needs
    `accelerate launch` (several GPUs, CPU offload) runs this same command under it: its exit code."""
    from memtune.plan import Plan

    plan = Plan.load(options.plan)  # a wrong path is told before the seconds of importing the Trainer
    from memtune.report import terminal as report
    from memtune.run import runner  # imports the Trainer: only for `run`

    code = runner.relaunch(plan, options, log=lambda message: err.print(message, highlight=False))
    if code is not None:
        return code
    summary = runner.run_plan(plan, options, console=err)
    runner.leave_process_group()  # after a failure the error propagates instead: the launcher ends the other ranks
    code = 0 if summary.status == "completed" else 130
    if not runner.is_main_process():  # each rank of a multi-GPU run gets here: rank 0 alone prints the summary
        return code
    if options.json:
        print(summary.to_json())
    else:
        report.render_run_summary(summary, out)
    return code


def cmd_probe(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.measure.probe import probe
    from memtune.report import json as json_report
    from memtune.report import terminal as report

    result = probe()
    if args.json:
        print(json_report.render_probe_json(result))
    else:
        report.render_probe(result, out)
    return 0


def cmd_models(args: argparse.Namespace, out: Console, err: Console) -> int:
    from memtune.report import json as json_report
    from memtune.report import terminal as report
    from memtune.sources import catalog

    entries = catalog()
    if args.json:
        print(json_report.render_models_json(entries))
    else:
        report.render_models(entries, out)
    return 0


COMMANDS: dict[str, Callable[[Any, Console, Console], int]] = {
    "fit": cmd_fit, "plan": cmd_plan, "run": cmd_run, "probe": cmd_probe, "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    out = Console()
    err = Console(stderr=True)
    # bitsandbytes' CPU backend logs a warning on import where the optional `kernels` package is missing; peft
    # imports bitsandbytes for any LoRA model when it is installed, and memtune runs no 4-bit matmul on the CPU
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # torchao's import logs a warning for each of its C++ extensions built for another torch or GPU (memtune uses
    # its Python optimizers only), and torch's pytree one about an enum torchao registers
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        try:
            command, options = parse(argv)
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return COMMANDS[command](options, out, err)
    except MemtuneError as error:
        # soft_wrap: the terminal wraps; rich would cut a long path in two, which then cannot be copied
        # escaped: a message's own brackets (pip install -e ".[quant]") are text, not rich markup
        err.print(f"[red]error:[/red] {rich.markup.escape(str(error))}", highlight=False, soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
