"""Detaching a long-running process that reports "ready" to the command that started it.

:func:`daemonize` is the one way vmafs detaches (``vmafs mount``; any other
command that serves in the background calls it too).  The command forks;
the child double-forks into its own session, changes to /, and runs the
caller's function, which says ``ready(None)`` once it serves (or
``ready(message)`` if it cannot).  The parent waits on a pipe for that one
line, so every start-up error reaches the terminal before anything detaches,
and the service is usable when the command returns.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("vmafs.daemon")

#: ``ready(None)``: serving now; ``ready(message)``: cannot start, *message* says why.
Ready = Callable[[str | None], None]


class DaemonError(Exception):
    """The detached process could not start; the message is the one line to print."""


def daemonize(
    run: Callable[[Ready], int],
    *,
    what: str,
    setup: Callable[[], None] | None = None,
    stderr_path: str | None = None,
) -> None:
    """Run ``run(ready)`` in a detached process; return once it reported ready.

    In the child, *setup* runs first (set up logging there: stderr is still
    the caller's terminal until ready); then ``run(ready)``, whose return
    value is the child's exit status.  ``ready(None)`` tells the parent all
    is well and points the child's stdin/stdout/stderr at /dev/null
    (with *stderr_path*, stderr appends to that file, from the moment
    *setup* has run: what C libraries print there is kept);
    ``ready(message)`` makes the parent raise :class:`DaemonError` with it.
    An exception in the child is logged (once *setup* has run) and reported
    as ``{what} failed: ...``.  *what* names the process in messages
    ("the filesystem process for /mnt").

    Raises :class:`DaemonError` if the child reported an error or died
    before it said anything.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        _child(w, run, what, setup, stderr_path)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    reply = b"".join(chunks).decode(errors="replace").strip()
    if reply == "OK":
        return
    if reply.startswith("ERR "):
        raise DaemonError(reply[4:])
    raise DaemonError(f"{what} died before it was ready")


def _child(
    w: int, run: Callable[[Ready], int], what: str, setup, stderr_path
) -> None:  # pragma: no cover
    status = 1
    tell = _Pipe(w)
    logging_ready = False
    try:
        os.setsid()
        if os.fork():  # the session leader exits; the daemon can never get a tty
            os._exit(0)
        os.chdir("/")
        if setup is not None:
            setup()
        logging_ready = True
        if stderr_path:  # from now on, not only once ready (libfuse's debug trace starts early)
            _redirect(2, stderr_path)

        def ready(error: str | None) -> None:
            tell(error)
            if error is None:
                detach_stdio(stderr_path)  # start-up errors of libraries still reached the terminal

        status = run(ready)
    except BaseException as e:
        if logging_ready:  # else the one line through the pipe is all the user sees
            log.exception("%s failed", what)
        tell(f"{what} failed: {e}")
    finally:
        logging.shutdown()
        os._exit(status)


class _Pipe:
    """The child's side of the readiness pipe: say one thing, once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, error: str | None) -> None:
        if self.fd < 0:
            return
        msg = b"OK\n" if error is None else b"ERR " + " ".join(error.split()).encode() + b"\n"
        try:
            os.write(self.fd, msg)
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


def detach_stdio(stderr_path: str | None = None) -> None:
    """Point fds 0, 1 and 2 at /dev/null (nobody reads the terminal any more).

    With *stderr_path*, fd 2 appends to that file instead (what C libraries
    print there, libfuse's debug output, is kept); if it cannot be opened,
    /dev/null it is.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    if stderr_path:
        _redirect(2, stderr_path)


def _redirect(fd: int, path: str) -> None:
    """Point *fd* at *path* (appending); logged and left as it is if that fails."""
    try:
        new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        log.warning("cannot open %s for stderr: %s", path, e.strerror)
        return
    os.dup2(new, fd)
    os.close(new)
