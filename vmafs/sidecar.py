"""The side index: what a compressed archive's first scan learned, kept on disk.

A source that must decompress the whole stream once (``needs_scan``) saves
its checkpoints and the VMA offset map here, so the next open of the same
archive costs a file read instead of a full decompression.

Where: ``<cache>/<sha256 of the absolute path>.vmafs-index``, the cache
being :func:`vmafs.sidecar_cache.cache_dir` (``$VMAFS_CACHE_DIR``, else
``/var/cache/vmafs`` for root, else ``$XDG_CACHE_HOME/vmafs``), size-capped
with least-recently-used eviction.  Beside the archive
(``<archive>.vmafs-index``) only when asked (*beside*): nothing is written
into a backup directory by default.  Loading looks in both places.

The file is never trusted: it is used only if it is a regular file (not a
symbolic link, FIFO or device: those are skipped unread, and the rebuilt
side index replaces them by rename) no bigger than the archive can justify
(:func:`size_cap`: nothing bigger is read, so a crafted file cannot make
an open allocate more than the archive's own size warrants) that
belongs to the archive's owner, root or the current user, its own SHA-256
matches, its
format version is this one, it was made by the same kind of source, and the
archive still has the size, mtime (ns) and SHA-256 of its first and last
64 KiB that it had when the index was made; after the source adopts the
saved checkpoints, the VMA header is read through them and must equal the
saved one (same uuid, same md5).  Anything else is logged and the archive
is scanned again (and the side index rewritten).

Layout (all integers little-endian)::

    0   8   magic b"VMAFSIDX"
    8   4   format version (FORMAT_VERSION)
    12  8   length of the JSON description
    20  ..  JSON: {"identity": {...}, "source": kind, "state_is_bytes": bool,
                   "state_bytes_keys": [key, ...],
                   "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}]}
    ..      array data, each array 64-byte aligned (offsets are absolute)
    -32 32  SHA-256 of every byte before it

Array names: ``header`` (the raw VMA header), ``state/<key>`` (the source's
:meth:`checkpoint_state`) and ``index/<key>`` (:meth:`ArchiveIndex.to_arrays`).
Nothing in the file is ever unpickled or executed.

Sources that use the side index implement::

    checkpoint_state() -> dict[str, np.ndarray | bytes] | bytes
    load_checkpoint_state(state) -> None   # same types back; raise on misfit

(numeric arrays only; bytes values come back as bytes.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from .common.atomic import AtomicOutput
from .errors import IndexCacheError, VmaError
from .format import BLOCK_SIZE, Header
from .index import MASK, MASK_BITS, OFFSET_SHIFT, ArchiveIndex
from .sidecar_cache import SUFFIX, cache_dir, evict, touch

if TYPE_CHECKING:
    from .source import Source

log = logging.getLogger(__name__)

MAGIC = b"VMAFSIDX"
#: 2: the offset map is one packed uint64 per cluster (``index/packed_<dev>``); version 1
#: files (uint64 offsets + uint16 masks) are refused by version, so they are rebuilt.
FORMAT_VERSION = 2
EDGE = 64 << 10  # bytes of the archive's head and tail that are hashed
#: A bigger file is never read as a side index, whatever the archive: 64 GiB
#: would be an offset map of 512 TiB of disks (8 bytes per 64 KiB cluster).
MAX_SIZE = 64 << 30
#: What any side index may take besides the part that grows with the archive:
#: the layout and its JSON, the VMA header (at most 16 MiB), array alignment.
CAP_BASE = 32 << 20
#: Side index bytes one byte of archive can justify.  The offset map takes 8
#: bytes per 64 KiB cluster, and each cluster an archive holds has an 8-byte
#: entry in an extent header, 59 to a header that also carries a 16-byte md5
#: no compressor can shrink: at least 16/59 of a byte of any archive per
#: cluster, so at most 8 * 59/16 (under 30) bytes of map per archive byte.
#: The source's state adds less than 17 more (gzip: a 32 KiB window per
#: 2 MiB of output, at most 1032 bytes of output per compressed byte; lzop:
#: 32 bytes per block; zstd: 34 bytes per frame, windows within its index
#: budget).  An incomplete archive's map can be bigger (clusters never
#: written take room too); such a side index is not used, and the archive,
#: which is then small for its disks, is scanned again.
CAP_PER_BYTE = 64
_FIXED = struct.Struct("<8sIQ")
_ALIGN = 64
_DIGEST = 32
_DTYPE_KINDS = "biuf"  # numeric arrays only; nothing that could unpickle


# -- where --


def beside_path(archive: str) -> str:
    return os.path.abspath(archive) + SUFFIX


def cache_path(archive: str, directory: str | None = None) -> str:
    # fsencode: a file name need not be valid UTF-8 (it round-trips as surrogates).
    key = hashlib.sha256(os.fsencode(os.path.abspath(archive))).hexdigest()[:32]
    return os.path.join(directory or cache_dir(), key + SUFFIX)


def candidate_paths(archive: str, directory: str | None = None, beside: bool = True) -> list[str]:
    """Where a side index for *archive* may be, in the order they are tried."""
    return [beside_path(archive)] * beside + [cache_path(archive, directory)]


# -- identity --


def size_cap(archive_size: int) -> int:
    """The largest side index an archive of *archive_size* bytes can have (see CAP_PER_BYTE)."""
    return min(MAX_SIZE, CAP_BASE + CAP_PER_BYTE * archive_size)


def archive_size(source: Source) -> int:
    """Bytes of the archive file behind *source* (a block device's size too)."""
    return os.lseek(source.fileno(), 0, os.SEEK_END)


def identity(source: Source) -> dict:
    """Size, mtime and edge hashes of the compressed file behind *source*."""
    fd = source.fileno()
    st = os.fstat(fd)
    size = st.st_size
    head = os.pread(fd, EDGE, 0)
    tail = os.pread(fd, EDGE, max(0, size - EDGE))
    return {
        "size": size,
        "mtime_ns": st.st_mtime_ns,
        "head_sha256": hashlib.sha256(head).hexdigest(),
        "tail_sha256": hashlib.sha256(tail).hexdigest(),
    }


# -- write --


def dumps(ident: dict, kind: str, header_raw: bytes, state, index_arrays: Mapping) -> bytes:
    """Serialise a side index (see the module docstring for the layout)."""
    state_is_bytes = isinstance(state, bytes | bytearray | memoryview)
    if state_is_bytes:
        state = {"blob": np.frombuffer(bytes(state), dtype=np.uint8)}
    arrays = {"header": np.frombuffer(header_raw, dtype=np.uint8)}
    bytes_keys = []
    for k, v in state.items():
        if isinstance(v, bytes | bytearray | memoryview):
            bytes_keys.append(k)
            v = np.frombuffer(bytes(v), dtype=np.uint8)
        arrays[f"state/{k}"] = np.ascontiguousarray(v)
    for k, v in index_arrays.items():
        arrays[f"index/{k}"] = np.ascontiguousarray(v)
    for name, a in arrays.items():
        if a.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"side index array {name} has unsupported dtype {a.dtype}")

    descs = []
    # Offsets depend on the JSON length, which depends on the offsets: lay the
    # arrays out after a generous bound and pad the JSON up to it.
    body_len = 0
    for name, a in arrays.items():
        descs.append(
            {
                "name": name,
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "offset": body_len,
                "nbytes": a.nbytes,
            }
        )
        body_len += -(-a.nbytes // _ALIGN) * _ALIGN
    meta = {
        "identity": ident,
        "source": kind,
        "state_is_bytes": state_is_bytes,
        "state_bytes_keys": bytes_keys,
        "arrays": descs,
    }
    probe = json.dumps(meta, sort_keys=True).encode()
    data_at = -(-(_FIXED.size + len(probe) + 64 * len(descs) + 64) // _ALIGN) * _ALIGN
    for d in descs:
        d["offset"] += data_at
    text = json.dumps(meta, sort_keys=True).encode()
    if _FIXED.size + len(text) > data_at:  # cannot happen: offsets grew by < 64 chars each
        raise AssertionError("side index description outgrew its room")
    out = bytearray(data_at + body_len)
    out[: _FIXED.size] = _FIXED.pack(MAGIC, FORMAT_VERSION, len(text))
    out[_FIXED.size : _FIXED.size + len(text)] = text
    for d, a in zip(descs, arrays.values(), strict=True):
        out[d["offset"] : d["offset"] + a.nbytes] = a.tobytes()
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _write_atomic(dest: str, blob: bytes) -> None:
    """Write *blob* to a fresh temporary file beside *dest*, then rename it over *dest*.

    Whatever *dest* was (an old side index, a FIFO, a symbolic link to a
    device) is replaced, never written into; the temporary file is created
    exclusively (``mkstemp``: O_EXCL, no symbolic link followed).  Mode 0644
    whatever the umask: every user who can read the archive may use it.
    """
    with AtomicOutput(dest, overwrite=True, mode=0o644) as out:
        out.write(blob)
        out.commit()


_deferral = threading.local()


@contextlib.contextmanager
def deferred_saves() -> Iterator[list[Callable[[], str | None]]]:
    """Within this block, :func:`save` in this thread only queues the write.

    Yields the list of queued saves (call each to write it).  ``vmafs mount``
    opens the archive inside this block and writes the side index in the
    background once the filesystem process runs, instead of before the mount
    is ready: the side index is only ever a shortcut for the next open, and
    it is checked in full when loaded, so writing it later (or never, if the
    process is killed first) changes nothing but that next open's speed.
    """
    queued: list[Callable[[], str | None]] = []
    outer = getattr(_deferral, "queued", None)
    _deferral.queued = queued
    try:
        yield queued
    finally:
        _deferral.queued = outer


def run_saves(saves) -> None:
    """Write the side indexes that :func:`deferred_saves` queued, each in turn.

    A failed write is logged and skipped: the archive works without its side
    index, and the next open scans again.
    """
    for write in saves:
        try:
            write()
        except Exception:
            log.exception("writing the side index failed")


def save(
    source,
    header: Header,
    index: ArchiveIndex,
    *,
    directory: str | None = None,
    beside: bool = False,
    strict: bool = False,
) -> str | None:
    """Write the side index for an archive just scanned; returns its path.

    Writes into the cache directory (*directory* or :func:`cache_dir`),
    then keeps that directory within its size cap; with *beside*, tries
    beside the archive first.  A failure to write is
    logged and returns None, or raises IndexCacheError when *strict*.
    Inside :func:`deferred_saves`, only queues the write and returns None.
    """
    try:
        # Taken now, right after the scan, even when the write is deferred.
        ident = identity(source)
        cap = size_cap(archive_size(source))
    except OSError as e:
        ident, cap = e, 0
    write = functools.partial(
        _save, source, header, index, ident, cap, directory=directory, beside=beside, strict=strict
    )
    queued = getattr(_deferral, "queued", None)
    if queued is not None:
        queued.append(write)
        return None
    return write()


def _save(source, header, index, ident, cap, *, directory, beside, strict) -> str | None:
    try:
        if isinstance(ident, OSError):
            raise ident
        # The path is for 'vmafs index --list/--prune' only; identity checks ignore it.
        ident = dict(ident, uuid=header.uuid.hex(), path=os.path.abspath(source.path))
        blob = dumps(
            ident,
            source.kind,
            source.pread(0, header.header_size),
            source.checkpoint_state(),
            index.to_arrays(),
        )
    except (OSError, VmaError, TypeError) as e:
        if strict:
            raise IndexCacheError(f"cannot build a side index for {source.path}: {e}") from e
        log.warning("%s: no side index saved: %s", source.path, e)
        return None
    if len(blob) > cap:
        # It would never be read (an incomplete archive's map for huge disks):
        # the next open scans again, which costs little for so small an archive.
        msg = f"no side index for {source.path}: {len(blob)} bytes, more than it may be ({cap})"
        if strict:
            raise IndexCacheError(msg)
        log.info("%s", msg)
        return None
    targets = []
    if beside:
        targets.append(beside_path(source.path))
    targets.append(cache_path(source.path, directory))
    errors = []
    for dest in targets:
        try:
            if dest == targets[-1]:
                os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
            _write_atomic(dest, blob)
        except OSError as e:
            errors.append(f"{dest}: {e.strerror or e}")
            continue
        log.info("%s: side index saved to %s (%d bytes)", source.path, dest, len(blob))
        if dest == targets[-1]:
            evict(os.path.dirname(dest), keep=dest)
        return dest
    msg = f"cannot write a side index for {source.path} ({'; '.join(errors)})"
    if strict:
        raise IndexCacheError(msg)
    log.warning("%s", msg)
    return None


# -- read --


def loads(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse and checksum-verify a side index; raises IndexCacheError if damaged."""
    if len(blob) < _FIXED.size + _DIGEST:
        raise IndexCacheError("side index is too short")
    body, digest = memoryview(blob)[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise IndexCacheError("side index fails its checksum")
    magic, version, jlen = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise IndexCacheError("not a vmafs side index")
    if version != FORMAT_VERSION:
        raise IndexCacheError(f"side index format {version}, this vmafs reads {FORMAT_VERSION}")
    try:
        meta = json.loads(bytes(body[_FIXED.size : _FIXED.size + jlen]))
        arrays = {}
        for d in meta["arrays"]:
            dt = np.dtype(d["dtype"])
            if dt.kind not in _DTYPE_KINDS:
                raise ValueError(f"dtype {dt}")
            off, n = int(d["offset"]), int(d["nbytes"])
            shape = tuple(int(x) for x in d["shape"])
            if off < _FIXED.size or off + n > len(body) or int(np.prod(shape)) * dt.itemsize != n:
                raise ValueError(f"array {d['name']} out of bounds")
            arrays[d["name"]] = np.frombuffer(body[off : off + n], dtype=dt).reshape(shape)
    except (ValueError, KeyError, TypeError) as e:
        raise IndexCacheError(f"side index description is damaged: {e}") from e
    return meta, arrays


def load(source, *, allow_incomplete: bool = False, directory: str | None = None):
    """(header, index) from a valid side index for *source*, or None (logged why).

    On success the source has adopted the saved checkpoints and can pread.
    A side index of a file cut short raises the cut (StreamTruncatedError)
    unless *allow_incomplete*, as a scan would.
    """
    found = find(source, allow_incomplete=allow_incomplete, directory=directory)
    return None if found is None else found[1:]


def find(
    source, *, allow_incomplete: bool = False, directory: str | None = None, beside: bool = True
):
    """Like :func:`load`, but returns (path of the side index, header, index).

    *beside* false looks only in the cache directory.
    """
    for path in candidate_paths(source.path, directory, beside):
        blob = _read_candidate(source, path)
        if blob is None:
            continue
        try:
            found = (path, *_adopt(source, blob, allow_incomplete))
            if path != beside_path(source.path):
                touch(path)  # in the cache: most recently used now
            return found
        except IndexCacheError as e:
            log.warning("%s: side index %s not used, rebuilding: %s", source.path, path, e)
    return None


def _read_candidate(source, path: str) -> bytes | None:
    """The bytes of the side index at *path*, or None (logged why, unless there is none).

    Only a regular file, not a symbolic link, owned by the archive's owner,
    root or the current user, and of at most :func:`size_cap` bytes is read:
    a FIFO would block the open or the read forever and a link to a device
    read without end.  Nothing is opened that ``lstat`` does not call a
    regular file (opening a device can have effects), and the opened file is
    checked again (it may have been swapped in between).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: side index %s unreadable: %s", source.path, path, e.strerror)
        return None
    if _not_regular(st, source, path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: side index %s unreadable: %s", source.path, path, e.strerror)
        return None
    try:
        st = os.fstat(fd)
        if _not_regular(st, source, path):  # swapped since the lstat
            return None
        if st.st_uid not in {0, os.geteuid(), _owner(source)}:
            # Whoever can write it decides what the mount shows: only the
            # archive's owner, root or the current user may have made it.
            log.warning(
                "%s: side index %s not used: owned by uid %d, not by the archive's owner, "
                "root or this user",
                source.path,
                path,
                st.st_uid,
            )
            return None
        cap = size_cap(archive_size(source))
        if st.st_size > cap:
            log.warning(
                "%s: side index %s not used: %d bytes is more than a side index of this "
                "archive can be (%d); it is rebuilt",
                source.path,
                path,
                st.st_size,
                cap,
            )
            return None
        # Read what fstat promised and no more (the file cannot make us read forever).
        blob = bytearray(st.st_size)
        got = 0
        with memoryview(blob) as view:
            while got < len(blob):
                n = os.preadv(fd, [view[got:]], got)
                if n <= 0:
                    break
                got += n
        del blob[got:]
        return bytes(blob)
    except (OSError, MemoryError) as e:
        why = e.strerror if isinstance(e, OSError) else "out of memory"
        log.warning("%s: side index %s unreadable: %s", source.path, path, why)
        return None
    finally:
        os.close(fd)


def _not_regular(st: os.stat_result, source, path: str) -> bool:
    """True (with a warning) when *st* is not a regular file's."""
    if stat.S_ISREG(st.st_mode):
        return False
    log.warning(
        "%s: side index %s not used: it is %s, not a regular file",
        source.path,
        path,
        _file_kind(st.st_mode),
    )
    return True


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "a special file"


def _adopt(source, blob: bytes, allow_incomplete: bool):
    meta, arrays = loads(blob)
    kind = source.kind
    if meta.get("source") != kind:
        raise IndexCacheError(f"made for a {meta.get('source')} source, this is {kind}")
    saved, now = meta.get("identity", {}), identity(source)
    for key in ("size", "mtime_ns", "head_sha256", "tail_sha256"):
        if saved.get(key) != now[key]:
            raise IndexCacheError(f"archive changed since it was indexed ({key} differs)")
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}
    for k in meta.get("state_bytes_keys", []):
        if k in state:
            state[k] = state[k].tobytes()
    if meta.get("state_is_bytes"):
        state = state["blob"].tobytes()
    try:
        source.load_checkpoint_state(state)
    except IndexCacheError:
        raise
    except (VmaError, ValueError, KeyError, TypeError) as e:
        raise IndexCacheError(f"source rejected the saved checkpoints: {e}") from e
    header_raw = arrays["header"].tobytes() if "header" in arrays else b""
    try:
        head = source.pread(0, len(header_raw))
        header = Header.parse(head)
    except VmaError as e:
        raise IndexCacheError(f"VMA header unreadable through saved checkpoints: {e}") from e
    if head != header_raw:
        raise IndexCacheError("VMA header (uuid) differs from the indexed one")
    if saved.get("uuid") not in (None, header.uuid.hex()):
        raise IndexCacheError("VMA uuid differs from the indexed one")
    index_arrays = {k[6:]: v for k, v in arrays.items() if k.startswith("index/")}
    try:
        index = ArchiveIndex.from_arrays(header, index_arrays)
    except (KeyError, ValueError, TypeError) as e:
        raise IndexCacheError(f"saved offset map does not fit the header: {e}") from e
    if index.end > (source.size or 0):
        raise IndexCacheError("saved offset map reaches past the stream")
    _check_offsets(index, header)
    if not index.complete and not allow_incomplete:
        if source.truncation is not None:
            # The file is cut short (the identity checks say it is the file
            # that was scanned): the refusal needs no second scan.
            raise source.truncation
        # A fresh scan reports the missing clusters with the proper error.
        raise IndexCacheError("saved index is of an incomplete archive")
    return header, index


def _owner(source: Source) -> int:
    try:
        return os.fstat(source.fileno()).st_uid
    except OSError:
        return -1


def _check_offsets(index: ArchiveIndex, header: Header) -> None:
    """Every stored cluster's data must lie between the header and the last extent's end.

    Walks each map a million clusters at a time (bounded temporaries).
    """
    step = 1 << 20
    shift, bits = np.uint64(MASK_BITS), np.uint64(OFFSET_SHIFT)
    for dev_id, dm in index.maps.items():
        for i in range(0, dm.packed.size, step):
            chunk = dm.packed[i : i + step]
            chunk = chunk[chunk != 0]
            if not chunk.size:
                continue
            offs = (chunk >> shift) << bits
            blocks = np.bitwise_count(chunk & np.uint64(MASK)).astype(np.uint64)
            ends = offs + blocks * np.uint64(BLOCK_SIZE)
            if int(offs.min()) < header.header_size or int(ends.max()) > index.end:
                raise IndexCacheError(
                    f"saved offset map of dev {dev_id} points outside the extents"
                )
