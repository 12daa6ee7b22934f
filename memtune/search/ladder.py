"""The escalation ladder: each memory technique ("rung") declared once, in one class.

A rung says, for one field of `TrainConfig`:
- `options`: the values the search tries (fastest-leaning first), given the user's `Policy` and
  whether this stage trains an adapter; a pinned value is the only option;
- `conflict`: why a combination of values cannot run (None when it can);
- `flip`: the winner with this technique switched the other way, for "why this one";
- `setting`: the line of "what to set" in the report;
- `quality`: what it costs in training quality (None when it changes nothing trained);
- `trainer_arguments`: the `transformers.TrainingArguments` fields that turn it on (the rest -
  the chunked loss, offload, several GPUs - is applied by `memtune run` and `accelerate launch`).

How the recipe applies a field (`recipe.step.prepare_model`, `recipe.parallel`) and what the speed
model charges for it (`predict.throughput`) are functions of the same `TrainConfig` field; each rung
names them in its docstring. Adding a rung is: a `TrainConfig` field (and a `Policy` pin, from which
the CLI flag is generated), a class here and a line in `LADDER`, its recipe hook and its speed term.

`LADDER` is in the order the candidate space is enumerated, which is also the order of the "why
this one" alternatives: candidates with equal predicted speed keep that order.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Literal

from memtune.config import (
    BITSANDBYTES_OPTIMIZERS,
    DEEPSPEED_EXTRA_HINT,
    DEEPSPEED_OPTIMIZERS,
    DEFAULT_OPTIMIZER,
    EIGHT_BIT_OPTIMIZERS,
    FOUR_BIT_OPTIMIZERS,
    LIGER_EXTRA_HINT,
    QUANT_EXTRA_HINT,
    STRATEGIES,
    TORCHAO_OPTIMIZERS,
    UNSHARDABLE_OPTIMIZERS,
    Policy,
    Quantization,
    TrainConfig,
    Zero,
    bitsandbytes_available,
    deepspeed_available,
    liger_available,
    precision_config,
    quantized_base_fields,
    require_extra,
    require_liger,
    rounds_stochastically,
    torchao_available,
)
from memtune.errors import UsageError

HEAD_NAMES = ("lm_head", "embed_out", "output")
"""Module names of the LM head in transformers' causal LMs (Llama-style, GPT-NeoX, and a few others): a LoRA target
among them adapts the head, which Liger's loss cannot see (`recipe.loss.liger_causal_lm_loss`)."""
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""How the "what to set" lines spell a dtype in Python (dtype=torch.bfloat16)."""


class Rung:
    """One technique of the ladder (see the module docstring). Subclasses override what applies."""

    name: str = ""
    """In the report's words: "gradient checkpointing"."""

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        """The settings to try, each a dict of TrainConfig field values."""
        raise NotImplementedError

    def conflict(self, fields: dict[str, Any]) -> str | None:
        """Why a combination (TrainConfig field values, before TrainConfig checks them) cannot run, or None."""
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        """(what changed in words, the configuration) with this technique the other way, or None."""
        return None

    def setting(self, config: TrainConfig) -> str | None:
        """The "what to set" line, or None when there is nothing to set."""
        return None

    def quality(self, config: TrainConfig) -> str | None:
        """What this setting costs in training quality, or None."""
        return None

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        """TrainingArguments fields for this setting (transformers' names as of 5.17)."""
        return {}


class MicroBatch(Rung):
    """Micro-batch x gradient accumulation (x every GPU of every machine: `world_size`) = the effective batch, kept
    exactly.

    Recipe: `recipe.step.train_step` runs `grad_accum_steps` micro-batches per optimizer step.
    Speed: `throughput.step_seconds` (per-micro-batch overhead and the kernels' efficiency at its size)."""

    name = "micro-batch"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        return [{"micro_batch_size": micro, "grad_accum_steps": effective_batch_size // (micro * world_size(policy))}
                for micro in micro_batch_sizes(effective_batch_size, policy)]

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if chosen.grad_accum_steps == 1 or policy.micro_batch_size is not None:
            return None
        micro = effective_batch_size // chosen.world_size
        return f"no gradient accumulation (micro-batch {micro})", chosen.replace(
            micro_batch_size=micro, grad_accum_steps=1
        )

    def setting(self, config: TrainConfig) -> str | None:
        return (
            f"micro-batch {config.micro_batch_size} per device, {config.grad_accum_steps} gradient accumulation "
            f"step{'s' if config.grad_accum_steps > 1 else ''} (effective batch {config.effective_batch_size} kept)"
        )

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        return {"per_device_train_batch_size": config.micro_batch_size,
                "gradient_accumulation_steps": config.grad_accum_steps}


class Precision(Rung):
    """The dtype the weights are stored in and the autocast dtype (`--precision`).

    Recipe: `recipe.step.build_model` (weights dtype) and `recipe.step.amp_context` (autocast; a
    GradScaler for fp16). Speed: `throughput.GpuSpeed` matmul throughput per dtype."""

    name = "precision"
    NOTES = {
        "fp32": "full precision",
        "bf16-mixed": "standard mixed precision",
        "fp16-mixed": "mixed precision with loss scaling",
        "bf16": "no fp32 master copy (small updates can be lost)",
        "fp16": "no fp32 master copy (small updates can be lost)",
    }
    PURE_NOTE = ("pure {0} training: weights and optimizer state in {0}, no fp32 master weights "
                 "(small updates can round away)")
    ROUNDED_NOTE = ("pure bf16 training with stochastic rounding (torchao): no fp32 master weights, but an update "
                    "smaller than bf16's step survives on average instead of rounding away")
    SETTINGS = {
        "fp32": "precision fp32: no mixed-precision flags",
        "bf16-mixed": "precision bf16-mixed: fp32 weights, bf16 autocast (TrainingArguments bf16=True)",
        "fp16-mixed": ("precision fp16-mixed: fp32 weights, fp16 autocast and loss scaling "
                       "(TrainingArguments fp16=True)"),
        "bf16": "precision bf16: load the weights in bf16 (dtype=torch.bfloat16), no autocast",
        "fp16": "precision fp16: load the weights in fp16 (dtype=torch.float16), no autocast",
    }

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        settings = []
        for precision in precisions(policy, with_adapter):
            weights, amp = precision_config(precision)
            settings.append({"weights_dtype": weights, "amp": amp})
        return settings

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.precision is not None or chosen.quantization is not None:  # QuantizedBase.flip sets its precision
            return None
        other = "fp32" if chosen.precision != "fp32" else ("bf16-mixed" if policy.bf16_supported else "fp16-mixed")
        if chosen.adapter is not None and other == chosen.precision:
            return None
        weights, amp = precision_config(other)
        return f"{other} instead of {chosen.precision_words}", chosen.replace(
            weights_dtype=weights, amp=amp, stochastic_rounding=chosen.stochastic_rounding and weights == "bf16")

    def setting(self, config: TrainConfig) -> str | None:
        if config.quantization is not None and config.weights_dtype != "fp32" and config.amp != "none":
            return (f"precision: the weights outside bitsandbytes loaded in {config.weights_dtype} (dtype=torch."
                    f"{TORCH_DTYPE_NAMES[config.weights_dtype]}; prepare_model_for_kbit_training makes them fp32), "
                    f"{config.amp} autocast (TrainingArguments {config.amp}=True)")
        if pure_16bit(config):
            dtype = "torch.bfloat16" if config.weights_dtype == "bf16" else "torch.float16"
            return (f"precision {config.precision}, pure 16-bit: load the weights in {config.weights_dtype} "
                    f"(dtype={dtype}), no autocast (TrainingArguments bf16/fp16 False); the optimizer state "
                    f"follows the weights' dtype")
        return self.SETTINGS.get(config.precision, f"precision {config.precision}")

    def quality(self, config: TrainConfig) -> str | None:
        if config.precision not in self.NOTES and config.amp != "none":
            return f"{config.precision_words}"
        note = self.NOTES.get(config.precision, config.precision)
        if pure_16bit(config) and config.stochastic_rounding:
            return self.ROUNDED_NOTE
        if pure_16bit(config):
            return self.PURE_NOTE.format(config.weights_dtype)
        if config.precision in ("bf16", "fp16"):
            return f"{config.precision} weights: {note}"
        return f"{config.precision}: {note}"

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        arguments: dict[str, Any] = {"bf16": config.amp == "bf16"}
        if config.amp == "fp16":
            arguments["fp16"] = True
        return arguments


class Checkpointing(Rung):
    """Gradient (activation) checkpointing, non-reentrant: of every decoder layer, or of the first k.

    The search offers off and every layer; when every layer fits and none does not, `choose.fewest_checkpointed`
    then finds the fewest layers that still fit (memory falls with each checkpointed layer, speed with each
    recomputed one). `--checkpointing N` pins N layers.
    Recipe: `recipe.step.prepare_model` (`recipe.step.set_checkpointing`). Speed: `throughput.micro_batch_seconds`
    (one more forward of each checkpointed layer in backward)."""

    name = "gradient checkpointing"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        pinned = policy.gradient_checkpointing
        if pinned is None:
            return [{"gradient_checkpointing": False}, {"gradient_checkpointing": True}]
        if isinstance(pinned, bool):
            return [{"gradient_checkpointing": pinned}]
        return [{"gradient_checkpointing": True, "checkpoint_layers": pinned}]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        adapter = fields["adapter"]
        if fields["gradient_checkpointing"] and adapter is not None and adapter.kind == "prefix":
            return "prefix tuning does not work with gradient checkpointing (peft refuses it)"
        if fields.get("checkpoint_layers") is not None and (fields["offload"] != "none" or (
                fields_world_size(fields) > 1 and fields["strategy"] == "fsdp")):
            return ("checkpointing only some layers is not modelled under FSDP or CPU offload yet: checkpoint every "
                    "layer (--checkpointing on), or with several GPUs use --strategy ddp")
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.gradient_checkpointing is not None:
            return None
        if not chosen.gradient_checkpointing and chosen.adapter is not None and chosen.adapter.kind == "prefix":
            return None
        on = not chosen.gradient_checkpointing
        return ("+ gradient checkpointing" if on else "- gradient checkpointing"), chosen.replace(
            gradient_checkpointing=on, checkpoint_layers=None
        )

    def setting(self, config: TrainConfig) -> str | None:
        if config.checkpoint_layers is not None:
            return (f"gradient checkpointing of the first {config.checkpoint_layers} decoder layers, non-reentrant "
                    "(Plan.prepare sets it: TrainingArguments cannot name layers)")
        if config.gradient_checkpointing and config.offload_activations:
            return ("gradient checkpointing of every decoder layer, non-reentrant, with the offload below "
                    "(Plan.prepare sets both; leave TrainingArguments gradient_checkpointing=False, or on "
                    "transformers 5.24 set activation_checkpointing=True with activation_checkpointing_kwargs="
                    "{'use_reentrant': False, 'offload': True})")
        if config.gradient_checkpointing:
            return "gradient checkpointing on, non-reentrant (gradient_checkpointing=True, use_reentrant=False)"
        return "gradient checkpointing off"

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        # transformers 5.24 renamed these to activation_checkpointing(_kwargs); Plan.training_arguments
        # uses the new names where the installed TrainingArguments has them. Some layers only, or offloaded: Trainer
        # would enable every layer, on the GPU, when it starts (5.17 has no offload key), so it is left off there and
        # `Plan.prepare` sets the layers.
        on = config.gradient_checkpointing and config.checkpoint_layers is None and not config.offload_activations
        arguments: dict[str, Any] = {"gradient_checkpointing": on}
        if on:
            arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        return arguments


class ActivationOffload(Rung):
    """The checkpointed layers' inputs kept in pinned host memory (`TrainConfig.offload_activations`): the GPU then
    holds no activations between the forward and the backward of a checkpointed layer, for a copy to the host and
    one back per layer and micro-batch. Tried only with checkpointing, on one GPU or with DDP; the speed model
    charges the copies at the host link's rate, so it ranks below checkpointing alone.

    Recipe: `recipe.step.set_checkpointing` (`offloaded_checkpoint`). Memory: `predict.trace.offload_to_host`
    (device and pinned host bytes). Speed: `throughput.offloaded_activation_bytes`."""

    name = "activation offload"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        pinned = policy.offload_activations
        return [{"offload_activations": value} for value in ([pinned] if pinned is not None else [False, True])]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        if not fields["offload_activations"]:
            return None
        if not fields["gradient_checkpointing"]:
            return "offloading activations keeps the inputs of checkpointed layers: it needs gradient checkpointing"
        if fields["offload"] != "none" or (fields_world_size(fields) > 1 and fields["strategy"] != "ddp"):
            return "offloading activations is not modelled under FSDP or CPU offload yet"
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.offload_activations is not None or not chosen.gradient_checkpointing or chosen.sharded:
            return None
        on = not chosen.offload_activations
        return ("+ activation offload" if on else "- activation offload"), chosen.replace(offload_activations=on)

    def setting(self, config: TrainConfig) -> str | None:
        if not config.offload_activations:
            return None
        return ("activation offload: the checkpointed layers' inputs in pinned host memory, copied out and back per "
                "micro-batch (Plan.prepare sets it, as transformers 5.24's "
                "activation_checkpointing_enable(offload=True))")


class Loss(Rung):
    """The LM head and cross-entropy computed in chunks of tokens: memtune's chunked loss (each chunk recomputed in
    backward) and, where Liger-Kernel is installed, Liger's fused linear cross-entropy (the head's gradients computed
    in forward, chunk by chunk; Triton kernels: a CUDA GPU). Liger is offered when `config.liger_available` (no CUDA
    check here: the search is pure; `memtune run` needs the GPU anyway), on one GPU, with DDP and under FSDP2 (it
    reads the LM head's weight, gathered with the final norm's unit, as the chunked loss does there), and noted as
    skipped otherwise (`skipped`). --no-chunked-loss forbids both; --loss liger pins it.

    Recipe: `recipe.step.prepare_model` -> `recipe.loss.use_chunked_loss` (the model's forward computes it, so it
    runs under DDP's wrapper and FSDP2's root module too: with several GPUs and with CPU offload).
    Memory: Liger's kernels cannot run on fake tensors: `predict.liger` is their allocation-equivalent twin.
    Speed: `throughput.micro_batch_seconds` (chunked: the LM head's matmul once more in backward; Liger: no
    recomputation, less logits traffic, the head's weight moved once per chunk)."""

    name = "chunked loss"
    WORDS = {"chunked": "chunked loss", "liger": "Liger fused loss"}

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        if policy.loss == "liger":
            require_liger()  # UsageError (exit 2) with the install command
        if policy.loss:
            values = [policy.loss]
        elif not policy.allow_chunked_loss:
            values = ["standard"]
        else:
            values = ["standard", "chunked"] + (["liger"] if liger_available() else [])
        return [{"loss": value} for value in values]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        adapter = fields["adapter"]
        if fields["loss"] == "liger" and adapter is not None and adapter.kind == "lora" and any(
                name in HEAD_NAMES for name in (adapter.target_modules if not isinstance(adapter.target_modules, str)
                                                else (adapter.target_modules,))):
            return "Liger's loss reads the LM head's weight directly, past a LoRA adapter on the head"
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.loss is not None or not policy.allow_chunked_loss:
            return None
        if chosen.loss == "standard":
            return "+ chunked loss", chosen.replace(loss="chunked")
        if chosen.loss == "liger":  # the other fused loss: which of the two was measured faster, or fits
            return "chunked loss instead of Liger's", chosen.replace(loss="chunked")
        return "- chunked loss", chosen.replace(loss="standard")

    def setting(self, config: TrainConfig) -> str | None:
        if config.loss == "chunked":
            return "chunked loss: the LM head and cross-entropy in chunks of tokens (memtune run applies it)"
        if config.loss == "liger":
            return ("Liger fused loss: the LM head and cross-entropy by Liger-Kernel's fused linear cross-entropy "
                    f"(memtune run applies it; needs liger-kernel: {LIGER_EXTRA_HINT})")
        return None




class Offload(Rung):
    """CPU offload: FSDP2's of parameters, gradients and optimizer state (also with one GPU), or under DeepSpeed
    ZeRO's offload_optimizer ("optimizer", ZeRO-Offload: the state and its step on the CPU) or ZeRO-3's
    offload_param + offload_optimizer ("parameters"), to the CPU or NVMe (`Zero.offload_device`, `ZeroRung`).

    Recipe: `recipe.parallel.apply_fsdp` (CPUOffloadPolicy); DeepSpeed's from the JSON `run.launch.deepspeed_config`
    writes. Speed: `throughput.fsdp_micro_batch_seconds` and `throughput.zero_step_seconds` (host-device copies and
    the optimizer step on the CPU)."""

    name = "CPU offload"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        if policy.offload:
            values = [policy.offload]
        elif policy.allow_offload and not with_adapter:
            # "optimizer" is DeepSpeed's alone (`Strategy.conflict` leaves it out of FSDP)
            values = ["none", "optimizer", "parameters"] if deepspeed_offered(policy, with_adapter) \
                else ["none", "parameters"]
        else:
            values = ["none"]
        return [{"offload": value} for value in values]

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if chosen.deepspeed:
            return self._zero_flip(chosen, policy)
        if (
            policy.offload is not None
            or not policy.allow_offload
            or chosen.adapter is not None
            or policy.strategy == "ddp"
        ):
            return None
        flipped = "none" if chosen.offload != "none" else "parameters"
        label = f"{'+' if flipped != 'none' else '-'} CPU offload"
        if chosen.strategy == "ddp":
            label += " (FSDP)"
        strategy = "fsdp" if flipped != "none" else chosen.strategy
        optimizer = chosen.optimizer
        if flipped != "none" and optimizer in UNSHARDABLE_OPTIMIZERS:
            label, optimizer = label + f" ({DEFAULT_OPTIMIZER})", DEFAULT_OPTIMIZER  # FSDP cannot shard them
        return label, chosen.replace(offload=flipped, strategy=strategy, optimizer=optimizer)

    @staticmethod
    def _zero_flip(chosen: TrainConfig, policy: Policy) -> tuple[str, TrainConfig] | None:
        """A DeepSpeed winner with its offload the other way: without (on one GPU, no DeepSpeed at all: ZeRO there
        partitions nothing), or with the optimizer state on the CPU."""
        if policy.offload is not None or not policy.allow_offload or chosen.adapter is not None or chosen.zero is None:
            return None
        if chosen.offload != "none":
            if chosen.world_size == 1:
                if policy.strategy == "deepspeed":
                    return None
                return "- ZeRO-Offload (one GPU, no DeepSpeed)", chosen.replace(strategy="fsdp", zero=None,
                                                                               offload="none")
            zero = dataclasses.replace(chosen.zero, offload_device="cpu", nvme_path=None)
            return "- ZeRO offload", chosen.replace(offload="none", zero=zero)
        return "+ ZeRO CPU optimizer offload", chosen.replace(offload="optimizer")

    def setting(self, config: TrainConfig) -> str | None:
        if config.offload != "none" and not config.deepspeed:  # DeepSpeed's is in ZeroRung's line
            return f"offload {config.offload} to CPU (FSDP2 CPU offload through accelerate; memtune run sets it up)"
        return None


class Strategy(Rung):
    """How the GPUs share the work: a full replica per GPU (DDP), FSDP2 full sharding, or DeepSpeed ZeRO (where
    installed; its settings are `ZeroRung`'s).

    Recipe: `recipe.parallel.build_replicated_model` / `apply_fsdp`; DeepSpeed through `accelerate launch` with
    the JSON of `run.launch.deepspeed_config`. Speed: `throughput.ddp_sync_seconds`,
    `throughput.fsdp_micro_batch_seconds` and `throughput.zero_step_seconds` (the collectives)."""

    name = "strategy"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        names = strategies(policy) + (["deepspeed"] if deepspeed_offered(policy, with_adapter) else [])
        return [{"strategy": strategy, "num_gpus": policy.num_gpus, "num_nodes": policy.num_nodes}
                for strategy in names]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        if fields["strategy"] == "ddp" and fields["offload"] != "none":
            return "a replica per GPU has nothing to offload through: FSDP does that"
        if fields["strategy"] != "deepspeed" and fields["offload"] == "optimizer":
            return ("the optimizer state alone is offloaded by DeepSpeed (ZeRO-Offload); FSDP2 offloads parameters, "
                    "gradients and optimizer state together")
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.strategy is not None or chosen.world_size < 2:
            return None
        if chosen.deepspeed:  # the engine beside it: FSDP2 with the same offload (parameters: FSDP2's CPU offload)
            offload = "none" if chosen.offload == "none" else "parameters"
            label = f"FSDP2 instead of {zero_words(chosen)}"
            return label, chosen.replace(strategy="fsdp", zero=None, offload=offload)
        if chosen.strategy == "ddp":
            if chosen.optimizer in UNSHARDABLE_OPTIMIZERS:  # FSDP cannot shard their state
                return (f"FSDP instead of DDP (shards the model state; {DEFAULT_OPTIMIZER})",
                        chosen.replace(strategy="fsdp", optimizer=DEFAULT_OPTIMIZER))
            return "FSDP instead of DDP (shards the model state)", chosen.replace(strategy="fsdp")
        if policy.offload not in (None, "none"):
            return None
        label = "DDP instead of FSDP (a replica per GPU)" + (" without offload" if chosen.offload != "none" else "")
        return label, chosen.replace(strategy="ddp", offload="none")

    def setting(self, config: TrainConfig) -> str | None:
        if config.replicated:
            return (f"{config.gpus_words}, a full replica on each (DDP through accelerate launch, "
                    f"ddp_find_unused_parameters=False; {launcher_words(config)})")
        if config.world_size > 1 and not config.deepspeed:  # DeepSpeed's line is ZeroRung's
            return (f"{config.gpus_words}, sharded with FSDP2 (torch's fully_shard) through accelerate "
                    f"(fsdp_version 2; {launcher_words(config)})")
        return None

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        # Every parameter of a causal LM gets a gradient in every step: no search for unused ones
        # (run.launch.ddp_training_arguments says why; FSDP comes from the accelerate config instead).
        return {"ddp_find_unused_parameters": False} if config.replicated else {}


DEEPSPEED_VERSION = "0.19.8"
"""The DeepSpeed release whose source the ZeRO estimate follows and that was measured (docs/deepspeed-zero.md)."""
SEARCHED_ZERO_STAGES = (2, 3)
"""The ZeRO stages the search tries unless --zero-stage pins one: ZeRO-1 keeps every gradient whole to the
accumulation boundary (the memo, §2.1), never below ZeRO-2's memory, and not faster by the speed model."""


class ZeroRung(Rung):
    """DeepSpeed ZeRO's settings (`TrainConfig.zero`): the stage and where offloaded state goes, for strategy
    "deepspeed" (`Strategy`); offered where DeepSpeed is installed (else skipped, with one line saying how,
    `skipped`), beside DDP and FSDP2 over several GPUs, and on one GPU with offload only (ZeRO-Offload: ZeRO on one
    GPU partitions nothing, so without offload it only adds its buffers). Stages 2 and 3 (`SEARCHED_ZERO_STAGES`),
    each with and without the optimizer offloaded, ZeRO-3 with the parameters too (`Offload`); to the CPU, and to
    NVMe (ZeRO-Infinity, ZeRO-3) only with --nvme-path, walked after every CPU one (`storage_rank`): NVMe only when
    the host RAM is not enough (`choose._walk` checks both). The bucket sizes are transformers' "auto" values
    (`Zero.resolved`).

    Recipe: `run.launch.deepspeed_config` (the JSON, through accelerate launch). Memory: `predict.zero`. Speed:
    `throughput.zero_step_seconds`."""

    name = "DeepSpeed ZeRO"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        settings: list[dict[str, Any]] = [] if deepspeed_pinned(policy) else [{"zero": None}]
        if deepspeed_offered(policy, with_adapter):
            settings += [{"zero": zero} for zero in zero_settings(policy)]
        return settings or [{"zero": None}]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        zero: Zero | None = fields.get("zero")
        if (zero is not None) != (fields["strategy"] == "deepspeed"):
            return "ZeRO's settings go with strategy deepspeed, and only with it"
        if zero is None:
            return None
        offload = fields["offload"]
        if fields_world_size(fields) == 1 and offload == "none":
            return ("ZeRO on one GPU partitions nothing: without offload it only adds its buffers to the plain step "
                    "(memtune plan --strategy deepspeed --offload none predicts it)")
        if offload == "parameters" and zero.stage != 3:
            return "DeepSpeed offloads parameters at ZeRO stage 3 only (offload_param)"
        if zero.offload_device == "nvme" and (offload == "none" or zero.stage != 3):
            return "NVMe offload is ZeRO-3's (ZeRO-Infinity), and needs something offloaded"
        if fields["weights_dtype"] != "fp32" and fields["amp"] != fields["weights_dtype"]:
            return "DeepSpeed keeps fp32 master weights: pure 16-bit training has no DeepSpeed mode"
        if fields["optimizer"] not in DEEPSPEED_OPTIMIZERS:
            return "a DeepSpeed plan runs DeepSpeed's AdamW (adamw_torch_fused or adamw_torch)"
        if fields.get("quantization") is not None:
            return "a quantised base (QLoRA) is not planned under DeepSpeed"
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        zero = chosen.zero
        if zero is not None:  # the other stage, where it can hold the same offload
            if policy.zero_stage is not None or chosen.offload == "parameters" or zero.offload_device == "nvme":
                return None
            stage = 2 if zero.stage == 3 else 3
            return (f"ZeRO-{stage} instead of ZeRO-{zero.stage}",
                    chosen.replace(zero=dataclasses.replace(zero, stage=stage)))
        # not DeepSpeed: ZeRO-3 with the same offload, where the search would offer it
        if (policy.strategy is not None or not deepspeed_offered(policy, chosen.adapter is not None)
                or (chosen.world_size == 1 and chosen.offload == "none")):
            return None
        engine = "DDP" if chosen.replicated else "FSDP2" if chosen.sharded else "no wrapper"
        return f"DeepSpeed ZeRO-3 instead of {engine}", chosen.replace(strategy="deepspeed", zero=Zero(stage=3))

    def setting(self, config: TrainConfig) -> str | None:
        if config.zero is None:
            return None
        gpus = config.gpus_words if config.world_size > 1 else "one GPU"
        path = f" at {config.zero.nvme_path}" if config.offload != "none" and config.zero.offload_device == "nvme" \
            else ""
        writes = ("memtune run writes both" if config.num_nodes == 1
                  else "both are in the launch files written next to the plan")
        return (f"{zero_words(config)}{path}, on {gpus} (DeepSpeed {DEEPSPEED_VERSION}'s rules; the ZeRO JSON with "
                f"explicit bucket sizes through accelerate launch: {writes}; needs deepspeed: "
                f"{DEEPSPEED_EXTRA_HINT})")


def zero_words(config: TrainConfig) -> str:
    """A DeepSpeed configuration's engine in the report's words: "DeepSpeed ZeRO-3, CPU optimizer offload"."""
    zero = config.zero
    if zero is None:
        return ""
    place = "NVMe" if zero.offload_device == "nvme" else "CPU"
    offload = {"optimizer": f", {place} optimizer offload",
               "parameters": f", {place} parameter + optimizer offload"}.get(config.offload, "")
    return f"DeepSpeed ZeRO-{zero.stage}{offload}"


def deepspeed_pinned(policy: Policy) -> bool:
    """The policy asks for DeepSpeed: --strategy deepspeed, or one of its own options (--zero-stage,
    --offload-device, --nvme-path, --offload optimizer) with --strategy auto."""
    if policy.strategy is not None:
        return policy.strategy == "deepspeed"
    return (policy.zero_stage is not None or policy.offload_device is not None or policy.nvme_path is not None
            or policy.offload == "optimizer")


def deepspeed_offered(policy: Policy, with_adapter: bool) -> bool:
    """Whether the search tries DeepSpeed ZeRO: pinned (`deepspeed_pinned`; `Policy.validate` has refused it where
    DeepSpeed is missing), or strategy auto with DeepSpeed installed, no quantised base, and over several GPUs, or on
    one GPU where offload may be tried (full fine-tuning, offload allowed)."""
    if deepspeed_pinned(policy):
        return True
    if policy.strategy is not None or not deepspeed_available() or policy.quantized_base is not None:
        return False
    if world_size(policy) > 1:
        return True
    return policy.allow_offload and not with_adapter and policy.offload != "none"


def zero_settings(policy: Policy) -> list[Zero]:
    """The ZeRO settings the search tries: each stage (`SEARCHED_ZERO_STAGES`, or the pinned one) to the CPU, and to
    NVMe at --nvme-path where it is given (ZeRO-3 only: `ZeroRung.conflict`)."""
    stages = [policy.zero_stage] if policy.zero_stage is not None else list(SEARCHED_ZERO_STAGES)
    devices: list[Literal["cpu", "nvme"]] = ["cpu", "nvme"] if policy.nvme_path is not None else ["cpu"]
    if policy.offload_device is not None:
        devices = ["nvme" if policy.offload_device == "nvme" else "cpu"]
    return [Zero(stage=stage, offload_device=device, nvme_path=policy.nvme_path if device == "nvme" else None)
            for stage in stages for device in devices]


def storage_rank(config: TrainConfig) -> int:
    """1 for state offloaded to NVMe (ZeRO-Infinity), else 0: the search walks NVMe plans after every other plan of
    their tier, so NVMe is chosen only when the host RAM (or the GPU) is not enough for the CPU ones."""
    return int(config.zero is not None and config.offload != "none" and config.zero.offload_device == "nvme")


class Optimizer(Rung):
    """The optimizer implementation, by transformers' `optim` name (`--optim`, `--no-8bit-optim`).

    The 8-bit ones (bitsandbytes AdamW8bit, paged or not; torchao's AdamW8bit where bitsandbytes is missing) save
    ~6 of AdamW's 8 state bytes per fp32 parameter, torchao's AdamW4bit ~7, without changing what is trained; their
    state is quantised blockwise (a quality trade, flagged).
    The paged one keeps that state in CUDA unified memory, outside the predicted peak (the driver evicts it
    to the host when the GPU is full, and the speed model charges that traffic).
    They are offered only when their package is installed (else skipped, with one line saying how), only for
    full fine-tuning (an adapter's state is a few MiB: quantising it saves nothing worth a quality trade), and
    ranked by predicted speed with the rest. Recipe: `recipe.step.make_optimizer`. Speed:
    `throughput.optimizer_seconds`."""

    name = "optimizer"
    QUALITY = {
        "adamw_bnb_8bit": "8-bit AdamW: optimizer state quantised blockwise (usually quality-neutral)",
        "paged_adamw_8bit": "paged 8-bit AdamW: optimizer state quantised blockwise (usually quality-neutral)",
        "adafactor": "Adafactor: no momentum, factored second moment (a different optimizer)",
        "adamw_torch_8bit": "8-bit AdamW (torchao): optimizer state quantised blockwise (usually quality-neutral)",
        "adamw_torch_4bit": "4-bit AdamW (torchao): optimizer state quantised to 4 bits blockwise (a larger "
                            "quality trade than 8-bit; Li et al. 2023 report it close to 32-bit AdamW)",
    }

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        if policy.optimizer is not None:
            require_extra(policy.optimizer)
            names = [policy.optimizer]
        else:
            names = self.allowed(policy, with_adapter)
        return [{"optimizer": name, "stochastic_rounding": rounding} for name in names
                for rounding in ((False, True) if name in TORCHAO_OPTIMIZERS else (False,))]

    @staticmethod
    def allowed(policy: Policy, with_adapter: bool) -> list[str]:
        """The optimizers the search may choose: fused AdamW, and for full fine-tuning the installed 8-bit ones."""
        names = [DEFAULT_OPTIMIZER]
        if policy.allow_8bit_optimizer and not with_adapter:
            if bitsandbytes_available():
                names += ["adamw_bnb_8bit", "paged_adamw_8bit"]
            if torchao_available():  # its 8-bit AdamW holds what bitsandbytes' does: offered only without it
                names += ["adamw_torch_4bit"] + ([] if bitsandbytes_available() else ["adamw_torch_8bit"])
        return names

    def conflict(self, fields: dict[str, Any]) -> str | None:
        # torchao's optimizers round bf16 weights stochastically where they can, always: it keeps small updates
        # (`TrainConfig.stochastic_rounding`) and costs no memory (H200, Qwen2.5-0.5B and Llama-3.2-1B pure bf16
        # with AdamW4bit: the same peaks to the byte, results/lowbit_stochastic_rounding_h200.json; tokens/s
        # +7% / -12%, within the noise of its 2 timed steps).
        if fields.get("stochastic_rounding", False) != rounds_stochastically(
                fields["optimizer"], fields["weights_dtype"], fields["adapter"] is not None):
            return "torchao's optimizers round bf16 weights stochastically, and only those"
        if fields["optimizer"] in UNSHARDABLE_OPTIMIZERS and (fields["offload"] != "none" or (
                fields_world_size(fields) > 1 and fields["strategy"] != "ddp")):
            return ("FSDP cannot shard or offload this optimizer's state (bitsandbytes', Adafactor's; torchao's "
                    "is not modelled)")
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.optimizer is not None or chosen.optimizer == DEFAULT_OPTIMIZER:
            return None
        return f"{DEFAULT_OPTIMIZER} instead of {chosen.optimizer}", chosen.replace(optimizer=DEFAULT_OPTIMIZER,
                                                                                    stochastic_rounding=False)

    def setting(self, config: TrainConfig) -> str | None:
        if config.optimizer == DEFAULT_OPTIMIZER:
            return None
        package = ("bitsandbytes" if config.optimizer in BITSANDBYTES_OPTIMIZERS
                   else "torchao" if config.optimizer in TORCHAO_OPTIMIZERS else "")
        extra = f" (needs {package}: {QUANT_EXTRA_HINT})" if package else ""
        rounding = ', optim_args="bf16_stochastic_round=True"' if config.stochastic_rounding else ""
        return f"optimizer {config.optimizer} (TrainingArguments optim=\"{config.optimizer}\"{rounding}){extra}"

    def quality(self, config: TrainConfig) -> str | None:
        return self.QUALITY.get(config.optimizer)

    def trainer_arguments(self, config: TrainConfig) -> dict[str, Any]:
        # adamw_torch_fused is TrainingArguments' default from torch 2.8 on: left out, as the other defaults are
        # (Plan.training_arguments passes optim always).
        arguments = {} if config.optimizer == DEFAULT_OPTIMIZER else {"optim": config.optimizer}
        if config.stochastic_rounding:  # trainer_optimizer.py `_get_torchao_optimizer` reads it from optim_args
            arguments["optim_args"] = "bf16_stochastic_round=True"
        return arguments


class AdapterRung(Rung):
    """LoRA or prefix tuning through peft: trains the adapter only (a quality trade), tried when
    nothing else fits unless the policy asks for it (`Policy.use_adapter`).

    Recipe: `recipe.step.prepare_model` (`peft.get_peft_model` with `recipe.step.peft_config`).
    Speed: `throughput.trained_parameters` (only the adapter's gradients and optimizer step)."""

    name = "adapter"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        return [{"adapter": policy.adapter if with_adapter else None}]

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.use_adapter is not None or chosen.adapter is not None:
            return None
        if policy.adapter.kind == "prefix" and chosen.gradient_checkpointing:
            return None  # peft refuses prefix tuning with gradient checkpointing
        return f"+ {policy.adapter.describe()}", chosen.replace(adapter=policy.adapter)

    def setting(self, config: TrainConfig) -> str | None:
        adapter = config.adapter
        if adapter is None:
            return None
        if adapter.kind == "lora":
            targets = adapter.target_modules
            shown = json.dumps(list(targets) if isinstance(targets, tuple) else targets)
            return (f"LoRA (peft): r={adapter.rank}, lora_alpha={adapter.alpha}, dropout {adapter.dropout}, "
                    f"target_modules={shown}")
        return f"{adapter.describe()} (peft)"


class QuantizedBase(Rung):
    """The base under LoRA stored in 4 bits (nf4, double quantisation) or 8 bits (LLM.int8) by bitsandbytes:
    QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 3: NF4 and double
    quantisation), `--qlora BITS` pins one, `--no-qlora` forbids both.

    A quality trade walked after every LoRA configuration on a 16/32-bit base (`tier`): the frozen weights are
    rounded to 4 or 8 bits and a step dequantises them (slower). It is offered only in the adapter stage, on one
    GPU without offload (`TrainConfig` refuses the rest), and only when bitsandbytes is installed (else skipped,
    with one line saying how). It loads the other weights in 16 bits and autocasts in 16 bits (Trainer
    bf16=True; fp16 on a card without bf16), as QLoRA recipes and benchmarks/lowbit.py run it, unless
    `--precision` is pinned. Recipe: `recipe.step.build_model` (`recipe.quant.quantize_model`,
    `prepare_for_kbit_training`); trace: `predict.quantized`; loader: `Plan.model_kwargs` (quantization_config)."""

    name = "quantised base"
    # LLM.int8 multiplies every input column holding a value above its threshold (6.0) in 16 bits and keeps it for
    # backward: memory and time grow with them. A trained checkpoint has a handful (Dettmers et al. 2022, Sec. 4);
    # a random Mistral-7B at initializer_range 0.02 had ~14,300 of down_proj's 14,336 (benchmarks/lowbit.py).
    QUALITY = {4: ("{0}: the base weights are quantised (QLoRA, Dettmers et al. 2023: nf4 + double quantisation), "
                   "the adapter trains in {1}"),
               8: ("{0}: the base weights are quantised to 8 bits (LLM.int8, Dettmers et al. 2022), "
                   "the adapter trains in {1}; predicted with few outlier inputs (> 6.0), as trained "
                   "checkpoints have")}

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        if not with_adapter:
            return [{"quantization": None}]
        if policy.quantized_base is not None:
            if not bitsandbytes_available():
                raise UsageError(f"--qlora {policy.quantized_base} needs bitsandbytes, which is not installed: "
                                 f"{QUANT_EXTRA_HINT}")
            return [quantized_fields(policy.quantized_base, policy)]
        settings: list[dict[str, Any]] = [{"quantization": None}]
        if policy.allow_quantized_base and bitsandbytes_available() and world_size(policy) == 1:
            settings += [quantized_fields(bits, policy) for bits in (4, 8)]
        return settings

    def conflict(self, fields: dict[str, Any]) -> str | None:
        if fields.get("quantization") is None:
            return None
        adapter = fields["adapter"]
        if adapter is None or adapter.kind != "lora":
            return "a quantised base trains only a LoRA adapter"
        if fields_world_size(fields) != 1 or fields["offload"] != "none":
            return "a quantised base is planned on one GPU of one machine, without offload"
        if fields["amp"] == "none":
            return ("a quantised base trains under 16-bit autocast: --precision bf16-mixed or fp16-mixed, or no "
                    "--precision with --qlora")
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.quantized_base is not None or chosen.adapter is None or chosen.adapter.kind != "lora":
            return None
        if chosen.quantization is not None:
            # the fastest LoRA base of the adapter stage: 16-bit weights, no autocast (`precisions`)
            weights, amp = precision_config(policy.precision or ("bf16" if policy.bf16_supported else "fp16"))
            return (f"{weights} base instead of the {base_words(chosen.quantization)}",
                    chosen.replace(quantization=None, weights_dtype=weights, amp=amp))
        if (not policy.allow_quantized_base or not bitsandbytes_available() or chosen.world_size != 1
                or chosen.offload != "none"):
            return None
        fields = quantized_fields(4, policy)
        return f"+ {base_words(fields['quantization'])}", chosen.replace(**fields)

    def setting(self, config: TrainConfig) -> str | None:
        quantization = config.quantization
        if quantization is None:
            return None
        return (f"{base_words(quantization)}: from_pretrained(quantization_config=BitsAndBytesConfig("
                f"{bnb_arguments(quantization)})), "
                f"then peft's prepare_model_for_kbit_training (needs bitsandbytes: {QUANT_EXTRA_HINT})")

    def quality(self, config: TrainConfig) -> str | None:
        quantization = config.quantization
        if quantization is None:
            return None
        compute = quantization.compute_dtype if quantization.bits == 4 else (
            config.amp if config.amp != "none" else config.weights_dtype)
        return self.QUALITY[quantization.bits].format(base_words(quantization), compute)


def base_words(quantization: Quantization) -> str:
    """The quantised base in the report's words: "4-bit base (nf4)", "8-bit base"."""
    return f"4-bit base ({quantization.quant_type})" if quantization.bits == 4 else "8-bit base"


def bnb_arguments(quantization: Quantization) -> str:
    """transformers' BitsAndBytesConfig arguments as Python source (what `recipe.quant.bnb_config` builds)."""
    if quantization.bits == 8:
        return "load_in_8bit=True"
    return (f'load_in_4bit=True, bnb_4bit_quant_type="{quantization.quant_type}", '
            f"bnb_4bit_use_double_quant={quantization.use_double_quant}, "
            f"bnb_4bit_compute_dtype=torch.{TORCH_DTYPE_NAMES[quantization.compute_dtype]}")


def quantized_fields(bits: int, policy: Policy) -> dict[str, Any]:
    """The TrainConfig fields of a quantised base of `bits` under the policy (`config.quantized_base_fields`)."""
    return quantized_base_fields(bits, policy.precision, policy.bf16_supported)


class AllocatorMode(Rung):
    """The caching allocator's mode (`--expandable-segments`): a segment per cudaMalloc, or
    `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, one segment per pool that grows by mapping pages. The
    same allocations laid out differently: usually less memory stranded between blocks (H200: 5 of 6 recorded
    steps lower, Llama-3.2-1B with Adafactor 19% lower), sometimes more (Qwen2.5-0.5B 16 x 1024: 6% higher,
    whole 20 MiB pages). Both are predicted (`predict.allocator`); the default comes first where both fit (the
    speed model charges neither). Recipe: `run.runner` / `Plan.prepare` set the variable before CUDA starts."""

    name = "allocator"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        values = [policy.expandable_segments] if policy.expandable_segments is not None else [False, True]
        return [{"expandable_segments": value} for value in values]

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if policy.expandable_segments is not None:
            return None
        on = not chosen.expandable_segments
        return ("+ expandable segments" if on else "- expandable segments"), chosen.replace(expandable_segments=on)

    def setting(self, config: TrainConfig) -> str | None:
        if not config.expandable_segments:
            return None
        return ("allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, set before CUDA starts "
                "(memtune run and Plan.prepare set it)")


class Reference(Rung):
    """The trainer whose step is searched (`Policy.trainer`, `--trainer`: one option) and, for TRL's DPOTrainer,
    where the reference's log-probs come from: computed live in every step (a frozen copy of the model, or the
    policy's base with the adapter disabled under LoRA), then precomputed once before training
    (`precompute_ref_log_probs`: no reference on the GPU, no reference forward; DPOTrainer builds a temporary
    reference for it, whose forward under no_grad runs before the optimizer state exists). Recipe: `Plan.dpo_config`;
    trace: `predict.trl_step`. TRL's trainers compute their loss with their own fused LM head, so the chunked and
    Liger losses conflict with them, and they are planned on one GPU or with DDP; DPO is not planned on a quantised
    base (QLoRA) yet, which `memtune run` does not run."""

    name = "reference log-probs"

    def options(self, policy: Policy, with_adapter: bool, effective_batch_size: int) -> list[dict[str, Any]]:
        trainer = {"trainer": policy.trainer, "sft_batches": policy.sft_batches}
        if policy.trainer != "dpo":
            return [trainer]
        pinned = policy.precompute_ref_log_probs
        return [{**trainer, "precompute_ref_log_probs": value}
                for value in ([pinned] if pinned is not None else [False, True])]

    def conflict(self, fields: dict[str, Any]) -> str | None:
        trainer = fields.get("trainer", "causal-lm")
        if trainer == "causal-lm":
            return None
        if fields.get("loss", "standard") != "standard":
            return f"--trainer {trainer} computes its loss with TRL's fused LM head (no chunked or Liger loss)"
        if (fields.get("strategy") == "deepspeed" or fields.get("offload", "none") != "none"
                or (fields_world_size(fields) > 1 and fields.get("strategy") != "ddp")):
            return f"--trainer {trainer} is planned on one GPU or with DDP (no FSDP, offload or DeepSpeed)"
        if trainer == "dpo" and fields.get("quantization") is not None:
            return "--trainer dpo is not run on a quantised base yet (memtune run refuses it: TrainConfig's check)"
        return None

    def flip(self, chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> tuple[str, TrainConfig] | None:
        if chosen.trainer != "dpo" or policy.precompute_ref_log_probs is not None:
            return None
        on = not chosen.precompute_ref_log_probs
        return (("+ precomputed reference log-probs" if on else "- precomputed reference log-probs"),
                chosen.replace(precompute_ref_log_probs=on))

    def setting(self, config: TrainConfig) -> str | None:
        if config.trainer == "dpo":
            return (f"DPO reference: {config.reference} (plan.dpo_config(): DPOConfig(precompute_ref_log_probs="
                    f"{config.precompute_ref_log_probs}))")
        if config.trainer == "sft":
            return f"SFT batches: {config.sft_batches} (plan.sft_config(): SFTConfig)"
        return None


# Enumeration order of the candidate space and of the "why this one" alternatives.
PRECISION, STRATEGY, OPTIMIZER, ADAPTER = Precision(), Strategy(), Optimizer(), AdapterRung()
QUANTIZED_BASE = QuantizedBase()
LADDER: tuple[Rung, ...] = (
    MicroBatch(), PRECISION, Checkpointing(), ActivationOffload(), Loss(), Offload(), STRATEGY, ZeroRung(), OPTIMIZER,
    ADAPTER, QUANTIZED_BASE, AllocatorMode(), Reference(),
)


def world_size(policy: Policy) -> int:
    """GPUs of the whole job the policy plans: --nodes machines x --gpus each (`TrainConfig.world_size`). The
    effective batch is split over all of them, and from 2 on a strategy spans them, also with --gpus 1 --nodes 2."""
    return policy.num_gpus * policy.num_nodes


def fields_world_size(fields: dict[str, Any]) -> int:
    """`TrainConfig.world_size` of a combination of field values before TrainConfig checks them (`Rung.conflict`)."""
    return int(fields["num_gpus"]) * int(fields.get("num_nodes", 1))


def launcher_words(config: TrainConfig) -> str:
    """Who starts a plan's processes, for the "what to set" lines: `memtune run` on one machine; over several, the
    launch files written next to the plan (`run.launch.write_launch_files`), one `accelerate launch` per machine."""
    if config.num_nodes == 1:
        return "memtune run sets it up"
    return (f"on each of the {config.num_nodes} machines: accelerate launch --config_file "
            "accelerate_machine{R}.yaml, written next to the plan")


def micro_batch_sizes(effective_batch_size: int, policy: Policy) -> list[int]:
    """Micro-batches that keep the effective batch exactly (divisors of the per-GPU batch, effective batch / the
    world size), largest first.

    Raises UsageError when `policy.min_micro_batch_size` leaves none."""
    if policy.micro_batch_size is not None:
        return [policy.micro_batch_size]
    per_gpu = effective_batch_size // world_size(policy)
    sizes = [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0 and m >= policy.min_micro_batch_size]
    if not sizes:
        raise UsageError(f"no micro-batch >= {policy.min_micro_batch_size} divides the per-GPU batch {per_gpu}: "
                         "lower --min-micro-batch-size or change --batch-size")
    return sizes


def precisions(policy: Policy, with_adapter: bool) -> list[str]:
    """Fastest first. A frozen base can be stored in 16 bits (how LoRA is usually run); trained
    weights keep fp32 master copies (mixed precision), as Trainer(bf16=True) does, and then pure 16-bit
    training (weights and optimizer state in bf16, fp16 on a card without bf16; a quality trade that
    `tier` walks after everything with fp32 master weights on the GPU, before offload), unless the policy
    forbids it."""
    if policy.precision is not None:
        if policy.precision in ("bf16", "fp16") and not with_adapter and not policy.allow_pure_16bit:
            return []  # pure 16-bit training is forbidden: this pin applies to the adapter stage only
        return [policy.precision]
    half = "bf16" if policy.bf16_supported else "fp16"
    if with_adapter:
        return [half, f"{half}-mixed", "fp32"]
    return [f"{half}-mixed", "fp32"] + ([half] if policy.allow_pure_16bit else [])


def skipped(policy: Policy) -> list[str]:
    """One line per rung left out of the search because an optional package is missing."""
    notes = []
    if policy.optimizer is None and policy.allow_8bit_optimizer:
        if not bitsandbytes_available() and not torchao_available():
            notes.append(f"8-bit and 4-bit optimizers skipped: neither bitsandbytes nor torchao is installed "
                         f"({QUANT_EXTRA_HINT} to add them)")
        elif not torchao_available():
            notes.append(f"4-bit AdamW skipped: torchao is not installed ({QUANT_EXTRA_HINT} to add it)")
    if (policy.quantized_base is None and policy.allow_quantized_base and policy.use_adapter is not False
            and world_size(policy) == 1 and not bitsandbytes_available()):
        notes.append(f"quantised bases (QLoRA, 4-bit / 8-bit under LoRA) skipped: bitsandbytes is not installed "
                     f"({QUANT_EXTRA_HINT} to add them)")
    if policy.loss is None and policy.allow_chunked_loss and not liger_available():
        notes.append(f"Liger's fused linear cross-entropy skipped: liger-kernel (with Triton, which needs a CUDA GPU) "
                     f"is not installed ({LIGER_EXTRA_HINT} to add it)")
    if (policy.strategy is None and not deepspeed_pinned(policy) and not deepspeed_available()
            and policy.quantized_base is None
            and (world_size(policy) > 1 or (policy.allow_offload and policy.offload != "none"
                                         and policy.use_adapter is not True))):
        notes.append(f"DeepSpeed ZeRO skipped: deepspeed is not installed ({DEEPSPEED_EXTRA_HINT} to add it)")
    if policy.precision in ("bf16", "fp16") and not policy.allow_pure_16bit and policy.use_adapter is not False:
        notes.append(f"--precision {policy.precision} with --no-pure-16bit: full fine-tuning has no candidate, "
                     f"only LoRA on a {policy.precision} base is searched")
    return notes


def pure_16bit(config: TrainConfig) -> bool:
    """Full fine-tuning with 16-bit weights: no fp32 master copy, the optimizer state in 16 bits too."""
    return config.adapter is None and config.weights_dtype != "fp32"


def tier(config: TrainConfig) -> int:
    """The order in which the search walks the candidates of a stage, each tier fastest first:

    0. fp32 master weights, everything on the GPU;
    1. pure 16-bit training on the GPU (a quality trade: no fp32 master weights);
    2. fp32 master weights with CPU offload;
    3. pure 16-bit training with CPU offload;
    4. LoRA on a quantised base (QLoRA: a quality trade walked after every LoRA configuration on a 16/32-bit
       base; it needs no offload, and dequantising the base every step makes it slower).

    Pure 16-bit comes before offload: offload moves the model state over PCIe every step and runs several
    times slower (H200, Llama-3.2-1B with checkpointing, 4,096 tokens per micro-batch: 7,602 tokens/s with FSDP CPU
    offload, results/loss_2gpu_h200.json, against 29,701 on the GPU, results/activations_h200.json), while a pure
    16-bit step is as fast as a mixed one or faster (issue 13: Mistral-7B full fine-tuning on an A100-80GB, pure
    fp16 with checkpointing measured 2,775 tokens/s where memtune's offload plan predicted 583). It stays after
    every fp32-master configuration that fits on the GPU, and `--no-pure-16bit` forbids it."""
    if config.quantization is not None:
        return 4
    return (1 if pure_16bit(config) else 0) + (2 if config.offload != "none" else 0)


def quality_rank(config: TrainConfig) -> tuple[int, int]:
    """Within a tier, the order of the quality trades that `tier` does not separate, smallest first:

    - pure 16-bit training that rounds to nearest is walked after every configuration that keeps fp32 master
      weights or rounds stochastically: an update below 16 bits' resolution is lost there and survives on average
      with torchao's stochastic rounding (`TrainConfig.stochastic_rounding`), the safer variant issue 13 asks for;
    - within each of those, 4-bit optimizer state (`config.FOUR_BIT_OPTIMIZERS`) after 8-bit or wider state: the
      speed model has predicted torchao's AdamW4bit a hair faster than its AdamW8bit (20,145 vs 20,116 tokens/s in
      the run that chose it, issues 13/14), a difference below what it resolves, while the state is quantised
      twice as coarsely (the larger quality trade, `Optimizer.QUALITY`); 4-bit is taken when no 8-bit state fits.

    Pin --optim to take a faster optimizer that ranks later. Returns (rounds to nearest, 4-bit state), each 0 or 1."""
    rounds_to_nearest = pure_16bit(config) and not config.stochastic_rounding
    return int(rounds_to_nearest), int(config.optimizer in FOUR_BIT_OPTIMIZERS)


def strategies(policy: Policy) -> list[str]:
    """How the GPUs may share the work without DeepSpeed (`deepspeed_offered` adds it): DDP and FSDP over several
    GPUs of the job (`world_size`: --gpus 1 --nodes 2 is two GPUs; unless pinned); one GPU has no choice; none when
    DeepSpeed is pinned (`deepspeed_pinned`)."""
    if deepspeed_pinned(policy):
        return []
    if world_size(policy) < 2:
        return ["fsdp"]  # TrainConfig's default: no wrapper on one GPU (FSDP only for CPU offload)
    return [policy.strategy] if policy.strategy else list(STRATEGIES)


def candidate_space(seq_len: int, effective_batch_size: int, policy: Policy, with_adapter: bool,
                    conflicts: list[set[str]] | None = None) -> list[TrainConfig]:
    """Every combination of the rungs' options that can run, in LADDER order (the first rung varies slowest), each
    once (the quantised base's options set the precision too, so they meet every precision option alike).
    `conflicts`, when given, gets for each combination left out why it cannot run (`Rung.conflict`)."""
    configs: dict[TrainConfig, None] = {}  # ordered; a quantised base sets the precision: equal combinations once
    for combination in itertools.product(
        *(rung.options(policy, with_adapter, effective_batch_size) for rung in LADDER)
    ):
        fields: dict[str, Any] = {"seq_len": seq_len}
        for setting in combination:
            fields.update(setting)
        reasons = [reason for rung in LADDER if (reason := rung.conflict(fields)) is not None]
        if not reasons:
            configs.setdefault(TrainConfig(**fields))
        elif conflicts is not None:
            conflicts.append(set(reasons))
    return list(configs)


def alternatives(chosen: TrainConfig, policy: Policy, effective_batch_size: int) -> list[tuple[str, TrainConfig]]:
    """The winner with each technique switched the other way (pinned and forbidden ones excepted, and those the
    winner's other settings rule out: CPU offload for a winner that checkpoints only some layers)."""
    found = []
    for rung in LADDER:
        try:
            flip = rung.flip(chosen, policy, effective_batch_size)
        except UsageError:  # TrainConfig refused the combination
            continue
        if flip is not None:
            found.append(flip)
    return found


def settings(config: TrainConfig) -> list[str]:
    """The settings that turn a default fine-tuning script into `config`, one line per technique."""
    lines = (rung.setting(config) for rung in LADDER)
    return [line for line in lines if line is not None]


def trainer_arguments(config: TrainConfig) -> dict[str, Any]:
    """The TrainingArguments fields of every rung, in LADDER order (transformers 5.17 names)."""
    arguments: dict[str, Any] = {}
    for rung in LADDER:
        arguments.update(rung.trainer_arguments(config))
    return arguments


def precision_quality(config: TrainConfig) -> str:
    """The precision's quality note: "bf16-mixed: standard mixed precision"."""
    return PRECISION.quality(config) or config.precision


def is_quality_trade(config: TrainConfig) -> bool:
    """True when the configuration changes what is trained, drops the fp32 master weights or quantises the
    optimizer state."""
    return config.adapter is not None or config.weights_dtype != "fp32" or config.optimizer in EIGHT_BIT_OPTIMIZERS


def base_quality(config: TrainConfig) -> str | None:
    """The quantised base's quality note ("4-bit base (nf4): the base weights are quantised ..."), or None."""
    return QUANTIZED_BASE.quality(config)


def optimizer_quality(config: TrainConfig) -> str | None:
    """The optimizer's quality note ("8-bit AdamW: optimizer state quantised ..."), or None for AdamW."""
    return OPTIMIZER.quality(config)

