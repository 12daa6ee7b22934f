"""The candidate training configuration, and byte quantities (budgets) with their units.

A `TrainConfig` is everything about a fine-tuning step that changes its memory: micro-batch,
sequence length, precision, gradient checkpointing, adapter, optimizer, offload and loss. It is a
frozen dataclass so candidates can be hashed, compared and cached, and it round-trips through JSON.
Bytes are integers everywhere; units exist only in `parse_bytes` and `format_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from memtune.errors import UsageError

DType = Literal["fp32", "bf16", "fp16"]
Amp = Literal["none", "bf16", "fp16"]
Offload = Literal["none", "optimizer", "parameters"]
Loss = Literal["standard", "chunked"]
Strategy = Literal["fsdp", "ddp"]
STRATEGY_NAMES = {"fsdp": "FSDP", "ddp": "DDP"}

# --precision NAME -> (dtype the weights are stored in, autocast compute dtype).
PRECISIONS: dict[str, tuple[DType, Amp]] = {
    "fp32": ("fp32", "none"),
    "bf16-mixed": ("fp32", "bf16"),  # what Trainer(bf16=True) runs: fp32 master weights, bf16 autocast
    "fp16-mixed": ("fp32", "fp16"),  # fp32 master weights, fp16 autocast, GradScaler
    "bf16": ("bf16", "none"),  # weights stored in bf16 (the usual choice for a frozen LoRA base)
    "fp16": ("fp16", "none"),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Adapter:
    """A parameter-efficient adapter, applied with peft."""

    kind: Literal["lora", "prefix"] = "lora"
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """LoRA dropout; >0 saves a copy of each adapted layer's input for backward."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """peft target_modules: "all-linear" or module names such as ("q_proj", "v_proj")."""
    num_virtual_tokens: int = 20
    """Prefix tuning only: number of virtual tokens."""

    def describe(self) -> str:
        if self.kind == "prefix":
            return f"prefix tuning ({self.num_virtual_tokens} tokens)"
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        return f"LoRA r={self.rank} ({targets})"


@dataclass(frozen=True)
class TrainConfig:
    """One candidate configuration of a training step."""

    seq_len: int
    """Tokens per sequence."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass (per GPU)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; effective batch = micro_batch_size * grad_accum_steps."""
    weights_dtype: DType = "fp32"
    """The dtype the model's weights are stored in."""
    amp: Amp = "none"
    """Autocast compute dtype; "fp16" also uses a GradScaler."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (transformers' gradient_checkpointing_enable, non-reentrant)."""
    adapter: Adapter | None = None
    """LoRA / prefix tuning through peft; None trains all weights."""
    optimizer: Literal["adamw"] = "adamw"
    """torch.optim.AdamW (fused on CUDA, as Trainer's default adamw_torch_fused)."""
    offload: Offload = "none"
    """What lives on the CPU between uses: nothing, the optimizer state, or parameters too."""
    loss: Loss = "standard"
    """"chunked" computes the LM-head and cross-entropy in chunks, never holding all fp32 logits."""
    num_gpus: int = 1
    """GPUs of one data-parallel job; the effective batch is split over them."""
    strategy: Strategy = "fsdp"
    """How several GPUs share the work (only with num_gpus > 1): "fsdp" shards weights, gradients and
    optimizer state over them (FSDP2 full sharding; also the engine of CPU offload); "ddp" keeps a full
    replica on every GPU and all-reduces the gradients (DistributedDataParallel), without offload."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "num_gpus"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.weights_dtype not in DTYPE_BYTES:
            problems.append(f"weights_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.weights_dtype!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            problems.append(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.strategy not in STRATEGY_NAMES:
            problems.append(f"strategy must be fsdp or ddp, got {self.strategy!r}")
        if self.strategy == "ddp":
            if self.offload != "none":
                problems.append(f"strategy 'ddp' keeps a full replica on every GPU and cannot offload {self.offload!r} "
                                "to the CPU: use strategy 'fsdp' (CPU offload shards through FSDP) or offload 'none'")
            if isinstance(self.num_gpus, int) and self.num_gpus == 1:
                problems.append("strategy 'ddp' replicates the model over several GPUs: it needs num_gpus >= 2 "
                                "(one GPU trains without a wrapper: keep the default strategy 'fsdp')")
        if problems:
            raise UsageError("invalid training configuration: " + "; ".join(problems))

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_gpus

    @property
    def precision(self) -> str:
        """The --precision name of (weights_dtype, amp), or 'weights/amp' if it has none."""
        for name, pair in PRECISIONS.items():
            if pair == (self.weights_dtype, self.amp):
                return name
        return f"{self.weights_dtype}/{self.amp}"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The configuration in plain words, for reports."""
        parts = [f"micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accum", self.precision]
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.adapter is not None:
            parts.append(self.adapter.describe())
        if self.loss == "chunked":
            parts.append("chunked loss")
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        if self.num_gpus > 1:
            parts.append(f"{self.num_gpus} GPUs, {STRATEGY_NAMES.get(self.strategy, self.strategy)}")
        return ", ".join(parts)

    @property
    def replicated(self) -> bool:
        """Data parallel with a full replica per GPU (DDP): the per-GPU step is the single-GPU step."""
        return self.num_gpus > 1 and self.strategy == "ddp"

    @property
    def sharded(self) -> bool:
        """Run by FSDP2: sharded over several GPUs, or CPU offload (FSDP with one GPU too)."""
        return not self.replicated and (self.num_gpus > 1 or self.offload != "none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown training configuration keys {unknown}; known keys are {sorted(known)}")
        adapter = data.get("adapter")
        if isinstance(adapter, dict):
            if isinstance(adapter.get("target_modules"), list):
                adapter = {**adapter, "target_modules": tuple(adapter["target_modules"])}
            data["adapter"] = Adapter(**adapter)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


def precision_config(name: str) -> tuple[DType, Amp]:
    """(weights_dtype, amp) for a --precision name."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise UsageError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}") from None


# ---- runs ----------------------------------------------------------------------------------

DEFAULT_SAVE_STEPS = 200
"""`memtune run` checkpoints every this many optimizer steps."""
SAVE_TOTAL_LIMIT = 2
"""...and keeps the last this many checkpoints."""


# ---- bytes and their units ------------------------------------------------------------------

GIB = 1 << 30
MIB = 1 << 20
_UNITS = {
    "b": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse a memory quantity such as '24GiB', '24GB' (24e9 bytes) or '24000MiB' into bytes.

    A bare number or a lone 'G'/'M' is ambiguous (binary or decimal?) and is refused rather than guessed.
    """
    match = _QUANTITY.match(str(text))
    if not match:
        raise UsageError(f"memory quantity {text!r} is malformed: write a number and a unit, e.g. 24GiB or 24GB")
    number, unit = match.groups()
    unit_key = unit.lower()
    if unit_key not in _UNITS:
        if unit_key in ("", "g", "m", "k", "t"):
            raise UsageError(
                f"memory quantity {text!r} is ambiguous: write {number}GiB (binary, 2^30) or {number}GB (10^9 bytes)"
                if unit_key in ("", "g")
                else f"memory quantity {text!r} is ambiguous: write {number}{unit.upper()}iB or {number}{unit.upper()}B"
            )
        raise UsageError(f"memory quantity {text!r} has unknown unit {unit!r}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    value = float(number) * _UNITS[unit_key]
    if value <= 0:
        raise UsageError(f"memory quantity {text!r} must be positive")
    return int(round(value))


def format_bytes(num_bytes: int | float) -> str:
    """Human-readable binary quantity: '23.84 GiB', '512.0 MiB'."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if value >= size:
            return f"{sign}{value / size:.2f} {unit}"
    return f"{sign}{int(value)} B"


def gib(num_bytes: int | float) -> float:
    return num_bytes / GIB


# ---- memory outside torch's pool ------------------------------------------------------------

# Measured on an NVIDIA H200 with torch 2.11+cu130 (tests/data/ground_truth_*.json, "environment"):
# memory a process holds outside torch's pool (CUDA context, kernels) and the cuBLAS/cuBLASLt
# workspaces that stay allocated after the first matmul in forward and in backward.
# `probe` measures both on the GPU at hand; these are the defaults for planning without one.
DEFAULT_CONTEXT_BYTES = 610 * MIB
DEFAULT_WORKSPACE_BYTES = 65 * MIB


# Total memory of common cards in MiB, as nvidia-smi reports it (what `--gpu NAME` plans against).
KNOWN_GPUS: dict[str, int] = {
    name: mib * MIB
    for name, mib in {
        "T4-16GB": 15360,
        "A10-24GB": 23028,
        "L4-24GB": 23034,
        "RTX3090-24GB": 24576,
        "RTX4090-24GB": 24564,
        "A100-40GB": 40960,
        "L40S-48GB": 46068,
        "A6000-48GB": 49140,
        "A100-80GB": 81920,
        "H100-80GB": 81559,
        "H200-141GB": 143771,
    }.items()
}


def known_gpu(name: str, flag: str = "--gpu", budget_flag: str = "--budget") -> tuple[str, int]:
    """(canonical name, total bytes) of a card in KNOWN_GPUS, matched case-insensitively."""
    names = {known.lower(): known for known in KNOWN_GPUS}
    if name.lower() not in names:
        raise UsageError(f"unknown {flag} {name!r}: choose one of {', '.join(KNOWN_GPUS)}, or give {budget_flag}")
    canonical = names[name.lower()]
    return canonical, KNOWN_GPUS[canonical]


# ---- what the user allows: the search's policy ----------------------------------------------------

DEFAULT_MARGIN_FRACTION = 0.02
"""Safety margin: 2% of the budget, but never less than MIN_MARGIN_BYTES. The estimator's median
error is <1% (its worst seen 16%, Gemma-2), a trial verifies the winner on the GPU, and the OOM
guard steps down if a run still runs short. On the H200 a 5% margin cost 3.6x in speed at 24 GiB
(benchmarks/results/oracle_h200.json: llama-3.2-1b's fastest fitting plan needs 22.4 of 24 GiB)."""


MIN_MARGIN_BYTES = 256 * MIB


OFFLOAD_ORDER = {"none": 0, "optimizer": 1, "parameters": 2}


STRATEGIES = ("ddp", "fsdp")
"""Over several GPUs, fastest first when both fit (ties keep this order)."""


# ---- command-line options: how a field appears on the command line --------------------------------

OPTION = "memtune.option"
"""The key of a field's `Option` in its `dataclasses.field(metadata=...)`."""


@dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line. cli.py generates the argparse arguments from
    the field's type, default and attribute docstring (the help text) and from this; a field without an
    Option gets the defaults: `--field-name`, its type, a switch for a bool."""

    flag: str | None = None
    """The option's name; None: --field-name (--no-field-name for a bool that defaults to True); "": a
    positional argument."""
    metavar: str | None = None
    words: Mapping[str, Any] | None = None
    """Command-line words and the values they stand for, e.g. {"auto": None, "on": True, "off": False}."""
    choices: tuple[str, ...] | None = None
    """The accepted values, where the field's type (str) does not list them as a Literal would."""
    parse: Callable[[str], Any] | None = None
    """Turns the text into the field's value (e.g. parse_bytes); its UsageError is reported with the others."""
    default_text: str | None = None
    """What the default means, where the value itself says too little (None: "the whole batch")."""
    note: str | None = None
    """More help computed from constants (the known cards), appended to the docstring's."""
    group: str | None = None
    """The titled group of `--help` the option is listed in (a nested dataclass passes it to its fields)."""
    exclusive: str | None = None
    """Options with the same name here exclude each other (--budget, --gpu)."""
    on_command_line: bool = True

    def flag_of(self, name: str, default: Any = None) -> str:
        """The option's name for the field `name`: "" for a positional argument."""
        if self.flag is not None:
            return self.flag
        return ("--no-" if default is True else "--") + name.replace("_", "-")


def option(**settings: Any) -> dict[str, Option]:
    """`field(metadata=option(flag="--margin", parse=parse_bytes))`: the field's `Option`."""
    return {OPTION: Option(**settings)}


def option_of(field_: dataclasses.Field) -> Option:
    """The `Option` of a dataclass field (the defaults when it has none)."""
    return field_.metadata.get(OPTION, Option())


PINS = "pin a choice (default: the search chooses)"
POLICY = "policy"
VERIFY_AND_OUTPUT = "verification and output"


@dataclass(frozen=True)
class Policy:
    """What the user allows and pins. None means "let the search choose".

    The attribute docstrings are the help of `memtune fit`'s options (cli.py reads them)."""

    precision: str | None = field(default=None, metadata=option(choices=tuple(PRECISIONS), group=PINS))
    """Keep this precision: fp32; bf16-mixed / fp16-mixed = fp32 weights + autocast (Trainer bf16=True);
    bf16 / fp16 = weights stored in 16 bits."""
    gradient_checkpointing: bool | None = field(default=None, metadata=option(
        flag="--checkpointing", words={"auto": None, "on": True, "off": False}, group=PINS))
    """Gradient checkpointing (recompute activations in backward), pinned on or off."""
    micro_batch_size: int | None = field(default=None, metadata=option(group=PINS))
    """Keep this micro-batch (sequences per forward/backward per GPU); it must divide the batch."""
    loss: str | None = field(default=None, metadata=option(
        words={"auto": None, "standard": "standard", "chunked": "chunked"}, group=PINS))
    """Keep this loss: chunked computes the LM head and loss in chunks, never holding all fp32 logits."""
    offload: str | None = field(default=None, metadata=option(
        words={"auto": None, "none": "none", "parameters": "parameters"}, group=PINS))
    """Keep this offload: parameters is FSDP CPU offload of parameters, gradients and optimizer state (slow)."""
    strategy: str | None = field(default=None, metadata=option(
        words={"auto": None, "ddp": "ddp", "fsdp": "fsdp"}, group=PINS))
    """How several GPUs share the work: ddp keeps a full replica on each GPU (no parameter gathering), fsdp
    shards weights, gradients and optimizer state; auto tries both and keeps the fastest that fits."""
    adapter: Adapter = field(default_factory=Adapter, metadata=option(on_command_line=False))
    """The adapter of the LoRA / prefix rung (rank, targets): --prefix, --lora-rank, --lora-targets."""
    use_adapter: bool | None = field(default=None, metadata=option(on_command_line=False))
    """True: always train the adapter (--lora); False: never (--no-lora, --full-finetune-only);
    None: only when no full fine-tuning configuration fits."""
    allow_offload: bool = field(default=True, metadata=option(flag="--no-offload", group=POLICY))
    """The search may offload to the CPU (--no-offload forbids it)."""
    allow_chunked_loss: bool = field(default=True, metadata=option(flag="--no-chunked-loss", group=POLICY))
    """The search may chunk the loss (--no-chunked-loss forbids it)."""
    min_micro_batch_size: int = field(default=1, metadata=option(group=POLICY))
    """Smallest micro-batch to consider."""
    margin_bytes: int | None = field(default=None, metadata=option(
        flag="--margin", parse=parse_bytes, group=POLICY,
        default_text=f"{DEFAULT_MARGIN_FRACTION:.0%} of the budget, at least {MIN_MARGIN_BYTES // MIB} MiB"))
    """Memory kept free below the budget, in bytes (on the command line a quantity such as 2GiB)."""
    bf16_supported: bool = field(default=True, metadata=option(on_command_line=False))
    """The GPU computes in bf16 (fit sets it from the probe)."""
    num_gpus: int = field(default=1, metadata=option(on_command_line=False))
    """GPUs of one data-parallel job (--gpus)."""
    max_trials: int = field(default=3, metadata=option(on_command_line=False))
    """At most this many candidates are tried on the GPU; the ones after are reported as not verified."""

    def validate(self, effective_batch_size: int) -> None:
        problems = []
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        if self.precision in ("bf16-mixed", "bf16") and not self.bf16_supported:
            problems.append(f"precision {self.precision} needs bf16, which this GPU does not support: use fp16-mixed or fp32")
        if self.micro_batch_size is not None and effective_batch_size % (self.micro_batch_size * self.num_gpus):
            problems.append(f"micro-batch {self.micro_batch_size} x {self.num_gpus} GPU(s) does not divide the batch "
                            f"{effective_batch_size}: the effective batch would change")
        if self.min_micro_batch_size < 1:
            problems.append(f"minimum micro-batch must be >= 1, got {self.min_micro_batch_size}")
        if effective_batch_size % self.num_gpus:
            problems.append(f"batch {effective_batch_size} is not a multiple of {self.num_gpus} GPUs")
        if self.loss not in (None, "standard", "chunked"):
            problems.append(f"loss {self.loss!r} is unknown: standard or chunked")
        if self.offload not in (None, *OFFLOAD_ORDER):
            problems.append(f"offload {self.offload!r} is unknown: {', '.join(OFFLOAD_ORDER)}")
        if self.strategy not in (None, *STRATEGIES):
            problems.append(f"strategy {self.strategy!r} is unknown: ddp or fsdp")
        if self.strategy == "ddp":
            if self.num_gpus < 2:
                problems.append(f"strategy ddp replicates the model over several GPUs: it needs --gpus 2 or more, got {self.num_gpus}")
            if self.offload not in (None, "none"):
                problems.append(f"strategy ddp cannot offload {self.offload} to the CPU: pin --strategy fsdp for CPU offload")
            if self.loss == "chunked":
                problems.append("strategy ddp needs the standard loss: the chunked loss calls the model past DDP's "
                                "wrapper, whose forward arms the gradient all-reduce")
        if problems:
            raise UsageError("; ".join(problems))


def policy_flags(policy: Policy) -> list[str]:
    """The `memtune fit` options that give this policy (defaults left out), for reproduce lines. The flags
    and their words come from the fields' `Option`s, as the parser's do (cli.add_options)."""
    flags = []
    for field_ in dataclasses.fields(Policy):
        value, default, option = getattr(policy, field_.name), field_.default, option_of(field_)
        if field_.name == "use_adapter":  # with `adapter`: --lora, --prefix, --no-lora (AdapterChoice)
            flags += _adapter_flags(policy)
        elif field_.name == "num_gpus":  # TaskOptions.gpus
            flags += [f"--gpus {value}"] if value != 1 else []
        elif not option.on_command_line or value == default:
            continue
        elif option.words is not None:
            word = next((word for word, meaning in option.words.items() if meaning == value), value)
            flags.append(f"{option.flag_of(field_.name)} {word}")
        elif isinstance(value, bool):
            flags.append(option.flag_of(field_.name, default))
        elif option.parse is parse_bytes:
            flags.append(f"{option.flag_of(field_.name)} {value}B")
        else:
            flags.append(f"{option.flag_of(field_.name)} {value}")
    return flags


def _adapter_flags(policy: Policy) -> list[str]:
    flags = []
    if policy.use_adapter is True:
        flags.append("--prefix" if policy.adapter.kind == "prefix" else "--lora")
    if policy.use_adapter is False:
        flags.append("--no-lora")
    if policy.use_adapter is not False and policy.adapter.kind == "lora":
        if policy.adapter.rank != Adapter().rank:
            flags.append(f"--lora-rank {policy.adapter.rank}")
        if policy.adapter.target_modules != Adapter().target_modules:
            targets = policy.adapter.target_modules
            flags.append(f"--lora-targets {targets if isinstance(targets, str) else ','.join(targets)}")
    return flags


def margin_for(budget_bytes: int, policy: Policy) -> int:
    """Bytes kept free below `budget_bytes`: the policy's margin, or DEFAULT_MARGIN_FRACTION of the budget
    but at least MIN_MARGIN_BYTES."""
    if policy.margin_bytes is not None:
        return policy.margin_bytes
    return max(MIN_MARGIN_BYTES, int(DEFAULT_MARGIN_FRACTION * budget_bytes))


# ---- the commands' options (cli.py generates `--help` and the parser from these) -------------------


@dataclass(frozen=True)
class TaskOptions:
    """What to train and on what memory: the options `memtune plan` and `memtune fit` share."""

    model: str = field(metadata=option(flag="", metavar="MODEL"))
    """Catalog name (see `memtune models`), hub id or local directory with config.json."""
    seq_len: int = 1024
    """Tokens per sequence."""
    batch_size: int = 8
    """Effective batch in sequences per optimizer step (micro-batch x accumulation x GPUs), kept exactly."""
    budget: str | None = field(default=None, metadata=option(exclusive="budget"))
    """Memory to fit in instead of the GPU's free memory, e.g. 24GiB, 24GB (=24e9 bytes), 24000MiB."""
    gpu: str | None = field(default=None, metadata=option(exclusive="budget", note=f"one of {', '.join(KNOWN_GPUS)}"))
    """Plan for a known card instead of --budget."""
    gpus: int | None = field(default=None, metadata=option(
        default_text="fit: the GPUs visible here, or 1; plan: 1"))
    """GPUs to train on; above 1, --batch-size is split over them (see --strategy); with --budget or --gpu
    they need not be present."""
    trace_device: Literal["cpu", "cuda"] | None = field(default=None, metadata=option(
        default_text="cuda when a GPU is visible"))
    """Trace on fake CUDA tensors (needs a GPU) or on the CPU with CUDA emulation."""
    json: bool = False
    """Print one JSON document instead of tables."""

    def budget_and_label(self) -> tuple[int | None, str]:
        """(bytes to fit in, its label for reports) from --budget or --gpu; (None, "") for neither.
        Raises UsageError for a malformed quantity or an unknown card."""
        if self.budget:
            value = parse_bytes(self.budget)
            return value, f"budget {format_bytes(value)}"
        if self.gpu:
            name, total_bytes = known_gpu(self.gpu)
            return total_bytes, f"{name} ({format_bytes(total_bytes)})"
        return None, ""

    def problems(self) -> list[str]:
        """What is wrong with the budget (the other checks depend on the command)."""
        try:
            self.budget_and_label()
        except UsageError as error:
            return [str(error)]
        return []


@dataclass(frozen=True)
class LoraOptions:
    """The shape of the LoRA adapter (peft LoraConfig), for `memtune plan --lora` and the adapter rung of fit."""

    lora_rank: int = Adapter.rank
    """LoRA rank r (lora_alpha is 2r)."""
    lora_targets: str = "all-linear"
    """peft target_modules, comma-separated (q_proj,v_proj), or all-linear."""

    def adapter(self) -> Adapter:
        targets = self.lora_targets if self.lora_targets == "all-linear" else tuple(self.lora_targets.split(","))
        return Adapter(rank=self.lora_rank, alpha=2 * self.lora_rank, target_modules=targets)


@dataclass(frozen=True)
class PlanOptions:
    """`memtune plan`: the one configuration whose peak memory is predicted."""

    task: TaskOptions
    micro_batch_size: int | None = field(default=None, metadata=option(default_text="the whole batch"))
    """Sequences per forward/backward; the rest is gradient accumulation. Reduce it to 4, 2, 1 if you OOM."""
    precision: str = field(default="fp32", metadata=option(choices=tuple(PRECISIONS)))
    """fp32; bf16-mixed / fp16-mixed = fp32 weights + autocast (Trainer bf16=True); bf16 / fp16 = weights
    stored in 16 bits."""
    checkpointing: bool = False
    """Gradient checkpointing (recompute activations in backward)."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_shape: LoraOptions = field(default_factory=LoraOptions)
    strategy: Literal["fsdp", "ddp", "auto"] = "fsdp"
    """With --gpus N: fsdp shards weights, gradients and optimizer state over the GPUs; ddp keeps a full
    replica on each GPU (faster, needs the whole training state per GPU); auto predicts both and takes the
    faster that fits the budget."""
    offload: Literal["none", "parameters"] = "none"
    """parameters: FSDP CPU offload of parameters, gradients and optimizer state."""

    def problems(self) -> list[str]:
        """Every problem of these options at once (empty: `train_config()` builds)."""
        problems = self._shape_problems() + self.task.problems()
        if not problems:
            try:
                self.train_config()
            except UsageError as error:
                problems.append(str(error))
        return problems

    def _shape_problems(self) -> list[str]:
        task = self.task
        problems = []
        gpus = 1 if task.gpus is None else task.gpus
        if gpus < 1:
            problems.append(f"--gpus must be >= 1, got {gpus}")
            gpus = 1
        per_gpu = task.batch_size // gpus
        if task.batch_size % gpus:
            problems.append(f"--batch-size {task.batch_size} is not a multiple of --gpus {gpus}: "
                            "each GPU takes an equal share")
        micro = self.micro_batch_size or per_gpu or 1
        if task.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {task.batch_size}")
        if micro < 1:
            problems.append(f"--micro-batch-size must be >= 1, got {micro}")
        elif per_gpu >= 1 and per_gpu % micro:
            divisor = max(d for d in range(1, micro + 1) if per_gpu % d == 0)
            problems.append(f"--batch-size {task.batch_size} is not a multiple of --micro-batch-size {micro} x --gpus "
                            f"{gpus}: the effective batch would change; pick a divisor such as {divisor}")
        if task.seq_len < 1:
            problems.append(f"--seq-len must be >= 1, got {task.seq_len}")
        return problems

    def train_config(self) -> TrainConfig:
        """The configuration to predict (`strategy` auto starts from FSDP). Raises UsageError listing every
        problem of the options."""
        problems = self._shape_problems()
        if problems:
            raise UsageError("; ".join(problems))
        gpus = 1 if self.task.gpus is None else self.task.gpus
        per_gpu = self.task.batch_size // gpus
        micro = self.micro_batch_size or per_gpu or 1
        weights, amp = precision_config(self.precision)
        return TrainConfig(
            seq_len=self.task.seq_len, micro_batch_size=micro, grad_accum_steps=max(1, per_gpu // micro),
            weights_dtype=weights, amp=amp, gradient_checkpointing=self.checkpointing,
            adapter=self.lora_shape.adapter() if self.lora else None, num_gpus=gpus, offload=self.offload,
            strategy="fsdp" if self.strategy == "auto" else self.strategy,
        )


@dataclass(frozen=True)
class AdapterChoice:
    """When `memtune fit` trains an adapter instead of all weights: Policy.use_adapter and Policy.adapter."""

    lora: bool = False
    """Train LoRA adapters even if full fine-tuning fits."""
    prefix: bool = False
    """Use prefix tuning instead of LoRA as the adapter rung."""
    lora_shape: LoraOptions = field(default_factory=LoraOptions)
    no_lora: bool = False
    """Never use an adapter (full fine-tuning only)."""
    full_finetune_only: bool = False
    """Same as --no-lora."""

    def adapter(self) -> Adapter:
        return Adapter(kind="prefix") if self.prefix else self.lora_shape.adapter()

    def use_adapter(self) -> bool | None:
        never = self.no_lora or self.full_finetune_only
        return True if (self.lora or self.prefix) and not never else (False if never else None)


@dataclass(frozen=True)
class RunOptions:
    """`memtune run`: how to train with a saved plan. `run.runner.run_plan` takes these too, with the Plan
    itself (it does not read `plan`, the file's path).

    The fields are in the order `command_line` forwards them to `accelerate launch`."""

    plan: str = field(default="", metadata=option(flag="", metavar="PLAN"))
    """Plan file written by `memtune fit` (JSON)."""
    data: str | None = field(default=None, metadata=option(metavar="FILE",
                                                           default_text="memtune's small sample corpus"))
    """Training text: JSON Lines (.jsonl), JSON, plain text (.txt) or a directory of them."""
    output_dir: str | None = field(default=None, metadata=option(metavar="DIR",
                                                                 default_text="memtune-runs/<model name>"))
    """Where checkpoints, the trained model or adapter, the tokenizer and run_summary.json go."""
    text_field: str = "text"
    """The JSON field that holds the text."""
    max_steps: int | None = field(default=None, metadata=option(default_text="one pass over the data"))
    """Optimizer steps in all, earlier runs of a resumed directory included."""
    learning_rate: float | None = field(default=None, metadata=option(
        default_text="2e-4 with LoRA, 2e-5 for full fine-tuning"))
    """Peak learning rate, linear decay."""
    save_steps: int = field(default=DEFAULT_SAVE_STEPS, metadata=option(
        note=f"the last {SAVE_TOTAL_LIMIT} are kept"))
    """Checkpoint every this many optimizer steps."""
    seed: int = 42
    """Seed for weights, data order and dropout."""
    resume: bool = False
    """Continue from the latest checkpoint-N in --output-dir at step N+1."""
    json: bool = False
    """Print the run summary as JSON instead of a table."""

    def command_line(self) -> list[str]:
        """The `memtune run` arguments that give these options back: PLAN, then every option that is set."""
        arguments = [self.plan]
        for field_ in dataclasses.fields(self)[1:]:
            value = getattr(self, field_.name)
            flag = option_of(field_).flag_of(field_.name)
            if value is True:
                arguments.append(flag)
            elif value is not None and value is not False:
                arguments += [flag, str(value)]
        return arguments


@dataclass(frozen=True)
class FitOptions:
    """`memtune fit`: the task, what the search may choose (the policy), verification and output."""

    task: TaskOptions
    pins: Policy = field(default_factory=Policy)
    adapters: AdapterChoice = field(default_factory=AdapterChoice, metadata=option(group=POLICY))
    verify: bool = field(default=True, metadata=option(group=VERIFY_AND_OUTPUT))
    """Verify the winner with real trial steps on the GPU (--no-verify skips them)."""
    trial_steps: int = field(default=2, metadata=option(group=VERIFY_AND_OUTPUT))
    """Optimizer steps per trial, 1 to 3."""
    plan_out: str = field(default="memtune-plan.json", metadata=option(group=VERIFY_AND_OUTPUT))
    """Where to save the plan."""
    report: str | None = field(default=None, metadata=option(metavar="FILE.html", group=VERIFY_AND_OUTPUT))
    """Also write the report as a self-contained HTML page."""
    run: bool = field(default=False, metadata=option(group=VERIFY_AND_OUTPUT))
    """Train with the plan right away (same as `memtune run PLAN`)."""
    data: str | None = field(default=None, metadata=option(metavar="FILE", group=VERIFY_AND_OUTPUT,
                                                           default_text="memtune's sample corpus"))
    """With --run: training text (.jsonl, .txt or a folder)."""
    output_dir: str | None = field(default=None, metadata=option(metavar="DIR", group=VERIFY_AND_OUTPUT,
                                                                 default_text="memtune-runs/<model name>"))
    """With --run: where the model and checkpoints go."""
    max_steps: int | None = field(default=None, metadata=option(group=VERIFY_AND_OUTPUT,
                                                                default_text="one pass over the data"))
    """With --run: optimizer steps."""

    def problems(self) -> list[str]:
        """Every problem of these options at once (empty: `policy()` builds a valid Policy)."""
        task, pins = self.task, self.pins
        problems = []
        if self.adapters.lora and (self.adapters.no_lora or self.adapters.full_finetune_only):
            problems.append("--lora contradicts --no-lora/--full-finetune-only: keep one")
        if not 1 <= self.trial_steps <= 3:
            problems.append(f"--trial-steps must be 1, 2 or 3, got {self.trial_steps}")
        if pins.micro_batch_size is not None and pins.micro_batch_size < 1:
            problems.append(f"--micro-batch-size must be >= 1, got {pins.micro_batch_size}")
        if task.batch_size < 1 or task.seq_len < 1:
            problems.append(f"--batch-size and --seq-len must be >= 1, got {task.batch_size} and {task.seq_len}")
        if task.gpus is not None and task.gpus < 1:
            problems.append(f"--gpus must be >= 1, got {task.gpus}")
        if not problems:
            try:
                self.policy().validate(task.batch_size)
            except UsageError as error:
                problems.append(str(error))
        return problems + task.problems()

    def policy(self) -> Policy:
        """The search's policy: the pins and forbidden rungs, the adapter choice and the GPUs (those visible
        here when --gpus is not given and neither --budget nor --gpu is)."""
        gpus = self.task.gpus
        if gpus is None:
            gpus = 1 if (self.task.budget or self.task.gpu) else visible_gpus()
        return dataclasses.replace(self.pins, num_gpus=gpus, adapter=self.adapters.adapter(),
                                   use_adapter=self.adapters.use_adapter())

    def run_options(self, plan_path: str) -> RunOptions:
        """`fit --run`: run the saved plan with this command's --data, --output-dir and --max-steps."""
        return RunOptions(plan=plan_path, data=self.data, output_dir=self.output_dir, max_steps=self.max_steps)


def visible_gpus() -> int:
    """CUDA devices this process sees, at least 1 (torch.cuda.device_count)."""
    import torch  # only `fit` without --gpus, --budget or --gpu needs it

    return max(1, torch.cuda.device_count())
