"""The OOM guard: when CUDA runs out of memory mid-run, step down to a lighter configuration and go on
from the last completed optimizer step, instead of dying (or restarting from step 0).

How it works (the simplest design that is exact). Trainer fetches all micro-batches of an optimizer
step before it runs any of them (`Trainer.get_batch_samples`), calls `training_step` once per
micro-batch, then clips and steps the optimizer. The guard wraps those two methods on the Trainer
instance (`attach`):

- it keeps the current optimizer step's micro-batches;
- when `training_step` raises an out-of-memory error (`verify.is_oom`: torch.cuda.OutOfMemoryError,
  cuBLAS/cuDNN allocation failures), it drops the gradients accumulated so far in this step (a
  backward that failed half-way has added to some parameters' .grad and not to others), frees the
  memory, moves to the next configuration of `plan.fallbacks` that keeps the effective batch, and
  runs this step's micro-batches again from the first, each cut into chunks of the new micro-batch;
- later steps keep the new configuration.

The optimizer never saw the failed attempt: its state, the learning-rate schedule, the global step and
the data position (the dataloader still yields the plan's micro-batches; the guard cuts them) are
unchanged, so no optimizer step is lost or repeated. The loss handed back to Trainer is corrected
for what it had already logged. An OOM in evaluation (`prediction_step`) halves the evaluation batch
the same way.

What a fallback may change mid-run: the micro-batch (micro x accumulation stays the effective batch:
chunks of 2 from micro-batches of 4 double the accumulation), gradient checkpointing (switched on in
place), and the chunked loss (for Trainers with a `train_config` attribute, as the runner's
PlanTrainer). Fallbacks that change precision, adapter, offload or the number of GPUs need a new
optimizer or a relaunch; they are skipped. When `plan.fallbacks` has nothing usable left, the guard
tries a built-in ladder: smaller micro-batches, then checkpointing, then the chunked loss.

It also warns when the caching allocator starts retrying cudaMalloc after flushing its cache
(`torch.cuda.memory_stats()["num_alloc_retries"]` rises): steps slow down and an OOM is near.

Several processes (`accelerate launch`, one per GPU). Every rank joins one small all-reduce (MAX of
"did I run out of memory", one entry per rank) after every attempt of a micro-batch, successful or
not, on a gloo process group of its own (`attach` creates it; every rank attaches in the same
order), so the agreement never rides on the NCCL communicator an OOM may have left with unmatched
collectives.
- Every rank ran out (the usual case: packed equal-length batches and identical shards make every
  rank allocate the same, so they fail at the same allocation, and every collective issued so far
  is matched): each rank resets the model's distributed state (`reset_after_failed_step`), drops
  the gradients, frees memory and steps down to the same next configuration (the same plan and
  fallbacks on every rank), then redoes the step as above.
- Only some ranks ran out: their NCCL collectives no longer match and cannot be recovered. Every
  rank raises OomOnSomeRanksError (a NothingFitsError: exit code 3) naming the ranks, the step and
  the configuration; the lighter configuration is recorded in the latest checkpoint, so
  `memtune run PLAN --resume` continues with it. If the agreement itself times out
  (AGREEMENT_TIMEOUT_SECONDS: a healthy rank is stuck in a CUDA synchronisation behind an NCCL
  collective the failed rank never joined), the failed rank raises the same error then. After
  either, the Trainer's `_save_checkpoint` refuses to run: it is collective under FSDP and would
  wait forever on the broken communicator.

What is reset after an OOM that every rank saw:
- FSDP2 (accelerate's `fsdp_version: 2`; memtune's multi-GPU and offload plans): a forward or
  backward that raised leaves FSDP modules with gathered parameters, FORWARD / PRE_BACKWARD training
  states, in-flight collective state and a queued-callback flag set (the autograd engine drops the
  post-backward callback of a failed backward). torch 2.13 resets all that with the root's
  `FSDPModule.reset_iter_state()`; torch 2.11 has no such method, and the guard does the same steps
  on 2.11's attributes. Either way the unsharded gradients that `no_sync` micro-batches accumulate
  are dropped too (neither torch does that). Also in a single process (one GPU with CPU offload).
- DDP (several processes without FSDP): a backward that failed after DDP's reducer was prepared
  leaves it expecting the rest of the reduction, and the next forward raises "Expected to have
  finished reduction in the prior iteration". The reducer's `_reset_state()` (what DDP itself calls
  to recover in `_update_process_group`) clears that; bucket all-reduces already launched are
  drained before the step is redone.

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

import datetime
import gc
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers import TrainerCallback

from memtune.config import TrainConfig
from memtune.errors import MemtuneError, NothingFitsError
from memtune.measure.memory import is_oom

logger = logging.getLogger("memtune.run.guard")

STATE_FILE = "memtune_oom_guard.json"
"""Written into each checkpoint folder: the configuration the guard had reached, for resuming."""
RETRY_WARNING_INTERVAL_STEPS = 50
"""After a warning about allocator retries, stay quiet for this many optimizer steps."""
AGREEMENT_TIMEOUT_SECONDS = 300
"""How long a rank waits in the agreement for the others (several processes). A step of a plan that
fits takes seconds; a rank still missing after minutes is stuck behind a collective that a failed
rank never joined, or has died."""
_FIXED_FIELDS = ("seq_len", "weights_dtype", "amp", "adapter", "offload", "num_gpus", "optimizer")


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

    Add it to a Trainer's callbacks: it attaches itself to the Trainer that calls it (or call
    `attach(trainer)` yourself). `events` lists what it did; `current` is the configuration in use.
    `agreement_timeout_seconds`: how long a rank waits for the others to say whether they ran out of
    memory (several processes).
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
        self.fallbacks = list(fallbacks)
        self.current = train_config
        self.log = log or logger.warning
        self.step_down = step_down
        self.events: list[GuardEvent] = []
        self.trainer: Any = None
        self._read_alloc_retries = alloc_retries or _cuda_alloc_retries
        self._loader_micro_batch = train_config.micro_batch_size
        self._per_device_batch = train_config.micro_batch_size * train_config.grad_accum_steps
        self._position = 0  # next index into self.fallbacks
        self._eval_chunk: int | None = None
        self._samples: list[Any] | None = None
        self._index = 0
        self._reported: list[torch.Tensor] = []
        self._retries_seen: int | None = None
        self._last_retry_warning_step: int | None = None
        self._restored: TrainConfig | None = None
        self._active = True
        self._agreement_timeout_seconds = agreement_timeout_seconds
        self._agreement_group: Any = None  # gloo group of every rank; None in a single process
        self._rank = 0
        self._world_size = 1

    # ---- attaching ---------------------------------------------------------------------------

    def attach(self, trainer: Any) -> Any:
        """Wrap `trainer`'s get_batch_samples, training_step and prediction_step; returns the trainer."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise ValueError("this OomGuard is already attached to another Trainer: make one guard per Trainer")
        self.trainer = trainer
        args = trainer.args
        self._loader_micro_batch = args.per_device_train_batch_size
        self._per_device_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if (self.current.micro_batch_size, self.current.grad_accum_steps) != (
            args.per_device_train_batch_size, args.gradient_accumulation_steps
        ):
            self.current = self.current.replace(
                micro_batch_size=args.per_device_train_batch_size, grad_accum_steps=args.gradient_accumulation_steps
            )
        unsupported = _unsupported_parallelism(trainer)
        distributed = args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if unsupported is None and args.world_size > 1 and not distributed:
            unsupported = f"in runs of {args.world_size} processes without a torch.distributed process group"
        self._active = self.step_down and unsupported is None
        if self.step_down and not self._active:
            self.log(f"the OOM guard only monitors {unsupported}: an out-of-memory error there propagates")
        if self._active and distributed:
            # Collective: every rank attaches its guard in the same order (run_plan does).
            self._agreement_group = torch.distributed.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self._agreement_timeout_seconds))
            self._rank = torch.distributed.get_rank()
            self._world_size = torch.distributed.get_world_size()
        original_batches = trainer.get_batch_samples
        original_training_step = trainer.training_step
        original_prediction_step = trainer.prediction_step

        def get_batch_samples(*args: Any, **kwargs: Any) -> Any:
            samples, num_items = original_batches(*args, **kwargs)
            self._samples, self._index, self._reported = samples, 0, []
            return samples, num_items

        def training_step(model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            return self._training_step(original_training_step, model, inputs, num_items_in_batch)

        def prediction_step(model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
            return self._prediction_step(original_prediction_step, model, inputs, prediction_loss_only, ignore_keys)

        trainer.get_batch_samples = get_batch_samples
        trainer.training_step = training_step
        trainer.prediction_step = prediction_step
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        if self._restored is not None:
            self._apply(self._restored)
            self._restored = None
        return trainer

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
        folder = Path(checkpoint_dir)
        if folder.is_dir():
            state = {"current": self.current.to_dict(), "events": [event.to_dict() for event in self.events]}
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    # ---- TrainerCallback ---------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None and (trainer := _calling_trainer()) is not None:
            self.attach(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None and (trainer := _calling_trainer()) is not None:
            self.attach(trainer)
        if self.trainer is None:
            self.log("the OOM guard could not find its Trainer: it only monitors; call guard.attach(trainer) to let it step down")
        self._retries_seen = self._read_alloc_retries()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._samples, self._reported = None, []
        self._check_alloc_retries(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            self.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    # ---- training ----------------------------------------------------------------------------

    def _training_step(self, original: Callable, model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        samples, index = self._samples, self._index
        self._index += 1
        if not self._active or samples is None or index >= len(samples) or samples[index] is not inputs:
            return self._run(original, model, inputs, num_items_in_batch)
        redo = False
        while True:
            failure = None
            try:
                if redo:
                    # The whole step again, from its first micro-batch; hand back only what Trainer has not logged yet.
                    total = self._run(original, model, samples[0], num_items_in_batch)
                    for earlier in samples[1 : index + 1]:
                        total = total + self._run(original, model, earlier, num_items_in_batch)
                    loss = total - sum(self._reported) if self._reported else total
                else:
                    loss = self._run(original, model, inputs, num_items_in_batch)
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

    def _run(self, original: Callable, model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        """One micro-batch through Trainer's training_step, in chunks of the current micro-batch size."""
        size = _batch_size(inputs)
        chunk = self.current.micro_batch_size
        if size is None or chunk >= size:
            return original(model, inputs, num_items_in_batch)
        pieces = _split(inputs, chunk)
        trainer = self.trainer
        accumulation = getattr(trainer, "current_gradient_accumulation_steps", 1)
        # Losses that Trainer divides by the accumulation steps (models without num_items_in_batch):
        # each piece is 1/len(pieces) of the micro-batch.
        trainer.current_gradient_accumulation_steps = accumulation * len(pieces)
        try:
            total = original(model, pieces[0], num_items_in_batch)
            for piece in pieces[1:]:
                total = total + original(model, piece, num_items_in_batch)
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
                f"configuration with the same effective batch ({self._per_device_batch} per device) is left. "
                "Make a plan for a smaller budget (`memtune fit ... --budget`), with LoRA or offload, or a shorter sequence",
                suggestions=["LoRA (--lora)", "offload", "shorter --seq-len"],
            )
        self._apply(candidate)
        self.events.append(GuardEvent("oom", phase, step, failure, failed.to_dict(), self.current.to_dict(), redone,
                                      ranks=ranks))
        where = f" on every rank ({self._world_size})" if ranks else ""
        self.log(
            f"CUDA out of memory{where} in optimizer step {step + 1} ({failure}); stepped down from "
            f"{failed.describe()} to {self.current.describe()} (effective batch kept) and ran the step again from its "
            f"first micro-batch ({redone} redone); no optimizer step was lost or repeated"
        )

    def _next_config(self, failed: TrainConfig) -> TrainConfig | None:
        for position in range(self._position, len(self.fallbacks)):
            if self._usable(self.fallbacks[position], failed):
                self._position = position + 1
                return self.fallbacks[position]
        self._position = len(self.fallbacks)
        for candidate in step_down_ladder(failed, self._loader_micro_batch, chunked_loss=self._can_switch_loss()):
            if self._usable(candidate, failed):
                return candidate
        return None

    def _usable(self, candidate: TrainConfig, failed: TrainConfig) -> bool:
        """Same effective batch, changes only what can change mid-run, and lighter than `failed` somewhere."""
        if candidate.micro_batch_size * candidate.grad_accum_steps != self._per_device_batch:
            return False
        if any(getattr(candidate, name) != getattr(self.plan_config, name) for name in _FIXED_FIELDS):
            return False
        if candidate.micro_batch_size > self._loader_micro_batch:
            return False
        if candidate.loss != failed.loss and not self._can_switch_loss():
            return False
        if candidate.gradient_checkpointing and not failed.gradient_checkpointing and not _can_checkpoint(self.trainer):
            return False
        smaller = _chunk_size(candidate.micro_batch_size, self._loader_micro_batch) < failed.micro_batch_size
        checkpointing = candidate.gradient_checkpointing and not failed.gradient_checkpointing
        chunked = candidate.loss == "chunked" and failed.loss != "chunked"
        return smaller or checkpointing or chunked

    def _can_switch_loss(self) -> bool:
        """The chunked loss calls the base model and the head itself, around any DDP / FSDP wrapper:
        only a single unwrapped process may switch to it (under DDP the ranks would stop averaging)."""
        from memtune.recipe import step as recipe

        if _wrapped(self.trainer):
            return False
        return hasattr(self.trainer, "train_config") and hasattr(recipe, "forward_loss")

    def _normalized(self, config: TrainConfig) -> TrainConfig:
        """`config` with the micro-batch the guard really runs (a divisor of the loader's micro-batch)."""
        chunk = _chunk_size(config.micro_batch_size, self._loader_micro_batch)
        return config.replace(micro_batch_size=chunk, grad_accum_steps=self._per_device_batch // chunk)

    def _apply(self, config: TrainConfig) -> None:
        config = self._normalized(config)
        if config.gradient_checkpointing != self.current.gradient_checkpointing:
            _set_checkpointing(self.trainer.model, config.gradient_checkpointing)
        if hasattr(self.trainer, "train_config"):
            self.trainer.train_config = config
        self.current = config

    def _global_step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer is not None else 0

    # ---- several processes ---------------------------------------------------------------------

    def _agree(self, failure: str | None, phase: str) -> tuple[str | None, list[int]]:
        """After an attempt: (this rank's failure to step down for, or None to go on; the ranks that ran out).

        In a single process that is the process's own failure. With several, every rank calls this after
        every attempt and all learn who ran out: one all-reduce (MAX) of a flag per rank on the gloo group.
        Raises OomOnSomeRanksError when only some ranks ran out, or when the others never answer.
        """
        if self._agreement_group is None:
            return failure, []
        import torch.distributed as dist

        flags = torch.zeros(self._world_size, dtype=torch.int32)
        flags[self._rank] = int(failure is not None)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._agreement_group)
        except RuntimeError as error:  # gloo's timeout (DistBackendError), or a rank that died
            self._give_up(phase, failure, None, _first_line(error))
        ranks = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if not ranks:
            return None, []
        if len(ranks) < self._world_size:
            self._give_up(phase, failure, ranks, "")
        return failure, ranks

    def _give_up(self, phase: str, failure: str | None, ranks: list[int] | None, agreement_error: str) -> NoReturn:
        """Raise on this rank when the ranks cannot step down together (`ranks` None: the agreement failed)."""
        step = self._global_step()
        config = self.current
        where = f"optimizer step {step + 1}" if phase == "train" else f"evaluation after optimizer step {step}"
        # Trainer's checkpoint save is collective under FSDP: on the broken communicator it would never return.
        self._refuse_collective_saves(f"rank {self._rank} stopped because the ranks' collectives no longer match")
        if ranks is None and failure is None:
            raise MemtuneError(
                f"rank {self._rank}: the other ranks did not join the OOM guard's agreement after a micro-batch of {where} "
                f"within {self._agreement_timeout_seconds:g} s ({agreement_error}): one of them failed (see its error) "
                "or is stuck in a collective"
            )
        if ranks is None:
            what = (f"CUDA out of memory on rank {self._rank} of {self._world_size} in {where} with {config.describe()} "
                    f"({failure}), and the other ranks did not say within {self._agreement_timeout_seconds:g} s whether "
                    f"they did too ({agreement_error}): one is stuck behind an NCCL collective this rank never joined")
            ranks = [self._rank]
        else:
            healthy = [rank for rank in range(self._world_size) if rank not in ranks]
            what = (f"CUDA out of memory on rank{'s' if len(ranks) > 1 else ''} {_join(ranks)} of {self._world_size} "
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
        lighter = self._normalized(lighter)
        if getattr(args, "should_save", False):
            path = Path(checkpoint) / STATE_FILE
            saved = json.loads(path.read_text()) if path.is_file() else {"events": []}
            saved["current"] = lighter.to_dict()
            saved["events"] = saved.get("events", []) + [self.events[-1].to_dict()]
            path.write_text(json.dumps(saved, indent=2) + "\n")
        return (f", or resume from {Path(checkpoint).name} with `memtune run PLAN --resume`: it continues with "
                f"{lighter.describe()} (recorded in {STATE_FILE} there)")

    def _refuse_collective_saves(self, reason: str) -> None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise MemtuneError(f"checkpoint not saved: {reason}, and saving is collective on the broken communicator")

        if self.trainer is not None:
            self.trainer._save_checkpoint = refuse

    # ---- evaluation --------------------------------------------------------------------------

    def _prediction_step(self, original: Callable, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any) -> Any:
        while True:
            failure = result = None
            try:
                result = self._predict(original, model, inputs, prediction_loss_only, ignore_keys)
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
            self.events.append(GuardEvent("oom", "eval", step, failure, {"eval_batch": chunk}, {"eval_batch": self._eval_chunk},
                                          ranks=ranks))
            self.log(f"CUDA out of memory in evaluation ({failure}); evaluating {self._eval_chunk} sequences at a time "
                     f"instead of {chunk}")

    def _predict(self, original: Callable, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any) -> Any:
        size = _batch_size(inputs)
        if self._eval_chunk is None or size is None or self._eval_chunk >= size:
            return original(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        from transformers.trainer_pt_utils import nested_concat

        losses, logits, labels = [], None, None
        for piece in _split(inputs, self._eval_chunk):
            loss, piece_logits, piece_labels = original(model, piece, prediction_loss_only, ignore_keys=ignore_keys)
            if loss is not None:
                losses.append(loss.float() * _batch_size(piece))
            if piece_logits is not None:
                logits = piece_logits if logits is None else nested_concat(logits, piece_logits, padding_index=-100)
            if piece_labels is not None:
                labels = piece_labels if labels is None else nested_concat(labels, piece_labels, padding_index=-100)
        loss = torch.stack(losses).sum() / size if losses else None
        return loss, logits, labels

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
        message = (f"the CUDA caching allocator had to free its cache and retry cudaMalloc {new} time{'s' if new > 1 else ''} "
                   f"by step {step} ({retries} in all): memory is nearly full, steps slow down and an OOM may follow; "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True often helps, or a plan with a smaller budget")
        self.events.append(GuardEvent("alloc_retries", "train", step, message, self.current.to_dict(), alloc_retries=new))
        if self._last_retry_warning_step is None or step - self._last_retry_warning_step >= RETRY_WARNING_INTERVAL_STEPS:
            self._last_retry_warning_step = step
            self.log(message)


def step_down_ladder(config: TrainConfig, loader_micro_batch: int, chunked_loss: bool = False) -> list[TrainConfig]:
    """Lighter configurations with the same effective batch, in the order the guard tries them when the
    plan's fallbacks are used up: smaller micro-batches (divisors of the loader's micro-batch), then
    gradient checkpointing at each micro-batch, then the chunked loss at micro-batch 1."""
    per_device = config.micro_batch_size * config.grad_accum_steps
    sizes = [size for size in range(loader_micro_batch, 0, -1) if loader_micro_batch % size == 0]
    ladder = [config.replace(micro_batch_size=size, grad_accum_steps=per_device // size)
              for size in sizes if size < config.micro_batch_size]
    if not config.gradient_checkpointing:
        ladder += [config.replace(micro_batch_size=size, grad_accum_steps=per_device // size, gradient_checkpointing=True)
                   for size in sizes if size <= config.micro_batch_size]
    if chunked_loss and config.loss != "chunked":
        ladder.append(config.replace(micro_batch_size=1, grad_accum_steps=per_device, gradient_checkpointing=True, loss="chunked"))
    return ladder


# ---- the model's distributed state after a failed step ------------------------------------------


def reset_after_failed_step(model: Any) -> None:
    """Put `model`'s FSDP2 modules and DDP reducer back where a step starts after its forward or
    backward raised (see the module docstring). A model without either is left as it is."""
    reset_fsdp(model)
    _reset_ddp(model)


def reset_fsdp(model: Any) -> int:
    """Every FSDP2 module of `model` back to IDLE and resharded, its in-flight collective state and the
    failed step's unsharded gradients dropped; returns how many FSDP modules there are.

    A forward or backward that raised skips FSDP's post-forward hook and the post-backward final
    callback (the autograd engine drops queued callbacks on error): parameter groups stay gathered in
    FORWARD or PRE_BACKWARD, the root keeps `iter_forward_root` (the next forward would skip its root
    pre-forward) and `post_backward_final_callback_queued` (the next backward would never queue the
    callback that reduces gradients). torch 2.13's `FSDPModule.reset_iter_state()` on the root clears
    all of it (_fully_shard.py, _fsdp_state.py `_reset_iter_state`, _fsdp_param_group.py
    `_reset_iter_state`); torch 2.11 lacks it, and `_reset_iter_state` below repeats those steps.
    Neither clears the unsharded gradients that `set_requires_gradient_sync(False)` micro-batches
    (accelerate's `no_sync`) accumulate on each FSDPParam until the syncing one reduce-scatters them:
    the step is redone from its first micro-batch, so they are dropped here.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return 0
    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in modules:
        state = module._get_fsdp_state()
        if state._is_root:  # None before the first forward (lazy init): nothing ran, nothing to reset
            if hasattr(module, "reset_iter_state"):
                module.reset_iter_state()
            else:
                _reset_iter_state(state)
    for module in modules:
        for group in _param_groups(module._get_fsdp_state()):
            for fsdp_param in group.fsdp_params:
                # Private on both versions (_fsdp_param.py): the no_sync accumulation in the reduce dtype,
                # or the unsharded parameter's own .grad.
                fsdp_param.unsharded_accumulated_grad = None
                if (unsharded := getattr(fsdp_param, "_unsharded_param", None)) is not None:
                    unsharded.grad = None
    return len(modules)


def _reset_iter_state(root_state: Any) -> None:
    """torch 2.13's FSDPState._reset_iter_state for torch 2.11, on 2.11's private attributes: one
    reduce-scatter state in the communication context instead of a list, one `_fsdp_param_group` per
    state instead of `_fsdp_param_groups`. Waits on the events of in-flight collectives (every rank
    issued the same ones when all ran out of memory), then resets the trackers and reshards."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    stream = root_state._device_handle.current_stream()

    def wait(event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    context = root_state._comm_ctx
    if (gathered := getattr(context, "all_gather_state", None)) is not None:
        wait(gathered.event)
        context.all_gather_state = None
    if (scattered := getattr(context, "reduce_scatter_state", None)) is not None:  # 2.11
        wait(scattered.event)
        context.reduce_scatter_state = None
    for scattered in getattr(context, "reduce_scatter_states", []):  # 2.13
        wait(scattered.event)
    getattr(context, "reduce_scatter_states", []).clear()
    context.post_forward_order.clear()
    for state in root_state._state_ctx.all_states:
        state._modules_to_run_forward.clear()
        state._training_state = TrainingState.IDLE
        for group in _param_groups(state):
            if (result := group._all_gather_result) is not None:
                wait(result.all_gather_event)
                if isinstance(result.all_gather_work, dist.distributed_c10d.Work):
                    result.all_gather_work.wait()
                group._all_gather_result = None
            wait(group._post_reduce_event)
            group._post_reduce_event = None
            if group._all_reduce_state is not None:
                wait(group._all_reduce_state.event)
                group._all_reduce_state = None
            if group._reshard_after_forward_event is not None:
                group._wait_all_gather_streams_on_event(group._reshard_after_forward_event)
                group._reshard_after_forward_event = None
            group._partial_reduce_output = None
            group._post_forward_indices.clear()
            group._training_state = TrainingState.IDLE
            group._to_sharded()
    root_state._state_ctx.iter_forward_root = None
    root_state._state_ctx.post_backward_final_callback_queued = False


def _param_groups(state: Any) -> list[Any]:
    """A state's FSDPParamGroups: torch 2.13 keeps a list (per-parameter meshes), 2.11 one or None."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def _reset_ddp(model: Any) -> None:
    """DDP's reducer after a failed backward: `Reducer._reset_state()` (reducer.cpp: "Ensure forward can run
    despite previous backward not succeeding"; DDP's `_update_process_group` calls it to recover) clears
    `require_finalize_` and `expect_autograd_hooks_`, which a backward that failed after
    `prepare_for_backward` left set: the next forward would raise "Expected to have finished reduction in
    the prior iteration". Bucket all-reduces the failed backward launched (the same on every rank) must
    finish before the next backward writes the buckets again: on CUDA the guard's device synchronisation
    waits for them; gloo's barrier waits for all the group's earlier work."""
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if isinstance(module, DistributedDataParallel):
            module.reducer._reset_state()
            if not any(param.is_cuda for param in module.parameters()):
                torch.distributed.barrier(group=module.process_group)


# ---- helpers ---------------------------------------------------------------------------------


def _chunk_size(micro_batch: int, loader_micro_batch: int) -> int:
    """The largest divisor of the loader's micro-batch that is <= `micro_batch` (equal pieces)."""
    return max(size for size in range(1, min(micro_batch, loader_micro_batch) + 1) if loader_micro_batch % size == 0)


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, dict):
        tensors = [value for value in inputs.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
        if "input_ids" in inputs and isinstance(inputs["input_ids"], torch.Tensor):
            return int(inputs["input_ids"].shape[0])
        return int(tensors[0].shape[0]) if tensors else None
    return None


def _split(inputs: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
    size = _batch_size(inputs)
    pieces = []
    for start in range(0, size, chunk):
        pieces.append({
            key: value[start : start + chunk] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
            else value
            for key, value in inputs.items()
        })
    return pieces


def _set_checkpointing(model: Any, enabled: bool) -> None:
    """Switch non-reentrant activation checkpointing on or off (transformers 5.24 renamed the methods)."""
    if enabled:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    if hasattr(model, "config"):
        model.config.use_cache = False


def _can_checkpoint(trainer: Any) -> bool:
    model = getattr(trainer, "model", None)
    return any(hasattr(model, name) for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"))


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


def _unsupported_parallelism(trainer: Any) -> str | None:
    """Why the guard cannot step down under this Trainer's parallelism; None when it can."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "under DeepSpeed (its engine has no reset after a failed forward or backward)"
    if getattr(trainer, "is_fsdp_enabled", False) and not getattr(getattr(trainer, "accelerator", None), "is_fsdp2", False):
        return "under FSDP1 (its flat parameters have no reset after a failed step; fsdp_version: 2 has)"
    return None


def _wrapped(trainer: Any) -> bool:
    """Whether Trainer runs the model inside a DDP / FSDP / DeepSpeed wrapper (several processes, or sharded)."""
    args = getattr(trainer, "args", None)
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    return bool(sharded) or getattr(args, "world_size", 1) > 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _calling_trainer() -> Any:
    """The Trainer whose callback handler is calling us (found on the call stack), or None.

    Trainer passes no reference to itself to its callbacks; `Trainer.__init__` (on_init_end) and
    `_inner_training_loop` (on_train_begin) are two frames above the callback, with `self` the Trainer.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
    return None
