"""The one exception family of vmafs, shared by the reader and the writer.

Callers catch :class:`VmaError` to mean "this archive (or this backup) is
bad" without catching programming errors.  Every error can carry where it
happened: the archive offset, the device id and the cluster number; its
message names them, so a one-line report is enough to find the damage.
"""

from __future__ import annotations


class VmaError(Exception):
    """Base class of every error vmafs raises on purpose."""

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
        return f"{self.message} ({', '.join(where)})" if where else self.message


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
    """The archive ends inside the header or inside an extent."""


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


class MissingClusterError(ConsistencyError):
    """A read touched a cluster that the archive does not hold."""


# --- input around the archive ---------------------------------------------------


class SourceError(VmaError):
    """The container around the VMA stream (file, compression) is unusable."""


class CorruptStreamError(SourceError):
    """A compressed stream is corrupt or truncated."""


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
