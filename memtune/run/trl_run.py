"""`memtune run` for a plan of TRL's SFTTrainer or DPOTrainer (`TrainConfig.trainer` "sft" / "dpo"): the plan's
model, TRL's trainer with the plan's config (`Plan.sft_config` / `Plan.dpo_config`) and memtune's OOM guard
(`run.guard.GuardedTrainerMixin`), on prompt-completion or preference JSON Lines (default: the samples generated
by memtune/data/make_trl_data.py).

The model is built as `Plan.prepare` builds it; for DPO under LoRA the adapter is left to DPOTrainer
(`peft_config=`), so that its reference is the policy's base with the adapter disabled, as memtune traced it (given
a ready peft model, DPOTrainer would add a second, frozen "ref" adapter instead); DPO of a full model gets a frozen
copy as `ref_model`, in the policy's dtype (what DPOTrainer builds itself from a hub id), unless the plan
precomputes the reference log-probs.

A padding-free SFT plan (`TrainConfig.sft_batches`) has SFTTrainer's max_length None (TRL enforces none without
packing): `truncate_rows` cuts the tokenised rows to the plan's seq_len, as traced, and the run's notes say how many.

The OOM guard cuts a micro-batch into smaller ones after an OOM. A DPO batch holds each pair's chosen row in its
first half and its rejected row in its second (`DataCollatorForPreference`): `GuardedDPOTrainer` hands the guard a
view of the batch by pair ([pairs, 2, ...]) so that a piece keeps both rows of its pairs, and turns each piece back
into DPOTrainer's layout. A padding-free SFT batch is one row: the guard cannot cut it (it then steps down through
the other techniques of the plan's fallbacks).

Returns the fields of `run.runner.RunSummary` (which builds it: this module sits below the runner and does not
import it). Raises UsageError (exit 2) with the install command when TRL is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from memtune.config import DEFAULT_SAVE_STEPS, require_trl
from memtune.errors import UsageError
from memtune.options import RunOptions
from memtune.plan import Plan
from memtune.run import data as data_module
from memtune.run.guard import GuardedTrainerMixin
from memtune.run.model import default_output_dir, load_model

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_DATA = {"sft": DATA_DIR / "sample_instructions.jsonl", "dpo": DATA_DIR / "sample_preferences.jsonl"}
"""What `memtune run --trainer sft|dpo` trains on without --data (memtune/data/make_trl_data.py writes them)."""
REQUIRED_FIELDS = {"sft": (("prompt", "completion"), ("messages",), ("text",)),
                   "dpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected"))}
"""The dataset formats each trainer takes (TRL's dataset formats: prompt-completion, conversational, language
modeling; preference with an explicit or implicit prompt)."""


def as_pairs(inputs: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """A DPO batch ([chosen rows; rejected rows]) as views by pair, [pairs, 2, ...], and the keys so viewed
    (per-pair tensors such as ref_chosen_logps stay as they are)."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape[0] % 2:
        return inputs, frozenset()
    rows = int(input_ids.shape[0])
    paired = frozenset(key for key, value in inputs.items()
                       if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows)
    return {key: value.view(2, rows // 2, *value.shape[1:]).transpose(0, 1) if key in paired else value
            for key, value in inputs.items()}, paired


def from_pairs(inputs: dict[str, Any], paired: frozenset[str]) -> dict[str, Any]:
    """`as_pairs` undone on a piece of the batch: [chosen rows; rejected rows] again, contiguous."""
    return {key: value.transpose(0, 1).reshape(-1, *value.shape[2:]) if key in paired else value
            for key, value in inputs.items()}


def guarded_trainer_class(trainer: str) -> type:
    """TRL's SFTTrainer or DPOTrainer with memtune's OOM guard (`GuardedTrainerMixin`; DPO's batches by pair)."""
    from trl import DPOTrainer, SFTTrainer

    if trainer == "sft":
        return type("GuardedSFTTrainer", (GuardedTrainerMixin, SFTTrainer), {})

    class PairedDPOTrainer(DPOTrainer):
        """DPOTrainer whose step's batches are handed on by pair (`as_pairs`) and turned back into its layout
        (`from_pairs`) in training_step: whatever sits between the two (the OOM guard) cuts them by pair."""

        _paired: frozenset[str] = frozenset()

        def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
            samples, num_items = super().get_batch_samples(*args, **kwargs)
            viewed = []
            for sample in samples:
                view, self._paired = as_pairs(sample)
                viewed.append(view)
            return viewed, num_items

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            return super().training_step(model, from_pairs(inputs, self._paired), num_items_in_batch)

    class GuardedDPOTrainer(GuardedTrainerMixin, PairedDPOTrainer):
        """DPOTrainer whose batches the guard sees by pair (module docstring): the mixin's get_batch_samples and
        training_step wrap PairedDPOTrainer's."""

    return GuardedDPOTrainer


def read_records(path: Path, trainer: str) -> list[dict[str, Any]]:
    """The rows of `path`, a JSON Lines file (one object per line) or a JSON file (an array of objects), each in one
    of the trainer's formats (`REQUIRED_FIELDS`: text fields hold strings; `messages`, and a conversational prompt /
    chosen / rejected, hold a list of {"role", "content"} objects). Read here, before datasets sees the file, so that
    every mistake in it is a UsageError (exit 2) naming the line and the value seen, never a parser's traceback.
    Raises UsageError for a directory, another suffix, an empty file, a line that is not JSON, a row that is not an
    object, or a row with no complete format."""
    if path.is_dir():
        raise UsageError(f"--data {str(path)!r} is a directory: a TRL run reads one .jsonl or .json file of rows")
    if path.suffix not in (".jsonl", ".json"):
        raise UsageError(f"--data {str(path)!r} is not JSON Lines or JSON (suffix {path.suffix or 'none'!r}): "
                         f"--trainer {trainer} reads rows with named fields, e.g. {SAMPLE_DATA[trainer].name}")
    text = path.read_text(encoding="utf-8", errors="replace")
    rows: list[Any] = []
    if path.suffix == ".json":
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            raise UsageError(f"--data {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(rows, list):
            raise UsageError(f"--data {str(path)!r} holds a JSON {type(rows).__name__}, not an array of rows")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UsageError(f"line {number} of {str(path)!r} is not JSON ({error.msg}): "
                                     f"{line[:80]!r}") from None
    if not rows:
        raise UsageError(f"--data {str(path)!r} has no rows: give a file with at least one row")
    wanted = " or ".join("+".join(fields) for fields in REQUIRED_FIELDS[trainer])
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UsageError(f"row {number} of {str(path)!r} is a JSON {type(row).__name__}, not an object with the "
                             f"fields {wanted}")
        fields = next((fields for fields in REQUIRED_FIELDS[trainer] if set(fields) <= set(row)), None)
        if fields is None:
            raise UsageError(f"--data {str(path)!r} row {number} has the fields {sorted(row)}; --trainer {trainer} "
                             f"needs {wanted} (e.g. {SAMPLE_DATA[trainer].name}, shipped with memtune)")
        for name in fields:
            value = row[name]
            turns = isinstance(value, list) and all(
                isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
                for turn in value)
            if not (isinstance(value, str) or (turns and value and name != "text")):
                kinds = "a string" + ("" if name == "text" else ' or a list of {"role", "content"} messages')
                raise UsageError(f"row {number} of {str(path)!r}: {name!r} holds {json.dumps(value)[:60]}; it must be "
                                 f"{kinds}")
    return rows


def load_rows(path: Path, trainer: str) -> Any:
    """The rows of `path` (`read_records`: checked first) as a datasets.Dataset. Raises UsageError as
    `read_records` does."""
    from datasets import load_dataset  # type: ignore[import-not-found]  # with TRL: the trl extra

    read_records(path, trainer)
    return load_dataset("json", data_files=str(path), split="train")


def unsupported_options(options: RunOptions, *, callbacks: int = 0) -> list[str]:
    """What `memtune run` takes for memtune's causal-LM step but not yet for a TRL plan, each with the value seen and
    what to do ([] when nothing is): --resume (a TRL run writes no checkpoints), --packing and --text-field (TRL
    batches and reads the rows itself: the plan's --sft-batches, the dataset formats of `REQUIRED_FIELDS`),
    --save-steps, and `callbacks` (how many TrainerCallbacks `run_plan` was given)."""
    problems = []
    if options.resume:
        problems.append("--resume: a TRL run writes no checkpoints yet, so there is none to continue from; run again "
                        "without --resume")
    if options.packing is not None:
        problems.append(f"--packing {options.packing}: TRL batches the rows itself, as the plan's --sft-batches says; "
                        "drop --packing (plan again with memtune plan|fit --trainer sft --sft-batches to change it)")
    if options.text_field != "text":
        problems.append(f"--text-field {options.text_field!r}: a TRL run reads TRL's dataset fields ("
                        + "; ".join(" or ".join("+".join(fields) for fields in formats)
                                    for formats in REQUIRED_FIELDS.values())
                        + "): rename the field in the data and drop --text-field")
    if options.save_steps != DEFAULT_SAVE_STEPS:
        problems.append(f"--save-steps {options.save_steps}: a TRL run writes no checkpoints yet; drop --save-steps")
    if callbacks:
        problems.append(f"callbacks ({callbacks} given): a TRL run does not take them yet; run_plan without "
                        "callbacks, or build TRL's trainer yourself from Plan.sft_config / Plan.dpo_config")
    return problems


def truncate_rows(dataset: Any, seq_len: int) -> tuple[Any, int]:
    """(the tokenised SFT rows of `dataset` cut to their first `seq_len` tokens, how many were longer). Every
    per-token column (a list as long as the row's input_ids: labels, completion_mask, ...) is cut alike; rows left
    with no label to learn (a prompt alone filling seq_len) are dropped, as SFTTrainer drops them when it truncates.

    Why: a padding-free plan traced micro-batch x seq_len tokens in the flattened row, and SFTTrainer takes
    max_length=None there (it does not enforce a max_length without packing, `Plan.sft_config`), so its rows
    would come as long as the data makes them."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longer = sum(length > seq_len for length in lengths)
    if not longer:
        return dataset, 0

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        size = len(row["input_ids"])
        return {key: value[:seq_len] if isinstance(value, list) and len(value) == size else value
                for key, value in row.items()}

    dataset = dataset.map(cut)
    if "labels" in dataset.column_names:
        dataset = dataset.filter(lambda row: any(label != -100 for label in row["labels"]))
    return dataset, longer


def run_trl(plan: Plan, options: RunOptions, *, device: str | None = None, log: Any = print,
            training_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with TRL's trainer as the plan says (module docstring); returns `RunSummary`'s fields. Raises
    UsageError for TRL missing or data in another format (a QLoRA DPO plan, not run yet, is refused by TrainConfig's
    checks when the plan loads)."""
    config = plan.train_config
    require_trl(f"memtune run of this {config.trainer.upper()} plan (--trainer {config.trainer})")
    from memtune.sources import resolve

    wall_start = time.perf_counter()
    output = Path(options.output_dir) if options.output_dir else default_output_dir(plan.model)
    if (output / "run_summary.json").is_file():  # a TRL run keeps no checkpoint: the model there would be lost
        raise UsageError(f"output directory '{output}' holds an earlier run (run_summary.json) whose model this run "
                         "would overwrite: choose another --output-dir, or remove that one")
    data_path = Path(options.data) if options.data else SAMPLE_DATA[config.trainer]
    dataset = load_rows(data_path, config.trainer)
    source = resolve(plan.model, trust_remote_code=plan.trust_remote_code)
    tokenizer, tokenizer_origin = data_module.load_tokenizer(source)
    conversational = [name for name in dataset.column_names if isinstance(dataset[0][name], list)]
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--data {str(data_path)!r} holds messages ({', '.join(conversational)}), which TRL renders "
                         f"with the tokenizer's chat template, and the tokenizer ({tokenizer_origin}) has none: give "
                         "prompt/completion (or prompt/chosen/rejected) text rows, or a model whose tokenizer has one")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    overrides: dict[str, Any] = {
        "output_dir": str(output), "max_steps": options.max_steps if options.max_steps is not None else -1,
        "num_train_epochs": 1, "logging_steps": 1, "save_strategy": "no", "seed": options.seed,
        "learning_rate": options.learning_rate or (2e-4 if config.adapter else 2e-5), "disable_tqdm": True,
        "use_cpu": use_cpu,
        # the tokens the batches really hold, for the summary's tokens/s (rows are as long as the data makes them,
        # up to seq_len): padded batches carry an attention_mask ("non_padding" sums it), flattened SFT batches
        # (packed, padding-free) hold no padding ("all")
        "include_num_input_tokens_seen": "non_padding" if config.trainer == "dpo" or config.sft_batches == "padded"
        else "all",
        **(training_overrides or {}),
    }
    args = plan.sft_config(**overrides) if config.trainer == "sft" else plan.dpo_config(**overrides)
    from transformers import set_seed

    set_seed(options.seed)  # the weights too, where they start random (as the causal-LM run seeds them)
    model, model_origin, pretrained = load_model(source, config, "cpu" if use_cpu else "cuda")
    if not pretrained:
        log(f"warning: {model_origin}")  # now, not only in the summary after the run
    if config.quantization is None:
        model = model.to("cpu" if use_cpu else "cuda")  # a quantised model is placed as bitsandbytes loaded it
    trainer_kwargs: dict[str, Any] = {}
    if config.trainer == "dpo" and config.adapter is not None:
        # DPOTrainer wraps the adapter itself, so that its reference is the base with the adapter disabled
        model = dataclasses.replace(plan, train_config=config.replace(adapter=None)).prepare(model)
        trainer_kwargs["peft_config"] = plan.lora_config()
    else:
        reference = None
        if config.reference == "full copy":
            reference = copy.deepcopy(model).requires_grad_(False).eval()
        model = plan.prepare(model)
        trainer_kwargs["ref_model"] = reference if config.trainer == "dpo" else None
        if config.trainer == "sft":
            trainer_kwargs.pop("ref_model")
    if torch.cuda.is_available() and not use_cpu:
        torch.cuda.reset_peak_memory_stats()
    guard = plan.oom_guard(log=log)
    trainer = guarded_trainer_class(config.trainer)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, oom_guard=guard, **trainer_kwargs)
    notes = [f"TRL {config.trainer.upper()} run (run.trl_run): no checkpoints or --resume yet"]
    if config.trainer == "sft" and config.sft_batches == "padding-free":
        # the rows as long as the plan traced them (SFTTrainer has max_length None here): `truncate_rows`
        trainer.train_dataset, cut = truncate_rows(trainer.train_dataset, config.seq_len)
        if cut:
            left = len(trainer.train_dataset)
            notes.append(f"padding-free SFT: {cut} of {len(dataset)} rows were longer than the plan's seq_len "
                         f"({config.seq_len} tokens) and were cut to it"
                         + (f"; {len(dataset) - left} left with no completion token were dropped"
                            if left < len(dataset) else ""))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for printer in (PrinterCallback, ProgressCallback):  # stdout carries the summary alone, as the runner's run
        trainer.remove_callback(printer)
    status, error, started = "completed", "", time.perf_counter()
    try:
        trainer.train()
    except KeyboardInterrupt:
        status = "interrupted"
    train_seconds = time.perf_counter() - started
    cuda = torch.cuda.is_available() and not use_cpu
    if status == "completed":
        trainer.save_model(str(output))
    steps = int(trainer.state.global_step)
    tokens = int(trainer.state.num_input_tokens_seen)  # 0 where include_num_input_tokens_seen "no" was overridden
    return {
        "output_dir": str(output), "status": status, "global_step": steps, "max_steps": int(trainer.state.max_steps),
        "resumed_from_step": None,
        "loss_curve": [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry],
        "memory_bands": [],
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None,
        "predicted_total_bytes": plan.predicted_total_bytes, "tokens_per_step": round(tokens / steps) if steps else 0,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - wall_start,
        "final_train_config": guard.current.to_dict(), "guard_events": [event.to_dict() for event in guard.events],
        "checkpoint": None, "model_origin": model_origin, "tokenizer_origin": tokenizer_origin,
        "data": str(data_path), "num_sequences": len(dataset), "num_tokens": tokens,
        "device": "cpu" if use_cpu else "cuda", "plan": plan.to_dict(),
        "notes": notes, "error": error,
    }
