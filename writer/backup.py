"""One backup: QEMU's push-mode ``blockdev-backup`` jobs -> NBD -> packer -> archive.

The flow (docs/backup.md has the QMP in full)::

    QEMU  --(blockdev-backup, sync=full, copy-before-write)-->  nbd target node
          --(NBD over a private Unix socket)-->  writer.nbd.NbdServer
          --(Export callbacks)-->  writer.packer.Packer  -->  ArchiveOutput (temp file)

:func:`resolve_disks` maps the user's drive names to QEMU block nodes and
their sizes.  :func:`backup` then, inside one trio run:

1. opens the archive's packer (header with the device table and configs),
2. serves one NBD export per disk on a Unix socket in a private directory,
3. ``blockdev-add``\\ s an ``nbd`` target node per disk pointing at it,
4. starts all jobs in one ``transaction`` (``completion-mode: grouped``, so
   every disk has the same point in time and one failing job cancels all),
5. waits for ``BLOCK_JOB_COMPLETED`` of every job (progress from
   ``query-block-jobs``), ``blockdev-del``\\ s the targets (QEMU flushes and
   disconnects), finishes the packer and commits the output (fsync, rename).

With fleecing (:mod:`writer.fleecing`) step 3 is preceded by putting a
copy-before-write filter with a local fleecing image in front of each guest
disk, the jobs read ``snapshot-access`` nodes instead of the disks, and the
filters come out again after step 5 (or on the abort path).

Any failure - QEMU refusing a command, a job ending with an error or being
cancelled, the packer failing (e.g. ``ENOSPC``), SIGINT/SIGTERM/SIGHUP, QEMU going
away - aborts: the jobs are cancelled, the target nodes deleted, the temp file
removed, and :class:`vmafs.errors.BackupError` (or the packer's
:class:`~vmafs.errors.WriterError`) says why in one line (never as a trio
``ExceptionGroup``: a group of one is unwrapped).  The NBD server
keeps answering during the abort, so QEMU's requests in flight complete
instead of failing guest writes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from vmafs.common.progress import human_bytes
from vmafs.common.signals import SignalGuard, unwrap_group
from vmafs.errors import BackupError, WriterError

from .fleecing import Fleecing, FleecingOptions, reap_stale_fleecing
from .nbd import MAX_SOCKET_PATH, Export, NbdServer
from .output import ArchiveOutput
from .packer import Packer
from .qmp import QemuError, QmpConnection

__all__ = [
    "BackupInterrupted",
    "BackupResult",
    "JOB_PERF",
    "DriveSpec",
    "SourceDisk",
    "backup",
    "signal_guard",
    "default_devname",
    "parse_drive_spec",
    "resolve_disks",
]

log = logging.getLogger("writer.backup")

#: QEMU's block-copy tuning (``x-perf``) for the jobs of ``vmafs backup``.
#: QEMU's default keeps up to 64 copies of 1 MiB in flight, and its NBD client
#: sends them in order on the one connection to vmafs.  In push mode a guest
#: write to a cluster not yet copied waits for its own copy-before-write, and
#: that copy queues behind every job copy already on the way: a burst of
#: megabytes (a throttled job sends a whole 100 ms slice at once), i.e.
#: milliseconds to tens of milliseconds.  Four copies of 256 KiB bound that
#: queue to 1 MiB; with fleecing the same bound keeps the job's bursts from
#: crowding the guest's writes in QEMU's event loop.  docs/benchmarks.md has
#: the measurements.  Copy offload cannot work into an NBD node.
JOB_PERF = types.MappingProxyType(
    {"use-copy-range": False, "max-workers": 4, "max-chunk": 256 * 1024}
)

#: seconds between query-block-jobs polls for the progress bar
PROGRESS_INTERVAL = 0.5
#: after the first failed/cancelled job, how long to wait for the events of the
#: others (a grouped transaction cancels them) to find the root cause
GRACE_SECONDS = 2.0
#: the abort path waits at most this long for QEMU to end the cancelled jobs and
#: delete the nodes.  Generous: a job cancelled while its source hangs on slow
#: storage (NFS, a dying disk) may need tens of seconds, and giving up early
#: leaves the job running against a closed socket, failing guest writes.  A
#: third signal cuts the wait short (:func:`_on_signal`).
CANCEL_TIMEOUT = 60.0

ProgressFn = Callable[[int, int], None]
#: receives a short text for the progress line (the fleecing images' size)
NoteFn = Callable[[str], None]


# --- what to back up ----------------------------------------------------------------


def default_devname(drive: str) -> str:
    """The archive's device name for *drive* when none is given: Proxmox's ``drive-<id>``.

    A name that already starts with ``drive-`` (Proxmox's own drive ids) is kept.
    """
    return drive if drive.startswith("drive-") else f"drive-{drive}"


@dataclass(frozen=True)
class DriveSpec:
    """``DRIVE[=DEVNAME]`` from the command line."""

    drive: str
    devname: str


def parse_drive_spec(text: str) -> DriveSpec:
    drive, sep, devname = text.partition("=")
    if not drive or (sep and not devname):
        raise ValueError(f"bad drive {text!r}: expected DRIVE or DRIVE=DEVNAME")
    return DriveSpec(drive, devname if sep else default_devname(drive))


@dataclass(frozen=True)
class SourceDisk:
    """A disk to back up: the node the job copies, its exact size, its archive name."""

    devname: str
    node: str
    size: int
    drive: str = ""  # as the user named it, for messages
    #: QOM path of the guest device using the drive ("" if none): fleecing re-points it
    qdev: str = ""

    @property
    def label(self) -> str:
        return self.drive or self.node


def _match_block(entry: dict, drive: str) -> bool:
    qdev = entry.get("qdev") or ""
    inserted = entry.get("inserted") or {}
    return (
        entry.get("device") == drive
        or qdev == drive
        or qdev.startswith(f"/machine/peripheral/{drive}/")
        or inserted.get("node-name") == drive
    )


async def resolve_disks(qmp: QmpConnection, specs: Sequence[DriveSpec]) -> list[SourceDisk]:
    """Find each drive's node and size with ``query-block``/``query-named-block-nodes``.

    A DRIVE is matched against, in this order: a BlockBackend name (``-drive
    id=``), a guest device id (qdev id or ``/machine/peripheral/<id>/...``),
    a node name.  The size is the node's ``virtual-size``, which is what the
    backup job copies (the NBD export must have exactly this size).

    Fleecing filters a killed vmafs left in front of guest devices are taken
    out first (:func:`writer.fleecing.reap_stale_fleecing`): until then the
    drive would resolve to the dead run's filter instead of the guest's node.
    """
    if not specs:
        raise BackupError("no drives given")
    await reap_stale_fleecing(qmp)
    blocks = await qmp.execute("query-block")
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    disks: list[SourceDisk] = []
    for spec in specs:
        found = [b for b in blocks if _match_block(b, spec.drive)]
        if found:
            inserted = found[0].get("inserted")
            if not inserted:
                raise BackupError(f"drive {spec.drive!r} has no medium inserted")
            node, size = inserted["node-name"], inserted["image"]["virtual-size"]
            qdev = found[0].get("qdev") or ""
        else:
            named = [n for n in nodes if n.get("node-name") == spec.drive]
            if not named:
                known = sorted(
                    {b["device"] for b in blocks if b.get("device")}
                    | {b["inserted"]["node-name"] for b in blocks if b.get("inserted")}
                )
                raise BackupError(
                    f"QEMU has no drive or block node {spec.drive!r}"
                    + (f" (drives: {', '.join(known)})" if known else "")
                )
            node, size = spec.drive, named[0]["image"]["virtual-size"]
            users = [b for b in blocks if (b.get("inserted") or {}).get("node-name") == node]
            qdev = (users[0].get("qdev") or "") if users else ""
        if size <= 0:
            raise BackupError(f"drive {spec.drive!r} has size {size}")
        disks.append(SourceDisk(spec.devname, node, int(size), spec.drive, qdev))
    seen: dict[str, str] = {}
    for d in disks:
        if d.node in seen:
            raise BackupError(f"drives {seen[d.node]!r} and {d.drive!r} are the same node {d.node}")
        seen[d.node] = d.drive
    if len({d.devname for d in disks}) != len(disks):
        raise BackupError("two drives have the same device name in the archive")
    return disks


# --- the result ----------------------------------------------------------------------


@dataclass
class BackupResult:
    """What a finished backup did (for the summary line and tests)."""

    path: str | None
    disks: list[SourceDisk]
    bytes_written: int = 0
    clusters: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    requests: int = 0
    #: with fleecing: the most the fleecing images took on disk (bytes), sampled
    fleecing_peak: int = 0

    @property
    def disk_bytes(self) -> int:
        return sum(d.size for d in self.disks)


# --- aborting -------------------------------------------------------------------------


class BackupInterrupted(BackupError):
    """SIGINT/SIGTERM/SIGHUP aborted the backup (after a clean abort); ``signum`` says which."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def signal_guard() -> SignalGuard:
    """The stop-signal guard of ``vmafs backup``/``create`` (see :class:`SignalGuard`).

    While :func:`backup` runs (given this guard) a signal aborts the backup
    cleanly: jobs cancelled, nodes deleted, temp file removed, then
    :class:`BackupInterrupted`.  Before or after that phase (connecting,
    starting a daemon, stopping it) a signal cancels the command, whose
    ``async with`` blocks clean up, and the guard raises
    :class:`BackupInterrupted` - unless the archive was already committed.
    """
    return SignalGuard(lambda signum: interrupted(signum, "backup cancelled"))


def interrupted(signum: int, outcome: str) -> BackupInterrupted:
    """``interrupted by SIGTERM; <outcome>``, carrying the signal for the exit status."""
    return BackupInterrupted(f"interrupted by {signal.Signals(signum).name}; {outcome}", signum)


@dataclass
class _Abort:
    """The first cause of failure wins; recording it cancels the running phase.

    It also cancels the NBD requests waiting inside the packer (backpressure),
    which are then acknowledged: see :func:`_watched`.
    """

    cause: str | None = None
    exc: BaseException | None = None
    scope: trio.CancelScope | None = None
    #: set at the commit point: the archive is complete, later events change nothing
    closed: bool = False
    #: the signal that caused the abort, if one did
    signum: int | None = None
    #: cancel scopes of the NBD requests currently inside the packer
    inflight: set[trio.CancelScope] = field(default_factory=set)
    #: signals received after the one that started the abort
    more_signals: int = 0
    #: cancelled by the third signal: stop waiting for QEMU in :func:`_cleanup`
    #: (may be cancelled before the clean-up enters it)
    cleanup_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: the scope of the fleecing tear-down under way (see :func:`_unfleece`)
    unfleece_scope: trio.CancelScope | None = None
    #: the third signal came: stop waiting for QEMU in every clean-up still to come
    cleanup_stopped: bool = False

    def __call__(self, cause: str, exc: BaseException | None = None) -> None:
        if self.closed:
            log.info("after the commit point, ignored: %s", cause)
            return
        if self.cause is None:
            self.cause, self.exc = cause, exc
            log.info("aborting the backup: %s", cause)
            for request in self.inflight:
                request.cancel()
        if self.scope is not None:
            self.scope.cancel()

    @property
    def doomed(self) -> bool:
        return self.cause is not None and not self.closed


def _watched(export: Export, abort: _Abort) -> Export:
    """*export* wired to *abort*: a writer failure aborts, and a doomed archive
    acknowledges everything.

    Once the backup is being aborted (for any cause) the archive will never be
    committed, so every write - the failing one, those waiting in the packer,
    and all that follow until QEMU has cancelled the jobs - is acknowledged
    and dropped instead of answered with an NBD error.  An error reply would
    fail a guest write whose copy-before-write is waiting on it; an
    acknowledgement lets the guest go on while vmafs cancels the jobs.  The
    failure itself is recorded first, so the writer's own message (e.g. "No
    space left on device") is the reported cause.
    """

    async def guarded(call, *args) -> None:
        if abort.doomed:
            return
        with trio.CancelScope() as request:
            abort.inflight.add(request)
            try:
                await call(*args)
            except Exception as e:  # the backup is over; see above
                abort(f"{e}", e)
                if abort.closed:  # after the commit point nothing is dropped silently
                    raise
            finally:
                abort.inflight.discard(request)

    async def on_write(offset: int, data) -> None:
        await guarded(export.on_write, offset, data)

    async def on_zero(offset: int, length: int) -> None:
        await guarded(export.on_zero, offset, length)

    return Export(
        size=export.size,
        on_write=on_write,
        on_zero=on_zero,
        on_flush=export.on_flush,
        description=export.description,
    )


# --- the backup -----------------------------------------------------------------------


class _Names:
    """QMP ids owned by this backup: nbd target nodes and job ids, unique per run."""

    def __init__(self, count: int) -> None:
        self.tag = tag = secrets.token_hex(3)
        self.targets = [f"vmafs-{tag}-t{i}" for i in range(count)]
        self.jobs = [f"vmafs-{tag}-j{i}" for i in range(count)]


async def backup(
    qmp: QmpConnection,
    disks: Sequence[SourceDisk],
    output: ArchiveOutput,
    configs: Iterable[tuple[str, bytes]] = (),
    *,
    speed: int = 0,
    progress: ProgressFn | None = None,
    socket_dir: str | None = None,
    signals: SignalGuard | None = None,
    fleecing: FleecingOptions | None = None,
    note: NoteFn | None = None,
    job_perf: Mapping[str, object] | None = JOB_PERF,
) -> BackupResult:
    """Back up *disks* of the QEMU behind *qmp* into *output*; see the module docs.

    Owns *output*: commits it on success, aborts it (temp file removed) on
    any failure.  ``speed`` is QEMU's per-job rate limit in bytes/s (0 = none).
    ``progress(done, total)`` is called about twice a second.  With a
    :class:`SignalGuard`, SIGINT, SIGTERM and SIGHUP abort the backup cleanly
    (cancel jobs, delete nodes, remove the temp file, :class:`BackupInterrupted`);
    without one they behave as trio's default (KeyboardInterrupt).  The NBD
    socket is made in a new directory in *socket_dir* (default: ``$TMPDIR``).
    With *fleecing* the jobs read a point-in-time view kept by copy-before-write
    filters into fleecing images (:mod:`writer.fleecing`), set up before the
    jobs start and torn down on every way out; ``note`` then gets the images'
    size for the progress line.  ``job_perf`` is the jobs' ``x-perf`` (None:
    QEMU's defaults, for a source no guest writes to).
    """
    if fleecing is not None:
        try:
            Fleecing.refuse_unattached(disks)
        except BaseException:
            output.abort()
            raise
    started = time.monotonic()
    abort = _Abort()
    names = _Names(len(disks))
    result = BackupResult(output.path, list(disks))
    try:
        sock_dir = tempfile.mkdtemp(prefix="vmafs-nbd-", dir=socket_dir)
    except BaseException:
        output.abort()
        raise
    sock_path = os.path.join(sock_dir, "nbd.sock")
    error: BaseException | None = None
    try:
        _check_socket_path(sock_path, socket_dir)
        if signals is not None:
            signals.delegate = functools.partial(_on_signal, abort)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(_watch_lost, qmp, abort)
            try:
                await _backup_in(
                    qmp,
                    disks,
                    output,
                    configs,
                    names,
                    sock_path,
                    abort,
                    result,
                    jobs=_JobOptions(speed, job_perf),
                    progress=progress,
                    fleecing=fleecing,
                    note=note,
                )
            except Exception as e:  # noqa: BLE001 - re-raised below, outside the nursery
                error = unwrap_group(e)
            watchers.cancel_scope.cancel()
        if error is not None:
            raise error
    except BaseException:
        output.abort()
        raise
    finally:
        if signals is not None:
            signals.delegate = None
        shutil.rmtree(sock_dir, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def _check_socket_path(path: str, socket_dir: str | None) -> None:
    """Refuse a socket path bind() would refuse, before anything is started in QEMU.

    The kernel's own error, "AF_UNIX path too long", names neither the path nor
    the way out.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        fix = (
            "a shorter --socket-dir"
            if socket_dir
            else "a shorter TMPDIR (or, for vmafs backup, --socket-dir)"
        )
        raise BackupError(
            f"the NBD socket path {path} is {size} bytes, longer than the "
            f"{MAX_SOCKET_PATH} bytes a Unix socket path may have: use {fix}"
        )


def _on_signal(abort: _Abort, signum: int) -> None:
    """First signal: abort cleanly.  Second: say what is being waited for.  Third:
    stop waiting for QEMU (what is left there is named).

    One signal always gets the full clean-up: cutting it short leaves a job
    running against a closed socket, and its next request fails a guest write.
    """
    name = signal.Signals(signum).name
    if abort.closed:
        log.info("%s after the archive was committed; ignored", name)
    elif abort.cause is None:
        abort.signum = signum
        abort(f"interrupted by {name}; backup cancelled")
    else:
        abort.more_signals += 1
        if abort.more_signals == 1:
            log.warning(
                "%s: still cleaning up in QEMU (at most %g s); "
                "send it again to stop waiting and leave the jobs and nodes there",
                name,
                CANCEL_TIMEOUT,
            )
        else:
            abort.cleanup_stopped = True
            abort.cleanup_scope.cancel()
            if abort.unfleece_scope is not None:
                abort.unfleece_scope.cancel()


@dataclass(frozen=True)
class _JobOptions:
    """What every job of one backup is started with."""

    speed: int  #: bytes/s, 0 = no limit
    perf: Mapping[str, object] | None  #: ``x-perf`` (None: QEMU's defaults)


async def _watch_lost(qmp: QmpConnection, abort: _Abort) -> None:
    await qmp.lost.wait()
    abort(f"QEMU went away: {qmp.lost_reason}")


async def _backup_in(
    qmp, disks, output, configs, names, sock_path, abort, result, *, jobs, progress, fleecing, note
) -> None:
    fleece = Fleecing(qmp, disks, fleecing, names.tag) if fleecing is not None else None
    async with Packer(output, [(d.devname, d.size) for d in disks], configs) as packer:
        exports = {d.devname: _watched(packer.export(d.devname), abort) for d in disks}
        server = NbdServer(sock_path, exports)
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, server, abort)
            try:
                with trio.CancelScope() as scope:
                    abort.scope = scope
                    if abort.cause is None:  # a signal before the scope existed
                        await _run_jobs(
                            qmp, disks, names, sock_path, abort, jobs, progress, fleece, note
                        )
                abort.scope = None
                if abort.cause is None:
                    # Success: QEMU flushes and disconnects on blockdev-del, then the
                    # packer writes the last extent and the output is made durable.
                    await _delete_targets(qmp, names.targets, strict=True)
                    await _unfleece(qmp, fleece, abort)
                    await packer.finish()
                    abort.closed = abort.cause is None
            except Exception as e:  # noqa: BLE001 - every failure aborts the same way
                abort(str(e), e)
            if abort.cause is not None:
                with trio.CancelScope(shield=True):
                    failure = await _cleanup(qmp, names, abort)
                    await _unfleece(qmp, fleece, abort)
            nursery.cancel_scope.cancel()
        lat = server.latency()
        result.latency_p50, result.latency_p99, result.latency_max = lat.p50, lat.p99, lat.max
        result.requests = server.requests
        result.clusters = packer.clusters_stored
        result.duplicates = packer.duplicates_dropped
        result.bytes_written = packer.bytes_written
        if fleece is not None:
            result.fleecing_peak = fleece.peak
    if abort.cause is not None:
        if abort.signum is not None:
            raise BackupInterrupted(abort.cause, abort.signum)
        exc = abort.exc
        if isinstance(exc, WriterError):  # includes BackupError/QemuError: already precise
            raise exc
        err = BackupError(abort.cause)
        raise err from (exc or failure)
    await trio.to_thread.run_sync(output.commit)


async def _serve(server: NbdServer, abort: _Abort, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run *server*.  A failure before it listens is raised (nothing has started
    in QEMU yet); once it serves, a failure (say EMFILE in accept) aborts the
    backup like any other, so the jobs are cancelled and the target nodes
    deleted, instead of cancelling the task that would clean up in QEMU."""
    serving = False

    def started(value=None) -> None:
        nonlocal serving
        serving = True
        task_status.started(value)

    try:
        await server.serve(task_status=types.SimpleNamespace(started=started))
    except Exception as e:  # becomes the backup's error, see _backup_in
        if not serving:
            raise
        cause = unwrap_group(e)  # serve's own nursery wraps it
        abort(f"the NBD server failed: {cause}", cause)


_STALE_TARGET = re.compile(r"vmafs-[0-9a-f]{6}-t[0-9]+")


async def reap_stale_targets(qmp: QmpConnection) -> list[str]:
    """Delete target nodes left in QEMU by a vmafs that was killed (SIGKILL, OOM).

    A node is stale when it is one of ours by name, an ``nbd`` node, and
    nobody listens on its Unix socket any more (a live vmafs serves its socket
    until it has deleted its nodes).  A node still used by a job is left alone
    (QEMU refuses to delete it).  The dead run's socket directory is removed
    too.  Returns the names deleted.
    """
    reaped = []
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
        name = node.get("node-name", "")
        if node.get("drv") != "nbd" or not _STALE_TARGET.fullmatch(name):
            continue
        filename = (node.get("image") or {}).get("filename", "")
        sock = urllib.parse.parse_qs(urllib.parse.urlsplit(filename).query).get("socket", [""])[0]
        if not sock or await _listening(sock):
            continue
        try:
            await qmp.execute("blockdev-del", {"node-name": name})
        except QemuError as e:
            log.info("stale node %s not removed: %s", name, e)
            continue
        log.warning("removed node %s left behind by a killed vmafs", name)
        reaped.append(name)
        sock_dir = os.path.dirname(sock)
        if os.path.basename(sock_dir).startswith("vmafs-nbd-"):
            shutil.rmtree(sock_dir, ignore_errors=True)
    return reaped


async def _listening(path: str) -> bool:
    """Does a process accept connections on the Unix socket *path*?"""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await sock.connect(path)
            return True
        return True  # no answer in time: assume alive, never delete what may be in use
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:
        return True
    finally:
        sock.close()


async def _unfleece(qmp: QmpConnection, fleece: Fleecing | None, abort: _Abort) -> None:
    """Tear the fleecing down (bounded like the rest of the clean-up); name what stays."""
    if fleece is None:
        return
    if qmp.lost.is_set():
        # QEMU is gone (or at least its monitor): nothing to put back, and the
        # images are garbage.  (A QEMU that lives on keeps its open fds.)
        fleece.discard()
        return
    left: list[str] | None = None
    # a fresh scope per call: a signal during the success path's tear-down
    # turns it into an abort, which tears down (what is left) once more
    with trio.CancelScope() as abort.unfleece_scope, trio.move_on_after(CANCEL_TIMEOUT):
        if abort.cleanup_stopped:
            abort.unfleece_scope.cancel()
        try:
            left = await fleece.teardown()
        except QemuError as e:
            log.warning("removing the fleecing filters failed: %s", e)
    abort.unfleece_scope = None
    if left is None or left:
        log.warning(
            "fleecing filter(s) or image(s) may be left in front of the guest's disks "
            "(%s; the next vmafs backup removes them)",
            ", ".join(left or [d.filter_node for d in fleece.drives]),
        )


def _job_error(error: str, disk: SourceDisk, fleece: Fleecing | None) -> str:
    if fleece is not None and error == "Permission denied":
        # snapshot-access answers EACCES once on-cbw-error=break-snapshot dropped it
        return (
            f"QEMU's backup job of {disk.label} failed: the fleecing snapshot was dropped "
            f"because a copy into the fleecing image in {fleece.opts.directory} failed or took "
            f"longer than {fleece.opts.cbw_timeout} s (disk full or too slow?); the guest's "
            "writes went on unharmed; make room there or use a faster local disk"
        )
    return f"QEMU's backup job of {disk.label} failed: {error}"


async def _start_jobs(qmp, sources, names, jobs: _JobOptions) -> None:
    """Start every job in one transaction, with ``jobs.perf`` as ``x-perf``.

    A QEMU that does not know ``x-perf`` (an experimental option: it may be
    renamed) gets the jobs without it, and a warning: the backup is the same,
    only guest writes may wait longer for it in push mode.
    """

    def actions(perf) -> list[dict]:
        out = []
        for source, target, job in zip(sources, names.targets, names.jobs, strict=True):
            data = {"job-id": job, "device": source, "target": target, "sync": "full"}
            if jobs.speed:
                data["speed"] = jobs.speed
            if perf:
                data["x-perf"] = dict(perf)
            out.append({"type": "blockdev-backup", "data": data})
        return out

    props = {"completion-mode": "grouped"}
    try:
        await qmp.execute("transaction", {"actions": actions(jobs.perf), "properties": props})
    except QemuError as e:
        if not jobs.perf or "x-perf" not in str(e):
            raise
        log.warning("QEMU refuses the job option x-perf (%s); jobs started without it", e)
        await qmp.execute("transaction", {"actions": actions(None), "properties": props})


async def _run_jobs(
    qmp, disks, names, sock_path, abort, jobs, progress, fleece=None, note=None
) -> None:
    """Set up fleecing, blockdev-add the targets, start the transaction, wait for
    every job's end."""
    await reap_stale_targets(qmp)
    sources = [d.node for d in disks]
    if fleece is not None:
        sources = await fleece.setup()
    for disk, target in zip(disks, names.targets, strict=True):
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": target,
                "server": {"type": "unix", "path": sock_path},
                "export": disk.devname,
            },
        )
    await _start_jobs(qmp, sources, names, jobs)
    log.info("backup jobs started: %s", ", ".join(names.jobs))
    total = sum(d.size for d in disks)
    by_job = dict(zip(names.jobs, disks, strict=True))
    async with trio.open_nursery() as nursery:
        ended: set[str] = set()
        if progress is not None or fleece is not None:
            nursery.start_soon(_poll_progress, qmp, by_job, ended, total, progress, fleece, note)
        cause = await _wait_jobs(qmp, by_job, ended, fleece)
        nursery.cancel_scope.cancel()
    if cause is not None:
        abort(cause)
    elif progress is not None:
        progress(total, total)


async def _wait_jobs(
    qmp, by_job: dict[str, SourceDisk], ended: set[str], fleece: Fleecing | None = None
) -> str | None:
    """Consume QMP events until every job ended; None on success, else the cause."""
    errors: list[str] = []
    cancelled: list[str] = []
    deadline = trio.current_time() + 1e9
    while len(ended) < len(by_job):
        with trio.move_on_at(deadline):
            event = await qmp.events.receive()
        if trio.current_time() >= deadline:
            break
        kind = event.get("event")
        data = event.get("data") or {}
        job = data.get("device")
        if job not in by_job or kind not in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            if kind == "BLOCK_JOB_ERROR" and job in by_job:
                log.info("QEMU reports an I/O error in %s: %s", job, data)
            continue
        ended.add(job)
        label = by_job[job].label
        if kind == "BLOCK_JOB_CANCELLED":
            cancelled.append(label)
        elif data.get("error"):
            errors.append(_job_error(data["error"], by_job[job], fleece))
        else:
            continue
        deadline = min(deadline, trio.current_time() + GRACE_SECONDS)
    if errors:
        return "; ".join(errors)
    if cancelled:
        return f"QEMU's backup job of {', '.join(cancelled)} was cancelled"
    return None


async def _poll_progress(
    qmp, by_job, ended, total: int, progress: ProgressFn | None, fleece=None, note=None
) -> None:
    """Report the jobs' progress (and the fleecing images' size) twice a second."""
    while True:
        try:
            jobs = await qmp.execute("query-block-jobs", timeout=10)
        except QemuError:
            return
        done = 0
        running = {j["device"]: j for j in jobs}
        for job, disk in by_job.items():
            if job in running:
                done += min(int(running[job].get("offset", 0)), disk.size)
            elif job in ended:
                done += disk.size
        if fleece is not None:
            size = fleece.image_bytes()
            if note is not None:
                note(f"fleecing {human_bytes(size)}")
        if progress is not None:
            progress(done, total)
        await trio.sleep(PROGRESS_INTERVAL)


async def _delete_targets(qmp, targets: Sequence[str], *, strict: bool) -> list[str]:
    """blockdev-del each target node that exists; returns the ones that would not go."""
    try:
        present = {
            n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})
        }
    except QemuError:
        if strict:
            raise
        return list(targets)
    left = []
    for node in targets:
        if node not in present:
            continue
        try:
            await qmp.execute("blockdev-del", {"node-name": node})
        except QemuError as e:
            if strict:
                raise
            log.warning("could not remove node %s: %s", node, e)
            left.append(node)
    return left


async def _cleanup(qmp: QmpConnection, names: _Names, abort: _Abort) -> BaseException | None:
    """Cancel our jobs, wait for them to end, delete our nodes (best effort, bounded).

    Bounded by :data:`CANCEL_TIMEOUT` and by ``abort.cleanup_scope`` (a third
    signal); either way a warning names what may be left in QEMU.
    """
    if qmp.lost.is_set():
        return None
    left_behind = (
        f"job(s) {', '.join(names.jobs)} and node(s) {', '.join(names.targets)} may be "
        "left in QEMU (a job fails on its next request once vmafs is gone; "
        "the next vmafs backup removes the nodes)"
    )
    waiting = ["an answer"]  # what the clean-up waits for, for the message
    with abort.cleanup_scope:
        try:
            return await _cancel_and_delete(qmp, names, waiting)
        except trio.TooSlowError as e:
            what = "did not answer" if waiting[0] == "an answer" else "did not end the jobs"
            log.warning(
                "cleaning up in QEMU: QEMU %s within %g s; %s", what, CANCEL_TIMEOUT, left_behind
            )
            return e
        except QemuError as e:
            log.warning("cleaning up in QEMU failed: %s; %s", e, left_behind)
            return e
    log.warning("cleaning up in QEMU stopped by a signal; %s", left_behind)
    return BackupError("cleaning up in QEMU stopped by a signal")


async def _cancel_and_delete(qmp: QmpConnection, names: _Names, waiting: list[str]) -> None:
    """Cancel our jobs, poll until QEMU has ended them, delete our nodes.

    ``waiting[0]`` says what it is waiting for when the time runs out.
    """
    with trio.fail_after(CANCEL_TIMEOUT):
        ours = set(names.jobs)
        first = True
        while True:
            waiting[0] = "an answer"
            jobs = [j for j in await qmp.execute("query-block-jobs") if j["device"] in ours]
            if not jobs:
                break
            if first:
                for job in jobs:
                    try:
                        await qmp.execute(
                            "block-job-cancel", {"device": job["device"], "force": True}
                        )
                    except QemuError as e:
                        log.info("block-job-cancel %s: %s", job["device"], e)
                first = False
            waiting[0] = "the jobs to end"
            await trio.sleep(0.05)
        waiting[0] = "an answer"
        left = await _delete_targets(qmp, names.targets, strict=False)
        if left:
            log.warning("nodes left in QEMU after the abort: %s", ", ".join(left))
