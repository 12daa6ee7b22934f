"""The ranks' agreement after each micro-batch attempt: which ranks ran out of memory.

Several processes (`accelerate launch`, one per GPU) can step down together only if every rank ran out
of memory in the same attempt: then every collective issued so far is matched, and each rank can reset
and redo the step. If only some did, their NCCL collectives no longer match. So after every attempt of
a micro-batch, successful or not, every rank joins one small all-reduce: MAX of a flag per rank ("did I
run out of memory"), so every rank learns the same list of ranks that did.

It runs on a gloo process group of its own (on the CPU, made by `RankAgreement.create`, collective:
every rank creates it in the same order), so it never rides on the NCCL communicator that an OOM may have
left with unmatched collectives. Its timeout ends the wait when a healthy rank is stuck behind a
collective the failed rank never joined (a CUDA synchronisation blocks the host), or a rank has died.

`SingleProcess` is the no-op for one process: no group, no collective, no ranks.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from memtune.errors import MemtuneError

AGREEMENT_TIMEOUT_SECONDS = 300
"""How long a rank waits in the agreement for the others. A step of a plan that fits takes seconds; a
rank still missing after minutes is stuck behind a collective that a failed rank never joined, or has died."""


class AgreementFailed(MemtuneError):
    """The all-reduce did not complete: gloo's timeout (DistBackendError), or a rank that died."""


class SingleProcess:
    """The agreement of one process: nothing to agree on."""

    rank = 0
    world_size = 1
    timeout_seconds = 0.0

    def out_of_memory_ranks(self, out_of_memory: bool) -> list[int]:
        """Always [] (an event of a single process names no ranks); the process's own flag decides."""
        return []


class RankAgreement:
    """The agreement of `world_size` processes on a gloo group of their own. See the module docstring."""

    def __init__(self, group: Any, rank: int, world_size: int, timeout_seconds: float):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.timeout_seconds = timeout_seconds

    @classmethod
    def create(cls, timeout_seconds: float = AGREEMENT_TIMEOUT_SECONDS) -> RankAgreement:
        """A new gloo group of every rank of the default process group (collective: every rank calls it,
        in the same order relative to its other `new_group` calls; torch.distributed `new_group`)."""
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
        return cls(group, dist.get_rank(), dist.get_world_size(), timeout_seconds)

    def out_of_memory_ranks(self, out_of_memory: bool) -> list[int]:
        """The ranks that ran out of memory in this attempt, the same list on every rank ([] when none did).

        Raises AgreementFailed (with the first line of gloo's error) when the others do not join within
        `timeout_seconds`, or a rank has died.
        """
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = int(out_of_memory)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as error:  # gloo's timeout (DistBackendError), or a rank that died
            text = str(error).strip() or type(error).__name__
            raise AgreementFailed(text.splitlines()[0][:300]) from error
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]


Agreement = SingleProcess | RankAgreement
"""Either kind: both have rank, world_size, timeout_seconds and out_of_memory_ranks."""
