"""``vmafs extract ARCHIVE DIR [-d drive,...]``: restore files like ``vma extract``.

Writes the same files a mount shows (the names come from
:func:`vmafs.names.safe_entry_names`, so both always agree):
``disk-<devname>.raw`` per disk, ``vmstate.bin`` for the RAM state, each
config under its own name.

Safety, in this order:

1. The archive is opened (and so fully validated) before DIR is touched: a
   damaged or incomplete archive leaves no trace.  ``--allow-incomplete``
   accepts an interrupted backup; its missing clusters stay holes (zeros).
2. DIR must not exist (it is created, mode 0700) or be an empty directory.
3. Every file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to a
   file descriptor of DIR, under a name that :mod:`vmafs.names` vetted (no
   ``/``, no ``..``): nothing is written outside DIR and nothing existing is
   overwritten or followed, whatever the archive's names say and even if
   someone plants a symlink in DIR meanwhile.
4. On any error, Ctrl-C, SIGTERM, SIGHUP (the terminal or ssh session went
   away) or SIGQUIT the files this run created are removed again (and DIR, if
   this run created it), so a DIR that exists afterwards holds a complete
   extraction.  Only a hard kill (SIGKILL, power loss) can leave partial
   files behind.

Disks are written sparse: the file is sized with ftruncate, zero clusters
and unstored (all-zero) 4 KiB blocks are skipped, and only stored data is
read.  From a plain archive, disk by disk in runs of up to 16 MiB through
:meth:`Archive.readinto`; from a compressed one, all disks in one pass in
the archive's own order (:mod:`._archive_order`), since reading a
compressed stream out of order decodes it many times over.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

import numpy as np

from .. import names
from ..common.console import writing_stdout
from ..common.progress import Progress, add_progress_options, human_bytes, want_progress
from ..common.signals import first_signal_raises
from ..errors import VmaError
from ..format import BLOCK_SIZE
from ._archive_order import prefers_archive_order, write_in_archive_order
from ._common import open_archive, printable

HELP = "restore the disks, configs and vmstate of an archive into a directory"

DESCRIPTION = """\
Extract ARCHIVE into the directory DIR, as Proxmox's `vma extract` does:

  disk-<devname>.raw   each disk as a sparse raw image of its exact size
  vmstate.bin          the saved RAM state, if the backup has one
  <config name>        each configuration file (qemu-server.conf, ...)

The archive is checked completely before anything is written (as by
`vmafs verify`); a damaged archive is refused, and so is an incomplete one
(an interrupted backup) unless --allow-incomplete is given.

DIR must not exist yet (it is created, mode 0700) or must be an empty
directory.  Existing files are never overwritten.  Names stored in the
archive are untrusted: a name that is not a plain file name (contains '/',
is '..', has control characters, clashes with another entry) is written
under a safe replacement name and reported on stderr; nothing is ever
written outside DIR.  Files are created mode 0600 (backups hold secrets).

If extraction fails or is interrupted (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT), the
files written so far are removed again, and DIR too if this command created it.

Unlike `vma extract`, naming a drive that is not in the archive is an
error, and with -d the vmstate is extracted only when listed ("vmstate")."""

EPILOG = """\
examples:
  vmafs extract backup.vma /var/tmp/restore
  vmafs extract backup.vma.zst out -d drive-scsi0,drive-scsi1
  zstd -dc backup.vma.zst > b.vma && vmafs extract b.vma out   # also fine"""

_CHUNK = 16 << 20  # read size: large sequential preads, bounded memory
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


#: Signals that end an extraction cleanly (partial files removed), besides
#: SIGINT (KeyboardInterrupt): kill's default, the terminal or ssh session
#: going away, and Ctrl-\ (SIGQUIT).  Exit status 128 + the signal's number.
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _target_dir(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the target directory name is empty")
    return value


def _drive_list(value: str) -> str:
    if not all(value.split(",")):
        raise argparse.ArgumentTypeError(
            f"empty drive name in {value!r} (names as 'vmafs list' shows them, comma-separated)"
        )
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    p.add_argument(
        "dir",
        metavar="DIR",
        type=_target_dir,
        help="target directory (must not exist, or be empty)",
    )
    p.add_argument(
        "-d",
        "--drives",
        metavar="DRIVE[,DRIVE...]",
        type=_drive_list,
        action="append",
        help="extract only these devices, by name as `vmafs list` shows them "
        "(e.g. drive-scsi0; 'vmstate' for the RAM state); may be repeated. "
        "Configs are always extracted",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print each file written, on stdout"
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="extract an interrupted or cut-short backup (plain or compressed) too: "
        "clusters never written or after the cut are left as zeros (holes), and a "
        "warning per device says how many",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


# --- planning ---------------------------------------------------------------------


def select_entries(entries: dict[str, names.Entry], drives: list[str] | None) -> list[names.Entry]:
    """The entries to write: configs always, devices all or those named in *drives*."""
    if not drives:
        return list(entries.values())
    wanted = []
    for item in drives:
        wanted += [d for d in item.split(",") if d]
    devices = {e.original: e for e in entries.values() if e.kind in ("disk", "vmstate")}
    unknown = [d for d in wanted if d not in devices]
    if unknown:
        have = ", ".join(printable(n) for n in devices) or "no devices"
        raise VmaError(f"no drive named {printable(unknown[0])!r} in the archive (it has: {have})")
    chosen = {devices[d].name for d in wanted}
    return [e for e in entries.values() if e.kind == "config" or e.name in chosen]


class _Terminated(SystemExit):
    """A signal of :data:`CLEANUP_SIGNALS` arrived; exits 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


# --- the target directory ------------------------------------------------------------


def _open_target(path: str) -> tuple[int, bool]:
    """Create DIR (or accept it when empty); return (O_DIRECTORY fd, created?).

    A directory this run created is opened with O_NOFOLLOW and must be owned
    by us: in a shared parent such as /tmp, someone swapping it for a
    symlink between mkdir and open cannot redirect the extraction.
    """
    created = False
    try:
        os.mkdir(path, _DIR_MODE)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        raise VmaError(
            f"cannot create the target directory {path}: No such file or directory "
            f"(its parent directory {parent} does not exist)"
        ) from None
    try:
        return _open_dir(path, created), created
    except (KeyboardInterrupt, _Terminated):
        if created:  # interrupted right after mkdir: take the empty DIR away again
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def _open_dir(path: str, created: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_NOFOLLOW if created else 0))
    except OSError as e:
        if created:
            raise VmaError(
                f"target directory {path} was replaced while opening it ({e.strerror})"
            ) from e
        raise
    try:
        st = os.fstat(fd)
        if created and st.st_uid != os.geteuid():
            raise VmaError(f"target directory {path} was replaced while opening it")
        if not created and os.listdir(fd):
            raise VmaError(
                f"target directory {path} is not empty (extract writes only into a new "
                "or empty directory and never overwrites files)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- writing ---------------------------------------------------------------------------


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_sparse(fd: int, buf: memoryview, offset: int) -> int:
    """pwrite the non-zero 4 KiB blocks of *buf* at *offset*; skip zero blocks.

    The file was sized with ftruncate, so skipped blocks read back as zeros
    and stay unallocated.  Returns the bytes actually written.
    """
    n = len(buf)
    full = n // BLOCK_SIZE
    written = 0
    if full:
        blocks = np.frombuffer(buf[: full * BLOCK_SIZE], dtype=np.uint64).reshape(full, -1)
        nonzero = blocks.any(axis=1).astype(np.int8)
        edges = np.diff(np.concatenate(([0], nonzero, [0])))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            chunk = buf[a * BLOCK_SIZE : b * BLOCK_SIZE]
            _pwrite_all(fd, chunk, offset + a * BLOCK_SIZE)
            written += len(chunk)
    tail = buf[full * BLOCK_SIZE :]
    if tail and any(tail):
        _pwrite_all(fd, tail, offset + full * BLOCK_SIZE)
        written += len(tail)
    return written


def _write_device(archive, entry: names.Entry, fd: int, buf: bytearray, bar: Progress) -> None:
    dev_id = entry.dev_id
    os.ftruncate(fd, entry.size)
    for start, length in archive.allocated_ranges(dev_id):
        pos, end = start, start + length
        while pos < end:
            view = memoryview(buf)[: min(_CHUNK, end - pos)]
            n = archive.readinto(dev_id, pos, view)
            if n != len(view):
                raise VmaError(
                    f"short read of {printable(entry.original)} at byte {pos}", dev_id=dev_id
                )
            write_sparse(fd, view, pos)
            pos += n
            bar.advance(n)


class _Extraction:
    """Writes the planned entries into DIR and undoes its own work on failure."""

    def __init__(self, archive, target: str, dir_fd: int, created_dir: bool) -> None:
        self.archive = archive
        self.target = target
        self.dir_fd = dir_fd
        self.created_dir = created_dir
        self.created: list[str] = []

    def _create(self, name: str) -> int:
        # Belt and braces: names.py never yields these, but this is the line
        # that decides where bytes land.
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise VmaError(f"refusing unsafe file name {printable(name)!r}")
        try:
            fd = os.open(name, _OPEN_FLAGS, _FILE_MODE, dir_fd=self.dir_fd)
        except FileExistsError:
            raise VmaError(
                f"{os.path.join(self.target, printable(name))} already exists; not overwriting"
            ) from None
        except OSError as e:
            e.filename = os.path.join(self.target, name)
            raise
        self.created.append(name)
        return fd

    def write(self, entry: names.Entry, buf: bytearray, bar: Progress) -> None:
        fd = self._create(entry.name)
        try:
            if entry.kind == "config":
                _pwrite_all(fd, memoryview(entry.data), 0)
            else:
                bar.set_label(f"extracting {printable(entry.name)}")
                _write_device(self.archive, entry, fd, buf, bar)
            os.fsync(fd)
        except OSError as e:
            if e.filename is None:
                e.filename = os.path.join(self.target, entry.name)
            raise
        finally:
            os.close(fd)

    def write_in_archive_order(self, plan: list[names.Entry], bar: Progress) -> None:
        """Write all of *plan*, the disks in one pass over the archive in its own order.

        For compressed input (see :mod:`._archive_order`): every disk file is
        created and sized first, then each stored cluster lands in its file
        as the pass reaches it.
        """
        targets: dict[int, tuple[int, int]] = {}
        paths: dict[int, str] = {}  # fd -> path, for error messages
        try:
            for entry in plan:
                fd = self._create(entry.name)
                paths[fd] = os.path.join(self.target, entry.name)
                if entry.kind == "config":
                    _pwrite_all(fd, memoryview(entry.data), 0)
                else:
                    os.ftruncate(fd, entry.size)
                    targets[entry.dev_id] = (fd, entry.size)

            def write(fd: int, data: memoryview, offset: int) -> None:
                try:
                    write_sparse(fd, data, offset)
                except OSError as e:
                    e.filename = paths[fd]
                    raise

            bar.set_label("extracting")
            write_in_archive_order(self.archive, targets, write, bar.advance)
            for fd, path in paths.items():
                try:
                    os.fsync(fd)
                except OSError as e:
                    e.filename = path
                    raise
        finally:
            for fd in paths:
                os.close(fd)

    def finish(self) -> None:
        os.fsync(self.dir_fd)
        if self.created_dir:  # make DIR's own entry durable too
            parent = os.open(os.path.dirname(os.path.abspath(self.target)), os.O_RDONLY)
            try:
                os.fsync(parent)
            finally:
                os.close(parent)

    def undo(self) -> None:
        """Remove what this run created; never raises (the original error matters)."""
        for name in reversed(self.created):
            try:
                os.unlink(name, dir_fd=self.dir_fd)
            except OSError:
                pass
        self.created.clear()
        if self.created_dir:
            try:
                os.rmdir(self.target)
            except OSError:
                pass


def _print_files(args: argparse.Namespace, archive, plan: list[names.Entry]) -> None:
    """The -v lines; a failed write to stdout is not mistaken for a failed extraction."""

    with writing_stdout(f"the extraction into {printable(args.dir)} is complete"):
        for e in plan:
            extra = ""
            if e.kind != "config":
                extra = f", {human_bytes(archive.stored_bytes(e.dev_id))} stored"
            sys.stdout.write(
                f"{printable(os.path.join(args.dir, e.name))}: {e.size} bytes{extra}\n"
            )
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    show = want_progress(args.progress)
    with open_archive(args.archive, args, allow_incomplete=args.allow_incomplete) as archive:
        entries = names.safe_entry_names(archive)
        plan = select_entries(entries, args.drives)
        for msg in names.rename_messages(plan):
            sys.stderr.write(f"vmafs: warning: {printable(msg)}\n")
        for e in plan:
            missing = archive.missing_clusters(e.dev_id) if e.kind != "config" else 0
            if missing:
                sys.stderr.write(
                    f"vmafs: warning: {printable(e.name)}: {missing} of "
                    f"{archive.device(e.dev_id).clusters} clusters were never written; "
                    "extracted as zeros\n"
                )
        total = sum(
            length
            for e in plan
            if e.kind != "config"
            for _, length in archive.allocated_ranges(e.dev_id)
        )
        try:
            with first_signal_raises(CLEANUP_SIGNALS, _Terminated):
                _extract(archive, args.dir, plan, total, show)
        except _Terminated as t:
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                sys.stderr.write(
                    f"vmafs: error: extract: {signal.Signals(t.signum).name}: stopped; "
                    "the files written so far were removed\n"
                )
            return 128 + t.signum
    if args.verbose:
        _print_files(args, archive, plan)
    return 0


def _extract(archive, target: str, plan: list[names.Entry], total: int, show: bool) -> None:
    """Write *plan* into *target*; on any error or signal, remove what was written."""
    dir_fd, created = -1, False
    job = None
    try:
        dir_fd, created = _open_target(target)
        job = _Extraction(archive, target, dir_fd, created)
        buf = bytearray(_CHUNK)
        with Progress("extracting", total, enabled=show) as bar:
            if prefers_archive_order(archive):
                job.write_in_archive_order(plan, bar)
            else:  # plain: disk by disk, each file written front to back
                for entry in plan:
                    job.write(entry, buf, bar)
        job.finish()
    except BaseException:
        if job is not None:
            job.undo()
        elif created:  # signalled between mkdir and the job: DIR is still empty
            with contextlib.suppress(OSError):
                os.rmdir(target)
        raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
