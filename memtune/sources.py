"""MODEL -> a transformers config (and where it came from).

MODEL is a local directory with config.json, a name in the built-in catalog (hub ids such as
`Qwen/Qwen2.5-0.5B` and short aliases such as `qwen2.5-0.5b`), or a Hugging Face hub id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOG_DIR = Path(__file__).parent / "catalog"


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


def config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def catalog_config(hub_id: str) -> Any:
    for path in sorted(CATALOG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        if entry["hub_id"] == hub_id:
            return config_from_dict(entry["config"])
    raise KeyError(hub_id)
