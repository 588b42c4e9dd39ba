"""``vmafs serve``'s data end: each disk of an archive as a read-only NBD export.

The protocol is :mod:`vmafs.nbd`; this package only answers what a disk
holds.  Holes are the mount's holes, the same two functions decide both:
a read answers ``OFFSET_HOLE`` chunks exactly where
:meth:`~vmafs.archive.Archive.next_data` / :meth:`~vmafs.archive.Archive.next_hole`
(SEEK_DATA/SEEK_HOLE in the mount) see holes, and ``base:allocation``
reports those ranges as ``HOLE|ZERO`` and everything else as data.
"""

from .export import ArchiveExport, export_names, exports_for

__all__ = ["ArchiveExport", "export_names", "exports_for"]
