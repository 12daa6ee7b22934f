"""The plan: what `memtune fit` chose, saved as JSON, executed by `memtune run` and `auto_fit`.

A plan names the model, the configuration that won, the budget it was chosen under, what was
predicted and (when a GPU verified it) measured, and the fallbacks: the next configurations that
keep the same effective batch, in the order the OOM guard steps down through them.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtune.config import TrainConfig
from memtune.errors import UsageError

PLAN_SCHEMA_VERSION = 1


@dataclass
class Plan:
    """A chosen training configuration and the evidence behind it. Bytes are integers."""

    model: str
    """What the user passed as MODEL: a catalog name, hub id or local directory."""
    train_config: TrainConfig
    budget_bytes: int
    """Device memory the plan was fitted into (the GPU's free memory, or --budget)."""
    margin_bytes: int = 0
    """Safety margin kept free below the budget."""
    predicted_total_bytes: int = 0
    """Predicted peak reserved + workspaces + CUDA context."""
    predicted_tokens_per_second: float = 0.0
    measured_peak_reserved_bytes: int | None = None
    """Peak reserved in the verification trial (None: not verified on a GPU)."""
    measured_tokens_per_second: float | None = None
    gpu: str = ""
    """Name of the GPU the plan was made for ('' when planned for a budget only)."""
    fallbacks: list[TrainConfig] = field(default_factory=list)
    """Configurations with the same effective batch that need less memory, fastest first."""
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    @property
    def effective_batch_size(self) -> int:
        return self.train_config.effective_batch_size

    @property
    def verified(self) -> bool:
        return self.measured_peak_reserved_bytes is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model": self.model,
            "train_config": self.train_config.to_dict(),
            "budget_bytes": self.budget_bytes,
            "margin_bytes": self.margin_bytes,
            "predicted_total_bytes": self.predicted_total_bytes,
            "predicted_tokens_per_second": self.predicted_tokens_per_second,
            "measured_peak_reserved_bytes": self.measured_peak_reserved_bytes,
            "measured_tokens_per_second": self.measured_tokens_per_second,
            "gpu": self.gpu,
            "fallbacks": [config.to_dict() for config in self.fallbacks],
            "created": self.created,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise UsageError(f"plan schema_version {version!r} is not supported (this memtune reads {PLAN_SCHEMA_VERSION}); "
                             "make the plan again with `memtune fit`")
        data = {key: value for key, value in data.items() if key != "schema_version"}
        data["train_config"] = TrainConfig.from_dict(data["train_config"])
        data["fallbacks"] = [TrainConfig.from_dict(config) for config in data.get("fallbacks", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"plan file {str(path)!r} does not exist: make one with `memtune fit MODEL` (it prints where it saved it)")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UsageError(f"plan file {str(path)!r} is not a memtune plan ({error}); make it again with `memtune fit`") from None
