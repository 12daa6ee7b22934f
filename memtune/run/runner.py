"""Run a plan: the model with its weights, the data batched by --packing (run.data), the Hugging Face Trainer set
up as the plan says, the OOM guard, progress on stderr, checkpoints, Ctrl-C and --resume.

    memtune run PLAN [--data FILE] [--packing concat|none|bfd|padding-free] [--output-dir DIR] [--resume]
                     [--text-field text] [--max-steps N]

(cli.py parses that into a `config.RunOptions` and calls `relaunch`, then `run_plan`.)

The model: a local directory with weights or a hub id is loaded with from_pretrained; a catalog name
(or a directory with only config.json) starts from random weights, with a warning. The step is the
one memtune predicted and verified (memtune.recipe): `Plan.prepare` applies dtype, checkpointing and
the adapter; `Plan.training_arguments` sets micro-batch, accumulation, autocast and fused AdamW;
the chunked loss is the causal LM's own forward (`recipe.use_chunked_loss`, applied by `Plan.prepare`), so
Trainer's `model(**inputs)` computes it on one GPU, under DDP and under FSDP alike. Offload and multi-GPU
come from the accelerate config when started under `accelerate launch` (`run.launch`); the
runner builds no distribution of its own.

Ctrl-C: the first finishes the current optimizer step, saves a checkpoint and stops; a second stops at
once and saves the last completed step (unless it came inside the optimizer update). `resume=True`
continues from the newest complete checkpoint-N in the output directory at step N + 1, with the data
position, optimizer, schedule and the configuration the OOM guard had reached.

Checkpoints are atomic: `PlanTrainer._save_checkpoint` has Trainer write checkpoint-N inside a
saving-checkpoint-N folder and renames it into place when every file is written (transformers 5.17 and
5.24 write straight into checkpoint-N, so a process killed mid-save left a folder that looked like a
checkpoint). A checkpoint-N counts as complete with a readable trainer_state.json and the weights or
adapter (`checkpoint_problem`); --resume says which one it continues and removes the incomplete ones and
leftover saving-checkpoint-N folders, saying so.

Output directory: the model (or adapter) and tokenizer, checkpoint-N folders, plan.json and
run_summary.json (steps, loss curve, peak memory per band of steps, tokens/s, wall time, the plan).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import shlex
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints  # transformers 5.17 and 5.24 alike

from memtune.config import SAVE_TOTAL_LIMIT, TrainConfig, format_bytes, require_deepspeed, require_liger
from memtune.errors import UsageError
from memtune.fit import check_sequence_length, checkpoint_layers_for
from memtune.measure import memory
from memtune.options import RunOptions
from memtune.plan import Plan
from memtune.recipe import step as recipe
from memtune.run import data as data_module
from memtune.run.guard import GuardedTrainer, OomGuard
from memtune.run.model import default_output_dir, load_model

SUMMARY_FILE = "run_summary.json"
PLAN_FILE = "plan.json"
MEMORY_BANDS = 20
"""The run's steps are cut into about this many bands; run_summary.json has the peak memory of each."""
CHECKPOINT_PREFIX = "checkpoint-"
"""Trainer's PREFIX_CHECKPOINT_DIR (transformers.trainer_utils) and a dash."""
SAVING_PREFIX = "saving-"
"""saving-checkpoint-N: where a checkpoint is written before its rename. Trainer's rotation globs
checkpoint-* and get_last_checkpoint matches ^checkpoint-N$: neither sees it."""
CHECKPOINT_WEIGHTS = ("*.safetensors", "*.bin", "pytorch_model_fsdp*")
"""A checkpoint's model or adapter: model*.safetensors, adapter_model.*, pytorch_model*.bin, FSDP shard folders."""


@dataclass
class RunSummary:
    """What a run did. Bytes are integers; memory fields are None on a CPU."""

    output_dir: str
    status: str
    """"completed"; "interrupted" (Ctrl-C) or "failed" (`error`): `checkpoint` says where to resume."""
    global_step: int
    """Optimizer steps completed, over all runs of this output directory."""
    max_steps: int
    resumed_from_step: int | None
    loss_curve: list[list[float]]
    """[step, training loss] for every step, earlier runs of the directory included."""
    memory_bands: list[dict[str, Any]]
    """{"first_step", "last_step", "peak_allocated_bytes", "peak_reserved_bytes"} per band of steps (this run)."""
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    predicted_total_bytes: int
    tokens_per_step: int
    """Input tokens per optimizer step, all GPUs, as the batches held them (mean over this run: Trainer's
    num_input_tokens_seen, padding not counted); the planned micro-batch x accumulation x GPUs x seq_len where they
    were not counted (include_num_input_tokens_seen "no" among the overrides)."""
    tokens_per_second: float
    """Input tokens (as counted for `tokens_per_step`) over this run's steps after the first (which includes
    warm-up)."""
    train_seconds: float
    wall_seconds: float
    """Everything: loading, tokenising, training, saving."""
    final_train_config: dict[str, Any]
    """The configuration in use at the end (differs from the plan's when the OOM guard stepped down)."""
    guard_events: list[dict[str, Any]]
    checkpoint: str | None
    """The latest checkpoint folder (where --resume continues)."""
    model_origin: str
    tokenizer_origin: str
    data: str
    num_sequences: int
    num_tokens: int
    device: str
    plan: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    """Warnings printed during the run."""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class PlanTrainer(GuardedTrainer):
    """Trainer with the OOM guard attached (`oom_guard=`, memtune.run.guard.GuardedTrainer) whose loss follows
    `train_config.loss`: "chunked" is the causal LM's forward made chunked (`recipe.use_chunked_loss`: LM head and
    cross-entropy a chunk of tokens at a time). The OOM guard may switch it mid-run."""

    def __init__(self, *args: Any, train_config: TrainConfig, **kwargs: Any):
        self.train_config = train_config
        self._saving_into: str | None = None
        self._autocast_chunked_forward = False
        """The chunked forward was applied mid-run, past accelerate's autocast wrapper (`compute_loss`)."""
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        return self._saving_into or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer's checkpoint, written into saving-checkpoint-N/checkpoint-N (Trainer takes the folder from
        `_get_output_dir`) and renamed to checkpoint-N once complete, the OOM guard's state included; then
        Trainer's rotation (save_total_limit) on the output directory. Every rank writes its part (RNG state,
        FSDP shards) before the main process renames."""
        self.oom_guard.check_can_save()  # before the first barrier: after the ranks gave up it would never return
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging = run_dir / f"{SAVING_PREFIX}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a process killed while saving
        self.accelerator.wait_for_everyone()
        self._saving_into = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_into = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.oom_guard.save_state(staging / name)
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)  # an incomplete checkpoint-N of an interrupted run
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Trainer's loss, `model(**inputs)`: with the chunked loss the causal LM's forward computes it
        (`recipe.use_chunked_loss`, which `Plan.prepare` applied), under accelerate's autocast wrapper of forward
        (one GPU, DDP) or FSDP's mixed precision, and divided by Trainer's `num_items_in_batch` as the model's own
        loss is. When the OOM guard switches to the chunked loss mid-run (one unwrapped process,
        `guard.can_switch_loss`), it is applied here; it then replaces the forward accelerate had wrapped in
        autocast, so that autocast is entered here instead."""
        if self.train_config.loss == "chunked" and not recipe.uses_chunked_loss(self.accelerator.unwrap_model(model)):
            recipe.use_chunked_loss(self.accelerator.unwrap_model(model))
            self._autocast_chunked_forward = True
        with self.accelerator.autocast() if self._autocast_chunked_forward else contextlib.nullcontext():
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )


# ---- statistics (computed here, printed by ProgressReporter) ------------------------------------


class RunStats(TrainerCallback):
    """Loss per step, step times, tokens/s and peak memory per band of steps."""

    def __init__(self, tokens_per_step: int, cuda: bool):
        self.tokens_per_step = tokens_per_step
        """Planned: used where Trainer does not count the input tokens (include_num_input_tokens_seen "no")."""
        self.cuda = cuda
        self.counted = False
        """Whether Trainer counts the input tokens (state.num_input_tokens_seen)."""
        self.step_end_tokens: list[int] = []
        """state.num_input_tokens_seen at each step end (with `counted`)."""
        self._start_tokens = 0
        self.loss_curve: list[list[float]] = []
        self.memory_bands: list[dict[str, Any]] = []
        self.step_end_times: list[float] = []
        self.first_step: int | None = None
        self.last_step = 0
        self.max_steps = 0
        self.in_optimizer_update = False
        """True from just before optimizer.step() until the global step is counted."""
        self._band_steps = 1
        self._band_first = 1
        self._start = 0.0
        self._peak_allocated = 0
        self._peak_reserved = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.max_steps = state.max_steps
        self._band_steps = max(1, math.ceil(state.max_steps / MEMORY_BANDS))
        self._band_first = state.global_step + 1
        self.last_step = state.global_step
        self._start = time.perf_counter()
        self.counted = getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False)
        self._start_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)  # a resumed run's earlier ones
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.in_optimizer_update = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.in_optimizer_update = False
        self.step_end_times.append(time.perf_counter())
        self.step_end_tokens.append(int(getattr(state, "num_input_tokens_seen", 0) or 0))
        if self.first_step is None:
            self.first_step = state.global_step
        self.last_step = state.global_step
        if state.global_step % self._band_steps == 0 or state.global_step >= state.max_steps:
            self._close_band(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss_curve.append([state.global_step, float(logs["loss"])])

    def _close_band(self, step: int) -> None:
        if step < self._band_first:
            return
        band: dict[str, Any] = {"first_step": self._band_first, "last_step": step,
                                "peak_allocated_bytes": None, "peak_reserved_bytes": None}
        if self.cuda:
            band["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            band["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            self._peak_allocated = max(self._peak_allocated, band["peak_allocated_bytes"])
            self._peak_reserved = max(self._peak_reserved, band["peak_reserved_bytes"])
            torch.cuda.reset_peak_memory_stats()
        self.memory_bands.append(band)
        self._band_first = step + 1

    def finish(self) -> None:
        """Close the open band (a run stopped between band ends)."""
        self._close_band(self.last_step)

    @property
    def peak_allocated_bytes(self) -> int | None:
        return self._peak_allocated if self.cuda else None

    @property
    def peak_reserved_bytes(self) -> int | None:
        return self._peak_reserved if self.cuda else None

    @property
    def train_seconds(self) -> float:
        return (self.step_end_times[-1] - self._start) if self.step_end_times else 0.0

    def tokens_per_second(self, last: int | None = None) -> float:
        """Over the steps after this run's first (or the last `last` steps): the input tokens Trainer counted in
        them, else the planned `tokens_per_step` each."""
        times = self.step_end_times if last is None else self.step_end_times[-(last + 1):]
        if len(times) < 2:
            return 0.0
        if self.counted:
            tokens = self.step_end_tokens if last is None else self.step_end_tokens[-(last + 1):]
            return (tokens[-1] - tokens[0]) / max(times[-1] - times[0], 1e-9)
        return self.tokens_per_step * (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def mean_tokens_per_step(self) -> int:
        """Input tokens per optimizer step over this run (Trainer's count), else the planned `tokens_per_step`."""
        if not self.counted or not self.step_end_tokens:
            return self.tokens_per_step
        return round((self.step_end_tokens[-1] - self._start_tokens) / len(self.step_end_tokens))


class ProgressReporter(TrainerCallback):
    """Progress on stderr: a rich progress bar on a terminal, a plain line every few steps otherwise."""

    def __init__(self, stats: RunStats, console: Console, every_steps: int = 10):
        self.stats = stats
        self.console = console
        self.every_steps = every_steps
        self._progress: Any = None
        self._task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), console=self.console)
            self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
            self._progress.start()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        info = f"loss {logs['loss']:.4f}"
        if tokens_per_second := self.stats.tokens_per_second(last=10):
            info += f"  {tokens_per_second:,.0f} tokens/s"
        if self.stats.cuda:
            info += f"  peak reserved {format_bytes(torch.cuda.max_memory_reserved())}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif step % self.every_steps == 0 or step == state.max_steps or step == self.stats.first_step:
            self.console.print(f"step {step}/{state.max_steps}  {info}", highlight=False, soft_wrap=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class GracefulStop(TrainerCallback):
    """First Ctrl-C: finish the optimizer step, save a checkpoint, stop. Second: KeyboardInterrupt."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.requested = False
        self._previous: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set in the main thread; Ctrl-C raises KeyboardInterrupt there
            return
        self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: finishing this optimizer step, then saving a checkpoint (Ctrl-C again stops at once)")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


# ---- the run -------------------------------------------------------------------------------------


def run_plan(
    plan: Plan,
    options: RunOptions | None = None,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    progress: bool = True,
    device: str | None = None,
    console: Console | None = None,
    training_overrides: dict[str, Any] | None = None,
    **changes: Any,
) -> RunSummary:
    """Train `plan.model` on the data (default: the sample corpus) as the plan says; see the module docstring.

    options: the `memtune run` options (RunOptions; its `plan` path is not read: the Plan is given);
    changes: RunOptions fields given one by one over `options`, e.g.
        run_plan(plan, data="train.jsonl", output_dir="out", max_steps=100, learning_rate=1e-4)
    - max_steps: optimizer steps in all (a resumed run counts the earlier ones); None: one pass over the data;
    - learning_rate: default 2e-4 with an adapter, 2e-5 for full fine-tuning;
    - resume: continue from the latest checkpoint-N in the output directory.
    callbacks: more TrainerCallbacks (they run after memtune's own).
    progress: print progress and warnings on stderr (`console`, default a stderr Console).
    device: "cpu" to run on the CPU even where CUDA is available; None: CUDA when present.
    training_overrides: any other TrainingArguments fields.

    A TRL plan (trainer "sft" / "dpo") runs `run.trl_run.run_trl`, which writes no checkpoints yet: resume,
    save_steps, packing, text_field and callbacks are refused for it (UsageError, `trl_run.unsupported_options`).

    Returns the summary, also written to OUTPUT_DIR/run_summary.json. Ctrl-C does not raise: the
    summary says "interrupted" and names the checkpoint (none for a TRL run). Errors raise (MemtuneError for bad
    input - an unknown option among `changes` too -, NothingFitsError when the OOM guard has no lighter
    configuration left), after the last completed step was saved as a checkpoint.

    Output: rank 0 alone prints (`is_main_process`); on the other ranks of a launched run the libraries'
    warnings, log records and progress bars are off too, and the libraries' progress bars (loading and
    writing the weights) show only where memtune's own progress is live (a terminal) - see `library_output`.
    """
    console = console or Console(stderr=True)
    main = is_main_process()
    if plan.train_config.trainer != "causal-lm" or (options is not None and options.trainer not in (None, "causal-lm")):
        from memtune.run import trl_run  # TRL's SFTTrainer / DPOTrainer: their own module

        options = run_options(options, changes)
        if options.trainer not in (None, plan.train_config.trainer):
            raise UsageError(f"--trainer {options.trainer} differs from the plan's {plan.train_config.trainer}: plan "
                             f"again with --trainer {options.trainer} (its memory differs)")
        if problems := trl_run.unsupported_options(options, callbacks=len(callbacks)):
            raise UsageError(f"a TRL {plan.train_config.trainer.upper()} plan does not take: " + "; ".join(problems))
        summary = RunSummary(**trl_run.run_trl(plan, options, device=device, training_overrides=training_overrides,
                                               log=lambda message: console.print(message, highlight=False)))
        if main:
            (Path(summary.output_dir) / SUMMARY_FILE).write_text(summary.to_json() + "\n")
        return summary
    with library_output(main=main, bars=progress and main and console.is_terminal):
        return _run_plan(plan, options, changes, callbacks=callbacks, progress=progress, device=device,
                         console=console, training_overrides=training_overrides)


def _run_plan(
    plan: Plan,
    options: RunOptions | None,
    changes: dict[str, Any],
    *,
    callbacks: Sequence[TrainerCallback],
    progress: bool,
    device: str | None,
    console: Console,
    training_overrides: dict[str, Any] | None,
) -> RunSummary:
    """`run_plan` under `library_output`."""
    options = run_options(options, changes)
    given = memory.expandable_in_environment()
    memory.set_allocator_mode(plan.train_config.expandable_segments)  # before CUDA starts: the mode predicted
    notes_at_start = []
    if given is not None and given != plan.train_config.expandable_segments:
        notes_at_start.append(f"{memory.ALLOC_CONF} said expandable_segments:{str(given).lower()}; the plan was "
                              f"predicted with expandable_segments:{plan.train_config.expandable_segments}, so the "
                              f"run uses that ({memory.ALLOC_CONF}={os.environ[memory.ALLOC_CONF]})")
    data, output_dir, resume, max_steps = options.data, options.output_dir, options.resume, options.max_steps
    text_field, learning_rate, save_steps, seed = (options.text_field, options.learning_rate, options.save_steps,
                                                   options.seed)
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from memtune.sources import resolve

    wall_start = time.perf_counter()
    quiet = Console(quiet=True)
    # every rank of a multi-GPU run runs this function: rank 0 alone prints, or each line comes once per GPU
    reporter_console = console if progress and is_main_process() else quiet
    notes: list[str] = []

    def warn(message: str) -> None:
        notes.append(message)
        reporter_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    for message in notes_at_start:
        warn(message)
    output = Path(output_dir) if output_dir is not None else default_output_dir(plan.model)
    check_run_inputs(plan, options)
    checkpoint = _checkpoint_to_resume(output, resume, plan,
                                       lambda message: reporter_console.print(message, highlight=False), warn)
    use_cpu = device == "cpu" or not torch.cuda.is_available()

    source = resolve(plan.model, trust_remote_code=plan.trust_remote_code)
    if source.note:
        warn(source.note)
    for message in _launch_warnings(plan, source.config):
        warn(message)
    tokenizer, tokenizer_origin = data_module.load_tokenizer(source)
    config = plan.train_config
    packing = options.packing or plan.packing  # the batching the plan predicted, unless --packing says otherwise
    if packing != plan.packing:
        warn(f"--packing {packing}: the plan predicted {plan.packing} batches (memtune plan|fit --data --packing "
             f"{packing} predicts these)")
    dataset = data_module.build_dataset(tokenizer, config.seq_len, data, text_field,
                                        vocab_size=getattr(source.config, "vocab_size", None), packing=packing)
    if len(dataset) < config.micro_batch_size * config.grad_accum_steps:
        rows = f"sequences of {config.seq_len} tokens" if packing == "concat" else f"{packing} rows"
        warn(f"the data makes {len(dataset)} {rows}, fewer than one effective batch "
             f"({config.effective_batch_size}): every optimizer step reuses them")

    overrides: dict[str, Any] = {
        "output_dir": str(output),
        "max_steps": max_steps if max_steps is not None else -1,
        "num_train_epochs": 1,
        "learning_rate": learning_rate if learning_rate is not None else (2e-4 if config.adapter else 2e-5),
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "seed": seed,
        "data_seed": seed,
        "disable_tqdm": True,
        "use_cpu": use_cpu,
        "log_level_replica": "error",  # transformers' warnings once, from the main process, not once per GPU
        # the datasets hold model inputs only (run.data); Trainer's column removal reads the forward's signature, and
        # the chunked loss's forward takes position_ids through **kwargs: the bfd rows' position_ids were dropped
        "remove_unused_columns": False,
        # the tokens the batches really hold (rows shorter than seq_len under none / bfd / padding-free): Trainer
        # counts them (state.num_input_tokens_seen). concat and padding-free batches hold no padding ("all"); none
        # and bfd rows are padded with the tokenizer's pad id, which "non_padding" leaves out (where it is also the
        # end-of-text id, each document's closing token too); a tokenizer without one pads with end-of-text and
        # the padding is counted (Trainer would warn at every batch)
        "include_num_input_tokens_seen": ("non_padding" if packing in ("none", "bfd")
                                          and getattr(tokenizer, "pad_token_id", None) is not None else "all"),
        **(training_overrides or {}),
    }
    args = plan.training_arguments(**overrides)
    set_seed(seed)
    # Several processes or offload: build on the CPU, as from_pretrained does, and let the launcher's
    # FSDP move only shards to the GPU (a whole fp32 8B model is 32 GB on each GPU before sharding).
    build_device = "cpu" if _sharded() or _process_count() > 1 else args.device
    model, model_origin, pretrained = load_model(source, config, build_device)
    if not pretrained:
        warn(f"{plan.model}: {model_origin}")
    with _quiet_deprecations():
        model = plan.prepare(model, warm_up=args.device.type == "cuda")

    cuda = args.device.type == "cuda"
    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * args.world_size * config.seq_len
    stats = RunStats(tokens_per_step, cuda)
    reporter = ProgressReporter(stats, reporter_console)
    guard = plan.oom_guard(log=warn)
    stop = GracefulStop(warn)
    if checkpoint is not None:
        guard.restore(checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    if args.should_save:
        plan.save(output / PLAN_FILE)

    with _quiet_deprecations():
        trainer = PlanTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
            data_collator=data_module.collator_for(packing, tokenizer),
            callbacks=[stats, guard, stop, reporter, *callbacks],
            train_config=config, oom_guard=guard,
        )
    for printer in (PrinterCallback, ProgressCallback):  # they print to stdout / tqdm; the reporter replaces them
        trainer.remove_callback(printer)

    status, failure = "completed", None
    try:
        with stop.installed(), _quiet_deprecations():
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.requested:
            status = "interrupted"
    except KeyboardInterrupt:
        status = "interrupted"
        reporter.stop()
        _save_last_step(trainer, stats, guard, warn)
    except Exception as error:  # noqa: BLE001 - saved, summarised, then raised again below
        status, failure = "failed", error
        reporter.stop()
        _free_memory()
        _save_last_step(trainer, stats, guard, warn)
    finally:
        reporter.stop()
        stats.finish()

    if status == "completed":
        # Every rank calls it: under FSDP gathering the full state dict is collective (Trainer writes on
        # the main process only). Called on rank 0 alone, it waited for the other ranks forever.
        trainer.save_model(str(output))  # the model (or only the adapter) and the tokenizer
    summary = RunSummary(
        output_dir=str(output),
        status=status,
        global_step=int(trainer.state.global_step),
        max_steps=int(trainer.state.max_steps),
        resumed_from_step=_step_of(checkpoint),
        loss_curve=_merged_loss_curve(output, checkpoint, stats.loss_curve),
        memory_bands=stats.memory_bands,
        peak_allocated_bytes=stats.peak_allocated_bytes,
        peak_reserved_bytes=stats.peak_reserved_bytes,
        predicted_total_bytes=plan.predicted_total_bytes,
        tokens_per_step=stats.mean_tokens_per_step(),
        tokens_per_second=stats.tokens_per_second(),
        train_seconds=stats.train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        final_train_config=guard.current.to_dict(),
        guard_events=[event.to_dict() for event in guard.events],
        checkpoint=str(latest) if (latest := find_checkpoints(output).latest) is not None else None,
        model_origin=model_origin,
        tokenizer_origin=tokenizer_origin,
        data=dataset.source,
        num_sequences=len(dataset),
        num_tokens=dataset.num_tokens,
        device=str(args.device),
        plan=plan.to_dict(),
        notes=notes,
        error=f"{type(failure).__name__}: {failure}" if failure is not None else "",
    )
    if args.should_save:
        (output / SUMMARY_FILE).write_text(summary.to_json() + "\n")
    if failure is not None:
        raise failure
    if status == "interrupted":
        reporter_console.print(f"stopped at step {summary.global_step}; continue with --resume "
                               f"(checkpoint: {summary.checkpoint or 'none'})", highlight=False)
    return summary


@dataclass
class Checkpoints:
    """The checkpoint folders of an output directory."""

    latest: Path | None
    """The newest complete checkpoint-N (where --resume continues)."""
    incomplete: list[tuple[Path, str]]
    """checkpoint-N folders that are not complete, and why (newest first)."""
    leftovers: list[Path]
    """saving-checkpoint-N folders: saves that never reached their rename."""


def find_checkpoints(output: Path) -> Checkpoints:
    """Sort the checkpoint-N folders of `output` into the newest complete one and the incomplete ones."""
    pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
    found = Checkpoints(None, [], [])
    if not output.is_dir():
        return found
    steps: list[tuple[int, Path]] = []
    for path in output.iterdir():
        if not path.is_dir():
            continue
        if path.name.startswith(SAVING_PREFIX + CHECKPOINT_PREFIX):
            found.leftovers.append(path)
        elif match := pattern.match(path.name):
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
        why = checkpoint_problem(path)
        if why is not None:
            found.incomplete.append((path, why))
        elif found.latest is None:
            found.latest = path
    found.leftovers.sort()
    return found


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint-N folder cannot be resumed, or None when it is complete: a trainer_state.json with its
    global_step (Trainer writes it after the weights, optimizer and RNG state) and the model or adapter."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    if not any(any(folder.glob(pattern)) for pattern in CHECKPOINT_WEIGHTS):
        return "no model or adapter weights"
    return None


# ---- options and the launcher (`memtune run` in cli.py) -------------------------------------------


def run_options(options: RunOptions | None, changes: dict[str, Any]) -> RunOptions:
    """`options` (default RunOptions()) with `changes` (RunOptions fields) applied; UsageError names unknown ones."""
    if options is not None and not isinstance(options, RunOptions):
        raise UsageError(f"run_plan's second argument is a RunOptions, got {type(options).__name__}: "
                         "give data, output_dir, max_steps, ... as keywords")
    known = {field_.name for field_ in dataclasses.fields(RunOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise UsageError(f"run_plan got unknown options {unknown}; the options are {sorted(known)}")
    return dataclasses.replace(options or RunOptions(), **changes)


def relaunch_command(plan: Plan, options: RunOptions, config_dir: Path) -> list[str] | None:
    """`accelerate launch` of this same `memtune run` when the plan needs a launcher - several GPUs (DDP or
    FSDP, as its strategy says), CPU offload (FSDP) or DeepSpeed (always) - and this process was not started by
    one; None when this process can run the plan itself. `options` may be any object with RunOptions' attributes.
    Raises UsageError for a plan over several machines in a process no launcher started (`several_machines_problem`:
    each machine starts its own processes from the launch files)."""
    from memtune.run import launch
    from memtune.sources import resolve

    if not isinstance(options, RunOptions):
        names = [field_.name for field_ in dataclasses.fields(RunOptions)]
        # an argparse Namespace; fields it lacks (added since it was written) keep their defaults
        options = RunOptions(**{name: getattr(options, name) for name in names if hasattr(options, name)})
    config = plan.train_config
    problem = several_machines_problem(plan, options.plan)
    if problem:
        raise UsageError(problem)
    if (config.num_gpus == 1 and config.offload == "none" and not config.deepspeed) or _sharded() \
            or _process_count() > 1:
        return None
    name = ("accelerate_deepspeed.yaml" if config.deepspeed else "accelerate_ddp.yaml" if config.replicated
            else "accelerate_fsdp.yaml")  # a DeepSpeed plan's JSON is written beside it (launch.DEEPSPEED_CONFIG_FILE)
    config_path = launch.write_accelerate_config(
        config_dir / name, config, model_config=resolve(plan.model, trust_remote_code=plan.trust_remote_code).config
    )
    return launch.launch_command(config_path, ["run", *options.command_line()])


def several_machines_problem(plan: Plan, plan_path: str | Path | None) -> str | None:
    """Why this process cannot run a plan over several machines (`TrainConfig.num_nodes` > 1): it was not started
    by a launcher (`accelerate launch` / torchrun set WORLD_SIZE, or an FSDP / DeepSpeed config), so `memtune run`
    would have to start the other machines' processes, which it cannot (the engines distribute; memtune writes their
    launch files: `run.launch.write_launch_files`). None for a plan on one machine or a launched process. The
    instruction names the launch files beside `plan_path` where they are (fit and plan --out write them there)."""
    config = plan.train_config
    if config.num_nodes == 1 or _sharded() or _process_count() > 1:
        return None
    folder = Path(plan_path).resolve().parent if plan_path else None
    shown = shlex.quote(str(Path(plan_path).resolve())) if plan_path else "PLAN"
    if folder is not None and (folder / "accelerate_machine0.yaml").is_file():
        where = (f"with the launch files in {folder} (fill in main_process_ip in each accelerate_machine*.yaml "
                 f"first; {folder / 'LAUNCH.txt'} says how, also for torchrun and SLURM): on each machine R, 0 to "
                 f"{config.num_nodes - 1}: accelerate launch --config_file {folder}/accelerate_machine{{R}}.yaml "
                 f"-m memtune run {shown}")
    else:
        where = (f"write its launch files with `memtune plan MODEL ... --nodes {config.num_nodes} --gpus "
                 f"{config.num_gpus} --out DIR` (or `memtune fit ... --nodes {config.num_nodes}`, which writes them "
                 "next to the plan), then on each machine R: accelerate launch --config_file "
                 "DIR/accelerate_machine{R}.yaml -m memtune run PLAN")
    return (f"the plan spans {config.num_nodes} machines ({config.gpus_words}) and `memtune run` starts the "
            f"processes of one machine only: start it on every machine through its launch files instead; {where}")


def relaunch(plan: Plan, options: RunOptions, log: Callable[[str], None]) -> int | None:
    """Run `memtune run` under `accelerate launch` (one process per GPU, a generated DDP or FSDP2 config) when
    the plan needs it (see `relaunch_command`): the launcher's exit code. None: run the plan in this process."""
    import subprocess

    check_run_inputs(plan, options)
    output_dir = Path(options.output_dir or default_output_dir(plan.model))
    command = relaunch_command(plan, options, output_dir)
    if command is None:
        return None
    config = plan.train_config
    engine = "DeepSpeed" if config.deepspeed else "DDP" if config.replicated else "FSDP"
    log(f"the plan needs {engine} ({plan.train_config.describe()}): launching {' '.join(command)}")
    return subprocess.run(command, check=False).returncode


def leave_process_group() -> None:
    """Destroy the process group the launcher's Trainer made, so that each rank exits cleanly (after a
    completed run; after a failure the error propagates and the launcher ends the other ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- internals -----------------------------------------------------------------------------------


def _checkpoint_to_resume(output: Path, resume: bool, plan: Plan, say: Callable[[str], None],
                          warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint to resume (None: start afresh); with `resume`, the incomplete checkpoints
    and leftover saving-checkpoint-N folders are removed (by the main process), each named in a warning."""
    found = find_checkpoints(output)
    if not resume:
        names = [path.name for path, _ in found.incomplete] + ([found.latest.name] if found.latest else [])
        if names:
            raise UsageError(
                f"output directory '{output}' already holds checkpoints ({', '.join(sorted(names))}) of an earlier "
                "run: pass --resume to continue it, or choose another --output-dir"
            )
        return None
    if found.latest is None:
        if found.incomplete:
            skipped = "; ".join(f"{path.name}: {why}" for path, why in found.incomplete)
            raise UsageError(f"--resume: output directory '{output}' holds no complete checkpoint ({skipped}): "
                             "remove those folders and run without --resume, or choose another --output-dir")
        raise UsageError(f"--resume: output directory '{output}' holds no checkpoint-N folder; "
                         "run without --resume to start, or point --output-dir at the run to continue")
    saved = output / PLAN_FILE
    if saved.is_file():
        earlier = Plan.load(saved)
        if (earlier.model, earlier.train_config) != (plan.model, plan.train_config):
            raise UsageError(
                f"--resume: '{output}' was trained with another plan ({earlier.model}: "
                f"{earlier.train_config.describe()}); resume it with {saved}, or choose another --output-dir"
            )
    main_process = is_main_process()
    for path, why in found.incomplete:
        warn(f"skipped {path.name}: incomplete ({why}; the process was stopped while saving it)"
             + (": removed it" if main_process else ""))
    for path in found.leftovers:
        warn(f"removed {path.name}: a checkpoint whose save was interrupted" if main_process
             else f"skipped {path.name}: a checkpoint whose save was interrupted")
    if main_process:
        for path in [path for path, _ in found.incomplete] + found.leftovers:
            shutil.rmtree(path, ignore_errors=True)
    say(f"resuming from {found.latest.name} (step {_step_of(found.latest)})")
    return found.latest


def check_run_inputs(plan: Plan, options: RunOptions) -> None:
    """Raise one UsageError with every problem of the options, the output directory (the default one
    included) and what this process cannot run of the plan, before any work."""
    problems = options.problems()
    missing = options.data_problem()
    if missing:
        problems.append(missing)
    if options.output_dir is None:
        problem = RunOptions.output_dir_problem(default_output_dir(plan.model))
        if problem:
            problems.append(problem.replace("--output-dir", "the default output directory", 1)
                            + " with --output-dir")
    try:
        require_deepspeed(plan.train_config)
    except UsageError as error:
        problems.append(f"the plan runs DeepSpeed: {error}")
    if plan.train_config.loss == "liger":
        try:
            require_liger()
        except UsageError as error:
            problems.append(f"the plan uses Liger's fused loss: {error}")
    machines = several_machines_problem(plan, options.plan)
    if machines:
        problems.append(machines)
    if problems:
        raise UsageError("; ".join(problems))


def _launch_warnings(plan: Plan, model_config: Any) -> list[str]:
    """What this process cannot honour of the plan (raises for a sequence the model cannot take)."""
    config = plan.train_config
    check_sequence_length(model_config, config.seq_len)  # the rules plan and fit apply
    checkpoint_layers_for(model_config, config.checkpoint_layers, "the plan's checkpoint_layers")
    messages = []
    processes = _process_count()
    if config.world_size > 1 and processes != config.world_size:
        start = (f"`accelerate launch --num_processes {config.num_gpus}`" if config.num_nodes == 1 else
                 f"the launch files of its {config.num_nodes} machines (accelerate_machine{{R}}.yaml beside the plan)")
        messages.append(
            f"the plan is for {config.gpus_words} but {processes} process(es) run: the effective batch is "
            f"{config.micro_batch_size * config.grad_accum_steps * processes} instead of "
            f"{config.effective_batch_size}; start it with {start}"
        )
    if config.offload != "none" and not _sharded() and not config.deepspeed:
        messages.append(
            f"the plan offloads {config.offload} to the CPU, which needs `accelerate launch` with an FSDP "
            "offload config (`memtune run` writes one); this run keeps everything on the GPU and needs more memory"
        )
    if config.replicated and _sharded():
        messages.append(
            "the plan replicates the model on every GPU (DDP) but this process was launched with an FSDP or "
            "DeepSpeed config: it runs sharded, not as planned and verified; launch it with `memtune run` "
            "(it writes a MULTI_GPU accelerate config)"
        )
    if config.deepspeed and not _deepspeed_launched():
        messages.append(
            f"the plan runs {config.zero.describe(config.offload) if config.zero else 'DeepSpeed'} but this process "
            "was not launched with a DeepSpeed accelerate config: launch it with `memtune run` (it writes one)"
        )
    if config.world_size > 1 and config.sharded and processes > 1 and not _sharded():
        messages.append(
            f"the plan shards over {config.gpus_words} with FSDP but this process was launched without an "
            "FSDP config: Trainer replicates the model on every GPU (DDP), which needs more memory than "
            "planned; launch it with `memtune run` (it writes the FSDP2 accelerate config)"
        )
    return messages


def is_main_process() -> bool:
    """Whether this process prints (progress, warnings, the summary): the only process, or rank 0 of those
    `accelerate launch` / torchrun started (they set RANK, the global rank; each rank runs the same
    `memtune run`, and what every rank printed came once per GPU)."""
    return int(os.environ.get("RANK", "0")) == 0


def _process_count() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_launched() -> bool:
    """Started by `accelerate launch` with a DeepSpeed config (the launcher sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def _sharded() -> bool:
    """Started by `accelerate launch` with an FSDP or DeepSpeed config (the launcher sets these)."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true")
        for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def _save_last_step(trainer: Trainer, stats: RunStats, guard: OomGuard, warn: Callable[[str], None]) -> None:
    """Save a checkpoint of the last completed optimizer step after an interruption or a failure."""
    step = int(trainer.state.global_step)
    if step == 0:
        warn("stopped before the first optimizer step completed: no checkpoint to save")
        return
    if stats.in_optimizer_update:
        warn(f"stopped inside the optimizer update of step {step + 1}: its state may be half-written, so no "
             "checkpoint was saved; --resume continues from the latest earlier checkpoint")
        return
    assert trainer.args.output_dir is not None  # run_plan always sets it
    folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if folder.is_dir():
        return
    try:
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)  # Trainer's own format, so resume reads it
        guard.save_state(folder)
    except Exception as error:  # noqa: BLE001 - the original failure matters more than this one
        warn(f"could not save a checkpoint of step {step}: {error}")


def _step_of(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def _merged_loss_curve(output: Path, checkpoint: Path | None, curve: list[list[float]]) -> list[list[float]]:
    """This run's loss curve after the earlier runs' (up to the step resumed from)."""
    if checkpoint is None or not (output / SUMMARY_FILE).is_file():
        return curve
    resumed = _step_of(checkpoint) or 0
    try:
        earlier = json.loads((output / SUMMARY_FILE).read_text()).get("loss_curve", [])
    except json.JSONDecodeError:
        return curve
    return [point for point in earlier if point[0] <= resumed] + curve


@contextlib.contextmanager
def library_output(*, main: bool, bars: bool) -> Iterator[None]:
    """What transformers, peft, torch and huggingface_hub may print while a run works, put back as it was on
    leaving (also after an error). `main` False (a rank other than 0): their Python warnings are ignored and
    transformers logs errors only, so that what they say comes once, from rank 0. `bars` False: their
    progress bars (tqdm: "Loading weights", "Writing model shards") are off, where memtune prints plain
    progress lines (not a terminal) or nothing."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_disabled = are_progress_bars_disabled()
    with warnings.catch_warnings():
        if not main:
            warnings.simplefilter("ignore")
            transformers_logging.set_verbosity_error()
        if not bars:
            transformers_logging.disable_progress_bar()  # huggingface_hub's too
        try:
            yield
        finally:
            transformers_logging.set_verbosity(verbosity)
            if transformers_bars:
                transformers_logging.enable_progress_bar()  # which switches huggingface_hub's on too
            (disable_progress_bars if hub_bars_disabled else enable_progress_bars)()


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """transformers 5.24 deprecates gradient_checkpointing_enable, which recipe.prepare_model and
    TrainingArguments(gradient_checkpointing=...) of 5.17 use; the warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
        yield


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
