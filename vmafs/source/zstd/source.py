"""ZstdSource: the Source of every zstd layout, put together from the package's parts."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np

from ...errors import SourceError
from ...zstd_seekable import SeekTable
from ..base import BlockCache, BlockSource
from .frame import ZSTD_MAGIC, cut, is_skippable
from .reads import FrameReader, HeadReader
from .scan import DEFAULT_INDEX_BUDGET, DEFAULT_SPACING, Scanner
from .state import FrameTable


class ZstdSource(BlockSource):
    """A zstd-compressed VMA stream with random access (see :mod:`vmafs.source.zstd`).

    *spacing* (decode CPU seconds between checkpoints; None: make none) and
    *index_budget* (stored windows / compressed size) tune the scan;
    *cache_bytes* bounds the decompressed-data cache.
    """

    #: As side indexes written before sources had a ``kind`` record it (the class name).
    kind = "ZstdSource"

    def __init__(
        self,
        path: str,
        *,
        spacing: float | None = DEFAULT_SPACING,
        index_budget: float = DEFAULT_INDEX_BUDGET,
        cache_bytes: int = 64 << 20,
    ) -> None:
        super().__init__(path, BlockCache(max_bytes=cache_bytes))
        self._spacing = spacing
        self._budget = index_budget
        self._lock = threading.Lock()
        self._adopt(FrameTable(), needs_scan=True)
        #: Statistics of the last scan (candidates tested/rejected, checkpoints kept).
        self.scan_stats: dict[str, int] = {}
        head = os.pread(self._fd, 4, 0)
        magic = int.from_bytes(head, "little") if len(head) == 4 else -1
        if magic != ZSTD_MAGIC and not is_skippable(magic):
            self.close()
            raise SourceError("not a zstd stream").name_archive(path)
        table = SeekTable.from_tail(self._pread_raw, self.compressed_size)
        if table is not None and len(table):
            self._adopt(FrameTable.from_seek_table(table), needs_scan=False)

    def _adopt(self, table: FrameTable, *, needs_scan: bool) -> None:
        """Read through *table* from now on (a fresh cache and fresh cursors)."""
        with self._lock:
            self._table = table
            self._reads = reads = FrameReader(self._fd, table)
            # BlockSource.pread's hooks, bound straight to the reader (a read
            # that hits the cache is a few microseconds: no wrapper call).
            self._locate, self._decode = reads.locate, reads.decode
            self._forget_blocks()
            self.size = None if needs_scan else table.size
            self.needs_scan = needs_scan

    def _pread_raw(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    @property
    def frames(self) -> int:
        return self._table.frames

    @property
    def checkpoints(self) -> int:
        return self._table.checkpoints

    def index_bytes(self) -> int:
        """Bytes a persisted side index of this source takes (arrays + windows)."""
        return sum(v.nbytes for v in self.checkpoint_state().values())

    # --- the scan, and its saved result ----------------------------------------------

    def _scan(
        self,
        on_chunk: Callable[[int, memoryview], None],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        # Frames and checkpoint candidates are recorded on the way (see .scan).
        scanner = Scanner(self._fd, self.compressed_size, self._spacing, self._budget)
        table, self.scan_stats, self.truncation = scanner.run(on_chunk, progress)
        self._adopt(table, needs_scan=False)

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Everything a later open needs to skip the scan (for the side index)."""
        if self.needs_scan:
            raise SourceError("checkpoint_state() before scan()")
        return self._table.to_state(self.compressed_size)

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        """Adopt :meth:`checkpoint_state` output; IndexCacheError when it does not fit this file."""
        table = FrameTable.from_state(state, self._fd, self.compressed_size)
        self._adopt(table, needs_scan=False)
        if table.cut_at is not None:
            self.truncation = cut("zstd stream truncated", table.cut_at, table.size)

    # --- reads ----------------------------------------------------------------------

    def header_reader(self) -> HeadReader:
        """A reader for walkers that want a few bytes here and there (extent headers).

        Its ``pread`` decodes a frame only as far as the bytes asked for and
        leaves the frame cache alone; see :class:`~.reads.HeadReader`.
        """
        if self.needs_scan:
            raise SourceError("zstd stream read before its scan").name_archive(self.path)
        return HeadReader(self.path, self._fd, self._table, self._cache)

    def close(self) -> None:
        self._reads.close()
        super().close()
