"""The caching-allocator model: its rules, and a replay of a real allocator trace from an H200."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from memtune.predict.allocator import (
    MB,
    CachingAllocator,
    round_size,
    segment_size,
    simulate,
)
from memtune.predict.trace import Event

DATA = Path(__file__).parent / "data"


def test_rounding_and_segment_sizes_follow_the_caching_allocator():
    assert round_size(1) == 512
    assert round_size(513) == 1024
    assert segment_size(1 * MB) == 2 * MB  # small pool
    assert segment_size(1 * MB + 512) == 20 * MB  # large request under 10 MiB
    assert segment_size(11 * MB) == 12 * MB  # rounded up to 2 MiB


def test_freed_block_is_reused_and_split_remainder_stays_free():
    allocator = CachingAllocator()
    first = allocator.malloc(4 * MB)  # a 20 MiB segment, split
    second = allocator.malloc(4 * MB)  # fits in the remainder: no new segment
    assert allocator.reserved == 20 * MB
    assert second == first + 4 * MB
    allocator.free(first)
    allocator.free(second)
    assert allocator.malloc(8 * MB) == first  # the freed neighbours merged back
    assert allocator.reserved == 20 * MB


def test_best_fit_prefers_the_smallest_block_that_fits():
    allocator = CachingAllocator()
    big = allocator.malloc(40 * MB)
    small = allocator.malloc(12 * MB)
    allocator.free(big)
    allocator.free(small)
    assert allocator.malloc(11 * MB) == small


def test_capacity_releases_cached_segments_before_giving_up():
    events = [Event.alloc(1, 30 * MB), Event.free(1), Event.alloc(2, 50 * MB)]
    unlimited = simulate(events)
    assert unlimited.peak_reserved_bytes == 80 * MB
    capped = simulate(events, capacity_bytes=60 * MB)
    assert capped.fits and capped.cache_flushes == 1 and capped.peak_reserved_bytes == 50 * MB
    assert not simulate(events, capacity_bytes=40 * MB).fits


def test_replaying_a_real_trace_reproduces_its_peak_reserved():
    """Events recorded by torch.cuda.memory._record_memory_history for gpt2 4x512 fp32 on an H200."""
    recorded = json.load(gzip.open(DATA / "h200_trace_gpt2_4x512_fp32.json.gz", "rt"))
    events, reserved, peak_reserved, segments = [], 0, 0, set()
    for action, address, size in recorded["events"]:
        if action == "alloc":
            events.append(Event.alloc(address, size))
        elif action == "free_completed":
            events.append(Event.free(address))
        elif action == "segment_alloc":
            segments.add(address)
            reserved += size
            peak_reserved = max(peak_reserved, reserved)
        elif action == "segment_free" and address in segments:
            reserved -= size
    result = simulate(events)
    assert abs(result.peak_reserved_bytes - peak_reserved) / peak_reserved < 0.002
