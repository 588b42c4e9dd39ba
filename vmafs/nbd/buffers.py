"""Reused receive and reply buffers.

A fresh buffer of a few MiB is fresh pages: zeroed and faulted in on every
request (and on this project's VMs first-touch pages are dear).  A buffer
taken from a pool, filled and given back costs neither.
"""

from __future__ import annotations

import threading

__all__ = ["BufferPool"]


class BufferPool:
    """bytearrays to take and give back; thread-safe.

    :param max_buffers: buffers kept at most (more given back are dropped).
    :param max_size: larger buffers are never kept (None: no limit).
    :param min_size: the smallest buffer made.
    """

    def __init__(self, max_buffers: int, *, max_size: int | None = None, min_size: int = 0) -> None:
        self.max_buffers = max_buffers
        self.max_size = max_size
        self.min_size = min_size
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        """A buffer of at least *n* bytes (at most twice that when reused), contents undefined."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if n <= len(buf) <= max(2 * n, self.min_size):
                    return self._free.pop(i)
        return bytearray(max(n, self.min_size))

    def give(self, buf: bytearray) -> None:
        """Hand *buf* back; nobody may use it afterwards."""
        if self.max_size is not None and len(buf) > self.max_size:
            return
        with self._lock:
            if len(self._free) < self.max_buffers:
                self._free.append(buf)
