"""The candidate training configuration, and byte quantities (budgets) with their units.

A `TrainConfig` is everything about a fine-tuning step that changes its memory: micro-batch,
sequence length, precision, gradient checkpointing, adapter, optimizer, offload and loss. It is a
frozen dataclass so candidates can be hashed, compared and cached, and it round-trips through JSON.
Bytes are integers everywhere; units exist only in `parse_bytes` and `format_bytes`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memtune.errors import UsageError, listed

DType = Literal["fp32", "bf16", "fp16"]
Amp = Literal["none", "bf16", "fp16"]
Offload = Literal["none", "optimizer", "parameters"]
Loss = Literal["standard", "chunked", "liger"]
LOSSES = ("standard", "chunked", "liger")
Strategy = Literal["fsdp", "ddp", "deepspeed"]
STRATEGY_NAMES = {"fsdp": "FSDP", "ddp": "DDP", "deepspeed": "DeepSpeed"}

# --precision NAME -> (dtype the weights are stored in, autocast compute dtype).
PRECISIONS: dict[str, tuple[DType, Amp]] = {
    "fp32": ("fp32", "none"),
    "bf16-mixed": ("fp32", "bf16"),  # what Trainer(bf16=True) runs: fp32 master weights, bf16 autocast
    "fp16-mixed": ("fp32", "fp16"),  # fp32 master weights, fp16 autocast, GradScaler
    "bf16": ("bf16", "none"),  # weights stored in bf16 (the usual choice for a frozen LoRA base)
    "fp16": ("fp16", "none"),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
"""transformers' attn_implementation values memtune plans (`--attn`): torch's SDPA (the kernel the card picks,
`predict.emulation.sdpa_backend`), eager (the attention matrix in the model's dtype, softmax in fp32), the
flash-attn package's kernels (sm80+), torch's flex attention (traced on fake CUDA only)."""

# --optim NAME: transformers' `TrainingArguments.optim` names (5.24), and what each one is.
OPTIMIZERS: dict[str, str] = {
    "adamw_torch_fused": "torch AdamW, fused kernel (Trainer's default); fp32 state: 8 bytes per fp32 parameter",
    "adamw_torch": "torch AdamW, foreach kernels: the same state, and a state-sized temporary in the step",
    "adamw_bnb_8bit": "bitsandbytes AdamW with 8-bit blockwise state: ~2 bytes per parameter (needs .[quant])",
    "paged_adamw_8bit": "bitsandbytes 8-bit AdamW, its state paged in CUDA unified memory (needs .[quant])",
    "paged_adamw_32bit": "bitsandbytes fp32 AdamW, its state paged in CUDA unified memory (needs .[quant])",
    "adafactor": "transformers Adafactor (no momentum, factored second moment): far less state than AdamW",
    "adamw_torch_8bit": "torchao AdamW8bit: 8-bit blockwise state, ~2 bytes per parameter, a compiled step "
                        "(needs .[quant])",
    "adamw_torch_4bit": "torchao AdamW4bit: 4-bit blockwise state, ~1 byte per parameter, a compiled step "
                        "(needs .[quant])",
}
DEFAULT_OPTIMIZER = "adamw_torch_fused"
LEGACY_OPTIMIZERS = {"adamw": DEFAULT_OPTIMIZER}
"""Names in plans saved before --optim existed: "adamw" was torch's fused AdamW."""
BITSANDBYTES_OPTIMIZERS = frozenset({"adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})
"""Optimizers that need the optional bitsandbytes package (`pip install -e ".[quant]"`)."""
TORCHAO_OPTIMIZERS = frozenset({"adamw_torch_8bit", "adamw_torch_4bit"})
"""Optimizers that need the optional torchao package (`pip install -e ".[quant]"`): transformers builds
torchao.optim.AdamW8bit / AdamW4bit for them (trainer_optimizer.py `_get_torchao_optimizer`)."""
UNSHARDABLE_OPTIMIZERS = BITSANDBYTES_OPTIMIZERS | TORCHAO_OPTIMIZERS | {"adafactor"}
"""Optimizers whose state memtune does not plan under FSDP2 or CPU offload: bitsandbytes' (its own CUDA state
buffers, which FSDP2 can neither shard nor offload); transformers' Adafactor, whose factored row/column state is
made from the gradient's shape as plain tensors that then meet FSDP2's DTensors ("aten.add_.Tensor got mixed
torch.Tensor and DTensor", traced here); torchao's, which do support FSDP2's DTensors (torchao/optim/adam.py
`_new_buffer`) but whose sharded step memtune has not traced or measured yet."""
EIGHT_BIT_OPTIMIZERS = frozenset({"adamw_bnb_8bit", "paged_adamw_8bit"}) | TORCHAO_OPTIMIZERS
"""Optimizers whose state is quantised to 8 bits or fewer (a quality trade, forbidden by --no-8bit-optim)."""
FOUR_BIT_OPTIMIZERS = frozenset({"adamw_torch_4bit"})
"""Optimizers whose state is quantised to 4 bits: a larger quality trade than 8 bits (`search.ladder.quality_rank`)."""
PAGED_OPTIMIZERS = frozenset({"paged_adamw_8bit", "paged_adamw_32bit"})
"""Optimizers whose large state tensors live in CUDA unified memory (cudaMallocManaged), outside torch's pool."""
QUANT_EXTRA_HINT = 'pip install -e ".[quant]"'
LIGER_EXTRA_HINT = 'pip install -e ".[liger]"'
DEEPSPEED_EXTRA_HINT = 'pip install -e ".[deepspeed]"'
DEEPSPEED_OPTIMIZERS = frozenset({"adamw_torch_fused", "adamw_torch"})
"""Optimizers a DeepSpeed plan runs: its JSON names DeepSpeed's AdamW (`run.launch.deepspeed_config`), which
DeepSpeed builds as torch's AdamW without offload and as DeepSpeedCPUAdam with it (DeepSpeed 0.19.8
runtime/engine.py:2377-2397): the same fp32 Adam state as these two. Others are refused, not silently swapped."""
QUANTIZED_BASE_CHOICES = ("4", "8")
"""--qlora BITS: the quantised bases the search can pin (Quantization.bits)."""
ZERO_STAGE_CHOICES = ("1", "2", "3")
"""--zero-stage K: the DeepSpeed ZeRO stages (Zero.stage)."""

Trainer = Literal["causal-lm", "sft", "dpo"]
TRAINERS: dict[str, str] = {
    "causal-lm": "memtune's causal-LM step (the model's own forward and loss), as transformers' Trainer runs it",
    "sft": "TRL's SFTTrainer: its fused LM head (per-token log-probs, entropy and top-1 in vocabulary tiles, never "
           "the full logits) and the next-token loss on the labelled tokens",
    "dpo": "TRL's DPOTrainer: chosen and rejected sequences in one batch of twice the micro-batch, the policy's "
           "forward and backward and the reference's forward (a frozen copy, the adapter disabled, or precomputed)",
}
"""--trainer NAME: whose training step is planned (`TrainConfig.trainer`); TRL 1.16's trainers, read from
trl/trainer/sft_trainer.py, dpo_trainer.py and utils.py `add_fused_lm_head`."""
SftBatches = Literal["padded", "packed", "padding-free"]
SFT_BATCHES: dict[str, str] = {
    "padded": "micro-batch rows of seq-len tokens (SFTConfig packing=False, padding_free=False)",
    "packed": "sequences packed into rows of seq-len tokens, flattened padding-free into one row per micro-batch "
              "(SFTConfig packing=True with its default packing_strategy bfd, which turns padding_free on)",
    "padding-free": "the micro-batch's sequences flattened into one row without padding (SFTConfig padding_free=True)",
}
"""--sft-batches MODE of --trainer sft (`TrainConfig.sft_batches`)."""
TRL_EXTRA_HINT = 'pip install -e ".[trl]"'

EvalLogits = Literal["none", "accumulate_cpu", "keep"]
EVAL_LOGITS: dict[str, str] = {
    "none": "loss only (TrainingArguments prediction_loss_only=True): no logits kept; compute_metrics then gets none",
    "accumulate_cpu": "logits moved to the host after every eval step (eval_accumulation_steps=1)",
    "keep": "logits of the whole eval set kept on the GPU, as Trainer does with compute_metrics and neither setting",
}
"""What Trainer's evaluation loop does with each eval step's logits (`TrainConfig.eval_logits`; transformers 5.24
trainer.py `evaluation_loop`)."""
EVAL_BATCH_FACTOR = 8
"""--eval-batch-size auto tries eval batches up to this many times the training micro-batch
(`predict.evaluation.eval_batch_candidates`): evaluation saves no activations for backward, so it takes larger
batches, but past a few times the micro-batch the forward gains little speed while the logits it holds grow."""


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
    autocast_adapter_dtype: bool = True
    """peft's `get_peft_model(autocast_adapter_dtype=...)`: True keeps the adapter's weights in fp32 over a 16-bit
    base (peft's default, which also makes each adapted layer keep an fp32 copy of its input for backward); False
    leaves them in the base's dtype, as DeepSpeed ZeRO-1/2 leave them after casting the whole module."""
    base_saves_input: bool = False
    """The frozen base's linear layers keep their input for backward, as under DeepSpeed ZeRO-3, whose F.linear
    saves it whether the weight trains or not (zero_optimization.memory_efficient_linear, on by default). Set by
    memtune's ZeRO-3 prediction for its trace; a plan never needs it (DeepSpeed does it in the run)."""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("lora", "prefix"):
            problems.append(f"adapter kind must be lora or prefix, got {self.kind!r}")
        for name in ("rank", "num_virtual_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(
                    f"{name} must be a positive integer, got {value!r}" + (" (--lora-rank)" if name == "rank" else "")
                )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            problems.append(f"alpha must be a positive number, got {self.alpha!r}")
        for name in ("autocast_adapter_dtype", "base_saves_input"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(name, str) and name.strip() for name in targets):
            problems.append(f"target_modules must be 'all-linear' or module names such as q_proj,v_proj, "
                            f"got {self.target_modules!r} (--lora-targets)")
        if problems:
            raise UsageError(listed("invalid adapter", problems))

    def describe(self) -> str:
        if self.kind == "prefix":
            return f"prefix tuning ({self.num_virtual_tokens} tokens)"
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        return f"LoRA r={self.rank} ({targets})"


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class Quantization:
    """A base model stored quantised by bitsandbytes (QLoRA), as transformers' `BitsAndBytesConfig` loads it.

    The fields are BitsAndBytesConfig's without their `bnb_4bit_` prefix: bits 4 is `load_in_4bit`, 8 is
    `load_in_8bit` (LLM.int8, threshold 6.0, transformers' default); the others are read for 4 bits only.
    Only the adapter trains: a quantised base needs LoRA."""

    bits: Literal[4, 8] = 4
    """4 (QLoRA's nf4/fp4) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """bnb_4bit_quant_type: the 4-bit data type."""
    use_double_quant: bool = True
    """bnb_4bit_use_double_quant: quantise the per-64-block scales again (8 bits per 256 scales)."""
    compute_dtype: Literal["bf16", "fp16"] = "bf16"
    """bnb_4bit_compute_dtype: the dtype a 4-bit layer dequantises to and multiplies in."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            problems.append(f"bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in QUANT_TYPES:
            problems.append(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if not isinstance(self.use_double_quant, bool):
            problems.append(f"use_double_quant must be True or False, got {self.use_double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"compute_dtype must be bf16 or fp16, got {self.compute_dtype!r}")
        if problems:
            raise UsageError(listed("invalid quantization", problems))

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit base (LLM.int8)"
        double = ", double quant" if self.use_double_quant else ""
        return f"4-bit base ({self.quant_type}), {self.compute_dtype} compute{double}"


ZERO_STAGES = (1, 2, 3)
ZERO_OFFLOAD_DEVICES = ("cpu", "nvme")
ZERO_BUCKET_KNOBS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                     "sub_group_size")
"""Zero's size knobs, named as in DeepSpeed's JSON "zero_optimization" block; all count elements."""


@dataclass(frozen=True)
class Zero:
    """DeepSpeed ZeRO (strategy "deepspeed"): which model states are partitioned over the data-parallel ranks, where
    `TrainConfig.offload` puts them, and the communication buffers' sizes.

    Every size knob counts ELEMENTS (parameters), not bytes, as DeepSpeed does (runtime/zero/config.py): a bucket of
    `reduce_bucket_size` elements holds `reduce_bucket_size x 2` bytes of bf16 gradients. None means the value
    transformers' "auto" gives it for the model (`transformers/integrations/deepspeed.py:202-242`, the same in
    accelerate 1.15 accelerator.py:2295-2326) where "auto" exists, else DeepSpeed 0.19.8's default; `resolved`
    turns every knob into a number, and the launched JSON carries those numbers, so the predicted and the run
    configurations agree by construction."""

    stage: int = 3
    """1: optimizer state partitioned; 2: gradients too; 3: parameters too (DeepSpeed's `zero_optimization.stage`)."""
    offload_device: Literal["cpu", "nvme"] = "cpu"
    """Where `TrainConfig.offload`'s state goes: offload "optimizer" becomes DeepSpeed's offload_optimizer,
    "parameters" offload_param + offload_optimizer (ZeRO-3 only). "nvme" (ZeRO-Infinity) is ZeRO-3 only: ZeRO-1/2
    accept the setting and silently use the CPU (the memo's reading of stage_1_and_2.py). Unused without offload."""
    nvme_path: str | None = None
    """A directory on a fast local NVMe drive for offload_device "nvme" (DeepSpeed's `nvme_path`); required there."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward. DeepSpeed's default is False for ZeRO-1/2 and True for ZeRO-3
    (runtime/zero/config.py:138, 384-386); memtune writes it explicitly. ZeRO-1/2 then hold two reduce buckets."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous partition as they are reduced (less fragmentation; DeepSpeed default)."""
    reduce_bucket_size: int | None = None
    """Elements reduced at a time (the IPG bucket: x2 bytes in bf16, x2 again with overlap_comm for ZeRO-1/2).
    None: hidden_size^2 (transformers' "auto"; DeepSpeed's own default is 5e8)."""
    allgather_bucket_size: int | None = None
    """ZeRO-1/2: elements all-gathered at a time after the step. None: DeepSpeed's default 5e8 (no "auto"); no
    buffer of that size is allocated on torch with all_gather_into_tensor (runtime/utils.py:1019-1022)."""
    stage3_prefetch_bucket_size: int | None = None
    """ZeRO-3: elements of parameters gathered ahead of their use. None: int(0.9 hidden_size^2) ("auto")."""
    stage3_param_persistence_threshold: int | None = None
    """ZeRO-3: parameters of at most this many elements stay gathered on every GPU. None: 10 hidden_size ("auto")."""
    stage3_max_live_parameters: int | None = None
    """ZeRO-3: cap, in elements, on gathered parameters when prefetching. None: DeepSpeed's default 1e9."""
    stage3_max_reuse_distance: int | None = None
    """ZeRO-3: a gathered parameter whose next use is within this many elements of gathers stays gathered.
    None: DeepSpeed's default 1e9."""
    sub_group_size: int | None = None
    """ZeRO-3: elements per optimizer sub-group (the step's fp32 transients are per sub-group). None: DeepSpeed's
    default 1e9."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.stage, bool) or self.stage not in ZERO_STAGES:
            problems.append(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.offload_device not in ZERO_OFFLOAD_DEVICES:
            problems.append(f"offload_device must be cpu or nvme, got {self.offload_device!r}")
        if self.nvme_path is not None and (not isinstance(self.nvme_path, str) or not self.nvme_path.strip()):
            problems.append(f"nvme_path must be a directory path or None, got {self.nvme_path!r}")
        for name in ("overlap_comm", "contiguous_gradients"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ZERO_BUCKET_KNOBS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (value == 0 and name == "reduce_bucket_size")):
                least = "a positive" if name == "reduce_bucket_size" else "a non-negative"
                problems.append(f"{name} must be {least} number of elements or None (auto), got {value!r}")
        if problems:
            raise UsageError(listed("invalid zero", problems))

    def resolved(self, hidden_size: int) -> dict[str, int]:
        """Every size knob as a number of elements for a model of `hidden_size`: the field where set, else what
        transformers 5.24 writes for "auto" (integrations/deepspeed.py:232-242: reduce_bucket_size
        hidden_size * hidden_size, stage3_prefetch_bucket_size int(0.9 * hidden_size * hidden_size),
        stage3_param_persistence_threshold 10 * hidden_size), else DeepSpeed 0.19.8's default
        (runtime/zero/config.py: allgather_bucket_size 5e8 line 132, stage3_max_live_parameters 1e9 line 245,
        stage3_max_reuse_distance 1e9 line 251, sub_group_size 1e9 line 182). Raises UsageError for a
        hidden_size that is not a positive integer."""
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise UsageError(f"Zero.resolved needs the model's hidden_size as a positive integer, got {hidden_size!r}")
        defaults = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "allgather_bucket_size": int(5e8),
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "sub_group_size": int(1e9),
        }
        values = {name: getattr(self, name) for name in ZERO_BUCKET_KNOBS}
        return {name: defaults[name] if value is None else value for name, value in values.items()}

    def describe(self, offload: str = "none") -> str:
        """The ZeRO stage in words, with where `offload` ("none", "optimizer" or "parameters") puts the state."""
        place = "NVMe" if self.offload_device == "nvme" else "CPU"
        if offload == "optimizer":
            return f"DeepSpeed ZeRO-{self.stage} ({place} optimizer offload)"
        if offload == "parameters":
            return f"DeepSpeed ZeRO-{self.stage} ({place} parameter + optimizer offload)"
        return f"DeepSpeed ZeRO-{self.stage}"


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
    checkpoint_layers: int | None = None
    """With gradient_checkpointing: how many decoder layers are checkpointed, counted from the first; None: all.
    The first ones, because their backward runs last: each recomputation then happens after the layers above
    have freed their saved activations, so it never adds to them (`recipe.step.set_checkpointing`)."""
    offload_activations: bool = False
    """With gradient_checkpointing: keep each checkpointed decoder layer's inputs (what it saves for its recompute)
    in pinned host memory instead of on the GPU, as transformers 5.24's `activation_checkpointing_enable(
    offload=True)` does (`torch.autograd.graph.save_on_cpu` around the checkpoint; `recipe.step.set_checkpointing`):
    frees checkpointed layers x tokens x hidden bytes of the GPU for a device-to-host copy in forward and one back in
    backward, on the compute stream."""
    adapter: Adapter | None = None
    """LoRA / prefix tuning through peft; None trains all weights."""
    optimizer: str = DEFAULT_OPTIMIZER
    """The optimizer, by its transformers `optim` name (OPTIMIZERS): built exactly as Trainer builds it
    (`recipe.step.make_optimizer`). "adamw" (plans saved before this field had a choice) reads as
    adamw_torch_fused."""
    stochastic_rounding: bool = False
    """torchao's optimizers write bf16 weights with stochastic rounding (TrainingArguments
    optim_args="bf16_stochastic_round=True"): an update smaller than bf16's resolution survives in expectation
    instead of rounding away (torchao/optim/quant_utils.py `_fp32_to_bf16_sr`), at no memory cost (measured). Pure
    bf16 full fine-tuning with adamw_torch_8bit / adamw_torch_4bit only; the search and `memtune plan` set it
    there."""
    expandable_segments: bool = False
    """The caching allocator's mode: `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (one segment per pool that
    grows by mapping pages, `predict.allocator.ExpandableAllocator`) instead of a segment per cudaMalloc. It
    changes no allocation of the step, only how the allocator lays them out (reserved memory); `memtune run` and
    `Plan.prepare` set it."""
    offload: Offload = "none"
    """What lives on the CPU between uses: nothing, the optimizer state, or parameters too. Under strategy
    "deepspeed" it is ZeRO's offload_optimizer / offload_param + offload_optimizer, to `zero.offload_device`."""
    loss: Loss = "standard"
    """"chunked" computes the LM-head and cross-entropy in chunks, never holding all fp32 logits; "liger" is
    Liger-Kernel's fused linear cross-entropy (Triton, a CUDA GPU; `recipe.loss`). Both run in the model's forward,
    so on one GPU, with DDP and under FSDP2."""
    num_gpus: int = 1
    """GPUs of one data-parallel job on each machine; the effective batch is split over `world_size` GPUs."""
    num_nodes: int = 1
    """Machines of `num_gpus` GPUs each (--nodes): the job spans `world_size` = num_nodes x num_gpus GPUs, over
    which the strategy shards or replicates; above 1 it needs a strategy that spans GPUs (not a quantised base)."""
    strategy: Strategy = "fsdp"
    """How several GPUs share the work (only with num_gpus > 1): "fsdp" shards weights, gradients and
    optimizer state over them (FSDP2 full sharding; also the engine of CPU offload); "ddp" keeps a full
    replica on every GPU and all-reduces the gradients (DistributedDataParallel), without offload.
    "deepspeed" runs DeepSpeed ZeRO as `zero` says, on one GPU or several (ZeRO-Offload on one GPU is common);
    it needs the `deepspeed` extra (`require_deepspeed`)."""
    zero: Zero | None = None
    """The DeepSpeed ZeRO settings: set exactly when strategy is "deepspeed"."""
    quantization: Quantization | None = None
    """A base stored in 4 or 8 bits by bitsandbytes (QLoRA; needs a LoRA adapter); None: the base in
    weights_dtype. Its other floating weights are loaded in weights_dtype and made fp32 by peft's
    prepare_model_for_kbit_training, as QLoRA recipes run it."""
    attn: str | None = None
    """The attention implementation the model is built with (transformers' `attn_implementation`): one of
    ATTN_IMPLEMENTATIONS; None: the model config's own (`_attn_implementation`), else transformers' default (sdpa)."""
    gpu_capability: str | None = None
    """Compute capability ("major.minor", e.g. "7.0") of the card the step runs on: which SDPA kernels exist there
    (`predict.emulation.sdpa_backend`); None: 9.0, the H100/H200 memtune's estimates are measured on."""
    eval_batch_size: int | None = None
    """Sequences per evaluation step (TrainingArguments per_device_eval_batch_size), run mid-training by Trainer with
    the weights, optimizer state and cached segments of training alive (`predict.eval_step`); None: no evaluation
    planned. The predicted peak is then that of training and evaluation together."""
    eval_logits: EvalLogits = "none"
    """What evaluation keeps of each step's logits (`EVAL_LOGITS`): "none", "accumulate_cpu" or "keep"."""
    eval_sequences: int | None = None
    """Sequences of the eval set (with eval_logits "keep": how many steps' logits are held at once); None: one
    eval batch."""
    trainer: Trainer = "causal-lm"
    """Whose step is planned (`TRAINERS`): memtune's causal-LM step, TRL's SFTTrainer or DPOTrainer (the step traced
    by `predict.trl_step`; run by `run.trl_run`, which needs the trl extra)."""
    sft_batches: SftBatches = "padded"
    """With trainer "sft": how the micro-batch is laid out (`SFT_BATCHES`); packed and padding-free batches are one
    row of micro_batch_size x seq_len tokens."""
    precompute_ref_log_probs: bool = False
    """With trainer "dpo": the reference's log-probs computed once before training (DPOConfig
    precompute_ref_log_probs=True), so no reference model is held and no reference forward runs in the step."""
    packed_rows: bool = False
    """Each row holds several documents, position_ids restarting at every document and no attention_mask
    (`memtune run --packing bfd|padding-free`, `run.data_plan`): transformers builds a block-diagonal mask from the
    position_ids, and SDPA runs its memory-efficient kernel with it; the step is traced that way
    (`recipe.step.packed_position_ids`, `predict.trace.assume_unpacked_batches`)."""

    def __post_init__(self) -> None:
        if self.optimizer in LEGACY_OPTIMIZERS:
            object.__setattr__(self, "optimizer", LEGACY_OPTIMIZERS[self.optimizer])  # frozen: set once, here
        problems = []
        counts = isinstance(self.num_gpus, int) and isinstance(self.num_nodes, int)  # `sharded` can be read
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "num_gpus", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.weights_dtype not in DTYPE_BYTES:
            problems.append(f"weights_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.weights_dtype!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            problems.append(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.strategy not in STRATEGY_NAMES:
            problems.append(f"strategy must be fsdp, ddp or deepspeed, got {self.strategy!r}")
        if self.offload not in ("none", "optimizer", "parameters"):
            problems.append(f"offload must be none, optimizer or parameters, got {self.offload!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be standard, chunked or liger, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (transformers' optim names), "
                            f"got {self.optimizer!r} (--optim)")
        elif self.optimizer in UNSHARDABLE_OPTIMIZERS and counts and self.sharded:
            problems.append(f"optimizer {self.optimizer} keeps state that memtune cannot plan sharded or offloaded "
                            "(FSDP cannot shard or offload bitsandbytes' or Adafactor's state; torchao's sharded "
                            "step is not modelled yet): use adamw_torch_fused or adamw_torch with FSDP / CPU offload")
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        if self.stochastic_rounding and not rounds_stochastically(self.optimizer, self.weights_dtype,
                                                                  self.adapter is not None):
            problems.append("stochastic rounding is torchao's, for bf16 weights trained in full: it needs "
                            "weights_dtype bf16, no adapter and adamw_torch_8bit or adamw_torch_4bit (--precision bf16 "
                            f"--optim adamw_torch_4bit), got {self.weights_dtype} weights, {self.optimizer}"
                            + (", an adapter" if self.adapter is not None else ""))
        if self.checkpoint_layers is not None:
            layers = self.checkpoint_layers
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
                problems.append(f"checkpoint_layers must be a positive number of layers or None (all), got {layers!r}")
            elif not self.gradient_checkpointing:
                problems.append(f"checkpoint_layers={layers} needs gradient_checkpointing=True")
            elif counts and self.sharded:
                problems.append(f"checkpointing only the first {layers} layers is not modelled under FSDP or CPU "
                                "offload yet: checkpoint every layer there (fit: --checkpointing on; plan: "
                                "--checkpointing without --checkpoint-layers), or with several GPUs use DDP "
                                "(--strategy ddp)")
        if not isinstance(self.offload_activations, bool):
            problems.append(f"offload_activations must be True or False, got {self.offload_activations!r}")
        elif self.offload_activations and not self.gradient_checkpointing:
            problems.append("offload_activations keeps the inputs of checkpointed layers on the host: it needs "
                            "gradient_checkpointing=True (fit: --checkpointing on or auto)")
        elif self.offload_activations and counts and self.sharded:
            problems.append("offloading activations is not modelled under FSDP or CPU offload yet: use it on one GPU "
                            "or with DDP (--strategy ddp)")
        if self.adapter is not None and not isinstance(self.adapter, Adapter):
            problems.append(f"adapter must be an Adapter or None, got {type(self.adapter).__name__}")
        elif self.adapter is not None and self.adapter.kind == "prefix" and self.gradient_checkpointing:
            problems.append("prefix tuning does not work with gradient checkpointing (peft refuses it): "
                            "use LoRA, or turn checkpointing off")
        if self.quantization is not None:
            problems += _quantization_problems(self)
        if self.attn is not None and self.attn not in ATTN_IMPLEMENTATIONS:
            problems.append(f"attn must be one of {', '.join(ATTN_IMPLEMENTATIONS)} or None (the model's own), "
                            f"got {self.attn!r}")
        if self.gpu_capability is not None and not re.fullmatch(r"\d+\.\d+", str(self.gpu_capability)):
            problems.append(f"gpu_capability must be a compute capability major.minor such as 8.0, "
                            f"got {self.gpu_capability!r}")
        if self.strategy == "ddp":
            if self.offload != "none":
                problems.append(f"strategy 'ddp' keeps a full replica on every GPU and cannot offload {self.offload!r} "
                                "to the CPU: use strategy 'fsdp' (CPU offload shards through FSDP) or offload 'none'")
            if counts and self.world_size == 1:
                problems.append("strategy 'ddp' replicates the model over several GPUs: it needs num_gpus >= 2 "
                                "(one GPU trains without a wrapper: keep the default strategy 'fsdp')")
        problems += _zero_problems(self)
        problems += _eval_problems(self)
        problems += _trainer_problems(self)
        if problems:
            raise UsageError(listed("invalid training configuration", problems))

    @property
    def world_size(self) -> int:
        """GPUs of the whole job: num_nodes machines x num_gpus each (the ranks the strategy shards over)."""
        return self.num_nodes * self.num_gpus

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def precision(self) -> str:
        """The --precision name of (weights_dtype, amp), or 'weights/amp' if it has none."""
        for name, pair in PRECISIONS.items():
            if pair == (self.weights_dtype, self.amp):
                return name
        return f"{self.weights_dtype}/{self.amp}"

    @property
    def precision_words(self) -> str:
        """`precision` for a report: a pair without a --precision name (16-bit weights under 16-bit autocast,
        as LoRA on a bf16 base runs) in words, "bf16 weights + bf16 autocast", not "bf16/bf16"."""
        if "/" in self.precision:
            return f"{self.weights_dtype} weights + {self.amp} autocast"
        return self.precision

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The configuration in plain words, for reports."""
        parts = [f"micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accum", self.precision_words]
        if self.gradient_checkpointing:
            layers = self.checkpoint_layers
            parts.append("checkpointing" if layers is None else f"checkpointing {layers} layer{'s' * (layers > 1)}")
            if self.offload_activations:
                parts[-1] += " (inputs on the host)"
        if self.adapter is not None:
            parts.append(self.adapter.describe())
        if self.quantization is not None:
            parts.append(self.quantization.describe())
        if self.loss == "chunked":
            parts.append("chunked loss")
        if self.loss == "liger":
            parts.append("Liger fused loss")
        if self.optimizer != DEFAULT_OPTIMIZER:
            parts.append(self.optimizer + (" (stochastic rounding)" if self.stochastic_rounding else ""))
        if self.offload != "none" and self.zero is None:  # under DeepSpeed the offload is in ZeRO's words
            parts.append(f"offload {self.offload}")
        if self.expandable_segments:
            parts.append("expandable segments")
        if self.attn not in (None, "sdpa"):
            parts.append(f"{self.attn} attention")
        if self.eval_batch_size is not None:
            parts.append(f"eval batch {self.eval_batch_size} (logits: {self.eval_logits})")
        if self.trainer != "causal-lm":
            parts.append(self.trainer_words)
        if self.zero is not None:
            parts.append(self.zero.describe(self.offload) + (f" on {self.gpus_words}" if self.world_size > 1 else ""))
        elif self.world_size > 1:
            parts.append(f"{self.gpus_words}, {STRATEGY_NAMES.get(self.strategy, self.strategy)}")
        return ", ".join(parts)

    @property
    def trainer_words(self) -> str:
        """The trainer in a report's words: "TRL SFT (packed)", "TRL DPO (reference: adapter disabled)"."""
        if self.trainer == "sft":
            return "TRL SFT" + ("" if self.sft_batches == "padded" else f" ({self.sft_batches})")
        if self.trainer == "dpo":
            return f"TRL DPO (reference: {self.reference})"
        return "causal LM"

    @property
    def reference(self) -> str:
        """Where TRL's DPOTrainer gets the reference log-probs in this step (dpo_trainer.py `__init__` and
        `_compute_loss`): "precomputed log-probs", "adapter disabled" (the policy's own base, peft's disable_adapter,
        when an adapter trains and no ref_model is given), "full copy" (a frozen second model); "" for other
        trainers."""
        if self.trainer != "dpo":
            return ""
        if self.precompute_ref_log_probs:
            return "precomputed log-probs"
        return "adapter disabled" if self.adapter is not None else "full copy"

    @property
    def gpus_words(self) -> str:
        """"8 GPUs", or "2 nodes x 8 GPUs" over several machines."""
        return f"{self.num_nodes} nodes x {self.num_gpus} GPUs" if self.num_nodes > 1 else f"{self.num_gpus} GPUs"

    @property
    def checkpointing_rank(self) -> float:
        """How much it checkpoints, comparable without the model: 0 off, k the first k layers, infinity all."""
        if not self.gradient_checkpointing:
            return 0.0
        return float("inf") if self.checkpoint_layers is None else float(self.checkpoint_layers)

    def traced(self) -> TrainConfig:
        """The configuration as far as the trace sees it: without the allocator's mode, which changes no event
        (trace caches key on this, so both modes share one trace). The eval fields stay: they add the evaluation
        loop to the traced events (`predict.eval_step`)."""
        return self.replace(expandable_segments=False)

    @property
    def eval_steps(self) -> int:
        """Eval steps over the eval set: ceil(eval_sequences / eval_batch_size), 1 when the set's size is
        unknown, 0 without evaluation."""
        if self.eval_batch_size is None:
            return 0
        return max(1, -(-(self.eval_sequences or self.eval_batch_size) // self.eval_batch_size))

    def checkpointed_layers(self, num_layers: int) -> int:
        """How many of a model's `num_layers` decoder layers this configuration checkpoints."""
        if not self.gradient_checkpointing:
            return 0
        return num_layers if self.checkpoint_layers is None else min(self.checkpoint_layers, num_layers)

    @property
    def replicated(self) -> bool:
        """Data parallel with a full replica per GPU (DDP): the per-GPU step is the single-GPU step."""
        return self.world_size > 1 and self.strategy == "ddp"

    @property
    def sharded(self) -> bool:
        """Run by FSDP2: sharded over several GPUs, or CPU offload (FSDP with one GPU too). Never a DeepSpeed plan
        (`deepspeed`), which ZeRO partitions its own way."""
        return (self.strategy != "deepspeed" and not self.replicated
                and (self.world_size > 1 or self.offload != "none"))

    @property
    def deepspeed(self) -> bool:
        """Run by DeepSpeed ZeRO (strategy "deepspeed", settings in `zero`), on any number of GPUs."""
        return self.strategy == "deepspeed"

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
        if isinstance(data.get("quantization"), dict):
            data["quantization"] = Quantization(**data["quantization"])
        if isinstance(data.get("zero"), dict):
            unknown = sorted(set(data["zero"]) - {f.name for f in dataclasses.fields(Zero)})
            if unknown:
                raise UsageError(f"unknown zero keys {unknown}; known keys are "
                                 f"{sorted(f.name for f in dataclasses.fields(Zero))}")
            data["zero"] = Zero(**data["zero"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


HOST_BUDGET_FRACTION = 0.5
"""Share of the host's available memory (MemAvailable) that offloaded activations may pin: pinned pages cannot be
swapped, and the data loader, the checkpoint writer and the other ranks of the machine need the rest."""


def cache_home() -> Path | None:
    """memtune's cache directory: `$MEMTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/memtune`, else `~/.cache/memtune`;
    None when `MEMTUNE_NO_CACHE` is set (1, true, yes, on). Traces (`predict.cache`) and the measured host copy
    rate (`measure.probe.host_copy_rate`) are kept there."""
    if os.environ.get("MEMTUNE_NO_CACHE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    root = os.environ.get("MEMTUNE_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memtune"


def rounds_stochastically(optimizer: str, weights_dtype: str, with_adapter: bool) -> bool:
    """Whether torchao's stochastic rounding of bf16 weights applies (`TrainConfig.stochastic_rounding`): one of its
    optimizers on bf16 weights trained in full. Where it applies, the search and `memtune plan` turn it on."""
    return optimizer in TORCHAO_OPTIMIZERS and weights_dtype == "bf16" and not with_adapter


def require_extra(optimizer: str) -> None:
    """Raise UsageError (exit 2) with the install command when `optimizer` needs bitsandbytes or torchao and it
    cannot be imported (the `quant` extra of memtune's pyproject)."""
    if optimizer in BITSANDBYTES_OPTIMIZERS and not bitsandbytes_available():
        raise UsageError(f"optimizer {optimizer} needs bitsandbytes, which is not installed: {QUANT_EXTRA_HINT} "
                         "(or pip install bitsandbytes), or choose --optim adamw_torch_fused")
    if optimizer in TORCHAO_OPTIMIZERS and not torchao_available():
        raise UsageError(f"optimizer {optimizer} needs torchao, which is not installed: {QUANT_EXTRA_HINT} "
                         "(or pip install torchao), or choose --optim adamw_torch_fused")


def deepspeed_available() -> bool:
    """Whether DeepSpeed is installed (the `deepspeed` extra), found without importing it (its import takes seconds
    and probes the accelerator; done only when a DeepSpeed plan runs)."""
    return _installed("deepspeed")


def require_deepspeed(config: TrainConfig) -> None:
    """Raise UsageError (exit 2) with the install command when `config` is a DeepSpeed plan and DeepSpeed cannot be
    found (`deepspeed_available`)."""
    if config.deepspeed and not deepspeed_available():
        raise UsageError(f"strategy deepspeed needs DeepSpeed, which is not installed: {DEEPSPEED_EXTRA_HINT} (or pip "
                         "install 'deepspeed>=0.19'), or choose strategy fsdp")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return False


def liger_available() -> bool:
    """Whether Liger-Kernel and Triton are installed (the `liger` extra), found without importing either: Liger's
    kernels are Triton's, which run on a CUDA (or ROCm) GPU; torch's Linux CUDA wheels bring Triton with them."""
    return _installed("liger_kernel") and _installed("triton")


def require_liger() -> None:
    """Raise UsageError (exit 2) with the install command when the Liger loss is asked for and Liger-Kernel or
    Triton cannot be found (`liger_available`)."""
    if not liger_available():
        missing = "liger-kernel" if not _installed("liger_kernel") else "triton (Liger's kernels are Triton's)"
        raise UsageError(f"loss liger needs {missing}, which is not installed: {LIGER_EXTRA_HINT} (or pip install "
                         "liger-kernel, on a machine with a CUDA GPU), or choose --loss chunked")


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed, found without importing it (an optional extra whose import takes
    a second and loads native libraries: done only when one of its optimizers is built)."""
    return _installed("bitsandbytes")


def torchao_available() -> bool:
    """Whether torchao is installed, found without importing it (imported only when its optimizer is built)."""
    return _installed("torchao")


def quantized_base_fields(bits: int, precision: str | None, bf16_supported: bool = True) -> dict[str, Any]:
    """The TrainConfig fields of a quantised base of `bits` (QLoRA, `--qlora BITS` of fit and plan): 4 bits nf4
    with double quantisation, or 8 bits (LLM.int8), computing in bf16 (fp16 on a card without bf16, or when
    `precision` is an fp16 one); the other weights loaded in that dtype with autocast in it (Trainer bf16=True),
    unless `precision` (a PRECISIONS name; None: not pinned) says otherwise."""
    half: Literal["bf16", "fp16"] = "bf16" if bf16_supported else "fp16"
    if precision is not None:
        weights, amp = precision_config(precision)
        if "fp16" in (weights, amp):
            half = "fp16"
    else:
        weights, amp = half, half
    quantization = Quantization(bits=4, quant_type="nf4", use_double_quant=True, compute_dtype=half) if bits == 4 \
        else Quantization(bits=8, compute_dtype=half)
    return {"quantization": quantization, "weights_dtype": weights, "amp": amp}


def _quantization_problems(config: TrainConfig) -> list[str]:
    """What is wrong with `config.quantization` given the rest of `config` (the quantised base trains a LoRA
    adapter on one GPU: bitsandbytes' weights are frozen, and memtune traces no sharded quantised base)."""
    if not isinstance(config.quantization, Quantization):
        return [f"quantization must be a Quantization or None, got {type(config.quantization).__name__}"]
    problems = []
    bits = config.quantization.bits
    if config.adapter is None or not isinstance(config.adapter, Adapter) or config.adapter.kind != "lora":
        seen = "no adapter" if config.adapter is None else f"adapter {getattr(config.adapter, 'kind', '?')!r}"
        problems.append(f"a quantised base ({bits}-bit) trains only a LoRA adapter (its weights are frozen), "
                        f"got {seen}: add adapter=Adapter() (--lora), or drop the quantization")
    if config.num_gpus != 1:
        problems.append(f"a quantised base ({bits}-bit) is planned on one GPU, got {config.num_gpus!r} GPUs "
                        "(--gpus, num_gpus): use 1")
    if config.num_nodes != 1:
        problems.append(f"a quantised base ({bits}-bit) is planned on one machine, got {config.num_nodes!r} "
                        "(--nodes, num_nodes): use 1")
    if config.offload != "none":
        problems.append(f"a quantised base ({bits}-bit) is planned without CPU offload, got offload "
                        f"{config.offload!r} (--offload): drop it")
    if config.amp == "none":
        problems.append(f"a quantised base ({bits}-bit) trains under 16-bit autocast (Trainer bf16=True or "
                        "fp16=True), got no autocast (--precision fp32, bf16 or fp16): use --precision bf16-mixed or "
                        "fp16-mixed, or leave --precision out with --qlora")
    return problems


def _trainer_problems(config: TrainConfig) -> list[str]:
    """What is wrong with the trainer fields of `config` (TrainConfig's checks, collected with the others): TRL's
    steps are traced on one GPU or with DDP (`predict.trl_step`), with their own fused LM head."""
    if config.trainer not in TRAINERS:
        return [f"trainer must be one of {', '.join(TRAINERS)}, got {config.trainer!r} (--trainer)"]
    problems = []
    if config.sft_batches not in SFT_BATCHES:
        problems.append(f"sft_batches must be one of {', '.join(SFT_BATCHES)}, got {config.sft_batches!r} "
                        "(--sft-batches)")
    elif config.sft_batches != "padded" and config.trainer != "sft":
        problems.append(f"sft_batches {config.sft_batches!r} is SFTTrainer's: it needs --trainer sft, got "
                        f"{config.trainer}")
    if not isinstance(config.precompute_ref_log_probs, bool):
        problems.append(f"precompute_ref_log_probs must be True or False, got {config.precompute_ref_log_probs!r}")
    elif config.precompute_ref_log_probs and config.trainer != "dpo":
        problems.append(f"precomputed reference log-probs are DPOTrainer's: they need --trainer dpo, got "
                        f"{config.trainer}")
    if config.trainer == "causal-lm":
        return problems
    if config.loss != "standard":
        problems.append(f"--trainer {config.trainer} computes its loss with TRL's fused LM head (vocabulary tiles, "
                        f"never the full logits), got loss {config.loss!r}: use the standard loss")
    if config.eval_batch_size is not None:
        problems.append(f"evaluation inside --trainer {config.trainer} is not modelled yet: drop --eval-batch-size")
    if config.adapter is not None and config.adapter.kind == "prefix":
        problems.append(f"prefix tuning under --trainer {config.trainer} is not modelled (TRL pads the labels for "
                        "its virtual tokens): use LoRA")
    if config.strategy == "deepspeed" or config.offload != "none" or (config.world_size > 1
                                                                        and config.strategy != "ddp"):
        problems.append(f"--trainer {config.trainer} is planned on one GPU or with DDP (FSDP, CPU offload and "
                        "DeepSpeed are not modelled for TRL's trainers yet): use --strategy ddp or one GPU")
    if config.trainer == "dpo" and config.quantization is not None:
        # DPOTrainer given a quantised peft model adds a second, frozen "ref" adapter as its reference, where memtune
        # traced the base with the adapter disabled: memtune run (run.trl_run) does not run it yet
        problems.append("--trainer dpo on a quantised base (--qlora) is not run yet (DPOTrainer would add a second "
                        "adapter as its reference): plan it without --qlora")
    return problems


def trl_available() -> bool:
    """Whether TRL is importable (the `trl` extra), found without importing it (imported only to run or to build
    its configs: `require_trl`)."""
    return _installed("trl")


def require_trl(what: str) -> None:
    """Raise UsageError (exit 2) with the install command when TRL cannot be found; `what` names what needs it
    ("memtune run --trainer dpo", "Plan.sft_config")."""
    if not trl_available():
        raise UsageError(f"{what} needs TRL, which is not installed: {TRL_EXTRA_HINT} (or pip install 'trl>=1.0'); "
                         "planning with --trainer does not need it")


def _eval_problems(config: TrainConfig) -> list[str]:
    """What is wrong with the eval fields of `config` (TrainConfig's checks, collected with the others)."""
    problems = []
    for name in ("eval_batch_size", "eval_sequences"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be a positive integer or None, got {value!r}")
    if config.eval_logits not in EVAL_LOGITS:
        problems.append(f"eval_logits must be one of {', '.join(EVAL_LOGITS)}, got {config.eval_logits!r}")
    if config.eval_batch_size is not None and (config.strategy == "deepspeed" or config.offload != "none"
                                               or (config.num_gpus > 1 and config.strategy != "ddp")):
        problems.append("evaluation is planned on one GPU or with DDP only (FSDP, CPU offload and DeepSpeed's "
                        "evaluation are not modelled yet): drop --eval-batch-size, or use --strategy ddp")
    elif config.eval_batch_size is not None and config.world_size > 1 and config.eval_logits != "none":
        problems.append(f"eval_logits {config.eval_logits!r} with {config.num_gpus} GPUs: Trainer gathers every "
                        "rank's logits onto each GPU, which is not modelled yet: use --eval-logits none")
    return problems


def _zero_problems(config: TrainConfig) -> list[str]:
    """What is wrong with `config.zero` given the rest of `config`: set exactly for strategy "deepspeed"; offload
    "parameters" and NVMe are ZeRO-3's (DeepSpeed's offload_param is stage 3 only, and ZeRO-1/2 put an NVMe
    offload_optimizer on the CPU without a word); NVMe needs a path; the optimizer must be the AdamW the DeepSpeed
    JSON names (DEEPSPEED_OPTIMIZERS)."""
    zero = config.zero
    if zero is not None and not isinstance(zero, Zero):
        return [f"zero must be a Zero or None, got {type(zero).__name__}"]
    if config.strategy != "deepspeed":
        if zero is None:
            return []
        return [f"zero (DeepSpeed ZeRO-{zero.stage}) needs strategy 'deepspeed', got strategy {config.strategy!r}: "
                "set strategy='deepspeed', or drop zero"]
    if zero is None:
        return ["strategy 'deepspeed' needs its ZeRO settings: add zero=Zero(stage=3) (stage 1, 2 or 3)"]
    problems = []
    if config.offload == "parameters" and zero.stage != 3:
        problems.append(f"offload 'parameters' under DeepSpeed is ZeRO-3's offload_param, got ZeRO stage {zero.stage}: "
                        "use Zero(stage=3), or offload 'optimizer'")
    if zero.offload_device == "nvme" and config.offload != "none":
        if zero.stage != 3:
            problems.append(f"NVMe offload is ZeRO-3's (ZeRO-Infinity): ZeRO stage {zero.stage} would silently keep "
                            "the state on the CPU: use Zero(stage=3), or offload_device 'cpu'")
        if zero.nvme_path is None:
            problems.append("offload_device 'nvme' needs nvme_path, a directory on a local NVMe drive "
                            "(Zero(nvme_path='/local_nvme')), got None")
    if config.weights_dtype != "fp32" and config.amp != config.weights_dtype:
        problems.append(f"DeepSpeed keeps fp32 master weights and computes in the dtype of its bf16 / fp16 mode, "
                        f"got {config.weights_dtype} weights with amp {config.amp!r} (pure 16-bit training has no "
                        "DeepSpeed mode): use precision bf16-mixed (or bf16 weights with bf16 autocast)")
    if config.optimizer not in DEEPSPEED_OPTIMIZERS:
        problems.append(f"a DeepSpeed plan runs DeepSpeed's AdamW (fp32 state), got optimizer {config.optimizer}: "
                        "use adamw_torch_fused or adamw_torch")
    if config.quantization is not None:
        problems.append("a quantised base (QLoRA) is not planned under DeepSpeed: drop the quantization, or use "
                        "strategy fsdp / one GPU")
    return problems


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
        raise UsageError(
            f"memory quantity {text!r} has unknown unit {unit!r}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        )
    value = int(round(float(number) * _UNITS[unit_key]))
    if value <= 0:
        raise UsageError(f"memory quantity {text!r} must be positive (at least 1 byte)")
    return value


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


# Known cards: what `--gpu NAME` plans against. Total memory in MiB as nvidia-smi (rocm-smi for the MI300X) reports
# it; compute capability as torch.cuda.get_device_capability reports it (it decides which SDPA kernels exist,
# `predict.emulation.sdpa_backend`); peak dense tensor-core rates (no sparsity) and memory bandwidth from the vendor
# datasheet named in each row's comment (the speed model, `predict.throughput.gpu_speed`).


DEFAULT_INTER_NODE_GBPS = 400.0
"""Network rate of one machine, Gb/s one way, that a plan over several machines (--nodes) assumes unless
--inter-node-gbps says otherwise: one 400 Gb/s InfiniBand NDR or RoCE port (ConnectX-7). Not measured by memtune."""


@dataclass(frozen=True)
class GpuCard:
    """One card of `GPU_CARDS`. Bytes are integers; rates are per second."""

    name: str
    total_bytes: int
    """Memory the driver reports (nvidia-smi's total); what a plan's budget starts from."""
    capability: str
    """CUDA compute capability, "major.minor" (ROCm: what torch reports for the gfx target)."""
    bf16_supported: bool
    """bf16 tensor cores (sm80+): without them bf16 autocast does not run and memtune plans fp16 instead."""
    half_flops: float
    """Peak dense 16-bit tensor-core FLOP/s with fp32 accumulation (bf16 where the card has it, else fp16)."""
    fp32_flops: float
    """Peak fp32 (non-tensor) FLOP/s."""
    memory_bytes_per_second: float
    """Device memory bandwidth."""
    note: str = ""
    """Said next to the card in `--help` and reports ("ROCm: predicted only")."""

    @property
    def usable_bytes(self) -> int:
        """What a process can use before any plan: the total less the CUDA context memtune assumes without a probe
        (`DEFAULT_CONTEXT_BYTES`); the plan's margin comes off this too."""
        return self.total_bytes - DEFAULT_CONTEXT_BYTES

    @property
    def flash_capable(self) -> bool:
        """torch's flash SDPA kernel runs here: sm80 or newer (torch aten/src/ATen/native/transformers/cuda/
        sdp_utils.cpp `check_sm_version` for flash; the ROCm build's AOTriton kernels on gfx942 too)."""
        return capability_tuple(self.capability) >= (8, 0)


def capability_tuple(capability: str) -> tuple[int, int]:
    """"8.6" -> (8, 6). Raises UsageError for text that is not "major.minor"."""
    major, _, minor = capability.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise UsageError(f"compute capability {capability!r} is not major.minor, e.g. 8.0")
    return int(major), int(minor)


def _card(name: str, mib: int, capability: str, half_tflops: float, fp32_tflops: float, tb_per_second: float,
          note: str = "") -> GpuCard:
    return GpuCard(name, mib * MIB, capability, capability_tuple(capability) >= (8, 0), half_tflops * 1e12,
                   fp32_tflops * 1e12, tb_per_second * 1e12, note)


GPU_CARDS: dict[str, GpuCard] = {card.name: card for card in (
    # NVIDIA T4 datasheet: 65 TFLOPS fp16 tensor (mixed precision), 8.1 fp32, 320 GB/s; Turing sm75, no bf16
    _card("T4-16GB", 15360, "7.5", 65, 8.1, 0.32),
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS tensor (fp16), 15.7 fp32, 900 GB/s; Volta sm70, no bf16
    _card("V100-16GB", 16160, "7.0", 125, 15.7, 0.9),
    _card("V100-32GB", 32510, "7.0", 125, 15.7, 0.9),
    # NVIDIA A10 datasheet: 125 TFLOPS bf16 tensor dense (250 sparse), 31.2 fp32, 600 GB/s; sm86
    _card("A10-24GB", 23028, "8.6", 125, 31.2, 0.6),
    # AWS EC2 G5 (A10G): no NVIDIA datasheet; AWS lists 600 GB/s, 31.2 TFLOPS fp32; its tensor rate is rated as
    # the A10's (the same GA102 part at lower clocks, so a little optimistic); sm86
    _card("A10G-24GB", 23028, "8.6", 125, 31.2, 0.6),
    # NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity (121 dense), 30.3 fp32, 300 GB/s; Ada sm89
    _card("L4-24GB", 23034, "8.9", 121, 30.3, 0.3),
    # NVIDIA Ampere GA102 whitepaper (RTX 3090): 71 TFLOPS fp16/bf16 tensor with fp32 accumulate, 35.6 fp32,
    # 936 GB/s; sm86
    _card("RTX-3090", 24576, "8.6", 71, 35.6, 0.936),
    # NVIDIA Ada Lovelace whitepaper (RTX 4090): 165.2 TFLOPS bf16 tensor with fp32 accumulate, 82.6 fp32,
    # 1008 GB/s; sm89
    _card("RTX-4090", 24564, "8.9", 165.2, 82.6, 1.008),
    # NVIDIA Blackwell (RTX 5090) whitepaper: 209.5 TFLOPS fp16/bf16 tensor with fp32 accumulate dense, 104.8
    # fp32, 1792 GB/s; sm120
    _card("RTX-5090", 32607, "12.0", 209.5, 104.8, 1.792),
    # NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor with sparsity (154.8 dense), 38.7 fp32, 768 GB/s; sm86
    _card("A6000-48GB", 49140, "8.6", 154.8, 38.7, 0.768),
    # NVIDIA A100 datasheet: 312 TFLOPS bf16 tensor dense, 19.5 fp32; 1555 GB/s (40GB), 2039 GB/s (80GB SXM); sm80
    _card("A100-40GB", 40960, "8.0", 312, 19.5, 1.555),
    _card("A100-80GB", 81920, "8.0", 312, 19.5, 2.039),
    # NVIDIA L40S datasheet: 733 TFLOPS bf16 with sparsity (362 dense), 91.6 fp32, 864 GB/s; sm89
    _card("L40S", 46068, "8.9", 362, 91.6, 0.864),
    # NVIDIA H100 datasheet (SXM): 1979 TFLOPS bf16 with sparsity (989 dense), 67 fp32, 3.35 TB/s; sm90
    _card("H100-80GB", 81559, "9.0", 989, 67, 3.35),
    # NVIDIA H200 datasheet (SXM): 989 TFLOPS bf16 dense, 67 fp32, 4.8 TB/s; sm90
    _card("H200", 143771, "9.0", 989, 67, 4.8),
    # NVIDIA HGX B200 datasheet, per GPU: 2.25 PFLOPS fp16/bf16 dense (4.5 sparse), 75 TFLOPS fp32, 8 TB/s; sm100
    _card("B200", 183359, "10.0", 2250, 75, 8.0),
    # AMD Instinct MI300X datasheet: 1307.4 TFLOPS bf16 dense, 163.4 fp32 (vector), 5.3 TB/s; gfx942 (torch
    # reports 9.4). Planned as torch's ROCm build would run it; memtune's trials and its OOM guard are CUDA's.
    _card("MI300X", 196288, "9.4", 1307.4, 163.4, 5.3, note="ROCm: predicted only"),
)}
"""The known cards by canonical name, by generation (`gpu_card` finds one by name or alias)."""


GPU_ALIASES = {"RTX3090-24GB": "RTX-3090", "RTX4090-24GB": "RTX-4090", "RTX5090-32GB": "RTX-5090",
               "L40S-48GB": "L40S", "H200-141GB": "H200", "B200-180GB": "B200", "MI300X-192GB": "MI300X"}
"""Other names `--gpu` accepts (the names of earlier memtune versions among them)."""


KNOWN_GPUS: dict[str, int] = {name: card.total_bytes for name, card in GPU_CARDS.items()}
"""Total bytes of each known card by canonical name (what `--gpu NAME` plans against)."""


NO_BF16_GPUS = frozenset(name for name, card in GPU_CARDS.items() if not card.bf16_supported)
"""Known cards without bf16 (compute capability below 8.0: T4 7.5, V100 7.0); they train in fp16 or fp32."""


def gpu_card(name: str, flag: str = "--gpu", budget_flag: str = "--budget") -> GpuCard:
    """The known card called `name` (canonical or `GPU_ALIASES`), matched case-insensitively.
    Raises UsageError naming the known cards."""
    names = {known.lower(): known for known in GPU_CARDS}
    names.update({alias.lower(): canonical for alias, canonical in GPU_ALIASES.items()})
    if name.lower() not in names:
        import difflib

        squashed = {key.replace("-", ""): canonical for key, canonical in names.items()}
        near = squashed.get(name.lower().replace("-", "")) or next(
            iter(difflib.get_close_matches(name.lower(), list(names), n=1)), None)
        hint = f"did you mean {names.get(near, near)}? " if near else ""
        raise UsageError(f"unknown {flag} {name!r}: {hint}choose one of {', '.join(GPU_CARDS)}, or give "
                         f"{budget_flag}")
    return GPU_CARDS[names[name.lower()]]


def attention_problems(attn: str | None, card: GpuCard | None = None) -> list[str]:
    """What stops `--attn attn` here (the package) and, with `card`, on that card: flash_attention_2 needs the
    flash-attn package (transformers' `is_flash_attn_2_available`) and compute capability 8.0 or newer (flash-attn
    2 supports Ampere, Ada and Hopper: its README); the others run wherever torch does."""
    problems = []
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        problems.append(f"--attn {attn!r} is unknown: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("--attn flash_attention_2 needs the flash-attn package, which is not installed here: "
                        "pip install flash-attn --no-build-isolation (CUDA, sm80+), or use --attn sdpa (torch's own "
                        "flash kernel, the same memory on sm80+)")
    return problems + attention_card_problems(attn, card)


def attention_card_problems(attn: str | None, card: GpuCard | None) -> list[str]:
    """`attention_problems`' part for the card: flash_attention_2 below sm80."""
    if attn == "flash_attention_2" and card is not None and not card.flash_capable:
        return [f"--attn flash_attention_2 needs compute capability 8.0 or newer; {card.name} has "
                f"{card.capability}: use --attn sdpa (torch's memory-efficient kernel there) or eager"]
    return []


def known_gpu(name: str, flag: str = "--gpu", budget_flag: str = "--budget") -> tuple[str, int]:
    """(canonical name, total bytes) of a card in KNOWN_GPUS, matched case-insensitively (`gpu_card`)."""
    card = gpu_card(name, flag, budget_flag)
    return card.name, card.total_bytes


# ---- what the user allows: the search's policy ----------------------------------------------------

DEFAULT_MARGIN_FRACTION = 0.02
"""Safety margin: 2% of the budget, but never less than MIN_MARGIN_BYTES. The estimator's median
error is <1% (its worst seen 16%, Gemma-2), a trial verifies the winner on the GPU, and the OOM
guard steps down if a run still runs short. On the H200 a 5% margin cost 3.6x in speed at 24 GiB
(benchmarks/results/oracle_h200.json: llama-3.2-1b's fastest fitting plan needs 22.4 of 24 GiB)."""


MIN_MARGIN_BYTES = 256 * MIB


OFFLOAD_ORDER = {"none": 0, "optimizer": 1, "parameters": 2}


STRATEGIES = ("ddp", "fsdp")
"""Over several GPUs, fastest first when both fit (ties keep this order). DeepSpeed ZeRO, where installed, is
offered beside them by the search (`search.ladder.strategies`)."""
STRATEGY_WORDS = ("ddp", "fsdp", "deepspeed")
"""The values of --strategy (Policy.strategy) besides auto."""


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
    negatable: bool = False
    """A bool switch given in both directions (--explain and --no-explain), the default's flag saying "(the
    default)"."""

    def flag_of(self, name: str, default: Any = None) -> str:
        """The option's name for the field `name`: "" for a positional argument."""
        if self.flag is not None:
            return self.flag
        return ("--no-" if default is True else "--") + name.replace("_", "-")


def parse_checkpoint_layers(text: str) -> int:
    """`--checkpointing N`: a positive number of decoder layers (auto/on/off are `Option.words`)."""
    try:
        layers = int(text)
    except ValueError:
        raise UsageError(f"expected auto, on, off or a number of layers, got {text!r} (e.g. --checkpointing 12)") \
            from None
    if layers < 1:
        raise UsageError(f"a number of layers must be at least 1, got {layers} (--checkpointing off turns it off)")
    return layers


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
    bf16 / fp16 = weights stored in 16 bits; without LoRA that is pure 16 bits training: optimizer state in
    16 bits too, no fp32 master weights."""
    attn: str | None = field(default=None, metadata=option(choices=ATTN_IMPLEMENTATIONS, group=PINS,
                                                           default_text="the model config's own, else sdpa"))
    """The attention implementation (transformers' attn_implementation), traced as it runs: sdpa takes the kernel
    the card has (flash needs sm80+, else memory-efficient, else math); eager holds the attention matrix;
    flash_attention_2 needs the flash-attn package and an sm80+ card (traced as torch's flash kernel, the same
    FlashAttention-2 code); flex_attention traces on fake CUDA only (its backward has no CPU kernel): plan it on a
    GPU machine."""
    optimizer: str | None = field(default=None, metadata=option(
        flag="--optim", metavar="NAME", choices=tuple(OPTIMIZERS), group=PINS,
        note="; ".join(f"{name}: {words}" for name, words in OPTIMIZERS.items())))
    """Keep this optimizer (transformers' optim name)."""
    gradient_checkpointing: bool | int | None = field(default=None, metadata=option(
        flag="--checkpointing", words={"auto": None, "on": True, "off": False}, parse=parse_checkpoint_layers,
        metavar="{auto,on,off,N}", group=PINS))
    """Gradient checkpointing (recompute activations in backward): on (every decoder layer), off, or N (the
    first N layers only, on one GPU or with DDP; transformers cannot name layers in TrainingArguments, so
    Plan.prepare / memtune run set it). auto: off, or the fewest layers that fit."""
    quantized_base: int | None = field(default=None, metadata=option(
        flag="--qlora", choices=QUANTIZED_BASE_CHOICES, parse=int, group=PINS))
    """Train LoRA on a base quantised to this many bits (QLoRA through bitsandbytes: 4 is nf4 with double
    quantisation, 8 is LLM.int8), the only base the search then tries; implies LoRA, on one GPU."""
    micro_batch_size: int | None = field(default=None, metadata=option(group=PINS))
    """Keep this micro-batch (sequences per forward/backward per GPU); it must divide the batch."""
    offload_activations: bool | None = field(default=None, metadata=option(
        flag="--offload-activations", words={"auto": None, "on": True, "off": False}, group=PINS))
    """Keep the inputs of the checkpointed layers in pinned host memory (transformers' activation_checkpointing
    offload=True): frees checkpointed layers x tokens x hidden x 4 bytes of the GPU (fp32 under mixed precision; 2
    for 16-bit weights), for a copy out and back per micro-batch over the host link. on implies checkpointing, on one
    GPU or with DDP; auto: tried with checkpointing, chosen where it is the fastest that fits."""
    expandable_segments: bool | None = field(default=None, metadata=option(
        flag="--expandable-segments", words={"auto": None, "on": True, "off": False}, group=PINS))
    """The caching allocator's mode: on is PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (segments that grow by
    mapping pages: usually less memory stranded between blocks, sometimes more), which memtune run sets; auto:
    predicted both ways, the default where both fit."""
    loss: str | None = field(default=None, metadata=option(
        words={"auto": None, "standard": "standard", "chunked": "chunked", "liger": "liger"}, group=PINS))
    """Keep this loss: chunked computes the LM head and loss in chunks, never holding all fp32 logits; liger is
    Liger-Kernel's fused linear cross-entropy (needs the liger extra and a CUDA GPU)."""
    offload: str | None = field(default=None, metadata=option(
        words={"auto": None, "none": "none", "optimizer": "optimizer", "parameters": "parameters"}, group=PINS))
    """Keep this offload: parameters is FSDP2 CPU offload of parameters, gradients and optimizer state (slow), or
    under DeepSpeed ZeRO-3's offload_param + offload_optimizer; optimizer is DeepSpeed's offload_optimizer alone
    (ZeRO-Offload: the optimizer state and its step on the CPU)."""
    strategy: str | None = field(default=None, metadata=option(
        words={"auto": None, "ddp": "ddp", "fsdp": "fsdp", "deepspeed": "deepspeed"}, group=PINS))
    """How the GPUs share the work: ddp keeps a full replica on each GPU (no parameter gathering), fsdp
    shards weights, gradients and optimizer state (FSDP2), deepspeed runs DeepSpeed ZeRO (see --zero-stage; also on
    one GPU with --offload optimizer or parameters; needs the deepspeed extra); auto tries them and keeps the fastest
    that fits (DeepSpeed only where it is installed)."""
    zero_stage: int | None = field(default=None, metadata=option(
        flag="--zero-stage", choices=ZERO_STAGE_CHOICES, parse=int, group=PINS,
        default_text="the search tries ZeRO-2 and ZeRO-3"))
    """DeepSpeed ZeRO stage: 1 partitions the optimizer state over the GPUs, 2 the gradients too, 3 the parameters
    too (the only stage that can offload parameters or use NVMe); implies --strategy deepspeed."""
    offload_device: str | None = field(default=None, metadata=option(
        flag="--offload-device", words={"auto": None, "cpu": "cpu", "nvme": "nvme"}, group=PINS))
    """Where DeepSpeed puts the offloaded state: cpu (host RAM, pinned) or nvme (ZeRO-Infinity, ZeRO-3, at
    --nvme-path); auto: the CPU, and NVMe only when --nvme-path is given and the host RAM is not enough."""
    nvme_path: str | None = field(default=None, metadata=option(flag="--nvme-path", metavar="DIR", group=PINS))
    """A directory on a fast local NVMe drive for DeepSpeed's NVMe offload (its free space is checked)."""
    adapter: Adapter = field(default_factory=Adapter, metadata=option(on_command_line=False))
    """The adapter of the LoRA / prefix rung (rank, targets): --prefix, --lora-rank, --lora-targets."""
    use_adapter: bool | None = field(default=None, metadata=option(on_command_line=False))
    """True: always train the adapter (--lora); False: never (--no-lora, --full-finetune-only);
    None: only when no full fine-tuning configuration fits."""
    trainer: str = field(default="causal-lm", metadata=option(on_command_line=False))
    """Whose step is searched (TaskOptions.trainer, --trainer): TrainConfig.trainer of every candidate."""
    sft_batches: str = field(default="padded", metadata=option(on_command_line=False))
    """With trainer "sft": TrainConfig.sft_batches of every candidate (--sft-batches)."""
    precompute_ref_log_probs: bool | None = field(default=None, metadata=option(on_command_line=False))
    """With trainer "dpo": pinned on or off (--precompute-ref-log-probs on/off); None: the search tries the reference
    live first, then precomputed (`search.ladder.Reference`)."""
    allow_offload: bool = field(default=True, metadata=option(flag="--no-offload", group=POLICY))
    """CPU offload among the search's rungs: FSDP2's of parameters, gradients and optimizer state, and where DeepSpeed
    is installed ZeRO-Offload (optimizer, or ZeRO-3 parameters too) (allowed by default; --no-offload forbids it; for
    the activations use --offload-activations off)."""
    allow_chunked_loss: bool = field(default=True, metadata=option(flag="--no-chunked-loss", group=POLICY))
    """The chunked losses among the search's rungs: memtune's chunked loss, and Liger-Kernel's fused one where it is
    installed (allowed by default; --no-chunked-loss forbids both)."""
    allow_8bit_optimizer: bool = field(default=True, metadata=option(flag="--no-8bit-optim", group=POLICY))
    """Low-bit optimizers (bitsandbytes AdamW8bit, paged or not; torchao AdamW8bit and AdamW4bit: state
    quantised, a quality trade) among the search's rungs (allowed by default when bitsandbytes or torchao is
    installed; --no-8bit-optim forbids them)."""
    allow_pure_16bit: bool = field(default=True, metadata=option(flag="--no-pure-16bit", group=POLICY))
    """Pure 16-bit full fine-tuning (bf16 weights and optimizer state, no fp32 master weights: a quality
    trade, tried only when nothing with fp32 master weights fits; --no-pure-16bit forbids it)."""
    allow_quantized_base: bool = field(default=True, metadata=option(flag="--no-qlora", group=POLICY))
    """A 4-bit (nf4) or 8-bit base under LoRA (QLoRA, bitsandbytes: the base weights quantised, a quality trade)
    among the search's rungs, tried only after every LoRA configuration on a 16/32-bit base (allowed by default
    when bitsandbytes is installed, on one GPU; --no-qlora forbids it)."""
    min_micro_batch_size: int = field(default=1, metadata=option(group=POLICY))
    """Smallest micro-batch to consider."""
    margin_bytes: int | None = field(default=None, metadata=option(
        flag="--margin", parse=parse_bytes, group=POLICY,
        default_text=f"{DEFAULT_MARGIN_FRACTION:.0%} of the budget, at least {MIN_MARGIN_BYTES // MIB} MiB"))
    """Memory kept free below the budget, in bytes (on the command line a quantity such as 2GiB)."""
    bf16_supported: bool = field(default=True, metadata=option(on_command_line=False))
    """The GPU computes in bf16 (fit sets it from the probe)."""
    num_gpus: int = field(default=1, metadata=option(on_command_line=False))
    """GPUs of one data-parallel job (--gpus), on each machine."""
    num_nodes: int = field(default=1, metadata=option(on_command_line=False))
    """Machines of num_gpus GPUs each (--nodes; auto_fit's nodes=)."""
    host_budget_bytes: int | None = field(default=None, metadata=option(
        flag="--host-memory", parse=parse_bytes, group=POLICY,
        default_text="on a GPU machine, part of the RAM it has available; else not checked"))
    """Host RAM the training may hold, all ranks of the machine together (offloaded activations, FSDP2's and
    DeepSpeed's offloaded state), in bytes (on the command line a quantity such as 64GiB: give the RAM of the
    machine you plan for). Without it fit takes HOST_BUDGET_FRACTION of what this machine has available where it
    has a GPU (`measure.probe.host_available_bytes`), and checks nothing on a machine without one."""
    nvme_budget_bytes: int | None = field(default=None, metadata=option(on_command_line=False))
    """Free bytes at `nvme_path` (fit sets it from shutil.disk_usage); None: not checked."""
    max_trials: int = field(default=3, metadata=option(on_command_line=False))
    """At most this many candidates are tried on the GPU; the ones after are reported as not verified."""

    def _quantized_base_problems(self) -> list[str]:
        """What contradicts a pinned quantised base (--qlora BITS): another bit width, --no-qlora, full fine-tuning,
        prefix tuning, several GPUs or CPU offload (TrainConfig refuses a quantised base with those)."""
        bits = self.quantized_base
        if bits is None:
            return []
        if isinstance(bits, bool) or bits not in (4, 8):
            return [f"--qlora must be 4 or 8 (bits of the quantised base), got {bits!r}"]
        problems = []
        if not self.allow_quantized_base:
            problems.append(f"--qlora {bits} contradicts --no-qlora: keep one")
        if self.use_adapter is False:
            problems.append(f"--qlora {bits} trains LoRA on a quantised base, which --no-lora forbids: keep one")
        elif self.adapter.kind != "lora":
            problems.append(f"--qlora {bits} trains a LoRA adapter (the quantised base is frozen), not prefix "
                            "tuning: drop --prefix or --qlora")
        if self.num_gpus != 1:
            problems.append(f"--qlora {bits} is planned on one GPU, got --gpus {self.num_gpus}: use --gpus 1")
        if self.offload not in (None, "none"):
            problems.append(f"--qlora {bits} is planned without CPU offload, got --offload {self.offload}: "
                            "drop one")
        return problems

    def validate(self, effective_batch_size: int) -> None:
        """Raise UsageError naming every problem at once: unknown values, pins that contradict each other
        or the forbidden rungs, a micro-batch that would change the effective batch."""
        if not isinstance(self.adapter, Adapter):
            raise UsageError(f"adapter must be an Adapter, e.g. Adapter(kind=\"prefix\") or Adapter(rank=16), "
                             f"got {self.adapter!r}")
        problems = []
        if self.loss in ("chunked", "liger") and not self.allow_chunked_loss:
            problems.append(f"--loss {self.loss} contradicts --no-chunked-loss (which forbids both chunked losses, "
                            "memtune's and Liger's): keep one")
        if self.offload not in (None, "none") and not self.allow_offload:
            problems.append(f"--offload {self.offload} contradicts --no-offload: keep one")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        if self.precision in ("bf16-mixed", "bf16") and not self.bf16_supported:
            problems.append(
                f"precision {self.precision} needs bf16, which this GPU does not support: use fp16-mixed or fp32"
            )
        problems += attention_problems(self.attn)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer in EIGHT_BIT_OPTIMIZERS and not self.allow_8bit_optimizer:
            problems.append(f"--optim {self.optimizer} contradicts --no-8bit-optim: keep one")
        problems += self._quantized_base_problems()
        if self.precision in ("bf16", "fp16") and self.use_adapter is False and not self.allow_pure_16bit:
            problems.append(f"--precision {self.precision} with full fine-tuning is pure 16-bit training, which "
                            "--no-pure-16bit forbids: keep one")
        counts = {"effective batch": effective_batch_size, "num_gpus": self.num_gpus, "num_nodes": self.num_nodes,
                  "min_micro_batch_size": self.min_micro_batch_size, "max_trials": self.max_trials}
        if self.micro_batch_size is not None:
            counts["micro_batch_size"] = self.micro_batch_size
        bad = {
            name for name, value in counts.items() if isinstance(value, bool) or not isinstance(value, int) or value < 1
        }
        problems += [f"{name} must be a positive integer, got {counts[name]!r}" for name in sorted(bad)]
        if self.margin_bytes is not None and (
            isinstance(self.margin_bytes, bool) or not isinstance(self.margin_bytes, int) or self.margin_bytes < 0
        ):
            problems.append(f"margin must be a number of bytes >= 0, got {self.margin_bytes!r} (--margin 2GiB)")
        checkpointing = self.gradient_checkpointing
        if checkpointing is not None and not isinstance(checkpointing, bool) and (
                not isinstance(checkpointing, int) or checkpointing < 1):
            problems.append(f"--checkpointing must be auto, on, off or a positive number of layers (in Python: None, "
                            f"True, False or an int), got {checkpointing!r}")
        if self.use_adapter is True and self.adapter.kind == "prefix" and checkpointing not in (None, False):
            word = "on" if checkpointing is True else checkpointing
            problems.append(f"--prefix contradicts --checkpointing {word}: peft refuses prefix tuning with gradient "
                            "checkpointing; use --lora, or --checkpointing off")
        if self.offload_activations:
            if checkpointing is False:
                problems.append("--offload-activations on keeps the inputs of checkpointed layers on the host: it "
                                "contradicts --checkpointing off; use --checkpointing on, N or auto")
            if self.use_adapter is True and self.adapter.kind == "prefix":
                problems.append("--offload-activations on needs gradient checkpointing, which peft refuses with "
                                "prefix tuning: use --lora, or --offload-activations off")
            if self.offload not in (None, "none"):
                problems.append(f"--offload-activations on with --offload {self.offload} (CPU offload) is not "
                                "modelled yet: drop one of them")
            if self.num_gpus * self.num_nodes > 1 and self.strategy == "fsdp":
                problems.append("--offload-activations on with --strategy fsdp is not modelled yet: use --strategy ddp "
                                "(or auto, which then plans DDP)")
        if bad:
            raise UsageError(listed("", problems))
        world_size = self.num_gpus * self.num_nodes  # the search splits the batch over every GPU of every machine
        if self.micro_batch_size is not None and effective_batch_size % (self.micro_batch_size * world_size):
            problems.append(f"micro-batch {self.micro_batch_size} x {world_size} GPU(s) does not divide the batch "
                            f"{effective_batch_size}: the effective batch would change")
        if effective_batch_size % world_size:
            gpus = f" (--nodes {self.num_nodes} x --gpus {self.num_gpus})" if self.num_nodes > 1 else ""
            lower = effective_batch_size // world_size * world_size
            multiples = " or ".join(f"--batch-size {size}" for size in (lower, lower + world_size) if size > 0)
            problems.append(f"batch {effective_batch_size} is not a multiple of {world_size} GPUs{gpus}: each GPU "
                            f"takes an equal share; use {multiples}")
        if self.loss not in (None, *LOSSES):
            problems.append(f"loss {self.loss!r} is unknown: standard, chunked or liger")
        if self.offload not in (None, *OFFLOAD_ORDER):
            problems.append(f"offload {self.offload!r} is unknown: {', '.join(OFFLOAD_ORDER)}")
        if self.strategy not in (None, *STRATEGY_WORDS):
            problems.append(f"strategy {self.strategy!r} is unknown: ddp, fsdp or deepspeed")
        if self.strategy == "ddp":
            if world_size < 2:
                problems.append(
                    "strategy ddp replicates the model over several GPUs: it needs --gpus 2 or more (or --nodes 2 "
                    f"or more), got {self.num_gpus}"
                )
            if self.offload not in (None, "none", "optimizer"):  # optimizer: DeepSpeed's, said below
                problems.append(
                    f"strategy ddp cannot offload {self.offload} to the CPU: pin --strategy fsdp for CPU offload"
                )
        problems += self._deepspeed_problems()
        if problems:
            raise UsageError(listed("", problems))

    def _deepspeed_problems(self) -> list[str]:
        """What contradicts the DeepSpeed pins (--strategy deepspeed, --zero-stage, --offload optimizer,
        --offload-device, --nvme-path), or the rest of the policy with them; DeepSpeed missing for a pinned
        --strategy deepspeed or --zero-stage (the install hint, `require_deepspeed`'s words)."""
        problems = []
        stage, device = self.zero_stage, self.offload_device
        if stage is not None and (isinstance(stage, bool) or stage not in (1, 2, 3)):
            return [f"--zero-stage must be 1, 2 or 3, got {stage!r}"]
        if device not in (None, "cpu", "nvme"):
            return [f"--offload-device must be cpu or nvme, got {device!r}"]
        deepspeed_pins = [flag for flag, given in (
            (f"--zero-stage {stage}", stage is not None), ("--offload optimizer", self.offload == "optimizer"),
            (f"--offload-device {device}", device is not None), ("--nvme-path", self.nvme_path is not None)) if given]
        if self.strategy in ("ddp", "fsdp") and deepspeed_pins:
            problems.append(f"{', '.join(deepspeed_pins)} {'is' if len(deepspeed_pins) == 1 else 'are'} DeepSpeed's, "
                            f"which --strategy {self.strategy} contradicts: use --strategy deepspeed (or auto)"
                            + (", or --offload parameters (FSDP2 CPU offload)" if self.offload == "optimizer" else ""))
        wants_deepspeed = self.strategy == "deepspeed" or (bool(deepspeed_pins) and self.strategy is None)
        if wants_deepspeed and not deepspeed_available():
            what = f"--strategy {self.strategy}" if self.strategy == "deepspeed" else deepspeed_pins[0]
            problems.append(f"{what} needs DeepSpeed, which is not installed: {DEEPSPEED_EXTRA_HINT} (or pip install "
                            "'deepspeed>=0.19'), or choose --strategy fsdp")
        if self.offload == "parameters" and stage in (1, 2):
            problems.append(f"--offload parameters under DeepSpeed is ZeRO-3's offload_param, got --zero-stage "
                            f"{stage}: use --zero-stage 3, or --offload optimizer")
        if device == "nvme":
            if self.nvme_path is None:
                problems.append("--offload-device nvme needs --nvme-path, a directory on a local NVMe drive "
                                "(e.g. --nvme-path /local_nvme)")
            if stage in (1, 2):
                problems.append(f"--offload-device nvme is ZeRO-3's (ZeRO-Infinity), got --zero-stage {stage}: use "
                                "--zero-stage 3, or --offload-device cpu")
            if self.offload == "none" or not self.allow_offload:
                seen = "--offload none" if self.offload == "none" else "--no-offload"
                problems.append(f"--offload-device nvme puts offloaded state on NVMe, which {seen} forbids: keep one")
        if device == "cpu" and self.nvme_path is not None:
            problems.append("--nvme-path is for --offload-device nvme, got --offload-device cpu: drop one")
        if self.nvme_path is not None and (not isinstance(self.nvme_path, str) or not self.nvme_path.strip()):
            problems.append(f"--nvme-path must name a directory, got {self.nvme_path!r}")
        if wants_deepspeed:
            if self.optimizer is not None and self.optimizer not in DEEPSPEED_OPTIMIZERS:
                problems.append(f"a DeepSpeed plan runs DeepSpeed's AdamW (fp32 state), got --optim {self.optimizer}: "
                                f"use --optim adamw_torch_fused or adamw_torch, or another --strategy")
            if self.quantized_base is not None:
                problems.append(f"--qlora {self.quantized_base} is not planned under DeepSpeed: drop --qlora or "
                                "choose another --strategy")
            if self.precision in ("bf16", "fp16") and self.use_adapter is False:
                problems.append(f"--precision {self.precision} (pure 16-bit) has no DeepSpeed mode: DeepSpeed keeps "
                                "fp32 master weights; use --precision bf16-mixed")
        return problems


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
        elif field_.name == "num_nodes":  # TaskOptions.nodes
            flags += [f"--nodes {value}"] if value != 1 else []
        elif field_.name in ("trainer", "sft_batches", "precompute_ref_log_probs"):  # TaskOptions' trainer options
            if value != default:
                word = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
                flags.append(f"--{field_.name.replace('_', '-')} {word}")
        elif not option.on_command_line or value == default:
            continue
        elif option.words is not None:
            word = next((word for word, meaning in option.words.items()
                         if meaning == value and type(meaning) is type(value)), value)
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
    but at least MIN_MARGIN_BYTES.

    Raises UsageError when the margin leaves nothing of the budget (a budget of 1 byte, or --margin 10GiB
    with --budget 6GiB): nothing could fit, and the search would run against a negative budget."""
    margin = policy.margin_bytes if policy.margin_bytes is not None else max(
        MIN_MARGIN_BYTES, int(DEFAULT_MARGIN_FRACTION * budget_bytes))
    if margin >= budget_bytes:
        raise UsageError(
            f"the margin {format_bytes(margin)} leaves nothing of the budget {format_bytes(budget_bytes)}: "
            f"give a budget above {format_bytes(margin)}"
            + (
                " or a smaller --margin"
                if policy.margin_bytes is not None
                else f" (the default margin is {DEFAULT_MARGIN_FRACTION:.0%} of the budget, at least "
                f"{format_bytes(MIN_MARGIN_BYTES)})"
            )
        )
    return margin
