"""The vocabulary of a traced step, free of torch: allocation events, breakdown categories, the allocator's block
size. `predict.trace` makes them; the allocator model, the peak and the search read them (so `memtune --help`
starts without importing torch)."""

from __future__ import annotations

import math
from collections.abc import Hashable
from enum import Enum
from typing import NamedTuple

BLOCK_BYTES = 512  # the caching allocator rounds every request up to a multiple of 512 bytes


class Category(str, Enum):
    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    """The LM head's logits, the loss, and their gradients: large for 128k-256k vocabularies."""
    TEMPORARIES = "temporaries"
    OVERHEAD = "overhead"


def rounded(num_bytes: int) -> int:
    """`num_bytes` rounded up to the allocator's 512-byte blocks (c10/cuda/CUDACachingAllocator.cpp
    `round_size`); 0 stays 0."""
    return max(BLOCK_BYTES, math.ceil(num_bytes / BLOCK_BYTES) * BLOCK_BYTES) if num_bytes else 0


NO_LAYER = -1
COMPUTE_STREAM = 0
"""The default stream, where the step's own tensors live; FSDP's copy-in and reduce-scatter streams are 1, 2, ..."""


class Event(NamedTuple):
    """One allocation or free in a traced step, as the caching allocator would see it."""

    kind: str
    """"alloc" or "free"."""
    storage: Hashable
    """Identifies the storage within its event stream: a free names the storage of an earlier alloc. An
    extended stream gives each copy of a repeated layer's storage its own."""
    num_bytes: int
    """Bytes requested, rounded up to 512 (`rounded`); 0 for a free."""
    layer: int
    """The decoder layer running when it happened (NO_LAYER outside them)."""
    source: Hashable
    """The storage's id in the trace it comes from: the key of `Trace.categories` (equal to `storage` in
    a trace's own events; the traced storage a copy was made from in an extended stream)."""
    stream: int = COMPUTE_STREAM
    """The stream the storage was allocated on: the caching allocator keeps free blocks per stream."""

    @classmethod
    def alloc(cls, storage: Hashable, num_bytes: int, layer: int = NO_LAYER, stream: int = COMPUTE_STREAM) -> Event:
        """A storage's allocation, in its own category (`source` is the storage)."""
        return cls("alloc", storage, num_bytes, layer, storage, stream)

    @classmethod
    def free(cls, storage: Hashable, layer: int = NO_LAYER, stream: int = COMPUTE_STREAM) -> Event:
        return cls("free", storage, 0, layer, storage, stream)


DDP_BUCKETS = "ddp_buckets"
"""Breakdown key: DDP's gradient buckets (a second copy of the trainable parameters' gradients)."""
