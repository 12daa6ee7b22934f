"""Traces, estimates and trial measurements kept on disk between runs, so a second `memtune plan` or `fit` of the
same model is near-instant.

A shallow trace (`single.cached_trace`: a few decoder layers of one training configuration) is a few tens of KiB
pickled and costs 0.3-2 s to make on the CPU. It is stored under `$MEMTUNE_CACHE_DIR` (default
`$XDG_CACHE_HOME/memtune`, else `~/.cache/memtune`) in `traces/<sha256>.pickle`, keyed by everything it depends
on: the model config, the traced depth, the training configuration and the trace path (the caller's key), the
versions of torch, transformers, peft and bitsandbytes, and a hash of memtune's own source, so a changed model,
library or memtune misses. `MEMTUNE_NO_CACHE=1` turns it off. Entries are written atomically (a temporary file
renamed into place); one that cannot be read is traced again, never trusted; a cache that cannot be written is
skipped silently (a read-only home, a full disk): it only saves time.

The same store holds, each under a key that starts with its kind (`key_of`):
- "estimate": the finished Estimate of one configuration (`fit.ModelPredictor.memory`): the shallow trace extended
  to full depth and replayed through the allocator model is the warm fit's main cost (a second or two each on the
  CPU); keyed by the model config, the configuration, the trace device, the workspaces and the context.
- "fits": the replay of an estimate's step against a device of a given size (`fit.ModelPredictor.fits`).
- "trial": a verified trial measurement (`fit.cached_trial`), keyed besides by the GPU's name, total memory and
  driver, torch's CUDA version, the budget the trial ran under (the emulated cap) and the trial's steps.
All of them are keyed by `fingerprint()` too: a new torch, transformers or memtune misses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from memtune.config import cache_home

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "torchao")
"""Packages whose version is part of the key: the traced ops and the model code are theirs."""


def cache_dir() -> Path | None:
    """Where traces are kept, or None when caching is off (MEMTUNE_NO_CACHE): `config.cache_home()`/traces."""
    home = cache_home()
    return home / "traces" if home is not None else None


@functools.cache
def fingerprint() -> str:
    """The libraries' versions and a hash of memtune's source files (computed once per process, ~5 ms)."""
    digest = hashlib.sha256()
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none;".encode())
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key_of(kind: str, *parts: Any) -> str:
    """The cache key of `kind` ("estimate", "fits", "trial") over `parts` (JSON-serialisable values: a config's
    `to_dict()`, a model config's `to_json_string()`, names, byte counts), in a canonical JSON form."""
    return json.dumps([kind, *parts], sort_keys=True)


def _path(key: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    return root / f"{hashlib.sha256((fingerprint() + key).encode()).hexdigest()}.pickle"


def load(key: str) -> Any | None:
    """The object stored under `key`, or None (not cached, caching off, or an unreadable entry)."""
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: trace again
        return None


def store(key: str, value: Any) -> None:
    """Keep `value` under `key`; does nothing when caching is off or the directory cannot be written."""
    path = _path(key)
    if path is None:
        return
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as file:
            temporary = Path(file.name)
            pickle.dump(value, file, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
    except Exception:  # noqa: BLE001 - an unwritable directory, a full disk, an object pickle refuses
        if temporary is not None:
            temporary.unlink(missing_ok=True)
