"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: str) -> Iterator[BinaryIO]:
    """A file to write `path`'s new bytes to: written beside it, then renamed over it. No
    reader sees half a file, an interrupted write leaves the old one whole, and a file
    still mapped (a job file's tensors are views of theirs: the parameters a run continues
    from, its results saved to the same path) keeps its bytes for its readers."""
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
