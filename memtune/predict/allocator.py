"""A model of PyTorch's CUDA caching allocator: allocation events -> reserved memory.

What decides an out-of-memory error is not the bytes allocated but the segments the caching
allocator holds (reserved) plus what it must newly request from the driver. This replays a
stream of `trace.Event`s (alloc: storage, bytes; free: storage) through the same rules as
c10/cuda/CUDACachingAllocator.cpp (default settings, one stream):

- requests are rounded up to 512 bytes; those <= 1 MiB go to the small pool, larger ones to the
  large pool;
- a new segment is 2 MiB for small requests, 20 MiB for requests under 10 MiB, and otherwise the
  request rounded up to 2 MiB;
- a request takes the best-fitting free block of its pool (smallest size, then lowest address),
  splitting it when the remainder is >= 512 B (small pool) or > 1 MiB (large pool);
- a freed block merges with free neighbours of the same segment;
- when a new segment would exceed the device's capacity, every wholly free segment is released
  (cudaFree) and the request retried once; if it still does not fit, that is an OOM.

Known limitations: `expandable_segments:True`, `max_split_size_mb` and
`roundup_power2_divisions` are not modelled; multi-stream reuse is not modelled.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass

from memtune.predict.events import Event

KB = 1024
MB = 1024 * KB
MIN_BLOCK = 512
SMALL_SIZE = 1 * MB  # largest request served from the small pool
SMALL_BUFFER = 2 * MB  # segment size for small requests
MIN_LARGE_ALLOC = 10 * MB
LARGE_BUFFER = 20 * MB  # segment size for requests under MIN_LARGE_ALLOC
ROUND_LARGE = 2 * MB


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


@dataclass
class _Block:
    address: int
    size: int
    segment: int
    small: bool
    allocated: bool = False
    prev: _Block | None = None
    next: _Block | None = None


@dataclass
class SimulationResult:
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    fits: bool = True
    """False when a request could not be served within `capacity_bytes` even after releasing the cache."""
    cache_flushes: int = 0
    """Times the cache was released to make room (num_alloc_retries in torch's memory_stats)."""


class CachingAllocator:
    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity = capacity_bytes
        self.pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small? -> sorted (size, address)
        self.blocks: dict[int, _Block] = {}  # address -> block
        self.segments: dict[int, int] = {}  # segment id -> size
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.flushes = 0
        self._next_address = 1 << 62  # new segments go downwards from here (see _new_segment)
        self._next_segment = 0

    # -- public ------------------------------------------------------------------------------
    def malloc(self, size: int) -> int | None:
        """Return the address of a block of at least `size` bytes, or None on OOM."""
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._take_free(size, small)
        if block is None:
            block = self._new_segment(size, small)
        if block is None:
            self._release_free_segments()
            self.flushes += 1
            block = self._new_segment(size, small)
        if block is None:
            return None
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.address + size, remaining, block.segment, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self.blocks[rest.address] = rest
            self._insert_free(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.address

    def free(self, address: int) -> None:
        block = self.blocks[address]
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                del self.blocks[neighbour.address]
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    del self.blocks[block.address]
                    self.blocks[neighbour.address] = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._insert_free(block)

    # -- internals ---------------------------------------------------------------------------
    def _insert_free(self, block: _Block) -> None:
        bisect.insort(self.pools[block.small], (block.size, block.address))

    def _remove_free(self, block: _Block) -> None:
        pool = self.pools[block.small]
        index = bisect.bisect_left(pool, (block.size, block.address))
        del pool[index]

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self.pools[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        _, address = pool.pop(index)
        return self.blocks[address]

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        seg_bytes = segment_size(size)
        if self.capacity is not None and self.reserved + seg_bytes > self.capacity:
            return None
        segment = self._next_segment
        self._next_segment += 1
        # cudaMalloc hands out each new segment below the ones before it (the H200 histories of
        # benchmarks/single_history.py: every segment address lower than the last), and best-fit breaks
        # ties between equal free blocks by the lowest address: the newest segment's block wins. The gap
        # keeps segments from ever touching.
        self._next_address -= seg_bytes + ROUND_LARGE
        block = _Block(self._next_address, seg_bytes, segment, small)
        self.blocks[block.address] = block
        self.segments[segment] = seg_bytes
        self.reserved += seg_bytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _release_free_segments(self) -> None:
        for small in (True, False):
            keep = []
            for size, address in self.pools[small]:
                block = self.blocks[address]
                if block.prev is None and block.next is None:  # the block is a whole free segment
                    self.reserved -= self.segments.pop(block.segment)
                    del self.blocks[address]
                else:
                    keep.append((size, address))
            self.pools[small] = keep


def simulate(events: list[Event], capacity_bytes: int | None = None) -> SimulationResult:
    """Replay allocation events (all on one stream: the caller splits streams); with `capacity_bytes`,
    also say whether they fit in that much memory. A free of a storage never allocated is ignored."""
    allocator = CachingAllocator(capacity_bytes)
    addresses: dict[Hashable, int] = {}
    for event in events:
        if event.kind == "alloc":
            address = allocator.malloc(event.num_bytes)
            if address is None:
                return SimulationResult(allocator.peak_allocated, allocator.peak_reserved, False, allocator.flushes)
            addresses[event.storage] = address
        else:
            address = addresses.pop(event.storage, None)
            if address is not None:
                allocator.free(address)
    return SimulationResult(allocator.peak_allocated, allocator.peak_reserved, True, allocator.flushes)
