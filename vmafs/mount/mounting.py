"""``vmafs mount`` from start to end: checks, opening the archive, serving (detached or not).

The order of the steps, and why, is in :mod:`vmafs.mount`'s docstring.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ..common.imports import importing_meanwhile
from . import running
from .checks import check_logfile, check_mountpoint, open_archive
from .daemon import DaemonError, Ready, daemonize
from .errors import MountError
from .logs import default_logfile, dump_stacks_on, setup_logging
from .options import MountOptions, fuse_options
from .serve import serve

log = logging.getLogger("vmafs.mount")


def mount(
    archive_path: str,
    mountpoint: str,
    opts: MountOptions,
    *,
    foreground: bool = False,
    verbose: bool = False,
    archive=None,
    saves=(),
) -> int:
    """Everything ``vmafs mount`` does; returns the exit status or raises.

    With *archive* (an :class:`~vmafs.archive.Archive` of *archive_path*
    that the caller opened and will close) it is served as it is, not
    opened a second time; the caller must not read it while the detached
    process lives (they share its file descriptors).  *saves* are the side
    index writes that the caller's open queued (:func:`vmafs.sidecar.deferred_saves`):
    the filesystem process runs them once the mount is up.

    Raises :class:`MountError`, :class:`VmaError` or :class:`OSError` for
    anything found before the filesystem process detaches.
    """
    from ..warmup import HeaderWarmer  # noqa: PLC0415

    owned = archive is None
    # Cold, the extent headers are read into the page cache while numpy imports.
    warmer = HeaderWarmer(os.path.abspath(archive_path)) if owned else None
    try:
        from ..archive import Archive  # noqa: PLC0415, F401 - here, not in the thread below
        from ..common.progress import Progress  # noqa: PLC0415, F401 - ditto
        from ..sidecar import deferred_saves  # noqa: PLC0415
        from ..source import import_container  # noqa: PLC0415

        mp = check_mountpoint(mountpoint, nonempty=opts.nonempty)
        verbose = verbose or opts.debug
        if opts.logfile and not foreground:
            opts.logfile = check_logfile(opts.logfile)
        archive_path = os.path.abspath(archive_path)
        # pyfuse3 and trio take ~0.3 s to import: done while a compressed archive
        # is decompressed.  Before that thread starts, this one imports what it
        # needs itself (zstandard etc.): two threads importing take turns.  A side
        # index this open makes is written by the filesystem process once the
        # mount is up (_SideIndexSaver), not before the mount is ready.
        if owned:
            import_container(archive_path)
            with importing_meanwhile("pyfuse3", "trio"), deferred_saves() as saves:
                archive = open_archive(archive_path, opts.allow_incomplete, opts.index_beside)
    finally:
        if warmer is not None:
            warmer.stop()  # before the fork: the filesystem process gets no such thread
    try:
        from ..fs import VmaFS  # noqa: PLC0415 - needs pyfuse3

        ops = VmaFS(
            archive,
            uid=opts.uid,
            gid=opts.gid,
            direct_io=opts.direct_io,
            # A cold decompression must not hold up the loop (docs/mount.md, "Threads").
            threaded=opts.threads or archive.compressed,
        )
        options = fuse_options(opts, archive_path)
        held: list[int] = []

        def run(ready: Ready) -> int:
            """Serve until unmounted; the side index is written once the mount is up."""
            try:
                # Held until this process exits: 'vmafs umount' waits for that.
                held.append(running.hold(mp))
            except MountError as e:
                ready(str(e))
                return 1
            _log_start(archive_path, mp, opts, ops)
            dump_stacks_on(signal.SIGUSR1)
            saver = _SideIndexSaver(saves)

            def on_ready(error: str | None) -> None:
                ready(error)
                if error is None:
                    saver.start()

            try:
                return serve(
                    ops,
                    mp,
                    options,
                    on_ready,
                    whole_requests(opts.readahead, ops),
                    alongside=ops.background_tasks(),
                )
            finally:
                saver.join()  # before the process exits, which would cut the write short

        if foreground:
            setup_logging(opts, detached=False, verbose=verbose)
            errors: list[str] = []
            status = run(lambda error: errors.append(error) if error else None)
            if errors and status:
                raise MountError(errors[0])
            return status
        try:
            daemonize(
                run,
                what=f"the filesystem process for {mp}",
                setup=lambda: setup_logging(opts, detached=True, verbose=verbose),
                # libfuse's debug output goes to stderr: into the log file, not /dev/null
                stderr_path=(opts.logfile or default_logfile()) if opts.debug else None,
            )
        except DaemonError as e:
            raise MountError(str(e)) from None
        return 0
    finally:
        if owned:
            archive.close()
        for fd in held:  # after the archive: the lock says "the archive is released"
            os.close(fd)


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
            from ..sidecar import run_saves  # noqa: PLC0415 - imported already by the open

            self._thread = threading.Thread(
                target=run_saves, args=(self._saves,), name="vmafs-side-index"
            )
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def whole_requests(readahead_kb: int, ops) -> int:
    """*readahead_kb* rounded down to whole requests when *ops* caps their size.

    A read whose replies are spliced comes in requests of at most
    ``ops.max_pages`` (960 KiB without CAP_SYS_RESOURCE, see
    :class:`vmafs.fs.SplicePipe`); a 1024 KiB readahead window would then go
    out as 960 + 64 KiB, twice the requests (measured: 512 instead of 274 for
    256 MiB).  0 and windows below one request stay as they are.
    """
    request_kb = getattr(ops, "max_pages", 0) * os.sysconf("SC_PAGESIZE") // 1024
    if not request_kb or readahead_kb <= request_kb:
        return readahead_kb
    return readahead_kb // request_kb * request_kb


def _log_start(archive_path: str, mp: str, opts: MountOptions, ops) -> None:
    from ..fs import (  # noqa: PLC0415 - needs pyfuse3
        READ_MAPS_SUPPORTED,
        READ_SEGMENTS_SUPPORTED,
        SEEK_HOLE_SUPPORTED,
    )
    from ..names import rename_messages  # noqa: PLC0415

    log.info("serving %s (%d files) on %s", archive_path, len(ops.entries), mp)
    if ops.threaded and not opts.threads:
        log.info("compressed archive: reads run in worker threads (decompression off the loop)")
    for msg in rename_messages(ops.entries.values()):
        log.warning("%s", msg)
    for item in opts.ignored:
        log.debug("ignored mount option %r", item)
    if not SEEK_HOLE_SUPPORTED:
        log.info(
            "this pyfuse3 has no lseek handler: SEEK_DATA/SEEK_HOLE show every disk as "
            "all data, so copies read the holes too (contrib/pyfuse3/README.md)"
        )
    if not READ_SEGMENTS_SUPPORTED and not ops.archive.compressed:
        log.info(
            "this pyfuse3 cannot answer reads with pieces of the archive: every byte "
            "read is copied through Python (contrib/pyfuse3/README.md)"
        )
    elif not READ_MAPS_SUPPORTED and not ops.archive.compressed:
        log.info(
            "this pyfuse3 cannot answer reads from the offset map itself: every disk "
            "read is a Python call (contrib/pyfuse3/README.md)"
        )
    missing = sum(ops.archive.missing_clusters(e.dev_id) for e in ops.entries.values() if e.dev_id)
    if missing:
        log.warning("incomplete archive: %d clusters missing, reads of them give EIO", missing)
