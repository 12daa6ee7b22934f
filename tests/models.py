"""Small model configs shared by tests (random weights, built in a moment on the CPU)."""

from __future__ import annotations

from memtune.sources import catalog_config


def tiny_llama(layers: int = 2):
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 256
    config.num_hidden_layers = layers
    config.bos_token_id = config.eos_token_id = 0
    return config
