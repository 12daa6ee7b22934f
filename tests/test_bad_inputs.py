"""Bad input never ends in a traceback: every case exits 2 (UsageError) with what was wrong, the value seen
and the fix, before any tracing or training starts (issue 12's list, plus what a fresh-user trial found)."""

from __future__ import annotations

import json
import re

import pytest

import memtune
from memtune.cli import main
from memtune.config import GIB, Adapter, Policy, TrainConfig, parse_bytes
from memtune.errors import UsageError
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
    (lambda: TrainConfig(seq_len=8, loss="x", offload="bogus", optimizer="sgd"), "loss must be standard or chunked"),
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
    (["fit", "gpt2", "--budget", "6GiB", "--data", "missing.jsonl", "--max-steps", "3"],
     "--data, --max-steps only apply with --run"),
    (["fit", "gpt2", "--budget", "6GiB", "--run", "--data", "missing.jsonl"], "--data 'missing.jsonl' does not exist"),
])
def test_fit_checks_its_run_options_before_the_search(args, message, capsys):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2 and message in re.sub(r"\s+", " ", captured.err)
    assert "predicting" not in captured.err  # refused before any trace


@pytest.mark.parametrize("call,message", [
    (lambda: memtune.estimate("gpt2", TrainConfig(seq_len=128)), "estimate needs a transformers config"),
    (lambda: memtune.estimate(memtune.resolve("gpt2").config, TrainConfig(seq_len=128), device="tpu"),
     "trace device must be cpu or cuda, got 'tpu'"),
])
def test_the_public_estimate_refuses_what_it_cannot_trace(call, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        call()
