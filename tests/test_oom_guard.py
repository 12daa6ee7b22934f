"""The OOM guard on CPU: out-of-memory errors are injected with hooks at chosen optimizer steps (in
forward or half-way through backward), and the guarded run must match an undisturbed run of the same
plan: the same optimizer steps (none lost, none repeated), the same data, the same losses and weights,
with micro-batch x accumulation equal to the effective batch at every step. The order of step-downs by
itself is tested in test_stepdown.py."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from memtune.config import TrainConfig
from memtune.errors import NothingFitsError, UsageError
from memtune.plan import Plan
from memtune.run import data as data_module
from memtune.run.guard import GuardedTrainerMixin, OomGuard, can_switch_loss
from memtune.run.runner import run_plan

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.jsonl"
SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def oom(where: str) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected in {where})")


class InjectOom(TrainerCallback):
    """Raise torch.cuda.OutOfMemoryError where `fault(step, micro_batch, batch, where, model)` says: in the
    forward of the first decoder layer, or in its backward (reached last, after the LM head and the upper
    layer have accumulated their gradients). `step` is 1-based; `micro_batch` counts the backward passes
    finished in this optimizer step; `batch` is the number of sequences going through."""

    def __init__(self, fault):
        self.fault = fault
        self.state: object = None
        self.model = None
        self.micro_batch = 0
        self.fired: list[tuple[int, str]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state, self.model = state, model
        layer = model.model.layers[0]
        layer.register_forward_pre_hook(self._forward)
        layer.register_full_backward_hook(self._backward)

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro_batch = 0

    def _maybe_raise(self, where: str, batch: int) -> None:
        step = self.state.global_step + 1
        if self.fault(step, self.micro_batch, batch, where, self.model):
            self.fired.append((step, where))
            raise oom(where)

    def _forward(self, module, inputs):
        self._maybe_raise("forward", inputs[0].shape[0])

    def _backward(self, module, grad_input, grad_output):
        self._maybe_raise("backward", grad_output[0].shape[0])
        self.micro_batch += 1


def at(*faults: tuple[int, int, str, int]):
    """Faults as (step, raise for batches above this size, "forward" | "backward", at micro-batch)."""
    def fault(step, micro_batch, batch, where, model):
        return any((step, where, micro_batch) == (s, w, m) and batch > above for s, above, w, m in faults)
    return fault


class Record(TrainerCallback):
    """Per optimizer step: the step number and the configuration the guard had in use."""

    def __init__(self, guard_of):
        self.guard_of = guard_of
        self.steps: list[tuple[int, int, int]] = []
        self.model = None
        self.optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model = model

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        guard = self.guard_of()
        self.steps.append((state.global_step, guard.current.micro_batch_size, guard.current.grad_accum_steps))
        self.optimizer = optimizer


def guarded_run(model_dir: Path, tmp_path: Path, name: str, faults, fallbacks, max_steps: int = 7):
    plan = Plan(str(model_dir), TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2), 1 << 30,
                fallbacks=fallbacks)
    injector = InjectOom(faults)
    guards: list[OomGuard] = []
    original = Plan.oom_guard

    def capture(self, **options):
        guard = original(self, **options)
        guards.append(guard)
        return guard

    record = Record(lambda: guards[0])
    Plan.oom_guard = capture
    try:
        summary = run_plan(plan, data=CORPUS, output_dir=tmp_path / name, max_steps=max_steps, learning_rate=3e-3,
                           device="cpu", progress=False, callbacks=[injector, record], save_steps=1000)
    finally:
        Plan.oom_guard = original
    return summary, record, injector, guards[0]


def test_guard_steps_down_mid_run_without_losing_or_repeating_a_step(model_dir: Path, tmp_path: Path) -> None:
    fallbacks = [TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2, grad_accum_steps=4),
                 TrainConfig(seq_len=SEQ_LEN, micro_batch_size=1, grad_accum_steps=8)]
    reference, reference_record, _, _ = guarded_run(model_dir, tmp_path, "reference", at(), fallbacks)
    # Step 3: OOM half-way through the backward of its second micro-batch (the first is already accumulated).
    # Step 6: OOM in the forward of its first micro-batch, now of 2 sequences.
    faults = at((3, 2, "backward", 1), (6, 1, "forward", 0))
    summary, record, injector, guard = guarded_run(model_dir, tmp_path, "guarded", faults, fallbacks)

    assert injector.fired == [(3, "backward"), (6, "forward")]
    assert [step for step, _, _ in record.steps] == list(range(1, 8))  # each optimizer step once, in order
    assert [(micro, accum) for _, micro, accum in record.steps] == [(4, 2)] * 2 + [(2, 4)] * 3 + [(1, 8)] * 2
    assert all(micro * accum == 8 for _, micro, accum in record.steps)
    assert [(event["step"], event["from_config"]["micro_batch_size"], event["to_config"]["micro_batch_size"],
             event["redone_micro_batches"]) for event in summary.guard_events] == [(2, 4, 2, 2), (5, 2, 1, 1)]
    assert summary.final_train_config["micro_batch_size"] == 1 and summary.final_train_config["grad_accum_steps"] == 8

    # Same data, same gradients: the losses and weights of the undisturbed run (up to summation order).
    assert [step for step, _ in summary.loss_curve] == list(range(1, 8))
    torch.testing.assert_close([loss for _, loss in summary.loss_curve],
                               [loss for _, loss in reference.loss_curve], rtol=1e-4, atol=1e-5)
    for (name, weight), (_, expected) in zip(
        record.model.named_parameters(), reference_record.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5, msg=name)
    # The optimizer took exactly 7 steps.
    assert {int(state["step"]) for state in record.optimizer.state_dict()["state"].values()} == {7}


def test_a_single_process_makes_no_process_group_and_no_agreement(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective call in a single process")

    monkeypatch.setattr(torch.distributed, "new_group", forbidden)
    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    fallbacks = [TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2, grad_accum_steps=4)]
    summary, record, injector, guard = guarded_run(model_dir, tmp_path, "single", at((2, 2, "forward", 0)), fallbacks,
                                                   max_steps=3)
    assert injector.fired == [(2, "forward")]
    assert [(event["to_config"]["micro_batch_size"], event["ranks"]) for event in summary.guard_events] == [(2, [])]


class StubTrainer(GuardedTrainerMixin, types.SimpleNamespace):
    """What the guard reads of a Trainer when it attaches: args, the parallelism flags, the callback list."""


def test_guard_only_monitors_under_deepspeed_and_fsdp1() -> None:
    for kind, trainer_flags in (
        ("DeepSpeed", {"is_deepspeed_enabled": True}),
        ("FSDP1", {"is_fsdp_enabled": True, "accelerator": types.SimpleNamespace(is_fsdp2=False)}),
    ):
        messages: list[str] = []
        guard = OomGuard(TrainConfig(seq_len=8, micro_batch_size=4), log=messages.append)
        args = types.SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
        trainer = StubTrainer(args=args, callback_handler=types.SimpleNamespace(callbacks=[]),
                              add_callback=lambda c: None, oom_guard=guard, **trainer_flags)
        assert guard.trainer is trainer and trainer.oom_guard is guard
        assert not guard._active and len(messages) == 1 and f"only monitors under {kind}" in messages[0]


def test_the_chunked_loss_is_never_a_step_down_under_ddp_or_fsdp() -> None:
    # The chunked loss calls the base model and head around the wrapper: under DDP the ranks would
    # silently stop averaging their gradients.
    cases = {"single process": ({}, 1, True), "DDP (2 processes)": ({}, 2, False),
             "FSDP2 offload (1 process)": ({"is_fsdp_enabled": True}, 1, False)}
    for name, (flags, world_size, expected) in cases.items():
        args = types.SimpleNamespace(
            per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=world_size
        )
        trainer = types.SimpleNamespace(args=args, train_config=TrainConfig(seq_len=8, micro_batch_size=4), **flags)
        assert can_switch_loss(trainer) is expected, name
    # Only a Trainer with a train_config (the runner's PlanTrainer) can switch its loss.
    assert can_switch_loss(types.SimpleNamespace(args=types.SimpleNamespace(world_size=1))) is False


def test_guard_switches_checkpointing_on_in_place(model_dir: Path, tmp_path: Path) -> None:
    fallbacks = [TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2, gradient_checkpointing=True)]
    def faults(step, micro_batch, batch, where, model):  # from step 2, while checkpointing is off
        return step >= 2 and not model.model.gradient_checkpointing
    summary, record, injector, guard = guarded_run(model_dir, tmp_path, "checkpointing", faults, fallbacks, max_steps=3)
    assert [event["to_config"]["gradient_checkpointing"] for event in summary.guard_events] == [True]
    assert [(micro, accum) for _, micro, accum in record.steps] == [(4, 2)] * 3
    assert record.model.model.gradient_checkpointing is True


def test_guard_gives_up_with_nothing_fits_and_the_last_step_is_saved(model_dir: Path, tmp_path: Path) -> None:
    fallbacks = [TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2, grad_accum_steps=4)]
    faults = at((3, 0, "forward", 0))  # every configuration runs out of memory in step 3
    plan = Plan(str(model_dir), TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2), 1 << 30,
                fallbacks=fallbacks)
    with pytest.raises(NothingFitsError) as raised:
        run_plan(plan, data=CORPUS, output_dir=tmp_path / "exhausted", max_steps=5, device="cpu", progress=False,
                 callbacks=[InjectOom(faults)], save_steps=1000)
    assert "optimizer step 3" in str(raised.value) and "effective batch" in str(raised.value)
    assert (tmp_path / "exhausted" / "checkpoint-2" / "trainer_state.json").is_file()
    summary = json.loads((tmp_path / "exhausted" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("NothingFitsError")
    assert summary["checkpoint"].endswith("checkpoint-2") and summary["guard_events"][-1]["to_config"] is None


def test_guard_halves_an_evaluation_batch_that_runs_out_of_memory(model_dir: Path, tmp_path: Path) -> None:
    """The API flow: plan.trainer(...) is a Trainer with the guard attached."""
    from transformers import Trainer, default_data_collator

    tokenizer = data_module.sample_tokenizer()
    dataset = data_module.build_dataset(tokenizer, SEQ_LEN, CORPUS)
    evaluation = torch.utils.data.Subset(dataset, range(16))
    plan = Plan(str(model_dir), TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2), 1 << 30)

    def evaluate(inject: bool) -> tuple[float, OomGuard]:
        model = plan.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
        if inject:
            def forward(module, inputs):
                if inputs[0].shape[0] > 2:
                    raise oom("evaluation")
            model.model.layers[1].register_forward_pre_hook(forward)
        args = plan.training_arguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=8, use_cpu=True)
        trainer = plan.trainer(model=model, args=args, eval_dataset=evaluation, data_collator=default_data_collator)
        guard = trainer.oom_guard
        assert isinstance(trainer, Trainer) and guard.trainer is trainer
        assert sum(callback is guard for callback in trainer.callback_handler.callbacks) == 1
        return trainer.evaluate()["eval_loss"], guard

    expected, _ = evaluate(inject=False)
    loss, guard = evaluate(inject=True)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert [(event.phase, event.from_config, event.to_config) for event in guard.events] == [
        ("eval", {"eval_batch": 8}, {"eval_batch": 4}), ("eval", {"eval_batch": 4}, {"eval_batch": 2})]


def test_guard_warns_when_the_allocator_starts_retrying() -> None:
    counter = {"retries": 0}
    messages: list[str] = []
    guard = OomGuard(TrainConfig(seq_len=8), log=messages.append, alloc_retries=lambda: counter["retries"])
    args = types.SimpleNamespace()
    guard._retries_seen = 0
    for step, retries in [(1, 0), (2, 3), (3, 5), (60, 6)]:
        counter["retries"] = retries
        guard.on_step_end(args, types.SimpleNamespace(global_step=step), None)
    assert [event.alloc_retries for event in guard.events] == [3, 2, 1]
    assert [event.step for event in guard.events] == [2, 3, 60]
    # Warned at the first retries, quiet for RETRY_WARNING_INTERVAL_STEPS steps, then again.
    assert len(messages) == 2 and "retry cudaMalloc 3 times by step 2" in messages[0]


def test_a_guard_given_to_a_plain_trainer_says_how_to_attach_it(model_dir: Path, tmp_path: Path) -> None:
    """A TrainerCallback cannot redo a step: the guard as a plain callback must fail, never only watch."""
    from transformers import Trainer, default_data_collator

    tokenizer = data_module.sample_tokenizer()
    dataset = data_module.build_dataset(tokenizer, SEQ_LEN, CORPUS)
    plan = Plan(str(model_dir), TrainConfig(seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2), 1 << 30)
    model = plan.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
    args = plan.training_arguments(output_dir=str(tmp_path / "plain"), max_steps=1, use_cpu=True)
    guard = plan.oom_guard()
    evaluation = torch.utils.data.Subset(dataset, range(4))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=evaluation,
                      data_collator=default_data_collator, callbacks=[guard])
    how = r"not guarded: .*plan\.trainer\(model=model, args=args, \.\.\.\).*GuardedTrainerMixin"
    with pytest.raises(UsageError, match=how):
        trainer.train()
    with pytest.raises(UsageError, match="not guarded"):
        trainer.evaluate()  # evaluation alone never calls on_train_begin
    with pytest.raises(UsageError, match="Trainer, which is not guarded"):
        guard.attach(trainer)
    assert guard.trainer is None and guard.events == []
