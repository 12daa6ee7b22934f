"""The words memtune uses for results: category notes, quality notes, what to set, commands and
code to reproduce a plan. Shared by the terminal, JSON and HTML renderings; computes nothing.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

from memtune.config import GIB, KNOWN_GPUS, MIB, TrainConfig, format_bytes, policy_flags
from memtune.plan import evaluation_arguments
from memtune.search import ladder
from memtune.search.choose import (
    EXTRAPOLATED,
    MEASURED_FASTER,
    MEASURED_SLOWER,
    NOT_EVALUATED,
    SKIPPED,
    STATE_ALONE,
    TOO_BIG,
    TRIAL_OOM,
    speed_error_band,
)

if TYPE_CHECKING:
    from memtune.fit import FitResult
    from memtune.predict.peak import Estimate
    from memtune.run.data_plan import DataPlan
    from memtune.search.choose import Alternative, Candidate, SearchResult


CATEGORY_NOTES = {
    "weights": "parameters and buffers",
    "gradients": "gradients of trained parameters",
    "optimizer": "optimizer state, step counters",
    "activations": "tensors saved for backward",
    "logits": "LM-head logits, loss and their gradients",
    "temporaries": "backward intermediates",
    "overhead": "allocator fragmentation, cuBLAS workspaces, CUDA context",
    "fsdp_buffers": "FSDP all-gather and reduce-scatter buffers",
    "ddp_buckets": "DDP gradient buckets (a second copy of the gradients, all-reduced)",
    "evaluation": "an eval step's forward under no_grad: activations, logits, loss",
    "eval logits kept": "Trainer's eval containers on the GPU: logits, labels and losses of the steps so far",
}


# Okabe-Ito colours (distinguishable with colour-blindness); the terminal bars and the HTML
# picture use the same ones, so either legend reads the other.
CATEGORY_COLOURS = {
    "weights": "#0072B2",
    "gradients": "#56B4E9",
    "optimizer": "#009E73",
    "activations": "#E69F00",
    "logits": "#D55E00",
    "temporaries": "#CC79A7",
    "overhead": "#999999",
}


OTHER_COLOUR = "#666666"


DEFAULT_PLAN_PATH = "memtune-plan.json"
"""Where `memtune fit` saves the plan unless --plan-out says otherwise."""


def count_words(count: int) -> str:
    """494032768 -> '494M', 1235814400 -> '1.24B'."""
    return f"{count / 1e9:.3g}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def budget_flag(num_bytes: int) -> str:
    """A --budget value that parses back to exactly `num_bytes`."""
    for unit, size in (("GiB", GIB), ("MiB", MIB)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return f"{num_bytes}B"


def relative(value: float, reference: float) -> str:
    """value against reference: '+12%', '-30%', '+0%'; '4.8x' from twice as much on."""
    if not reference:
        return "n/a"
    return f"{value / reference:.1f}x" if value >= 2 * reference else f"{(value - reference) / reference:+.0%}"


def breakdown_items(breakdown: dict[str, int]) -> list[tuple[str, int]]:
    """Non-zero categories in the fixed order of CATEGORY_NOTES, unknown categories after them."""
    known = [(name, breakdown[name]) for name in CATEGORY_NOTES if breakdown.get(name)]
    return known + [(name, size) for name, size in breakdown.items() if name not in CATEGORY_NOTES and size]


def category_colour(category: str) -> str:
    return CATEGORY_COLOURS.get(category, OTHER_COLOUR)


def trained_share(config: TrainConfig, model_config: Any, num_parameters: int) -> float | None:
    """Fraction of the model's parameters the optimizer updates (throughput's count), None if unknown."""
    from memtune.predict import throughput

    try:
        shape = throughput.ModelShape.of(model_config, num_parameters)
    except (AttributeError, TypeError, ValueError):
        return None
    return throughput.trained_parameters(shape, config) / num_parameters if num_parameters else None


def quality_note(config: TrainConfig, model_config: Any = None, num_parameters: int = 0, *, short: bool = False) -> str:
    """What the configuration costs in training quality, in a few words: "LoRA r=16: trains ~1.1% of
    weights", "fp32: full precision", "bf16-mixed: standard mixed precision; 8-bit AdamW: optimizer state
    quantised ...". `short` leaves out the name (beside a configuration that has it)."""
    optimizer = ladder.optimizer_quality(config)
    if config.adapter is None:
        note = ladder.precision_quality(config)
        note = note.split(": ", 1)[-1] if short else note
        return f"{note}; {optimizer}" if optimizer else note
    share = trained_share(config, model_config, num_parameters)
    name = f"LoRA r={config.adapter.rank}" if config.adapter.kind == "lora" else config.adapter.describe()
    note = f"trains ~{100 * share:.2g}% of weights" if share else "trains the adapter only"
    base = ladder.base_quality(config)
    if base:
        note += f"; {base}"
    elif config.weights_dtype != "fp32":
        note += f", frozen base in {config.weights_dtype}"
    if optimizer:
        note += f"; {optimizer}"
    return note if short else f"{name}: {note}"


def changes_to_make(config: TrainConfig) -> list[str]:
    """The settings that turn a default fine-tuning script into `config`, one per technique (each rung's words)."""
    return ladder.settings(config)


def _python(value: Any) -> str:
    """A Python literal for a snippet: strings in double quotes, tuples of module names as lists."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _python_argument(value: Any) -> str:
    """A keyword argument's value as Python source: True, 16, {"use_reentrant": False}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {_python_argument(item)}" for key, item in value.items()) + "}"
    return repr(value)


def checkpointing_words(config: TrainConfig, model_config: Any, pinned: Any = None) -> str | None:
    """Why the chosen configuration checkpoints the layers it does, when it checkpoints only some (None
    otherwise): pinned (`pinned`, the policy's --checkpointing value), or the fewest the search found to fit
    (`search.choose.fewest_checkpointed`: one fewer was predicted not to)."""
    layers = config.checkpoint_layers
    if layers is None:
        return None
    total = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    of = f" of {total}" if total else ""
    if pinned is not None and not isinstance(pinned, bool):
        return f"checkpointing the first {layers}{of} decoder layers, as --checkpointing {pinned} asks"
    more = f"; checkpointing all of them would recompute {total - layers} more" if total else ""
    return (f"checkpointing the first {layers}{of} decoder layers: the fewest predicted to fit ({layers - 1} do "
            f"not){more}")


def allocator_words(search: SearchResult) -> str | None:
    """Why the chosen configuration runs with expandable segments, when the search took them over the default
    allocator (`search.choose.steadier_allocator`); None otherwise."""
    chosen = search.chosen
    if chosen is None or not chosen.config.expandable_segments or chosen.estimate is None:
        return None
    default = next((candidate for candidate in search.candidates
                    if candidate.config == chosen.config.replace(expandable_segments=False)), None)
    if default is None or default.estimate is None or default.estimate.total_bytes <= search.usable_bytes:
        return None
    return (f"expandable segments: with the default allocator the peak would be "
            f"{format_bytes(default.estimate.total_bytes)}, over the {format_bytes(search.usable_bytes)} usable, "
            f"fitting only by releasing its cache under pressure; with expandable segments it is "
            f"{format_bytes(chosen.estimate.total_bytes)}, at the same speed")


def offload_words(search: SearchResult) -> str | None:
    """What offloading the activations costs and saves, when the chosen configuration does (None otherwise): the
    pinned host memory it holds and, where the search predicted it, the same without offload."""
    chosen = search.chosen
    if chosen is None or not chosen.config.offload_activations or chosen.estimate is None:
        return None
    host = f"{format_bytes(chosen.estimate.host_bytes)} of pinned host memory"
    alone = next((candidate for candidate in search.candidates
                  if candidate.config == chosen.config.replace(offload_activations=False)), None)
    if alone is None or alone.estimate is None:
        return (f"activation offload: the checkpointed layers' inputs wait in {host}, copied out and back every "
                "micro-batch")
    speed = relative(chosen.predicted_tokens_per_second, alone.predicted_tokens_per_second)
    return (f"activation offload: the checkpointed layers' inputs wait in {host}; on the GPU the peak is "
            f"{format_bytes(chosen.estimate.total_bytes)} instead of {format_bytes(alone.estimate.total_bytes)}, "
            f"for a copy out and back per layer ({speed} tokens/s predicted)")


def zero_words(search: SearchResult) -> str | None:
    """The engine of a DeepSpeed winner and the host memory its offload holds (None for any other winner):
    "DeepSpeed ZeRO-3, CPU optimizer offload (DeepSpeed 0.19.8's rules): 2.25 GiB of pinned host memory per GPU"."""
    chosen = search.chosen
    if chosen is None or not chosen.config.deepspeed:
        return None
    config = chosen.config
    line = f"{ladder.zero_words(config)} (as DeepSpeed {ladder.DEEPSPEED_VERSION} allocates)"
    if chosen.estimate is not None and chosen.estimate.host_bytes:
        line += (f": {format_bytes(chosen.estimate.host_bytes)} of pinned host memory per GPU"
                 f"{machine_share(chosen.estimate.host_bytes, config)}, not in the GPU total")
    return line


def machine_share(host_bytes: int, config: TrainConfig) -> str:
    """" (X for the N GPUs of a machine)": the host memory of one machine's ranks, each holding `host_bytes`; ""
    on one GPU."""
    if config.num_gpus <= 1:
        return ""
    return f" ({format_bytes(host_bytes * config.num_gpus)} for the {config.num_gpus} GPUs of a machine)"


def attention_words(config: TrainConfig, model_config: Any) -> str:
    """Which attention the step runs, as the trace assumed it: the implementation (--attn, else the config's own,
    else sdpa) and, for sdpa, the kernel torch picks on the card planned for (`predict.emulation.sdpa_backend`: a
    causal mask passed as is_causal, grouped KV heads passed with enable_gqa as transformers does)."""
    import torch

    from memtune.predict.emulation import DEFAULT_CAPABILITY, sdpa_backend

    attn = config.attn or getattr(model_config, "_attn_implementation", None) or "sdpa"
    if attn != "sdpa":
        return f"attention: {attn}"
    heads = int(getattr(model_config, "num_attention_heads", 0) or getattr(model_config, "n_head", 0) or 1)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0) or 0)
    head_dim = int(getattr(model_config, "head_dim", None) or (hidden // heads if hidden else 64))
    compute = config.amp if config.amp != "none" else config.weights_dtype
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute, torch.float32)
    capability = config.gpu_capability or DEFAULT_CAPABILITY
    kernel = sdpa_backend(capability, dtype, head_dim, False, same_heads=kv_heads == heads,
                          enable_gqa=kv_heads != heads)
    names = {"flash": "flash", "efficient": "memory-efficient", "math": "math (keeps the attention scores)"}
    why = (": the memory-efficient kernel takes no grouped KV heads and flash needs compute capability 8.0"
           if kernel == "math" and kv_heads != heads else "")
    return f"attention: sdpa, torch's {names[kernel]} kernel at compute capability {capability}{why}"


def fsdp_offload_words(search: SearchResult) -> str | None:
    """The host memory an FSDP2 CPU-offload winner holds (None for any other winner)."""
    chosen = search.chosen
    if chosen is None or chosen.config.deepspeed or chosen.config.offload == "none" or chosen.estimate is None:
        return None
    host = chosen.estimate.host_bytes
    return (f"FSDP2 CPU offload: {format_bytes(host)} of host memory per GPU{machine_share(host, chosen.config)} "
            "for the offloaded shards (weights and gradients pinned, optimizer state), not in the GPU total; give "
            "--host-memory SIZE to check it against the RAM of the machine you plan for")


def host_refusal(candidate: Candidate) -> bool:
    """Whether a "too big" candidate was refused for the host, not the GPU (`choose.host_problem`'s note)."""
    return "of host memory (all ranks)" in candidate.note or "NVMe offload needs" in candidate.note


def host_memory_words(estimate: Estimate) -> str | None:
    """What the host memory of `estimate` holds, for `memtune plan` (None when it holds none)."""
    if not estimate.host_bytes:
        return None
    held = format_bytes(estimate.host_bytes)
    if estimate.config.deepspeed:
        return (f"host memory {held} per GPU: {ladder.zero_words(estimate.config)}'s offloaded state (pinned, as "
                f"DeepSpeed {ladder.DEEPSPEED_VERSION} allocates it) with any offloaded activations, not in the GPU "
                "total")
    if estimate.config.offload != "none":
        return (f"host memory {held} per GPU: FSDP2's offloaded shards (weights and gradients pinned, optimizer "
                "state) with any offloaded activations, not in the GPU total")
    return (f"pinned host memory {held} per GPU: the offloaded inputs of the checkpointed layers, not in the GPU total "
            "(torch's pinned blocks, powers of two)")


def trl_arguments(config: TrainConfig) -> dict[str, Any]:
    """The SFTConfig / DPOConfig fields beyond TrainingArguments' that a TRL plan sets (`Plan.sft_config`,
    `Plan.dpo_config`): the batch layout and max_length of SFT, max_length and precomputed reference log-probs of
    DPO (per_device_train_batch_size counts preference pairs there); {} for the causal-LM step."""
    if config.trainer == "sft":
        return {"max_length": None if config.sft_batches == "padding-free" else config.seq_len,
                "packing": config.sft_batches == "packed", "padding_free": config.sft_batches != "padded"}
    if config.trainer == "dpo":
        return {"max_length": config.seq_len, "precompute_ref_log_probs": config.precompute_ref_log_probs}
    return {}


def python_snippet(config: TrainConfig) -> str:
    """transformers/peft code that sets what `config` chose (memtune run does all of it from the plan)."""
    adapter = config.adapter
    imports, body = ["from transformers import TrainingArguments"], []
    quantization = config.quantization
    if quantization is not None:  # QLoRA: the base loaded quantised, then peft's k-bit preparation
        dtype = f"torch.{ladder.TORCH_DTYPE_NAMES[config.weights_dtype]}"
        checkpointing = config.gradient_checkpointing
        imports = ["import torch",
                   "from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments",
                   "from peft import prepare_model_for_kbit_training"]
        body += [f"quantization_config = BitsAndBytesConfig({ladder.bnb_arguments(quantization)})",
                 f"model = AutoModelForCausalLM.from_pretrained(MODEL, dtype={dtype}, "
                 "quantization_config=quantization_config)",
                 f"model = prepare_model_for_kbit_training(model, use_gradient_checkpointing={checkpointing}"
                 + (', gradient_checkpointing_kwargs={"use_reentrant": False})' if checkpointing else ")")]
    elif config.weights_dtype != "fp32":
        dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[config.weights_dtype]
        imports = ["import torch", "from transformers import AutoModelForCausalLM, TrainingArguments"]
        body.append(f"model = AutoModelForCausalLM.from_pretrained(MODEL, dtype={dtype})")
    if config.expandable_segments:  # read once, when CUDA starts
        imports.insert(0, "import os")
        body.insert(0, 'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # before torch starts CUDA')
    if config.offload_activations:  # TrainingArguments of transformers 5.17 cannot offload
        body += ['model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, '
                 "offload=True)  # transformers >= 5.24; before: memtune.recipe.step.set_checkpointing(model, True, "
                 "offload=True)"]
    if config.checkpoint_layers is not None:  # TrainingArguments checkpoints every layer or none
        imports.append("from transformers.modeling_layers import GradientCheckpointingLayer")
        if not config.offload_activations:
            body.append('model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})'
                        "  # activation_checkpointing_enable from transformers 5.24")
        body += ["decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]",
                 f"for layer in decoder_layers[{config.checkpoint_layers}:]:  # checkpoint the first "
                 f"{config.checkpoint_layers} only",
                 "    layer.gradient_checkpointing = False"]
    if adapter is not None and adapter.kind == "lora":
        imports.append("from peft import LoraConfig, get_peft_model")
        body += ["model = get_peft_model(model, LoraConfig(",
                 f"    r={adapter.rank}, lora_alpha={adapter.alpha}, lora_dropout={adapter.dropout},",
                 f"    target_modules={_python(adapter.target_modules)}, task_type=\"CAUSAL_LM\",",
                 "))"]
    elif adapter is not None:
        imports.append("from peft import PrefixTuningConfig, get_peft_model")
        body.append(
            f"model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens={adapter.num_virtual_tokens}, "
            'task_type="CAUSAL_LM"))'
        )
    arguments_class = {"sft": "SFTConfig", "dpo": "DPOConfig"}.get(config.trainer, "TrainingArguments")
    if arguments_class != "TrainingArguments":  # TRL's own config, as Plan.sft_config / dpo_config build it
        imports = [line.replace(", TrainingArguments", "") for line in imports
                   if line != "from transformers import TrainingArguments"] + [f"from trl import {arguments_class}"]
    body += [f"args = {arguments_class}(", "    output_dir=\"out\","]
    for name, value in {**ladder.trainer_arguments(config), **trl_arguments(config)}.items():
        comment = ""
        if name == "gradient_checkpointing":
            comment = ("  # activation_checkpointing=True from transformers 5.24" if value else
                       "  # True would checkpoint every layer again" if config.checkpoint_layers is not None else
                       "  # True would checkpoint again without the offload" if config.offload_activations else "")
        body.append(f"    {name}={_python_argument(value)},{comment}")
    if config.eval_batch_size is not None:
        body += [f"    {name}={_python_argument(value)}," for name, value in evaluation_arguments(config).items()]
    body.append(")")
    missing = [name for name, on in (("the chunked loss", config.loss == "chunked"),
                                     ("Liger's fused loss", config.loss == "liger"),
                                     (f"offload of {config.offload}",
                                      config.offload != "none" and not config.deepspeed),
                                     ("FSDP over several GPUs", config.num_gpus > 1 and config.sharded),
                                     (f"DeepSpeed ZeRO-{config.zero.stage if config.zero else '?'} (accelerate launch)",
                                      config.deepspeed),
                                     (f"DDP over {config.num_gpus} GPUs (accelerate launch)", config.replicated)) if on]
    if missing:
        body.append(f"# no TrainingArguments flag for {' and '.join(missing)}: `memtune run PLAN` applies it")
    return "\n".join(imports + [""] + body)


def evaluation_line(estimate: Estimate) -> str | None:
    """One line on the planned evaluation (`Estimate.evaluation`): the eval batch, what it keeps of the logits and
    its predicted peak next to training's; None when no evaluation is planned."""
    evaluation = estimate.evaluation
    if evaluation is None:
        return None
    config = evaluation.config
    kept = {"none": "loss only", "accumulate_cpu": "logits to the host every step",
            "keep": f"logits kept over {config.eval_sequences or config.eval_batch_size} sequences"}[config.eval_logits]
    larger = "evaluation is the peak" if evaluation.peak_reserved_bytes > evaluation.train_peak_reserved_bytes \
        else "training is the peak"
    return (f"evaluation: eval batch {config.eval_batch_size} ({kept}), eval peak "
            f"{format_bytes(evaluation.total_bytes)} (reserved {format_bytes(evaluation.peak_reserved_bytes)}, "
            f"training's {format_bytes(evaluation.train_peak_reserved_bytes)}): {larger}")


def fit_command(result: FitResult) -> str:
    """`memtune fit MODEL --seq-len N --batch-size B`: the task of a result, without its options."""
    name = shlex.quote(result.source.name)
    return f"memtune fit {name} --seq-len {result.seq_len} --batch-size {result.effective_batch_size}"


def fit_commands(result: FitResult) -> list[str]:
    """The command lines that make this result again (with the options that pinned or forbade a
    choice) and run its plan."""
    command = fit_command(result)
    if result.policy is not None:
        command += "".join(f" {flag}" for flag in policy_flags(result.policy))
    budget = result.budget_bytes
    if budget is not None and (result.gpu is None or budget != result.gpu.budget_bytes):
        card = next(
            (name for name, size in KNOWN_GPUS.items() if size == budget and result.budget_label.startswith(name)), None
        )
        command += f" --gpu {card}" if card else f" --budget {budget_flag(budget)}"
    if result.data is not None:  # the data the plan was made for
        command += f" --data {shlex.quote(result.data.source)} --packing {result.data.packing}"
        if result.data.text_field != "text":
            command += f" --text-field {shlex.quote(result.data.text_field)}"
    planned = result.plan.train_config if result.plan is not None else None
    if planned is not None and planned.eval_batch_size is not None:  # the batch chosen, the logits as asked
        command += f" --eval-batch-size {planned.eval_batch_size} --eval-logits {planned.eval_logits}"
    if result.plan_path is not None and str(result.plan_path) != DEFAULT_PLAN_PATH:
        command += f" --plan-out {shlex.quote(str(result.plan_path))}"
    commands = [command]
    if result.plan_path is not None and (result.plan is None or result.plan.train_config.num_nodes == 1):
        commands.append(f"memtune run {shlex.quote(str(result.plan_path))}")
    elif result.plan_path is not None:  # `memtune run` refuses it: each machine launches its own config
        commands.append(f"on machine R: accelerate launch --config_file accelerate_machineR.yaml -m memtune run "
                        f"{shlex.quote(str(result.plan_path))} (see LAUNCH.txt next to the plan)")
    return commands


def gpu_lines(result: FitResult) -> list[str]:
    """The device the result was planned for, what other processes use of it, and the budget."""
    gpu = result.gpu
    if gpu is None:
        reason = result.probe.reason if result.probe is not None and result.probe.reason else "none is visible"
        if result.budget_bytes is None:
            return [f"no GPU: {reason}", "planned for common cards (predictions only)"]
        return [
            f"no GPU: {reason}",
            f"planned for {result.budget_label or 'budget ' + format_bytes(result.budget_bytes)}",
        ]
    others = f"{format_bytes(gpu.used_by_others_bytes)} used by {gpu.other_processes} other process" \
             f"{'es' if gpu.other_processes != 1 else ''}"
    lines = [
        f"GPU {gpu.index}: {gpu.name}, {format_bytes(gpu.total_bytes)} total, "
        f"{format_bytes(gpu.free_bytes)} free, {others}"
    ]
    budget = result.budget_bytes
    if budget is None or budget == gpu.budget_bytes:
        lines.append(f"planned for what this process may use: {format_bytes(gpu.budget_bytes)}")
    else:
        emulated = ", emulated on this GPU" if budget < gpu.budget_bytes else ""
        lines.append(f"planned for {result.budget_label or 'budget ' + format_bytes(budget)}{emulated} "
                     f"(this process may use {format_bytes(gpu.budget_bytes)})")
    return lines


def model_line(result: FitResult) -> str:
    source = result.source
    parts = [source.origin]
    if source.hub_id and source.hub_id != source.name:
        parts.append(source.hub_id)
    parts.append(f"{count_words(result.num_parameters)} parameters")
    layers = getattr(source.config, "num_hidden_layers", None)
    if layers:
        parts.append(f"{layers} layers")
    vocab = getattr(source.config, "vocab_size", None)
    if vocab:
        parts.append(f"vocab {vocab:,}")
    return f"model: {source.name} ({', '.join(parts)})"


def data_lines(data: DataPlan) -> list[str]:
    """The data section (`--data`): the documents' token lengths, how many --seq-len cuts, the batching mode and the
    worst batch the plan is made for, and what of it is not traced."""
    stats = data.lengths
    lines = [f"data: {data.source}: {stats.num_sequences:,} documents, {stats.total_tokens:,} tokens; tokenizer: "
             f"{data.tokenizer}",
             f"  lengths in tokens: p50 {stats.p50_tokens:,}, p90 {stats.p90_tokens:,}, p99 {stats.p99_tokens:,}, "
             f"max {stats.max_tokens:,}"]
    fate = ("split over blocks, nothing dropped" if data.packing == "concat"
            else f"truncated: {data.truncated_sequences:,} lose their tail")
    lines.append(f"  longer than --seq-len {data.seq_len:,}: {data.over_seq_len:,} of {stats.num_sequences:,} ({fate})")
    rows, row_tokens = data.worst_batch()
    micro = data.micro_batch_size or 1
    if data.micro_batch_size is None:  # no configuration chosen (one search per card): the shape per micro-batch
        lines.append(f"  batching: {data.packing}; worst batch micro-batch x {data.row_tokens:,} tokens per row"
                     + (" (padding-free: one row of as many tokens; the block-diagonal mask traced per row)"
                        if data.packing == "padding-free" else ""))
    elif data.packing == "padding-free":
        lines.append(f"  batching: padding-free; worst batch 1 x {row_tokens:,} tokens (the {micro} longest "
                     f"documents, budget {micro} x {data.seq_len:,}), traced as {micro} x {data.row_tokens:,}")
        lines.append(f"  mask: under SDPA, transformers builds a {row_tokens:,} x {row_tokens:,} block-diagonal mask "
                     f"from the position_ids ({format_bytes(data.mask_bytes)}) and SDPA runs its memory-efficient "
                     f"kernel, not flash: traced per row ({micro} x {data.row_tokens:,}), so the one big mask is "
                     "counted short; with --attn flash_attention_2 there is no mask")
    else:
        words = {"concat": "documents concatenated into --seq-len blocks",
                 "none": "one document per row, padded to the longest in the batch",
                 "bfd": "best-fit-decreasing packed rows (TRL), the fullest row"}[data.packing]
        lines.append(f"  batching: {data.packing} ({words}); worst batch {rows} x {row_tokens:,} tokens, traced as is")
    return lines


def task_line(result: FitResult) -> str:
    """The task in one line; under TRL's DPO the batch counts preference pairs, two sequences each."""
    pairs = result.policy is not None and result.policy.trainer == "dpo"
    tokens = result.seq_len * result.effective_batch_size * (2 if pairs else 1)
    batch = f"{result.effective_batch_size} pairs (chosen and rejected)" if pairs else f"{result.effective_batch_size}"
    return (f"task: {result.seq_len} tokens per sequence, effective batch {batch} "
            f"({tokens:,} tokens per optimizer step)")


def verification(result: FitResult) -> tuple[str, list[tuple[str, str, str, str]]]:
    """The chosen configuration's evidence: a heading, and rows (quantity, predicted, measured, error)
    where a trial measured it. Errors are (predicted - measured) / measured."""
    search = result.search
    if search is None or search.chosen is None:
        return "", []
    chosen = search.chosen
    trials = f"{search.trials} trial{'s' if search.trials != 1 else ''}, {search.trial_ooms} out of memory"
    measured = chosen.measured_total_bytes
    if chosen.measurement is None or not chosen.measurement.fits or measured is None:
        if result.gpu is None:
            return "not verified (no GPU): predictions only; run `memtune fit` where the GPU is to verify", []
        why = chosen.note.removeprefix("not verified: ") or "trial steps were not run"
        return f"not verified: {why}" + (f" ({trials})" if search.trials else ""), []
    heading = f"verified by trial steps on {result.gpu.name if result.gpu is not None else 'the GPU'} ({trials})"
    if result.gpu is not None and result.budget_bytes is not None and result.budget_bytes < result.gpu.budget_bytes:
        heading += f", under a per-process memory fraction emulating {format_bytes(result.budget_bytes)}"
    config, measurement = chosen.config, chosen.measurement
    accumulated = measurement.tokens_per_step // (config.micro_batch_size * config.seq_len * config.num_gpus)
    if 0 < accumulated < config.grad_accum_steps:  # verify.measure shortens long accumulations: the peak repeats
        heading += f"; each trial step ran {accumulated} of the {config.grad_accum_steps} accumulated micro-batches"
    predicted = chosen.predicted_total_bytes or 0
    rows = [
        ("peak memory", format_bytes(predicted), format_bytes(measured), f"{(predicted - measured) / measured:+.1%}")
    ]
    speed = chosen.measurement.tokens_per_second
    if speed and search.throughput_error is not None:
        rows.append(
            (
                "tokens/s",
                f"{chosen.predicted_tokens_per_second:,.0f}",
                f"{speed:,.0f}",
                f"{search.throughput_error:+.1%}",
            )
        )
    return heading, rows


def spare_words(usable_bytes: int, total_bytes: int) -> str:
    """What a fitting plan leaves of the usable memory, in words; a negative spare is explained (the verdict
    replays the step, and torch's allocator frees its cached blocks before it runs out: search/verdict.py)."""
    spare = usable_bytes - total_bytes
    if spare >= 0:
        return f"{format_bytes(spare)} to spare"
    return (f"the peak is {format_bytes(-spare)} over it, but it fits: torch's allocator frees its cached blocks "
            "under pressure and the replayed step never runs out (a little slower when it does)")


UNTRACED_REASONS = {
    SKIPPED: "each needs at least as much as one above (a larger micro-batch or one technique fewer)",
    EXTRAPOLATED: "extrapolated from a traced micro-batch of the same configuration, each is clearly over",
    STATE_ALONE: "their weights, gradients and optimizer state alone are over the budget (no trace needed)",
}


def untraced_counts(search: SearchResult) -> list[tuple[str, int, str]]:
    """(status, count, why) of the candidates the search judged without a prediction of their own
    (the slower ones it never reached excepted), in order of first appearance."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in search.candidates:
        if candidate.estimate is None and candidate.status != NOT_EVALUATED:
            groups.setdefault(candidate.status, []).append(candidate)
    return [(status, len(members), UNTRACED_REASONS.get(status, members[0].note)) for status, members in groups.items()]


def fits_word(alternative: Alternative, search: SearchResult) -> str:
    """The "fits" column of "why this one": yes, no, or "on release" for a step that fits only because the allocator
    releases its cache under pressure (its peak without pressure is over the usable budget)."""
    if not alternative.fits:
        return "no"
    return "on release" if alternative.predicted_total_bytes > search.usable_bytes else "yes"


def alternative_verdict(alternative: Alternative, search: SearchResult, reference: str = "the chosen") -> str:
    """What one rung changes: the memory it needs or saves, and its speed against the winner (`reference`: how the
    verdict names it; `memtune plan --explain` says "this one")."""
    chosen = search.chosen
    assert chosen is not None, "alternatives exist only beside a chosen configuration"
    delta = alternative.predicted_total_bytes - (chosen.predicted_total_bytes or 0)
    speed = (alternative.predicted_tokens_per_second / chosen.predicted_tokens_per_second - 1
             if chosen.predicted_tokens_per_second else 0.0)
    if speed >= 1:
        pace = f"{speed + 1:.1f}x as fast"
    else:
        pace = f"{abs(speed):.0%} {'faster' if speed > 0 else 'slower'}" if round(speed, 2) else "same speed"
    if not alternative.fits:
        more = (f"needs {format_bytes(delta)} more" if delta > 0 else
                (f"{format_bytes(-delta)} less than {reference}" if delta else "the same memory") + ", still too big"
                if chosen.status == TOO_BIG else
                "runs out of memory in the replay, freeing the cache does not save it (the chosen one's peak is "
                "higher, but it can be served after a cache release)")
        return f"does not fit: {more}" + (f" (it would be {pace})" if round(speed, 2) else "")
    if any(candidate.config == alternative.config and candidate.status == TRIAL_OOM for candidate in search.candidates):
        return f"predicted to fit, but ran out of memory in its trial ({pace})"
    if alternative.config == chosen.config.replace(expandable_segments=alternative.config.expandable_segments):
        if alternative.config.expandable_segments:
            return (f"fits ({format_bytes(-delta)} less than {reference}), same speed: the default allocator is kept "
                    "where both fit without releasing the cache" if delta < 0 else
                    f"fits ({format_bytes(delta)} more than {reference}), same speed")
        if alternative.predicted_total_bytes > search.usable_bytes:
            peak = format_bytes(alternative.predicted_total_bytes)
            return (f"fits only by releasing the allocator's cache (peak {peak} without, over the usable), same "
                    "speed: expandable segments fit without")
    memory = (
        f"{format_bytes(-delta)} less than {reference}"
        if delta < 0
        else f"{format_bytes(delta)} more than {reference}"
        if delta > 0
        else "same memory"
    )
    verdict = f"fits ({memory}), {pace}"
    if alternative.config.adapter is not None and chosen.config.adapter is None:
        verdict += ", but trains the adapter only"
    elif ladder.quality_rank(alternative.config)[0] > ladder.quality_rank(chosen.config)[0]:
        verdict += (", but rounds bf16 weights to nearest: updates below bf16's resolution are lost (the chosen "
                    "rounds stochastically; pin --optim to take it)")
    return verdict


def status_word(candidate: Candidate, search: SearchResult) -> str:
    """A candidate's status in the candidates table: "measured faster" / "measured slower" for the two measured
    because their predictions were too close to call (`SearchResult.measured_both`), else its status."""
    if search.measured_both and candidate is search.measured_both[0]:
        return MEASURED_FASTER
    if search.measured_both and candidate is search.measured_both[1]:
        return MEASURED_SLOWER
    return candidate.status


def measured_both_words(search: SearchResult) -> str:
    """Why two candidates were measured and which won, with both figures; "" when only one was."""
    if not search.measured_both:
        return ""
    faster, slower = search.measured_both
    assert faster.measurement is not None and slower.measurement is not None
    return (f"too close to call by prediction ({faster.predicted_tokens_per_second:,.0f} and "
            f"{slower.predicted_tokens_per_second:,.0f} tokens/s, within the speed model's {speed_error_band():.0%}): "
            f"both measured, {faster.config.describe()} {MEASURED_FASTER} at "
            f"{faster.measurement.tokens_per_second:,.0f} tokens/s, {slower.config.describe()} "
            f"{slower.measurement.tokens_per_second:,.0f}")


def searched_words(search: SearchResult) -> str:
    """The search's cost in one line, the explanation's seconds apart (`SearchResult.explain_seconds`)."""
    line = f"searched in {search.seconds:.1f} s: {search.estimates} memory predictions, {search.trials} trials"
    if search.explain_seconds:
        line += (f" (of which {search.explain_seconds:.1f} s explaining the choice, {len(search.alternatives)} "
                 "alternatives, after the plan was saved)")
    return line
