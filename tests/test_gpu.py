"""On a GPU: the fake-CUDA trace against a real step, and memory given back after a trial."""

from __future__ import annotations

import pytest

from memtune.config import TrainConfig
from memtune.sources import catalog_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp,checkpointing", [("none", False), ("bf16", True)])
def test_fake_cuda_trace_matches_a_real_step(amp, checkpointing):
    from memtune.measure import verify
    from memtune.predict.estimate import estimate

    model = catalog_config("gpt2")
    config = TrainConfig(seq_len=512, micro_batch_size=4, amp=amp, gradient_checkpointing=checkpointing)
    measured = verify.measure(model, config, steps=3)
    predicted = estimate(model, config, device="cuda")
    assert measured.fits
    assert abs(predicted.peak_allocated_bytes / measured.peak_allocated_bytes - 1) < 0.02
    assert abs(predicted.peak_reserved_bytes / measured.peak_reserved_bytes - 1) < 0.05


def test_offloaded_activations_leave_the_gpu_as_predicted():
    """A real step with the checkpointed layers' inputs in pinned host memory: its peak reserved as the fake-CUDA
    trace predicts, below the same step's without the offload, and the pinned bytes torch's host allocator took."""
    import torch

    from memtune.measure import verify
    from memtune.predict.estimate import estimate

    model = catalog_config("gpt2")
    config = TrainConfig(seq_len=1024, micro_batch_size=8, amp="bf16", gradient_checkpointing=True, loss="chunked")
    offloaded = config.replace(offload_activations=True)
    kept = verify.measure(model, config, steps=3)
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})
    before = stats().get("allocated_bytes.current", 0)
    moved = verify.measure(model, offloaded, steps=3)
    predicted = estimate(model, offloaded, device="cuda")
    assert kept.fits and moved.fits and moved.peak_reserved_bytes < kept.peak_reserved_bytes
    assert abs(predicted.peak_reserved_bytes / moved.peak_reserved_bytes - 1) < 0.05
    pinned = stats().get("allocated_bytes.current", 0) - before
    if stats():  # the pinned blocks stay cached: what the step added is at most the prediction
        assert 0 < pinned <= predicted.host_bytes


def test_memory_returns_to_baseline_after_a_trial_and_after_an_oom():
    import torch

    from memtune.measure import memory, verify

    memory.warm_up()
    baseline = torch.cuda.memory_allocated()
    model = catalog_config("gpt2")
    assert verify.measure(model, TrainConfig(seq_len=256, micro_batch_size=2), steps=1).fits
    assert torch.cuda.memory_allocated() == baseline
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2 * 2**30 / total)
    try:
        result = verify.measure(model, TrainConfig(seq_len=1024, micro_batch_size=16), steps=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert not result.fits and "out of memory" in result.error.lower()
    assert torch.cuda.memory_allocated() == baseline
    assert torch.cuda.memory_reserved() <= baseline + 64 * 2**20


def test_fit_under_a_budget_verifies_the_winner_and_gives_memory_back():
    import torch

    from memtune.config import GIB
    from memtune.fit import fit_model
    from memtune.measure import memory
    from memtune.search.choose import VERIFIED
    from memtune.sources import parameter_count, resolve

    memory.warm_up()
    baseline = torch.cuda.memory_allocated()
    source = resolve("gpt2")
    # 6 GiB: gpt2 at 16 x 1024 in bf16 needs ~25 GiB without checkpointing, so the search must escalate.
    result = fit_model(source, parameter_count(source.config), 1024, 16, budget_bytes=6 * GIB, trial_steps=2)
    chosen = result.search.chosen
    assert chosen is not None and chosen.status == VERIFIED
    assert chosen.config.effective_batch_size == 16
    assert chosen.measured_total_bytes <= 6 * GIB
    assert result.search.trials <= 3
    assert torch.cuda.memory_allocated() == baseline
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        assert getter(0) == 1.0  # the budget emulated for the trial was lifted afterwards
