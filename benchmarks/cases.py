"""The accuracy cases: >=5 architectures x {fp32, bf16-mixed} x checkpointing x LoRA x 2 batch sizes.

Models are catalog configs with random weights; the two largest are cut to fewer layers so fp32
full fine-tuning fits one 80 GB card (the per-layer shapes are the published ones).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from memtune.config import Adapter, TrainConfig


@dataclass(frozen=True)
class Case:
    model: str
    num_layers: int | None
    """None keeps the published depth."""
    config: TrainConfig

    @property
    def name(self) -> str:
        layers = f"[{self.num_layers}L]" if self.num_layers else ""
        c = self.config
        lora = "+lora" if c.adapter else ""
        ckpt = "+ckpt" if c.gradient_checkpointing else ""
        return f"{self.model}{layers} {c.micro_batch_size}x{c.seq_len} {c.precision}{ckpt}{lora}"


ARCHITECTURES = [
    # (catalog hub id, layers or None, seq_len, two micro-batch sizes)
    ("gpt2", None, 512, (4, 8)),
    ("Qwen/Qwen2.5-0.5B", None, 1024, (2, 4)),
    ("meta-llama/Llama-3.2-1B", None, 1024, (2, 4)),
    ("google/gemma-2-2b", 6, 1024, (1, 2)),
    ("microsoft/Phi-3-mini-4k-instruct", 8, 1024, (2, 4)),
]
PRECISIONS = {"fp32": ("fp32", "none"), "bf16-mixed": ("fp32", "bf16")}


def accuracy_cases() -> list[Case]:
    cases = []
    for (model, layers, seq_len, batches), precision, ckpt, lora, batch in itertools.product(
        ARCHITECTURES, PRECISIONS, (False, True), (False, True), (0, 1)
    ):
        weights, amp = PRECISIONS[precision]
        config = TrainConfig(
            seq_len=seq_len,
            micro_batch_size=batches[batch],
            weights_dtype=weights,
            amp=amp,
            gradient_checkpointing=ckpt,
            adapter=Adapter() if lora else None,
        )
        cases.append(Case(model, layers, config))
    # LoRA on a base stored in bf16, the usual way people run it.
    for (model, layers, seq_len, batches), ckpt in itertools.product(ARCHITECTURES, (False, True)):
        config = TrainConfig(seq_len=seq_len, micro_batch_size=batches[1], weights_dtype="bf16",
                             gradient_checkpointing=ckpt, adapter=Adapter())
        cases.append(Case(model, layers, config))
    return cases


def model_config(case: Case):
    from memtune.sources import catalog_config

    config = catalog_config(case.model)
    if case.num_layers:
        config.num_hidden_layers = case.num_layers
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[: case.num_layers]
    return config


def tiny_llama(layers: int = 2) -> Any:
    """A Llama-3.2-1B-shaped config shrunk to hidden 64, 4 heads (2 KV), vocabulary 256 and `layers`
    decoder layers: random weights, built and traced in a moment on the CPU (tests and benchmarks)."""
    from memtune.sources import catalog_config

    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 256
    config.num_hidden_layers = layers
    config.bos_token_id = config.eos_token_id = 0
    return config


# hidden 64, 4 heads of 16 (2 KV heads), MLP 128, 2 layers, vocabulary 256: every special token id inside
# it (some configs default to ids of the full vocabulary, e.g. phi3's pad_token_id 32000).
TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256, **TOKENS}
WITH_HEAD_DIM = {**DECODER, "head_dim": 16}

TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": WITH_HEAD_DIM,
    "gemma": WITH_HEAD_DIM,
    "gemma2": WITH_HEAD_DIM,
    "gemma3_text": WITH_HEAD_DIM,
    "phi3": DECODER,
    "olmo2": DECODER,
    "granite": DECODER,
    "cohere": DECODER,
    "starcoder2": DECODER,
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 256,
            "word_embed_proj_dim": 64, "max_position_embeddings": 256, **TOKENS},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "vocab_size": 256, "max_position_embeddings": 256, **TOKENS},
    "falcon": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 256, **TOKENS},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 256, "n_positions": 256, **TOKENS},
    "mixtral": {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**WITH_HEAD_DIM, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "qwen2_moe": {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
    "phi": {**DECODER},
    "stablelm": {**DECODER},
    "olmo": {**DECODER},
    "gptj": {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 256, "n_positions": 256, "rotary_dim": 8,
             **TOKENS},
}
"""Tiny configs (transformers config-class keyword arguments) of causal-LM architectures, for
tests/test_architectures.py and benchmarks/paths_agree.py."""
