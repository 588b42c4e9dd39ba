"""Helpers shared by the reader subcommands."""

from __future__ import annotations

from ..archive import Archive, read_header
from ..common.progress import Progress, want_progress
from ..errors import naming_archive, offering_read_anyway
from ..format import HEADER_STRUCT_SIZE, Header
from ..index import header_truncated
from ..source import open_source


class _HeaderComplete(Exception):
    """Raised from inside Source.scan once the header bytes are in (stops the pass)."""


def load_header(path: str) -> Header:
    """Read and validate only the archive header, not the extents.

    That is what Proxmox's ``vma list`` and ``vma config`` look at, and it
    is instant even for a huge compressed archive: a source that can only be
    decompressed front to back is stopped as soon as the header is in.
    """
    with naming_archive(path):  # Header.parse below raises after the scan
        return _load_header(path)


def _load_header(path: str) -> Header:
    source = open_source(path)
    try:
        if not source.needs_scan:
            return read_header(source)
        buf = bytearray()
        want = [HEADER_STRUCT_SIZE]

        def on_chunk(offset: int, chunk) -> None:
            buf.extend(chunk)
            if len(buf) >= want[0] and want[0] == HEADER_STRUCT_SIZE:
                want[0] = Header.peek_size(bytes(buf[:HEADER_STRUCT_SIZE]))
            if len(buf) >= want[0]:
                raise _HeaderComplete

        try:
            source.scan(on_chunk)
        except _HeaderComplete:
            pass
        if len(buf) < want[0] and source.truncation is not None:
            raise header_truncated(len(buf), source.truncation)
        if len(buf) < HEADER_STRUCT_SIZE:
            Header.peek_size(bytes(buf))  # raises the precise error for a tiny stream
            raise header_truncated(len(buf), None)
        return Header.parse(bytes(buf))
    finally:
        source.close()


def printable(name: str) -> str:
    """*name* with control characters escaped, for one-line human output.

    Names in an archive are untrusted: a config called ``"x\\nDEV: ..."``
    must not forge a line of ``vmafs list`` output or move the terminal cursor.
    """
    if name.isprintable():
        return name
    out = []
    for ch in name:
        if ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def open_archive(path: str, args, *, allow_incomplete: bool = False, **kw) -> Archive:
    """Archive.open with an "indexing" progress bar when progress is wanted.

    An archive refused as incomplete or cut short: the error says how to read
    what is there (``--allow-incomplete``, where the command has it).
    """
    has_option = hasattr(args, "allow_incomplete")  # extract has it; list --json reads all
    with (
        offering_read_anyway("--allow-incomplete" if has_option and not allow_incomplete else None),
        Progress("indexing", enabled=want_progress(getattr(args, "progress", None))) as bar,
    ):
        return Archive.open(path, allow_incomplete=allow_incomplete, progress=bar, **kw)
