"""The public estimate: the predicted per-GPU peak memory of a configuration as it runs, on 1..N GPUs.

    estimate(model_config, TrainConfig(seq_len=1024, micro_batch_size=4, amp="bf16"))
    estimate(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=4))                  # FSDP shard
    estimate(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=4, strategy="ddp"))  # DDP replica
    estimate(model_config, TrainConfig(seq_len=2048, amp="bf16", num_gpus=2, strategy="deepspeed",
                                       zero=Zero(stage=3)))                                     # ZeRO rank

`TrainConfig` says how the step runs, and the estimate follows it:
- one GPU without offload: `single.estimate_single` (the step traced, extended, replayed);
- strategy "ddp" over several GPUs (`TrainConfig.replicated`): `ddp.estimate_replicated`, the one-GPU
  step plus DDP's broadcast and gradient buckets;
- FSDP over several GPUs, or CPU offload on any number (`TrainConfig.sharded`): `fsdp.estimate_sharded`,
  one rank's sharded step on a fake process group;
- strategy "deepspeed" (`TrainConfig.deepspeed`, ZeRO stage 1-3 with or without offload, any number of GPUs):
  `zero.estimate_zero`, the one-GPU step with ZeRO's partitions, buckets and gathers in place of its model states.

`fits_under` asks the same question against a usable size, by the same dispatch. Pure: no CUDA memory
is used; the traces run on fake tensors.
"""

from __future__ import annotations

from typing import Any

from memtune.config import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES, DTYPE_BYTES, TrainConfig
from memtune.errors import UsageError
from memtune.predict import ddp, fsdp, single, zero
from memtune.predict.bound import optimizer_state_bytes
from memtune.predict.peak import Estimate
from memtune.predict.zero_layout import pinned_bytes
from memtune.recipe.step import require_extra


def estimate(
    model_config: Any,
    train_config: TrainConfig,
    *,
    device: str | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Estimate:
    """Predict the per-GPU peak memory of `train_config` on the model described by `model_config` (a
    transformers config), for how the configuration runs: one GPU, a DDP replica or an FSDP shard.

    `device`: where the trace runs, "cuda" (fake CUDA tensors, needs a GPU) or "cpu" (CUDA emulation);
    default cuda when torch sees a GPU. The sharded trace always runs on the CPU. `context_bytes` and
    `workspace_bytes` are the CUDA context and cuBLAS workspaces; NCCL's buffers are added to the context
    with several GPUs (`peak.NCCL_BYTES`).

    Raises UsageError for a configuration FSDP or DDP through accelerate cannot run
    (recipe.parallel.check_supported); for a model config that is not a transformers config, or a
    train_config that is not a TrainConfig; for a device other than "cpu" or "cuda" (or "cuda" where torch
    sees no GPU: the autograd engine would abort the process in C++ instead of raising); and for an
    optimizer whose optional package (bitsandbytes) is not installed, with the install command.
    """
    check_trace_device(device)
    if not isinstance(train_config, TrainConfig):
        raise UsageError(f"estimate needs a memtune TrainConfig as train_config (e.g. TrainConfig(seq_len=1024, "
                         f"micro_batch_size=4, amp='bf16')), got {type(train_config).__name__} {train_config!r:.60}")
    require_extra(train_config.optimizer)
    if not hasattr(model_config, "to_json_string"):
        raise UsageError(f"estimate needs a transformers config (e.g. memtune.resolve('gpt2').config), "
                         f"got {type(model_config).__name__} {model_config!r:.60}")
    kwargs: dict[str, Any] = {"device": device, "context_bytes": context_bytes, "workspace_bytes": workspace_bytes}
    if train_config.deepspeed:
        return zero.estimate_zero(model_config, train_config, **kwargs)
    if train_config.replicated:
        return ddp.estimate_replicated(model_config, train_config, **kwargs)
    if train_config.sharded:
        found = fsdp.estimate_sharded(model_config, train_config, **kwargs)
        found.host_bytes += fsdp_offload_host_bytes(model_config, train_config)
        return found
    return single.estimate_single(model_config, train_config, **kwargs)


def fsdp_offload_host_bytes(model_config: Any, train_config: TrainConfig) -> int:
    """Host RAM (bytes) one rank holds under FSDP2 CPU offload (`offload="parameters"`; 0 otherwise): every
    parameter's shard in the weights' dtype, pinned (FSDP2's CPUOffloadPolicy, pin_memory=True as accelerate sets
    it: torch/distributed/fsdp/_fully_shard/_fsdp_param.py pins the sharded data), each trained parameter's gradient
    shard, copied to the host with non_blocking=True (torch's pinned host allocator: `zero_layout.pinned_bytes`
    rounds each to a power of two), and the optimizer state of the trained shards on the host, unpinned
    (`bound.optimizer_state_bytes`: AdamW's two moments in the weights' dtype). Shards are ceil(numel / world size).
    From FSDP2's source, not measured on a GPU yet."""
    if not train_config.sharded or train_config.offload != "parameters":
        return 0
    layout = zero.cached_layout(model_config, train_config)  # the parameters of the model as built (adapter too)
    width, ranks = DTYPE_BYTES[train_config.weights_dtype], train_config.world_size
    total = 0
    for param in layout.params:
        shard = -(-param.numel // ranks)
        total += pinned_bytes(shard * width)
        if param.trainable:
            total += pinned_bytes(shard * width) + optimizer_state_bytes(train_config, shard)
    return total


def check_trace_device(device: str | None) -> None:
    """Raise UsageError unless `device` is None, "cpu", or "cuda" with a GPU torch can see."""
    if device not in (None, "cpu", "cuda"):
        raise UsageError(f"trace device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--trace-device cuda needs a CUDA GPU that torch can see (this torch "
                             f"{torch.__version__} sees none): use --trace-device cpu, the GPU-free path")


def fits_under(model_config: Any, estimate_: Estimate, usable_bytes: int, device: str | None = None) -> bool:
    """Whether the step of `estimate_.config` fits a device with `usable_bytes` for it, dispatched as
    `estimate`: one GPU and DDP replay their events against that capacity, releasing the cache under
    pressure as torch does (so a step whose unconstrained peak reserved is above it can still fit);
    the sharded and the DeepSpeed estimates are sums of per-stream peaks with no single stream to replay, so
    their total must fit: `Estimate.total_bytes <= usable_bytes`."""
    config = estimate_.config
    if config.deepspeed:
        return estimate_.total_bytes <= usable_bytes
    if config.replicated:
        return ddp.fits_under(model_config, estimate_, usable_bytes, device)
    if config.sharded:
        return estimate_.total_bytes <= usable_bytes
    return single.fits_under(model_config, estimate_, usable_bytes, device)
