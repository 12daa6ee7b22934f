"""memtune run on CPU: a 2-layer llama saved like a hub model, the tiny corpus, a few optimizer steps.
Also the data reader's errors and the Plan adapters to Hugging Face objects."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from memtune.cli import cmd_run, parse
from memtune.config import Adapter, TrainConfig
from memtune.errors import UsageError
from memtune.options import RunOptions
from memtune.plan import Plan
from memtune.run import data as data_module
from memtune.run.runner import RunSummary, run_plan

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.jsonl"
SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make_plan(model: Path | str, **changes) -> Plan:
    config = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2, grad_accum_steps=2).replace(**changes)
    return Plan(str(model), config, budget_bytes=1 << 30)


def run(plan: Plan, output: Path, **options) -> RunSummary:
    options = {"data": CORPUS, "learning_rate": 3e-3, "device": "cpu", "progress": False, **options}
    return run_plan(plan, output_dir=output, **options)


# ---- runs ----------------------------------------------------------------------------------------


def test_run_lowers_the_loss_and_saves_a_model_that_reloads(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    summary = run(make_plan(model_dir), output, max_steps=12, learning_rate=1e-2)

    assert summary.status == "completed" and summary.global_step == 12
    assert [step for step, _ in summary.loss_curve] == list(range(1, 13))
    first, last = summary.loss_curve[0][1], summary.loss_curve[-1][1]
    assert first == pytest.approx(7.05, abs=0.3)  # ln(1156) = 7.05: random weights
    assert last < first - 1.0
    assert summary.tokens_per_step == 2 * 2 * SEQ_LEN and summary.tokens_per_second > 0
    assert summary.model_origin == f"weights from {model_dir}"
    assert summary.tokenizer_origin == f"tokenizer of {model_dir}"
    assert summary.peak_reserved_bytes is None  # CPU
    assert summary.memory_bands[-1]["last_step"] == 12

    saved = json.loads((output / "run_summary.json").read_text())
    assert saved["loss_curve"] == summary.loss_curve and saved["plan"]["model"] == str(model_dir)
    assert Plan.load(output / "plan.json").train_config == make_plan(model_dir).train_config
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["Anna walked to the market."], return_tensors="pt")
    trained_loss = reloaded(**batch, labels=batch["input_ids"]).loss.item()
    untrained_loss = AutoModelForCausalLM.from_pretrained(model_dir)(**batch, labels=batch["input_ids"]).loss.item()
    assert trained_loss < untrained_loss - 1.0


class CheckpointingFlags(TrainerCallback):
    """Each decoder layer's `gradient_checkpointing` flag at the end of every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[list[bool]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        self.seen.append([layer.gradient_checkpointing for layer in layers])


def test_a_plan_checkpointing_the_first_layer_keeps_it_so_through_the_trainer(model_dir: Path, tmp_path: Path) -> None:
    """Trainer enables checkpointing of every layer when TrainingArguments ask for it; a plan of some layers
    leaves that off and Plan.prepare checkpoints its layers (the 2-layer model: the first only)."""
    flags = CheckpointingFlags()
    plan = make_plan(model_dir, gradient_checkpointing=True, checkpoint_layers=1)
    summary = run(plan, tmp_path / "run", max_steps=2, callbacks=[flags])
    assert summary.status == "completed" and flags.seen == [[True, False], [True, False]]


def test_lora_run_saves_an_adapter_that_reloads(model_dir: Path, tmp_path: Path) -> None:
    import peft

    output = tmp_path / "lora"
    plan = make_plan(model_dir, adapter=Adapter(rank=4, alpha=8), amp="bf16", gradient_checkpointing=True)
    summary = run(plan, output, max_steps=4)

    assert summary.status == "completed"
    assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output)
    trained = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
    assert trained and all(parameter.abs().sum() > 0 for parameter in trained)  # lora_B starts at zero


class InterruptAt(TrainerCallback):
    """Ctrl-C at the start of optimizer step `step` (1-based): a real SIGINT, or KeyboardInterrupt itself."""

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            if self.how == "signal":
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def uninterrupted(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunSummary:
    torch.set_num_threads(1)
    return run(make_plan(model_dir), tmp_path_factory.mktemp("reference") / "run", max_steps=7)


@pytest.mark.parametrize("how, saved_step", [("signal", 4), ("keyboard-interrupt", 3)])
def test_interrupt_then_resume_continues_at_the_same_step_with_the_same_losses(
    model_dir: Path, tmp_path: Path, uninterrupted: RunSummary, how: str, saved_step: int
) -> None:
    """A first Ctrl-C (SIGINT) finishes step 4 and saves it; a KeyboardInterrupt (the second Ctrl-C) at the
    start of step 4 saves step 3. Either way --resume runs the remaining steps once, on the same data."""
    plan = make_plan(model_dir)
    reference = uninterrupted

    output = tmp_path / "interrupted"
    first = run(plan, output, max_steps=7, callbacks=[InterruptAt(4, how)])
    assert first.status == "interrupted" and first.global_step == saved_step
    assert first.checkpoint == str(output / f"checkpoint-{saved_step}")
    assert not (output / "model.safetensors").exists()  # only the checkpoint: the run is not finished

    resumed = run(plan, output, max_steps=7, resume=True)
    assert resumed.status == "completed" and resumed.resumed_from_step == saved_step and resumed.global_step == 7
    assert [step for step, _ in resumed.loss_curve] == list(range(1, 8))
    torch.testing.assert_close([loss for _, loss in resumed.loss_curve],
                               [loss for _, loss in reference.loss_curve], rtol=1e-4, atol=1e-5)


# Runs `memtune run` with Trainer's RNG-state save (the last file before trainer_state.json) held at step 4:
# it writes SAVING_MARKER and sleeps until the test kills the process.
SLOW_SAVE = """
import sys, time
from pathlib import Path
from transformers import Trainer
from memtune.cli import main

original = Trainer._save_rng_state

def held_at_step_4(self, output_dir):
    original(self, output_dir)
    if self.state.global_step == 4:
        Path(sys.argv[1]).write_text(str(output_dir))
        time.sleep(300)

Trainer._save_rng_state = held_at_step_4
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_while_saving_leaves_no_checkpoint_and_resume_continues_from_the_last_complete_one(
    model_dir: Path, tmp_path: Path, uninterrupted: RunSummary
) -> None:
    """issue 12: a SIGKILL while checkpoint-40 was written left a folder without trainer_state.json, and --resume
    crashed with FileNotFoundError. Now the save goes to saving-checkpoint-N first; --resume takes the newest
    complete checkpoint, says so, and removes what was left (a legacy half-written checkpoint-N included)."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    plan_path = make_plan(model_dir).save(tmp_path / "plan.json")
    output, marker = tmp_path / "run", tmp_path / "saving"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                               os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(marker), "run", str(plan_path), "--data", str(CORPUS),
         "--output-dir", str(output), "--max-steps", "7", "--save-steps", "2", "--learning-rate", "3e-3"],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            process.kill()
            pytest.fail(f"the run never reached the save of step 4: {process.communicate()[1]}")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    assert Path(marker.read_text()) == output / "saving-checkpoint-4" / "checkpoint-4"
    assert not (output / "checkpoint-4").exists()  # nothing that looks like a checkpoint of step 4
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    legacy = output / "checkpoint-6"  # what a save before this fix left: weights, no trainer_state.json
    legacy.mkdir()
    shutil.copy(output / "checkpoint-2" / "model.safetensors", legacy)

    messages = io.StringIO()
    resumed = run_plan(make_plan(model_dir), data=CORPUS, output_dir=output, max_steps=7, learning_rate=3e-3,
                       resume=True, device="cpu", console=Console(file=messages, width=200))
    stderr = messages.getvalue()
    assert "resuming from checkpoint-2 (step 2)" in stderr
    assert "skipped checkpoint-6: incomplete (no trainer_state.json" in stderr
    assert "removed saving-checkpoint-4" in stderr
    assert resumed.status == "completed" and resumed.resumed_from_step == 2 and resumed.global_step == 7
    assert [step for step, _ in resumed.loss_curve] == list(range(3, 8))
    torch.testing.assert_close([loss for _, loss in resumed.loss_curve],
                               [loss for _, loss in uninterrupted.loss_curve[2:]], rtol=1e-4, atol=1e-5)
    assert sorted(path.name for path in output.glob("*checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert resumed.checkpoint == str(output / "checkpoint-7")
    assert (output / "checkpoint-6" / "trainer_state.json").is_file()


def test_resume_refuses_a_directory_whose_checkpoints_are_all_incomplete(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    (output / "checkpoint-40").mkdir(parents=True)
    (output / "checkpoint-40" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=r"holds no complete checkpoint \(checkpoint-40: no trainer_state.json\)"):
        run(make_plan(model_dir), output, max_steps=2, resume=True)
    with pytest.raises(UsageError, match=r"already holds checkpoints \(checkpoint-40\)"):
        run(make_plan(model_dir), output, max_steps=2)


def test_output_directory_with_checkpoints_needs_resume_and_resume_needs_a_checkpoint(
    model_dir: Path, tmp_path: Path
) -> None:
    plan = make_plan(model_dir)
    with pytest.raises(UsageError, match="holds no checkpoint-N folder"):
        run(plan, tmp_path / "empty", max_steps=2, resume=True)
    run(plan, tmp_path / "done", max_steps=2)
    with pytest.raises(UsageError, match="already holds checkpoints .*pass --resume"):
        run(plan, tmp_path / "done", max_steps=2)
    with pytest.raises(UsageError, match="trained with another plan"):
        run(make_plan(model_dir, micro_batch_size=1, grad_accum_steps=4), tmp_path / "done", max_steps=3, resume=True)


def test_catalog_model_starts_from_random_weights_with_the_sample_tokenizer(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memtune import sources

    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    monkeypatch.setattr(
        sources, "resolve", lambda model, **kwargs: sources.ModelSource(model, config, "catalog", hub_id="tiny/llama")
    )
    summary = run(make_plan("tiny-llama"), tmp_path / "catalog", max_steps=2, data=None)
    assert summary.model_origin.startswith("random initialisation (a catalog config)")
    assert any("random initialisation" in note for note in summary.notes)
    assert summary.tokenizer_origin.startswith("memtune's sample tokenizer")
    assert summary.data == str(data_module.SAMPLE_CORPUS_PATH)


def test_hub_model_loads_its_weights_and_tokenizer_with_from_pretrained(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub branch, offline: from_pretrained takes a directory where it takes a hub id."""
    from memtune import sources

    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    monkeypatch.setattr(
        sources, "resolve", lambda model, **kwargs: sources.ModelSource(model, config, "hub", hub_id=str(model_dir))
    )
    summary = run(make_plan("someone/tiny-llama"), tmp_path / "hub", max_steps=1)
    assert summary.model_origin == f"weights from the hub ({model_dir})" and not summary.notes
    assert summary.tokenizer_origin == f"tokenizer of {model_dir}"
    assert summary.loss_curve[0][1] == pytest.approx(7.05, abs=0.3)


def test_cmd_run_prints_a_summary_table(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan_path = make_plan(model_dir).save(tmp_path / "plan.json")
    command, options = parse(["run", str(plan_path), "--data", str(CORPUS), "--output-dir", str(tmp_path / "cli"),
                              "--max-steps", "2", "--learning-rate", "1e-3"])
    assert command == "run" and isinstance(options, RunOptions)
    out, err = io.StringIO(), io.StringIO()
    code = cmd_run(options, Console(file=out, width=120), Console(file=err, width=120))
    assert code == 0
    assert "memtune run: completed" in out.getvalue() and "2 / 2" in out.getvalue()
    assert "step 2/2  loss" in err.getvalue()  # plain progress lines: not a terminal
    assert capsys.readouterr().out == ""  # Trainer's own log printer is off: stdout carries results only


# ---- data ----------------------------------------------------------------------------------------


def test_packing_cuts_the_token_stream_into_equal_blocks(tmp_path: Path) -> None:
    tokenizer = data_module.sample_tokenizer()
    (tmp_path / "a.txt").write_text("one two three")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"body": "four five"}\n\n{"body": "six"}\n')
    (tmp_path / "c.json").write_text('[{"body": "seven"}, "eight nine"]')
    texts = data_module.read_texts(tmp_path, text_field="body")
    assert texts == ["one two three", "seven", "eight nine", "four five", "six"]  # a.txt, c.json, sub/b.jsonl

    dataset = data_module.build_dataset(tokenizer, 4, tmp_path, text_field="body")
    stream = data_module.tokenize(tokenizer, texts)
    assert stream.tolist().count(tokenizer.eos_token_id) == len(texts)
    assert len(dataset) == stream.numel() // 4
    assert torch.equal(dataset[1]["input_ids"], stream[4:8].long())
    assert torch.equal(dataset[1]["labels"], dataset[1]["input_ids"])


def test_sample_tokenizer_encodes_any_text_within_every_catalog_vocabulary() -> None:
    tokenizer = data_module.sample_tokenizer()
    text = "Grüße, 世界! tabs\tand emoji 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) < 32000  # the smallest vocabulary in the catalog is llama-2's 32000


@pytest.mark.parametrize("content, text_field, message", [
    (None, "text", "does not exist"),
    ("", "text", "holds no text"),
    ('{"prompt": "a", "completion": "b"}\n', "text", "has no field 'text' .*prompt.*pass --text-field completion"),
    ('{"text": "a"}\nnot json\n', "text", "line 2 of .* is not valid JSON"),
    ('{"text": 5}\n', "text", "field 'text' at line 1 .* is a int, not text"),
])
def test_bad_data_is_refused_with_the_value_seen_and_the_fix(tmp_path: Path, content, text_field, message) -> None:
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        data_module.read_texts(path, text_field)


def test_data_errors_for_directories_short_data_and_foreign_tokenizers(tmp_path: Path) -> None:
    tokenizer = data_module.sample_tokenizer()
    (tmp_path / "notes.md").write_text("not training data")
    with pytest.raises(UsageError, match="holds no .jsonl, .json or .txt files"):
        data_module.read_texts(tmp_path)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(UsageError, match="fewer than one sequence of seq_len=1024"):
        data_module.build_dataset(tokenizer, 1024, tmp_path / "short.txt")
    with pytest.raises(UsageError, match="vocabulary has 10 entries: the tokenizer does not belong to this model"):
        data_module.build_dataset(tokenizer, 2, tmp_path / "short.txt", vocab_size=10)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        data_module.read_texts(tmp_path / "binary.txt")


# ---- Plan adapters -------------------------------------------------------------------------------


def test_plan_adapters_build_the_hugging_face_objects(model_dir: Path, tmp_path: Path) -> None:
    import peft

    plan = make_plan(model_dir, micro_batch_size=4, grad_accum_steps=8, amp="bf16", gradient_checkpointing=True,
                     adapter=Adapter(rank=8, alpha=16, target_modules=("q_proj", "v_proj")))
    args = plan.training_arguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 8)
    assert args.bf16 and not args.fp16 and args.learning_rate == 1e-4 and args.report_to == []
    assert str(args.optim) in ("adamw_torch", "OptimizerNames.ADAMW_TORCH")
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert checkpointing and kwargs == {"use_reentrant": False}

    lora = plan.lora_config()
    assert isinstance(lora, peft.LoraConfig) and lora.r == 8 and set(lora.target_modules) == {"q_proj", "v_proj"}
    assert make_plan(model_dir).lora_config() is None

    model = plan.prepare(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    assert isinstance(model, peft.PeftModel)
    assert model.get_base_model().model.gradient_checkpointing and model.config.use_cache is False
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights, as the plan says
    guard = plan.oom_guard()
    assert guard.current == plan.train_config and guard.fallbacks == plan.fallbacks
    from memtune.run.guard import GuardedTrainer
    from memtune.run.runner import PlanTrainer

    trainer = plan.trainer(model=model, args=args)
    assert isinstance(trainer, GuardedTrainer) and trainer.oom_guard.trainer is trainer
    assert trainer.oom_guard.fallbacks == plan.fallbacks and issubclass(PlanTrainer, GuardedTrainer)


def test_a_plan_for_several_gpus_is_relaunched_under_accelerate(tmp_path, monkeypatch):
    from memtune.run.runner import relaunch_command

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = RunOptions(plan=str(tmp_path / "plan.json"), data="train.jsonl", output_dir=str(tmp_path / "out"),
                      max_steps=50)
    two_gpus = Plan(
        model="qwen2.5-0.5b",
        budget_bytes=80 << 30,
        train_config=TrainConfig(seq_len=1024, micro_batch_size=2, grad_accum_steps=4, amp="bf16", num_gpus=2),
    )
    command = relaunch_command(two_gpus, args, tmp_path / "out")
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    config_text = Path(command[4]).read_text()
    assert "num_processes: 2" in config_text and "FSDP" in config_text
    assert command[5:] == ["-m", "memtune", "run", args.plan, "--data", "train.jsonl", "--output-dir", args.output_dir,
                           "--text-field", "text", "--max-steps", "50", "--save-steps", "200", "--seed", "42"]
    one_gpu = Plan(model="qwen2.5-0.5b", budget_bytes=80 << 30, train_config=TrainConfig(seq_len=1024))
    assert relaunch_command(one_gpu, args, tmp_path / "out") is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # already under the launcher: run here
    assert relaunch_command(two_gpus, args, tmp_path / "out") is None


def test_run_plan_takes_run_options_or_their_fields_and_names_unknown_ones() -> None:
    from memtune.run.runner import run_options

    options = RunOptions(plan="plan.json", data="train.jsonl")
    assert run_options(options, {"max_steps": 5}) == RunOptions(plan="plan.json", data="train.jsonl", max_steps=5)
    assert run_options(None, {}) == RunOptions()
    with pytest.raises(UsageError, match=r"unknown options \['steps'\]"):
        run_options(None, {"steps": 5})
    with pytest.raises(UsageError, match="is a RunOptions"):
        run_options("train.jsonl", {})  # the old positional `data`


def test_run_sets_the_plans_allocator_mode_and_says_when_it_overrides_the_environment(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:False")
    summary = run(make_plan(model_dir, expandable_segments=True), tmp_path / "run", max_steps=1)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128,expandable_segments:True"
    assert any("said expandable_segments:false; the plan was predicted with expandable_segments:True" in note
               for note in summary.notes)


def test_a_one_step_run_says_its_speed_was_not_measured(model_dir: Path, tmp_path: Path) -> None:
    plan_path = make_plan(model_dir).save(tmp_path / "plan.json")
    _, options = parse(["run", str(plan_path), "--data", str(CORPUS), "--output-dir", str(tmp_path / "one"),
                        "--max-steps", "1"])
    out = io.StringIO()
    assert cmd_run(options, Console(file=out, width=120), Console(file=io.StringIO(), width=120)) == 0
    assert "not measured (the first step is not timed: run 2 or more)" in out.getvalue()


# ---- the chunked loss through Trainer --------------------------------------------------------------


@pytest.mark.parametrize("adapter", [None, Adapter(rank=4, target_modules=("q_proj", "v_proj"))], ids=["full", "lora"])
def test_a_chunked_plan_trains_as_the_standard_one(model_dir: Path, tmp_path: Path, adapter) -> None:
    """PlanTrainer with the chunked loss: Trainer's own compute_loss calls the model's chunked forward (Plan.prepare
    made it so) with `num_items_in_batch` over 2 accumulated micro-batches: the same loss curve as the standard
    loss, step by step (same seed, same data)."""
    curves = {}
    for loss in ("standard", "chunked"):
        summary = run(make_plan(model_dir, loss=loss, adapter=adapter), tmp_path / loss, max_steps=3)
        assert summary.status == "completed" and summary.final_train_config["loss"] == loss
        curves[loss] = summary.loss_curve
    assert [step for step, _ in curves["chunked"]] == [1, 2, 3]
    assert [value for _, value in curves["chunked"]] == pytest.approx([value for _, value in curves["standard"]],
                                                                      rel=1e-4)


def test_a_chunked_plan_is_not_refused_under_ddp_or_fsdp_launches(model_dir: Path, monkeypatch) -> None:
    from memtune.run.runner import check_run_inputs

    for strategy, environment in (("ddp", {"WORLD_SIZE": "2"}),
                                  ("fsdp", {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"})):
        plan = make_plan(model_dir, loss="chunked", num_gpus=2, strategy=strategy)
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            check_run_inputs(plan, RunOptions(data=str(CORPUS)))  # raises nothing


def test_plan_training_arguments_size_the_nvme_parameter_buffer_for_the_model(monkeypatch, tmp_path):
    """Plan.training_arguments writes the DeepSpeed JSON for the plan's own model (Plan.model_config): under NVMe
    parameter offload the swap buffer holds Llama-3.1-8B's 128256 x 4096 embedding, where DeepSpeed's default
    1e8 elements fails its assertion (run.launch.deepspeed_config); only the runner used to patch it."""
    from transformers import TrainingArguments

    from memtune import plan as plan_module
    from memtune.config import Zero
    from memtune.run import launch

    for module in (plan_module, launch):  # the JSON is built before DeepSpeed is imported: none is needed here
        monkeypatch.setattr(module, "require_deepspeed", lambda train_config: None)
    train_config = TrainConfig(seq_len=1024, amp="bf16", strategy="deepspeed", offload="parameters",
                               zero=Zero(offload_device="nvme", nvme_path=str(tmp_path)))
    plan = Plan("meta-llama/Llama-3.1-8B", train_config, budget_bytes=1 << 30)
    zero = plan._trainer_fields(TrainingArguments, {})["deepspeed"]["zero_optimization"]
    assert zero["offload_param"]["buffer_size"] == 128256 * 4096
    assert zero["reduce_bucket_size"] == 4096 * 4096  # a number for the model's hidden size, not "auto"
