"""A bound on Triton's on-disk cache of compiled kernels.

Triton writes every kernel it compiles to its cache directory (TRITON_CACHE_DIR, default
~/.triton/cache): one entry (a directory of IR, PTX, cubin and metadata) per
specialisation, 1 to 6 MB for a fused MLP kernel, never removed. A server fed ever-new
architectures would fill its disk. prune() removes the least recently used entries until
the cache fits a byte budget; a removed entry costs a compile when it is next needed.

"Recently used" is an entry's modification time: Triton sets it when it writes the entry,
and kernels.compiled_kernels touches the entries of the kernels it holds before dropping
them from memory, so the kernels in use are the last to go. Entries modified within the
last `min_age_s` are never removed: another process sharing the directory may be writing
them. Removing an entry another process is reading at that instant fails that process's
load, so servers on one host should not share a cache directory they each bound.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

# Entries modified this recently are never removed (another process may be writing them).
MIN_AGE_S = 60.0


def cache_dir() -> Path | None:
    """The directory Triton compiles into, or None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4
        return Path(knobs.cache.dir)
    from triton.runtime.cache import default_cache_dir

    return Path(os.environ.get("TRITON_CACHE_DIR") or default_cache_dir())


def entry_of(compiled_kernel) -> Path | None:
    """The cache entry a compiled kernel was loaded from (the directory of its files)."""
    group = getattr(compiled_kernel, "metadata_group", None) or {}
    for path in group.values():
        return Path(path).parent
    return None


class Entry(NamedTuple):
    path: Path
    bytes: int
    modified: float  # seconds since the epoch


def size(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed by whoever is writing it, or not ours to read
                pass
    return total


def entries(root: Path) -> list[Entry]:
    """The cache's entries, oldest first (loose files at the top level are not Triton's
    entries and are left out)."""
    found = []
    try:
        children = list(os.scandir(root))
    except OSError:  # no cache yet, or one this process may not read
        return []
    for child in children:
        try:
            if not child.is_dir(follow_symlinks=False):
                continue
            modified = child.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        found.append(Entry(Path(child.path), size(Path(child.path)), modified))
    return sorted(found, key=lambda entry: (entry.modified, entry.path.name))


def touch(paths) -> None:
    """Mark entries as just used."""
    for path in paths:
        try:
            os.utime(path)
        except OSError:  # gone, or not ours: it just ages
            pass


class Pruned(NamedTuple):
    removed: int  # entries removed
    bytes_before: int
    bytes_after: int


def prune(root: Path, max_bytes: int, *, min_age_s: float = MIN_AGE_S, now=None) -> Pruned:
    """Remove the oldest entries until the cache holds at most `max_bytes` (or only entries
    younger than `min_age_s` are left). Never raises for the file system: an entry it may
    not remove is skipped (it runs after a job, which must not fail for a cache)."""
    now = time.time() if now is None else now
    found = entries(root)
    before = total = sum(entry.bytes for entry in found)
    removed = 0
    for entry in found:
        if total <= max_bytes or now - entry.modified < min_age_s:
            break
        # Renamed first, so no reader finds half an entry under its own name.
        doomed = entry.path.with_name(f".pruned-{entry.path.name}-{os.getpid()}")
        try:
            entry.path.rename(doomed)
        except OSError:  # gone already, or not ours to remove
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        total -= entry.bytes
        removed += 1
    return Pruned(removed, before, total)
