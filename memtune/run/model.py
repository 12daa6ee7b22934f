"""The model a run trains, as the plan says: `load_model` (hub, local directory or catalog config; the plan's weights
dtype, quantisation and attention), `has_weights` (does a local directory hold weights), and `default_output_dir`
(where a run writes without --output-dir). Both run paths use them: `run.runner` (memtune's causal-LM step) and
`run.trl_run` (TRL's trainers)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from memtune.config import TrainConfig
from memtune.recipe import step as recipe

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
"""The files of a directory saved with save_pretrained that hold weights (safetensors, or the older PyTorch pickles)."""


def load_model(source: Any, train_config: TrainConfig, device: torch.device | str) -> tuple[Any, str, bool]:
    """(model, where its weights came from, whether they are pretrained) for a `sources.ModelSource`,
    in the plan's weights dtype, quantised as the plan says (transformers' BitsAndBytesConfig, recipe/quant.py),
    with the plan's attention implementation. Pretrained weights load on the CPU (Trainer moves them); random ones
    (a catalog config, or a local config.json without weights) are built on `device`. Raises UsageError with the
    install command when the plan quantises and bitsandbytes is missing."""
    from transformers import AutoModelForCausalLM

    from memtune.recipe import quant

    dtype = recipe.TORCH_DTYPES[train_config.weights_dtype]
    quantization = train_config.quantization
    extra = {} if quantization is None else {"quantization_config": quant.bnb_config(quantization)}
    extra.update(recipe.attention_arguments(train_config, device))  # the plan's --attn, as it was traced
    if quantization is not None:
        quant.require_bitsandbytes()
    if source.origin == "local" and source.path is not None and has_weights(source.path):
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, trust_remote_code=source.trust_remote_code, **extra
        )
        return model, f"weights from {source.path}", True
    if source.origin == "hub":
        model = AutoModelForCausalLM.from_pretrained(
            source.hub_id, dtype=dtype, trust_remote_code=source.trust_remote_code, **extra
        )
        return model, f"weights from the hub ({source.hub_id})", True
    with torch.device(device):  # random weights straight on the device: no copy, faster init on a GPU
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype,
                                                 **recipe.attention_arguments(train_config, device))
    if quantization is not None:
        quant.quantize_model(model, quantization)  # in place
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the untied head weight that tie_weights freed: see measure.verify.measure
    why = "a catalog config" if source.origin == "catalog" else f"{source.path} has config.json but no weights"
    return model, (f"random initialisation ({why}): a real fine-tune needs the weights; "
                   "use a hub id or a local directory saved with save_pretrained"), False


def has_weights(path: Path) -> bool:
    """Whether the directory `path` holds weights (`WEIGHT_FILES`), not only a config."""
    return any(any(Path(path).glob(pattern)) for pattern in WEIGHT_FILES)


def default_output_dir(model: str) -> Path:
    """memtune-runs/NAME for the model `model` (hub id, path or catalog name): its last path part, with every run of
    characters other than letters, digits, '.', '_' and '-' made one '-' (a safe directory name)."""
    name = Path(model.rstrip("/")).name or "model"
    return Path("memtune-runs") / re.sub(r"[^A-Za-z0-9._-]+", "-", name)
