"""MODEL -> a transformers config (and where it came from).

MODEL is, in the order tried:
1. a local directory with config.json (origin "local");
2. a short catalog alias such as `qwen2.5-0.5b` (origin "catalog", never touches the network);
3. a catalog hub id such as `Qwen/Qwen2.5-0.5B`, matched case-insensitively: the hub's config wins
   when the hub answers (origin "hub"); offline, gated or unreachable, the catalog copy is used
   (origin "catalog", with the reason in `note`);
4. any other hub id, through `AutoConfig.from_pretrained` (origin "hub"; offline, only the local
   Hugging Face cache is read).

The catalog is memtune/catalog/*.json, one model per file:
`{"hub_id": ..., "aliases": [...], "config": {"model_type": ..., shape fields}}`. The config fields
are copied from the published config.json, shape-relevant fields only.
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

from memtune.errors import ModelNotFoundError

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


def parameter_count(config: Any) -> int:
    """Parameters of AutoModelForCausalLM built from `config` on the meta device (no memory used).

    Counted by tensor identity, so tied input and output embeddings count once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(parameter): parameter for parameter in model.parameters()}
    return sum(parameter.numel() for parameter in unique.values())


@functools.cache
def _catalog_entries() -> tuple[CatalogEntry, ...]:
    entries = []
    for data in _catalog_files():
        config = config_from_dict(data["config"])
        entries.append(CatalogEntry(
            hub_id=data["hub_id"],
            aliases=tuple(data.get("aliases", ())),
            config=data["config"],
            num_parameters=parameter_count(config),
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        ))
    return tuple(sorted(entries, key=lambda entry: entry.num_parameters))


def catalog() -> list[CatalogEntry]:
    """Every catalog model, smallest first. The first call builds each model on the meta device
    (a few seconds); later calls are cached."""
    return list(_catalog_entries())


def resolve(model: str, *, local_files_only: bool = False) -> ModelSource:
    """Map MODEL (local directory, catalog name or hub id) to a transformers config.

    Raises ModelNotFoundError, saying why and what to use instead, when nothing matches.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory '{model}' has no config.json: point MODEL at a directory holding a "
                "transformers config.json (as written by save_pretrained), or at a catalog name"
            )
        from transformers import AutoConfig

        return ModelSource(model, AutoConfig.from_pretrained(path), "local", path=path)

    key = model.strip().lower()
    entry = _catalog_index().get(key)
    if entry is not None and key != entry["hub_id"].lower():  # an alias: never the network
        return _from_catalog(model, entry)

    offline_reason = _offline_reason(local_files_only)
    if entry is not None:
        if offline_reason:
            return _from_catalog(model, entry, note=f"{offline_reason}; used the built-in catalog config")
        try:
            return ModelSource(model, _hub_config(entry["hub_id"], offline=False), "hub", hub_id=entry["hub_id"])
        except Exception as error:  # gated, renamed, rate-limited...: the catalog copy is still right
            return _from_catalog(model, entry, note=f"the hub refused ({_first_line(error)}); "
                                 "used the built-in catalog config")

    try:
        config = _hub_config(model, offline=bool(offline_reason))
    except Exception as error:
        raise ModelNotFoundError(_not_found_message(model, offline_reason, error)) from error
    return ModelSource(model, config, "hub", hub_id=model)


def close_matches(model: str, count: int = 3) -> list[str]:
    """The `count` catalog names (hub ids or aliases) closest to `model`, one per model."""
    spelled = {name.lower(): name for data in _catalog_files() for name in (data["hub_id"], *data.get("aliases", ()))}
    matches: dict[str, str] = {}  # hub id -> the best-matching name of that model
    for key in difflib.get_close_matches(model.strip().lower(), list(spelled), n=len(spelled), cutoff=0.0):
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


def _from_catalog(name: str, data: dict[str, Any], note: str = "") -> ModelSource:
    return ModelSource(name, config_from_dict(data["config"]), "catalog", hub_id=data["hub_id"], note=note)


def _hub_config(hub_id: str, *, offline: bool) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hub_id, local_files_only=offline)


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
        f"closest: {', '.join(close_matches(model)) or 'none'} (`memtune models` lists them all)."
    )
