"""What "fits" means, once, for `memtune plan`, `memtune fit`, `auto_fit`, the search and the report.

A configuration fits a budget when its predicted step, replayed through the caching-allocator model
against a device of `usable_bytes = budget_bytes - margin_bytes`, never fails an allocation. Under
pressure torch's allocator frees its cached blocks and retries (c10/cuda/CUDACachingAllocator.cpp,
`release_cached_blocks` before an OOM), so a step whose unconstrained peak reserved (`total_bytes`) is
a little above the usable memory can still fit; the replay decides, not the comparison of totals.
How the replay runs (one GPU, a DDP replica, an FSDP shard) is the predictor's business
(`Predictor.fits`). The margin is `config.margin_for(budget_bytes, policy)`: 2% of the budget, at
least 256 MiB, unless the policy sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from memtune.predict.peak import Estimate


class Replay(Protocol):
    """The predictor's replay of an estimate against a device of `usable_bytes` (search.choose.Predictor)."""

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool: ...


@dataclass(frozen=True)
class Verdict:
    """Whether one predicted configuration fits a budget. Bytes are integers."""

    fits: bool
    total_bytes: int
    """Predicted peak reserved + cuBLAS workspaces + CUDA context (+ NCCL with several GPUs)."""
    budget_bytes: int
    margin_bytes: int

    @property
    def usable_bytes(self) -> int:
        """What the step may use: the budget less the safety margin."""
        return self.budget_bytes - self.margin_bytes

    @property
    def spare_bytes(self) -> int:
        """Usable memory left at the predicted peak; negative when it fits only because the allocator
        releases its cache under pressure."""
        return self.usable_bytes - self.total_bytes

    @property
    def shortfall_bytes(self) -> int:
        """How much more memory the budget would need (0 when it fits)."""
        return 0 if self.fits else max(0, self.total_bytes - self.usable_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes,
                "margin_bytes": self.margin_bytes, "usable_bytes": self.usable_bytes}


def judge(replay: Replay, estimate: Estimate, budget_bytes: int, margin_bytes: int) -> Verdict:
    """The one fits verdict: `estimate` replayed against `budget_bytes - margin_bytes`.

    Raises nothing; a margin as large as the budget leaves nothing usable and never fits."""
    usable = budget_bytes - margin_bytes
    fits = usable > 0 and replay.fits(estimate, usable)
    return Verdict(fits, estimate.total_bytes, budget_bytes, margin_bytes)
