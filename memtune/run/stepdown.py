"""The OOM guard's step-down policy: which configuration comes next after CUDA runs out of memory mid-run.

Pure: plain dataclasses and functions on TrainConfig, no torch and no Trainer, so that the order of
step-downs is tested by itself (tests/test_stepdown.py asserts exact sequences of configurations).
`memtune.run.guard` asks it for the next configuration and applies it to a running Trainer.

The rules (the guard's module docstring says why each holds mid-run):
- The effective batch per device (micro-batch x accumulation) never changes: the optimizer, the
  learning-rate schedule and the data position stay as they are, so no optimizer step is lost or repeated.
- The Trainer's dataloader keeps yielding the plan's micro-batches; the guard cuts each into equal
  pieces, so a micro-batch is always a divisor of the loader's micro-batch (`chunk_size`).
- What may change mid-run: the micro-batch (with the accumulation), gradient checkpointing (switched on
  in place, when the model has the method) and the chunked loss (a single unwrapped process whose
  Trainer has a `train_config`). Everything in FIXED_FIELDS needs a new optimizer or a relaunch.
- Order: the plan's fallbacks first (fastest first, as `memtune fit` saved them), each used at most
  once; when none is usable, the built-in ladder (`step_down_ladder`) from the configuration that failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtune.config import TrainConfig

FIXED_FIELDS = ("seq_len", "weights_dtype", "amp", "adapter", "offload", "num_gpus", "strategy", "optimizer")
"""TrainConfig fields a step-down never changes: precision, adapter, offload, the number of GPUs and
how they share the work (DDP or FSDP) need a new optimizer or a relaunch, and the sequence length is
the data's."""


def chunk_size(micro_batch: int, loader_micro_batch: int) -> int:
    """The largest divisor of the loader's micro-batch that is <= `micro_batch` (pieces of equal size).

    Both in sequences. Example: micro-batch 3 from a loader of 4 runs as pieces of 2.
    """
    return max(size for size in range(1, min(micro_batch, loader_micro_batch) + 1) if loader_micro_batch % size == 0)


def step_down_ladder(config: TrainConfig, loader_micro_batch: int, chunked_loss: bool = False) -> list[TrainConfig]:
    """Lighter configurations with the same effective batch, in the order the guard tries them when the
    plan's fallbacks are used up: smaller micro-batches (divisors of the loader's micro-batch), then
    gradient checkpointing at each micro-batch, then (when `chunked_loss`) the chunked loss at micro-batch 1.

    Example: 4 x 2 from a loader of 4 gives 2 x 4, 1 x 8, then 4 x 2, 2 x 4, 1 x 8 with checkpointing,
    then 1 x 8 with checkpointing and the chunked loss.
    """
    per_device = config.micro_batch_size * config.grad_accum_steps
    sizes = [size for size in range(loader_micro_batch, 0, -1) if loader_micro_batch % size == 0]
    ladder = [config.replace(micro_batch_size=size, grad_accum_steps=per_device // size)
              for size in sizes if size < config.micro_batch_size]
    prefix = config.adapter is not None and config.adapter.kind == "prefix"  # peft refuses it with checkpointing
    if (not config.gradient_checkpointing or config.checkpoint_layers is not None) and not prefix:
        ladder += [config.replace(micro_batch_size=size, grad_accum_steps=per_device // size,
                                  gradient_checkpointing=True, checkpoint_layers=None)
                   for size in sizes if size <= config.micro_batch_size]
    if chunked_loss and config.loss == "standard" and not prefix:  # not from Liger's: not surely smaller
        ladder.append(config.replace(micro_batch_size=1, grad_accum_steps=per_device, gradient_checkpointing=True,
                                     checkpoint_layers=None, loss="chunked"))
    return ladder


@dataclass(frozen=True)
class StepDownPolicy:
    """What the guard may step down to, for one plan under one Trainer.

    The guard keeps the position in `fallbacks` (how many were used or skipped) and passes it in;
    the policy itself never changes. `can_checkpoint` and `can_switch_loss` come from the Trainer
    (`memtune.run.guard` reads them when it attaches); both are False until then.
    """

    plan_config: TrainConfig
    """The plan's configuration: FIXED_FIELDS keep its values."""
    fallbacks: tuple[TrainConfig, ...] = ()
    """The plan's fallbacks, in the order `memtune fit` saved them (fastest first)."""
    loader_micro_batch: int = 0
    """Sequences per micro-batch that the dataloader yields (Trainer's per_device_train_batch_size);
    0: the plan's micro-batch."""
    per_device_batch: int = 0
    """Sequences per optimizer step on one device (micro-batch x accumulation); 0: the plan's."""
    can_checkpoint: bool = False
    """The model has activation_checkpointing_enable (transformers 5.24) or gradient_checkpointing_enable."""
    can_switch_loss: bool = False
    """The chunked loss may be switched on (a single process without a DDP / FSDP wrapper, a Trainer with
    `train_config`)."""

    def __post_init__(self) -> None:
        if not self.loader_micro_batch:
            object.__setattr__(self, "loader_micro_batch", self.plan_config.micro_batch_size)
        if not self.per_device_batch:
            object.__setattr__(self, "per_device_batch",
                               self.plan_config.micro_batch_size * self.plan_config.grad_accum_steps)
        object.__setattr__(self, "fallbacks", tuple(self.fallbacks))

    def next_config(self, failed: TrainConfig, position: int = 0) -> tuple[TrainConfig | None, int]:
        """The configuration to run after `failed` ran out of memory, and the new position in `fallbacks`.

        The first usable fallback at or after `position`; when none is, the first usable rung of
        `step_down_ladder(failed, ...)` (position then len(fallbacks)); None when nothing is left.
        The configuration is returned as written; `normalized` gives the micro-batch the guard runs.
        """
        for index in range(position, len(self.fallbacks)):
            if self.usable(self.fallbacks[index], failed):
                return self.fallbacks[index], index + 1
        position = len(self.fallbacks)
        for candidate in step_down_ladder(failed, self.loader_micro_batch, chunked_loss=self.can_switch_loss):
            if self.usable(candidate, failed):
                return candidate, position
        return None, position

    def usable(self, candidate: TrainConfig, failed: TrainConfig) -> bool:
        """Same effective batch, changes only what can change mid-run, and lighter than `failed` somewhere:
        a smaller micro-batch as run (`chunk_size`), checkpointing switched on, the checkpointed layers' inputs
        offloaded (set with checkpointing, `can_checkpoint`), or the chunked loss switched on."""
        if candidate.micro_batch_size * candidate.grad_accum_steps != self.per_device_batch:
            return False
        if any(getattr(candidate, name) != getattr(self.plan_config, name) for name in FIXED_FIELDS):
            return False
        if candidate.micro_batch_size > self.loader_micro_batch:
            return False
        if candidate.loss != failed.loss and not self.can_switch_loss:
            return False
        checkpointing = candidate.checkpointing_rank > failed.checkpointing_rank
        if checkpointing and not self.can_checkpoint:
            return False
        smaller = chunk_size(candidate.micro_batch_size, self.loader_micro_batch) < failed.micro_batch_size
        chunked = candidate.loss == "chunked" and failed.loss != "chunked"
        offloaded = candidate.offload_activations and not failed.offload_activations and self.can_checkpoint
        return smaller or checkpointing or chunked or offloaded

    def normalized(self, config: TrainConfig) -> TrainConfig:
        """`config` with the micro-batch the guard really runs (a divisor of the loader's micro-batch) and
        the accumulation that keeps the effective batch."""
        chunk = chunk_size(config.micro_batch_size, self.loader_micro_batch)
        return config.replace(micro_batch_size=chunk, grad_accum_steps=self.per_device_batch // chunk)

    def step_downs(self, start: TrainConfig | None = None) -> list[TrainConfig]:
        """The configurations the guard runs after each of consecutive OOMs, starting from `start` (default
        the plan's configuration), until nothing lighter is left: the whole path, normalized."""
        current = start if start is not None else self.plan_config
        position = 0
        path: list[TrainConfig] = []
        while True:
            candidate, position = self.next_config(current, position)
            if candidate is None:
                return path
            current = self.normalized(candidate)
            path.append(current)

