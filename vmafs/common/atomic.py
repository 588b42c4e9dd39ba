"""A file that appears under its name complete or not at all.

:class:`AtomicOutput` writes to a hidden temporary file beside the target
(``dir/.NAME.XXXXXXXX.tmp``: a fresh name per run, so a file left by a killed
run never blocks the next one) and gives it the target's name only in
:meth:`~AtomicOutput.commit`, after an fsync; the directory is fsynced after
the rename, so the name survives a crash too.  Every writer of a whole file
uses it: the VMA writer's archive (``vmafs backup``/``create``), ``vmafs
recompress`` and the reader's side index.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile

from .signals import signals_deferred

#: link(2) errors meaning "this file system has no hard links" (vfat, some
#: CIFS/FUSE): commit checks the name is free, then renames.
_NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


class AtomicOutput:
    """The file *target* (``"-"``: standard output), written whole or not at all.

    The constructor checks the target (:meth:`check`) and creates the
    temporary file, with mode ``0666 & ~umask`` as ``open(2)`` would give the
    target itself (*mode* overrides it).  :meth:`write` appends;
    :meth:`commit` fsyncs, links the temporary file to *target* and fsyncs
    the directory; :meth:`abort` closes and removes the temporary file
    (idempotent, never raises, a no-op after commit).  ``with`` aborts unless
    committed.

    An existing *target* is refused (:class:`FileExistsError`), both up front
    and atomically at commit (link(2) fails rather than replace a file made
    meanwhile; on a file system without hard links the name is checked just
    before a rename) - unless *overwrite*, which replaces it with rename(2).
    Every OSError names *target* as the caller wrote it, never the temporary
    file.  Creating the temporary file and remembering its name, and giving
    it the final name and setting :attr:`committed`, each happen with the
    stop signals held back, so a signal handler that raises cannot leave an
    unknown temporary file or a committed file believed lost.

    For ``"-"`` the bytes go straight to file descriptor 1 (no temporary file,
    nothing to undo: a failure shows as the exit status); commit only marks
    it committed.
    """

    def __init__(
        self, target: str | os.PathLike[str], *, overwrite: bool = False, mode: int | None = None
    ) -> None:
        self.target = os.fspath(target)
        self.overwrite = overwrite
        self.stdout = self.target == "-"
        #: what errors call the file
        self.name = "standard output" if self.stdout else self.target
        #: absolute final path (None for stdout)
        self.path: str | None = None if self.stdout else os.path.abspath(self.target)
        #: the hidden temporary file until commit or abort (None for stdout)
        self.temp_path: str | None = None
        self.fd: int | None = None
        #: bytes written so far
        self.size = 0
        self._committed = False
        self.check(self.target, overwrite=overwrite)
        if self.stdout:
            self.fd = 1
            return
        directory, base = os.path.split(self.path)
        try:
            with signals_deferred():  # no signal between creating it and knowing its name
                self.fd, self.temp_path = tempfile.mkstemp(
                    prefix=f".{base}.", suffix=".tmp", dir=directory
                )
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(self.fd, mode)
        except BaseException as e:  # a signal handler's exception too: no file left behind
            self.abort()
            if isinstance(e, OSError):
                raise self._named(e) from None
            raise

    @staticmethod
    def check(target: str, *, overwrite: bool = False) -> None:
        """Refuse a *target* that cannot work, before any work starts (raises OSError)."""
        if target == "-":
            if sys.stdout is None:  # fd 1 was closed when Python started: it may be reused
                raise OSError(errno.EBADF, "cannot write the output to stdout: stdout is closed")
            if os.isatty(1):
                raise OSError(
                    errno.ENOTTY, "refusing to write binary data to a terminal (redirect stdout)"
                )
            return
        if os.path.isdir(target):
            raise IsADirectoryError(
                errno.EISDIR, "is a directory (the output is a file to create)", target
            )
        if not overwrite and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "already exists; refusing to overwrite it", target)
        parent = os.path.dirname(target) or "."
        if not os.path.isdir(parent):
            why = "does not exist" if not os.path.lexists(parent) else "is not a directory"
            raise FileNotFoundError(errno.ENOENT, f"cannot create it: {parent} {why}", target)

    def write(self, data) -> int:
        """Append all of *data* (any bytes-like object); returns its length."""
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            raise self._named(e) from None
        self.size += n
        return n

    @property
    def committed(self) -> bool:
        """True once the complete file is under its final name (for stdout: once committed).

        Set in :meth:`commit` at the rename itself, so a signal handler can
        tell "the file exists" from "it never will" at any moment.
        """
        return self._committed

    def commit(self) -> None:
        """fsync, give the temporary file the target's name, fsync the directory."""
        if self._committed:
            return
        if self.stdout:
            self._committed = True
            return
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            with signals_deferred():  # a signal after the rename no longer undoes the run
                self._rename()
                self._committed = True
            if self.temp_path is not None:  # linked: the temporary name goes
                os.unlink(self.temp_path)
                self.temp_path = None
            directory = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            raise self._named(e) from None

    def _rename(self) -> None:
        """Put the temporary file at the target's name (clears temp_path when it moved)."""
        if self.overwrite:
            os.replace(self.temp_path, self.path)
            self.temp_path = None
            return
        try:
            os.link(self.temp_path, self.path)  # FileExistsError if someone took the name
        except OSError as e:
            if isinstance(e, FileExistsError):
                raise FileExistsError(
                    errno.EEXIST, "was created meanwhile; refusing to overwrite it"
                ) from None
            if e.errno not in _NO_HARDLINKS:
                raise
            if os.path.lexists(self.path):
                raise FileExistsError(
                    errno.EEXIST, "was created meanwhile; refusing to overwrite it"
                ) from None
            os.rename(self.temp_path, self.path)
            self.temp_path = None

    def abort(self) -> None:
        """Close and remove the temporary file; idempotent, never raises."""
        if self.fd is not None and not self.stdout:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None
        if self.temp_path is not None:
            try:
                os.unlink(self.temp_path)
            except OSError:
                pass
            self.temp_path = None

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def _named(self, e: OSError) -> OSError:
        """*e* naming the target as the caller wrote it (not the temporary file)."""
        e.filename = self.name
        e.filename2 = None
        return e
