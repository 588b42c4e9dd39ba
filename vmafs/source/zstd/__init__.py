"""Random access into zstd streams: frames, seek tables and mid-frame checkpoints.

One class, :class:`ZstdSource`, serves every zstd layout by what it finds:

- **Seekable format** (a seek table in a trailing skippable frame, as written
  by :class:`~vmafs.zstd_seekable.SeekableZstdWriter`): the frames are
  known from the table, ``needs_scan`` is False, a read decompresses the one
  small frame it touches.
- **Several frames without a table** (``pzstd``, ``cat a.zst b.zst``): one
  scan records where each frame starts, compressed and decompressed.
- **One big frame** (what vzdump writes with ``zstd --threads=N``): zstd has
  no restart points inside a frame, so the scan makes some.  At a block
  boundary the decoder's state is the window of recent output plus entropy
  tables and three repeat offsets.  A block that defines its own tables and
  whose offsets reach only into the window can be decoded by a fresh decoder
  given a *synthetic frame*: a frame header with the original window size (no
  checksum, no content size), the preceding output as raw blocks, then the
  original blocks from that boundary on (:func:`.frame.put_resume_prefix`; the
  same as giving the window as a raw-content dictionary).  Whether a boundary
  qualifies cannot be read off its header (repeat offsets live inside the
  compressed sequences), so each candidate is **tested during the scan**: a
  worker thread decodes one window's worth of output from it and compares
  that with the bytes the scan just produced.  The same test finds how little
  of the window suffices (zstd refuses an offset before the start of the
  frame; zeroed bytes that a match copies change the output), so a
  checkpoint keeps a short tail with its unused incompressible parts zeroed,
  compressed.  Candidates that fail are dropped; the next boundary is tried.

Checkpoint spacing is driven by two budgets: decode CPU time between
checkpoints (a read costs at most about that much) and the size of the
stored windows relative to the compressed file (``index_budget``).

Reads go through a small LRU cache of decompressed units (whole small
frames, or 1 MiB pages of big frames) and a few parked decoders ("cursors"),
so sequential reads continue decoding instead of restarting from a
checkpoint.  Everything is thread-safe; decoding runs outside the lock.

Corrupt or truncated input raises :class:`~vmafs.errors.CorruptStreamError`
naming the compressed offset (and, as the error's ``offset``, the position in
the decompressed stream); every loop consumes input, so nothing can hang.
The package's modules, one job each:

- :mod:`.frame`: the frame format (headers, block headers, synthetic frames);
- :mod:`.checkpoint`: testing a candidate boundary, trimming its window;
- :mod:`.scan`: the scan (frames, candidates, the budgets);
- :mod:`.state`: the frame and checkpoint table and its saved form;
- :mod:`.reads`: decoding the block holding a byte (frames, pages, cursors)
  and the header walk's partial decodes;
- :mod:`.source`: :class:`ZstdSource`, which puts them together.
"""

from __future__ import annotations

import struct

from .. import register
from .frame import (
    SKIPPABLE_MAGIC_BASE,
    ZSTD_MAGIC_BYTES,
    parse_frame_header,
    put_resume_prefix,
    resume_prefix_size,
    window_descriptor_for,
)
from .source import ZstdSource

__all__ = [
    "ZstdSource",
    "parse_frame_header",
    "put_resume_prefix",
    "resume_prefix_size",
    "window_descriptor_for",
]

register(ZSTD_MAGIC_BYTES, ZstdSource)
# A zstd stream may begin with a skippable frame (any of 16 magic numbers).
for _low in range(16):
    register(struct.pack("<I", SKIPPABLE_MAGIC_BASE | _low), ZstdSource)
