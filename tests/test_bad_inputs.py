"""Bad input never ends in a traceback: every case exits 2 (UsageError) with what was wrong, the value seen
and the fix, before any tracing or training starts (issue 12's list, plus what a fresh-user trial found).

Issue 12 asks for >= 60 distinct bad inputs across plan/fit/run/models/probe and the API. Count (2026-11-30):
one per distinct wrong value, flag, file or API argument whose test asserts exit 2 (or UsageError from the
API) and the message; the same input under two commands, or a repeat of an input another file tests, once.
- tests/test_bad_inputs.py: 76 (command lines: 17 + 27 + 2 refused before the search + 1 read-only
  --plan-out + 1 --trace-device cuda without a GPU; API: 12 + 14 + 2 for estimate)
- tests/test_run_inputs.py: 34 (plan files 14, plan path a directory / missing 3, run options 10, output
  directory a file / under a file / read-only / the default one 4, run_plan's argument types 3)
- tests/test_cli_models.py: 13 (config.json cases 10, under plan and fit; a missing directory; an unknown
  name; custom code through auto_fit)
- tests/test_cli.py: 13 not counted above (--budget 24 / 24 parsecs / lots, --gpu GTX-1, --batch-size 6 with
  --micro-batch-size 4, --precision fp8, --micro-batch-size 0, --loss chunked with --no-chunked-loss,
  --budget with --gpu, --margin 2G, --lora with --no-lora, --seq-len 0, --strategy ddp on one GPU)
- tests/test_runner.py: 5 bad --data files (missing, empty, no such field, a line that is not JSON, a
  number as text)
Total: 141 (plan, fit, run, models, probe and the API all among them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import memtune
from memtune.cli import main
from memtune.config import GIB, Adapter, Policy, TrainConfig, parse_bytes
from memtune.errors import UsageError
from memtune.plan import Plan
from memtune.run.runner import run_plan
from memtune.run.stepdown import step_down_ladder
from memtune.search.ladder import candidate_space


@pytest.mark.parametrize("args,message", [
    (["plan", "gpt2", "--budget", "0.4B"], "must be positive (at least 1 byte)"),
    (["plan", "gpt2", "--budget", "1B"], "leaves nothing of the budget"),
    (["fit", "gpt2", "--budget", "6GiB", "--margin", "10GiB"], "the margin 10.00 GiB leaves nothing of the budget"),
    (["plan", "gpt2", "--seq-len", "4096"], "--seq-len 4096 is longer than the model allows"),
    (["fit", "gpt2", "--seq-len", "100000000", "--budget", "6GiB"], "--seq-len 100000000 is longer"),
    (["plan", "gpt2", "--lora", "--lora-rank", "-3"], "rank must be a positive integer, got -3"),
    (["plan", "gpt2", "--lora", "--lora-rank", "0"], "rank must be a positive integer, got 0"),
    (["plan", "gpt2", "--lora", "--lora-targets", ","], "target_modules must be"),
    (["fit", "gpt2", "--budget", "6GiB", "--prefix", "--no-lora"], "--prefix contradicts --no-lora"),
    (["fit", "gpt2", "--budget", "6GiB", "--prefix", "--checkpointing", "on"], "peft refuses prefix tuning"),
    (["fit", "gpt2", "--budget", "6GiB", "--offload", "parameters", "--no-offload"], "contradicts --no-offload"),
    (["plan", "gpt2", "--lora", "--lora-targets", "q_proj,v_proj"], "match no module of this gpt2 model"),
    (["fit", "gpt2", "--budget", "6GiB", "--lora", "--lora-targets", "q_proj"], "its weight matrices are c_attn"),
    # a value starting with '-' reaches memtune's check (argparse alone says "expected one argument")
    (["fit", "gpt2", "--seq-len", "512", "--batch-size", "8", "--budget", "-5GiB"],
     "--budget '-5GiB' is negative: give the memory to fit in, e.g. --budget 24GiB"),
    (["plan", "gpt2", "--budget", "-1GB"], "--budget '-1GB' is negative"),
    (["fit", "gpt2", "--budget", "6GiB", "--margin", "-1GiB"], "--margin '-1GiB' is negative: give a positive"),
    (["run", "plan.json", "--learning-rate", "-1e-4"], "--learning-rate must be a positive number, got -0.0001"),
])
def test_cli_bad_input_exits_2_with_the_value_and_the_fix(args, message, capsys):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    assert message in re.sub(r"\s+", " ", captured.err)
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("call,message", [
    (lambda: memtune.auto_fit("gpt2", batch_size="32", budget="6GiB"), "batch_size must be a positive integer"),
    (lambda: memtune.auto_fit("gpt2", seq_len=0, budget="6GiB"), "seq_len must be a positive integer"),
    (lambda: memtune.auto_fit("gpt2", budget="6GiB", gpu="A100-80GB"), "give budget or gpu, not both"),
    (lambda: memtune.auto_fit("gpt2", budget=-1), "positive number of bytes, got -1"),
    (lambda: memtune.auto_fit("gpt2", budget="6GiB", micro_batch_size=0), "micro_batch_size must be a positive"),
    (lambda: memtune.auto_fit("gpt2", budget="6GiB", margin_bytes=-6 * GIB), "margin must be a number of bytes >= 0"),
    (lambda: memtune.auto_fit("gpt2", seq_len=4096, budget="6GiB"), "longer than the model allows"),
    (lambda: TrainConfig(seq_len=8, loss="x", offload="bogus", optimizer="sgd"),
     "loss must be standard, chunked or liger"),
    (lambda: TrainConfig(seq_len=8, micro_batch_size=True), "micro_batch_size must be a positive integer"),
    (lambda: TrainConfig(seq_len=8, adapter=Adapter(kind="prefix"), gradient_checkpointing=True),
     "prefix tuning does not work with gradient checkpointing"),
    (lambda: Adapter(dropout=1.5), "dropout must be in [0, 1)"),
    (lambda: parse_bytes("0.4B"), "must be positive (at least 1 byte)"),
])
def test_api_bad_input_raises_a_usage_error(call, message):
    with pytest.raises(UsageError) as raised:
        call()
    assert message in str(raised.value)


def test_the_search_and_the_guard_never_pair_prefix_tuning_with_checkpointing():
    prefix = Adapter(kind="prefix")
    configs = candidate_space(128, 4, Policy(adapter=prefix, use_adapter=True), with_adapter=True)
    assert configs and all(not config.gradient_checkpointing for config in configs)
    plan = TrainConfig(seq_len=128, micro_batch_size=4, adapter=prefix)
    ladder = step_down_ladder(plan, loader_micro_batch=4, chunked_loss=True)
    assert [config.micro_batch_size for config in ladder] == [2, 1]
    assert all(not config.gradient_checkpointing for config in ladder)


def test_a_card_without_bf16_is_planned_without_it(capsys, tmp_path):
    code = main(["fit", "gpt2", "--seq-len", "128", "--batch-size", "4", "--gpu", "T4-16GB", "--trace-device", "cpu",
                 "--no-verify", "--plan-out", str(tmp_path / "plan.json"), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["search"]["chosen"]["config"]["amp"] != "bf16"
    assert all(c["config"]["amp"] != "bf16" and c["config"]["weights_dtype"] != "bf16"
               for c in document["search"]["candidates"])


def test_an_fsdp_estimate_gives_the_users_excepthook_back():
    import sys

    from tests.models import tiny_llama

    before = sys.excepthook
    memtune.estimate(tiny_llama(), TrainConfig(seq_len=32, num_gpus=2), device="cpu")
    assert sys.excepthook is before  # torch's init_process_group had put its "[rank0]: " hook there


def test_training_arguments_of_a_bf16_plan_build_on_a_machine_without_cuda(tmp_path):
    import torch

    from memtune.plan import Plan

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    plan = Plan(model="gpt2", train_config=TrainConfig(seq_len=128, amp="bf16"), budget_bytes=8 * GIB)
    arguments = plan.training_arguments(output_dir=str(tmp_path))  # the README snippet, no use_cpu given
    assert arguments.bf16 and arguments.use_cpu


def test_a_fake_cuda_trace_without_a_gpu_is_refused_not_aborted(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where torch sees no GPU")
    code = main(["plan", "gpt2", "--trace-device", "cuda"])
    assert code == 2 and "--trace-device cuda needs a CUDA GPU" in re.sub(r"\s+", " ", capsys.readouterr().err)


@pytest.mark.parametrize("args,message", [
    (["fit", "gpt2", "--budget", "6GiB", "--data", "train.jsonl", "--max-steps", "3"],
     "--max-steps only applies with --run"),  # --data alone plans for the data (tests/test_data_plan.py)
    (["fit", "gpt2", "--budget", "6GiB", "--run", "--data", "missing.jsonl"], "--data 'missing.jsonl' does not exist"),
])
def test_fit_checks_its_run_options_before_the_search(args, message, capsys):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2 and message in re.sub(r"\s+", " ", captured.err)
    assert "predicting" not in captured.err  # refused before any trace


def _bad_plan(**train_config) -> str:
    plan = Plan("no-such-model-anywhere", TrainConfig(seq_len=32), budget_bytes=GIB).to_dict()
    plan["train_config"].update(train_config)
    return json.dumps(plan)


@pytest.mark.parametrize("args,message", [
    (["fit", "gpt2", "--budget", "6GiB", "--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["plan", "gpt2", "--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
    (["plan", "gpt2", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["plan", "gpt2", "--strategy", "zero3"], "argument --strategy: invalid choice: 'zero3'"),
    (["plan", "gpt2", "--trace-device", "tpu"], "argument --trace-device: invalid choice: 'tpu'"),
    (["fit", "gpt2", "--budget", "6GiB", "--optim", "bogus"], "argument --optim: invalid choice: 'bogus'"),
    (["plan", "gpt2", "--trial-steps", "2"], "unrecognized arguments: --trial-steps 2"),  # a fit option
    (["fit", "gpt2", "--budget", "6GiB", "--margin", "200%"], "--margin: memory quantity '200%' is malformed"),
    (["fit", "gpt2", "--budget", "6GiB", "--trial-steps", "0"], "--trial-steps must be 1, 2 or 3, got 0"),
    (["fit", "gpt2", "--budget", "6GiB", "--min-micro-batch-size", "0"],
     "min_micro_batch_size must be a positive integer, got 0"),
    (["plan", "gpt2", "--lora", "--lora-rank", "abc"], "argument --lora-rank: invalid int value: 'abc'"),
    (["plan", "gpt2", "--gpus", "2", "--batch-size", "3"], "--batch-size 3 is not a multiple of --gpus 2"),
    (["plan", "gpt2", "--batch-size", "8", "--micro-batch-size", "16"],
     "--batch-size 8 is not a multiple of --micro-batch-size 16"),
    (["fit", "gpt2", "--budget", "6GiB", "--batch-size", "8", "--micro-batch-size", "3"],
     "micro-batch 3 x 1 GPU(s) does not divide the batch 8"),
    (["plan", "gpt2", "--offload", "parameters", "--strategy", "ddp"], "cannot offload 'parameters' to the CPU"),
    (["fit", "gpt2", "--budget", "6GiB", "--plan-out", "{tmp}/folder"],
     "--plan-out '{tmp}/folder' is a directory: give a file name in it"),
    (["fit", "gpt2", "--budget", "6GiB", "--report", "{tmp}/folder"], "--report '{tmp}/folder' is a directory"),
    (["fit", "gpt2", "--budget", "6GiB", "--plan-out", "{tmp}/notes.txt/plan.json"],
     "--plan-out '{tmp}/notes.txt/plan.json' cannot be created: '{tmp}/notes.txt' is a file"),
    (["fit", "gpt2", "--budget", "6GiB", "--run", "--output-dir", "{tmp}/notes.txt"], "is a file, not a directory"),
    (["fit", "gpt2", "--budget", "6GiB", "--run", "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["run", "{tmp}/fancy.json"], "loss must be standard, chunked or liger, got 'fancy'"),
    (["run", "{tmp}/negative.json"], "seq_len must be a positive integer, got -1"),
    (["run", "{tmp}/fancy.json", "--max-steps", "abc"], "argument --max-steps: invalid int value: 'abc'"),
    (["run", "{tmp}/fancy.json", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "{tmp}/fancy.json", "--save-steps", "-5"], "--save-steps must be >= 1, got -5"),
    (["models", "--bogus"], "unrecognized arguments: --bogus"),
    (["probe", "--gpu", "0"], "unrecognized arguments: --gpu 0"),
])
def test_more_bad_command_lines_exit_2_before_any_work(args, message, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fancy.json").write_text(_bad_plan(loss="fancy"))
    (tmp_path / "negative.json").write_text(_bad_plan(seq_len=-1))
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in args])
    captured = capsys.readouterr()
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in re.sub(r"\s+", " ", captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
    assert "predicting" not in captured.err  # refused before any trace


def test_a_plan_out_in_a_read_only_place_exits_2_before_the_search(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for place in (locked, Path("/sys")):  # sysfs refuses new files even to root, whom chmod does not stop
        try:
            (place / "probe").touch()
        except OSError:
            pass
        else:
            (place / "probe").unlink()
            continue  # writable after all (root ignores chmod)
        code = main(["fit", "gpt2", "--budget", "6GiB", "--plan-out", str(place / "plan.json")])
        said = re.sub(r"\s+", " ", capsys.readouterr().err)
        assert code == 2 and f"--plan-out '{place / 'plan.json'}' is not writable" in said
        return
    pytest.skip("no read-only folder on this machine")


@pytest.mark.parametrize("call,message", [
    (lambda: memtune.auto_fit(123, budget="6GiB"), "auto_fit needs a model name, a local directory or a transformers"),
    (lambda: memtune.auto_fit("gpt2", budget="lots"), "memory quantity 'lots' is malformed"),
    (lambda: memtune.auto_fit("gpt2", gpu="Z9000"), "unknown gpu 'Z9000'"),
    (lambda: memtune.auto_fit("gpt2", budget=True), "budget must be a quantity such as '24GiB'"),
    (lambda: memtune.auto_fit("gpt2", budget="6GiB", precision="fp8"), "precision 'fp8' is unknown"),
    (lambda: memtune.auto_fit("", budget="6GiB"), "MODEL is empty"),
    (lambda: TrainConfig(seq_len=-1), "seq_len must be a positive integer, got -1"),
    (lambda: TrainConfig(seq_len=8, optimizer="sgd"), "optimizer must be one of adamw_torch_fused, adamw_torch"),
    (lambda: TrainConfig(seq_len=8, offload="bogus"), "offload must be none, optimizer or parameters, got 'bogus'"),
    (lambda: TrainConfig(seq_len=8, amp="fp8"), "amp must be none, bf16 or fp16, got 'fp8'"),
    (lambda: TrainConfig(seq_len=8, grad_accum_steps=0), "grad_accum_steps must be a positive integer, got 0"),
    (lambda: Adapter(rank=0), "rank must be a positive integer, got 0"),
    (lambda: Plan.load("no-such-plan.json"), "plan file 'no-such-plan.json' does not exist"),
    (lambda: run_plan(Plan("gpt2", TrainConfig(seq_len=32), budget_bytes=GIB), bogus=1),
     "run_plan got unknown options ['bogus']"),
])
def test_more_bad_api_arguments_raise_a_usage_error(call, message):
    with pytest.raises(UsageError) as raised:
        call()
    assert message in str(raised.value)


@pytest.mark.parametrize("keywords, said, flag", [
    ({"optimizer": "adamw_bnb_8bit"}, 'or choose optimizer="adamw_torch_fused"', "--optim"),  # no bitsandbytes
    ({"seq_len": 4096}, "seq_len=4096 is longer than the model allows (max_position_embeddings = 1024): use "
     "seq_len=1024 or less",
     "--seq-len"),
    ({"optimizer": "adamw_torch_fused", "allow_8bit_optimizer": False, "quantized_base": 4, "use_adapter": False},
     "quantized_base=4 trains LoRA on a quantised base, which use_adapter=False forbids", "--no-lora"),
])
def test_auto_fit_names_its_keywords_where_the_cli_names_flags(keywords, said, flag, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(UsageError) as raised:
        memtune.auto_fit("gpt2", **({"seq_len": 64, "batch_size": 1, "budget": "8GiB", "verify": False} | keywords))
    message = re.sub(r"\s+", " ", str(raised.value))
    assert said in message and flag not in message and " --" not in message


@pytest.mark.parametrize("keywords, said", [
    ({"gradient_checkpointing": "auto"}, "(in Python: None, True, False or an int), got 'auto'"),
    ({"gradient_checkpointing": "on"}, "got 'on'"),
    ({"adapter": "prefix"}, 'adapter must be an Adapter, e.g. Adapter(kind="prefix")'),
])
def test_auto_fit_refuses_policy_values_of_the_wrong_type_before_reading_them(keywords, said):
    # the fresh-user trial: these raised TypeError / AttributeError from the model checks that read the policy
    with pytest.raises(UsageError) as raised:
        memtune.auto_fit("gpt2", **({"seq_len": 64, "batch_size": 1, "budget": "8GiB", "verify": False} | keywords))
    assert said in str(raised.value)


@pytest.mark.parametrize("call,message", [
    (lambda: memtune.estimate("gpt2", TrainConfig(seq_len=128)), "estimate needs a transformers config"),
    (lambda: memtune.estimate(memtune.resolve("gpt2").config, TrainConfig(seq_len=128), device="tpu"),
     "trace device must be cpu or cuda, got 'tpu'"),
    (lambda: memtune.estimate(memtune.resolve("gpt2").config, "x"),
     "estimate needs a memtune TrainConfig as train_config"),
])
def test_the_public_estimate_refuses_what_it_cannot_trace(call, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        call()


def test_plan_refuses_lora_shape_without_an_adapter_and_reports_a_bad_rank_once(capsys):
    """`plan --lora-rank 8` without --lora planned full fine-tuning silently; `--lora --lora-rank 0` also blamed
    the alpha derived from the rank."""
    from memtune.cli import main

    assert main(["plan", "gpt2", "--lora-rank", "8"]) == 2
    assert "--lora-rank shapes the LoRA adapter, and no adapter is planned: add --lora" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--lora", "--lora-rank", "0"]) == 2
    error = capsys.readouterr().err
    assert "rank must be a positive integer, got 0" in error and "alpha" not in error
