"""Trainer's evaluation mid-training: the traced eval step, its peak, the eval batch chosen, the TrainingArguments
and the command line (memtune.predict.eval_step / eval_peak / evaluation, plan.evaluation_arguments)."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from memtune.cli import main
from memtune.config import GIB, TrainConfig
from memtune.errors import NothingFitsError, UsageError
from memtune.options import EVAL_BYTES_PER_TOKEN, EvalOptions
from memtune.plan import Plan, evaluation_arguments
from memtune.predict import single
from memtune.predict.estimate import estimate
from memtune.predict.eval_peak import eval_start, replay
from memtune.predict.eval_step import EVAL_CATEGORY, KEPT_LOGITS_CATEGORY
from memtune.predict.evaluation import (
    choose_eval_batch,
    estimate_evaluation,
    eval_batch_candidates,
    with_eval_batch,
)
from memtune.predict.events import Category
from memtune.predict.trace import trace_step
from tests.models import tiny_llama

SEQ_LEN = 512
VOCAB = 256  # tiny_llama's
TRAIN = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, amp="bf16")


def with_eval(batch: int = 4, logits: str = "none", sequences: int | None = None, config: TrainConfig = TRAIN):
    return config.replace(eval_batch_size=batch, eval_logits=logits, eval_sequences=sequences)


# ---- TrainingArguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("logits", "loss_only", "accumulation"), [
    ("none", True, None), ("accumulate_cpu", False, 1), ("keep", False, None)])
def test_training_arguments_carry_the_eval_batch_and_what_is_kept(logits, loss_only, accumulation, tmp_path):
    plan = Plan(model="gpt2", train_config=with_eval(batch=16, logits=logits, sequences=64), budget_bytes=24 * GIB)
    arguments = plan.training_arguments(output_dir=str(tmp_path), use_cpu=True)
    assert arguments.per_device_eval_batch_size == 16
    assert arguments.prediction_loss_only is loss_only
    assert arguments.eval_accumulation_steps == accumulation


def test_without_evaluation_the_eval_batch_is_the_micro_batch_not_trainers_8(tmp_path):
    plan = Plan(model="gpt2", train_config=TrainConfig(seq_len=128, micro_batch_size=2), budget_bytes=24 * GIB)
    arguments = plan.training_arguments(output_dir=str(tmp_path), use_cpu=True)
    assert arguments.per_device_eval_batch_size == 2
    assert evaluation_arguments(TrainConfig(seq_len=128, micro_batch_size=2)) == {"per_device_eval_batch_size": 2}


# ---- the traced eval step ---------------------------------------------------------------------------------------


def test_the_eval_steps_forward_holds_far_less_than_the_training_steps_at_the_same_batch():
    config = tiny_llama(4)
    train = estimate(config, TRAIN, device="cpu")
    evaluation = estimate(config, with_eval(batch=TRAIN.micro_batch_size), device="cpu").evaluation
    assert evaluation is not None
    step_bytes = sum(train.breakdown.get(name, 0) for name in ("activations", "logits", "temporaries"))
    assert 0 < evaluation.breakdown[EVAL_CATEGORY] < step_bytes / 4
    # training's state is alive while it evaluates, its gradients are not
    assert evaluation.breakdown["weights"] == train.breakdown["weights"]
    assert evaluation.breakdown["optimizer"] == train.breakdown["optimizer"]
    assert "gradients" not in evaluation.breakdown


def test_logits_kept_grow_with_the_eval_set_and_not_without_keep():
    config = tiny_llama(4)
    kept = {}
    for sequences in (16, 32, 64):
        found = estimate_evaluation(config, with_eval(logits="keep", sequences=sequences), device="cpu")
        kept[sequences] = found.breakdown[KEPT_LOGITS_CATEGORY]
        fp32_logits = sequences * SEQ_LEN * VOCAB * 4  # fp32 after accelerate's convert_outputs_to_fp32
        # the containers' last concatenation holds the old and the new tensor: between 1x and 2x the logits
        assert fp32_logits <= kept[sequences] <= 2 * fp32_logits
    assert kept[64] - kept[32] == pytest.approx(2 * (kept[32] - kept[16]), rel=0.01)
    for logits in ("none", "accumulate_cpu"):
        small = estimate_evaluation(config, with_eval(logits=logits, sequences=16), device="cpu")
        large = estimate_evaluation(config, with_eval(logits=logits, sequences=64), device="cpu")
        assert small.peak_allocated_bytes == large.peak_allocated_bytes
        assert small.breakdown.get(KEPT_LOGITS_CATEGORY, 0) < SEQ_LEN * VOCAB * 4


def test_no_gradient_or_optimizer_storage_is_made_while_it_evaluates():
    config = tiny_llama(3)
    trace = trace_step(config, with_eval(logits="accumulate_cpu", sequences=16), device="cpu")
    first = trace.eval_first_storage
    assert first is not None
    made = [event for event in trace.events[eval_start(trace.events, first):] if event.kind == "alloc"]
    assert made and {trace.categories[event.source] for event in made} <= {EVAL_CATEGORY, KEPT_LOGITS_CATEGORY}
    training = {trace.categories[event.source] for event in trace.events if event.kind == "alloc"
                and event.source < first}
    assert {Category.GRADIENTS, Category.OPTIMIZER} <= training  # the same trace's training steps do make them


def test_the_eval_trace_extended_to_full_depth_matches_the_trace_of_every_layer():
    config = tiny_llama(8)
    train_config = with_eval(batch=8, logits="keep", sequences=40,
                             config=TRAIN.replace(gradient_checkpointing=True))
    trace, events = single.full_depth_events(config, train_config, "cpu")
    assert trace.traced_layers < 8
    full = trace_step(config, train_config, device="cpu")
    extended = replay(events, eval_start(events, trace.eval_first_storage))
    direct = replay(full.events, eval_start(full.events, full.eval_first_storage))
    assert extended == direct


def test_the_runs_peak_is_the_larger_of_training_and_evaluation():
    config = tiny_llama(4)
    train = estimate(config, TRAIN, device="cpu")
    for logits, sequences in (("none", None), ("keep", 64)):
        run = estimate(config, with_eval(logits=logits, sequences=sequences), device="cpu")
        assert run.evaluation is not None
        assert run.evaluation.train_peak_reserved_bytes == train.peak_reserved_bytes
        assert run.peak_reserved_bytes == max(train.peak_reserved_bytes, run.evaluation.peak_reserved_bytes)
    assert run.evaluation.peak_reserved_bytes > train.peak_reserved_bytes  # 64 sequences' logits kept: eval's peak


@pytest.mark.gpu
def test_both_trace_paths_agree_on_the_eval_peak():
    config = tiny_llama(4)
    for logits, sequences in (("none", None), ("keep", 32)):
        train_config = with_eval(batch=8, logits=logits, sequences=sequences)
        on_cpu = estimate_evaluation(config, train_config, device="cpu")
        on_cuda = estimate_evaluation(config, train_config, device="cuda")
        assert on_cuda.trace_device == "cuda"
        assert on_cuda.peak_allocated_bytes == pytest.approx(on_cpu.peak_allocated_bytes, rel=0.01)
        assert on_cuda.peak_reserved_bytes == pytest.approx(on_cpu.peak_reserved_bytes, rel=0.02)


# ---- the eval batch chosen ------------------------------------------------------------------------------------


def test_eval_batch_candidates_are_powers_of_two_up_to_eight_micro_batches_and_the_eval_set():
    assert eval_batch_candidates(1) == [8, 4, 2, 1]
    assert eval_batch_candidates(3) == [24, 16, 8, 4, 2, 1]
    assert eval_batch_candidates(4, eval_sequences=20) == [20, 16, 8, 4, 2, 1]
    assert eval_batch_candidates(4, eval_sequences=3) == [3, 2, 1]


def test_the_auto_eval_batch_fits_and_the_next_larger_does_not():
    config = tiny_llama(4)
    # logits not kept: the eval batch decides the eval step's memory (kept logits would be the whole set's at any batch)
    train_config = with_eval(batch=1, logits="none", sequences=256, config=TRAIN.replace(micro_batch_size=2))
    largest = estimate_evaluation(config, train_config.replace(eval_batch_size=16), device="cpu")
    smallest = estimate_evaluation(config, train_config.replace(eval_batch_size=1), device="cpu")
    usable = (largest.total_bytes + smallest.total_bytes) // 2  # between the two: some batch fits, not all
    chosen = choose_eval_batch(config, train_config, usable, device="cpu")
    assert chosen is not None and chosen.fits
    batch = chosen.config.eval_batch_size
    assert batch is not None and 1 <= batch < 16
    larger = [size for size in eval_batch_candidates(2, 256) if size > batch]
    assert not estimate_evaluation(config, train_config.replace(eval_batch_size=min(larger)), device="cpu",
                                   usable_bytes=usable).fits
    assert with_eval_batch(config, train_config, usable, device="cpu").eval_batch_size == batch


def test_when_no_eval_batch_fits_it_says_so_with_exit_code_3():
    config = tiny_llama(2)
    train_config = with_eval(batch=1, logits="keep", sequences=4096)
    with pytest.raises(NothingFitsError) as raised:
        with_eval_batch(config, train_config, 2 * GIB, device="cpu")
    assert raised.value.exit_code == 3
    assert "--eval-logits accumulate_cpu" in str(raised.value)


def test_a_config_refuses_evaluation_it_cannot_plan():
    with pytest.raises(UsageError, match="eval_batch_size must be a positive integer"):
        TRAIN.replace(eval_batch_size=0)
    with pytest.raises(UsageError, match="eval_logits must be one of"):
        TRAIN.replace(eval_batch_size=2, eval_logits="all")
    with pytest.raises(UsageError, match="evaluation is planned on one GPU or with DDP only"):
        TRAIN.replace(eval_batch_size=2, num_gpus=2)
    assert TrainConfig.from_json(with_eval(logits="keep", sequences=8).to_json()).eval_sequences == 8


# ---- options and the command line ----------------------------------------------------------------------------


def test_eval_sequences_are_counted_from_the_eval_files_size(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("x" * (EVAL_BYTES_PER_TOKEN * 128 * 10 + 1))
    options = EvalOptions(eval_batch_size=4, eval_data=str(data), eval_logits="keep")
    assert options.eval_sequences(128) == 11
    assert options.fields(128, 2) == {"eval_batch_size": 4, "eval_logits": "keep", "eval_sequences": 11}
    assert EvalOptions().fields(128, 2) == {}


@pytest.mark.parametrize(("args", "message"), [
    (["--eval-batch-size", "lots"], "expected auto or a number of sequences, got 'lots'"),
    (["--eval-batch-size", "0"], "an eval batch must be at least 1 sequence, got 0"),
    (["--eval-batch-size", "auto"], "--eval-batch-size auto chooses the eval batch for a budget: add --budget"),
    (["--eval-batch-size", "4", "--eval-data", "no/such/file.jsonl"], "--eval-data 'no/such/file.jsonl' does not"),
    (["--eval-logits", "keep"], "--eval-logits only applies with --eval-batch-size"),
])
def test_bad_eval_options_exit_2_with_the_value_and_the_fix(args, message, capsys):
    code = main(["plan", "gpt2", "--seq-len", "64", "--trace-device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_plan_with_evaluation_reports_the_eval_batch_and_peak_on_one_line(capsys):
    code = main(["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--budget", "16GiB", "--trace-device", "cpu",
                 "--eval-batch-size", "auto", "--eval-logits", "keep", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    evaluation = document["estimate"]["evaluation"]
    assert evaluation["eval_batch_size"] == 16 and evaluation["fits"] is None  # 8 x the micro-batch of 2
    assert document["estimate"]["peak_reserved_bytes"] >= evaluation["peak_reserved_bytes"]
    from tests.test_report import SCHEMA_DOC, documented_types, schema_errors

    assert schema_errors(document, "PlanDocument", documented_types(SCHEMA_DOC.read_text())) == []

    from memtune.fit import plan_configuration
    from memtune.report import terminal
    from memtune.sources import resolve, source_parameters

    source = resolve("gpt2")
    result = plan_configuration(source, source_parameters(source), TrainConfig(
        seq_len=128, micro_batch_size=2, eval_batch_size=4, eval_logits="keep", eval_sequences=8), 16 * GIB,
        trace_device="cpu")
    console = Console(file=StringIO(), width=200)
    terminal.render_plan(result, console)
    lines = [line for line in console.file.getvalue().splitlines() if line.startswith("evaluation:")]
    assert len(lines) == 1
    assert "eval batch 4 (logits kept over 8 sequences), eval peak" in lines[0]


def test_the_help_says_the_auto_rule():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    shown = subprocess.run([sys.executable, "-m", "memtune", "plan", "--help"], capture_output=True, text=True,
                           cwd=root, check=True).stdout
    words = " ".join(shown.split())
    assert "--eval-batch-size auto|N" in words
    assert "auto: the largest of 1, 2, 4, ... and 8x the micro-batch" in words


def test_a_long_eval_set_starts_from_one_container_with_the_same_allocated_peak(monkeypatch):
    from memtune.predict import eval_step

    config = tiny_llama(3)
    train_config = with_eval(batch=2, logits="keep", sequences=12)  # 6 eval steps
    peaks = {}
    for traced in (6, 2):  # every step, then the last two on a container holding the first four steps' logits
        monkeypatch.setattr(eval_step, "MAX_TRACED_KEPT_STEPS", traced)
        trace = trace_step(config, train_config, device="cpu")
        peaks[traced] = replay(trace.events, eval_start(trace.events, trace.eval_first_storage))
    assert peaks[2].eval_allocated_bytes == peaks[6].eval_allocated_bytes
    # the six concatenations of growing size leave their segments cached: more reserved than one container
    assert peaks[6].eval_reserved_bytes >= peaks[2].eval_reserved_bytes


def test_the_logits_trainer_keeps_have_the_dtype_the_trace_keeps(tmp_path):
    """accelerate's convert_outputs_to_fp32 makes them fp32 under bf16 autocast (a bf16 LoRA base here), which the
    trace's containers assume (`eval_step.logits_dtype`): Trainer's own evaluation on the CPU says which dtype."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from memtune.config import Adapter
    from memtune.predict.eval_step import logits_dtype

    train_config = TrainConfig(seq_len=32, weights_dtype="bf16", amp="bf16", adapter=Adapter(), eval_batch_size=2,
                               eval_logits="keep", eval_sequences=4)
    plan = Plan("tiny", train_config, budget_bytes=GIB)
    model = plan.prepare(AutoModelForCausalLM.from_config(tiny_llama(2), dtype=torch.bfloat16))
    seen = []

    class Recording(Trainer):
        def prediction_step(self, *args, **kwargs):
            output = super().prediction_step(*args, **kwargs)
            seen.append(output[1].dtype)
            return output

    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()}
            for ids in (torch.randint(0, VOCAB, (32,), generator=generator) for _ in range(4))]
    args = plan.training_arguments(output_dir=str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=2,
                                   save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    Recording(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=lambda p: {}).train()
    assert seen == [logits_dtype(model, train_config)] * 2 == [torch.float32] * 2


def test_fit_adds_evaluation_to_the_chosen_plan(tmp_path, capsys):
    """`fit --eval-batch-size N --eval-logits accumulate_cpu`: the search plans training; evaluation is then predicted
    for the chosen configuration and saved in the plan (its TrainingArguments, the reproduce line, the snippet)."""
    plan_path = tmp_path / "plan.json"
    code = main(["fit", "gpt2", "--seq-len", "128", "--batch-size", "4", "--budget", "8GiB", "--trace-device", "cpu",
                 "--eval-batch-size", "4", "--eval-logits", "accumulate_cpu", "--plan-out", str(plan_path)])
    captured = capsys.readouterr()
    assert code == 0
    plan = Plan.load(plan_path)
    assert (plan.train_config.eval_batch_size, plan.train_config.eval_logits) == (4, "accumulate_cpu")
    arguments = plan.training_arguments(output_dir=str(tmp_path / "out"))
    assert (arguments.per_device_eval_batch_size, arguments.eval_accumulation_steps) == (4, 1)
    assert "--eval-batch-size 4 --eval-logits accumulate_cpu" in captured.out
    assert "per_device_eval_batch_size=4" in captured.out
    assert "evaluation: eval batch 4" in " ".join(captured.err.split())


def test_fit_says_when_the_eval_batch_given_does_not_fit_beside_the_chosen_plan():
    """`plan_evaluation` with an eval batch that does not fit: NothingFitsError (exit 3) naming the fixes."""
    from memtune.fit import plan_evaluation

    with pytest.raises(NothingFitsError, match="--eval-batch-size auto"):
        plan_evaluation(tiny_llama(), TRAIN, {"eval_batch_size": 64, "eval_logits": "keep", "eval_sequences": 64},
                        64 * 2**20, 0, device="cpu")
