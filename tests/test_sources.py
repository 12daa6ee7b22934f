"""MODEL -> config: the catalog, catalog lookups, local directories and the not-found error.

conftest.py sets HF_HUB_OFFLINE=1 for the whole session, so nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from memtune import sources
from memtune.errors import ModelNotFoundError, UsageError

# Published sizes (model cards, or the sum of the safetensors shapes); the catalog must reproduce
# them within 1% when built on the meta device.
EXPECTED_PARAMETERS = {
    "gpt2": 124.4e6,
    "gpt2-medium": 354.8e6,
    "gpt2-large": 774.0e6,
    "gpt2-xl": 1.558e9,
    "HuggingFaceTB/SmolLM2-135M": 134.5e6,
    "HuggingFaceTB/SmolLM2-360M": 361.8e6,
    "HuggingFaceTB/SmolLM2-1.7B": 1.711e9,
    "Qwen/Qwen2.5-0.5B": 0.494e9,
    "Qwen/Qwen2.5-1.5B": 1.54e9,
    "Qwen/Qwen2.5-3B": 3.09e9,
    "Qwen/Qwen2.5-7B": 7.62e9,
    "meta-llama/Llama-3.2-1B": 1.24e9,
    "meta-llama/Llama-3.2-3B": 3.21e9,
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "google/gemma-2-2b": 2.61e9,
    "google/gemma-2-9b": 9.24e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "mistralai/Mistral-7B-v0.3": 7.25e9,
}


@pytest.fixture(scope="module")
def entries() -> dict[str, sources.CatalogEntry]:
    return {entry.hub_id: entry for entry in sources.catalog()}


def test_catalog_holds_every_expected_model(entries):
    assert set(EXPECTED_PARAMETERS) <= set(entries)


@pytest.mark.parametrize("hub_id", sorted(EXPECTED_PARAMETERS))
def test_catalog_parameter_counts_match_the_published_sizes(entries, hub_id):
    assert entries[hub_id].num_parameters == pytest.approx(EXPECTED_PARAMETERS[hub_id], rel=0.01)


def test_tied_embeddings_count_once(entries):
    gpt2 = entries["gpt2"]
    untied_embedding = gpt2.vocab_size * gpt2.hidden_size
    assert gpt2.num_parameters == 124_439_808  # the well-known exact count; untied would add 38.6M
    assert gpt2.num_parameters + untied_embedding == pytest.approx(163.0e6, rel=0.001)


def test_catalog_entries_carry_their_shapes(entries):
    llama = entries["meta-llama/Llama-3.1-8B"]
    assert (llama.num_layers, llama.hidden_size, llama.vocab_size) == (32, 4096, 128256)
    assert "llama-3.1-8b" in llama.aliases
    gpt2 = entries["gpt2-xl"]  # GPT-2 names its fields n_layer / n_embd
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.vocab_size) == (48, 1600, 50257)


def test_catalog_is_sorted_smallest_first_and_cached():
    first = sources.catalog()
    assert [entry.num_parameters for entry in first] == sorted(entry.num_parameters for entry in first)
    started = time.perf_counter()
    assert sources.catalog() == first
    assert time.perf_counter() - started < 0.1


def test_catalog_files_are_named_after_their_hub_id_and_names_are_short_lowercase():
    for path in sorted(sources.CATALOG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        assert path.name == re.sub(r"[^a-z0-9.]+", "-", data["hub_id"].lower()) + ".json"
        assert data["aliases"], f"{path.name} has no aliases"
        for alias in data["aliases"]:
            assert alias == alias.lower() and "/" not in alias, alias
        assert "model_type" in data["config"]


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "QWEN2.5-0.5B", " qwen2.5-0.5b "])
def test_alias_resolves_from_the_catalog(name):
    source = sources.resolve(name)
    assert source.origin == "catalog"
    assert source.hub_id == "Qwen/Qwen2.5-0.5B"
    assert source.config.model_type == "qwen2"
    assert source.config.hidden_size == 896
    assert source.note == ""  # an alias is never looked up on the hub


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "qwen/qwen2.5-0.5b", "QWEN/QWEN2.5-0.5B"])
def test_catalog_hub_id_falls_back_to_the_catalog_offline(name):
    source = sources.resolve(name)
    assert source.origin == "catalog"
    assert source.name == name
    assert source.hub_id == "Qwen/Qwen2.5-0.5B"
    assert "HF_HUB_OFFLINE" in source.note


def test_local_files_only_serves_a_catalog_hub_id_from_the_catalog(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_reachable", _no_network)
    source = sources.resolve("meta-llama/Llama-3.1-8B", local_files_only=True)
    assert source.origin == "catalog"
    assert "local_files_only" in source.note


def test_catalog_hub_id_prefers_the_hub_when_it_answers(monkeypatch):
    monkeypatch.setattr(sources, "_offline_reason", lambda local_files_only: "")
    hub_config = sources.catalog_config("gpt2")
    hub_config.n_layer = 3  # something the catalog copy does not have
    asked = []

    def fake_hub(hub_id, *, offline):
        asked.append((hub_id, offline))
        return hub_config

    monkeypatch.setattr(sources, "_hub_config", fake_hub)
    source = sources.resolve("GPT2")
    assert asked == [("gpt2", False)]
    assert (source.origin, source.config.n_layer) == ("hub", 3)


def test_catalog_hub_id_falls_back_when_the_hub_refuses(monkeypatch):
    monkeypatch.setattr(sources, "_offline_reason", lambda local_files_only: "")

    def gated(hub_id, *, offline):
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.")

    monkeypatch.setattr(sources, "_hub_config", gated)
    source = sources.resolve("meta-llama/Llama-3.2-1B")
    assert source.origin == "catalog"
    assert "gated repo" in source.note and "\n" not in source.note


def test_catalog_config_keeps_working_and_returns_fresh_configs():
    first = sources.catalog_config("meta-llama/Llama-3.2-1B")
    first.num_hidden_layers = 2  # benchmarks cut layers on their copy
    assert sources.catalog_config("meta-llama/Llama-3.2-1B").num_hidden_layers == 16
    with pytest.raises(KeyError):
        sources.catalog_config("no/such-model")


def test_local_directory_resolves_with_origin_local(tmp_path):
    sources.catalog_config("HuggingFaceTB/SmolLM2-135M").save_pretrained(tmp_path)
    source = sources.resolve(str(tmp_path))
    assert source.origin == "local"
    assert source.path == tmp_path
    assert source.config.model_type == "llama"
    assert (source.config.hidden_size, source.config.num_hidden_layers) == (576, 30)
    assert sources.parameter_count(source.config) == pytest.approx(134.5e6, rel=0.01)


def test_directory_without_config_json_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        sources.resolve(str(tmp_path))


def test_unknown_name_raises_with_the_closest_catalog_names():
    with pytest.raises(ModelNotFoundError) as caught:
        sources.resolve("llama-3.1-8")
    message = str(caught.value)
    assert "'llama-3.1-8'" in message
    assert "offline" in message
    assert "local directory with config.json" in message
    assert "llama-3.1-8b" in message
    assert isinstance(caught.value, UsageError)  # exit code 2


def test_close_matches_lists_three_models_once_each():
    matches = sources.close_matches("qwen2.5-7")
    assert len(matches) == 3
    assert matches[0] == "qwen2.5-7b"
    hub_ids = {sources._catalog_index()[name.lower()]["hub_id"] for name in matches}
    assert len(hub_ids) == 3
    assert len(sources.close_matches("zzzz")) == 3  # always some alternatives to offer


def test_hub_id_outside_the_catalog_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as caught:
        sources.resolve("some-org/not-in-the-catalog-7B")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "some-org/not-in-the-catalog-7B" in message
    assert "HF_HUB_OFFLINE=1" in message and "not in the local Hugging Face cache" in message


def test_unreachable_hub_counts_as_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_reachable", _no_network)
    asked = []

    def cache_only(hub_id, *, offline):
        asked.append(offline)
        raise OSError("not in the cache")

    monkeypatch.setattr(sources, "_hub_config", cache_only)
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        sources.resolve("some-org/other-model")
    assert asked == [True]  # only the local cache was read


def _no_network(endpoint: str) -> bool:
    return False
