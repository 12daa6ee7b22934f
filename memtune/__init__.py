"""memtune: predict, and avoid, CUDA out-of-memory in fine-tuning."""

from memtune.config import Adapter, TrainConfig, parse_bytes
from memtune.estimate import Estimate, estimate
from memtune.sources import resolve

__all__ = ["Adapter", "Estimate", "TrainConfig", "estimate", "parse_bytes", "resolve"]
__version__ = "0.1.0"
