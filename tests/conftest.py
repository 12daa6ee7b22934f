"""Shared test setup: no test may reach the network, and GPU tests skip on machines without CUDA."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Every test traces afresh (some patch the tracer); tests/test_cache.py turns the disk cache on in a temporary dir.
os.environ["MEMTUNE_NO_CACHE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Two threads on a small shared CI machine are several times slower than one for tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer llama with random weights and memtune's sample tokenizer, saved like a hub model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from memtune.run import data as data_module

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = data_module.sample_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
