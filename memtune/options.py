"""The options of memtune's commands as typed dataclasses: one source for the command line (cli.py
generates the parser and `--help` from them: each field's attribute docstring is its help, its
`config.Option` metadata the flag's spelling), the Python API and the saved run metadata.

`TaskOptions` (model, sequence, batch, budget) is shared by `plan` and `fit`; `PlanOptions` is the one
configuration `memtune plan` predicts; `FitOptions` holds the search's `Policy`; `RunOptions` is
`memtune run` (and `fit --run`). Each collects every problem at once (`problems()`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memtune.config import (
    ATTN_IMPLEMENTATIONS,
    DEEPSPEED_EXTRA_HINT,
    DEEPSPEED_OPTIMIZERS,
    DEFAULT_INTER_NODE_GBPS,
    DEFAULT_OPTIMIZER,
    DEFAULT_SAVE_STEPS,
    EVAL_BATCH_FACTOR,
    EVAL_LOGITS,
    GPU_CARDS,
    NO_BF16_GPUS,
    OPTIMIZERS,
    POLICY,
    PRECISIONS,
    QUANTIZED_BASE_CHOICES,
    SAVE_TOTAL_LIMIT,
    SFT_BATCHES,
    TRAINERS,
    TRL_EXTRA_HINT,
    VERIFY_AND_OUTPUT,
    ZERO_STAGE_CHOICES,
    Adapter,
    GpuCard,
    Policy,
    TrainConfig,
    Zero,
    attention_card_problems,
    attention_problems,
    deepspeed_available,
    format_bytes,
    gpu_card,
    known_gpu,
    option,
    option_of,
    parse_bytes,
    precision_config,
    quantized_base_fields,
    rounds_stochastically,
    trl_available,
)
from memtune.errors import UsageError

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
    gpu: str | None = field(default=None, metadata=option(exclusive="budget", note="one of " + ", ".join(
        f"{name} ({card.note})" if card.note else name for name, card in GPU_CARDS.items())))
    """Plan for a known card instead of --budget: its memory, and the attention kernels and dtypes its compute
    capability has (no flash SDPA below sm80; no bf16 on T4 and V100, where fit plans fp16 instead and a pinned
    bf16 precision is refused)."""
    gpus: int | None = field(default=None, metadata=option(
        default_text="fit: the GPUs visible here, or 1; plan: 1"))
    """GPUs to train on; above 1, --batch-size is split over them (see --strategy); with --budget or --gpu
    they need not be present."""
    nodes: int = field(default=1, metadata=option(metavar="M"))
    """Machines of --gpus GPUs each: plan for M x N GPUs (per-GPU memory, throughput over the inter-node link) and,
    plan --out DIR and fit write the launch files for each machine next to the plan."""
    inter_node_gbps: float = field(default=DEFAULT_INTER_NODE_GBPS, metadata=option(metavar="GBITS"))
    """With --nodes above 1: the network rate of each machine, in Gb/s one way (an assumption, not measured:
    a typical 400 Gb/s InfiniBand or RoCE port; a DGX-class node with one 400 Gb/s port per GPU has 8 x 400 = 3200)."""
    trace_device: Literal["cpu", "cuda"] | None = field(default=None, metadata=option(
        default_text="cuda when a GPU is visible"))
    """Trace on fake CUDA tensors (needs a GPU) or on the CPU with CUDA emulation."""
    trainer: Literal["causal-lm", "sft", "dpo"] = field(default="causal-lm", metadata=option(
        note="; ".join(f"{name}: {words}" for name, words in TRAINERS.items())))
    """Whose training step to plan: memtune's causal-LM step (Trainer), or TRL's SFTTrainer / DPOTrainer (planned
    without TRL; memtune run --trainer needs pip install -e ".[trl]"). With dpo, --seq-len is the length of each
    prompt+completion and the micro-batch counts pairs: a step runs 2 x micro-batch sequences."""
    sft_batches: Literal["padded", "packed", "padding-free"] = field(default="padded", metadata=option(
        note="; ".join(f"{name}: {words}" for name, words in SFT_BATCHES.items())))
    """With --trainer sft: the batch layout of the traced step (with --data, --packing plans the data's batches)."""
    precompute_ref_log_probs: bool | None = field(default=None, metadata=option(
        flag="--precompute-ref-log-probs", words={"auto": None, "on": True, "off": False},
        default_text="auto: plan keeps the reference, fit tries it, then precomputed"))
    """With --trainer dpo: compute the reference's log-probs once before training (DPOConfig
    precompute_ref_log_probs): no reference model on the GPU and no reference forward per step."""
    trust_remote_code: bool = False
    """Allow a MODEL whose config.json has an auto_map and a model_type transformers does not know (Qwen v1,
    Baichuan): this imports and runs the model's own Python files, so only use it for code you trust."""
    json: bool = False
    """Print one JSON document instead of tables."""

    def budget_and_label(self) -> tuple[int | None, str]:
        """(bytes to fit in, its label for reports) from --budget or --gpu; (None, "") for neither.
        Raises UsageError for a malformed quantity or an unknown card."""
        if self.budget:
            if self.budget.lstrip().startswith("-"):
                raise UsageError(f"--budget {self.budget!r} is negative: give the memory to fit in, "
                                 "e.g. --budget 24GiB")
            value = parse_bytes(self.budget)
            return value, f"budget {format_bytes(value)}"
        if self.gpu:
            name, total_bytes = known_gpu(self.gpu)
            return total_bytes, f"{name} ({format_bytes(total_bytes)})"
        return None, ""

    def card(self) -> GpuCard | None:
        """The known card of --gpu, None without one. Raises UsageError for an unknown name."""
        return gpu_card(self.gpu) if self.gpu else None

    def problems(self) -> list[str]:
        """What is wrong with the budget, --nodes and --inter-node-gbps (the other checks depend on the command)."""
        problems = []
        try:
            self.budget_and_label()
        except UsageError as error:
            problems.append(str(error))
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or self.nodes < 1:
            problems.append(f"--nodes must be a whole number of machines >= 1, got {self.nodes!r}: e.g. --nodes 2 "
                            "--gpus 8 for 16 GPUs on 2 machines")
        problems += self.trainer_problems()
        rate = self.inter_node_gbps
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            problems.append(f"--inter-node-gbps must be a positive rate in Gb/s, got {rate!r}: e.g. 400 (one 400 Gb/s "
                            "InfiniBand or RoCE port per machine)")
        return problems

    def trainer_problems(self) -> list[str]:
        """--trainer, --sft-batches and --precompute-ref-log-probs: unknown values, each option without its trainer."""
        if self.trainer not in TRAINERS:
            return [f"--trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}"]
        problems = []
        if self.sft_batches not in SFT_BATCHES:
            problems.append(f"--sft-batches must be one of {', '.join(SFT_BATCHES)}, got {self.sft_batches!r}")
        elif self.sft_batches != "padded" and self.trainer != "sft":
            problems.append(f"--sft-batches {self.sft_batches} is SFTTrainer's batch layout, got --trainer "
                            f"{self.trainer}: add --trainer sft, or drop --sft-batches")
        if self.precompute_ref_log_probs is not None and self.trainer != "dpo":
            word = "on" if self.precompute_ref_log_probs else "off"
            problems.append(f"--precompute-ref-log-probs {word} is DPOTrainer's, got --trainer {self.trainer}: add "
                            "--trainer dpo, or drop it")
        return problems

    def trainer_fields(self) -> dict[str, Any]:
        """The TrainConfig / Policy fields of --trainer, --sft-batches and --precompute-ref-log-probs (auto: None)."""
        return {"trainer": self.trainer, "sft_batches": self.sft_batches,
                "precompute_ref_log_probs": self.precompute_ref_log_probs}

    @property
    def world_size(self) -> int:
        """GPUs in all: --nodes x --gpus (1 where --gpus is not given)."""
        return max(1, self.nodes) * (1 if self.gpus is None else self.gpus)


@dataclass(frozen=True)
class LoraOptions:
    """The shape of the LoRA adapter (peft LoraConfig), for `memtune plan --lora` and the adapter rung of fit."""

    lora_rank: int = Adapter.rank
    """LoRA rank r (lora_alpha is 2r)."""
    lora_targets: str = "all-linear"
    """peft target_modules, comma-separated (q_proj,v_proj), or all-linear."""

    def adapter(self) -> Adapter:
        targets = self.lora_targets if self.lora_targets == "all-linear" else tuple(self.lora_targets.split(","))
        # alpha follows the rank; a rank below 1 is the one mistake reported (not the alpha derived from it too)
        return Adapter(rank=self.lora_rank, alpha=max(1, 2 * self.lora_rank), target_modules=targets)


EVALUATION = "evaluation (Trainer.evaluate mid-training)"
EVAL_BYTES_PER_TOKEN = 3
"""Bytes of --eval-data per token when counting its sequences from its size: English text takes ~4 bytes per
BPE token (GPT-2, Llama); 3 counts more sequences than it holds, so the logits kept are not underestimated."""


def parse_eval_batch_size(text: str) -> int | str:
    """`--eval-batch-size auto|N`: "auto" or a positive number of sequences."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        size = int(text)
    except ValueError:
        raise UsageError(f"expected auto or a number of sequences, got {text!r} (e.g. --eval-batch-size 8)") from None
    if size < 1:
        raise UsageError(f"an eval batch must be at least 1 sequence, got {size} (leave the option out to plan "
                         "no evaluation)")
    return size


@dataclass(frozen=True)
class EvalOptions:
    """Trainer's evaluation during training: its batch and what it keeps of the logits (`TrainConfig.eval_*`)."""

    eval_batch_size: int | str | None = field(default=None, metadata=option(
        metavar="auto|N", parse=parse_eval_batch_size, group=EVALUATION, default_text="no evaluation planned",
        note=f"auto: the largest of 1, 2, 4, ... and {EVAL_BATCH_FACTOR}x the micro-batch (never above "
             f"{EVAL_BATCH_FACTOR}x the micro-batch or the eval set) whose evaluation fits the budget with "
             "training's weights, optimizer state and cached memory alive; needs --budget or --gpu"))
    """Sequences per evaluation step (per_device_eval_batch_size); the predicted peak is then that of training and
    evaluation together"""
    eval_data: str | None = field(default=None, metadata=option(
        metavar="FILE", group=EVALUATION, default_text="one eval batch",
        note=f"only its size is read: ~{EVAL_BYTES_PER_TOKEN} bytes per token, so sequences = bytes / "
             f"({EVAL_BYTES_PER_TOKEN} x --seq-len), rounded up"))
    """Eval text (a file or a folder of them): how many sequences the eval set has, which bounds the logits kept
    with --eval-logits keep"""
    eval_logits: Literal["none", "accumulate_cpu", "keep"] = field(default="none", metadata=option(
        group=EVALUATION, note="; ".join(f"{name}: {words}" for name, words in EVAL_LOGITS.items())))
    """What evaluation keeps of each step's logits (set in the plan's TrainingArguments)"""

    def problems(self) -> list[str]:
        """Every problem of these options at once."""
        problems = []
        if self.eval_batch_size is None:
            given = [flag for flag, value in (("--eval-data", self.eval_data),
                                              ("--eval-logits", None if self.eval_logits == "none" else 1))
                     if value is not None]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                problems.append(f"{', '.join(given)} only {verb} with --eval-batch-size: add --eval-batch-size auto "
                                "or a number, or drop them")
        return problems

    def data_problem(self) -> str | None:
        """--eval-data that does not exist (checked before work starts, not when the command line is parsed, as
        `RunOptions.data_problem`)."""
        if self.eval_data is not None and not Path(self.eval_data).exists():
            return f"--eval-data {self.eval_data!r} does not exist: give the eval text file or a folder of them"
        return None

    @property
    def auto(self) -> bool:
        """--eval-batch-size auto: the eval batch is chosen for the budget."""
        return self.eval_batch_size == "auto"

    def eval_sequences(self, seq_len: int) -> int | None:
        """Sequences of --eval-data at `seq_len` tokens, from its size in bytes (`EVAL_BYTES_PER_TOKEN`); None
        without --eval-data or when it does not exist (`data_problem` says so). A folder counts every file under it."""
        if self.eval_data is None or self.data_problem():
            return None
        path = Path(self.eval_data)
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        num_bytes = sum(item.stat().st_size for item in files)
        return max(1, -(-num_bytes // (EVAL_BYTES_PER_TOKEN * seq_len)))

    def fields(self, seq_len: int, micro_batch_size: int) -> dict[str, Any]:
        """The TrainConfig eval fields these options give (auto starts from the micro-batch: the caller chooses)."""
        if self.eval_batch_size is None:
            return {}
        batch = micro_batch_size if self.auto else int(self.eval_batch_size)
        return {"eval_batch_size": batch, "eval_logits": self.eval_logits,
                "eval_sequences": self.eval_sequences(seq_len)}


TRAINING_DATA = "training data (plan for the worst batch the loader makes)"
PACKING_MODES: dict[str, str] = {
    "concat": "documents concatenated and cut into --seq-len blocks, every batch micro-batch x seq-len (memtune run's "
              "default)",
    "none": "one document per row, truncated at --seq-len and padded to the longest in the batch",
    "bfd": "TRL's best-fit-decreasing packing (pack_dataset), each packed row <= --seq-len",
    "padding-free": "documents of a batch concatenated without padding, position_ids reset per document (TRL's "
                    "padding_free), at most micro-batch x seq-len tokens",
}
"""The batching modes of --packing (run.data_plan says what each produces and what is traced)."""
Packing = Literal["concat", "none", "bfd", "padding-free"]
DEFAULT_PACKING: Packing = "concat"
"""What `memtune run` does without --packing (`run.data.PackedDataset`)."""


def trl_problem() -> str | None:
    """Why `memtune run --packing bfd` cannot run here (None: it can): it packs with TRL's own pack_dataset, and TRL
    is not installed (`config.trl_available`: looked up without importing it; `datasets` comes with TRL)."""
    if trl_available():
        return None
    return (f"--packing bfd packs with TRL's best-fit-decreasing pack_dataset, and TRL is not installed: install TRL "
            f"with {TRL_EXTRA_HINT}, or choose --packing padding-free, none or concat")


@dataclass(frozen=True)
class DataOptions:
    """The training data `plan` and `fit` plan for (`run.data_plan`), and that `fit --run` trains on."""

    data: str | None = field(default=None, metadata=option(
        metavar="FILE|DIR", group=TRAINING_DATA,
        default_text="no data read: every batch is micro-batch x --seq-len; fit --run trains on memtune's sample "
                     "corpus"))
    """Training text (.jsonl, .json, .txt or a folder of them): tokenised with the model's tokenizer (a local
    directory's own, else memtune's shipped one), its length percentiles and truncated count reported, and the plan
    made for the worst batch of --packing; with fit --run, also what is trained on"""
    text_field: str = field(default="text", metadata=option(group=TRAINING_DATA))
    """The JSON field that holds the text."""
    packing: Packing = field(default=DEFAULT_PACKING, metadata=option(
        group=TRAINING_DATA, note="; ".join(f"{name}: {words}" for name, words in PACKING_MODES.items())))
    """How the loader batches the documents (with --data)"""

    def problems(self, run: bool = False) -> list[str]:
        """Every problem of these options at once (a missing path is `data_problem`'s, checked before work starts).
        `run`: fit --run, which trains with the same --packing (`RunOptions.packing`)."""
        problems = []
        if self.packing not in PACKING_MODES:
            problems.append(f"--packing {self.packing!r} is not a batching mode: use one of "
                            f"{', '.join(PACKING_MODES)} (default {DEFAULT_PACKING}, what memtune run does)")
        elif self.packing != DEFAULT_PACKING and self.data is None:
            problems.append(f"--packing {self.packing} plans the worst batch of the data's lengths: add --data FILE, "
                            "or drop --packing")
        elif self.packing == "bfd" and run and (missing := trl_problem()):
            problems.append(missing)
        if not isinstance(self.text_field, str) or not self.text_field:
            problems.append(f"--text-field must name a JSON field, got {self.text_field!r}")
        return problems

    def data_problem(self) -> str | None:
        """--data that does not exist (checked before work starts, not when the command line is parsed, as
        `RunOptions.data_problem`)."""
        if self.data is not None and not Path(self.data).exists():
            return (f"--data {self.data!r} does not exist: give a .jsonl, .json or .txt file or a folder of them, "
                    "or leave --data out")
        return None


@dataclass(frozen=True)
class PlanOptions:
    """`memtune plan`: the one configuration whose peak memory is predicted."""

    task: TaskOptions
    micro_batch_size: int | None = field(default=None, metadata=option(default_text="the whole batch"))
    """Sequences per forward/backward; the rest is gradient accumulation. Reduce it to 4, 2, 1 if you OOM."""
    precision: str = field(default="fp32", metadata=option(choices=tuple(PRECISIONS)))
    """fp32; bf16-mixed / fp16-mixed = fp32 weights + autocast (Trainer bf16=True); bf16 / fp16 = weights
    stored in 16 bits (pure 16-bit training without --lora: no fp32 master weights). bf16 needs a card with bf16
    (sm80+): with --gpu T4-16GB or a V100, bf16-mixed / bf16 exit with code 2 (the precision is what you asked
    for, so plan does not change it); use fp16-mixed there."""
    attn: str | None = field(default=None, metadata=option(choices=ATTN_IMPLEMENTATIONS,
                                                           default_text="the model config's own, else sdpa"))
    """The attention implementation (transformers' attn_implementation), traced as it runs: sdpa takes the kernel
    the card has (flash needs sm80+, else memory-efficient, else math); eager holds the attention matrix;
    flash_attention_2 needs the flash-attn package and an sm80+ card (traced as torch's flash kernel, the same
    FlashAttention-2 code); flex_attention traces on fake CUDA only (its backward has no CPU kernel): plan it on a
    GPU machine."""
    optimizer: str = field(default=DEFAULT_OPTIMIZER, metadata=option(
        flag="--optim", metavar="NAME", choices=tuple(OPTIMIZERS),
        note="; ".join(f"{name}: {words}" for name, words in OPTIMIZERS.items())))
    """The optimizer, by transformers' optim name."""
    checkpointing: bool = False
    """Gradient checkpointing (recompute activations in backward) of every decoder layer."""
    checkpoint_layers: int | None = field(default=None, metadata=option(metavar="N", default_text="all of them"))
    """Checkpoint only the first N decoder layers (implies --checkpointing): less recomputation, more memory."""
    offload_activations: bool = False
    """Keep the checkpointed layers' inputs in pinned host memory (implies --checkpointing): less GPU memory, a
    copy to the host and back per layer and micro-batch."""
    expandable_segments: bool = False
    """Predict the caching allocator with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (memtune run sets it)."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    quantized_base: int | None = field(default=None, metadata=option(
        flag="--qlora", choices=QUANTIZED_BASE_CHOICES, parse=int))
    """LoRA on a base quantised to this many bits (QLoRA through bitsandbytes: 4 is nf4 with double quantisation,
    8 is LLM.int8); implies --lora; the other weights load in bf16 with bf16 autocast unless --precision says
    otherwise (the fp32 default is then read as bf16, as Trainer(bf16=True) runs QLoRA)."""
    lora_shape: LoraOptions = field(default_factory=LoraOptions)
    strategy: Literal["fsdp", "ddp", "deepspeed", "auto"] = "fsdp"
    """With --gpus N: fsdp shards weights, gradients and optimizer state over the GPUs (FSDP2); ddp keeps a full
    replica on each GPU (faster, needs the whole training state per GPU); auto predicts both and takes the
    faster that fits the budget. deepspeed: DeepSpeed ZeRO (--zero-stage), on one GPU or several (needs the
    deepspeed extra)."""
    zero_stage: int | None = field(default=None, metadata=option(
        choices=ZERO_STAGE_CHOICES, parse=int, default_text="3 with --strategy deepspeed"))
    """With --strategy deepspeed, the DeepSpeed ZeRO stage: 1 partitions the optimizer state over the GPUs, 2 the
    gradients too, 3 the parameters too."""
    offload: Literal["none", "optimizer", "parameters"] = "none"
    """parameters: FSDP2 CPU offload of parameters, gradients and optimizer state (under DeepSpeed: ZeRO-3's
    offload_param + offload_optimizer); optimizer: DeepSpeed's offload_optimizer (ZeRO-Offload)."""
    offload_device: Literal["cpu", "nvme"] = "cpu"
    """Where DeepSpeed puts the offloaded state: cpu, or nvme (ZeRO-Infinity, ZeRO-3, at --nvme-path)."""
    nvme_path: str | None = field(default=None, metadata=option(metavar="DIR"))
    """A directory on a local NVMe drive for --offload-device nvme."""
    loss: Literal["standard", "chunked", "liger"] = "standard"
    """chunked: the LM head and cross-entropy a chunk of tokens at a time, never holding all fp32 logits (memtune's,
    inside the model's forward); liger: Liger-Kernel's fused linear cross-entropy (pip install -e ".[liger]")."""
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    training_data: DataOptions = field(default_factory=DataOptions)
    out: str | None = field(default=None, metadata=option(metavar="DIR"))
    """Write the launch files of a plan over several GPUs or machines into DIR: an accelerate config per machine
    (its machine_rank; main_process_ip/port to fill in), a torchrun line and a SLURM sbatch script."""
    explain: bool = field(default=False, metadata=option(negatable=True))
    """Also predict this configuration with one thing changed (precision, checkpointing, micro-batch, ...) against
    the budget (a trace each, seconds on a CPU; needs --budget or --gpu; off by default)."""

    def problems(self) -> list[str]:
        """Every problem of these options at once (empty: `train_config()` builds)."""
        problems = (self._shape_problems() + self.task.problems() + self.evaluation.problems()
                    + self.training_data.problems())
        if self.evaluation.auto and not (self.task.budget or self.task.gpu):
            problems.append("--eval-batch-size auto chooses the eval batch for a budget: add --budget or --gpu, "
                            "or give a number (e.g. --eval-batch-size 8)")
        if self.out is not None:
            problem = RunOptions.output_dir_problem(self.out)
            problems += [] if problem is None else [problem.replace("--output-dir", "--out", 1)]
            if not (self.task.budget or self.task.gpu):
                problems.append(f"--out {self.out} writes a plan to run, which needs the memory it is planned for: "
                                "add --gpu NAME (e.g. --gpu H100-80GB) or --budget 80GiB")
        if not problems:
            card = self.task.card()
            problems += attention_problems(self.attn, card)
            if card is not None and card.name in NO_BF16_GPUS and "bf16" in self.precision:
                problems.append(f"--precision {self.precision} needs bf16, which {card.name} (compute capability "
                                f"{card.capability}) does not have: use --precision fp16-mixed (or fp16, fp32)")
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
        nodes = task.nodes if isinstance(task.nodes, int) and task.nodes > 1 else 1
        per_gpu = task.batch_size // (nodes * gpus)
        if task.batch_size % (nodes * gpus):
            where = f"--gpus {gpus}" if nodes == 1 else f"{nodes * gpus} GPUs (--nodes {nodes} x --gpus {gpus})"
            problems.append(f"--batch-size {task.batch_size} is not a multiple of {where}: each GPU takes an equal "
                            "share")
        gpus *= nodes  # every GPU of every machine, in the messages below
        bad_micro = self.micro_batch_size is not None and self.micro_batch_size < 1
        if bad_micro:
            problems.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        micro = self.micro_batch_size or per_gpu or 1
        if task.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {task.batch_size}")
        if micro < 1:
            if not bad_micro:  # said once
                problems.append(f"--micro-batch-size must be >= 1, got {micro}")
        elif per_gpu >= 1 and per_gpu % micro:
            divisor = max(d for d in range(1, micro + 1) if per_gpu % d == 0)
            problems.append(f"--batch-size {task.batch_size} is not a multiple of --micro-batch-size {micro} x --gpus "
                            f"{gpus}: the effective batch would change; pick a divisor such as {divisor}")
        if task.seq_len < 1:
            problems.append(f"--seq-len must be >= 1, got {task.seq_len}")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 1:
            problems.append(f"--checkpoint-layers must be >= 1, got {self.checkpoint_layers} (leave out "
                            "--checkpointing to checkpoint none)")
        return problems + self._deepspeed_problems()

    def _deepspeed_problems(self) -> list[str]:
        """DeepSpeed's options without --strategy deepspeed, and DeepSpeed missing (the install hint)."""
        pins = [flag for flag, given in (
            (f"--zero-stage {self.zero_stage}", self.zero_stage is not None),
            ("--offload optimizer", self.offload == "optimizer"),
            (f"--offload-device {self.offload_device}", self.offload_device != "cpu"),
            ("--nvme-path", self.nvme_path is not None)) if given]
        if self.strategy != "deepspeed":
            if not pins:
                return []
            default = " (plan's default)" if self.strategy == PlanOptions.strategy else ""
            return [f"{', '.join(pins)} {'is' if len(pins) == 1 else 'are'} DeepSpeed's, got --strategy "
                    f"{self.strategy}{default}: add --strategy deepspeed"
                    + (", or use --offload parameters (FSDP2 CPU offload)" if self.offload == "optimizer" else "")]
        stage = self.zero_stage or 3
        problems = []
        if self.offload == "parameters" and stage != 3:
            problems.append(f"--offload parameters under DeepSpeed is ZeRO-3's offload_param, got --zero-stage "
                            f"{stage}: use --zero-stage 3, or --offload optimizer")
        if self.offload_device == "nvme" and self.offload == "none":
            problems.append("--offload-device nvme says where offloaded state goes, and nothing is offloaded: add "
                            "--offload optimizer (or parameters), or drop --offload-device")
        elif self.offload_device == "nvme" and stage != 3:
            problems.append(f"--offload-device nvme is ZeRO-3's (ZeRO-Infinity), got --zero-stage {stage}: use "
                            "--zero-stage 3, or --offload-device cpu")
        if self.offload_device == "nvme" and self.nvme_path is None:
            problems.append("--offload-device nvme needs --nvme-path, a directory on a local NVMe drive "
                            "(e.g. --nvme-path /local_nvme)")
        if self.optimizer not in DEEPSPEED_OPTIMIZERS:
            problems.append(f"a DeepSpeed plan runs DeepSpeed's AdamW (fp32 state), got --optim {self.optimizer}: "
                            "use --optim adamw_torch_fused or adamw_torch")
        if problems:
            return problems
        if not deepspeed_available():
            return [f"--strategy deepspeed needs DeepSpeed, which is not installed: {DEEPSPEED_EXTRA_HINT} (or pip "
                    "install 'deepspeed>=0.19'), or choose --strategy fsdp"]
        if self.nvme_path is not None and self.offload_device != "nvme":
            return ["--nvme-path is for --offload-device nvme: add --offload-device nvme, or drop --nvme-path"]
        if self.nvme_path is not None and not Path(self.nvme_path).expanduser().is_dir():  # as fit.nvme_free_bytes
            return [f"--nvme-path {self.nvme_path!r} is not an existing directory: give a directory on a local NVMe "
                    "drive (DeepSpeed swaps the offloaded state into it), e.g. --nvme-path /local_nvme"]
        return []

    def zero(self) -> Zero | None:
        """The ZeRO settings of --strategy deepspeed (stage 3 unless --zero-stage says otherwise); None otherwise."""
        if self.strategy != "deepspeed":
            return None
        return Zero(stage=self.zero_stage or 3, offload_device=self.offload_device, nvme_path=self.nvme_path)

    def train_config(self) -> TrainConfig:
        """The configuration to predict (`strategy` auto starts from FSDP). Raises UsageError listing every
        problem of the options."""
        problems = self._shape_problems()
        shaped = [flag for flag, given in (("--lora-rank", self.lora_shape.lora_rank != LoraOptions.lora_rank),
                                           ("--lora-targets", self.lora_shape.lora_targets != LoraOptions.lora_targets))
                  if given]
        if shaped and not (self.lora or self.quantized_base is not None):
            verb = "shapes" if len(shaped) == 1 else "shape"
            problems.append(f"{' and '.join(shaped)} {verb} the LoRA adapter, and no adapter is planned: add --lora "
                            f"(or --qlora 4|8), or drop {' and '.join(shaped)}")
        if problems:
            raise UsageError("; ".join(problems))
        gpus = 1 if self.task.gpus is None else self.task.gpus
        per_gpu = self.task.batch_size // self.task.world_size
        micro = self.micro_batch_size or per_gpu or 1
        weights, amp = precision_config(self.precision)
        quantized: dict = {}
        card = self.task.card()
        if self.quantized_base is not None:  # its default bf16 becomes fp16 on a card without bf16
            quantized = quantized_base_fields(self.quantized_base, None if self.precision == "fp32" else self.precision,
                                              bf16_supported=card is None or card.bf16_supported)
            weights, amp = quantized.pop("weights_dtype"), quantized.pop("amp")
        return TrainConfig(
            seq_len=self.task.seq_len, micro_batch_size=micro, grad_accum_steps=max(1, per_gpu // micro),
            weights_dtype=weights, amp=amp,
            gradient_checkpointing=self.checkpointing or self.checkpoint_layers is not None or self.offload_activations,
            checkpoint_layers=self.checkpoint_layers, offload_activations=self.offload_activations,
            expandable_segments=self.expandable_segments,
            adapter=self.lora_shape.adapter() if self.lora or quantized else None, num_gpus=gpus,
            num_nodes=self.task.nodes,
            offload=self.offload, strategy="fsdp" if self.strategy == "auto" else self.strategy, zero=self.zero(),
            loss=self.loss,
            optimizer=self.optimizer, **quantized, **self.evaluation.fields(self.task.seq_len, micro),
            # as the search does (ladder.Optimizer.conflict): torchao's optimizers round bf16 weights stochastically
            stochastic_rounding=rounds_stochastically(self.optimizer, weights, bool(self.lora or quantized)),
            attn=self.attn, gpu_capability=None if card is None else card.capability,
            trainer=self.task.trainer, sft_batches=self.task.sft_batches,
            precompute_ref_log_probs=bool(self.task.precompute_ref_log_probs),  # plan: auto keeps the reference
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
    packing: Packing | None = field(default=None, metadata=option(
        default_text=DEFAULT_PACKING, note="; ".join(f"{name}: {words}" for name, words in PACKING_MODES.items())))
    """How the documents are batched: give the mode `memtune plan|fit --data --packing` planned (the plan's seq_len is
    then the worst row's length, and the run cuts at it: the same batches). bfd needs TRL"""
    trainer: Literal["causal-lm", "sft", "dpo"] | None = field(default=None, metadata=option(
        default_text="the plan's"))
    """The trainer the plan was made for (memtune plan/fit --trainer); sft and dpo run TRL's trainers (pip install
    -e ".[trl]") on prompt/completion or prompt/chosen/rejected JSON Lines (default: memtune's generated samples).
    Another trainer than the plan's is refused: its memory differs."""
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
    """Continue from the latest checkpoint-N in --output-dir at step N+1 (not for TRL plans yet: they write no
    checkpoints)."""
    json: bool = False
    """Print the run summary as JSON instead of a table."""

    def problems(self) -> list[str]:
        """Every problem of these options at once (the plan file is checked by `Plan.load`; the default
        output directory, which depends on the plan, by the runner)."""
        problems = []
        for name, minimum in (("max_steps", 1), ("save_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is None and name == "max_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
            elif value < minimum:
                problems.append(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
        if isinstance(self.seed, int) and self.seed >= 2**32:
            problems.append(f"--seed must be below 2**32 (numpy's seeds), got {self.seed}")
        rate = self.learning_rate
        if rate is not None:
            if not isinstance(rate, (int, float)) or isinstance(rate, bool):
                problems.append(f"--learning-rate must be a number, got {rate!r}")
            elif not math.isfinite(rate) or rate <= 0:
                problems.append(f"--learning-rate must be a positive number, got {rate}: "
                                "e.g. 2e-4 with LoRA, 2e-5 for full fine-tuning")
        if not isinstance(self.text_field, str) or not self.text_field:
            problems.append(f"--text-field must name a JSON field, got {self.text_field!r}")
        if self.packing is not None and self.packing not in PACKING_MODES:
            problems.append(f"--packing {self.packing!r} is not a batching mode: use one of "
                            f"{', '.join(PACKING_MODES)} (default {DEFAULT_PACKING})")
        elif self.packing == "bfd" and (missing := trl_problem()):
            problems.append(missing)
        if self.output_dir is not None:
            problem = self.output_dir_problem(self.output_dir)
            if problem:
                problems.append(problem)
        return problems

    def data_problem(self) -> str | None:
        """--data that does not exist (checked before work starts, not when the command line is parsed)."""
        if self.data is not None and not Path(self.data).exists():
            return f"--data {self.data!r} does not exist: give a .jsonl, .json or .txt file or a folder of them"
        return None

    @staticmethod
    def output_dir_problem(path: str | Path) -> str | None:
        """Why `memtune run` could not write into `path` (None: it can): a file there or above it, or a
        place where this user may not create files (a read-only file system, no permission). Writes
        nothing but a temporary file, deleted at once, in the folder or its nearest existing parent."""
        path = Path(path)
        fix = "choose a directory you can write (a new one is created)"
        existing = path
        try:
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir():
                if existing == path:
                    return f"--output-dir '{path}' is a file, not a directory: {fix}"
                return f"--output-dir '{path}' cannot be created: '{existing}' is a file; {fix}"
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            where = "" if existing == path else f" (in '{existing}', its nearest existing parent)"
            return f"--output-dir '{path}' is not writable{where}: {error.strerror or error}; {fix}"
        return None

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
    """Real trial steps of the winner on the GPU (on by default; --no-verify skips them)."""
    trial_steps: int = field(default=2, metadata=option(group=VERIFY_AND_OUTPUT))
    """Optimizer steps per trial, 1 to 3."""
    plan_out: str = field(default="memtune-plan.json", metadata=option(group=VERIFY_AND_OUTPUT))
    """Where to save the plan."""
    explain: bool = field(default=True, metadata=option(group=VERIFY_AND_OUTPUT, negatable=True))
    """The "why this one" table: the chosen configuration with one thing changed, predicted after the plan is saved
    (a trace each, their seconds stated apart; on by default, --no-explain skips them)."""
    report: str | None = field(default=None, metadata=option(metavar="FILE.html", group=VERIFY_AND_OUTPUT))
    """Also write the report as a self-contained HTML page."""
    run: bool = field(default=False, metadata=option(group=VERIFY_AND_OUTPUT))
    """Train with the plan right away (same as `memtune run PLAN`)."""
    output_dir: str | None = field(default=None, metadata=option(metavar="DIR", group=VERIFY_AND_OUTPUT,
                                                                 default_text="memtune-runs/<model name>"))
    """With --run: where the model and checkpoints go."""
    max_steps: int | None = field(default=None, metadata=option(group=VERIFY_AND_OUTPUT,
                                                                default_text="one pass over the data"))
    """With --run: optimizer steps."""
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    training_data: DataOptions = field(default_factory=DataOptions)

    def problems(self) -> list[str]:
        """Every problem of these options at once (empty: `policy()` builds a valid Policy)."""
        task, pins = self.task, self.pins
        problems = self.evaluation.problems() + self.training_data.problems(run=self.run)
        missing = self.evaluation.data_problem()
        if missing:
            problems.append(missing)
        if self.adapters.prefix and (self.adapters.no_lora or self.adapters.full_finetune_only):
            problems.append("--prefix contradicts --no-lora/--full-finetune-only: keep one")
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
                problems += attention_card_problems(pins.attn, task.card())  # the package: validate said it
            except UsageError as error:
                problems.append(str(error))
        # the plan is written after the search: a place it cannot go is refused now (the default path only
        # when a budget or card is given; without them a plan is saved only where a GPU is here)
        plan_out_given = self.plan_out != FitOptions.plan_out or task.budget or task.gpu
        for flag, path in (("--plan-out", self.plan_out if plan_out_given else None), ("--report", self.report)):
            problem = None if path is None else output_file_problem(flag, path)
            if problem:
                problems.append(problem)
        if self.run:  # checked now, not after minutes of search
            problems += self.run_options("").problems()
        elif self.output_dir is not None or self.max_steps is not None:  # --data plans the data without --run
            given = [flag for flag, value in (("--output-dir", self.output_dir), ("--max-steps", self.max_steps))
                     if value is not None]
            verb = "applies" if len(given) == 1 else "apply"
            problems.append(f"{', '.join(given)} only {verb} with --run: add --run to train now, or drop them")
        return list(dict.fromkeys(problems + task.problems()))  # one problem found by two checks is said once

    def policy(self) -> Policy:
        """The search's policy: the pins and forbidden rungs, the adapter choice and the GPUs (those visible
        here when --gpus is not given and neither --budget nor --gpu is)."""
        gpus = self.task.gpus
        if gpus is None:
            gpus = 1 if (self.task.budget or self.task.gpu) else visible_gpus()
        return dataclasses.replace(self.pins, num_gpus=gpus, num_nodes=self.task.nodes, adapter=self.adapters.adapter(),
                                   use_adapter=self.adapters.use_adapter(), **self.task.trainer_fields())

    def run_options(self, plan_path: str) -> RunOptions:
        """`fit --run`: run the saved plan with this command's --data, --text-field, --packing, --output-dir and
        --max-steps."""
        return RunOptions(plan=plan_path, data=self.training_data.data, text_field=self.training_data.text_field,
                          packing=None if self.training_data.packing == DEFAULT_PACKING else self.training_data.packing,
                          output_dir=self.output_dir, max_steps=self.max_steps)


def output_file_problem(flag: str, path: str | Path) -> str | None:
    """Why the file `path` of option `flag` (--plan-out, --report) could not be written (None: it can): a
    directory there, a file where one of its folders must go, or a place where this user may not create
    files (read-only file system, no permission). Missing folders are fine: the writers create them. Writes
    nothing but a temporary file, deleted at once, in the nearest existing folder."""
    path = Path(path)
    fix = "give a file path in a folder you can write"
    if path.is_dir():
        example = path / ("report.html" if flag == "--report" else "memtune-plan.json")
        return f"{flag} '{path}' is a directory: give a file name in it, e.g. {flag} {example}"
    existing = path.parent
    try:
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{flag} '{path}' cannot be created: '{existing}' is a file; {fix}"
        if path.exists() and not os.access(path, os.W_OK):
            return f"{flag} '{path}' exists and is read-only; {fix}"
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{flag} '{path}' is not writable (in '{existing}'): {error.strerror or error}; {fix}"
    return None


def visible_gpus() -> int:
    """CUDA devices this process sees, at least 1 (torch.cuda.device_count)."""
    import torch  # only `fit` without --gpus, --budget or --gpu needs it

    return max(1, torch.cuda.device_count())
