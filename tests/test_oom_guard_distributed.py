"""The OOM guard in several processes, on CPU: two real ranks on gloo (torch.multiprocessing spawn, a
file:// store in tmp_path), a real FSDP2 model sharded as accelerate shards it (memtune.recipe.parallel.apply_fsdp)
or a real DDP model, and out-of-memory errors injected with hooks on a decoder layer.

A whole transformers Trainer cannot run FSDP2 on CPU (accelerate applies its FSDP plugin only to GPU
distributed types), so `MiniTrainer` plays the part of Trainer that GuardedTrainerMixin overrides:
get_batch_samples, then one training_step per micro-batch inside accelerate's no_sync for all but the last,
then the optimizer step (transformers 5.24 trainer.py `_inner_training_loop`); `_save_checkpoint` saves
nothing. The guard is attached as in a real run: `GuardedMiniTrainer(GuardedTrainerMixin, MiniTrainer)`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

SEQ_LEN = 16
MICRO_BATCH = 4
ACCUMULATION = 2
STEPS = 3
FALLBACKS = [dict(micro_batch_size=2, grad_accum_steps=4), dict(micro_batch_size=1, grad_accum_steps=8)]

pytestmark = pytest.mark.slow


# ---- running ranks -----------------------------------------------------------------------------------


def spawn(scenario: str, tmp_path: Path, deadline_seconds: float = 90, **options: Any) -> list[dict[str, Any]]:
    """Run `scenario` on 2 ranks; returns what each rank reported. Fails (instead of hanging) past the deadline."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(2, f"file://{tmp_path}/store", scenario, options, str(tmp_path)),
                                 nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + deadline_seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"scenario {scenario!r} still running after {deadline_seconds} s: a rank hangs")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def _worker(rank: int, world_size: int, init_method: str, scenario: str, options: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    timeout = datetime.timedelta(seconds=options.pop("process_group_timeout_seconds", 60))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    try:
        result = SCENARIOS[scenario](rank, **options)
    except Exception as error:  # noqa: BLE001 - the test process asserts on what each rank raised
        result = {"error": type(error).__name__, "message": str(error), "notes": getattr(error, "__notes__", [])}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    from memtune.measure.sharded import end_spawned_rank

    end_spawned_rank()  # no interpreter shutdown with gloo threads alive (it aborted now and then: SIGABRT)


# ---- the model, the data, the faults -----------------------------------------------------------------


def build_model(kind: str) -> Any:
    """The same random weights on every rank; "fsdp2" shards it, "ddp" wraps it with one bucket per parameter
    (so that a failed backward has already launched some bucket all-reduces), "plain" leaves it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from memtune.config import TrainConfig
    from memtune.recipe.parallel import apply_fsdp

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "fsdp2":
        return apply_fsdp(model, TrainConfig(seq_len=SEQ_LEN, num_gpus=2), pin_memory=False)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=0.001)
    return model


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's own micro-batches for STEPS optimizer steps (the same on every run)."""
    generator = torch.Generator().manual_seed(1000 + rank)
    result = []
    for _ in range(STEPS * ACCUMULATION):
        input_ids = torch.randint(0, 256, (MICRO_BATCH, SEQ_LEN), generator=generator)
        result.append({"input_ids": input_ids, "labels": input_ids.clone()})
    return result


def decoder_layer(model: Any) -> Any:
    inner = model.module if hasattr(model, "module") else model
    return inner.model.layers[0]


class Faults:
    """Raise torch.cuda.OutOfMemoryError at (rank, step, where, micro_batch) for batches above a size: in the
    forward of the first decoder layer (after FSDP gathered its parameters) or in its backward (reached last,
    after the upper layer and the LM head have their gradients). `micro_batch` counts the backward passes
    finished in this optimizer step. Where `slow_ranks` is set, those ranks sleep instead of raising."""

    def __init__(self, rank: int, rules: list[list[Any]], slow_seconds: float = 0.0):
        self.rank = rank
        self.rules = [tuple(rule) for rule in rules]
        self.slow_seconds = slow_seconds
        self.step = 1
        self.micro_batch = 0
        self.fired: list[list[Any]] = []

    def install(self, layer: Any) -> None:
        layer.register_forward_pre_hook(lambda module, inputs: self._maybe_raise("forward", inputs[0].shape[0]))
        layer.register_full_backward_hook(self._backward)

    def _backward(self, module: Any, grad_input: Any, grad_output: Any) -> None:
        self._maybe_raise("backward", grad_output[0].shape[0])
        self.micro_batch += 1

    def _maybe_raise(self, where: str, batch: int) -> None:
        for rank, step, rule_where, micro_batch, above in self.rules:
            if (rank, step, rule_where, micro_batch) == (
                self.rank,
                self.step,
                where,
                self.micro_batch,
            ) and batch > above:
                self.fired.append([self.step, where, batch])
                if self.slow_seconds:
                    time.sleep(self.slow_seconds)
                    return
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (injected in {where})"
                )


class MiniTrainer:
    """What the guard wraps of transformers.Trainer, over a real (sharded) model; see the module docstring."""

    def __init__(self, model: Any, kind: str):
        import torch.distributed as dist

        self.model = model
        self.kind = kind
        self.args = types.SimpleNamespace(
            per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=ACCUMULATION,
            world_size=dist.get_world_size(),
            output_dir="",
            should_save=False,
        )
        self.state = types.SimpleNamespace(global_step=0)
        self.callback_handler = types.SimpleNamespace(callbacks=[])
        self.is_fsdp_enabled = kind == "fsdp2"
        self.is_deepspeed_enabled = False
        self.accelerator = types.SimpleNamespace(is_fsdp2=kind == "fsdp2")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        self.current_gradient_accumulation_steps = ACCUMULATION

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.callbacks.append(callback)

    def get_batch_samples(self, iterator: Any, num_batches: int) -> tuple[list[Any], None]:
        return [next(iterator) for _ in range(num_batches)], None

    def training_step(
        self, model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = model(**inputs).loss / self.current_gradient_accumulation_steps
        loss.backward()
        return loss.detach()

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        raise NotImplementedError

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's save is collective under FSDP; here there is nothing to save."""

    def no_sync(self) -> Any:
        """accelerate's Accelerator.no_sync for FSDP2 and DDP."""
        if self.kind == "fsdp2":
            return _fsdp_no_sync(self.model)
        return self.model.no_sync() if self.kind == "ddp" else contextlib.nullcontext()

    def train(self, data: list[dict[str, torch.Tensor]], faults: Faults | None, guard: Any) -> list[float]:
        """STEPS optimizer steps; returns the loss of each (the sum of what training_step handed back)."""
        iterator = iter(data)
        losses = []
        for step in range(1, STEPS + 1):
            if faults is not None:
                faults.step, faults.micro_batch = step, 0
            samples, num_items = self.get_batch_samples(iterator, ACCUMULATION)
            total = torch.zeros(())
            for index, inputs in enumerate(samples):
                with (contextlib.nullcontext() if index == len(samples) - 1 else self.no_sync()):
                    total += self.training_step(self.model, inputs, num_items)
            self.optimizer.step()
            self.model.zero_grad(set_to_none=True)
            self.state.global_step += 1
            guard.on_step_end(self.args, self.state, None)
            losses.append(float(total))
        return losses


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Any:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_parameters(model: Any) -> list[list[float]]:
    """Every parameter gathered whole (DTensor shards included), as lists for JSON."""
    values = []
    for param in model.parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        values.append(tensor.detach().flatten()[:64].tolist() + [float(tensor.detach().double().sum())])
    return values


def guarded_run(
    rank: int, kind: str, rules: list[list[Any]], output_dir: str = "", **guard_options: Any
) -> dict[str, Any]:
    from memtune.config import TrainConfig
    from memtune.run.guard import GuardedTrainerMixin, OomGuard

    class GuardedMiniTrainer(GuardedTrainerMixin, MiniTrainer):
        """MiniTrainer with the guard attached, as GuardedTrainer is Trainer with it."""

    model = build_model(kind)
    faults = Faults(rank, rules)
    faults.install(decoder_layer(model))
    plan = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, grad_accum_steps=ACCUMULATION, num_gpus=2)
    guard = OomGuard(plan, [plan.replace(**fallback) for fallback in FALLBACKS], log=lambda message: None,
                     alloc_retries=lambda: None, **guard_options)
    # The guard reads output_dir and should_save only when it gives up: set after it attached in __init__.
    trainer = GuardedMiniTrainer(model, kind, oom_guard=guard)
    trainer.args.output_dir, trainer.args.should_save = output_dir, rank == 0
    try:
        losses = trainer.train(batches(rank), faults, guard)
    except Exception as error:
        try:
            trainer._save_checkpoint(model, trial=None)
        except Exception as refused:  # noqa: BLE001 - what the runner's last-step save would see
            error.add_note(f"save: {refused}")
        raise
    return {"losses": losses, "parameters": full_parameters(model), "fired": faults.fired,
            "events": [event.to_dict() for event in guard.events], "current": guard.current.to_dict()}


# ---- scenarios (run on every rank) -----------------------------------------------------------------


def _all_ranks_oom(rank: int, kind: str) -> dict[str, Any]:
    """Reference run, then the same run with OOMs on both ranks: in the backward of step 2's last micro-batch
    (the first is accumulated under no_sync), and in the forward of step 3's first micro-batch of 2 sequences."""
    reference = guarded_run(rank, kind, [])
    rules = [[r, 2, "backward", 1, 2] for r in range(2)] + [[r, 3, "forward", 0, 1] for r in range(2)]
    return {"reference": reference, "guarded": guarded_run(rank, kind, rules)}


def _one_rank_oom(rank: int, output_dir: str) -> dict[str, Any]:
    """Rank 1 runs out of memory in the backward of step 2's first micro-batch (a DDP no_sync micro-batch:
    no collective in it, so rank 0 finishes it and both meet in the agreement). The output directory holds
    checkpoint-1 with the guard's state, as the runner leaves it."""
    checkpoint = Path(output_dir, "checkpoint-1")
    checkpoint.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (checkpoint / "memtune_oom_guard.json").write_text(json.dumps({"current": {}, "events": []}))
    return guarded_run(rank, "ddp", [[1, 2, "backward", 0, 0]], output_dir=output_dir)


def _agreement_times_out(rank: int) -> dict[str, Any]:
    """Rank 1 runs out of memory in the forward of an FSDP2 layer; rank 0 waits in the next layer's all-gather
    (gloo blocks the host as a CUDA sync behind NCCL would) and never reaches the agreement."""
    return guarded_run(rank, "fsdp2", [[1, 2, "forward", 0, 0]], agreement_timeout_seconds=3)


def _fsdp_reset(rank: int) -> dict[str, Any]:
    """OOM mid-forward and mid-backward of a real FSDP2 step, `reset_fsdp`, then a normal step: with torch's
    own reset (2.13) and with the guard's copy for torch 2.11 (FSDPModule.reset_iter_state removed)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import ShardedState

    from memtune.run.resets import fsdp_param_groups, reset_fsdp

    def groups(model: Any) -> list[Any]:
        return [group for module in model.modules() if isinstance(module, FSDPModule)
                for group in fsdp_param_groups(module._get_fsdp_state())]

    report: dict[str, Any] = {}
    for reset in ("torch", "torch-2.11-path"):
        if reset == "torch-2.11-path" and hasattr(FSDPModule, "reset_iter_state"):
            delattr(FSDPModule, "reset_iter_state")  # this process only
        for where in ("forward", "backward"):
            model = build_model("fsdp2")
            faults = Faults(rank, [[rank, 1, where, 1, 0]])
            faults.install(decoder_layer(model))
            inputs = batches(rank)[0]
            model.set_requires_gradient_sync(False)  # the first micro-batch accumulates unsharded gradients
            model(**inputs).loss.backward()
            model.set_requires_gradient_sync(True)
            try:
                model(**inputs).loss.backward()
            except torch.cuda.OutOfMemoryError:
                pass
            left = {
                "gathered": sum(group._sharded_state == ShardedState.UNSHARDED for group in groups(model)),
                "busy": sum(group._training_state != TrainingState.IDLE for group in groups(model)),
                "unsharded_grads": sum(
                    param._unsharded_param.grad is not None or param.unsharded_accumulated_grad is not None
                    for group in groups(model)
                    for param in group.fsdp_params
                    if hasattr(param, "_unsharded_param")
                ),
            }
            faults.rules = []
            found = reset_fsdp(model)
            model.zero_grad(set_to_none=True)
            after = {"gathered": sum(group._sharded_state != ShardedState.SHARDED for group in groups(model)),
                     "busy": sum(group._training_state != TrainingState.IDLE for group in groups(model))}
            loss = model(**inputs).loss
            loss.backward()
            local_shapes = [list(param.to_local().shape) for param in model.parameters()]
            full_shapes = [list(param.shape) for param in model.parameters()]
            report[f"{reset} {where}"] = {
                "fired": faults.fired,
                "left": left,
                "modules": found,
                "after_reset": after,
                "loss": float(loss.detach()),
                "grads": all(
                    param.grad is not None and bool(torch.isfinite(param.grad.to_local()).all())
                    for param in model.parameters()
                ),
                "resharded": all(group._sharded_state == ShardedState.SHARDED for group in groups(model)),
                "sharded_rows": all(
                    local[0] < full[0] for local, full in zip(local_shapes, full_shapes, strict=True) if full[0] > 1
                ),
            }
    return report


SCENARIOS = {
    "fsdp2_all_ranks_oom": lambda rank: _all_ranks_oom(rank, "fsdp2"),
    "ddp_all_ranks_oom": lambda rank: _all_ranks_oom(rank, "ddp"),
    "one_rank_oom": _one_rank_oom,
    "agreement_times_out": _agreement_times_out,
    "fsdp_reset": _fsdp_reset,
}


# ---- tests --------------------------------------------------------------------------------------------


def test_fsdp2_reset_after_oom_in_forward_and_in_backward(tmp_path: Path) -> None:
    for rank, report in enumerate(spawn("fsdp_reset", tmp_path)):
        assert "error" not in report, report
        for case, seen in report.items():
            where = case.split()[-1]
            assert seen["fired"] == [[1, where, MICRO_BATCH]], case
            # What the failed step left (the reason for the reset): a layer gathered and not IDLE, and the
            # first micro-batch's unsharded gradients still held for accumulation.
            assert (
                seen["left"]["gathered"] >= 1 and seen["left"]["busy"] >= 1 and seen["left"]["unsharded_grads"] > 0
            ), case
            assert (
                seen["modules"] == 6
            )  # 2 decoder layers, the embedding, the norm and the LM head (one unit), the root
            assert seen["after_reset"] == {"gathered": 0, "busy": 0}, case
            assert math.isfinite(seen["loss"]), case
            assert seen["grads"] and seen["resharded"] and seen["sharded_rows"], (rank, case)


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_every_rank_out_of_memory_steps_down_together_and_matches_an_undisturbed_run(tmp_path: Path, kind: str) -> None:
    reports = spawn(f"{kind}_all_ranks_oom", tmp_path)
    for report in reports:
        assert "error" not in report, report
        reference, guarded = report["reference"], report["guarded"]
        assert guarded["fired"] == [[2, "backward", 4], [3, "forward", 2]]
        assert [(event["step"], event["from_config"]["micro_batch_size"], event["to_config"]["micro_batch_size"],
                 event["redone_micro_batches"], event["ranks"]) for event in guarded["events"]] == [
            (1, 4, 2, 2, [0, 1]), (2, 2, 1, 1, [0, 1])]
        assert (guarded["current"]["micro_batch_size"], guarded["current"]["grad_accum_steps"]) == (1, 8)
        # No step lost or repeated: the losses and the weights of the undisturbed run (up to summation order).
        torch.testing.assert_close(guarded["losses"], reference["losses"], rtol=1e-4, atol=1e-5)
        for weights, expected in zip(guarded["parameters"], reference["parameters"], strict=True):
            torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-5)
    assert reports[0]["guarded"]["events"] == reports[1]["guarded"]["events"]
    assert reports[0]["guarded"]["parameters"] == reports[1]["guarded"]["parameters"]


def test_out_of_memory_on_one_rank_raises_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    from memtune.config import TrainConfig

    output = tmp_path / "run"
    for report in spawn("one_rank_oom", tmp_path, output_dir=str(output)):
        assert report["error"] == "OomOnSomeRanksError"
        message = report["message"]
        assert (
            "CUDA out of memory on rank 1 of 2 (not on 0) in optimizer step 2 with micro-batch 4 x 2 accum" in message
        )
        assert "memtune fit ... --budget" in message
        assert (
            "resume from checkpoint-1 with `memtune run PLAN --resume`: it continues with micro-batch 2 x 4 accum"
            in message
        )
        # The Trainer's collective checkpoint save is refused instead of waiting on the broken communicator.
        assert len(report["notes"]) == 1 and report["notes"][0].startswith("save: checkpoint not saved")
    saved = json.loads((output / "checkpoint-1" / "memtune_oom_guard.json").read_text())
    assert (TrainConfig.from_dict(saved["current"]).micro_batch_size, saved["events"][-1]["ranks"]) == (2, [1])


def test_agreement_that_times_out_raises_instead_of_hanging(tmp_path: Path) -> None:
    start = time.monotonic()
    failed, stuck = spawn("agreement_times_out", tmp_path, process_group_timeout_seconds=15)[::-1]
    assert failed["error"] == "OomOnSomeRanksError"
    assert "CUDA out of memory on rank 1 of 2 in optimizer step 2" in failed["message"]
    assert "did not say within 3 s" in failed["message"]
    # The healthy rank waited in FSDP's all-gather for a rank that had left: gloo's timeout ends it.
    assert "error" in stuck and stuck["error"] != "OomOnSomeRanksError"
    assert time.monotonic() - start < 80
