"""Detaching a server process that reports "ready" first: ``vmafs mount`` and ``vmafs serve``.

:func:`daemonize` forks; the parent waits on a pipe until the detached
process says it is ready (or why it failed) and only then returns, so every
error reaches the terminal before anything detaches, and the service is
usable when the command returns.  :func:`setup_logging` sends the detached
process's log to syslog (/dev/log), else a log file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

#: the callable a detached process reports through: None = ready, else the error
Ready = Callable[[str | None], None]


class ReadyPipe:
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


def detach_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null (once the service is up)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def daemonize(
    child: Callable[[Ready], int], error: type[Exception], died: str, what: str = "process"
) -> None:
    """Run ``child(ready)`` in a detached process; return once it called ``ready(None)``.

    The child runs in a new session (double fork: it can never get a
    terminal), in ``/``; its return value is its exit status.  It must call
    ``ready(None)`` when the service is up, or ``ready(message)``; an
    exception out of it is reported as ``"{what} failed: ..."``.  Raises
    *error* with the child's message, or with *died* when the child exited
    without saying anything.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        status = 1
        tell = ReadyPipe(w)
        try:
            os.setsid()
            if os.fork():  # the session leader exits; the daemon can never get a tty
                os._exit(0)
            os.chdir("/")
            status = child(tell)
        except BaseException as e:
            tell(f"{what} failed: {e}")
        finally:
            logging.shutdown()
            os._exit(status)
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
        raise error(reply[4:])
    raise error(died)


class LogFormatter(logging.Formatter):
    """Log lines that any handler can encode.

    A path that is not valid UTF-8 reaches Python as surrogate escapes, which
    the syslog and file handlers refuse to encode (they print a "Logging
    error" traceback instead): such bytes are written as \\xNN.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def default_logfile(name: str) -> str:
    """Where a detached process logs when nothing listens on /dev/log."""
    if os.getuid() == 0:
        return "/var/log/vmafs.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "vmafs", name)


def setup_logging(
    logfile: str | None, *, detached: bool, verbose: bool, default_name: str = "mount.log"
) -> None:
    """Replace the root logger's handlers.

    Detached: *logfile* if given, else syslog when /dev/log exists, else
    :func:`default_logfile`.  In the foreground: stderr.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler | None = None
    if detached and logfile is None and os.path.exists("/dev/log"):
        # only a detached process needs it; importing it costs ~15 ms of every start
        from logging.handlers import SysLogHandler  # noqa: PLC0415

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(LogFormatter("vmafs[%(process)d]: %(message)s"))
        except OSError:
            handler = None
    if handler is None and detached:
        path = logfile or default_logfile(default_name)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(
            LogFormatter("%(asctime)s vmafs[%(process)d] %(levelname)s: %(message)s")
        )
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogFormatter("vmafs: %(levelname)s: %(message)s"))
    root.addHandler(handler)
