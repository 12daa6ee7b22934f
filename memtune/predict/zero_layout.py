"""DeepSpeed ZeRO's knobs and a model's parameters as ZeRO sees them, and the bytes each of ZeRO's model states and
buffers takes: the size rules of DeepSpeed 0.19.8 (file:line in docs/deepspeed-zero.md, issue 15's memo),
each a function. `zero.py` places them in a step's events; `zero_gather.py` replays ZeRO-3's gathers.
Notation: T trainable and P all parameters (elements), N ranks, b bytes per element of the model's dtype, rbs
the reduce bucket (elements: every DeepSpeed bucket knob counts elements)."""

from __future__ import annotations

from dataclasses import dataclass

DEEPSPEED_VERSION = "0.19.8"
"""The DeepSpeed whose source the rules were read from and measured with."""

ZERO_BUCKETS = "zero_buckets"
"""Breakdown key: ZeRO's IPG reduce bucket(s) and the reduce-scatter's copy of a bucket."""
ZERO_GATHERED = "zero_gathered"
"""Breakdown key: ZeRO-3's gathered (all-gathered or host-copied) full parameters and the all-gather buffer."""

ALLGATHER_STREAM = 1
"""ZeRO-3's all-gather stream (partitioned_param_coordinator: `__allgather_stream`); the gathered parameters'
blocks live in its pool (inferred: the copies are made on it)."""
REDUCE_STREAM = 2
"""ZeRO-3's `reduce_and_partition_stream` (stage3.py:340-341), a stream of its own only with overlap_comm."""

ALIGNMENT_ELEMENTS = 2
"""stage_1_and_2.py `nccl_start_alignment_factor` = 2 (4-byte alignment for 16-bit elements): the flat buffer is
padded to a multiple of N x this (503-524)."""
MAX_PARAM_REDUCE_EVENTS = 2
"""stage3.py:462: reductions in flight at once (documented; one is modelled)."""
ZERO3_OFFLOAD_TRANSIENT_FP32 = 8
"""ZeRO-3 under optimizer offload: bytes per element of a parameter's fp32 transients at the flush besides its
16-bit copy (2024-2028, 1443-1457 locate one fp32 copy; the H200 measured (b + 8) per element: one more fp32
copy than located, probably the norm's)."""
ZERO2_OFFLOAD_TRANSIENT_COPIES = 2
"""ZeRO-1/2 under optimizer offload: fp32 copies of a parameter's partition slice alive together at the flush
(`set_norm_for_param_grad_in_gpu` 1873-1886 and `async_inplace_copy_grad_to_fp32_buffer_from_gpu` 1888-1912;
measured together on the H200)."""
NVME_OPTIMIZER_BUFFERS = 4
"""offload_optimizer.buffer_count (offload_config.py:67): pinned swap buffers of the largest sub-group, fp32."""
NVME_PARAM_BUFFERS = 5
"""offload_param.buffer_count (offload_config.py:33)."""
NVME_PARAM_BUFFER_ELEMENTS = 100_000_000
"""offload_param.buffer_size (offload_config.py:36), elements: DeepSpeed's default; memtune writes
`nvme_param_buffer_elements` instead."""


@dataclass(frozen=True)
class ZeroKnobs:
    """The knobs of DeepSpeed's `zero_optimization` the memory depends on, as numbers (elements for sizes).
    Defaults are DeepSpeed 0.19.8's (`runtime/zero/config.py`, line of each field)."""

    stage: int
    reduce_bucket_elements: int = 500_000_000  # config.py:113
    overlap_comm: bool | None = None  # config.py:138; None -> stage == 3 (384-386)
    contiguous_gradients: bool = True  # config.py:102
    prefetch_bucket_elements: int = 50_000_000  # config.py:222
    param_persistence_threshold: int = 100_000  # config.py:228
    max_live_parameters: int = 1_000_000_000  # config.py:245
    max_reuse_distance: int = 1_000_000_000  # config.py:251
    sub_group_size: int = 1_000_000_000  # config.py:182
    offload_optimizer: str = "none"  # "none", "cpu" or "nvme"
    offload_parameters: str = "none"  # "none", "cpu" or "nvme" (ZeRO-3 only)
    foreach_optimizer: bool = False
    """torch's foreach AdamW (adamw_torch) steps the partition without offload: one state-sized fp32 temporary
    (its `_foreach_sqrt` of exp_avg_sq; OPTIMIZERS' description); fused AdamW and DeepSpeed's CPU Adam make none."""

    @property
    def overlaps(self) -> bool:
        """overlap_comm as DeepSpeed resolves it: unset means True for stage 3 only (config.py:384-386)."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm

    @property
    def offloads_optimizer(self) -> bool:
        return self.offload_optimizer != "none"

    @property
    def offloads_parameters(self) -> bool:
        return self.stage == 3 and self.offload_parameters != "none"


@dataclass(frozen=True)
class ZeroParam:
    """One parameter as ZeRO sees it."""

    numel: int
    element_bytes: int
    trainable: bool


@dataclass(frozen=True)
class ZeroModule:
    """A module with parameters of its own, in forward order: the unit ZeRO-3 gathers."""

    unit: int
    """The decoder layer it belongs to; BEFORE_LAYERS (embeddings) or AFTER_LAYERS (final norm, head) outside."""
    params: tuple[int, ...]
    """Indices into ZeroLayout.params (a tied weight appears in two modules)."""


BEFORE_LAYERS = -2
AFTER_LAYERS = -3


@dataclass(frozen=True)
class ZeroLayout:
    """The model's parameters and the data-parallel size: what every ZeRO rule is a function of."""

    params: tuple[ZeroParam, ...]
    num_ranks: int
    bytes_per_element: int
    """b: the 16-bit (or fp32) dtype DeepSpeed trains the model in."""
    modules: tuple[ZeroModule, ...] = ()

    @property
    def trainable_elements(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def total_elements(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def largest_trainable(self) -> int:
        return max((p.numel for p in self.params if p.trainable), default=0)

    def partition(self, elements: int) -> int:
        """One rank's share of `elements`: ceil(elements / N)."""
        return -(-elements // self.num_ranks)


# -- model-state sizes (bytes), each a rule of the memo ---------------------------------------------------------

def flat_bit16_bytes(layout: ZeroLayout) -> int:
    """ZeRO-1/2 `bit16_groups_flat`: all trainable parameters flattened, padded to a multiple of
    N x ALIGNMENT_ELEMENTS elements (stage_1_and_2.py:503-524)."""
    multiple = layout.num_ranks * ALIGNMENT_ELEMENTS
    return -(-layout.trainable_elements // multiple) * multiple * layout.bytes_per_element


def master_bytes(layout: ZeroLayout) -> int:
    """fp32 master partition `4T/N` (stage_1_and_2.py:559-561; stage3.py:1157-1170)."""
    return 4 * layout.partition(layout.trainable_elements)


def adam_moment_bytes(layout: ZeroLayout) -> int:
    """One of Adam's two fp32 moments over the partition, `4T/N`: exp_avg and exp_avg_sq, made inside the first
    step by FusedAdam / torch AdamW (8T/N together)."""
    return 4 * layout.partition(layout.trainable_elements)


def gradient_partition_bytes(layout: ZeroLayout) -> int:
    """`grads_in_partition` (ZeRO-1/2, stage_1_and_2.py:2186-2198) or `grad_partitions_flat_buffer` (ZeRO-3,
    stage3.py:786-801): `b*T/N`."""
    return layout.bytes_per_element * layout.partition(layout.trainable_elements)


def ipg_bucket_bytes(layout: ZeroLayout, knobs: ZeroKnobs) -> int:
    """One IPG bucket: `reduce_bucket_size * b` (stage_1_and_2.py:3256-3281; stage3.py:780-784)."""
    return knobs.reduce_bucket_elements * layout.bytes_per_element


def ipg_bucket_count(knobs: ZeroKnobs) -> int:
    """Buckets allocated: ZeRO-1/2 double-buffer with overlap_comm (stage_1_and_2.py:3273-3279); ZeRO-3 keeps
    one, whatever overlap_comm (stage3.py:780-784). ZeRO-1 allocates it whenever its gradient hooks exist
    (partition_gradients, overlap_comm or contiguous_gradients, 713-715)."""
    if knobs.stage == 3:
        return 1
    if knobs.stage == 1 and not (knobs.overlaps or knobs.contiguous_gradients):
        return 0
    return 2 if knobs.overlaps else 1


def sub_groups(layout: ZeroLayout, knobs: ZeroKnobs) -> list[int]:
    """ZeRO-3's optimizer sub-groups of the partition, elements each: whole parameters in order, a sub-group closed
    once it reaches sub_group_size (stage3.py `_create_fp16_sub_groups`, 1210-1233), so a sub-group can exceed it
    by part of a parameter; ZeRO-1/2: one."""
    partition = layout.partition(layout.trainable_elements)
    if knobs.stage != 3 or partition <= knobs.sub_group_size:
        return [partition]
    groups, size = [], 0
    for param in layout.params:
        if param.trainable:
            size += layout.partition(param.numel)
            if size >= knobs.sub_group_size:
                groups.append(size)
                size = 0
    return groups + ([size] if size else [])


def persistent_params(layout: ZeroLayout, knobs: ZeroKnobs) -> set[int]:
    """ZeRO-3's parameters that stay gathered once fetched: numel <= stage3_param_persistence_threshold
    (parameter_offload.py:316-330; partition_parameters.py:1292-1297)."""
    return {index for index, p in enumerate(layout.params) if p.numel <= knobs.param_persistence_threshold}


def gathers_cost_memory(layout: ZeroLayout, knobs: ZeroKnobs) -> bool:
    """Whether ZeRO-3's gathers allocate: with N > 1, or a host-to-device copy under parameter offload. N = 1
    without offload gathers nothing (`_no_gather_coalesced`, partition_parameters.py:904-914)."""
    return knobs.stage == 3 and (layout.num_ranks > 1 or knobs.offloads_parameters)


def pinned_bytes(num_bytes: int) -> int:
    """Host RAM one pinned buffer of `num_bytes` takes: torch's CachingHostAllocator rounds every request up to a
    power of two (`roundSize` in ATen/core/CachingHostAllocator.h; pinned_max_round_threshold defaults to no limit),
    and cudaHostAlloc'd pages are resident. DeepSpeed pins through `tensor.pin_memory()`, i.e. this allocator."""
    return 1 << (num_bytes - 1).bit_length() if num_bytes > 0 else 0


def host_bytes(layout: ZeroLayout, knobs: ZeroKnobs, grad_accum_steps: int = 1) -> int:
    """Host RAM (bytes) one rank's ZeRO holds under offload with pin_memory (memtune's DeepSpeed JSON sets it),
    each pinned buffer rounded up by `pinned_bytes`; 0 without offload. From the memo (§2.1 host, §2.2 host):

    - ZeRO-1/2 optimizer offload: pinned fp32 master `4T/N` (stage_1_and_2.py:559-566), pinned fp32 gradient
      `4T/N` (934-941), pinned bf16 staging `bT/N` (566-575), pinned `L*b` (653-658), Adam `8T/N` unpinned; with
      grad_accum_steps > 1 a pinned accumulator per parameter of the partition (1822-1826; counted for every
      trainable parameter: exact at N=1, an upper bound above). NVMe is treated as CPU there (219-222).
    - ZeRO-3 optimizer offload to the CPU: fp32 master `4T/N` and Adam `8T/N` unpinned (stage3.py:1157-1160), a
      pinned fp32 gradient per sub-group (1337-1342), the pinned flat bf16 gradient partitions `bT/N` (791-795);
      to NVMe the pinned swap pool `4 x 4 x min(sub_group, T/N)` + `bT/N`.
    - Parameter offload adds the pinned `b*P/N` to the CPU, or the pinned pool 5 x 1e8 x b to NVMe.

    Measured on one H200 (issue 15, benchmarks/results/zero_h200.json, process RSS less the no-offload run's):
    ZeRO-2 and ZeRO-3 CPU optimizer offload on Qwen2.5-0.5B and Llama-3.2-1B within 2%; without the rounding,
    Llama-3.2-1B ZeRO-2 was 28% low."""
    b = layout.bytes_per_element
    trainable = layout.partition(layout.trainable_elements)
    total = 0
    if knobs.offloads_optimizer:
        if knobs.stage in (1, 2):
            total += 2 * pinned_bytes(4 * trainable) + pinned_bytes(b * trainable) + 8 * trainable
            total += pinned_bytes(layout.largest_trainable * b)
            if grad_accum_steps > 1:
                total += sum(pinned_bytes(b * p.numel) for p in layout.params if p.trainable)
        elif knobs.offload_optimizer == "nvme":
            total += NVME_OPTIMIZER_BUFFERS * pinned_bytes(4 * min(knobs.sub_group_size, trainable))
            total += pinned_bytes(b * trainable)
        else:
            total += 12 * trainable + sum(pinned_bytes(4 * size) for size in sub_groups(layout, knobs))
            total += pinned_bytes(b * trainable)
    if knobs.offloads_parameters:
        if knobs.offload_parameters == "nvme":
            total += NVME_PARAM_BUFFERS * pinned_bytes(nvme_param_buffer_elements(layout) * b)
        else:
            total += pinned_bytes(b * layout.partition(layout.total_elements))
    return total


def nvme_param_buffer_elements(layout: ZeroLayout) -> int:
    """offload_param.buffer_size (elements) that memtune writes for parameters offloaded to NVMe: DeepSpeed's
    default 1e8, or one rank's partition of the largest parameter where that is larger. Each partition is swapped
    in through one buffer, and DeepSpeed asserts it fits (runtime/swap_tensor/partitioned_param_swapper.py:357,
    "More elements ... than buffer size"): with the default, Qwen2.5-0.5B's 136M-element embedding failed on the
    H200 (benchmarks/zero.py --nvme)."""
    largest = max((layout.partition(p.numel) for p in layout.params), default=0)
    return max(NVME_PARAM_BUFFER_ELEMENTS, largest)


def nvme_bytes(layout: ZeroLayout, knobs: ZeroKnobs) -> int:
    """Bytes one rank swaps to NVMe (ZeRO-3 ZeRO-Infinity): fp32 master, both moments and the fp32 gradient
    `16T/N` (optimizer_utils.py:102-111) and the 16-bit parameters `b*P/N`; ZeRO-1/2 have no swapper."""
    if knobs.stage != 3:
        return 0
    total = 0
    if knobs.offload_optimizer == "nvme":
        total += 16 * layout.partition(layout.trainable_elements)
    if knobs.offload_parameters == "nvme":
        total += layout.bytes_per_element * layout.partition(layout.total_elements)
    return total
