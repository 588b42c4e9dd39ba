"""The one exception family of vmafs, shared by the reader and the writer.

Callers catch :class:`VmaError` to mean "this archive (or this backup) is
bad" without catching programming errors.  Every error can carry where it
happened: the archive offset, the device id and the cluster number; its
message names them, so a one-line report is enough to find the damage.
An error raised while an archive is opened or read also names the archive
file once (``t.zst: truncated zstd stream ...``; see :meth:`VmaError.name_archive`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class VmaError(Exception):
    """Base class of every error vmafs raises on purpose."""

    #: The archive file the error is about, once :meth:`name_archive` said so.
    path: str | None = None
    #: True for the errors that an allow-incomplete open gets past: the archive
    #: ends early or lacks clusters, and what it holds can still be read
    #: (:func:`read_anyway_hint`).  Decided by the class, never by the message.
    readable_in_part: bool = False

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        dev_id: int | None = None,
        cluster: int | None = None,
    ) -> None:
        self.message = message
        self.offset = offset
        self.dev_id = dev_id
        self.cluster = cluster
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.offset is not None:
            where.append(f"archive offset {self.offset}")
        if self.dev_id is not None:
            where.append(f"dev {self.dev_id}")
        if self.cluster is not None:
            where.append(f"cluster {self.cluster}")
        text = f"{self.message} ({', '.join(where)})" if where else self.message
        return self._prefix + text

    #: ``PATH: `` when the archive is named in front of the message but not in it.
    _prefix = ""
    #: The message as it was before :meth:`name_archive` put the path in front.
    _unnamed: str | None = None

    def name_archive(self, path: str, *, in_message: bool = True) -> VmaError:
        """Say which archive file this error is about; returns self.

        Sets :attr:`path` and puts ``PATH: `` in front of what ``str()``
        gives, unless an archive was named already or the message names
        *path* itself (``cannot open PATH: ...``, gzip and lzop messages):
        the path appears once.  With *in_message* (errors of opening an
        archive) ``message`` gets the prefix too, so code that re-raises with
        ``e.message`` keeps it; without (errors of reads, which callers such
        as ``verify --data`` wrap in their own message naming the archive)
        ``message`` stays as it was.
        """
        if self.path is None:
            self.path = path
            if not _names(self.message, path):
                self._unnamed = self.message
                if in_message:
                    self.message = f"{path}: {self.message}"
                else:
                    self._prefix = f"{path}: "
                self.args = (self._render(),)
        elif in_message and self._prefix:  # named by a read, re-raised by an open
            self.message, self._prefix = self._prefix + self.message, ""
        return self

    def add_next_step(self, text: str) -> VmaError:
        """Append what to do next (``; TEXT``) to the message, before its location; returns self."""
        self.message = f"{self.message}; {text}"
        if self._unnamed is not None:
            self._unnamed = f"{self._unnamed}; {text}"
        self.args = (self._render(),)
        return self

    def unnamed(self) -> str:
        """What ``str()`` gives without the archive name :meth:`name_archive` put in front.

        For callers that name the archive their own way (``verify``'s
        ``PATH: verify failed: ...``).
        """
        if self._unnamed is None:
            return self._render()
        message, prefix = self.message, self._prefix
        self.message, self._prefix = self._unnamed, ""
        try:
            return self._render()
        finally:
            self.message, self._prefix = message, prefix


def _names(message: str, path: str) -> bool:
    """True when *message* mentions *path* as a word (not inside another name)."""
    return re.search(rf"(?:^|[\s(]){re.escape(path)}(?:$|[\s:)])", message) is not None


@contextlib.contextmanager
def naming_archive(path: str | None, *, in_message: bool = True) -> Iterator[None]:
    """A VmaError raised inside the block names the archive *path* (once; None: no name).

    The one way an error comes to name its archive: sources, the index and
    the commands never write the path into a message themselves.
    *in_message* as for :meth:`VmaError.name_archive` (False around reads).
    """
    try:
        yield
    except VmaError as e:
        if path is not None:
            e.name_archive(path, in_message=in_message)
        raise


# --- structure of the archive -------------------------------------------------


class FormatError(VmaError):
    """The bytes do not follow the VMA format."""


class HeaderError(FormatError):
    """The archive header (magic, version, sizes, blob table) is invalid."""


class ExtentError(FormatError):
    """An extent header is invalid (magic, reserved field, block count)."""


class ChecksumError(FormatError):
    """An md5 stored in the header or an extent header does not match."""


class UuidMismatchError(ExtentError):
    """An extent carries a different uuid than the archive header."""


class TruncatedError(FormatError):
    """The archive ends inside an extent (its header or its data).

    *offset* is where the cut extent starts; the extents before it can be
    read (allow_incomplete).
    """

    readable_in_part = True


class HeaderTruncatedError(TruncatedError):
    """The archive ends inside its own header: there is nothing to read."""

    readable_in_part = False


class TrailingDataError(FormatError):
    """Bytes after the last extent do not form an extent."""


# --- the cluster map ------------------------------------------------------------


class ConsistencyError(VmaError):
    """The extents are well formed but do not describe the devices exactly once."""


class UnknownDeviceError(ConsistencyError):
    """An extent names a dev_id that the header does not register."""


class ClusterRangeError(ConsistencyError):
    """A cluster number lies beyond the end of its device."""


class DuplicateClusterError(ConsistencyError):
    """A cluster of a device is stored twice."""


class VmstateOrderError(ConsistencyError):
    """The clusters of the vmstate stream are not stored in order."""


class IncompleteArchiveError(ConsistencyError):
    """Some clusters were never written (an interrupted backup)."""

    readable_in_part = True


class MissingClusterError(ConsistencyError):
    """A read touched a cluster that the archive does not hold."""


# --- input around the archive ---------------------------------------------------


class SourceError(VmaError):
    """The container around the VMA stream (file, compression) is unusable."""


class CorruptStreamError(SourceError):
    """A compressed stream is corrupt (or, as :class:`StreamTruncatedError`, cut short)."""


class StreamTruncatedError(CorruptStreamError):
    """A compressed file ends before its stream does (a copy or a backup cut short).

    *offset* is where the usable decompressed data ends (an archive offset);
    *compressed_offset* where, in the compressed file, the data stops being
    usable (the start of the first block or frame that is not whole).  The
    sources raise it where they find the cut; a scan catches it and ends
    there, so that the index can tell an incomplete archive from a damaged one.
    """

    readable_in_part = True

    def __init__(self, message: str, *, offset: int | None, compressed_offset: int) -> None:
        self.compressed_offset = compressed_offset
        super().__init__(message, offset=offset)


class IndexCacheError(SourceError):
    """A persisted side index is stale or damaged (it is rebuilt, not trusted)."""


# --- the writer -----------------------------------------------------------------


class WriterError(VmaError):
    """Writing an archive failed."""


class ConflictingClusterError(WriterError):
    """A cluster arrived twice with different contents."""


class WriteRangeError(WriterError):
    """A write does not cover whole clusters inside its device (nothing was stored)."""


class BackupError(WriterError):
    """QEMU, the NBD transport or the backup job failed."""


# --- volumes inside a disk (partitions, LVM, filesystems) -------------------------


class VolumeError(VmaError):
    """A partition table, LVM metadata or volume read inside a disk is unusable.

    *volume* names the drive or volume (``drive-scsi0``, ``drive-scsi0/p2``,
    ``drive-scsi0/pve/root``); *disk_offset* is a byte offset inside that
    drive, *volume_offset* one inside the volume.  The message says both, so
    the one-line report points at the damaged bytes.  Unlike other errors
    :attr:`offset` stays None: these offsets are not archive offsets.
    """

    def __init__(
        self,
        message: str,
        *,
        volume: str | None = None,
        disk_offset: int | None = None,
        volume_offset: int | None = None,
        dev_id: int | None = None,
    ) -> None:
        self.volume = volume
        self.disk_offset = disk_offset
        self.volume_offset = volume_offset
        super().__init__(message, dev_id=dev_id)

    def _render(self) -> str:
        where = []
        if self.volume_offset is not None:
            where.append(f"volume offset {self.volume_offset}")
        if self.disk_offset is not None:
            where.append(f"disk offset {self.disk_offset}")
        text = f"{self.volume}: {self.message}" if self.volume else self.message
        return self._prefix + (f"{text} ({', '.join(where)})" if where else text)


class PartitionTableError(VolumeError):
    """A GPT or MBR partition table is damaged or describes impossible partitions."""


class LvmError(VolumeError):
    """An LVM2 label, metadata area or metadata text is damaged or impossible."""


class VolumeNotFoundError(VolumeError):
    """No volume has the name asked for (the message lists the names there are)."""


class UnsupportedVolumeError(VolumeError):
    """The volume exists but vmafs cannot read it (striped, thin, raid, snapshot LVs)."""


# --- files inside guest filesystems ----------------------------------------------


class GuestError(VmaError):
    """Reading inside a guest filesystem failed (the message names volume and path).

    *errno_* is the errno the guest filesystem gave (ENOENT, ENOTDIR, ...)
    when there is one, so callers can tell a missing file from a broken disk.
    """

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        self.errno = errno_
        super().__init__(message)


class EngineUnavailableError(GuestError):
    """The engine asked for cannot run here (libguestfs missing, not root, no kernel)."""


class GuestMountError(GuestError):
    """Setting up or taking down a guest filesystem's mount failed."""


# --- what to do next --------------------------------------------------------------------


def read_anyway_hint(e: VmaError, option: str) -> str:
    """How to read what there is of an archive that *e* refused ("" if *e* is not that).

    *option* is the command's way to accept an incomplete archive
    (``-o allow_incomplete``, ``--allow-incomplete``).  An archive cut short
    (plain or compressed) or with clusters never written opens with it: the
    clusters before the cut are served, the missing ones read as errors.
    Which errors those are is the classes' :attr:`VmaError.readable_in_part`.
    """
    if e.readable_in_part:
        return f"{option} reads what is there (missing clusters read as errors)"
    return ""


@contextlib.contextmanager
def offering_read_anyway(option: str | None) -> Iterator[None]:
    """A VmaError raised inside the block that *option* gets past says so (``; OPTION reads...``).

    *option*: the command's way to accept an incomplete archive, or None
    when it has none or it is already given (no hint then).
    """
    try:
        yield
    except VmaError as e:
        hint = "" if option is None else read_anyway_hint(e, option)
        if not hint:
            raise
        raise e.add_next_step(hint) from None
