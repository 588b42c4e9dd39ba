"""Mount lifecycle: ``vmafs mount``, ``vmafs umount`` and ``mount.vmafs``.

Argument and option parsing, checks that must fail before the process
detaches, daemonizing, logging, signal handling and unmounting live here;
what the mounted files look like is :mod:`vmafs.fs`.  docs/mount.md is the
user's reference.

Sequence of ``vmafs mount ARCHIVE MOUNTPOINT``:

1. parse ``-o`` options (unknown ones are a usage error, exit 2);
2. check MOUNTPOINT (symlinks resolved) is an empty directory and not a
   mount point already (``-o nonempty`` allows a non-empty one);
3. open the archive (:meth:`Archive.open` validates every extent; an
   incomplete archive is refused unless ``-o allow_incomplete``);
4. unless ``-f``: fork; the parent waits on a pipe until the filesystem
   process reports "mounted and answering" or the reason it failed, and
   exits 0 or 1 accordingly.  So every error is reported on the terminal
   before anything detaches, and the mount is usable when the command
   returns;
5. the filesystem process mounts (``pyfuse3.init``), runs ``pyfuse3.main``
   under trio, and on SIGTERM/SIGINT/SIGHUP ends the loop and unmounts.
   ``pyfuse3.close()`` runs on every exit path.

Logging: ``-f`` logs to stderr.  Detached, logs go to ``-o logfile=PATH``
if given (a relative PATH is taken from where ``vmafs mount`` was started),
else to syslog through /dev/log (journald or a syslog daemon), else, when
nothing listens there, to ``$XDG_STATE_HOME/vmafs/mount.log``
(``~/.local/state/vmafs/mount.log``; ``/var/log/vmafs.log`` for root).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import importlib
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import IncompleteArchiveError, VmaError

log = logging.getLogger("vmafs.mount")

READY_TIMEOUT = 60.0  # seconds the filesystem process may take to answer its first stat

#: Readahead of the mount's backing device, KiB.  The kernel's default for a
#: FUSE mount is 128 KiB, so buffered reads reach us as 128 KiB requests and a
#: Python server spends its time per request; at 1024 KiB, dd bs=1M ran 3-4x
#: faster, dd bs=4k 6x, random 4 KiB reads no slower (docs/benchmarks.md,
#: "Tuning"), while keeping the page cache and shared mmap that direct_io loses.
DEFAULT_READAHEAD_KB = 1024

#: Options mount(8) passes to a helper that mean nothing here (the mount is
#: always read-only, nosuid and nodev).  Also ignored: ``x-*`` and ``comment=*``.
GENERIC_OPTIONS = frozenset(
    "defaults auto noauto user users nouser owner group nofail _netdev ro rw "
    "suid nosuid dev nodev exec noexec atime noatime relatime norelatime strictatime "
    "nostrictatime lazytime nolazytime diratime nodiratime sync async dirsync "
    "loud silent iversion noiversion mand nomand".split()
)


#: The ``-o`` options that take no value (attributes of :class:`MountOptions`).
FLAG_OPTIONS = ("allow_other", "allow_incomplete", "direct_io", "threads", "nonempty")


class MountError(Exception):
    """A mount or unmount cannot be done; the message is the one line to print."""


class UsageError(MountError):
    """Bad command line or ``-o`` option (exit status 2)."""


@dataclass
class MountOptions:
    """What ``-o`` asked for.  See docs/mount.md for each option."""

    allow_other: bool = False
    allow_incomplete: bool = False
    uid: int | None = None
    gid: int | None = None
    fsname: str | None = None
    direct_io: bool = False
    threads: bool = False
    readahead: int = DEFAULT_READAHEAD_KB
    logfile: str | None = None
    nonempty: bool = False
    ignored: list[str] = field(default_factory=list)


def parse_options(values: Sequence[str], *, sloppy: bool = False) -> MountOptions:
    """Parse ``-o`` values (each comma-separated) into :class:`MountOptions`.

    Generic mount(8) options are ignored (recorded in ``ignored``); an
    unknown option is a :class:`UsageError` unless *sloppy* (mount -s).
    """
    opts = MountOptions()
    for value in values:
        for item in value.split(","):
            key, eq, arg = item.strip().partition("=")
            if not key:
                continue
            if key in FLAG_OPTIONS and not eq:
                setattr(opts, key, True)
            elif key in ("uid", "gid") and eq:
                setattr(opts, key, _id_value(key, arg))
            elif key == "readahead" and eq:
                if not arg.isdigit() or int(arg) > 65536:
                    raise UsageError(f"readahead={arg}: expected KiB from 0 to 65536")
                opts.readahead = int(arg)
            elif key in ("fsname", "logfile") and eq and arg:
                setattr(opts, key, arg)
            elif key in GENERIC_OPTIONS or key.startswith("x-") or key == "comment":
                opts.ignored.append(item)
            elif sloppy:
                opts.ignored.append(item)
            else:
                raise UsageError(f"unknown mount option {item!r}")
    return opts


def _id_value(key: str, arg: str) -> int:
    if arg.isdigit():
        return int(arg)
    try:
        return pwd.getpwnam(arg).pw_uid if key == "uid" else grp.getgrnam(arg).gr_gid
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise UsageError(f"{key}={arg}: no such {what}") from None


def fuse_options(opts: MountOptions, archive_path: str) -> set[str]:
    """The options handed to libfuse (never ``max_read=``: it breaks pyfuse3's mount)."""
    out = {"ro", "nosuid", "nodev", "default_permissions", "subtype=vmafs"}
    out.add("fsname=" + _fsname(opts.fsname or os.path.abspath(archive_path)))
    if opts.allow_other:
        out.add("allow_other")  # default_permissions above makes the 0400 modes count
    return out


def _fsname(name: str) -> str:
    """*name* made safe for libfuse's option parser (ASCII only, commas escaped)."""
    name = "".join(c if " " < c < "\x7f" else "?" for c in name)
    return name.replace("\\", "\\\\").replace(",", "\\,") or "vmafs"


# --- checks before detaching ---------------------------------------------------------


def mount_table() -> dict[str, str]:
    """{mount point: fstype} from /proc/self/mountinfo (stale FUSE mounts included)."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            table[point] = fields[sep + 1]
    return table


def mountpoint_path(path: str) -> str:
    """*path* as the mount table shows it: absolute, symlinks resolved.

    The kernel mounts on the directory a symlink points to, and
    /proc/self/mountinfo lists that; comparing anything else would miss it.
    (Non-strict: a dead FUSE mount's ENOTCONN leaves the path as it is.)
    """
    return os.path.realpath(path)


def check_mountpoint(path: str, *, nonempty: bool = False) -> str:
    """Return *path* made absolute (symlinks resolved) after checking it can take a mount.

    A directory that holds files is refused unless *nonempty* (``-o
    nonempty``): the mount would hide them for as long as it lasts.
    """
    mp = mountpoint_path(path)
    if mp in mount_table() or os.path.ismount(mp):
        raise MountError(f"{mp}: already a mount point (busy); unmount it first")
    try:
        os.stat(mp)
    except OSError as e:
        raise MountError(f"{mp}: {e.strerror}") from None
    if not os.path.isdir(mp):
        raise MountError(f"{mp}: not a directory")
    if not nonempty:
        try:
            entries = len(os.listdir(mp))
        except OSError:
            entries = 0  # unreadable for us: fusermount3 decides whether we may mount there
        if entries:
            raise MountError(
                f"{mp}: not empty ({entries} entr{'y' if entries == 1 else 'ies'}), and the "
                "mount would hide what is there: use an empty directory, or -o nonempty "
                "to mount over it anyway"
            )
    # Whether this user may mount there (write access, sticky directories) is
    # fusermount3's decision; its message reaches the terminal before we detach.
    return mp


def check_logfile(path: str) -> str:
    """Return *path* made absolute after making sure the detached process can log there.

    Resolved here, in the caller's working directory (the filesystem process
    changes to /); created (with its directory) and opened for appending now,
    so a path that cannot work is reported on the terminal, not after detaching.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    except FileExistsError:  # makedirs: a component of the directory is a file
        raise MountError(f"logfile={path}: {os.path.dirname(path)}: not a directory") from None
    except OSError as e:
        raise MountError(f"logfile={path}: {e.strerror or e}") from None
    return path


def open_archive(path: str, allow_incomplete: bool):
    """Open *path*; an incomplete archive's error says how to mount it anyway."""
    from .archive import Archive  # noqa: PLC0415 - keep `vmafs -h` light
    from .commands.progress import Progress, want_progress  # noqa: PLC0415

    try:
        # A compressed archive is decompressed once to index it: show how far
        # that got when stderr is a terminal (nothing otherwise).
        with Progress("indexing", enabled=want_progress(None)) as bar:
            return Archive.open(path, allow_incomplete=allow_incomplete, progress=bar)
    except IncompleteArchiveError as e:
        raise IncompleteArchiveError(
            f"{e.message}; mount with -o allow_incomplete to serve the missing clusters as EIO",
            offset=e.offset,
            dev_id=e.dev_id,
            cluster=e.cluster,
        ) from None


# --- serving ------------------------------------------------------------------------------


def serve(
    ops,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[str | None], None],
    readahead_kb: int = 0,
) -> int:
    """Mount *ops* on *mountpoint* and serve until unmounted or signalled.

    Calls ``on_ready(None)`` once the mount answers a stat, or
    ``on_ready(message)`` if it never comes up.  A non-zero *readahead_kb* is
    set on the mount's backing device first (see :func:`set_readahead`).
    Returns the exit status.
    """
    import pyfuse3  # noqa: PLC0415
    import trio  # noqa: PLC0415

    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        on_ready(f"cannot mount on {mountpoint}: {e}")
        if "mount" in str(e):
            # The session exists but is not mounted: free it.  (After a failed
            # fuse_session_new there is no session, and close() would crash.)
            pyfuse3.close(unmount=False)
        return 1
    status = 1
    try:
        status = trio.run(_main_loop, mountpoint, on_ready, readahead_kb)
    except BaseException as e:
        log.exception("filesystem loop failed")
        on_ready(f"filesystem failed: {e}")
        raise
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
    return status


def set_readahead(st_dev: int, kib: int) -> None:
    """Set the readahead of the mount with device number *st_dev* to *kib* KiB.

    Only root may write the sysfs knob; otherwise the kernel's default stays
    (logged, not an error: reads are correct either way, only slower).
    """
    path = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("readahead stays at the kernel default: cannot write %s: %s", path, e.strerror)
    else:
        log.debug("readahead set to %d KiB (%s)", kib, path)


async def _main_loop(
    mountpoint: str, on_ready: Callable[[str | None], None], readahead_kb: int = 0
) -> int:
    import pyfuse3  # noqa: PLC0415
    import trio  # noqa: PLC0415

    result: dict = {"status": 0, "ready": False, "signal": None}

    async def fs_loop(cancel: trio.CancelScope) -> None:
        try:
            await pyfuse3.main()
        finally:
            cancel.cancel()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
                result["signal"] = signal.Signals(signum).name
                pyfuse3.terminate()

    async def wait_ready() -> None:
        with trio.move_on_after(READY_TIMEOUT):
            parent_dev = os.stat(os.path.dirname(mountpoint) or "/").st_dev
            while True:
                try:
                    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
                except OSError as e:  # e.g. ENOTCONN while the kernel sets up
                    log.debug("waiting for the mount: %s", e)
                    await trio.sleep(0.05)
                    continue
                if st.st_dev != parent_dev:
                    if readahead_kb:
                        set_readahead(st.st_dev, readahead_kb)
                    result["ready"] = True
                    log.info("mounted on %s", mountpoint)
                    on_ready(None)
                    return
                await trio.sleep(0.05)
        on_ready(f"{mountpoint}: the mount did not come up within {READY_TIMEOUT:.0f}s")
        pyfuse3.terminate()
        result["status"] = 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs_loop, nursery.cancel_scope)
        nursery.start_soon(watch_signals)
        nursery.start_soon(wait_ready)
    if not result["ready"]:
        if result["signal"]:
            # Asked to stop: not a failure of the filesystem, but no mount either.
            on_ready(f"{mountpoint}: {result['signal']} before the mount was ready")
            return 0
        on_ready(f"{mountpoint}: the filesystem ended before the mount was ready")
        return 1
    return result["status"]


def _setup_logging(opts: MountOptions, *, detached: bool, verbose: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler | None = None
    if detached and opts.logfile is None and os.path.exists("/dev/log"):
        # only a detached mount needs it; importing it costs ~15 ms of every start
        from logging.handlers import SysLogHandler  # noqa: PLC0415

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(_Formatter("vmafs[%(process)d]: %(message)s"))
        except OSError:
            handler = None
    if handler is None and detached:
        path = opts.logfile or _default_logfile()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(
            _Formatter("%(asctime)s vmafs[%(process)d] %(levelname)s: %(message)s")
        )
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("vmafs: %(levelname)s: %(message)s"))
    root.addHandler(handler)


class _Formatter(logging.Formatter):
    """Log lines that any handler can encode.

    A path that is not valid UTF-8 reaches Python as surrogate escapes, which
    the syslog and file handlers refuse to encode (they print a "Logging
    error" traceback instead): such bytes are written as \\xNN.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _default_logfile() -> str:
    if os.getuid() == 0:
        return "/var/log/vmafs.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "vmafs", "mount.log")


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


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def mount(
    archive_path: str,
    mountpoint: str,
    opts: MountOptions,
    *,
    foreground: bool = False,
    verbose: bool = False,
) -> int:
    """Everything ``vmafs mount`` does; returns the exit status or raises.

    Raises :class:`MountError`, :class:`VmaError` or :class:`OSError` for
    anything found before the filesystem process detaches.
    """
    from .archive import Archive  # noqa: PLC0415, F401 - here, not in the thread below
    from .commands.progress import Progress  # noqa: PLC0415, F401 - ditto
    from .sidecar import deferred_saves  # noqa: PLC0415
    from .source import import_container  # noqa: PLC0415

    mp = check_mountpoint(mountpoint, nonempty=opts.nonempty)
    if opts.logfile and not foreground:
        opts.logfile = check_logfile(opts.logfile)
    archive_path = os.path.abspath(archive_path)
    # pyfuse3 and trio take ~0.3 s to import: done while a compressed archive
    # is decompressed.  Before that thread starts, this one imports what it
    # needs itself (zstandard etc.): two threads importing take turns.  A side
    # index this open makes is written by the filesystem process once the
    # mount is up (_SideIndexSaver), not before the mount is ready.
    import_container(archive_path)
    with _importing_meanwhile("vmafs.fs"), deferred_saves() as saves:
        archive = open_archive(archive_path, opts.allow_incomplete)
    try:
        from .fs import VmaFS  # noqa: PLC0415 - needs pyfuse3

        ops = VmaFS(
            archive, uid=opts.uid, gid=opts.gid, direct_io=opts.direct_io, threaded=opts.threads
        )
        options = fuse_options(opts, archive_path)
        if foreground:
            _setup_logging(opts, detached=False, verbose=verbose)
            _log_start(archive_path, mp, opts, ops)
            errors: list[str] = []
            saver = _SideIndexSaver(saves)

            def on_ready(error: str | None) -> None:
                if error:
                    errors.append(error)
                else:
                    saver.start()

            try:
                status = serve(ops, mp, options, on_ready, opts.readahead)
            finally:
                saver.join()
            if errors and status:
                raise MountError(errors[0])
            return status
        return _daemonize(archive_path, mp, opts, ops, options, verbose, saves)
    finally:
        archive.close()


@contextlib.contextmanager
def _importing_meanwhile(module: str):
    """Import *module* in a thread while the block runs; joined at its end.

    Worth it when the block mostly waits outside the GIL (zstd, zlib, I/O).
    Failures are left to the caller's own import, which raises them properly.
    """

    def run() -> None:
        with contextlib.suppress(BaseException):
            importlib.import_module(module)

    interval = sys.getswitchinterval()
    # The block's thread wants the GIL back after each call into zstd; behind
    # a busy import thread it would wait a whole interval (5 ms) each time.
    sys.setswitchinterval(min(interval, 0.0005))
    thread = threading.Thread(target=run, name="vmafs-import", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
        sys.setswitchinterval(interval)


class _SideIndexSaver:
    """Runs the side-index writes queued while opening, in a thread, once the mount is up.

    Started by the ready callback, not before: the write competes with
    mounting for the CPU, and the mount is what the user waits for.
    """

    def __init__(self, saves) -> None:
        self._saves = list(saves)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._saves and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vmafs-side-index")
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        for save in self._saves:
            try:
                save()
            except Exception:  # the mount works without it; the next open scans again
                log.exception("writing the side index failed")


def _log_start(archive_path: str, mp: str, opts: MountOptions, ops) -> None:
    from .fs import SEEK_HOLE_SUPPORTED  # noqa: PLC0415 - needs pyfuse3
    from .names import rename_messages  # noqa: PLC0415

    log.info("serving %s (%d files) on %s", archive_path, len(ops.entries), mp)
    for msg in rename_messages(ops.entries.values()):
        log.warning("%s", msg)
    for item in opts.ignored:
        log.debug("ignored mount option %r", item)
    if not SEEK_HOLE_SUPPORTED:
        log.info(
            "this pyfuse3 has no lseek handler: SEEK_DATA/SEEK_HOLE show every disk as "
            "all data, so copies read the holes too (contrib/pyfuse3/README.md)"
        )
    missing = sum(ops.archive.missing_clusters(e.dev_id) for e in ops.entries.values() if e.dev_id)
    if missing:
        log.warning("incomplete archive: %d clusters missing, reads of them give EIO", missing)


def _daemonize(archive_path, mp, opts, ops, options, verbose, saves=()) -> int:
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        status = 1
        tell = _Pipe(w)
        logging_ready = False
        try:
            os.setsid()
            if os.fork():  # the session leader exits; the daemon can never get a tty
                os._exit(0)
            os.chdir("/")
            _setup_logging(opts, detached=True, verbose=verbose)
            logging_ready = True
            _log_start(archive_path, mp, opts, ops)

            saver = _SideIndexSaver(saves)

            def on_ready(error: str | None) -> None:
                tell(error)
                if error is None:
                    _detach_stdio()  # libfuse's own mount errors still reach the terminal
                    saver.start()

            try:
                status = serve(ops, mp, options, on_ready, opts.readahead)
            finally:
                saver.join()  # before os._exit, which would cut the write short
        except BaseException as e:
            if logging_ready:  # else the one line through the pipe is all the user sees
                log.exception("filesystem process failed")
            tell(f"filesystem process failed: {e}")
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
        return 0
    if reply.startswith("ERR "):
        raise MountError(reply[4:])
    raise MountError(f"the filesystem process for {mp} died before the mount was ready")


# --- unmounting ----------------------------------------------------------------------------


def loop_devices_on(mountpoint: str) -> list[tuple[str, str]]:
    """[(/dev/loopN, backing file)] for loop devices reading files under *mountpoint*."""
    prefix = mountpoint.rstrip("/") + "/"
    out = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for name in names:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            out.append((f"/dev/{name}", backing))
    return out


def umount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount a vmafs mount with fusermount3; raises MountError (also for other mounts)."""
    mp = mountpoint_path(mountpoint)
    fstype = mount_table().get(mp)
    if fstype is None:
        raise MountError(f"{mp}: not mounted")
    if fstype != "fuse.vmafs":  # the subtype set in fuse_options()
        raise MountError(f"{mp}: not a vmafs mount (filesystem type {fstype})")
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mp]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MountError("fusermount3 not found (Debian package fuse3)") from None
    if proc.returncode == 0:
        return
    loops = loop_devices_on(mp)
    if loops:
        devs = " ".join(dev for dev, _ in loops)
        raise MountError(
            f"{mp} is busy: loop device {devs} reads {loops[0][1]}; "
            f"unmount what uses it, then 'losetup -d {devs}', then retry"
        )
    detail = " ".join(proc.stderr.split()) or f"fusermount3 exited {proc.returncode}"
    if "busy" in detail.lower():
        detail += f" (see 'fuser -vm {mp}' for the processes using it)"
    raise MountError(detail)


# --- command line ------------------------------------------------------------------------------


MOUNT_OPTIONS_HELP = f"""\
options (-o, comma-separated, may repeat):
  allow_other       let other users in (file modes still apply)
  allow_incomplete  mount an interrupted backup; missing clusters read as EIO
  uid=N, gid=N      owner shown for every file (default: you)
  fsname=NAME       source shown by mount/df (default: the archive's path)
  direct_io         no page cache, 1 MiB requests: fastest for one-off bulk
                    copies (qemu-img convert); slow small reads, no shared mmap
  readahead=KIB     readahead of the mount (default {DEFAULT_READAHEAD_KB}; root only,
                    0 keeps the kernel's 128)
  threads           serve reads from worker threads: for archives on slow or
                    network storage read by several programs at once
  logfile=PATH      log here instead of syslog when detached
  nonempty          mount over a directory that is not empty (hides its files)
mount(8)'s generic options (defaults, noauto, user, nofail, _netdev, x-*, ...)
are accepted and ignored. See vmafs(1) and docs/mount.md."""


def register(subparsers) -> None:
    """Add ``mount`` and ``umount`` to the ``vmafs`` command line."""
    p = subparsers.add_parser(
        "mount",
        help="mount an archive as a read-only directory of raw disk images",
        description="Mount ARCHIVE on MOUNTPOINT: disk-<drive>.raw per disk, each config\n"
        "file, vmstate.bin if the backup has RAM state. Read-only, files mode 0400,\n"
        "owned by you. Returns once the mount is ready (detaches unless -f).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MOUNT_OPTIONS_HELP,
    )
    p.add_argument("archive", help="the .vma (or .vma.zst/.gz/.lzo) file")
    p.add_argument("mountpoint", help="an empty directory (-o nonempty allows another directory)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="mount options, see below",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument(
        "--guest",
        action="store_true",
        help="also mount every guest filesystem read-only: the archive at MOUNTPOINT/archive, "
        "each volume at MOUNTPOINT/<volume name> (root; docs/restore.md)",
    )
    p.add_argument(
        "--engine",
        choices=("kernel", "appliance"),
        default="kernel",
        help="with --guest: how guest filesystems are mounted (only 'kernel' so far)",
    )
    p.set_defaults(func=run)
    u = subparsers.add_parser(
        "umount",
        help="unmount a vmafs mount",
        description="Unmount MOUNTPOINT (same as 'fusermount3 -u MOUNTPOINT'). For a\n"
        "'mount --guest' tree: every guest filesystem, the archive and the tree, in\n"
        "that order, also when the mount's process died.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when unused")
    u.set_defaults(func=run_umount)


def _fail(prog: str, message: str, status: int = 1) -> int:
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return status


def run(args: argparse.Namespace) -> int:
    if args.guest:
        from .guest.tree import run_mount  # noqa: PLC0415 - only for --guest

        try:
            return run_mount(args)
        except UsageError as e:
            return _fail("vmafs", f"mount: {e}", 2)
    try:
        opts = parse_options(args.options)
        status = mount(
            args.archive, args.mountpoint, opts, foreground=args.foreground, verbose=args.verbose
        )
    except UsageError as e:
        return _fail("vmafs", f"mount: {e}", 2)
    except MountError as e:
        return _fail("vmafs", str(e))
    if status == 0 and not args.foreground:
        # The mount is up and served by the detached process; this one has
        # nothing left to do.  Tearing down its interpreter (numpy, trio, the
        # archive's index) would take 0.05-0.15 s more before the caller
        # sees the mount ready.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return status


def run_umount(args: argparse.Namespace) -> int:
    from .guest.tree import run_umount as umount_guest  # noqa: PLC0415 - light

    status = umount_guest(args)  # a tree made by mount --guest, when one is recorded
    if status is not None:
        return status
    try:
        umount(args.mountpoint, lazy=args.lazy)
    except MountError as e:
        return _fail("vmafs", str(e))
    return 0


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.vmafs SOURCE TARGET [-sfnv] [-o OPTS]``: mount(8)'s helper convention.

    ``-n`` (no mtab) and ``-t`` are accepted and ignored, ``-s`` ignores
    unknown options, ``-f`` (fake) checks everything but does not mount,
    ``-v`` logs debug messages.  Always detaches, as mount(8) expects.
    """
    prog = "mount.vmafs"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=mount_helper_main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MOUNT_OPTIONS_HELP,
    )
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    parser.add_argument("-n", action="store_true", help="ignored (no mtab is written)")
    parser.add_argument("-s", action="store_true", help="sloppy: ignore unknown options")
    parser.add_argument("-f", action="store_true", help="fake: check, do not mount")
    parser.add_argument("-v", action="store_true", help="verbose logging")
    parser.add_argument("-t", dest="type", help="ignored")
    parser.add_argument("-N", dest="namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.namespace:
        return _fail(prog, "-N (mount namespaces) is not supported", 2)
    from .cli import stderr_logging  # noqa: PLC0415 - light; the CLI imports this module

    try:
        with stderr_logging(prog):
            return _helper(args, prog)
    except KeyboardInterrupt:
        return 130


def _helper(args: argparse.Namespace, prog: str) -> int:
    try:
        opts = parse_options(args.options, sloppy=args.s)
        if args.f:
            check_mountpoint(args.target, nonempty=opts.nonempty)
            open_archive(args.source, opts.allow_incomplete).close()
            return 0
        return mount(args.source, args.target, opts, verbose=args.v)
    except UsageError as e:
        return _fail(prog, str(e), 2)
    except MountError as e:
        return _fail(prog, str(e))
    except VmaError as e:
        return _fail(prog, str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(prog, f"{where}{e.strerror or e}")


if __name__ == "__main__":
    sys.exit(mount_helper_main())
