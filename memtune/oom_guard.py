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

Known limitations:
- Single process, unsharded only. Under `accelerate launch` with several processes an OOM on one rank
  would leave the others waiting in a collective, and inside an FSDP / DeepSpeed step it can leave
  parameters gathered; there the guard only monitors and the OOM propagates.
- An OOM in gradient clipping or in the optimizer step is not handled (their memory does not depend
  on the micro-batch); it propagates, and the runner saves the last completed step.
- It relies on Trainer calling `get_batch_samples` and then `training_step` per micro-batch
  (transformers 4.46 to 5.x). A `training_step` call with inputs it did not see through
  `get_batch_samples` gets no step-down: its OOM propagates.
- The evaluation loss of a split batch is the mean of the pieces' losses weighted by their number of
  sequences: exact for packed data (equal lengths), approximate for padded batches.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from memtune.config import TrainConfig
from memtune.errors import NothingFitsError
from memtune.verify import is_oom

logger = logging.getLogger("memtune.oom_guard")

STATE_FILE = "memtune_oom_guard.json"
"""Written into each checkpoint folder: the configuration the guard had reached, for resuming."""
RETRY_WARNING_INTERVAL_STEPS = 50
"""After a warning about allocator retries, stay quiet for this many optimizer steps."""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OomGuard(TrainerCallback):
    """Catch CUDA out-of-memory in training and evaluation, step down, continue. See the module docstring.

    Add it to a Trainer's callbacks: it attaches itself to the Trainer that calls it (or call
    `attach(trainer)` yourself). `events` lists what it did; `current` is the configuration in use.
    """

    def __init__(
        self,
        train_config: TrainConfig,
        fallbacks: Sequence[TrainConfig] = (),
        log: Callable[[str], None] | None = None,
        step_down: bool = True,
        alloc_retries: Callable[[], int | None] | None = None,
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
        sharded = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))
        self._active = self.step_down and args.world_size == 1 and not sharded
        if self.step_down and not self._active:
            why = (f"in runs of {args.world_size} processes (stepping down on one rank would leave the others waiting)"
                   if args.world_size > 1 else "under FSDP / DeepSpeed (an OOM inside a sharded step can leave "
                   "parameters gathered)")
            self.log(f"the OOM guard only monitors {why}")
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
            if failure is None:
                self._reported.append(loss.detach())
                return loss
            # Outside the except block: the traceback (and the activations its frames hold) is gone.
            model.zero_grad(set_to_none=True)
            self._step_down("train", failure, redone=index + 1)
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

    def _step_down(self, phase: str, failure: str, redone: int) -> None:
        failed = self.current
        step = self._global_step()
        _free_memory()
        candidate = self._next_config(failed)
        if candidate is None:
            self.events.append(GuardEvent("oom", phase, step, failure, failed.to_dict(), None, redone))
            raise NothingFitsError(
                f"CUDA out of memory at optimizer step {step + 1} with {failed.describe()} ({failure}), and no lighter "
                f"configuration with the same effective batch ({self._per_device_batch} per device) is left. "
                "Make a plan for a smaller budget (`memtune fit ... --budget`), with LoRA or offload, or a shorter sequence",
                suggestions=["LoRA (--lora)", "offload", "shorter --seq-len"],
            )
        self._apply(candidate)
        self.events.append(GuardEvent("oom", phase, step, failure, failed.to_dict(), self.current.to_dict(), redone))
        self.log(
            f"CUDA out of memory in optimizer step {step + 1} ({failure}); stepped down from "
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
        from memtune import recipe

        return hasattr(self.trainer, "train_config") and hasattr(recipe, "forward_loss")

    def _apply(self, config: TrainConfig) -> None:
        chunk = _chunk_size(config.micro_batch_size, self._loader_micro_batch)
        config = config.replace(micro_batch_size=chunk, grad_accum_steps=self._per_device_batch // chunk)
        if config.gradient_checkpointing != self.current.gradient_checkpointing:
            _set_checkpointing(self.trainer.model, config.gradient_checkpointing)
        if hasattr(self.trainer, "train_config"):
            self.trainer.train_config = config
        self.current = config

    def _global_step(self) -> int:
        return int(self.trainer.state.global_step) if self.trainer is not None else 0

    # ---- evaluation --------------------------------------------------------------------------

    def _prediction_step(self, original: Callable, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any) -> Any:
        while True:
            failure = None
            try:
                return self._predict(original, model, inputs, prediction_loss_only, ignore_keys)
            except Exception as error:  # noqa: BLE001 - an OOM is handled below, anything else re-raised
                if not self._active or not is_oom(error):
                    raise
                failure = _first_line(error)
            size = _batch_size(inputs) or 1
            chunk = min(self._eval_chunk or size, size)
            step = self._global_step()
            _free_memory()
            if chunk <= 1:
                self.events.append(GuardEvent("oom", "eval", step, failure, {"eval_batch": chunk}, None))
                raise NothingFitsError(f"CUDA out of memory in evaluation with one sequence per batch ({failure}): "
                                       "evaluate with a shorter sequence, or on a larger GPU")
            self._eval_chunk = chunk // 2
            self.events.append(GuardEvent("oom", "eval", step, failure, {"eval_batch": chunk}, {"eval_batch": self._eval_chunk}))
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
