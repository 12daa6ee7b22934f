"""The command line: every exit code, JSON on stdout only, and the README's commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memtune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_fits_exit_0_and_json_document(capsys):
    code, out, err = run(["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--budget", "16GiB",
                          "--trace-device", "cpu", "--json"], capsys)
    assert code == 0
    document = json.loads(out)
    assert document["fits"] is True and document["schema_version"] == 1
    assert document["estimate"]["total_bytes"] < 16 * 2**30
    assert document["model"]["num_parameters"] == 124_439_808


def test_plan_does_not_fit_exit_3_with_shortfall(capsys):
    code, out, err = run(["plan", "gpt2", "--seq-len", "512", "--batch-size", "8", "--budget", "2GiB",
                          "--trace-device", "cpu"], capsys)
    assert code == 3
    assert "does not fit" in out and "short by" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["plan", "gpt2", "--budget", "24"], "ambiguous"),
        (["plan", "gpt2", "--budget", "24 parsecs"], "unknown unit"),
        (["plan", "gpt2", "--budget", "lots"], "malformed"),
        (["plan", "gpt2", "--gpu", "GTX-1"], "unknown --gpu"),
        (["plan", "gpt2", "--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
        (["plan", "no-such-model-anywhere"], "not found"),
        (["plan", "gpt2", "--precision", "fp8"], "invalid choice"),
        (["plan", "gpt2", "--batch-size", "8", "--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
        (["fit", "gpt2", "--budget", "6GiB", "--loss", "chunked", "--no-chunked-loss"],
         "--loss chunked contradicts --no-chunked-loss"),
        (["fit", "gpt2", "--budget", "6GiB", "--offload", "parameters", "--no-offload"],
         "--offload parameters contradicts --no-offload"),
    ],
)
def test_bad_input_exit_2_with_a_message(args, message, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in re.sub(r"\s+", " ", err)
    assert out == ""


def test_models_lists_the_catalog(capsys):
    code, out, _ = run(["models", "--json"], capsys)
    assert code == 0
    names = {entry["hub_id"] for entry in json.loads(out)}
    assert {"gpt2", "meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-0.5B"} <= names


def test_readme_main_command_runs():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("memtune plan "))
    args = command.split()[1:]
    result = subprocess.run([sys.executable, "-m", "memtune", *args, "--trace-device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode in (0, 3), result.stderr
    assert "predicted peak memory" in result.stdout


def test_plan_for_gpus_that_are_not_here(capsys):
    """`--gpus N` plans FSDP full sharding: per-GPU optimizer state shrinks with N."""
    def optimizer_bytes(gpus: int) -> int:
        code, out, err = run(["plan", "gpt2", "--seq-len", "128", "--batch-size", "8", "--micro-batch-size", "1",
                              "--gpus", str(gpus), "--gpu", "H100-80GB", "--trace-device", "cpu", "--json"], capsys)
        assert code == 0, err
        document = json.loads(out)
        assert document["estimate"]["config"]["num_gpus"] == gpus
        return document["estimate"]["breakdown"]["optimizer"]

    one, four = optimizer_bytes(1), optimizer_bytes(4)
    assert 0.2 < four / one < 0.3
    code, _, err = run(["plan", "gpt2", "--batch-size", "6", "--gpus", "4"], capsys)
    assert code == 2 and "not a multiple of --gpus 4" in re.sub(r"\s+", " ", err)


def test_readme_fit_command_runs():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("memtune fit "))
    result = subprocess.run([sys.executable, "-m", "memtune", *command.split()[1:], "--trace-device", "cpu",
                             "--no-verify", "--plan-out", str(ROOT / "build" / "readme-plan.json")],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "chosen:" in result.stdout


@pytest.mark.parametrize("flags", [
    [],
    ["--precision", "fp32", "--checkpointing", "on", "--micro-batch-size", "2", "--no-lora", "--no-offload"],
    ["--lora", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj", "--loss", "chunked", "--margin", "1GiB"],
    ["--prefix", "--checkpointing", "off", "--no-chunked-loss", "--min-micro-batch-size", "2", "--gpus", "2"],
    ["--gpus", "2", "--strategy", "ddp", "--offload", "none"],
    ["--gpus", "4", "--strategy", "fsdp", "--offload", "parameters"],
])
def test_the_reproduce_flags_give_back_the_same_policy(flags):
    """report.fit_commands prints search.policy_flags: parsed again, they must make the same Policy."""
    from memtune.cli import parse
    from memtune.config import policy_flags

    policy = parse(["fit", "gpt2", "--batch-size", "8", "--budget", "8GiB", *flags])[1].policy()
    again = parse(["fit", "gpt2", "--batch-size", "8", "--budget", "8GiB",
                   *" ".join(policy_flags(policy)).split()])[1].policy()
    assert again == policy


def plan_json(capsys, *flags: str) -> tuple[dict, str]:
    code, out, err = run(["plan", "gpt2", "--seq-len", "128", "--batch-size", "8", "--micro-batch-size", "1",
                          "--gpu", "H100-80GB", "--trace-device", "cpu", "--json", *flags], capsys)
    assert code == 0, err
    return json.loads(out), err


def test_plan_ddp_for_gpus_that_are_not_here(capsys):
    """`--gpus 4 --strategy ddp`: every GPU holds the whole training state, plus DDP's gradient buckets."""
    one, _ = plan_json(capsys)
    ddp, _ = plan_json(capsys, "--gpus", "4", "--strategy", "ddp")
    assert ddp["estimate"]["config"]["strategy"] == "ddp" and ddp["estimate"]["config"]["num_gpus"] == 4
    assert ddp["estimate"]["breakdown"]["optimizer"] == one["estimate"]["breakdown"]["optimizer"]
    # fp32: the construction buckets and the rebuilt ones, each a copy of the gradients, both alive in step 2
    assert abs(ddp["estimate"]["breakdown"]["ddp_buckets"] - 2 * one["estimate"]["breakdown"]["weights"]) < 64 << 20
    assert ddp["fits"] is True
    fsdp, _ = plan_json(capsys, "--gpus", "4")  # the default strategy of `plan` stays FSDP
    assert fsdp["estimate"]["config"]["strategy"] == "fsdp" and "ddp_buckets" not in fsdp["estimate"]["breakdown"]


def test_plan_strategy_auto_says_what_it_chose_and_why(capsys):
    document, err = plan_json(capsys, "--gpus", "4", "--strategy", "auto")
    assert document["estimate"]["config"]["strategy"] == "ddp"  # gpt2 fits an H100 as a replica, and DDP is faster
    assert "strategy auto: DDP, the faster that fits" in re.sub(r"\s+", " ", err)


@pytest.mark.parametrize("flags,message", [
    (["--strategy", "ddp"], "needs num_gpus >= 2"),
    (["--strategy", "ddp", "--gpus", "2", "--offload", "parameters"], "cannot offload 'parameters'"),
])
def test_plan_refuses_ddp_where_it_cannot_run(flags, message, capsys):
    code, out, err = run(["plan", "gpt2", "--batch-size", "2", *flags], capsys)
    assert code == 2 and message in re.sub(r"\s+", " ", err) and out == ""


def test_fit_for_two_gpus_chooses_between_ddp_and_fsdp_without_gpus(capsys, tmp_path):
    code, out, err = run(
        [
            "fit",
            "gpt2",
            "--seq-len",
            "128",
            "--batch-size",
            "4",
            "--gpus",
            "2",
            "--gpu",
            "H100-80GB",
            "--trace-device",
            "cpu",
            "--no-verify",
            "--plan-out",
            str(tmp_path / "plan.json"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    document = json.loads(out)
    chosen = document["search"]["chosen"]["config"]
    assert chosen["num_gpus"] == 2 and chosen["strategy"] == "ddp"  # gpt2's training state fits one H100 easily
    changes = {alternative["change"]: alternative for alternative in document["search"]["alternatives"]}
    fsdp = changes["FSDP instead of DDP (shards the model state)"]
    assert fsdp["fits"] and fsdp["config"]["strategy"] == "fsdp"
    assert fsdp["predicted_tokens_per_second"] < document["search"]["chosen"]["predicted_tokens_per_second"]
    assert json.loads((tmp_path / "plan.json").read_text())["train_config"]["strategy"] == "ddp"


# ---- the parser is generated from the options dataclasses ---------------------------------------------


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def command_line_fields(cls: type):
    """(dataclass, field) for every field of an options dataclass on the command line, nested ones flattened."""
    import dataclasses
    import typing

    from memtune.config import option_of

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not option_of(field).on_command_line:
            continue
        if dataclasses.is_dataclass(hints[field.name]):
            yield from command_line_fields(hints[field.name])
        else:
            yield cls, field


def test_fit_help_shows_every_policy_field_help_and_the_real_default_margin(capsys):
    """The help is the Policy's attribute docstrings: it cannot drift from the code (it once said 5%)."""
    import dataclasses

    from memtune.cli import field_docs
    from memtune.config import (
        DEFAULT_MARGIN_FRACTION,
        MIB,
        MIN_MARGIN_BYTES,
        Policy,
        option_of,
    )

    assert main(["fit", "--help"]) == 0
    shown = flat(capsys.readouterr().out)
    docs = field_docs(Policy)
    on_command_line = [field for field in dataclasses.fields(Policy) if option_of(field).on_command_line]
    assert {field.name for field in on_command_line} >= {"precision", "gradient_checkpointing", "margin_bytes"}
    for field in on_command_line:
        assert docs[field.name], f"Policy.{field.name} has no docstring: its --help would be empty"
        assert flat(docs[field.name]).rstrip(".") in shown, field.name
    margin = f"{DEFAULT_MARGIN_FRACTION:.0%} of the budget, at least {MIN_MARGIN_BYTES // MIB} MiB"
    assert margin == "2% of the budget, at least 256 MiB"
    assert "--margin MARGIN Memory kept free below the budget" in shown and f"(default: {margin})" in shown
    assert "5%" not in shown


@pytest.mark.parametrize("command", ["plan", "fit", "run"])
def test_every_option_has_help_and_the_epilog_stays(command, capsys):
    from memtune.cli import OPTIONS, field_docs

    assert main([command, "--help"]) == 0
    shown = flat(capsys.readouterr().out)
    assert "examples:" in shown and "exit codes:" in shown
    for cls, field in command_line_fields(OPTIONS[command]):
        doc = field_docs(cls).get(field.name, "")
        assert doc, f"{cls.__name__}.{field.name} has no docstring: its --help would be empty"
        assert flat(doc).rstrip(".").replace("%%", "%") in shown


@pytest.mark.parametrize("options", [
    {"plan": "plan.json"},
    {"plan": "p.json", "data": "train.jsonl", "output_dir": "runs/a", "text_field": "content", "max_steps": 7,
     "learning_rate": 1e-4, "save_steps": 3, "seed": 1, "resume": True, "json": True},
])
def test_run_options_round_trip_through_the_command_line(options):
    from memtune.cli import parse
    from memtune.options import RunOptions

    expected = RunOptions(**options)
    assert parse(["run", *expected.command_line()]) == ("run", expected)


def test_run_options_from_the_parsed_command_line():
    from memtune.cli import parse
    from memtune.options import RunOptions

    command, options = parse(["run", "plan.json", "--data", "corpus/", "--text-field", "content", "--resume",
                              "--max-steps", "500", "--learning-rate", "3e-4"])
    assert command == "run"
    assert options == RunOptions(plan="plan.json", data="corpus/", text_field="content", resume=True, max_steps=500,
                                 learning_rate=3e-4)


def test_fit_run_hands_its_options_to_run_as_run_options():
    from memtune.cli import parse
    from memtune.config import DEFAULT_SAVE_STEPS
    from memtune.options import RunOptions

    _, options = parse(["fit", "gpt2", "--budget", "8GiB", "--run", "--data", "train.jsonl", "--output-dir", "out",
                        "--max-steps", "9"])
    assert options.run_options("memtune-plan.json") == RunOptions(
        plan="memtune-plan.json", data="train.jsonl", output_dir="out", max_steps=9, resume=False, text_field="text",
        learning_rate=None, save_steps=DEFAULT_SAVE_STEPS, seed=42, json=False)


def test_each_command_keeps_its_flag_forms():
    from memtune.cli import parse

    _, plan = parse(["plan", "gpt2", "--checkpointing", "--lora", "--lora-rank", "8", "--gpus", "2",
                     "--batch-size", "4"])
    assert plan.checkpointing is True and plan.lora and plan.lora_shape.lora_rank == 8 and plan.task.gpus == 2
    assert plan.train_config().gradient_checkpointing and plan.train_config().adapter.rank == 8
    for word, value in (("on", True), ("off", False), ("auto", None)):
        _, fit = parse(["fit", "gpt2", "--budget", "8GiB", "--checkpointing", word])
        assert fit.pins.gradient_checkpointing is value
    _, fit = parse(["fit", "gpt2", "--gpu", "H100-80GB", "--no-offload", "--no-chunked-loss", "--margin", "1GiB",
                    "--full-finetune-only", "--no-verify"])
    policy = fit.policy()
    assert (policy.allow_offload, policy.allow_chunked_loss, policy.margin_bytes, policy.use_adapter) == (
        False, False, 1 << 30, False)
    assert fit.verify is False and fit.task.gpu == "H100-80GB"


def test_budget_and_gpu_exclude_each_other(capsys):
    code, out, err = run(["fit", "gpt2", "--budget", "8GiB", "--gpu", "H100-80GB"], capsys)
    assert code == 2 and "not allowed with argument" in err and out == ""


def test_every_problem_of_the_options_is_reported_at_once(capsys):
    code, out, err = run(["fit", "gpt2", "--lora", "--no-lora", "--trial-steps", "5", "--margin", "2G",
                          "--budget", "24"], capsys)
    said = flat(err)
    assert code == 2 and out == ""
    for problem in ("--lora contradicts --no-lora", "--trial-steps must be 1, 2 or 3, got 5",
                    "memory quantity '2G' is ambiguous", "memory quantity '24' is ambiguous"):
        assert problem in said, problem
    assert said.count("error:") == 1
    code, _, err = run(["plan", "gpt2", "--seq-len", "0", "--batch-size", "6", "--gpus", "4", "--gpu", "GTX-1"], capsys)
    said = flat(err)
    assert code == 2
    for problem in ("--seq-len must be >= 1, got 0", "not a multiple of --gpus 4", "unknown --gpu 'GTX-1'"):
        assert problem in said, problem


def test_exit_1_for_a_failure_and_130_for_ctrl_c(monkeypatch, capsys):
    from memtune import cli
    from memtune.errors import MemtuneError

    def failing(*_):
        raise MemtuneError("the GPU fell off the bus")

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "models", failing)
    code, out, err = run(["models"], capsys)
    assert code == 1 and "the GPU fell off the bus" in err and out == ""
    monkeypatch.setitem(cli.COMMANDS, "models", interrupted)
    code, _, err = run(["models"], capsys)
    assert code == 130 and "interrupted" in err


def test_every_documented_command_line_parses():
    """The README's and the epilogs' examples keep their flags' names and meanings (parsed, not run)."""
    import shlex

    from memtune.cli import EPILOG_FIT, EPILOG_PLAN, EPILOG_RUN, OPTIONS, parse

    texts = [(ROOT / "README.md").read_text(), EPILOG_FIT, EPILOG_PLAN, EPILOG_RUN]
    lines = [line.strip() for text in texts for line in text.splitlines()
             if re.match(r"\s*memtune (plan|fit|run) ", line)]
    assert len(lines) >= 15
    for line in lines:
        words = shlex.split(line.split("#")[0].split(">")[0])[1:]
        command, options = parse(words)
        assert isinstance(options, OPTIONS[command]), line


def test_a_value_that_starts_with_a_dash_reaches_its_option():
    from memtune.cli import attach_dash_values, build_parser, parse

    parser = build_parser()
    assert attach_dash_values(parser, ["fit", "gpt2", "--budget", "-5GiB", "--seq-len", "-3"]) == [
        "fit", "gpt2", "--budget=-5GiB", "--seq-len=-3"]
    assert attach_dash_values(parser, ["run", "p.json", "--learning-rate", "-1e-4", "--text-field", "-x"]) == [
        "run", "p.json", "--learning-rate=-1e-4", "--text-field=-x"]
    assert attach_dash_values(parser, ["run", "p.json", "--learning-r", "-1e-4"]) == [
        "run", "p.json", "--learning-r=-1e-4"]  # an abbreviation argparse accepts
    # an option name, a switch's neighbour and anything after "--" stay as they are
    for argv in (["plan", "gpt2", "--budget", "-h"], ["plan", "gpt2", "--budget", "--gpu"],
                 ["plan", "gpt2", "--lora", "-h"], ["run", "--", "--seed", "-1"]):
        assert attach_dash_values(parser, argv) == argv
    _, options = parse(["run", "p.json", "--text-field", "-x"])
    assert options.text_field == "-x"


def test_the_cli_and_the_package_start_without_torch():
    # `memtune --help` and `memtune models` in a fraction of a second: torch (~0.8 s to import) waits for a
    # command that traces or trains (issue 17), and `import memtune` imports its public names on first use.
    import subprocess
    import sys

    code = ("import sys, memtune, memtune.cli; memtune.TrainConfig, memtune.parse_bytes; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_several_bad_options_are_listed_one_per_line(capsys):
    code = main(["fit", "gpt2", "--budget", "6GiB", "--loss", "chunked", "--no-chunked-loss",
                 "--offload", "parameters", "--no-offload"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == "error: invalid options:"
    assert lines[1].startswith("  - --loss chunked contradicts --no-chunked-loss")
    assert lines[2] == "  - --offload parameters contradicts --no-offload: keep one"


def test_a_flag_is_never_read_as_the_prefix_of_another(capsys):
    """`fit --out X` is no `--output-dir X` (argparse's abbreviations are off): plan has --out, fit has --plan-out."""
    assert main(["fit", "gpt2", "--budget", "4GiB", "--out", "x"]) == 2
    assert "unrecognized arguments: --out x" in capsys.readouterr().err


def test_plan_explain_adds_the_what_if_table_and_needs_a_budget(capsys):
    args = ["plan", "gpt2", "--seq-len", "128", "--batch-size", "4", "--trace-device", "cpu"]
    code, out, err = run([*args, "--budget", "16GiB", "--explain"], capsys)
    assert code == 0
    assert "what if: this configuration with one thing changed" in out and "explained in" in out
    code, out, err = run([*args, "--budget", "16GiB", "--explain", "--json"], capsys)
    document = json.loads(out)
    assert document["alternatives"] and document["explain_seconds"] > 0
    assert {alternative["change"] for alternative in document["alternatives"]}
    code, out, err = run([*args, "--budget", "16GiB", "--json"], capsys)  # off by default
    assert json.loads(out)["alternatives"] == [] and json.loads(out)["explain_seconds"] is None
    code, out, err = run([*args, "--explain"], capsys)
    assert code == 2 and "--explain compares each change against a budget" in err
