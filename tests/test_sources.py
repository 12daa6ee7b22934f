"""MODEL -> config: the catalog, catalog lookups, local directories, bad config.json files and the errors.

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
    assert sources.close_matches("zzzz") == []  # nothing close: no arbitrary suggestions


def test_a_far_name_gets_no_suggestions():
    with pytest.raises(ModelNotFoundError) as caught:
        sources.resolve("nonexistent-model-xyz")
    message = str(caught.value)
    assert "no catalog name is close" in message and "`memtune models`" in message
    assert "mistral" not in message  # difflib's best match at cutoff 0 was mistral-7b


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

    def cache_only(hub_id, *, offline, trust_remote_code=False):
        asked.append(offline)
        raise OSError("not in the cache")

    monkeypatch.setattr(sources, "_hub_config", cache_only)
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        sources.resolve("some-org/other-model")
    assert asked == [True]  # only the local cache was read


def _no_network(endpoint: str) -> bool:
    return False


# ---- config.json files memtune cannot use: a UsageError (exit 2) naming the file and the problem --------------


def _model_dir(tmp_path, text: str):
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def _usage_error(model) -> str:
    with pytest.raises(UsageError) as caught:
        sources.resolve(str(model))
    return str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"model_type": "llama",', "is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("", "is empty"),
    ("  \n", "is empty"),
    ("{}", "is an empty object {}"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"llama"', "holds a JSON str, not an object"),
    ('{"hidden_size": 64}', "has no model_type"),
    ('{"model_type": 7}', "model_type 7 and auto_map None: model_type must be a string"),
])
def test_malformed_config_json_names_the_file_and_the_problem(tmp_path, text, expected):
    message = _usage_error(_model_dir(tmp_path, text))
    assert str(tmp_path / "config.json") in message
    assert expected in message


def test_config_json_that_is_a_directory_is_reported(tmp_path):
    (tmp_path / "config.json").mkdir()
    message = _usage_error(tmp_path)
    assert "has no config.json" in message


def test_config_json_that_is_not_text_is_reported(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00binary")
    message = _usage_error(tmp_path)
    assert f"cannot read {tmp_path / 'config.json'}" in message


@pytest.mark.parametrize("model_type", ["baichuan", "no_such_architecture"])
def test_unknown_model_type_says_what_memtune_supports(tmp_path, model_type):
    message = _usage_error(_model_dir(tmp_path, json.dumps({"model_type": model_type, "hidden_size": 64})))
    assert f"model_type '{model_type}', which this transformers does not know" in message
    assert "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" in message and "`memtune models`" in message


@pytest.mark.parametrize(("model_type", "kind"), [
    ("bert", "an encoder"),
    ("roberta", "an encoder"),
    ("t5", "not a causal LM"),
    ("bart", "an encoder-decoder"),
    ("clip", "not a causal LM"),
    ("vit", "not a causal LM"),
])
def test_non_causal_lm_types_say_what_was_found(tmp_path, model_type, kind):
    message = _usage_error(_model_dir(tmp_path, json.dumps({"model_type": model_type})))
    assert f"model_type '{model_type}'" in message and kind in message
    assert "decoder-only causal LMs" in message


def test_an_encoder_configured_as_a_decoder_is_a_causal_lm(tmp_path):
    config = {"model_type": "bert", "is_decoder": True, "num_hidden_layers": 2, "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 2}
    source = sources.resolve(str(_model_dir(tmp_path, json.dumps(config))))
    assert (source.origin, source.config.model_type, source.config.is_decoder) == ("local", "bert", True)


QWEN_V1_AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig",
                    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}


def test_custom_code_needs_trust_remote_code(tmp_path):
    directory = _model_dir(tmp_path, json.dumps({"model_type": "qwen", "auto_map": QWEN_V1_AUTO_MAP}))
    message = _usage_error(directory)
    assert "is custom code" in message and "model_type 'qwen'" in message
    assert "--trust-remote-code" in message and "trust_remote_code=True" in message


def test_custom_code_with_trust_but_without_its_files_is_a_usage_error(tmp_path):
    directory = _model_dir(tmp_path, json.dumps({"model_type": "qwen", "auto_map": QWEN_V1_AUTO_MAP}))
    with pytest.raises(UsageError, match="transformers could not build a config from"):
        sources.resolve(str(directory), trust_remote_code=True)


def test_auto_map_on_a_type_transformers_knows_uses_the_built_in_class(tmp_path):
    config = sources.catalog_config("HuggingFaceTB/SmolLM2-135M").to_dict()
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}  # never imported
    source = sources.resolve(str(_model_dir(tmp_path, json.dumps(config))))
    assert source.config.model_type == "llama" and not sources.custom_code(source.config)
    assert source.trust_remote_code is False


def test_hub_repository_with_custom_code_asks_for_trust_remote_code(monkeypatch):
    monkeypatch.setattr(sources, "_offline_reason", lambda local_files_only: "")
    asked = []

    def custom_repository(hub_id, *, offline, trust_remote_code=False):
        asked.append(trust_remote_code)
        raise ValueError(f"The repository {hub_id} contains custom code which must be executed to correctly "
                         "load the model.\nPlease pass the argument `trust_remote_code=True` to allow custom "
                         "code to be run.")

    monkeypatch.setattr(sources, "_hub_config", custom_repository)
    with pytest.raises(UsageError) as caught:
        sources.resolve("Qwen/Qwen-7B")
    assert asked == [False]  # passed explicitly: transformers never prompts
    assert "model 'Qwen/Qwen-7B' is custom code" in str(caught.value)
    assert "--trust-remote-code" in str(caught.value)


def test_hub_config_that_is_not_a_causal_lm_is_refused(monkeypatch):
    from transformers import BertConfig

    monkeypatch.setattr(sources, "_offline_reason", lambda local_files_only: "")
    monkeypatch.setattr(sources, "_hub_config", lambda hub_id, *, offline, trust_remote_code=False: BertConfig())
    with pytest.raises(UsageError, match="model 'google-bert/bert-base-uncased' has model_type 'bert', an encoder"):
        sources.resolve("google-bert/bert-base-uncased")


@pytest.mark.parametrize("model", ["./nodir", "../no/such/dir", "/no/such/dir", "~/no-such-memtune-dir"])
def test_missing_path_like_model_says_the_directory_does_not_exist(model):
    with pytest.raises(ModelNotFoundError) as caught:
        sources.resolve(model)
    message = str(caught.value)
    assert f"model directory '{model}' does not exist" in message
    assert "hub" not in message.split("does not exist")[0]  # not treated as a hub id


def test_model_pointing_at_config_json_itself_names_the_directory(tmp_path):
    file = _model_dir(tmp_path, "{}") / "config.json"
    with pytest.raises(ModelNotFoundError, match=f"is a file, not a directory: .*'{tmp_path}'"):
        sources.resolve(str(file))


@pytest.mark.parametrize(("fields", "expected"), [
    ({"num_hidden_layers": -1}, "has num_hidden_layers=-1: each must be a positive integer"),
    ({"num_hidden_layers": 0, "vocab_size": 0}, "has num_hidden_layers=0, vocab_size=0: each must be"),
    ({"hidden_size": "x"}, "transformers could not build a config from"),
    ({"hidden_size": 63, "num_attention_heads": 4}, "hidden size (63) is not a multiple of the number of attention"),
])
def test_impossible_shapes_are_refused_before_any_trace(tmp_path, fields, expected):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 256, **fields}
    message = _usage_error(_model_dir(tmp_path, json.dumps(config)))
    assert str(tmp_path / "config.json") in message and expected in message
    assert "\n" not in message  # transformers' two-line validation errors are joined


def test_every_decoder_only_type_of_this_transformers_passes_the_checks():
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    refused = {}
    checked = 0
    for model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if sources.causal_lm_problem(model_type):
            continue  # encoders and encoder-decoders, tested above
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # a few need arguments transformers' defaults do not give
            continue
        checked += 1
        try:
            sources.check_causal_lm(config, model_type)
        except UsageError as error:
            refused[model_type] = str(error)
    assert checked > 100
    assert refused == {}


@pytest.mark.parametrize("model", ["", "  "])
def test_empty_model_is_refused_rather_than_read_as_the_current_directory(model):
    with pytest.raises(ModelNotFoundError, match="MODEL is empty"):
        sources.resolve(model)


def test_the_catalog_records_each_models_parameter_count():
    """`memtune models` reads num_parameters from the catalog files instead of building every model."""
    import json

    from memtune.sources import CATALOG_DIR, catalog, config_from_dict, parameter_count

    shapes = {entry.hub_id: entry for entry in catalog()}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        config = config_from_dict(data["config"])
        assert data["num_parameters"] == parameter_count(config), path.name
        entry = shapes[data["hub_id"]]  # read from the file's keys, not the config class: the same numbers
        assert (entry.num_layers, entry.hidden_size, entry.vocab_size) == (
            config.num_hidden_layers, config.hidden_size, config.vocab_size), path.name
