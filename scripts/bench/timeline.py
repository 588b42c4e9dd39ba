"""One ``vmafs get`` split into phases, from the events of the process itself.

The command runs as ``python -c HOOK get ...``: :data:`HOOK` installs an
audit hook (PEP 578) that appends one line per event of interest to a
file: the imports, the opens of the archive, of ``/dev/loop-control`` and
of the guest file, ``os.fork``, ``os.utime`` (the copy sets the file's
times last), each with ``time.monotonic()`` (one clock for the bench and
the child), the process and the thread.  Then it runs ``vmafs`` as
``python -m vmafs`` would.  :func:`get_phases` turns the lines into
phases, from the bench's own launch of the process to its exit.  A
phase whose event is missing (the implementation changed) fails the
figure rather than being guessed.  The hook costs a few milliseconds
(one ``os.write`` per event, ~500 events).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from .util import run

HOOK = r"""
import os, sys, threading, time
_fd = os.open(os.environ["VMAFS_BENCH_TIMELINE"], os.O_WRONLY | os.O_APPEND)
_keys = tuple(os.environ["VMAFS_BENCH_TIMELINE_OPENS"].split("\n"))
def _note(event, what):
    thread = threading.current_thread().name
    line = f"{time.monotonic():.6f}\t{os.getpid()}\t{thread}\t{event}\t{what}\n"
    os.write(_fd, line.encode(errors="replace"))
def _hook(event, args):
    if event == "import":
        _note(event, args[0])
    elif event == "open":
        if isinstance(args[0], str) and args[0].startswith(_keys):
            _note(event, args[0])
    elif event in ("os.fork", "os.utime"):
        _note(event, "")
_note("start", "")
sys.addaudithook(_hook)
import runpy
runpy.run_module("vmafs", run_name="__main__", alter_sys=True)
"""

#: (phase, what it holds), in order; each ends at the next one's start.
GET_PHASES = [
    ("interpreter", "Python's start and site (this venv's editable-install finder included)"),
    ("vmafs modules", "the CLI, `get` and the guest session's modules"),
    ("numpy", "numpy, while a thread imports pyfuse3 + trio and another reads extent headers"),
    ("index + scan", "index the archive, scan its drive, wait for pyfuse3 + trio, mount modules"),
    ("FUSE up", "fork the filesystem process until the mount answers"),
    ("loop + ext4", "loop device and ext4 ro,noload mount"),
    ("copy", "read the file through ext4, loop and FUSE, write it"),
    ("teardown + exit", "ext4 and FUSE unmounted, the filesystem process gone, exit"),
]


def timed_get(argv: Sequence[str], archive: str, log: str) -> tuple[float, list[float]]:
    """Run ``vmafs`` *argv* (a ``get`` through the kernel engine) under :data:`HOOK`;
    (wall seconds, seconds of each of :data:`GET_PHASES`)."""
    with open(log, "w"):
        pass
    env = {
        **os.environ,
        "VMAFS_BENCH_TIMELINE": log,
        "VMAFS_BENCH_TIMELINE_OPENS": "\n".join([archive, "/dev/loop-control", "/run/vmafs/"]),
    }
    t0 = time.monotonic()
    run([sys.executable, "-c", HOOK, *argv], env=env)
    t1 = time.monotonic()
    with open(log) as f:
        events = [line.rstrip("\n").split("\t") for line in f]
    return t1 - t0, get_phases(events, archive, t0, t1)


def get_phases(events: list[list[str]], archive: str, t0: float, t1: float) -> list[float]:
    """Seconds of each of :data:`GET_PHASES` from the hook's *events* (time, pid,
    thread, event, detail), the process launched at *t0* and gone at *t1*."""
    main = events[0][1]  # the hook's first line: the command's own process
    mine = [(float(t), thread, ev, what) for t, pid, thread, ev, what in events if pid == main]

    def first(test: Callable[[str, str, str], bool], after: float = 0.0) -> float:
        for t, thread, ev, what in mine:
            if t >= after and test(thread, ev, what):
                return t
        raise RuntimeError(f"the timeline lacks an event ({test.__doc__}); did `get` change?")

    guest_file = re.compile(r"/fs\d+/")
    marks = [t0, float(events[0][0])]
    marks.append(first(lambda th, ev, w: ev == "import" and w == "numpy"))
    marks.append(first(lambda th, ev, w: th == "MainThread" and ev == "open" and w == archive))
    marks.append(first(lambda th, ev, w: ev == "os.fork", marks[-1]))
    marks.append(first(lambda th, ev, w: ev == "open" and w == "/dev/loop-control", marks[-1]))
    marks.append(first(lambda th, ev, w: ev == "open" and bool(guest_file.search(w)), marks[-1]))
    copied = [t for t, _, ev, _ in mine if ev == "os.utime" and t >= marks[-1]]
    if not copied:
        raise RuntimeError("the timeline lacks the copy's os.utime; did `get` change?")
    marks += [copied[-1], t1]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def median_phases(runs: list[list[float]]) -> list[float]:
    """The median of each phase over *runs* (so they need not add up to the median total)."""
    return [statistics.median(col) for col in zip(*runs, strict=True)]


def phases_text(phases: list[float]) -> str:
    return "; ".join(
        f"{name} {p * 1000:.0f} ms" for (name, _), p in zip(GET_PHASES, phases, strict=True)
    )
