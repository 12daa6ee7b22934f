"""What every trial shares: its result (`Measurement`), recognising an out-of-memory error, giving
the memory back afterwards, and making the library workspaces before the first step.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, field
from typing import Any

OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")

_WORKSPACE_BYTES: int | None = None
"""Bytes the library workspaces hold, once `warm_up` has made them (None before)."""


@dataclass
class Measurement:
    """What one trial measured. Bytes are deltas over the allocator's state before the trial."""

    fits: bool
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    library_workspace_bytes: int = 0
    """Allocated memory still held after cleanup (cuBLAS workspaces created by this trial)."""
    alloc_retries: int = 0
    error: str = ""

    @property
    def tokens_per_second(self) -> float:
        timed = self.step_seconds[1:] or self.step_seconds
        if not timed:
            return 0.0
        timed = sorted(timed)
        return self.tokens_per_step / timed[len(timed) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def is_oom(error: BaseException) -> bool:
    """True for CUDA out-of-memory and library allocation failures (cuBLAS, cuDNN)."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in OOM_MARKERS)


def release_memory() -> None:
    """Drop cached blocks and reset peak statistics after a trial (successful or not)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def expandable_in_environment() -> bool | None:
    """The expandable_segments value PYTORCH_CUDA_ALLOC_CONF gives, or None where it gives none."""
    for part in os.environ.get(ALLOC_CONF, "").replace(" ", "").lower().split(","):
        if part.startswith("expandable_segments:"):
            return part.removeprefix("expandable_segments:") == "true"
    return None


def set_allocator_mode(expandable: bool) -> bool:
    """Make the CUDA caching allocator use expandable segments, or not, as a plan predicted it
    (`TrainConfig.expandable_segments`); other PYTORCH_CUDA_ALLOC_CONF settings are kept.

    Before CUDA starts, the environment variable does it (also for processes started from this one). Once it has
    started, torch's allocator-settings call (torch 2.13 `torch._C._accelerator_setAllocatorSettings`, before it
    `torch.cuda.memory._set_allocator_settings`) switches the mode for segments made from then on; the cache is
    emptied first, so no free segment of the other mode stays. Returns False when memory was already allocated
    under the other mode (those blocks stay where they are)."""
    import torch

    setting = f"expandable_segments:{expandable}"
    was_expandable = expandable_in_environment() is True
    kept = [part for part in os.environ.get(ALLOC_CONF, "").split(",")
            if part.strip() and not part.strip().startswith("expandable_segments")]
    os.environ[ALLOC_CONF] = ",".join([*kept, setting])
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return True
    torch.cuda.empty_cache()
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(setting)
    return was_expandable == expandable or torch.cuda.memory_allocated() == 0


def warm_up() -> int:
    """Create the cuBLAS workspaces (main thread and autograd's thread) once, in segments of their own.

    Made mid-trial instead, they would be carved out of a large free block and pin that segment
    in the cache for the rest of the process. Returns the bytes they hold.
    """
    global _WORKSPACE_BYTES
    import torch

    if _WORKSPACE_BYTES is None:
        release_memory()
        before = torch.cuda.memory_allocated()
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
            (x @ x).sum().backward()
            del x
        release_memory()
        _WORKSPACE_BYTES = torch.cuda.memory_allocated() - before
    return _WORKSPACE_BYTES
