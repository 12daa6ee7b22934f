"""memtune: predict, and avoid, CUDA out-of-memory in fine-tuning.

    plan = memtune.auto_fit("Qwen/Qwen2.5-0.5B", seq_len=1024, batch_size=32)

The names below are imported on first use (PEP 562), so `memtune --help` and `memtune models` start without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memtune.config import Adapter, Policy, Quantization, TrainConfig, Zero, parse_bytes
    from memtune.errors import NothingFitsError, UsageError
    from memtune.fit import FitResult, auto_fit, fit_model
    from memtune.measure.probe import probe
    from memtune.plan import Plan
    from memtune.predict.estimate import estimate
    from memtune.predict.peak import Estimate
    from memtune.sources import resolve

_HOMES = {
    "Adapter": "memtune.config", "Policy": "memtune.config", "Quantization": "memtune.config",
    "TrainConfig": "memtune.config", "Zero": "memtune.config", "parse_bytes": "memtune.config",
    "FitResult": "memtune.fit",
    "auto_fit": "memtune.fit", "fit_model": "memtune.fit", "probe": "memtune.measure.probe", "Plan": "memtune.plan",
    "estimate": "memtune.predict.estimate", "Estimate": "memtune.predict.peak", "resolve": "memtune.sources",
    "NothingFitsError": "memtune.errors", "UsageError": "memtune.errors",
}
"""Where each public name lives."""

__all__ = ["Adapter", "Estimate", "FitResult", "NothingFitsError", "Plan", "Policy", "Quantization", "TrainConfig",
           "UsageError", "Zero", "auto_fit", "estimate", "fit_model", "parse_bytes", "probe", "resolve"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'memtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
