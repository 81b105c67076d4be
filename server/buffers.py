"""Large job buffers kept for the next job of the same size.

A freshly mapped buffer page-faults on its first write: on the 2-core test VM, receiving a
64 MiB tensor into fresh memory took about twice as long as into memory already touched,
the largest part of the gap between a large job's upload and raw gRPC streaming
(bench/transfer.py). Repeated jobs of one architecture ask for the same sizes again, so
freed buffers of at least `min_bytes` are kept, up to `max_bytes` in all, and handed out
again. A buffer returns to the pool only when the array it was handed out as is gone, and
with it every view: numpy views and torch.from_numpy tensors hold a reference to it.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections import OrderedDict

import numpy as np

MiB = 1 << 20


class BufferPool:
    def __init__(self, max_bytes: int, min_bytes: int = 4 * MiB):
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._free: OrderedDict[int, mmap.mmap] = OrderedDict()  # id -> buffer, oldest first
        self._free_bytes = 0
        self._lock = threading.Lock()  # buffers come back on whichever thread drops them
        self.reused = 0  # buffers handed out again

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def empty(self, nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array of nbytes; a kept buffer when one fits exactly."""
        if nbytes < self.min_bytes or self.max_bytes < nbytes:
            return np.empty(nbytes, dtype=np.uint8)
        buffer = self._take(nbytes)
        if buffer is None:
            buffer = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer faults on its first fill
        array = np.frombuffer(buffer, dtype=np.uint8)
        weakref.finalize(array, self._give_back, buffer)
        return array

    def _take(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            for key, buffer in self._free.items():
                if len(buffer) == nbytes:
                    del self._free[key]
                    self._free_bytes -= nbytes
                    self.reused += 1
                    return buffer
        return None

    def _give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._free[id(buffer)] = buffer
            self._free_bytes += len(buffer)
            while self._free_bytes > self.max_bytes:
                _, oldest = self._free.popitem(last=False)
                self._free_bytes -= len(oldest)
                oldest.close()  # unmapped now; nothing refers to it any more
