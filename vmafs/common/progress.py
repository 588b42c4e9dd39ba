"""A one-line progress bar on stderr for long commands (extract, verify, indexing, backup).

``Progress`` is a callable ``progress(done, total)``, the shape
:meth:`vmafs.archive.Archive.open` takes, and also has :meth:`advance` for
loops that count bytes themselves.  It redraws at most ten times a second
and only when enabled; when disabled every method is a cheap no-op, so
callers never branch on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

_REDRAW_EVERY = 0.1  # seconds
_BAR_WIDTH = 24


def want_progress(choice: bool | None, stream: TextIO | None = None) -> bool:
    """``--progress``/``--no-progress`` if given, else: is *stream* a terminal?"""
    if choice is not None:
        return choice
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as du -h and qemu-img print them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Renders ``label  42% [#####....]  1.2 GiB/3.0 GiB  350.0 MiB/s  ETA 0:05``."""

    def __init__(self, label: str, total: int = 0, *, enabled: bool, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        #: shown after the figures (e.g. ``fleecing 12.0 MiB``); set with :meth:`set_note`
        self.note = ""

    # -- feeding --

    def __call__(self, done: int, total: int) -> None:
        """Absolute update (the ``progress`` callback shape of Archive.open)."""
        self.total = total
        self.done = done
        self._maybe_draw()

    def advance(self, n: int) -> None:
        self.done += n
        self._maybe_draw()

    def set_note(self, note: str) -> None:
        """Text after the figures, drawn with the next update."""
        self.note = note

    def set_label(self, label: str) -> None:
        self.label = label
        self._maybe_draw(force=True)

    # -- drawing --

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < _REDRAW_EVERY and self.done < self.total:
            return
        self._last_draw = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        if self.total > 0:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            text = (
                f"{self.label}  {frac * 100:3.0f}% [{bar}]  {human_bytes(self.done)}/"
                f"{human_bytes(self.total)}  {human_bytes(rate)}/s  ETA {_duration(eta)}"
            )
        else:
            text = f"{self.label}  {human_bytes(self.done)}  {human_bytes(rate)}/s"
        if self.note:
            text += f"  {self.note}"
        try:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # stderr went away: keep working silently
        self._drawn = True

    def close(self) -> None:
        """Erase the bar so the next message starts on a clean line."""
        if self.enabled and self._drawn:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress``/``--no-progress`` (``args.progress``: True, False or None).

    :func:`want_progress` turns the value into yes or no.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )
    group.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show a progress bar"
    )
