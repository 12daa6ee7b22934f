"""The quantised base (QLoRA): a causal LM whose linear layers bitsandbytes stores in 4 or 8 bits.

The module tree is transformers' own: its bitsandbytes quantizer (`AutoHfQuantizer.from_config(
BitsAndBytesConfig(...))`, `preprocess_model` -> `replace_with_bnb_linear`) swaps every linear layer but the
LM head (and whatever else transformers keeps, `get_keys_to_not_convert`) for `bnb.nn.Linear4bit` /
`Linear8bitLt`, as `from_pretrained(quantization_config=...)` does. On a real device the weights are then
quantised from the model's own (random) weights, layer by layer, as transformers' loader quantises each
checkpoint tensor (`integrations/bitsandbytes.py` Bnb4bitQuantize / Bnb8bitQuantize); on the meta device the
modules stay empty (predict/quantized.py gives them packed fake weights). Then peft's
`prepare_model_for_kbit_training` freezes the base and casts its 16-bit weights that bitsandbytes does not hold
(norms, embeddings, LM head) to fp32, as QLoRA recipes run it.

bitsandbytes is an optional extra, imported only here and in predict/quantized.py: `require_bitsandbytes`
says how to install it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from memtune.config import Quantization, TrainConfig
from memtune.errors import UsageError

INSTALL_HINT = 'pip install -e ".[quant]"'
"""The command that installs the optional extra (bitsandbytes) from a checkout of memtune."""

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def import_bitsandbytes() -> Any:
    """`import bitsandbytes`, without the warning its CPU backend logs on a CPU with AVX512-BF16 when the optional
    `kernels` package is missing ("Failed to load CPU gemm_4bit_forward", bitsandbytes/backends/cpu/ops.py): memtune
    runs no 4-bit matmul on the CPU. Raises what the import raises."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def require_bitsandbytes() -> Any:
    """The bitsandbytes module. Raises UsageError (exit 2) with the install command when it is missing or
    cannot be imported."""
    try:
        bitsandbytes = import_bitsandbytes()
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken build failing at import
        raise UsageError(f"a quantised base (QLoRA) needs bitsandbytes, which cannot be imported here "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                         f"install it with {INSTALL_HINT}") from None
    return bitsandbytes


def bnb_config(quantization: Quantization) -> Any:
    """transformers.BitsAndBytesConfig of `quantization`: what `from_pretrained(quantization_config=...)` takes."""
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.use_double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[quantization.compute_dtype],
    )


def quantize_model(model: nn.Module, quantization: Quantization, device: str | torch.device | None = None,
                   init_std: float | None = None) -> nn.Module:
    """Swap `model`'s linear layers for bitsandbytes' through transformers' quantizer, in place; on a real device
    quantise each from the layer's current weight (which is then freed). Returns the model, marked as
    transformers marks a quantised one (`hf_quantizer`, `is_loaded_in_4bit` / `is_loaded_in_8bit`).

    `device`: where the quantised weights go (default: where each layer's weight is). With `init_std`, each
    weight is first moved there and drawn from N(0, init_std) (transformers' Linear init), one layer at a time:
    a model built on the CPU without initialisation then never holds its 16-bit linear weights on the GPU,
    as `from_pretrained(quantization_config=...)` never does (`recipe.step.build_model`)."""
    bnb = require_bitsandbytes()
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(quantization), pre_quantized=False)
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=None)
    for name, old in linears.items():
        new = model.get_submodule(name)
        if new is old or old.weight.device.type == "meta":
            continue  # kept (the LM head), or built on the meta device: no weights to quantise
        target = torch.device(device) if device is not None else old.weight.device
        weight = old.weight.data
        if init_std is not None:
            weight = weight.to(target).normal_(0.0, init_std)
        if isinstance(new, bnb.nn.Linear4bit):
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, **new.weight.__dict__).to(target)
        else:
            settings = {key: value for key, value in new.weight.__dict__.items() if key != "SCB"}
            new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **settings).to(target)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(target).zero_() if init_std is not None else old.bias.data,
                                    requires_grad=False)
        del weight
        del old.weight, old.bias  # free the full-precision weight now, as the loader never holds it
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def prepare_for_kbit_training(model: nn.Module, train_config: TrainConfig) -> nn.Module:
    """peft's `prepare_model_for_kbit_training` as QLoRA recipes call it: the base frozen, its 16-bit weights
    outside bitsandbytes cast to fp32, non-reentrant checkpointing when the configuration checkpoints."""
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        # transformers 5.24 renamed gradient_checkpointing_enable, which peft 0.21 calls (set_checkpointing's note)
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train_config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
