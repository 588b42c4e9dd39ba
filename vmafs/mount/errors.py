"""The mount's own exceptions.

Not :class:`vmafs.errors.VmaError`: these are about the mount point, the
options and the filesystem process, not about an archive.
"""

from __future__ import annotations


class MountError(Exception):
    """A mount or unmount cannot be done; the message is the one line to print."""


class UsageError(MountError):
    """Bad command line or ``-o`` option (exit status 2)."""
