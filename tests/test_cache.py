"""The disk cache of traces (memtune/predict/cache.py): a second prediction of the same step reads it; a changed
configuration, library version or memtune source misses; a broken entry is traced again."""

from __future__ import annotations

import pytest

from memtune.config import TrainConfig
from memtune.predict import cache, single

CONFIG = TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16")


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(single, "_TRACE_CACHE", {})  # the in-process cache would answer first
    traced = []
    real = single._trace_with_fallback

    def counting(*args, **kwargs):
        traced.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(single, "_trace_with_fallback", counting)
    return tmp_path, traced


def forget(monkeypatch) -> None:
    monkeypatch.setattr(single, "_TRACE_CACHE", {})  # as a new process starts


def test_a_second_run_reads_the_trace_from_disk(disk_cache, monkeypatch):
    from benchmarks.cases import tiny_llama

    root, traced = disk_cache
    first = single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    assert len(traced) == 1 and len(list((root / "traces").glob("*.pickle"))) == 1
    forget(monkeypatch)
    second = single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    assert len(traced) == 1  # not traced again
    assert second.events == first.events and second.categories == first.categories
    forget(monkeypatch)
    single.cached_trace(tiny_llama(2), CONFIG.replace(micro_batch_size=4), "cpu")  # another step: a miss
    assert len(traced) == 2


def test_a_changed_library_version_or_memtune_source_misses(disk_cache, monkeypatch):
    from benchmarks.cases import tiny_llama

    _, traced = disk_cache
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    forget(monkeypatch)
    monkeypatch.setattr(cache, "fingerprint", lambda: "torch=9.9;...")  # another torch, or memtune changed
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    assert len(traced) == 2


def test_a_changed_model_config_misses_and_the_same_config_rebuilt_hits(disk_cache, monkeypatch):
    """The key holds the model config's values, not the object: a config read again from disk hits, one that
    differs in a single field (a wider MLP, an untied head) misses."""
    from benchmarks.cases import tiny_llama

    _, traced = disk_cache
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    for change in ({"intermediate_size": 192}, {"tie_word_embeddings": not tiny_llama(2).tie_word_embeddings}):
        forget(monkeypatch)
        changed = tiny_llama(2)
        for name, value in change.items():
            setattr(changed, name, value)
        single.cached_trace(changed, CONFIG, "cpu")
    assert len(traced) == 3
    forget(monkeypatch)
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")  # a new object with the first values
    assert len(traced) == 3


def test_a_broken_entry_is_traced_again_and_the_cache_can_be_off(disk_cache, monkeypatch):
    from benchmarks.cases import tiny_llama

    root, traced = disk_cache
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    (entry,) = (root / "traces").glob("*.pickle")
    entry.write_bytes(b"not a pickle")
    forget(monkeypatch)
    single.cached_trace(tiny_llama(2), CONFIG, "cpu")
    assert len(traced) == 2
    monkeypatch.setenv("MEMTUNE_NO_CACHE", "1")
    assert cache.cache_dir() is None and cache.load("anything") is None
    cache.store("anything", 1)  # nowhere: does nothing


def test_an_unwritable_cache_directory_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(blocker))  # traces/ cannot be made under a file
    cache.store("key", {"a": 1})
    assert cache.load("key") is None


def test_a_second_sharded_plan_reads_its_trace_from_disk(tmp_path, monkeypatch):
    """The FSDP trace (predict/fsdp.py) is cached on disk too: a new process's second plan of the same sharded step
    does not trace again, and predicts the same bytes."""
    from benchmarks.cases import tiny_llama
    from memtune.predict import fsdp

    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fsdp, "_TRACE_CACHE", {})
    traced = []
    real = fsdp.trace_sharded
    monkeypatch.setattr(fsdp, "trace_sharded", lambda *args: traced.append(args[1]) or real(*args))
    config = TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", num_gpus=2)
    first = fsdp.estimate_sharded(tiny_llama(5), config)
    monkeypatch.setattr(fsdp, "_TRACE_CACHE", {})  # as a new process starts
    second = fsdp.estimate_sharded(tiny_llama(5), config)
    assert len(traced) == 1 and list(tmp_path.glob("traces/*.pickle"))
    assert (second.peak_allocated_bytes, second.peak_reserved_bytes) == (
        first.peak_allocated_bytes, first.peak_reserved_bytes)


# -- finished estimates and trial measurements (fit.ModelPredictor, fit.cached_trial) --------------------------------


@pytest.fixture
def counted_estimates(tmp_path, monkeypatch):
    """A disk cache in tmp_path, and the list of configurations `fit.estimate` really predicted."""
    from memtune import fit

    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    predicted = []
    real = fit.estimate
    monkeypatch.setattr(fit, "estimate", lambda model_config, config, **kwargs: predicted.append(config) or real(
        model_config, config, **kwargs))
    return predicted


def predictor_of(model_config, context_bytes: int = 500 * 2**20, workspace_bytes: int = 8 * 2**20):
    """A new process's ModelPredictor (its in-process cache empty), tracing on the CPU."""
    from memtune.fit import ModelPredictor
    from memtune.predict import throughput

    return ModelPredictor(model_config, 10**6, throughput.gpu_speed("H100"), device="cpu",
                          context_bytes=context_bytes, workspace_bytes=workspace_bytes)


def test_a_second_fit_reads_the_finished_estimate_and_its_replay_from_disk(counted_estimates, monkeypatch):
    from benchmarks.cases import tiny_llama
    from memtune import fit

    first = predictor_of(tiny_llama(2)).memory(CONFIG)
    assert len(counted_estimates) == 1
    assert predictor_of(tiny_llama(2)).fits(first, first.total_bytes) is True
    monkeypatch.setattr(fit, "fits_under", lambda *args: pytest.fail("replayed again"))
    again = predictor_of(tiny_llama(2))
    second = again.memory(CONFIG)
    assert len(counted_estimates) == 1  # not predicted again
    assert (second.peak_reserved_bytes, second.total_bytes, second.breakdown) == (
        first.peak_reserved_bytes, first.total_bytes, first.breakdown)
    assert again.fits(second, second.total_bytes) is True  # the replay's answer from disk


def test_an_estimate_key_misses_on_a_changed_step_model_or_library_and_keeps_the_new_context(counted_estimates,
                                                                                               monkeypatch):
    """Another configuration, model config, trace device or library version is predicted again; another process's
    CUDA context and workspaces (measured anew by each probe) only move the totals of the cached estimate."""
    from benchmarks.cases import tiny_llama

    first = predictor_of(tiny_llama(2)).memory(CONFIG)
    predictor_of(tiny_llama(2)).memory(CONFIG.replace(micro_batch_size=4))
    changed = tiny_llama(2)
    changed.intermediate_size = 192
    predictor_of(changed).memory(CONFIG)
    assert len(counted_estimates) == 3
    shifted = predictor_of(tiny_llama(2), context_bytes=600 * 2**20, workspace_bytes=16 * 2**20).memory(CONFIG)
    assert len(counted_estimates) == 3
    assert shifted.peak_reserved_bytes == first.peak_reserved_bytes
    assert shifted.total_bytes == first.total_bytes + 100 * 2**20 + 8 * 2**20
    assert shifted.breakdown["overhead"] == first.breakdown["overhead"] + 108 * 2**20
    monkeypatch.setattr(cache, "fingerprint", lambda: "torch=9.9;...")
    predictor_of(tiny_llama(2)).memory(CONFIG)
    assert len(counted_estimates) == 4
    monkeypatch.setenv("MEMTUNE_NO_CACHE", "1")
    predictor_of(tiny_llama(2)).memory(CONFIG)
    assert len(counted_estimates) == 5


def gpu_info(**changes):
    from memtune.measure.probe import GpuInfo

    fields = {"index": 0, "name": "NVIDIA H200", "total_bytes": 140 * 2**30, "free_bytes": 139 * 2**30,
              "used_by_others_bytes": 0, "other_processes": 0, "capability": "9.0", "bf16_supported": True,
              "context_bytes": 600 * 2**20, "driver_version": "580.1"}
    return GpuInfo(**{**fields, **changes})


def test_a_trial_measurement_is_reused_on_the_same_card_budget_and_libraries_only(tmp_path, monkeypatch):
    from benchmarks.cases import tiny_llama
    from memtune.fit import cached_trial
    from memtune.measure.memory import Measurement

    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    runs = []

    def run(config):
        runs.append(config)
        return Measurement(fits=True, peak_reserved_bytes=2**30, step_seconds=[0.2, 0.1], tokens_per_step=64)

    def trial(model_config=None, config=CONFIG, gpu=None, budget=40 * 2**30, steps=2, torch_cuda="13.0"):
        return cached_trial(model_config or tiny_llama(2), config, gpu or gpu_info(), budget, steps, run,
                            torch_cuda=torch_cuda)

    measurement, from_cache = trial()
    assert not from_cache and len(runs) == 1
    again, from_cache = trial()
    assert from_cache and len(runs) == 1 and again.peak_reserved_bytes == measurement.peak_reserved_bytes
    changed = tiny_llama(2)
    changed.intermediate_size = 192
    for miss in ({"config": CONFIG.replace(micro_batch_size=4)}, {"model_config": changed},
                 {"gpu": gpu_info(name="NVIDIA H100 80GB HBM3")}, {"gpu": gpu_info(total_bytes=80 * 2**30)},
                 {"gpu": gpu_info(driver_version="590.2")}, {"budget": 24 * 2**30}, {"steps": 3},
                 {"torch_cuda": "12.8"}):
        before = len(runs)
        assert trial(**miss)[1] is False and len(runs) == before + 1, miss
    monkeypatch.setattr(cache, "fingerprint", lambda: "transformers=9.9;...")
    assert trial()[1] is False and len(runs) == 10
    monkeypatch.undo()
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MEMTUNE_NO_CACHE", "1")
    assert trial()[1] is False and trial()[1] is False and len(runs) == 12


def test_a_trial_out_of_memory_is_not_kept(tmp_path, monkeypatch):
    from benchmarks.cases import tiny_llama
    from memtune.fit import cached_trial
    from memtune.measure.memory import Measurement

    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    runs = []

    def run(config):
        runs.append(config)
        return Measurement(fits=False, error="CUDA out of memory")

    for _ in range(2):
        assert cached_trial(tiny_llama(2), CONFIG, gpu_info(), 2**30, 2, run)[1] is False
    assert len(runs) == 2
