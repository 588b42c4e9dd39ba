"""Where the mount logs: stderr in the foreground, syslog or a file detached."""

from __future__ import annotations

import logging
import os
import sys

from .options import MountOptions


def setup_logging(opts: MountOptions, *, detached: bool, verbose: bool) -> None:
    setup_process_logging(opts.logfile, detached=detached, verbose=verbose)


def setup_process_logging(
    logfile: str | None, *, detached: bool, verbose: bool, name: str = "mount.log"
) -> None:
    """Send the root logger's records where this process logs (``vmafs mount``, ``vmafs serve``).

    Detached: *logfile* if given, else syslog through /dev/log, else
    :func:`default_logfile` (*name* in the state directory).  In the
    foreground: stderr.  A log file is watched: when logrotate moves it away,
    the next record reopens the path (no SIGHUP needed, none is sent).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler | None = None
    if detached and logfile is None and os.path.exists("/dev/log"):
        # only a detached mount needs it; importing it costs ~15 ms of every start
        from logging.handlers import SysLogHandler  # noqa: PLC0415

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(_Formatter("vmafs[%(process)d]: %(message)s"))
        except OSError:
            handler = None
    if handler is None and detached:
        path = logfile or default_logfile(name)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        from logging.handlers import WatchedFileHandler  # noqa: PLC0415 - as above

        handler = WatchedFileHandler(path)
        handler.setFormatter(
            _Formatter("%(asctime)s vmafs[%(process)d] %(levelname)s: %(message)s")
        )
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("vmafs: %(levelname)s: %(message)s"))
    root.addHandler(handler)


def dump_stacks_on(signum: int) -> None:
    """On *signum*, write the stack of every thread to the log, one record per line.

    :mod:`faulthandler` writes from the signal handler in C, so the dump
    happens even while the trio loop is stuck; it writes into a pipe whose
    lines a thread forwards to the log (syslog, file or stderr alike).
    """
    import faulthandler  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    r, w = os.pipe()
    writer = os.fdopen(w, "w")
    _dump_files.append(writer)  # faulthandler keeps only the fd: the file must live
    faulthandler.register(signum, file=writer, all_threads=True)
    name = signal.Signals(signum).name

    def forward() -> None:
        with os.fdopen(r, errors="replace") as lines:
            for line in lines:
                log.warning("%s stack dump: %s", name, line.rstrip())

    threading.Thread(target=forward, name="vmafs-stack-dump", daemon=True).start()


_dump_files: list = []
log = logging.getLogger("vmafs.mount")


class _Formatter(logging.Formatter):
    """Log lines that any handler can encode.

    A path that is not valid UTF-8 reaches Python as surrogate escapes, which
    the syslog and file handlers refuse to encode (they print a "Logging
    error" traceback instead): such bytes are written as \\xNN.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def default_logfile(name: str = "mount.log") -> str:
    if os.getuid() == 0:
        return "/var/log/vmafs.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "vmafs", name)
