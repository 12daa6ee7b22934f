"""MODEL -> a transformers config (and where it came from).

MODEL is, in the order tried:
1. a local directory with config.json (origin "local");
2. a short catalog alias such as `qwen2.5-0.5b` (origin "catalog", never touches the network);
3. a catalog hub id such as `Qwen/Qwen2.5-0.5B`, matched case-insensitively: with `shapes_only=True`
   (`memtune plan` and `fit`, which need the shapes alone) the catalog copy, never touching the network;
   otherwise (`memtune run`, which loads the weights) the hub's config wins when the hub answers (origin
   "hub"); offline, gated or unreachable, the catalog copy is used (origin "catalog", with the reason in
   `note`);
4. any other hub id, through `AutoConfig.from_pretrained` (origin "hub"; offline, only the local
   Hugging Face cache is read).

The hub's reachability is probed (`_reachable`: one TCP connect, at most HUB_PROBE_SECONDS) only for a
name that steps 1 and 2 (and with `shapes_only=True` step 3) do not answer, once per process and endpoint.

A path-like MODEL (starting with `.`, `/` or `~`) that is not a directory is reported as such, never
looked up on the hub. Whatever the origin, the config must be one transformers builds a decoder-only
causal LM from (`transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, less the
encoders and encoder-decoders that also appear there); anything else is a UsageError naming what was
found. A config whose `auto_map` points at the model's own Python and whose `model_type` transformers
does not know (Qwen v1, Baichuan) is custom code: it is loaded only with `trust_remote_code=True`
(`--trust-remote-code`), and `trust_remote_code` is always passed explicitly, so transformers never asks
"Do you wish to run the custom code? [y/N]" on stdin.

The catalog is memtune/catalog/*.json, one model per file:
`{"hub_id": ..., "aliases": [...], "num_parameters": ..., "config": {"model_type": ..., shape fields}}`. The
config fields are copied from the published config.json, shape-relevant fields only; num_parameters is what
`parameter_count` counts for that config (tests/test_sources.py keeps the two equal).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from memtune.errors import ModelNotFoundError, UsageError

CATALOG_DIR = Path(__file__).parent / "catalog"
HUB_PROBE_SECONDS = 3.0
"""How long to wait for a TCP connection to the hub before treating it as offline. Without the
probe, huggingface_hub retries an unreachable hub five times with backoff (~25 s per lookup)."""

_TRUE_VALUES = {"1", "on", "yes", "true"}  # what huggingface_hub accepts for HF_HUB_OFFLINE


@dataclass
class ModelSource:
    name: str
    """What the user asked for."""
    config: Any
    """A transformers PretrainedConfig."""
    origin: str
    """"local", "catalog" or "hub"."""
    hub_id: str | None = None
    path: Path | None = None
    note: str = ""
    """Why a catalog hub id was served from the catalog rather than the hub; empty otherwise."""
    trust_remote_code: bool = False
    """The model's own Python (its config's `auto_map`) was allowed to run; pass it on when loading it."""


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the built-in catalog, with sizes computed from its config."""

    hub_id: str
    aliases: tuple[str, ...]
    config: dict[str, Any]
    """The "config" object of the JSON file; `config_from_dict` builds a fresh transformers config."""
    num_parameters: int
    """Unique parameters of the causal-LM model built on the meta device (tied embeddings once)."""
    num_layers: int
    hidden_size: int
    vocab_size: int


def config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def catalog_config(hub_id: str) -> Any:
    """A fresh transformers config for a catalog hub id or alias (KeyError if absent)."""
    return config_from_dict(_catalog_index()[hub_id.strip().lower()]["config"])


def source_parameters(source: ModelSource) -> int:
    """Parameters of the model `source` describes: for a catalog model the count its file records (the same
    number, tests/test_sources.py; reading it spares importing the model's code, 2 s of a warm `memtune plan`),
    else `parameter_count` of its config."""
    if source.origin == "catalog" and source.hub_id:
        recorded = _catalog_index().get(source.hub_id.strip().lower(), {}).get("num_parameters")
        if recorded:
            return int(recorded)
    return parameter_count(source.config)


def parameter_count(config: Any) -> int:
    """Parameters of AutoModelForCausalLM built from `config` on the meta device (no memory used).

    Counted by tensor identity, so tied input and output embeddings count once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=custom_code(config))
    unique = {id(parameter): parameter for parameter in model.parameters()}
    return sum(parameter.numel() for parameter in unique.values())


_SHAPE_KEYS = {  # CatalogEntry field -> config.json keys that hold it (gpt2 names its own)
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "vocab_size": ("vocab_size",),
}


@functools.cache
def _catalog_entries() -> tuple[CatalogEntry, ...]:
    entries = []
    for data in _catalog_files():
        raw = data["config"]
        shape: dict[str, Any] = {field: next((raw[key] for key in keys if key in raw), None)
                                 for field, keys in _SHAPE_KEYS.items()}
        config = None
        if data.get("num_parameters") is None or None in shape.values():
            config = config_from_dict(raw)  # imports the model's transformers config class: ~0.1 s each
            shape = {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                     "vocab_size": config.vocab_size}
        entries.append(CatalogEntry(
            hub_id=data["hub_id"],
            aliases=tuple(data.get("aliases", ())),
            config=raw,
            # recorded in the file (tests/test_sources.py checks it against `parameter_count`): building 20
            # models on the meta device took 2.4 s of every `memtune models`
            num_parameters=data.get("num_parameters") or parameter_count(config),
            **shape,
        ))
    return tuple(sorted(entries, key=lambda entry: entry.num_parameters))


def catalog() -> list[CatalogEntry]:
    """Every catalog model, smallest first (cached)."""
    return list(_catalog_entries())


def custom_code(config: Any) -> bool:
    """Whether `config` is a class from a model's own Python (loaded with trust_remote_code=True): then
    building the model needs trust_remote_code=True too, and without it transformers would prompt."""
    return type(config).__module__.startswith("transformers_modules")


def resolve(model: str, *, local_files_only: bool = False, trust_remote_code: bool = False,
            shapes_only: bool = False) -> ModelSource:
    """Map MODEL (local directory, catalog name or hub id) to a transformers config.

    `shapes_only`: the caller needs the model's shapes alone (a prediction, not the weights), so a catalog
    hub id is served from the catalog (its fields are copied from the published config.json) with no hub
    lookup and no reachability probe, like an alias.

    Raises ModelNotFoundError, saying why and what to use instead, when nothing matches, and UsageError
    for a config memtune cannot use (unreadable, not a causal LM, custom code without trust_remote_code).
    Never reads stdin.
    """
    if not model.strip():
        raise ModelNotFoundError(f"MODEL is empty ({model!r}): give a catalog name (`memtune models` lists them), "
                                 "a hub id or a local directory with config.json")
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_directory(model, path, trust_remote_code)
    if path.exists():
        raise ModelNotFoundError(
            f"MODEL '{model}' is a file, not a directory: point MODEL at the directory holding config.json "
            f"('{path.parent}'), or at a catalog name (`memtune models` lists them)"
        )
    if _path_like(model):
        raise ModelNotFoundError(
            f"model directory '{model}' does not exist ({path.absolute()}): check the path, or give a catalog "
            "name (`memtune models` lists them) or a hub id such as Qwen/Qwen2.5-0.5B"
        )

    key = model.strip().lower()
    entry = _catalog_index().get(key)
    if entry is not None and (shapes_only or key != entry["hub_id"].lower()):  # an alias: never the network
        return _from_catalog(model, entry)

    offline_reason = _offline_reason(local_files_only)
    if entry is not None:
        if offline_reason:
            return _from_catalog(model, entry, note=f"{offline_reason}; used the built-in catalog config")
        try:
            config = _hub_config(entry["hub_id"], offline=False)
        except Exception as error:  # gated, renamed, rate-limited...: the catalog copy is still right
            return _from_catalog(model, entry, note=f"the hub refused ({_first_line(error)}); "
                                 "used the built-in catalog config")
        return ModelSource(model, config, "hub", hub_id=entry["hub_id"])

    try:
        config = _hub_config(model, offline=bool(offline_reason), trust_remote_code=trust_remote_code)
    except Exception as error:
        if isinstance(error, ValueError) and "trust_remote_code=True" in str(error):  # it refused the repo's Python
            raise UsageError(_custom_code_message(f"model '{model}'", "its config's auto_map")) from error
        raise ModelNotFoundError(_not_found_message(model, offline_reason, error)) from error
    check_causal_lm(config, f"model '{model}'")
    return ModelSource(model, config, "hub", hub_id=model, trust_remote_code=trust_remote_code)


def check_causal_lm(config: Any, where: str) -> None:
    """Raise UsageError unless memtune can build a decoder-only causal LM from `config`."""
    model_type = getattr(config, "model_type", "") or ""
    if custom_code(config):
        auto_map = getattr(config, "auto_map", None) or {}
        if "AutoModelForCausalLM" not in auto_map:
            raise UsageError(
                f"{where} has custom code (auto_map {sorted(auto_map)}) without an AutoModelForCausalLM entry: "
                f"it is not a causal language model. {SUPPORTED_TEXT}"
            )
        return
    problem = causal_lm_problem(model_type, is_decoder=bool(getattr(config, "is_decoder", False)))
    if problem:
        raise UsageError(f"{where} {problem}. {SUPPORTED_TEXT}")
    wrong = [f"{name}={value!r}" for name in SHAPE_FIELDS if not _positive_or_absent(value := _field(config, name))]
    if wrong:
        raise UsageError(f"{where} has {', '.join(wrong)}: each must be a positive integer (the model's shape); "
                         "fix config.json")


SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size")
"""Config fields (through transformers' attribute_map: n_layer, n_embd...) that set the model's size."""


SUPPORTED_TEXT = (
    "memtune supports decoder-only causal LMs that transformers builds from a config (AutoModelForCausalLM): "
    "the catalog (`memtune models`) and the model types listed in "
    "transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (llama, mistral, qwen2, gpt2, ...)"
)


def _field(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # per-layer configs raise on a global read of a per-layer field: not ours to check
        return None


def _positive_or_absent(value: Any) -> bool:
    """None, a positive integer, or one per layer (gemma3n's intermediate_size)."""
    if isinstance(value, (list, tuple)):
        return all(map(_positive_or_absent, value))
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


def causal_lm_problem(model_type: str, *, is_decoder: bool = False) -> str:
    """What keeps `model_type` from being a decoder-only causal LM transformers knows; "" when nothing."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if not model_type:
        return "has no model_type"
    if model_type not in CONFIG_MAPPING_NAMES:
        return (f"has model_type '{model_type}', which this transformers does not know (an older or newer "
                "architecture, or one shipped as the model's own Python with an auto_map)")
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in causal:
        return f"has model_type '{model_type}', which is not a causal LM (no AutoModelForCausalLM class)"
    if model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return (f"has model_type '{model_type}', an encoder-decoder (only its decoder half, "
                f"{causal[model_type]}, is a causal LM)")
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not is_decoder:
        return (f"has model_type '{model_type}', an encoder (a causal LM only with \"is_decoder\": true, "
                f"as {causal[model_type]})")
    return ""


def close_matches(model: str, count: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to `count` catalog names (hub ids or aliases) close to `model`, one per model, closest first;
    `cutoff` is difflib's similarity ratio (0.6: a typo or a missing suffix, not any name at all)."""
    spelled = {name.lower(): name for data in _catalog_files() for name in (data["hub_id"], *data.get("aliases", ()))}
    matches: dict[str, str] = {}  # hub id -> the best-matching name of that model
    for key in difflib.get_close_matches(model.strip().lower(), list(spelled), n=len(spelled), cutoff=cutoff):
        matches.setdefault(_catalog_index()[key]["hub_id"], spelled[key])
    return list(matches.values())[:count]


# ---- internals ---------------------------------------------------------------------------------


@functools.cache
def _catalog_files() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(path.read_text()) for path in sorted(CATALOG_DIR.glob("*.json")))


@functools.cache
def _catalog_index() -> dict[str, dict[str, Any]]:
    """Lowercase hub id and every alias -> the catalog file's data."""
    index: dict[str, dict[str, Any]] = {}
    for data in _catalog_files():
        for name in (data["hub_id"], *data.get("aliases", ())):
            if name.lower() in index:
                raise ValueError(f"catalog name {name!r} is used twice in {CATALOG_DIR}")
            index[name.lower()] = data
    return index


def _path_like(model: str) -> bool:
    """A filesystem path rather than a hub id or catalog name: hub ids never start with these."""
    return model.startswith((".", "/", "~", "\\")) or (os.sep != "/" and os.sep in model)


def _read_config_json(file: Path) -> dict[str, Any]:
    """config.json as a dict, or UsageError naming the file and what is wrong with it."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {file}: {_first_line(error)}") from error
    fix = "write the transformers config of a causal LM there (save_pretrained writes one)"
    if not text.strip():
        raise UsageError(f"{file} is empty: {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{file} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
                         f"{fix}") from error
    if not isinstance(data, dict):
        raise UsageError(f"{file} holds a JSON {type(data).__name__}, not an object with model_type and the "
                         f"model's shape: {fix}")
    if not data:
        raise UsageError(f"{file} is an empty object {{}}: {fix}")
    return data


def _from_directory(model: str, path: Path, trust_remote_code: bool) -> ModelSource:
    file = path / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(
            f"model directory '{model}' has no config.json: point MODEL at a directory holding a "
            "transformers config.json (as written by save_pretrained), or at a catalog name"
        )
    data = _read_config_json(file)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = data.get("model_type")
    auto_map = data.get("auto_map")
    where = str(file)
    if not isinstance(model_type, (str, type(None))) or not isinstance(auto_map, (dict, type(None))):
        raise UsageError(f"{where} has model_type {model_type!r} and auto_map {auto_map!r}: model_type must be "
                         "a string and auto_map an object")
    custom = bool(auto_map) and model_type not in CONFIG_MAPPING_NAMES
    if custom and not trust_remote_code:
        raise UsageError(_custom_code_message(where, f"auto_map {sorted(auto_map or {})}, model_type {model_type!r}"))
    if not custom:
        problem = causal_lm_problem(model_type or "", is_decoder=bool(data.get("is_decoder", False)))
        if problem:
            raise UsageError(f"{where} {problem}. {SUPPORTED_TEXT}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=custom)
    except Exception as error:  # a field of the wrong type, missing custom-code files...
        detail = " ".join(str(error).split()) or type(error).__name__  # validation errors explain on line 2
        raise UsageError(f"transformers could not build a config from {where}: {detail}") from error
    check_causal_lm(config, where)
    return ModelSource(model, config, "local", path=path, trust_remote_code=custom)


def _custom_code_message(where: str, seen: str) -> str:
    return (
        f"{where} is custom code ({seen}): transformers has no built-in class for it and would run the "
        "model's own Python files. Pass --trust-remote-code (API: trust_remote_code=True) if you trust that "
        "code, or use a model type transformers knows (see "
        "transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)"
    )


def _from_catalog(name: str, data: dict[str, Any], note: str = "") -> ModelSource:
    return ModelSource(name, config_from_dict(data["config"]), "catalog", hub_id=data["hub_id"], note=note)


def _hub_config(hub_id: str, *, offline: bool, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hub_id, local_files_only=offline, trust_remote_code=trust_remote_code)


def _offline_reason(local_files_only: bool) -> str:
    """Why the hub must not be asked, or "" when it may be."""
    if local_files_only:
        return "local_files_only was set"
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_VALUES:
            return f"offline ({variable}={os.environ[variable]})"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not _reachable(endpoint):
        return f"offline ({endpoint} is unreachable)"
    return ""


@functools.cache
def _reachable(endpoint: str) -> bool:
    """A quick TCP connect to the hub; asked once per process. Behind a proxy, assume yes."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _not_found_message(model: str, offline_reason: str, error: BaseException) -> str:
    if offline_reason:
        why = f"{offline_reason}, and it is not in the local Hugging Face cache"
    else:
        why = f"the hub lookup failed: {_first_line(error)}"
    return (
        f"model '{model}' was not found: {why}.\n"
        f"Use instead a local directory with config.json, or a built-in catalog name; "
        f"{_closest_text(model)} (`memtune models` lists them all)."
    )


def _closest_text(model: str) -> str:
    matches = close_matches(model)
    return f"did you mean {', '.join(matches)}?" if matches else "no catalog name is close to it"
