"""The DDP memory model (predict/ddp.py) against torch's own DDP on CPU, and the DDP/FSDP speed terms."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from memtune.config import MIB, Adapter, TrainConfig
from memtune.errors import UsageError
from memtune.predict import ddp as replicate
from memtune.predict import throughput
from memtune.predict.ddp import (
    DDP_BUCKETS,
    ReplicaLayout,
    bucket_groups,
    construction_events,
    estimate_replicated,
    replica_layout,
)
from memtune.predict.estimate import estimate
from memtune.predict.trace import rounded
from memtune.recipe import step as recipe
from memtune.recipe.parallel import build_replicated_model, ddp_train_step
from memtune.sources import catalog_config, parameter_count
from tests.models import tiny_llama

DDP = TrainConfig(seq_len=16, micro_batch_size=2, num_gpus=2, strategy="ddp")


# ---- the layout, against torch ----------------------------------------------------------------------


@pytest.mark.parametrize("limits", [[1 * MIB, 25 * MIB], [250 * MIB], [2**62], [300, 5000]])
def test_bucket_groups_on_meta_tensors_are_torchs_on_real_ones(limits):
    """bucket_groups (torch's compute_bucket_assignment_by_size, reducer.cpp) groups the meta tensors of
    the layout exactly as DDP groups the real ones: per dtype, in order, closing a bucket at its limit."""
    shapes = [(100,), (3000, 700), (4,), (64, 64), (2, 2), (512, 512), (10,), (9000, 64), (1,), (700, 700)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16,
              torch.float32, torch.float32, torch.bfloat16, torch.float32]
    tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    expected, _ = dist._compute_bucket_assignment_by_size(tensors, limits, [False] * len(tensors))
    meta = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in zip(shapes, dtypes, strict=True)]
    assert bucket_groups(meta, limits) == [list(bucket) for bucket in expected]
    if limits == [300, 5000]:  # per dtype, in order; a bucket closes once it reaches the current limit
        assert bucket_groups(meta, limits)[:3] == [[0], [1], [2, 4, 5]]


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("adapter", [None, Adapter(rank=4)], ids=["full", "lora"])
def test_layout_buckets_are_what_torchs_reducer_allocates(one_process_group, one_thread, adapter):
    """One bucket per dtype holding every trainable parameter at construction; rebuilt after the first
    synchronised step into buckets of the same total (torch's own logging data says so)."""
    config = DDP.replace(adapter=adapter, grad_accum_steps=2)
    model_config = tiny_llama()
    layout = replica_layout(recipe.build_model(model_config, config.replace(num_gpus=1, strategy="fsdp"), "meta"))
    torch.manual_seed(0)
    model = build_replicated_model(model_config, config, "cpu")
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert layout.bucket_bytes == (trainable,)
    if adapter is not None:  # the frozen base is broadcast but has no bucket
        assert trainable < sum(p.numel() * p.element_size() for p in model.parameters()) / 4
    logged = model._get_ddp_logging_data()
    assert [int(size) for size in str(logged["bucket_sizes"]).split(",")] == list(layout.bucket_bytes)
    optimizer = recipe.make_optimizer(model)
    for _ in range(2):  # the second forward rebuilds the buckets in gradient-ready order
        batches = [recipe.random_batch(model_config, config, "cpu") for _ in range(config.grad_accum_steps)]
        ddp_train_step(model, optimizer, batches, config, device_type="cpu")
    logged = model._get_ddp_logging_data()
    assert logged["has_rebuilt_buckets"] == 1
    assert sum(int(size) for size in str(logged["rebuilt_bucket_sizes"]).split(",")) == layout.total_bucket_bytes


def test_construction_broadcasts_two_buckets_at_a_time_and_keeps_the_gradient_buckets():
    layout = ReplicaLayout(bucket_bytes=(4096, 1000), broadcast_bytes=(1024, 0, 2048, 3072))
    events = construction_events(layout)
    live, most = set(), 0
    for event in events:
        (live.add if event.kind == "alloc" else live.discard)(event.storage)
        most = max(most, sum(1 for key in live if key[0] == "ddp-broadcast"))
    assert most == 2  # comm.cpp: max_in_flight = 2; a lone tensor (0) is broadcast in place
    assert [e.num_bytes for e in events if e.kind == "alloc"] == [1024, 2048, 3072, 4096, rounded(1000)]
    assert live == {("ddp-bucket", 0), ("ddp-bucket", 1)}  # the buckets outlive construction
    # the flattened copies are freed in the order they were started
    assert [e.storage for e in events if e.kind == "free"] == [
        ("ddp-broadcast", 0),
        ("ddp-broadcast", 2),
        ("ddp-broadcast", 3),
    ]


# ---- the estimate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", [
    ("tiny", DDP.replace(grad_accum_steps=2)),
    ("gpt2", TrainConfig(seq_len=128, micro_batch_size=2, amp="bf16", num_gpus=4, strategy="ddp")),
])
def test_estimate_is_the_single_gpu_step_plus_the_buckets(name, config):
    model_config = tiny_llama() if name == "tiny" else catalog_config("gpt2")
    single = estimate(model_config, config.replace(num_gpus=1, strategy="fsdp"), device="cpu")
    ddp = estimate_replicated(model_config, config, device="cpu")
    layout = replicate.cached_layout(model_config, config)
    buckets = layout.total_bucket_bytes
    trainable = sum(p.numel() * p.element_size() for p in recipe.build_model(model_config, config, "meta").parameters())
    assert buckets == trainable  # a second copy of every trained parameter's gradient, in its dtype
    assert sum(layout.rebuilt_bucket_bytes) == trainable  # the rebuilt buckets hold the same gradients again
    # In the second step the construction buckets (kept by rank 1 on the H200) and the rebuilt ones coexist.
    both = rounded(buckets) + sum(rounded(size) for size in layout.rebuilt_bucket_bytes)
    ddp_breakdown, single_breakdown = dict(ddp.breakdown), dict(single.breakdown)
    assert ddp_breakdown.pop(DDP_BUCKETS) == both
    ddp_breakdown.pop("overhead"), single_breakdown.pop("overhead")
    assert ddp_breakdown == single_breakdown  # the same step, at the same moment of its peak
    if name == "tiny":  # small-pool blocks only: the allocator's accounting is exact
        assert ddp.peak_allocated_bytes == single.peak_allocated_bytes + both
    else:  # large blocks are not split for remainders under 1 MiB, which moves allocated by a few MiB
        assert abs(ddp.peak_allocated_bytes - single.peak_allocated_bytes - 2 * buckets) < 16 * MIB
    assert ddp.peak_reserved_bytes > single.peak_reserved_bytes
    assert ddp.config == config and ddp.config.describe().endswith("4 GPUs, DDP" if name == "gpt2" else "2 GPUs, DDP")


def test_fits_under_replays_the_ddp_step_against_the_budget():
    model_config = tiny_llama()
    ddp = estimate_replicated(model_config, DDP, device="cpu", context_bytes=0, workspace_bytes=0)
    assert replicate.fits_under(model_config, ddp, ddp.total_bytes)
    assert not replicate.fits_under(model_config, ddp, ddp.peak_allocated_bytes // 2)


def test_the_estimate_is_only_for_ddp():
    with pytest.raises(UsageError, match="strategy 'ddp' over several GPUs"):
        estimate_replicated(tiny_llama(), TrainConfig(seq_len=16, num_gpus=2), device="cpu")


def test_estimate_dispatch_sends_ddp_to_the_replicated_model():
    from memtune.fit import ModelPredictor

    model_config = tiny_llama()
    assert DDP_BUCKETS in estimate(model_config, DDP, device="cpu").breakdown
    predictor = ModelPredictor(model_config, parameter_count(model_config), throughput.gpu_speed("H100"), device="cpu")
    predicted = predictor.memory(DDP)
    assert DDP_BUCKETS in predicted.breakdown
    assert predictor.fits(predicted, predicted.total_bytes) and not predictor.fits(
        predicted, predicted.total_bytes // 4
    )


# ---- speed: DDP against FSDP ----------------------------------------------------------------------------


def shape_of(name: str) -> throughput.ModelShape:
    model_config = catalog_config(name)
    return throughput.ModelShape.of(model_config, parameter_count(model_config))


def test_ddp_is_predicted_faster_than_fsdp_for_a_small_model_and_keeps_the_single_gpu_compute():
    shape, speed = shape_of("Qwen/Qwen2.5-0.5B"), throughput.gpu_speed("H200")
    config = TrainConfig(seq_len=2048, micro_batch_size=4, amp="bf16", num_gpus=2)
    one = throughput.step_seconds(shape, config.replace(num_gpus=1), speed)
    ddp = throughput.step_seconds(shape, config.replace(strategy="ddp"), speed)
    fsdp = throughput.step_seconds(shape, config, speed)
    assert one < ddp < fsdp
    # what DDP adds over one GPU is its synchronisation, nothing else
    micro, backward = throughput.micro_batch_seconds(shape, config, speed)
    assert ddp - one == pytest.approx(
        throughput.ddp_sync_seconds(shape, config.replace(strategy="ddp"), speed, backward)
    )


def test_a_slower_link_exposes_more_of_the_all_reduce():
    shape = shape_of("meta-llama/Llama-3.2-1B")
    config = TrainConfig(seq_len=1024, micro_batch_size=1, amp="bf16", num_gpus=4, strategy="ddp")
    nvlink = throughput.gpu_speed("H100")
    pcie = nvlink.scaled(interconnect_bytes_per_second=nvlink.pcie_bytes_per_second)
    infinite = nvlink.scaled(interconnect_bytes_per_second=float("inf"))
    _, backward = throughput.micro_batch_seconds(shape, config, nvlink)
    seconds = [throughput.ddp_sync_seconds(shape, config, speed, backward) for speed in (infinite, nvlink, pcie)]
    assert seconds[0] < seconds[1] < seconds[2]
    gradient_bytes = shape.num_parameters * 4  # fp32 master weights under bf16-mixed
    copies = 4 * gradient_bytes / nvlink.memory_bytes_per_second
    assert seconds[0] == pytest.approx(copies)  # the bucket copies alone
    ring = 2 * 3 / 4
    # NVLink: the 4.9 GB all-reduce hides behind the backward but for the last bucket, the input embedding
    embedding = shape.vocab_size * shape.hidden_size * 4
    assert throughput.collective_seconds(gradient_bytes, ring, nvlink) < backward
    assert seconds[1] == pytest.approx(throughput.collective_seconds(embedding, ring, nvlink) + copies)
    # PCIe: it outlasts the backward, and the rest of it is exposed
    assert seconds[2] == pytest.approx(throughput.collective_seconds(gradient_bytes, ring, pcie) - backward + copies)


def test_fsdp_steps_a_shard_of_the_optimizer_and_pays_per_unit():
    shape, speed = shape_of("meta-llama/Llama-3.2-1B"), throughput.gpu_speed("H200")
    config = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", num_gpus=2)
    without_units = speed.scaled(fsdp_unit_seconds=0.0)
    more_gpus = throughput.step_seconds(shape, config.replace(num_gpus=8), without_units)
    assert more_gpus < throughput.step_seconds(shape, config, without_units)  # 1/8 of the optimizer step, not 1/2
    extra = throughput.step_seconds(shape, config, speed) - throughput.step_seconds(shape, config, without_units)
    assert extra == pytest.approx(throughput.fsdp_units(shape) * speed.fsdp_unit_seconds)
