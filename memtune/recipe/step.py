"""The training step that memtune predicts, verifies and runs: one recipe, shared by all stages.

`trace` runs it on fake tensors, `verify` on the GPU with random weights, and `runner`'s Trainer
is configured to do the same thing (fused AdamW, autocast, non-reentrant checkpointing, peft).
Keeping a single definition is what makes predicted and measured peaks comparable.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from memtune.config import (
    BITSANDBYTES_OPTIMIZERS,
    DEFAULT_OPTIMIZER,
    EIGHT_BIT_OPTIMIZERS,
    OPTIMIZERS,
    QUANT_EXTRA_HINT,
    TORCHAO_OPTIMIZERS,
    TrainConfig,
    bitsandbytes_available,  # noqa: F401 - re-exported: callers and tests reach it here
    require_extra,
    torchao_available,  # noqa: F401 - re-exported, as bitsandbytes_available
)
from memtune.errors import UsageError
from memtune.recipe import quant
from memtune.recipe.loss import (  # noqa: F401 - uses_chunked_loss re-exported (run.runner)
    loss_of,
    use_chunked_loss,
    uses_chunked_loss,
)
from memtune.sources import custom_code

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(
    model_config: Any, train_config: TrainConfig, device: str | torch.device, *, initialise: bool = True
) -> nn.Module:
    """A causal LM with random weights from `model_config`, created directly on `device`.

    Under a fake-tensor or meta device this costs no memory and no initialisation time.
    initialise=False leaves the weights uninitialised (fast on the CPU; the caller fills them), still
    tied as the config says: transformers' `no_init_weights` skips `tie_weights` too, and an untied
    head is another vocabulary-sized parameter with its own gradient and optimizer state.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if train_config.quantization is not None and torch.device(device).type != "meta":
        return prepare_model(_build_quantized(model_config, train_config, device, initialise), train_config)
    with torch.device(device), contextlib.nullcontext() if initialise else no_init_weights():
        # explicit, so transformers never prompts: a custom-code config exists only if the user trusted it
        model = AutoModelForCausalLM.from_config(model_config, dtype=TORCH_DTYPES[train_config.weights_dtype],
                                                 trust_remote_code=custom_code(model_config),
                                                 **attention_arguments(train_config, device))
    if not initialise:
        model.tie_weights()
    if train_config.quantization is not None:
        # as from_pretrained(quantization_config=BitsAndBytesConfig(...)) loads it (recipe/quant.py)
        model = quant.quantize_model(model, train_config.quantization)
    return prepare_model(model, train_config)


TRACED_AS = {"flash_attention_2": "sdpa"}
"""Attention implementations whose kernels cannot run on fake tensors, and what stands in for them in a trace:
flash-attn's `flash_attn_func` keeps the output and the logsumexp, as torch's flash SDPA kernel (torch vendors
the same FlashAttention-2 code, aten/src/ATen/native/transformers/cuda/flash_attn), which is what the sdpa trace
picks on the sm80+ card flash-attn needs with the unpadded batches memtune traces."""


def attention_arguments(train_config: TrainConfig, device: str | torch.device) -> dict[str, str]:
    """The `attn_implementation=` keyword for transformers' from_config / from_pretrained: {} for None (the model
    config's own, else transformers' default); on the meta or a fake device the stand-in `TRACED_AS` names."""
    if train_config.attn is None:
        return {}
    if torch.device(device).type == "meta":
        return {"attn_implementation": TRACED_AS.get(train_config.attn, train_config.attn)}
    return {"attn_implementation": train_config.attn}


def _build_quantized(model_config: Any, train_config: TrainConfig, device: str | torch.device,
                     initialise: bool) -> nn.Module:
    """The quantised base on a real device without ever holding its 16-bit linear weights there: built on the
    CPU uninitialised, each linear layer moved, drawn and quantised one at a time (`quant.quantize_model`), then
    the rest (embeddings, norms, the LM head) moved and initialised by the model's own `_init_weights`. The peak
    is the quantised model plus one 16-bit layer, as when `from_pretrained(quantization_config=...)` quantises a
    checkpoint tensor by tensor; building the 16-bit model on the GPU first needed all of it (Mistral-7B:
    13.5 GiB, so a 4-bit trial could not even start on a 12 GiB card, H200 under a 12 GiB ballast)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    assert train_config.quantization is not None
    with torch.device("cpu"), no_init_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=TORCH_DTYPES[train_config.weights_dtype],
                                                 trust_remote_code=custom_code(model_config),
                                                 **attention_arguments(train_config, device))
    model.tie_weights()
    std = getattr(model_config, "initializer_range", None) or 0.02
    model = quant.quantize_model(model, train_config.quantization, device=device,
                                 init_std=std if initialise else None)
    model.to(device)
    if initialise:
        causal_lm = cast("PreTrainedModel", model)
        with torch.no_grad():
            for module in causal_lm.modules():
                if not type(module).__module__.startswith("bitsandbytes"):  # quantised layers were drawn above
                    causal_lm._init_weights(module)
        causal_lm.tie_weights()
    return model


def offloaded_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint` whose saved tensors (the layer's positional inputs, the hidden states:
    transformers binds the keyword arguments, rotary cos/sin and mask, into the checkpointed function; non-reentrant
    checkpointing saves nothing else) are kept in pinned host memory until the recomputation: transformers 5.24's
    `activation_checkpointing_enable(offload=True)` (modeling_utils.py `_activation_checkpointing_enable`), written
    out here so that 5.17 does the same and the trace can put its twin in the same place (`trace.offload_to_host`).
    `save_on_cpu` copies each tensor to a pinned buffer (torch's caching host allocator) asynchronously on the
    compute stream, and back when the backward recomputes the layer; without CUDA the copies are plain CPU ones."""
    from torch.autograd.graph import save_on_cpu
    from torch.utils.checkpoint import checkpoint

    with save_on_cpu(pin_memory=True, device_type="cuda"):
        return checkpoint(function, *args, **kwargs)


def set_checkpointing(model: Any, enabled: bool, layers: int | None = None, offload: bool = False) -> None:
    """Switch non-reentrant activation checkpointing on or off, in place: of every decoder layer, or with
    `layers` of the first `layers` decoder layers only; `offload` keeps the checkpointed layers' inputs in pinned
    host memory (`offloaded_checkpoint`, set as each layer's `_gradient_checkpointing_func`, the function
    transformers' layers call).

    transformers 5.24 renamed `gradient_checkpointing_enable/disable` to `activation_checkpointing_enable/
    disable` (the old names warn); 5.17 has only the old ones. Both set a `gradient_checkpointing` flag on each
    `GradientCheckpointingLayer` (modeling_utils `_set_gradient_checkpointing`), which each layer's forward reads
    when it runs; `layers` then clears it on the decoder layers after the first `layers`, counted in module
    order as 5.24's `every_n_layers` counts them. The first ones stay checkpointed because their backward runs
    last: the recomputation then never overlaps the saved activations of the layers above, already freed.
    Non-reentrant checkpointing needs no input that requires grad, so it works with frozen LoRA bases. Turns
    the KV cache off (unused in training)."""
    if enabled:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if offload:
            for module in model.modules():
                if hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, use_reentrant=False)
        if layers is not None:
            from transformers.modeling_layers import GradientCheckpointingLayer

            decoder = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
            for module in decoder[layers:]:
                module.gradient_checkpointing = False
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    if hasattr(model, "config"):
        model.config.use_cache = False


def prepare_model(model: nn.Module, train_config: TrainConfig) -> nn.Module:
    """Apply gradient checkpointing, the loss and the adapter of `train_config` to an existing model (a
    transformers `PreTrainedModel`); returns it, or the peft model around it. The chunked loss replaces the
    causal LM's forward (`recipe.loss.use_chunked_loss`), so that every caller of `model(input_ids=...,
    labels=...)` (the trace, the trials, DDP's and FSDP's wrappers, Trainer) gets it. Raises UsageError for the
    chunked loss on a model whose logits are rescaled in a way not known (`recipe.loss.logit_scale_of`)."""
    causal_lm = cast("PreTrainedModel", model)
    causal_lm.train()
    if train_config.quantization is not None:
        causal_lm = cast("PreTrainedModel", quant.prepare_for_kbit_training(causal_lm, train_config))
    if train_config.gradient_checkpointing:
        set_checkpointing(causal_lm, True, train_config.checkpoint_layers, train_config.offload_activations)
    if hasattr(causal_lm, "config"):
        causal_lm.config.use_cache = False
    if train_config.loss != "standard":
        use_chunked_loss(causal_lm, kind=train_config.loss)
    adapter = train_config.adapter
    if adapter is None:
        return causal_lm
    import peft

    with warnings.catch_warnings():
        # peft 0.21 reads is_gradient_checkpointing, which transformers 5.24 deprecated (set_checkpointing's note)
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
        return peft.get_peft_model(causal_lm, peft_config(train_config),
                                   autocast_adapter_dtype=adapter.autocast_adapter_dtype)


def peft_config(train_config: TrainConfig) -> Any:
    """The peft config (LoraConfig / PrefixTuningConfig) for the plan's adapter."""
    import peft

    adapter = train_config.adapter
    if adapter is None:
        return None
    if adapter.kind == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens)
    targets = adapter.target_modules if isinstance(adapter.target_modules, str) else list(adapter.target_modules)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
    )


# transformers.TrainingArguments' defaults (5.24), which Trainer passes to every optimizer it builds.
TRAINER_LEARNING_RATE = 5e-5
TRAINER_ADAM_KWARGS = {"betas": (0.9, 0.999), "eps": 1e-8}
TRAINER_WEIGHT_DECAY = 0.0
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
"""Trainer.get_decay_parameter_names's forbidden name patterns (transformers 5.24 trainer.py)."""


def optimizer_class_and_kwargs(optimizer: str, stochastic_rounding: bool = False) -> tuple[Any, dict[str, Any]]:
    """(class, keyword arguments) of the optimizer Trainer builds for `TrainingArguments(optim=optimizer)` (and
    `optim_args="bf16_stochastic_round=True"` with `stochastic_rounding`, torchao's only) with
    the default learning rate and Adam betas/eps: transformers 5.24 trainer_optimizer.py `_get_adamw_torch`,
    `_get_bitsandbytes_optimizer`, `_get_adafactor`, `_get_torchao_optimizer` (tests/test_optimizers.py compares with
    `Trainer.get_optimizer_cls_and_kwargs`). Raises UsageError for an unknown name or a missing extra."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    require_extra(optimizer)
    kwargs: dict[str, Any] = {"lr": TRAINER_LEARNING_RATE}
    if optimizer in ("adamw_torch_fused", "adamw_torch"):
        kwargs.update(TRAINER_ADAM_KWARGS)
        if optimizer == "adamw_torch_fused":
            kwargs["fused"] = True
        return torch.optim.AdamW, kwargs
    if optimizer == "adafactor":
        from transformers.optimization import Adafactor

        kwargs.update({"scale_parameter": False, "relative_step": False})
        return Adafactor, kwargs
    if optimizer in TORCHAO_OPTIMIZERS:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit
        except Exception as error:  # ImportError, or a torchao built for another torch
            raise UsageError(f"optimizer {optimizer} needs torchao >= 0.11, which fails to import ({error}): "
                             f"reinstall it with {QUANT_EXTRA_HINT}, or choose --optim adamw_torch_fused") from None
        # trainer_optimizer.py `_get_torchao_optimizer`: block_size 256 for both (AdamW4bit's own default is 128)
        kwargs.update({"block_size": 256, "bf16_stochastic_round": stochastic_rounding, **TRAINER_ADAM_KWARGS})
        return (AdamW4bit if optimizer == "adamw_torch_4bit" else AdamW8bit), kwargs
    try:
        bitsandbytes = quant.import_bitsandbytes()
    except Exception as error:  # ImportError, or its native library failing to load (OSError, RuntimeError)
        raise UsageError(f"optimizer {optimizer} needs bitsandbytes, which fails to import ({error}): "
                         f"reinstall it with {QUANT_EXTRA_HINT}, or choose --optim adamw_torch_fused") from None
    kwargs.update(TRAINER_ADAM_KWARGS)
    kwargs.update({"optim_bits": 8 if "8bit" in optimizer else 32, "is_paged": "paged" in optimizer})
    return bitsandbytes.optim.AdamW, kwargs


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainer.create_optimizer's two groups of trainable parameters: with weight decay, and without (biases
    and norms); both at Trainer's default weight_decay 0.0, in the model's parameter order."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [
        {"params": [param for name, param in named if name in decay], "weight_decay": TRAINER_WEIGHT_DECAY},
        {"params": [param for name, param in named if name not in decay], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, train_config: TrainConfig | None = None, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The optimizer `train_config.optimizer` names, over the trainable parameters, as transformers' Trainer
    builds it (`optimizer_class_and_kwargs`, `parameter_groups`; for 8-bit bitsandbytes optimizers also
    Trainer's override that keeps every nn.Embedding's weight in 32-bit state).

    `fused` applies to adamw_torch_fused only: None fuses where the parameters are on CUDA (the CPU runs of
    the tests step unfused), True/False force it (the trace fuses on fake CPU tensors too). The state of the
    8-bit override lives in a GlobalOptimManager of this optimizer's own, not bitsandbytes' process-wide one
    (whose parameter ids would outlive the model). Raises UsageError when bitsandbytes is needed and missing."""
    name = train_config.optimizer if train_config is not None else DEFAULT_OPTIMIZER
    cls, kwargs = optimizer_class_and_kwargs(name, train_config is not None and train_config.stochastic_rounding)
    groups = parameter_groups(model)
    if name == "adamw_torch_fused":
        params = [p for group in groups for p in group["params"]]
        kwargs["fused"] = (bool(params) and params[0].device.type == "cuda") if fused is None else fused
    optimizer = cls(groups, **kwargs)
    if name in EIGHT_BIT_OPTIMIZERS & BITSANDBYTES_OPTIMIZERS:
        from bitsandbytes.optim import GlobalOptimManager

        manager = GlobalOptimManager.__new__(GlobalOptimManager)
        manager.initialize()
        for module in model.modules():
            if isinstance(module, nn.Embedding):  # Trainer.create_optimizer (optim_bits == 8)
                manager.register_module_override(module, "weight", {"optim_bits": 32})
        optimizer.mng = manager
    return optimizer


def amp_context(train_config: TrainConfig, device_type: str) -> contextlib.AbstractContextManager:
    if train_config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=TORCH_DTYPES[train_config.amp])


class _LinearSavingInput(torch.autograd.Function):
    """F.linear as DeepSpeed ZeRO-3 replaces it (deepspeed/runtime/zero/linear.py `LinearFunctionForZeroStage3`,
    installed by zero.Init while `zero_optimization.memory_efficient_linear` is on, its default): the same product,
    but the input and weight are saved for backward whether the weight is trainable or not."""

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if input.dim() == 2 and bias is not None:
            return torch.addmm(bias, input, weight.t())
        output = input.matmul(weight.t())
        if bias is not None:
            output += bias
        return output

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, weight, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
        ctx.save_for_backward(input, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        dim = grad_output.dim()
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(input.reshape(-1, input.shape[-1]))
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(list(range(dim - 1)))
        return grad_input, grad_weight, grad_bias


def _linear_saving_input(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _LinearSavingInput.apply(input, weight, bias)


@contextlib.contextmanager
def linear_context(train_config: TrainConfig) -> Iterator[None]:
    """Within it, every `torch.nn.functional.linear` keeps its input for backward even under a frozen weight, as
    DeepSpeed ZeRO-3 makes it (`_LinearSavingInput`), when the plan's adapter says its frozen base runs so
    (`Adapter.base_saves_input`, set by memtune's ZeRO-3 prediction); otherwise nothing changes. For the trace:
    DeepSpeed itself patches the function in a real run."""
    adapter = train_config.adapter
    if adapter is None or not adapter.base_saves_input:
        yield
        return
    original = torch.nn.functional.linear
    torch.nn.functional.linear = _linear_saving_input
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def random_batch(model_config: Any, train_config: TrainConfig, device: str | torch.device) -> torch.Tensor:
    """The input_ids of one micro-batch: micro_batch_size rows of seq_len random token ids."""
    vocab = int(getattr(model_config, "vocab_size", 32000))
    shape = (train_config.micro_batch_size, train_config.seq_len)
    return torch.randint(0, vocab, shape, device=device)


def packed_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """position_ids of packed rows (`TrainConfig.packed_rows`): every row holds two documents, the first ceil(L/2) of
    its L tokens and the rest, the positions restarting at 0 where the second begins (TRL's
    `get_position_ids_from_packed_seq_lengths`, `run.data.positions_of`): 0 1 .. h-1 0 1 .. L-h-1.

    How many documents share a row and where they start changes no tensor's size: transformers materialises the
    same rows x 1 x L x L mask for any split (masking_utils `sdpa_mask` with `find_packed_sequence_indices`), so two
    stand for any packed row. A row of one token holds one document (nothing restarts)."""
    length = input_ids.shape[-1]
    half = (length + 1) // 2
    positions = torch.arange(length, device=input_ids.device)
    positions = torch.where(positions >= half, positions - half, positions)
    return positions.expand(input_ids.shape[0], length)


def forward_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, train_config: TrainConfig
) -> torch.Tensor:
    """The mean next-token loss of one micro-batch: the model's own forward, `model(input_ids=..., labels=...)`,
    whether `model` is the causal LM, its peft model, or a DDP / FSDP2 wrapper of either.

    With `train_config.loss` "chunked" the causal LM's forward computes the LM head and cross-entropy a chunk of
    tokens at a time (`recipe.loss.use_chunked_loss`, which `prepare_model` applies; applied here when missing, for a
    model built without it); "liger", Liger-Kernel's fused linear cross-entropy in the
    same forward; "standard" computes all logits at once. Same value and gradients. Raises ValueError when the
    model's forward computes another loss than `train_config.loss` (it cannot be undone: build the model again).
    """
    if train_config.loss != "standard" and loss_of(model) == "standard":
        use_chunked_loss(model, kind=train_config.loss)
    elif loss_of(model) != train_config.loss:
        raise ValueError(f"forward_loss: train_config asks for the {train_config.loss} loss, but this model's forward "
                         f"computes the {loss_of(model)} one (recipe.loss.use_chunked_loss): build it with "
                         f"loss={train_config.loss!r}")
    if train_config.packed_rows:  # several documents per row: positions restart, no attention_mask (run.data)
        return model(input_ids=input_ids, labels=labels, position_ids=packed_position_ids(input_ids)).loss
    return model(input_ids=input_ids, labels=labels).loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor] | list[torch.Tensor],
    train_config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    device_type: str = "cuda",
    read_loss: bool = True,
) -> float:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the summed loss.

    `read_loss=False` skips reading the loss back (fake tensors have no values).
    """
    total = 0.0
    accum = train_config.grad_accum_steps
    for input_ids in batches:
        with amp_context(train_config, device_type):
            loss = forward_loss(model, input_ids, input_ids, train_config) / accum
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if read_loss:
            total += float(loss.detach())
        del loss
    optimizer_step(optimizer, scaler)
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """Step (through the GradScaler for fp16) and free the gradients, as Trainer does."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
