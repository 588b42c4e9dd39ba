"""What the command line prints, shared by every command module and :mod:`vmafs.cli`.

Writes to stdout that fail say so in one line (:func:`writing_stdout`),
OSErrors read as ``path: strerror`` (:func:`describe_oserror`), and library
log records come out as ``vmafs: warning: ...`` (:func:`stderr_logging`).
A module of its own so that command modules need not import :mod:`vmafs.cli`,
which imports them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

PROG = "vmafs"


class _LogFormatter(logging.Formatter):
    """``vmafs: warning: MESSAGE``: library log records in the CLI's own format."""

    def __init__(self, prog: str, debug: bool) -> None:
        super().__init__()
        self.prog = prog
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        level = "error" if record.levelno >= logging.ERROR else record.levelname.lower()
        # One line, whatever the message holds (names in archives are untrusted).
        text = " ".join(record.getMessage().split("\n"))
        if record.exc_info and self.debug:
            text += "\n" + self.formatException(record.exc_info)
        return f"{self.prog}: {level}: {text}"


@contextlib.contextmanager
def stderr_logging(prog: str = PROG, debug: bool = False):
    """Show log records of WARNING and up (all with *debug*) on stderr while the block runs.

    The library modules (vmafs.sidecar, vmafs.source.*) report what they
    recover from through :mod:`logging`; without a handler Python's
    last-resort handler would print the bare message.  The handler goes on
    the root logger and is removed afterwards.  ``vmafs mount`` replaces it
    with its own once it knows where to log (``vmafs.mount.logs.setup_logging``
    removes every root handler); a handler that is gone by then is left alone.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(prog, debug))
    level = logging.DEBUG if debug else logging.WARNING
    handler.setLevel(level)  # also for loggers set lower than the root
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield handler
    finally:
        if handler in root.handlers:
            root.removeHandler(handler)
            root.setLevel(old_level)


class StdoutError(OSError):
    """Writing to standard output failed (``> /dev/full``, a full disk, EIO).

    Its strerror says so (``writing to stdout: No space left on device``):
    without it the error line would not say which file could not be written.
    """


@contextlib.contextmanager
def writing_stdout(note: str = ""):
    """Turn an OSError from the block's writes to stdout into a :class:`StdoutError`.

    A closed pipe (EPIPE) stays a BrokenPipeError (exit 141, nothing printed).
    *note* is added to the message in parentheses.
    """
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        if isinstance(e, StdoutError) or e.filename is not None:
            raise
        text = f"writing to stdout: {e.strerror or e}" + (f" ({note})" if note else "")
        raise StdoutError(e.errno, text) from e


def discard_stdout() -> None:
    """Point stdout at /dev/null after a failed write, so the interpreter's final
    flush of what is still buffered neither fails again nor prints a warning."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
    except (OSError, ValueError):
        pass


def describe_oserror(e: OSError) -> str:
    """``path: strerror`` as ls/cp print it."""
    text = e.strerror or str(e)
    if e.filename is not None:
        text = f"{os.fsdecode(e.filename)}: {text}"
        if e.filename2 is not None:
            text = f"{text} (-> {os.fsdecode(e.filename2)})"
    return text
