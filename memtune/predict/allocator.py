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

`ExpandableAllocator` models `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (one segment per pool that
grows by mapping pages). Known limitations: `max_split_size_mb` and `roundup_power2_divisions` are not
modelled; multi-stream reuse is not modelled.
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


@dataclass
class _Span:
    """A piece of an expandable segment's address space: mapped (free or allocated) or not."""

    address: int
    size: int
    mapped: bool
    allocated: bool = False
    prev: _Span | None = None
    next: _Span | None = None


class ExpandableAllocator:
    """The caching allocator with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (c10/cuda/
    CUDACachingAllocator.cpp, torch 2.11): each pool (small: requests <= 1 MiB; large) has one segment of
    virtual address space that grows by mapping pages (2 MiB small, 20 MiB large: `ExpandableSegment`'s
    segment size) instead of allocating new segments.

    - a request (rounded up to 512 bytes) takes the best-fitting free mapped block of its pool (smallest, then
      lowest address), as without expandable segments (`get_free_block`);
    - else `try_allocate_expandable_block`: from the lowest unmapped address, starting at the free mapped block
      just below it if there is one, map whole pages until the run of free and new memory holds the request;
      the new pages merge with that free block;
    - a block is split whenever >= 512 bytes remain, in both pools (`should_split`);
    - a freed block merges with free mapped neighbours; nothing is unmapped until memory runs out, when every
      page wholly inside a free block is unmapped (`release_cached_blocks` -> `unmap_block`) and the request is
      tried once more.
    Reserved is the mapped bytes. Same interface as `CachingAllocator`."""

    VIRTUAL = 1 << 46  # each pool's segment reserves far more address space than any device has

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity = capacity_bytes
        self.heads: dict[bool, _Span] = {}
        self.free_blocks: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small? -> (size, address)
        self.spans: dict[int, _Span] = {}  # address -> span (mapped or not)
        self.pool_of: dict[int, bool] = {}
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.flushes = 0
        for small, base in ((True, 1 << 48), (False, 1 << 50)):
            head = _Span(base, self.VIRTUAL, mapped=False)
            self.heads[small] = head
            self.spans[base] = head
            self.pool_of[base] = small

    def malloc(self, size: int) -> int | None:
        """Return the address of a block of at least `size` bytes, or None on OOM."""
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._take_free(size, small)
        if block is None:
            block = self._expand(size, small)
        if block is None:
            self._release_free_pages()
            self.flushes += 1
            block = self._expand(size, small)
        if block is None:
            return None
        if block.size - size >= MIN_BLOCK:
            self._insert_after(block, _Span(block.address + size, block.size - size, mapped=True), small)
            block.size = size
            self._insert_free(block.next, small)  # type: ignore[arg-type]
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.address

    def free(self, address: int) -> None:
        block = self.spans[address]
        small = self.pool_of[address]
        block.allocated = False
        self.allocated -= block.size
        block = self._merge_free(block, small)
        self._insert_free(block, small)

    # -- internals ---------------------------------------------------------------------------
    def _insert_free(self, block: _Span, small: bool) -> None:
        bisect.insort(self.free_blocks[small], (block.size, block.address))

    def _remove_free(self, block: _Span, small: bool) -> None:
        pool = self.free_blocks[small]
        del pool[bisect.bisect_left(pool, (block.size, block.address))]

    def _take_free(self, size: int, small: bool) -> _Span | None:
        pool = self.free_blocks[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        _, address = pool.pop(index)
        return self.spans[address]

    def _insert_after(self, block: _Span, new: _Span, small: bool) -> None:
        new.prev, new.next = block, block.next
        if block.next is not None:
            block.next.prev = new
        block.next = new
        self.spans[new.address] = new
        self.pool_of[new.address] = small

    def _unlink(self, block: _Span) -> None:
        if block.prev is not None:
            block.prev.next = block.next
        if block.next is not None:
            block.next.prev = block.prev
        del self.spans[block.address]
        del self.pool_of[block.address]

    def _merge_free(self, block: _Span, small: bool) -> _Span:
        """Merge `block` (free, mapped, not in the free list) with its free mapped neighbours."""
        after = block.next
        if after is not None and after.mapped and not after.allocated:
            self._remove_free(after, small)
            block.size += after.size
            self._unlink(after)
        before = block.prev
        if before is not None and before.mapped and not before.allocated:
            self._remove_free(before, small)
            before.size += block.size
            self._unlink(block)
            block = before
        return block

    def _expand(self, size: int, small: bool) -> _Span | None:
        """`try_allocate_expandable_block`: the lowest run of free and unmapped space that holds `size`, its
        unmapped part mapped as far as needed; None when mapping would exceed the capacity."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        span: _Span | None = self.heads[small]
        while span is not None:
            if not span.mapped:
                start = span.prev if span.prev is not None and span.prev.mapped and not span.prev.allocated \
                    else span
                room = 0
                cursor: _Span | None = start
                while cursor is not None and room < size and not cursor.allocated:
                    room += cursor.size
                    cursor = cursor.next
                if room >= size:
                    return self._map_run(start, size, page, small)
            span = span.next
        return None

    def _map_run(self, start: _Span, size: int, page: int, small: bool) -> _Span | None:
        """Map from `start` until the free run there holds `size` bytes (`try_allocate_expandable_block`); the run,
        out of the free list, or None when the capacity is reached (what was mapped stays mapped and free)."""
        candidate: _Span | None = start
        if not start.mapped:
            candidate = self._map_block(start, min(start.size, size), page, small)
        while candidate is not None and candidate.size < size:
            following = candidate.next
            assert following is not None and not following.mapped
            candidate = self._map_block(following, min(size - candidate.size, following.size), page, small)
        if candidate is not None:
            self._remove_free(candidate, small)
        return candidate

    def _map_block(self, block: _Span, size: int, page: int, small: bool) -> _Span | None:
        """`map_block`: map whole pages over the first `size` bytes of the unmapped `block`, then merge it with
        free mapped neighbours; the merged block, in the free list."""
        mapped = min(block.size, page * ((size + page - 1) // page))
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return None
        if mapped < block.size:
            self._insert_after(block, _Span(block.address + mapped, block.size - mapped, mapped=False), small)
            block.size = mapped
        block.mapped = True
        self.reserved += mapped
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = self._merge_free(block, small)
        self._insert_free(block, small)
        return block

    def _release_free_pages(self) -> None:
        """Unmap every page wholly inside a free block (`release_cached_blocks` -> `unmap_block`)."""
        for small in (True, False):
            page = SMALL_BUFFER if small else LARGE_BUFFER
            for _, address in list(self.free_blocks[small]):
                block = self.spans[address]
                end = block.address + block.size
                first, last = -(-block.address // page) * page, end // page * page
                if last <= first:
                    continue
                self._remove_free(block, small)
                self.reserved -= last - first
                if first > block.address:  # a free mapped piece stays below the unmapped pages
                    block.size = first - block.address
                    self._insert_free(block, small)
                    self._insert_after(block, _Span(first, last - first, mapped=False), small)
                    middle = block.next
                else:
                    block.mapped, block.size = False, last - first
                    middle = block
                assert middle is not None
                if last < end:  # and one above them
                    self._insert_after(middle, _Span(last, end - last, mapped=True), small)
                    self._insert_free(middle.next, small)  # type: ignore[arg-type]
                for neighbour in (middle.next, middle.prev):
                    if neighbour is not None and not neighbour.mapped:
                        low, high = (middle, neighbour) if neighbour is middle.next else (neighbour, middle)
                        low.size += high.size
                        self._unlink(high)
                        middle = low


def simulate(events: list[Event], capacity_bytes: int | None = None, expandable: bool = False) -> SimulationResult:
    """Replay allocation events (all on one stream: the caller splits streams); with `capacity_bytes`,
    also say whether they fit in that much memory; `expandable`: the allocator with expandable segments
    (`ExpandableAllocator`). A free of a storage never allocated is ignored."""
    allocator: CachingAllocator | ExpandableAllocator = (
        ExpandableAllocator(capacity_bytes) if expandable else CachingAllocator(capacity_bytes))
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
