"""Where a zstd stream's frames and checkpoints lie, and that table's saved form.

The scan (or a seek table) produces a :class:`FrameTable`; the reads use
it; the side index keeps it between opens (:meth:`FrameTable.to_state`,
:meth:`FrameTable.from_state`, which checks it against the file).
"""

from __future__ import annotations

import itertools

import numpy as np

from ...errors import IndexCacheError
from ...zstd_seekable import SeekTable
from .frame import first_frame_at

#: 2: ``zstd_version`` also holds where a file cut short ends (-1: whole).
STATE_VERSION = 2
#: Frame flags: the frame ends with a content checksum.
FRAME_CHECKSUM = 1
#: Frame flags: the file ends inside this (last) frame; it holds its whole
#: blocks up to the cut, decoded without an end (and without a checksum).
FRAME_CUT = 2


class FrameTable:
    """Frames (compressed and decompressed offset and size, window, flags) and checkpoints.

    A checkpoint is a block boundary inside a frame where decoding can
    resume: its decompressed and compressed offset, its frame, and the
    window (compressed) to resume with.  The windows stay separate bytes-like
    objects (the scan's own blobs, or views of a loaded side index): joined,
    they would be copied into fresh memory at the end of every first scan;
    only :meth:`to_state` joins them.
    """

    def __init__(
        self,
        frames=([], [], [], [], [], []),
        checkpoints=([], [], []),
        windows=(),
        cut_at: int | None = None,
    ):
        comp, csize, dec, dsize, wd, flags = frames
        self.f_comp = np.asarray(comp, dtype=np.uint64)
        self.f_csize = np.asarray(csize, dtype=np.uint64)
        self.f_dec = np.asarray(dec, dtype=np.uint64)
        self.f_dsize = np.asarray(dsize, dtype=np.uint64)
        self.f_wd = np.asarray(wd, dtype=np.uint8)  # synthetic window descriptor
        self.f_flags = np.asarray(flags, dtype=np.uint8)  # FRAME_CHECKSUM, FRAME_CUT
        self.f_dec_list: list[int] = self.f_dec.tolist()
        c_dec, c_comp, c_frame = checkpoints
        self.c_dec = np.asarray(c_dec, dtype=np.uint64)
        self.c_comp = np.asarray(c_comp, dtype=np.uint64)
        self.c_frame = np.asarray(c_frame, dtype=np.uint32)
        self.c_dec_list: list[int] = self.c_dec.tolist()
        self.windows = list(windows)
        #: Frames holding checkpoints (read in pages, never decoded whole).
        self.framed: set[int] = set(self.c_frame.tolist())
        #: Compressed offset where the data of a file cut short ends (None: it is whole).
        self.cut_at = cut_at

    @classmethod
    def from_seek_table(cls, table: SeekTable) -> FrameTable:
        comp = np.concatenate(([0], np.cumsum(table.compressed_sizes, dtype=np.uint64)[:-1]))
        dec = np.concatenate(([0], np.cumsum(table.decompressed_sizes, dtype=np.uint64)[:-1]))
        n = len(table)
        return cls((comp, table.compressed_sizes, dec, table.decompressed_sizes, [0] * n, [0] * n))

    @property
    def frames(self) -> int:
        return len(self.f_comp)

    @property
    def checkpoints(self) -> int:
        return len(self.c_dec_list)

    @property
    def size(self) -> int:
        """Length of the decompressed stream."""
        return int(self.f_dec[-1] + self.f_dsize[-1]) if self.frames else 0

    def to_state(self, compressed_size: int) -> dict[str, np.ndarray]:
        """The arrays a side index keeps (see :meth:`from_state`)."""
        windows = self.windows
        return {
            "zstd_version": np.array(
                [
                    STATE_VERSION,
                    compressed_size,
                    self.size,
                    -1 if self.cut_at is None else self.cut_at,
                ],
                dtype=np.int64,
            ),
            "frame_comp": self.f_comp,
            "frame_csize": self.f_csize,
            "frame_dec": self.f_dec,
            "frame_dsize": self.f_dsize,
            "frame_wd": self.f_wd,
            "frame_flags": self.f_flags,
            "cp_dec": self.c_dec,
            "cp_comp": self.c_comp,
            "cp_frame": self.c_frame,
            "cp_boff": np.cumsum([0] + [len(w) for w in windows[:-1]], dtype=np.uint64)
            if windows
            else np.zeros(0, dtype=np.uint64),
            "cp_windows": np.frombuffer(b"".join(windows), dtype=np.uint8),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], fd: int, compressed_size: int) -> FrameTable:
        """The table saved by :meth:`to_state`, checked against the compressed file *fd*.

        IndexCacheError when it is incomplete or does not fit the file.
        """
        try:
            meta = np.asarray(state["zstd_version"]).tolist()
            version = int(meta[0])
            if version == STATE_VERSION:
                csize, size, cut_at = (int(x) for x in meta[1:])
            f = [
                np.asarray(state[k])
                for k in ("frame_comp", "frame_csize", "frame_dec", "frame_dsize")
            ]
            wd, flags = np.asarray(state["frame_wd"]), np.asarray(state["frame_flags"])
            cdec, ccomp, cframe, cboff = (
                np.asarray(state[k]) for k in ("cp_dec", "cp_comp", "cp_frame", "cp_boff")
            )
            blob = np.asarray(state["cp_windows"], dtype=np.uint8).tobytes()
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCacheError(f"zstd index state is incomplete: {e}") from e
        problem = None
        n = len(f[0])
        if version != STATE_VERSION:
            problem = f"version {version}"
        elif not -1 <= cut_at <= csize:
            problem = "cut offset outside the file"
        elif csize != compressed_size:
            problem = "compressed size differs"
        elif n == 0 or any(len(a) != n for a in (*f, wd, flags)):
            problem = "frame arrays disagree"
        elif any(len(a) != len(cdec) for a in (ccomp, cframe, cboff)):
            problem = "checkpoint arrays disagree"
        elif np.any(flags > (FRAME_CHECKSUM | FRAME_CUT)) or np.any(flags[:-1] & FRAME_CUT):
            problem = "frame flags are impossible"  # only the last frame can be cut
        else:
            comp, csz, dec, dsz = (a.astype(np.uint64) for a in f)
            if (
                # anything but whole skippable frames before the first frame: not this file's
                not first_frame_at(fd, int(comp[0]))
                or np.any(comp[1:] < comp[:-1] + csz[:-1])
                or int(comp[-1] + csz[-1]) > csize
                or dec[0] != 0
                or np.any(dec[1:] != dec[:-1] + dsz[:-1])
                or int(dec[-1] + dsz[-1]) != size
            ):
                problem = "frame offsets are inconsistent"
            elif len(cdec) and (
                np.any(np.diff(cdec.astype(np.int64)) <= 0)
                or np.any(cframe >= n)
                or np.any(cdec <= dec[cframe])
                or np.any(cdec >= dec[cframe] + dsz[cframe])
                or np.any(ccomp <= comp[cframe])
                or np.any(ccomp >= comp[cframe] + csz[cframe])
                or np.any(np.diff(cboff.astype(np.int64)) <= 0)
                or int(cboff[-1]) >= len(blob)
            ):
                problem = "checkpoints are inconsistent"
        if problem:
            raise IndexCacheError(f"zstd index state does not fit the file: {problem}")
        bounds = [*cboff.tolist(), len(blob)]
        view = memoryview(blob)
        windows = [view[a:b] for a, b in itertools.pairwise(bounds)]
        return cls((*f, wd, flags), (cdec, ccomp, cframe), windows, None if cut_at < 0 else cut_at)
