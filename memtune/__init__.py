"""memtune: predict, and avoid, CUDA out-of-memory in fine-tuning.

    plan = memtune.auto_fit("Qwen/Qwen2.5-0.5B", seq_len=1024, batch_size=32)
"""

from memtune.config import Adapter, Policy, Quantization, TrainConfig, parse_bytes
from memtune.fit import FitResult, auto_fit, fit_model
from memtune.measure.probe import probe
from memtune.plan import Plan
from memtune.predict.estimate import estimate
from memtune.predict.peak import Estimate
from memtune.sources import resolve

__all__ = ["Adapter", "Estimate", "FitResult", "Plan", "Policy", "Quantization", "TrainConfig", "auto_fit", "estimate",
           "fit_model", "parse_bytes", "probe", "resolve"]
__version__ = "0.1.0"
