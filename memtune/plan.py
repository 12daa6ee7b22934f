"""The plan: what `memtune fit` chose, saved as JSON, executed by `memtune run` and `auto_fit`.

A plan names the model, the configuration that won, the budget it was chosen under, what was
predicted and (when a GPU verified it) measured, and the fallbacks: the next configurations that
keep the same effective batch, in the order the OOM guard steps down through them.

Adapters to Hugging Face objects (heavy libraries are imported only when called):

    model = AutoModelForCausalLM.from_pretrained(plan.model, **plan.model_kwargs())   # dtype, quantisation
    model = plan.prepare(model)                        # dtype, checkpointing, k-bit preparation, LoRA
    args = plan.training_arguments(output_dir="out")   # transformers.TrainingArguments
    trainer = plan.trainer(model=model, args=args, train_dataset=ds)   # Trainer with the OOM guard attached
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memtune.config import TrainConfig, require_deepspeed, require_liger, require_trl
from memtune.errors import UsageError
from memtune.options import DEFAULT_PACKING, PACKING_MODES
from memtune.search import ladder

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainingArguments

    from memtune.run.guard import GuardedTrainer, OomGuard

PLAN_SCHEMA_VERSION = 1
_REQUIRED_FIELDS = ("model", "train_config", "budget_bytes")
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "train_config": ((dict,), "a JSON object"),
    "budget_bytes": ((int,), "an integer"),
    "margin_bytes": ((int,), "an integer"),
    "predicted_total_bytes": ((int,), "an integer"),
    "predicted_host_bytes": ((int,), "an integer"),
    "predicted_tokens_per_second": ((int, float), "a number"),
    "measured_peak_reserved_bytes": ((int, type(None)), "an integer or null"),
    "measured_tokens_per_second": ((int, float, type(None)), "a number or null"),
    "gpu": ((str,), "a string"),
    "fallbacks": ((list,), "a list"),
    "created": ((str,), "a string"),
    "trust_remote_code": ((bool,), "true or false"),
    "packing": ((str,), "a --packing mode"),
}
"""The JSON type of each field `to_dict` writes (schema_version apart)."""


@dataclass
class Plan:
    """A chosen training configuration and the evidence behind it. Bytes are integers."""

    model: str
    """What the user passed as MODEL: a catalog name, hub id or local directory."""
    train_config: TrainConfig
    budget_bytes: int
    """Device memory the plan was fitted into (the GPU's free memory, or --budget)."""
    margin_bytes: int = 0
    """Safety margin kept free below the budget."""
    predicted_total_bytes: int = 0
    """Predicted peak reserved + workspaces + CUDA context."""
    predicted_host_bytes: int = 0
    """Pinned host memory the step holds per GPU (the offloaded activations, `Estimate.host_bytes`): not in
    predicted_total_bytes; 0 without activation offload (and in plans written before this field existed)."""
    predicted_tokens_per_second: float = 0.0
    measured_peak_reserved_bytes: int | None = None
    """Peak reserved in the verification trial (None: not verified on a GPU)."""
    measured_tokens_per_second: float | None = None
    gpu: str = ""
    """Name of the GPU the plan was made for ('' when planned for a budget only)."""
    fallbacks: list[TrainConfig] = field(default_factory=list)
    """Configurations with the same effective batch that need less memory, fastest first."""
    trust_remote_code: bool = False
    """The model is custom code (its own Python, `--trust-remote-code`), which `memtune run` must load too."""
    packing: str = DEFAULT_PACKING
    """How `memtune run` batches the data by default: the --packing the plan was made for (`memtune plan|fit --data
    FILE --packing MODE` predicts that batching's worst batch; PACKING_MODES); concat for a plan made without data
    (and in plans written before this field existed)."""
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def effective_batch_size(self) -> int:
        return self.train_config.effective_batch_size

    @property
    def verified(self) -> bool:
        return self.measured_peak_reserved_bytes is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model": self.model,
            "train_config": self.train_config.to_dict(),
            "budget_bytes": self.budget_bytes,
            "margin_bytes": self.margin_bytes,
            "predicted_total_bytes": self.predicted_total_bytes,
            "predicted_host_bytes": self.predicted_host_bytes,
            "predicted_tokens_per_second": self.predicted_tokens_per_second,
            "measured_peak_reserved_bytes": self.measured_peak_reserved_bytes,
            "measured_tokens_per_second": self.measured_tokens_per_second,
            "gpu": self.gpu,
            "fallbacks": [config.to_dict() for config in self.fallbacks],
            "trust_remote_code": self.trust_remote_code,
            "packing": self.packing,
            "created": self.created,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The Plan of `to_dict`'s output. UsageError names every field that is missing, unknown or of the
        wrong type, at once."""
        if not isinstance(data, dict):
            raise UsageError(f"a plan is a JSON object ({{\"model\": ..., \"train_config\": {{...}}, ...}}), "
                             f"got a JSON {_json_type(data)}")
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise UsageError(
                f"plan schema_version {version!r} is not supported (this memtune reads {PLAN_SCHEMA_VERSION}); "
                "make the plan again with `memtune fit`"
            )
        problems = []
        missing = [name for name in _REQUIRED_FIELDS if name not in data]
        if missing:
            problems.append(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(_FIELD_TYPES) - {"schema_version"})
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_FIELD_TYPES)}")
        for name, (types, wanted) in _FIELD_TYPES.items():
            value = data.get(name)
            if name in data and not (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
                problems.append(f"{name} must be {wanted}, got {json.dumps(value)[:60]} (a JSON {_json_type(value)})")
        if isinstance(data.get("packing"), str) and data["packing"] not in PACKING_MODES:
            problems.append(f"packing must be one of {', '.join(PACKING_MODES)}, got {data['packing']!r}")
        if isinstance(data.get("model"), str) and not data["model"].strip():
            problems.append("model is empty: it names the model (a catalog name, hub id or local directory)")
        for name in ("budget_bytes", "margin_bytes", "predicted_total_bytes", "predicted_host_bytes"):
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value < (1 if name == "budget_bytes" else 0):
                problems.append(f"{name} must be {'> 0' if name == 'budget_bytes' else '>= 0'}, got {value}")
        fallbacks: list[Any] = data["fallbacks"] if isinstance(data.get("fallbacks"), list) else []
        configs: dict[str, Any] = {}
        named = [("train_config", data.get("train_config"))]
        named += [(f"fallbacks[{index}]", config) for index, config in enumerate(fallbacks)]
        for name, value in named:
            if not isinstance(value, dict):
                if name != "train_config":  # train_config's type is reported above
                    problems.append(f"{name} must be a JSON object, got a JSON {_json_type(value)}")
                continue
            try:
                configs[name] = TrainConfig.from_dict(value)
            except (UsageError, TypeError, ValueError, KeyError, AttributeError) as error:
                problems.append(f"{name}: {error}")
        if problems:
            raise UsageError("; ".join(problems))
        fields = {key: value for key, value in data.items() if key != "schema_version"}
        fields["train_config"] = configs["train_config"]
        fields["fallbacks"] = [configs[f"fallbacks[{index}]"] for index in range(len(fallbacks))]
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """The plan saved in `path`; UsageError (exit 2) for a path that is no plan file, with every problem
        of its fields at once."""
        path = Path(path)
        remake = "make it again with `memtune fit MODEL`"
        if path.is_dir():
            inside = " (it holds plan.json: give that)" if (path / "plan.json").is_file() else ""
            raise UsageError(f"plan file {str(path)!r} is a directory{inside}: give the JSON file "
                             "`memtune fit` saved (it prints where)")
        if not path.is_file():
            raise UsageError(
                f"plan file {str(path)!r} does not exist: make one with `memtune fit MODEL` "
                "(it prints where it saved it)"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"plan file {str(path)!r} is not text (binary data): a plan is the JSON file "
                             f"`memtune fit` saves; {remake}") from None
        except OSError as error:
            raise UsageError(f"plan file {str(path)!r} cannot be read ({error.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"plan file {str(path)!r} is not JSON ({error}); {remake}") from None
        try:
            return cls.from_dict(data)
        except UsageError as error:
            raise UsageError(f"plan file {str(path)!r} is not a valid memtune plan: {error}; {remake}") from None

    # ---- adapters to Hugging Face objects ---------------------------------------------------------

    def prepare(self, model: nn.Module, *, warm_up: bool = True) -> nn.Module:
        """The model as the plan trains it: weights in `weights_dtype`, gradient checkpointing
        (non-reentrant; of the first `checkpoint_layers` decoder layers only where the plan says so, and with their
        inputs in pinned host memory where it offloads activations, which TrainingArguments cannot express before
        transformers 5.24), use_cache off, and the LoRA / prefix adapter wrapped around it with peft.

        Returns the model to train (a peft.PeftModel when the plan has an adapter). Raises UsageError for a plan with
        Liger's fused loss where liger-kernel (or Triton) is not installed.

        A plan with a quantised base (QLoRA) takes the model `from_pretrained(MODEL, **plan.model_kwargs())` loads
        (UsageError for one loaded without the quantisation) and runs peft's prepare_model_for_kbit_training
        before LoRA, as the prediction does (recipe/quant.py).

        With a GPU (and warm_up) it also makes cuBLAS's workspaces now (`memory.warm_up`, on this process's GPU:
        LOCAL_RANK under a launcher): made in the first step, they land inside a logits-sized free
        block and split it for good (+4.7 GiB peak reserved for Qwen2.5-0.5B 8 x 1024 on an H200).
        """
        import os

        import torch

        from memtune.measure import memory
        from memtune.recipe import step as recipe

        if self.train_config.loss == "liger":
            require_liger()  # UsageError (exit 2) with the install command, before anything is built
        if not memory.set_allocator_mode(self.train_config.expandable_segments):
            import warnings

            warnings.warn(f"the plan was predicted with the caching allocator's expandable_segments "
                          f"{self.train_config.expandable_segments}, and memory was already allocated under the other "
                          "mode: set PYTORCH_CUDA_ALLOC_CONF before CUDA starts (memtune run does)", stacklevel=2)
        if warm_up and torch.cuda.is_available():
            if "LOCAL_RANK" in os.environ:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            memory.warm_up()

        dtype = recipe.TORCH_DTYPES[self.train_config.weights_dtype]
        quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)
        quantization = self.train_config.quantization
        if quantization is not None and not getattr(model, f"is_loaded_in_{quantization.bits}bit", False):
            raise UsageError(f"the plan quantises the base ({quantization.describe()}), but the model was loaded "
                             "without it: load it with AutoModelForCausalLM.from_pretrained(MODEL, "
                             "**plan.model_kwargs())")
        if not quantized and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
            model = model.to(dtype)
        return recipe.prepare_model(model, self.train_config)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `AutoModelForCausalLM.from_pretrained` that load the model as the plan trains it:
        `dtype` (the weights' dtype), and for a quantised base `quantization_config`, transformers'
        BitsAndBytesConfig (recipe/quant.py; UsageError with the install command when bitsandbytes is missing)."""
        from memtune.recipe import quant
        from memtune.recipe import step as recipe

        kwargs: dict[str, Any] = {"dtype": recipe.TORCH_DTYPES[self.train_config.weights_dtype]}
        if self.train_config.quantization is not None:
            quant.require_bitsandbytes()
            kwargs["quantization_config"] = quant.bnb_config(self.train_config.quantization)
        return kwargs

    def training_arguments(self, **overrides: Any) -> TrainingArguments:
        """transformers.TrainingArguments that run the plan's step: micro-batch and accumulation,
        bf16 / fp16 autocast (none for pure 16-bit weights: those are loaded in their dtype, `prepare`),
        non-reentrant gradient checkpointing, the plan's optimizer as `optim` (its adamw_torch_fused runs as
        adamw_torch on the CPU, where use_cpu=True is set too), no reporting integrations. Keyword arguments
        override or add any TrainingArguments field (output_dir, max_steps, learning_rate, ...).

        The fields come from the rungs (`search.ladder.trainer_arguments`), with transformers 5.24's
        activation_checkpointing names where the installed TrainingArguments has them. Offload and
        multi-GPU sharding are not TrainingArguments: they come from the accelerate config `accelerate
        launch` is started with (`run.launch`). A DDP plan also sets ddp_find_unused_parameters=False. A DeepSpeed
        plan sets `deepspeed` to its JSON as a dict (`run.launch.deepspeed_config` for the plan's model,
        `model_config`: every ZeRO knob as a number, as the launcher's JSON has them, and under NVMe parameter offload
        a swap buffer that holds the model's largest parameter partition) unless `deepspeed` is among the overrides
        (a path or a dict); UsageError with the install command when DeepSpeed is missing. The evaluation fields
        come from the plan's eval batch and logits (`evaluation_arguments`).
        """
        from transformers import TrainingArguments

        return TrainingArguments(**self._trainer_fields(TrainingArguments, overrides))

    def _trainer_fields(self, arguments_class: type, overrides: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of `training_arguments` for `arguments_class` (TrainingArguments or TRL's configs,
        which derive from it), overrides applied."""
        import dataclasses

        import torch

        config = self.train_config
        fields = {field_.name for field_ in dataclasses.fields(arguments_class)}
        on_cpu = bool(overrides.get("use_cpu")) or not torch.cuda.is_available()
        from memtune.recipe.step import require_extra

        require_extra(config.optimizer)  # UsageError (exit 2) with the install command
        optimizer = "adamw_torch" if on_cpu and config.optimizer == "adamw_torch_fused" else config.optimizer
        arguments: dict[str, Any] = {"optim": optimizer, "report_to": "none"}
        if not torch.cuda.is_available():
            # Without CUDA, TrainingArguments(bf16=True) refuses to build ("Your setup doesn't support bf16/gpu")
            # unless use_cpu is set: a plan for a GPU then still runs its step on the CPU (for trying it out).
            arguments["use_cpu"] = True
        for name, value in ladder.trainer_arguments(config).items():
            # transformers 5.24 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs).
            renamed = name.replace("gradient_checkpointing", "activation_checkpointing")
            arguments[renamed if renamed in fields else name] = value
        arguments.update(evaluation_arguments(config))
        if config.deepspeed:
            from memtune.run.launch import deepspeed_training_arguments

            require_deepspeed(config)  # before TrainingArguments imports it
            if "deepspeed" not in overrides:
                arguments.update(deepspeed_training_arguments(config, model_config=self.model_config()))
        arguments.update(overrides)
        return arguments

    def model_config(self) -> Any:
        """The transformers config of the plan's model (`sources.resolve` with shapes_only: a catalog hub id is read
        from the catalog, with no hub lookup). Raises ModelNotFoundError / UsageError as `resolve` does."""
        from memtune.sources import resolve

        return resolve(self.model, trust_remote_code=self.trust_remote_code, shapes_only=True).config

    def sft_config(self, **overrides: Any) -> Any:
        """TRL's SFTConfig that runs the plan's SFT step: `training_arguments`' fields (micro-batch, accumulation,
        precision, checkpointing, optimizer), max_length = seq_len, and the batch layout the plan traced
        (`TrainConfig.sft_batches`: packed is packing=True with TRL's default bfd strategy, which turns padding-free
        on; padding-free is padding_free=True with max_length None, which SFTTrainer needs without packing: the data
        must then come truncated to seq_len tokens: memtune run cuts them, `run.trl_run.truncate_rows`). Keyword
        arguments override or add any SFTConfig field (output_dir, max_steps, dataset_text_field,
        completion_only_loss, ...). Raises UsageError (exit 2) with the install command when TRL is missing, and for
        a plan of another trainer."""
        require_trl("Plan.sft_config")
        self._require_trainer("sft")
        from trl import SFTConfig

        batches = self.train_config.sft_batches
        # padding-free without packing: SFTTrainer refuses a max_length it would not enforce; the rows must come
        # at most seq_len tokens long (the plan traced micro-batch x seq_len tokens in the flattened row)
        max_length = None if batches == "padding-free" else self.train_config.seq_len
        arguments = {"max_length": max_length, "packing": batches == "packed",
                     "padding_free": batches != "padded", **overrides}
        return SFTConfig(**self._trainer_fields(SFTConfig, arguments))

    def dpo_config(self, **overrides: Any) -> Any:
        """TRL's DPOConfig that runs the plan's DPO step: `training_arguments`' fields (per_device_train_batch_size
        counts preference pairs: each step runs chosen and rejected), max_length = seq_len (prompt and completion),
        precompute_ref_log_probs as planned, loss_type sigmoid (no loss_type changes the planned peak:
        `predict.trl_step`). Keyword arguments override or add any DPOConfig field. Raises UsageError (exit 2) with
        the install command when TRL is missing, and for a plan of another trainer."""
        require_trl("Plan.dpo_config")
        self._require_trainer("dpo")
        from trl import DPOConfig

        arguments = {"max_length": self.train_config.seq_len, "loss_type": ["sigmoid"],
                     "precompute_ref_log_probs": self.train_config.precompute_ref_log_probs, **overrides}
        return DPOConfig(**self._trainer_fields(DPOConfig, arguments))

    def _require_trainer(self, trainer: str) -> None:
        if self.train_config.trainer != trainer:
            raise UsageError(f"this plan is for --trainer {self.train_config.trainer}, not {trainer}: plan again with "
                             f"--trainer {trainer} (its memory differs)")

    def lora_config(self) -> Any:
        """The peft config of the plan's adapter (peft.LoraConfig, or PrefixTuningConfig for prefix
        tuning), or None when the plan trains all weights."""
        from memtune.recipe import step as recipe

        return recipe.peft_config(self.train_config)

    def oom_guard(self, **options: Any) -> OomGuard:
        """The OOM guard of this plan (memtune.run.guard.OomGuard; `options` go to it): it steps down through
        `fallbacks` when CUDA runs out of memory and continues from the last completed optimizer step.

        It works only attached to a guarded Trainer: `trainer(...)` below, or a Trainer class deriving from
        memtune.run.guard.GuardedTrainerMixin made with `oom_guard=`. Given to a plain Trainer as a
        callback it raises UsageError when training begins (a callback cannot redo a step).
        """
        from memtune.run.guard import OomGuard

        return OomGuard(self.train_config, self.fallbacks, **options)

    def trainer(self, model: nn.Module, args: TrainingArguments | None = None, *, oom_guard: OomGuard | None = None,
                **trainer_kwargs: Any) -> GuardedTrainer:
        """A transformers.Trainer with this plan's OOM guard attached (memtune.run.guard.GuardedTrainer).

        `model`: as `prepare` returns it. `args`: TrainingArguments, default `training_arguments()`.
        `oom_guard`: default `oom_guard()`; the Trainer's `oom_guard` attribute holds it (its `events`,
        `current`). Other keyword arguments go to Trainer (train_dataset, data_collator, callbacks, ...).

        Raises UsageError for a plan of TRL's SFT or DPO step: a plain Trainer would run another step than the one
        planned (`memtune run PLAN --trainer sft|dpo` runs TRL's trainer with the guard; in Python, TRL's trainer
        with `sft_config()` / `dpo_config()`).
        """
        if self.train_config.trainer != "causal-lm":
            trainer = self.train_config.trainer
            raise UsageError(f"this plan is for TRL's {trainer.upper()} step, and Plan.trainer builds a plain "
                             f"transformers Trainer, which runs another step: run it with memtune run PLAN --trainer "
                             f"{trainer} (the OOM guard attached), or build TRL's {trainer.upper()}Trainer with "
                             f"plan.{trainer}_config()")
        from memtune.run.guard import GuardedTrainer

        return GuardedTrainer(model=model, args=args if args is not None else self.training_arguments(),
                              oom_guard=oom_guard if oom_guard is not None else self.oom_guard(), **trainer_kwargs)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (what a user sees in the file)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def evaluation_arguments(config: TrainConfig) -> dict[str, Any]:
    """The TrainingArguments fields of the plan's evaluation (transformers 5.24 trainer.py `evaluation_loop`):

    - per_device_eval_batch_size: the planned eval batch; without evaluation planned, the training micro-batch
      (Trainer's default of 8 OOMs where the micro-batch had to be lowered; a forward under no_grad at the
      micro-batch holds less than the training step, whose activations are saved for backward);
    - eval_logits "none": prediction_loss_only=True (Trainer.evaluate sets it anyway without compute_metrics);
      "accumulate_cpu": eval_accumulation_steps=1 (the logits go to the host after every step); "keep":
      prediction_loss_only=False and no accumulation (every step's logits stay on the GPU).
    Nothing but the eval batch is set when no evaluation is planned."""
    if config.eval_batch_size is None:
        return {"per_device_eval_batch_size": config.micro_batch_size}
    arguments: dict[str, Any] = {"per_device_eval_batch_size": config.eval_batch_size,
                                 "prediction_loss_only": config.eval_logits == "none"}
    if config.eval_logits == "accumulate_cpu":
        arguments["eval_accumulation_steps"] = 1
    return arguments
