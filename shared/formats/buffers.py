"""Byte buffers reused from shard to shard.

A tar shard of 256 SDXL samples is ~115 MB, a zarr shard's text-state chunk ~80 MB. A fresh buffer of that size
costs the kernel a page fault per 4 KiB page (or a 2 MiB huge-page clear, after compacting memory) on its first
write: measured on the 2-core bench machine, that was as much system time as the copy out of the page cache, and
it varied from run to run with how fragmented memory was. A reader that reads shard after shard takes its
buffers from a `BufferPool` instead, so after the first few shards no read touches a new page.

A pooled buffer is handed out again only when nothing refers to it: the samples of a shard are views of its
buffer (and the tensors made from them hold those views), so while any of them is alive the buffer's reference
count says so, and the pool allocates another. Reuse therefore never changes an array someone still holds.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

#: smaller requests are served by a fresh `np.empty` (the C allocator reuses those well)
MIN_BYTES = 1 << 20
#: new pooled buffers are rounded up to this, so shards of nearly the same size share buffers
GRAIN = 1 << 20


class BufferPool:
    """Buffers of at least MIN_BYTES, kept (at most `limit`) for reuse once unreferenced. Thread-safe."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self.buffers: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.allocated = 0  # buffers made (a measure of reuse: reads - allocated were served from the pool)
        self.buffers.append(np.empty(1, np.uint8))
        self.idle = self._refs(0)  # the reference count of a buffer nothing outside the pool holds
        self.buffers.clear()

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of exactly `nbytes` (contents undefined): a view of a pooled buffer nothing
        else refers to, else a new one."""
        if nbytes < MIN_BYTES:
            return np.empty(nbytes, np.uint8)
        with self.lock:
            best = None
            for i in range(len(self.buffers)):  # by index: a loop variable would be a reference too
                size = len(self.buffers[i])
                if size >= nbytes and (best is None or size < len(self.buffers[best])) and self._refs(i) == self.idle:
                    best = i
            if best is not None:
                return self.buffers[best][:nbytes]
            fresh = np.empty(-(-nbytes // GRAIN) * GRAIN, np.uint8)
            self.allocated += 1
            if len(self.buffers) < self.limit:
                self.buffers.append(fresh)
            else:  # full: replace a free smaller buffer, if any (else this one is not kept)
                for i in range(len(self.buffers)):
                    if self._refs(i) == self.idle:
                        self.buffers[i] = fresh
                        break
            return fresh[:nbytes]

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self.buffers[i])
