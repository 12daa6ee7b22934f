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
