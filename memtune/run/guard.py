"""The OOM guard: when CUDA runs out of memory mid-run, step down to a lighter configuration and go on
from the last completed optimizer step, instead of dying (or restarting from step 0).

Attaching it (the only ways):

    trainer = plan.trainer(model=model, args=args, train_dataset=ds)    # a GuardedTrainer, guard attached
    trainer.oom_guard.events                                            # what it did

    class MyTrainer(GuardedTrainerMixin, SFTTrainer): ...               # any Trainer subclass
    trainer = MyTrainer(model=model, args=args, oom_guard=plan.oom_guard(), ...)

Why a Trainer subclass and not only a TrainerCallback: redoing a step means catching the error raised
inside `training_step` and running the step's micro-batches again, and no callback is called there.
transformers 5.24 trainer_callback.py gives callbacks on_init_end, on_train_begin, on_train_end,
on_epoch_begin, on_epoch_end, on_step_begin, on_pre_optimizer_step, on_optimizer_step, on_substep_end,
on_step_end, on_evaluate, on_predict, on_save, on_log, on_prediction_step and on_push_begin: each is a
notification before or after a piece of the loop, with args, state, control, the model, optimizer,
scheduler and dataloaders, but neither the Trainer nor the micro-batch's inputs, and none runs around a
forward and backward, so an OOM in training_step leaves the loop past every callback. Trainer's own
docstrings say "Subclass and override to inject custom behavior" for training_step and prediction_step,
so `GuardedTrainerMixin` overrides get_batch_samples, training_step, prediction_step and
_save_checkpoint and hands each to the guard; the guard (a TrainerCallback as well, for on_step_end,
on_save and on_train_begin) holds the state and the step-down policy. A guard given to a Trainer that is
not guarded raises UsageError at on_train_begin (or at the first evaluation step) instead of only watching.

How it works (the simplest design that is exact). Trainer fetches all micro-batches of an optimizer
step before it runs any of them (`Trainer.get_batch_samples`), calls `training_step` once per
micro-batch, then clips and steps the optimizer. The guard:

- keeps the current optimizer step's micro-batches;
- when `training_step` raises an out-of-memory error (`memory.is_oom`: torch.cuda.OutOfMemoryError,
  cuBLAS/cuDNN allocation failures), it drops the gradients accumulated so far in this step (a
  backward that failed half-way has added to some parameters' .grad and not to others), frees the
  memory, moves to the next configuration (`memtune.run.stepdown`: `plan.fallbacks`, then a built-in
  ladder, keeping the effective batch) and runs this step's micro-batches again from the first, each
  cut into chunks of the new micro-batch;
- later steps keep the new configuration.

The optimizer never saw the failed attempt: its state, the learning-rate schedule, the global step and
the data position (the dataloader still yields the plan's micro-batches; the guard cuts them) are
unchanged, so no optimizer step is lost or repeated. The loss handed back to Trainer is corrected
for what it had already logged. An OOM in evaluation (`prediction_step`) halves the evaluation batch
the same way.

What a step-down may change mid-run: the micro-batch (micro x accumulation stays the effective batch:
chunks of 2 from micro-batches of 4 double the accumulation), gradient checkpointing (switched on in
place), and the chunked loss (for Trainers with a `train_config` attribute, as the runner's
PlanTrainer). Fallbacks that change precision, adapter, offload or the number of GPUs need a new
optimizer or a relaunch; they are skipped.

It also warns when the caching allocator starts retrying cudaMalloc after flushing its cache
(`torch.cuda.memory_stats()["num_alloc_retries"]` rises): steps slow down and an OOM is near.

Several processes (`accelerate launch`, one per GPU): after every attempt of a micro-batch every rank
learns which ranks ran out of memory (`memtune.run.agreement`: a MAX all-reduce on a gloo group of its
own, made when the guard attaches; every rank attaches in the same order).
- Every rank ran out (the usual case: packed equal-length batches and identical shards make every
  rank allocate the same, so they fail at the same allocation, and every collective issued so far
  is matched): each rank resets the model's distributed state (`memtune.run.resets`: FSDP2 on torch
  2.13 and 2.11, DDP's reducer), drops the gradients, frees memory and steps down to the same next
  configuration (the same plan and fallbacks on every rank), then redoes the step as above.
- Only some ranks ran out: their NCCL collectives no longer match and cannot be recovered. Every
  rank raises OomOnSomeRanksError (a NothingFitsError: exit code 3) naming the ranks, the step and
  the configuration; the lighter configuration is recorded in the latest checkpoint, so
  `memtune run PLAN --resume` continues with it. If the agreement itself times out
  (AGREEMENT_TIMEOUT_SECONDS: a healthy rank is stuck in a CUDA synchronisation behind an NCCL
  collective the failed rank never joined), the failed rank raises the same error then. After
  either, the Trainer's `_save_checkpoint` refuses to run: it is collective under FSDP and would
  wait forever on the broken communicator.

Known limitations:
- FSDP1 and DeepSpeed: the guard only monitors and the OOM propagates (their flat parameters and
  engines have no reset the guard could rely on).
- Several processes: an OOM on some ranks only ends the run (see above). A rank that fails with
  another error leaves the others waiting in the agreement until AGREEMENT_TIMEOUT_SECONDS.
- An OOM in gradient clipping or in the optimizer step is not handled (their memory does not depend
  on the micro-batch); it propagates, and the runner saves the last completed step.
- It relies on Trainer calling `get_batch_samples` and then `training_step` per micro-batch
  (transformers 4.46 to 5.x). A `training_step` call with inputs it did not see through
  `get_batch_samples` gets no step-down: its OOM propagates.
- The evaluation loss of a split batch is the mean of the pieces' losses weighted by their number of
  sequences: exact for packed data (equal lengths), approximate for padded batches.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from transformers import Trainer, TrainerCallback

from memtune.config import TrainConfig
from memtune.errors import MemtuneError, NothingFitsError, UsageError
from memtune.measure.memory import is_oom
from memtune.recipe.step import set_checkpointing
from memtune.run.agreement import (
    AGREEMENT_TIMEOUT_SECONDS,
    AgreementFailed,
    RankAgreement,
    SingleProcess,
)
from memtune.run.resets import reset_after_failed_step
from memtune.run.stepdown import StepDownPolicy

logger = logging.getLogger("memtune.run.guard")

STATE_FILE = "memtune_oom_guard.json"
"""Written into each checkpoint folder: the configuration the guard had reached, for resuming."""
RETRY_WARNING_INTERVAL_STEPS = 50
"""After a warning about allocator retries, stay quiet for this many optimizer steps."""
HOW_TO_ATTACH = ("a TrainerCallback cannot redo a failed step, so the guard must be attached to the Trainer: "
                 "use `trainer = plan.trainer(model=model, args=args, ...)`, or a Trainer class that derives from "
                 "memtune.run.guard.GuardedTrainerMixin (`class MyTrainer(GuardedTrainerMixin, Trainer)`) made with "
                 "`oom_guard=plan.oom_guard()`")

__all__ = ["AGREEMENT_TIMEOUT_SECONDS", "GuardEvent", "GuardedTrainer", "GuardedTrainerMixin", "OomGuard",
           "OomOnSomeRanksError", "STATE_FILE"]


@dataclass
class GuardEvent:
    """Something the guard saw or did."""

    kind: str
    """"oom" (stepped down, or gave up when `to_config` is None) or "alloc_retries"."""
    phase: str
    """"train" or "eval"."""
    step: int
    """Optimizer steps completed when it happened (the failed step is step + 1)."""
    message: str
    from_config: dict[str, Any] | None = None
    to_config: dict[str, Any] | None = None
    redone_micro_batches: int = 0
    """Micro-batches of the failed optimizer step that were run again."""
    alloc_retries: int = 0
    ranks: list[int] = field(default_factory=list)
    """The ranks that ran out of memory (several processes); empty in a single process."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OomOnSomeRanksError(NothingFitsError):
    """Some ranks ran out of memory and others did not: their NCCL collectives no longer match, so the
    run cannot step down and go on (exit code 3, as NothingFitsError)."""


class OomGuard(TrainerCallback):
    """Catch CUDA out-of-memory in training and evaluation, step down, continue. See the module docstring.

    Made by `Plan.oom_guard()` and attached by `GuardedTrainerMixin.__init__` (`Plan.trainer` does both).
    `events` lists what it did; `current` is the configuration in use. `log` receives warnings (default:
    the "memtune.run.guard" logger); `step_down=False` only monitors; `alloc_retries` reads the allocator's
    retry count (default: torch.cuda.memory_stats); `agreement_timeout_seconds`: how long a rank waits for
    the others to say whether they ran out of memory (several processes).
    """

    def __init__(
        self,
        train_config: TrainConfig,
        fallbacks: Sequence[TrainConfig] = (),
        log: Callable[[str], None] | None = None,
        step_down: bool = True,
        alloc_retries: Callable[[], int | None] | None = None,
        agreement_timeout_seconds: float = AGREEMENT_TIMEOUT_SECONDS,
    ):
        self.plan_config = train_config
        self.policy = StepDownPolicy(train_config, tuple(fallbacks))
        self.current = train_config
        self.log = log or logger.warning
        self.step_down = step_down
        self.events: list[GuardEvent] = []
        self.trainer: Any = None
        self.agreement: SingleProcess | RankAgreement = SingleProcess()
        self._read_alloc_retries = alloc_retries or _cuda_alloc_retries
        self._agreement_timeout_seconds = agreement_timeout_seconds
        self._position = 0  # how many of the fallbacks were used or skipped
        self._eval_chunk: int | None = None
        self._samples: list[Any] | None = None
        self._index = 0
        self._reported: list[torch.Tensor] = []
        self._retries_seen: int | None = None
        self._last_retry_warning_step: int | None = None
        self._restored: TrainConfig | None = None
        self._active = True
        self._save_refused: str | None = None

    @property
    def fallbacks(self) -> list[TrainConfig]:
        return list(self.policy.fallbacks)

    # ---- attaching ---------------------------------------------------------------------------

    def attach(self, trainer: Any) -> None:
        """Bind to `trainer`, a GuardedTrainerMixin: read its micro-batch and accumulation, decide whether
        its parallelism allows stepping down, and (several processes) make the ranks' agreement group, which
        is collective. `GuardedTrainerMixin.__init__` calls it; raises UsageError for a Trainer that is not
        guarded, ValueError when this guard is already attached to another Trainer."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("this OomGuard is already attached to another Trainer: make one guard per Trainer")
        if not isinstance(trainer, GuardedTrainerMixin):
            raise UsageError(f"OomGuard.attach got a {type(trainer).__name__}, which is not guarded: {HOW_TO_ATTACH}")
        self.trainer = trainer
        args = trainer.args
        loader_micro_batch = args.per_device_train_batch_size
        if (self.current.micro_batch_size, self.current.grad_accum_steps) != (
            loader_micro_batch, args.gradient_accumulation_steps
        ):
            self.current = self.current.replace(
                micro_batch_size=loader_micro_batch, grad_accum_steps=args.gradient_accumulation_steps
            )
        self.policy = dataclasses.replace(
            self.policy, loader_micro_batch=loader_micro_batch,
            per_device_batch=loader_micro_batch * args.gradient_accumulation_steps,
            can_checkpoint=_can_checkpoint(trainer), can_switch_loss=can_switch_loss(trainer),
        )
        unsupported = _unsupported_parallelism(trainer)
        distributed = args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if unsupported is None and args.world_size > 1 and not distributed:
            unsupported = f"in runs of {args.world_size} processes without a torch.distributed process group"
        self._active = self.step_down and unsupported is None
        if self.step_down and not self._active:
            self.log(f"the OOM guard only monitors {unsupported}: an out-of-memory error there propagates")
        if self._active and distributed:
            self.agreement = RankAgreement.create(self._agreement_timeout_seconds)
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        if self._restored is not None:
            self._apply(self._restored)
            self._restored = None

    def restore(self, checkpoint_dir: str | Path) -> None:
        """Start from the configuration saved in a checkpoint folder (when resuming a run)."""
        path = Path(checkpoint_dir) / STATE_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.events = [GuardEvent(**event) for event in state.get("events", [])]
        config = TrainConfig.from_dict(state["current"])
        if config != self.current:
            if self.trainer is not None:
                self._apply(config)
            else:
                self._restored = config
            self.log(f"resuming with the configuration the OOM guard had reached: {config.describe()}")

    def save_state(self, checkpoint_dir: str | Path) -> None:
        """Write the configuration in use and the events into `checkpoint_dir`/STATE_FILE (if the folder exists)."""
        folder = Path(checkpoint_dir)
        if folder.is_dir():
            state = {"current": self.current.to_dict(), "events": [event.to_dict() for event in self.events]}
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    # ---- TrainerCallback ---------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise UsageError(f"the OOM guard is a callback of a Trainer that is not guarded: {HOW_TO_ATTACH}")
        self._retries_seen = self._read_alloc_retries()

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:  # Trainer.evaluate() alone never calls on_train_begin
            raise UsageError(f"the OOM guard is a callback of a Trainer that is not guarded: {HOW_TO_ATTACH}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._samples, self._reported = None, []
        self._check_alloc_retries(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            self.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    # ---- what GuardedTrainerMixin hands over --------------------------------------------------

    def start_optimizer_step(self, samples: list[Any]) -> None:
        """Trainer fetched this optimizer step's micro-batches (`get_batch_samples`): keep them for a redo."""
        self._samples, self._index, self._reported = samples, 0, []

    def check_can_save(self) -> None:
        """Raise MemtuneError when the ranks gave up: Trainer's checkpoint save is collective under FSDP and
        would never return on the broken communicator."""
        if self._save_refused is not None:
            raise MemtuneError(f"checkpoint not saved: {self._save_refused}, and saving is collective on the "
                               "broken communicator")

    def training_step(self, run: Callable[..., torch.Tensor], model: Any, inputs: Any,
                      num_items_in_batch: Any) -> torch.Tensor:
        """One micro-batch through `run` (Trainer's training_step); after an OOM, step down and redo the
        optimizer step up to this micro-batch. Returns the loss Trainer has not logged yet."""
        samples, index = self._samples, self._index
        self._index += 1
        if not self._active or samples is None or index >= len(samples) or samples[index] is not inputs:
            return self._run(run, model, inputs, num_items_in_batch)
        redo = False
        while True:
            failure = None
            try:
                if redo:
                    # The whole step again, from its first micro-batch; hand back only what Trainer has not logged yet.
                    total = self._run(run, model, samples[0], num_items_in_batch)
                    for earlier in samples[1 : index + 1]:
                        total = total + self._run(run, model, earlier, num_items_in_batch)
                    loss = total - sum(self._reported) if self._reported else total
                else:
                    loss = self._run(run, model, inputs, num_items_in_batch)
            except Exception as error:  # noqa: BLE001 - an OOM is handled below, anything else re-raised
                if not is_oom(error):
                    raise
                failure = _first_line(error)
            failure, ranks = self._agree(failure, "train")
            if failure is None:
                self._reported.append(loss.detach())
                return loss
            # Outside the except block: the traceback (and the activations its frames hold) is gone.
            reset_after_failed_step(model)
            model.zero_grad(set_to_none=True)
            self._step_down("train", failure, redone=index + 1, ranks=ranks)
            redo = True

    def prediction_step(self, run: Callable[..., Any], model: Any, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: Any) -> Any:
        """One evaluation batch through `run` (Trainer's prediction_step), in pieces of the evaluation chunk;
        after an OOM, halve the chunk and run the batch again. Returns (loss, logits, labels) as Trainer's."""
        while True:
            failure = result = None
            try:
                result = self._predict(run, model, inputs, prediction_loss_only, ignore_keys)
            except Exception as error:  # noqa: BLE001 - an OOM is handled below, anything else re-raised
                if not self._active or not is_oom(error):
                    raise
                failure = _first_line(error)
            failure, ranks = self._agree(failure, "eval")
            if failure is None:
                return result
            reset_after_failed_step(model)
            size = _batch_size(inputs) or 1
            chunk = min(self._eval_chunk or size, size)
            step = self._global_step()
            _free_memory()
            if chunk <= 1:
                self.events.append(GuardEvent("oom", "eval", step, failure, {"eval_batch": chunk}, None, ranks=ranks))
                raise NothingFitsError(f"CUDA out of memory in evaluation with one sequence per batch ({failure}): "
                                       "evaluate with a shorter sequence, or on a larger GPU")
            self._eval_chunk = chunk // 2
            self.events.append(GuardEvent("oom", "eval", step, failure, {"eval_batch": chunk},
                                          {"eval_batch": self._eval_chunk}, ranks=ranks))
            self.log(f"CUDA out of memory in evaluation ({failure}); evaluating {self._eval_chunk} sequences at a time "
                     f"instead of {chunk}")

    # ---- training ----------------------------------------------------------------------------

    def _run(self, run: Callable[..., torch.Tensor], model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        """One micro-batch through Trainer's training_step, in chunks of the current micro-batch size."""
        size = _batch_size(inputs)
        chunk = self.current.micro_batch_size
        if size is None or chunk >= size:
            return run(model, inputs, num_items_in_batch)
        pieces = _split(inputs, chunk)
        trainer = self.trainer
        accumulation = getattr(trainer, "current_gradient_accumulation_steps", 1)
        # Losses that Trainer divides by the accumulation steps (models without num_items_in_batch):
        # each piece is 1/len(pieces) of the micro-batch.
        trainer.current_gradient_accumulation_steps = accumulation * len(pieces)
        try:
            total = run(model, pieces[0], num_items_in_batch)
            for piece in pieces[1:]:
                total = total + run(model, piece, num_items_in_batch)
        finally:
            trainer.current_gradient_accumulation_steps = accumulation
        return total

    def _step_down(self, phase: str, failure: str, redone: int, ranks: list[int] | None = None) -> None:
        failed = self.current
        step = self._global_step()
        ranks = ranks or []
        _free_memory()
        candidate = self._next_config(failed)
        if candidate is None:
            self.events.append(GuardEvent("oom", phase, step, failure, failed.to_dict(), None, redone, ranks=ranks))
            raise NothingFitsError(
                f"CUDA out of memory at optimizer step {step + 1} with {failed.describe()} ({failure}), and no lighter "
                f"configuration with the same effective batch ({self.policy.per_device_batch} per device) is left. "
                "Make a plan for a smaller budget (`memtune fit ... --budget`), with LoRA or offload, "
                "or a shorter sequence",
                suggestions=["LoRA (--lora)", "offload", "shorter --seq-len"],
            )
        self._apply(candidate)
        self.events.append(GuardEvent("oom", phase, step, failure, failed.to_dict(), self.current.to_dict(), redone,
                                      ranks=ranks))
        where = f" on every rank ({self.agreement.world_size})" if ranks else ""
        self.log(
            f"CUDA out of memory{where} in optimizer step {step + 1} ({failure}); stepped down from "
            f"{failed.describe()} to {self.current.describe()} (effective batch kept) and ran the step again from its "
            f"first micro-batch ({redone} redone); no optimizer step was lost or repeated"
        )

    def _next_config(self, failed: TrainConfig) -> TrainConfig | None:
        candidate, self._position = self.policy.next_config(failed, self._position)
        return candidate

    def _apply(self, config: TrainConfig) -> None:
        config = self.policy.normalized(config)
        if (config.gradient_checkpointing, config.checkpoint_layers, config.offload_activations) != (
                self.current.gradient_checkpointing, self.current.checkpoint_layers, self.current.offload_activations):
            set_checkpointing(self.trainer.model, config.gradient_checkpointing, config.checkpoint_layers,
                              config.offload_activations)
        if hasattr(self.trainer, "train_config"):
            self.trainer.train_config = config
        self.current = config

    def _global_step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer is not None else 0

    # ---- several processes ---------------------------------------------------------------------

    def _agree(self, failure: str | None, phase: str) -> tuple[str | None, list[int]]:
        """After an attempt: (this rank's failure to step down for, or None to go on; the ranks that ran out).

        In a single process that is the process's own failure. With several, every rank calls this after
        every attempt and all learn who ran out (`RankAgreement`). Raises OomOnSomeRanksError when only
        some ranks ran out, or when the others never answer.
        """
        try:
            ranks = self.agreement.out_of_memory_ranks(failure is not None)
        except AgreementFailed as error:
            self._give_up(phase, failure, None, str(error))
        if 0 < len(ranks) < self.agreement.world_size:
            self._give_up(phase, failure, ranks, "")
        return failure, ranks

    def _give_up(self, phase: str, failure: str | None, ranks: list[int] | None, agreement_error: str) -> NoReturn:
        """Raise on this rank when the ranks cannot step down together (`ranks` None: the agreement failed)."""
        step = self._global_step()
        config = self.current
        rank, world_size = self.agreement.rank, self.agreement.world_size
        timeout = self.agreement.timeout_seconds
        where = f"optimizer step {step + 1}" if phase == "train" else f"evaluation after optimizer step {step}"
        # Trainer's checkpoint save is collective under FSDP: on the broken communicator it would never return.
        self._save_refused = f"rank {rank} stopped because the ranks' collectives no longer match"
        if ranks is None and failure is None:
            raise MemtuneError(
                f"rank {rank}: the other ranks did not join the OOM guard's agreement after a micro-batch of {where} "
                f"within {timeout:g} s ({agreement_error}): one of them failed (see its error) "
                "or is stuck in a collective"
            )
        if ranks is None:
            what = (f"CUDA out of memory on rank {rank} of {world_size} in {where} with {config.describe()} "
                    f"({failure}), and the other ranks did not say within {timeout:g} s whether "
                    f"they did too ({agreement_error}): one is stuck behind an NCCL collective this rank never joined")
            ranks = [rank]
        else:
            healthy = [other for other in range(world_size) if other not in ranks]
            what = (f"CUDA out of memory on rank{'s' if len(ranks) > 1 else ''} {_join(ranks)} of {world_size} "
                    f"(not on {_join(healthy)}) in {where} with {config.describe()}"
                    + (f" ({failure})" if failure else ""))
        self.events.append(GuardEvent("oom", phase, step, failure or what, config.to_dict(), None, ranks=ranks))
        resume = self._record_for_resume()
        raise OomOnSomeRanksError(
            f"{what}. The ranks' NCCL collectives no longer match, so they cannot step down together and go on. "
            f"Make a plan for a smaller budget (`memtune fit ... --budget`){resume}",
            suggestions=["a smaller --budget", "--resume with a smaller micro-batch"],
        )

    def _record_for_resume(self) -> str:
        """Write the next lighter configuration into the latest checkpoint's guard state, so that
        `memtune run PLAN --resume` continues with it; returns how the error message says so."""
        from transformers.trainer_utils import get_last_checkpoint

        lighter = self._next_config(self.current)
        args = getattr(self.trainer, "args", None)
        output = getattr(args, "output_dir", None)
        checkpoint = get_last_checkpoint(output) if output and Path(output).is_dir() else None
        if lighter is None or checkpoint is None:
            return ", with LoRA or offload, or a shorter sequence" if lighter is None else \
                   "; no checkpoint was saved yet to resume from"
        lighter = self.policy.normalized(lighter)
        if getattr(args, "should_save", False):
            path = Path(checkpoint) / STATE_FILE
            saved = json.loads(path.read_text()) if path.is_file() else {"events": []}
            saved["current"] = lighter.to_dict()
            saved["events"] = saved.get("events", []) + [self.events[-1].to_dict()]
            path.write_text(json.dumps(saved, indent=2) + "\n")
        return (f", or resume from {Path(checkpoint).name} with `memtune run PLAN --resume`: it continues with "
                f"{lighter.describe()} (recorded in {STATE_FILE} there)")

    # ---- evaluation --------------------------------------------------------------------------

    def _predict(self, run: Callable[..., Any], model: Any, inputs: Any, prediction_loss_only: bool,
                 ignore_keys: Any) -> Any:
        size = _batch_size(inputs)
        if self._eval_chunk is None or size is None or self._eval_chunk >= size:
            return run(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        from transformers.trainer_pt_utils import nested_concat

        losses, logits, labels = [], None, None
        for piece in _split(inputs, self._eval_chunk):
            loss, piece_logits, piece_labels = run(model, piece, prediction_loss_only, ignore_keys=ignore_keys)
            if loss is not None:
                losses.append(loss.float() * _batch_size(piece))
            if piece_logits is not None:
                logits = piece_logits if logits is None else nested_concat(logits, piece_logits, padding_index=-100)
            if piece_labels is not None:
                labels = piece_labels if labels is None else nested_concat(labels, piece_labels, padding_index=-100)
        mean = torch.stack(losses).sum() / size if losses else None
        return mean, logits, labels

    # ---- allocator monitoring ----------------------------------------------------------------

    def _check_alloc_retries(self, step: int) -> None:
        retries = self._read_alloc_retries()
        if retries is None:
            return
        if self._retries_seen is None or retries < self._retries_seen:
            self._retries_seen = retries
            return
        new = retries - self._retries_seen
        if new <= 0:
            return
        self._retries_seen = retries
        times = f"{new} time{'s' if new > 1 else ''}"
        advice = ("a plan with a smaller budget" if self.current.expandable_segments else
                  "a plan with expandable segments (memtune fit --expandable-segments on) often helps, or one with a "
                  "smaller budget")
        message = (f"the CUDA caching allocator had to free its cache and retry cudaMalloc {times} "
                   f"by step {step} ({retries} in all): memory is nearly full, steps slow down and an OOM may follow; "
                   f"{advice}")
        self.events.append(GuardEvent("alloc_retries", "train", step, message, self.current.to_dict(),
                                      alloc_retries=new))
        last = self._last_retry_warning_step
        if last is None or step - last >= RETRY_WARNING_INTERVAL_STEPS:
            self._last_retry_warning_step = step
            self.log(message)


# ---- the guarded Trainer ------------------------------------------------------------------------

if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class GuardedTrainerMixin(_TrainerBase):
    """Put it before a transformers.Trainer (or any subclass of it) in the bases: the Trainer's
    get_batch_samples, training_step, prediction_step and _save_checkpoint go through `oom_guard`
    (a required keyword argument; the other arguments go to the Trainer). The module docstring
    says why a subclass is needed: a TrainerCallback is never called around a micro-batch.

    Overrides (transformers 5.24 trainer.py; 5.17 on the GPU machine has the same four): `get_batch_samples`
    hands the step's micro-batches to the guard; `training_step` and `prediction_step` run Trainer's own
    through the guard; `_save_checkpoint` raises MemtuneError once the ranks gave up (the save is collective
    under FSDP).
    """

    def __init__(self, *args: Any, oom_guard: OomGuard, **kwargs: Any):
        self.oom_guard = oom_guard
        super().__init__(*args, **kwargs)
        oom_guard.attach(self)

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        samples, num_items = super().get_batch_samples(*args, **kwargs)
        self.oom_guard.start_optimizer_step(samples)
        return samples, num_items

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        return self.oom_guard.training_step(super().training_step, model, inputs, num_items_in_batch)

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        return self.oom_guard.prediction_step(super().prediction_step, model, inputs, prediction_loss_only, ignore_keys)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.oom_guard.check_can_save()
        super()._save_checkpoint(model, trial)


class GuardedTrainer(GuardedTrainerMixin, Trainer):
    """transformers.Trainer with an OomGuard attached: `GuardedTrainer(model=..., args=..., oom_guard=guard, ...)`;
    `Plan.trainer(...)` makes one."""


# ---- reading the Trainer -----------------------------------------------------------------------


def can_switch_loss(trainer: Any) -> bool:
    """Whether the guard may switch `trainer` to the chunked loss mid-run: only a Trainer with a `train_config` (the
    runner's PlanTrainer, whose `compute_loss` then makes the model's forward chunked), and only a single unwrapped
    process. A plan may use the chunked loss under DDP and FSDP (it is the model's forward, which their wrappers
    call); switching it on mid-run under them, after accelerate prepared the model, is not tested."""
    return not _wrapped(trainer) and hasattr(trainer, "train_config")


def _can_checkpoint(trainer: Any) -> bool:
    model = getattr(trainer, "model", None)
    return any(hasattr(model, name) for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"))


def _unsupported_parallelism(trainer: Any) -> str | None:
    """Why the guard cannot step down under this Trainer's parallelism; None when it can."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "under DeepSpeed (its engine has no reset after a failed forward or backward)"
    fsdp2 = getattr(getattr(trainer, "accelerator", None), "is_fsdp2", False)
    if getattr(trainer, "is_fsdp_enabled", False) and not fsdp2:
        return "under FSDP1 (its flat parameters have no reset after a failed step; fsdp_version: 2 has)"
    return None


def _wrapped(trainer: Any) -> bool:
    """Whether Trainer runs the model inside a DDP / FSDP / DeepSpeed wrapper (several processes, or sharded)."""
    args = getattr(trainer, "args", None)
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    return bool(sharded) or getattr(args, "world_size", 1) > 1


# ---- helpers ---------------------------------------------------------------------------------


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, dict):
        tensors = [value for value in inputs.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
        if "input_ids" in inputs and isinstance(inputs["input_ids"], torch.Tensor):
            return int(inputs["input_ids"].shape[0])
        return int(tensors[0].shape[0]) if tensors else None
    return None


def _split(inputs: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
    size = _batch_size(inputs) or 0
    pieces = []
    for start in range(0, size, chunk):
        pieces.append({
            key: value[start : start + chunk]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size else value
            for key, value in inputs.items()
        })
    return pieces


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _cuda_alloc_retries() -> int | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))


def _join(ranks: list[int]) -> str:
    return ", ".join(str(rank) for rank in ranks)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
