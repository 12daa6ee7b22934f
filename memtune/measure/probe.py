"""What the GPU really has: total, free, other processes' usage, capability, bf16, CUDA context cost.

The only module that imports pynvml. pynvml sees the whole device (other processes included);
torch sees this process (its caching allocator, `mem_get_info`, a per-process memory fraction).
The budget memtune plans against is what this process may use:

    budget = total - used by other processes          (capped by torch's per-process fraction)

and the plan's predicted total already counts this process's own CUDA context and workspaces.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from memtune.config import DEFAULT_CONTEXT_BYTES


@dataclass
class GpuInfo:
    """One visible GPU. Bytes are integers."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    """Free on the device now (nvml), after every process's allocations including ours."""
    used_by_others_bytes: int
    """Used by other processes (nvml used minus this process's own usage)."""
    other_processes: int
    capability: str
    """CUDA compute capability "major.minor" (torch.cuda.get_device_properties; ROCm: the gfx target's): which SDPA
    kernels run here (no flash below 8.0), so fit traces with it (`TrainConfig.gpu_capability`)."""
    bf16_supported: bool
    """torch.cuda.is_bf16_supported(): without it fit plans fp16 instead of bf16."""
    context_bytes: int
    """This process's device memory outside torch's pool: CUDA context and kernels (measured)."""
    memory_fraction: float | None = None
    """torch.cuda.set_per_process_memory_fraction in effect (None: not set)."""
    driver_version: str = ""
    host_copy_bytes_per_second: float | None = None
    """Measured pinned host<->device copy rate (`host_copy_rate`, the slower direction); None if not measured."""

    @property
    def budget_bytes(self) -> int:
        """What this process may use: the device minus other processes, capped by the memory fraction.

        A fraction caps torch's pool only, so the context is added back on top of it.
        """
        budget = self.total_bytes - self.used_by_others_bytes
        if self.memory_fraction is not None and self.memory_fraction < 1.0:
            budget = min(budget, int(self.memory_fraction * self.total_bytes) + self.context_bytes)
        return budget

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budget_bytes": self.budget_bytes}


@dataclass
class ProbeResult:
    gpus: list[GpuInfo] = field(default_factory=list)
    reason: str = ""
    """Why no GPU is usable, when `gpus` is empty."""
    torch_cuda: str = ""

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, "torch_cuda": self.torch_cuda,
                "gpus": [gpu.to_dict() for gpu in self.gpus]}


def host_available_bytes() -> int | None:
    """The host memory available to new allocations (Linux /proc/meminfo MemAvailable, bytes), None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


HOST_COPY_BYTES = 256 * 1024 * 1024
"""The buffer `host_copy_rate` times: large enough that a copy runs at the link's full rate (a few ms over PCIe)."""


def host_copy_rate(index: int = 0) -> float:
    """Bytes per second of a pinned host<->device copy on GPU `index`: the slower of the two directions (offloaded
    activations go out in forward and back in backward), the best of 3 timed copies of `HOST_COPY_BYTES` each way
    (CUDA events) after one untimed. Measured once per GPU (name and PCI bus) and kept in memtune's cache directory
    (`config.cache_home()`/host_copy_rate.json); `MEMTUNE_NO_CACHE=1` measures every time. The buffers are given
    back to the device and, where torch can (2.13), to the host; on torch 2.11 the pinned 256 MiB stays in torch's
    host cache, where the offloaded activations reuse it. Initialises CUDA; raises RuntimeError without a GPU."""
    import json

    import torch

    from memtune.config import cache_home

    props = torch.cuda.get_device_properties(index)
    key = f"{props.name} {getattr(props, 'pci_bus_id', '')}:{getattr(props, 'pci_device_id', '')}"
    home = cache_home()
    path = home / "host_copy_rate.json" if home is not None else None
    known: dict[str, float] = {}
    if path is not None and path.exists():
        try:
            known = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            known = {}
    if key in known:
        return known[key]
    device = torch.device("cuda", index)
    host = torch.empty(HOST_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(HOST_COPY_BYTES, dtype=torch.uint8, device=device)
    rates = []
    with torch.cuda.device(index):
        for destination, source in ((host, gpu), (gpu, host)):
            best = float("inf")
            for attempt in range(4):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                destination.copy_(source, non_blocking=True)
                end.record()
                end.synchronize()
                if attempt:
                    best = min(best, start.elapsed_time(end) / 1e3)
            rates.append(HOST_COPY_BYTES / best)
    del host, gpu
    torch.cuda.empty_cache()  # the buffers would stay cached: 256 MiB of the GPU, and pinned pages of the host
    empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)  # torch >= 2.13
    if empty_host_cache is not None:
        empty_host_cache()
    rate = min(rates)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**known, key: rate}, indent=1))
        except OSError:
            pass  # a read-only cache only costs a measurement next time
    return rate


def _nvml_used(index: int) -> tuple[int, int, int, list[tuple[int, int]], str] | None:
    """(total, free, used, [(pid, bytes)], driver) from nvml, or None where nvml is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        processes = [(p.pid, int(p.usedGpuMemory or 0)) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return int(info.total), int(info.free), int(info.used), processes, driver
    except Exception:  # noqa: BLE001 - no driver, no permission, container without nvml: fall back to torch
        return None


def probe() -> ProbeResult:
    """Measure every visible GPU. Initialises CUDA in this process (that is what is measured)."""
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA GPU is visible to torch"
        if torch.version.cuda is None:
            reason += f" (this torch {torch.__version__} is a CPU-only build)"
        elif os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
            reason += " (CUDA_VISIBLE_DEVICES is empty)"
        return ProbeResult(reason=reason)
    result = ProbeResult(torch_cuda=str(torch.version.cuda))
    for index in range(torch.cuda.device_count()):
        before = _nvml_used(index)
        with torch.cuda.device(index):
            torch.zeros(1, device=f"cuda:{index}")  # create the context (a no-op when it exists)
            free_torch, total_torch = torch.cuda.mem_get_info(index)
            reserved = torch.cuda.memory_reserved(index)
        props = torch.cuda.get_device_properties(index)
        after = _nvml_used(index)
        pid = os.getpid()
        if after is not None:
            total, free, used, processes, driver = after
            own = sum(size for p, size in processes if p == pid)
            if not own and before is not None:
                own = max(0, used - before[2])  # containers hide pids: count what appeared since before
            context = max(0, own - reserved) if own else 0
            others = max(0, used - own)
            count = sum(1 for p, _ in processes if p != pid)
        else:
            total, free, driver, count = total_torch, free_torch, "", 0
            context, others = 0, max(0, total_torch - free_torch - reserved)
        fraction = None
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            fraction = float(getter(index))
            fraction = None if fraction >= 1.0 else fraction
        result.gpus.append(GpuInfo(
            index=index, name=torch.cuda.get_device_name(index), total_bytes=total, free_bytes=free,
            used_by_others_bytes=others, other_processes=count, capability=f"{props.major}.{props.minor}",
            bf16_supported=bool(torch.cuda.is_bf16_supported()), context_bytes=context or DEFAULT_CONTEXT_BYTES,
            memory_fraction=fraction, driver_version=driver, host_copy_bytes_per_second=_host_copy_rate_or_none(index),
        ))
    return result


def _host_copy_rate_or_none(index: int) -> float | None:
    """`host_copy_rate`, or None where it cannot be measured (no room for the buffers, pinning refused)."""
    try:
        return host_copy_rate(index)
    except RuntimeError:  # torch.OutOfMemoryError and CUDA errors are RuntimeErrors
        return None
