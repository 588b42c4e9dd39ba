"""Data the benchmark makes for itself, cached in the work directory.

Every builder writes its output under a temporary name, then records the
parameters it was built with in ``NAME.done``; with ``--keep`` a later run
reuses anything whose parameters match.

- :func:`guest_files`: a directory of ~half random, ~half text files (text
  made fast by shuffling the lines of a base text), plus one known file the
  restore figure reads back;
- :func:`ext4_image`: a sparse raw disk holding ext4 built from that
  directory with ``mkfs.ext4 -d`` (no root mount needed);
- :func:`created_archive`: that disk archived with the real writer,
  ``vmafs create ARCHIVE drive-scsi0=IMAGE:raw`` (out of order, as a live
  backup would be);
- :func:`sparse_archive`: a huge sparse disk with a few hundred MiB spread
  over it, written directly (numpy extent headers + one md5 per header; the
  writer through QEMU would take too long for 1 TiB), clusters shuffled;
- :func:`random_image`: a raw disk full of random data (writer figures).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from vmafs.writer.storage_daemon import raw_image_nodes, start_storage_daemon, stop_storage_daemon

from vmafs.format import (
    BLOCK_SIZE,
    BLOCKINFO_OFFSET,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    PROXMOX_SLOTS_PER_EXTENT,
    SLOTS_PER_EXTENT,
    VMA_EXTENT_MAGIC,
    Config,
    Device,
    Header,
)

from .util import VMAFS, run

GiB = 1 << 30
MiB = 1 << 20

#: the file the restore figure reads back from inside the guest filesystem
RESTORE_FILE = "restore/restore-me.bin"


@dataclass(frozen=True)
class Sizes:
    disk: int  # ext4 disk size
    files: int  # bytes of guest files
    restore_file: int  # size of the file the restore figure reads
    sparse_disk: int  # index-scale disk
    sparse_data: int  # bytes of data spread over it
    writer_disk: int  # writer throughput disk (all data)
    latency_disk: int  # guest-write-latency disk
    random_reads: int  # random 4 KiB reads per measurement
    label: str = "full"


FULL = Sizes(8 * GiB, 1_500_000_000, 16 * MiB, 1 << 40, 256 * MiB, 2 * GiB, 512 * MiB, 20000)
QUICK = Sizes(
    1 * GiB, 150_000_000, 4 * MiB, 64 * GiB, 32 * MiB, 256 * MiB, 128 * MiB, 4000, "quick"
)


def with_guest_data(sizes: Sizes, files: int) -> Sizes:
    """*sizes* with *files* bytes of guest files on the ext4 disk (``--guest-data``);
    the disk grows to keep a quarter of it free, never below its usual size."""
    disk = max(sizes.disk, -(-(files * 5 // 4) // GiB) * GiB)
    return replace(sizes, files=files, disk=disk)


def work_name(sizes: Sizes) -> str:
    """The work directory's name: the label, plus the guest data when not the usual."""
    usual = QUICK if sizes.label == "quick" else FULL
    if (sizes.files, sizes.disk) == (usual.files, usual.disk):
        return sizes.label
    return f"{sizes.label}-{sizes.files / 1e9:g}gb"


def _done(path: str, params: dict) -> bool:
    try:
        with open(path + ".done") as f:
            return json.load(f) == params and os.path.exists(path)
    except (OSError, ValueError):
        return False


def _forget(path: str) -> None:
    for p in (path + ".done", path, path + ".tmp"):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def build_once(path: str, params: dict, make: Callable[[str], None]) -> str:
    """The one cache recipe: *path* if it was built with *params*; else
    ``make(path + ".tmp")``, the result renamed to *path* and *params*
    recorded in ``PATH.done``.  Returns *path*."""
    if _done(path, params):
        return path
    _forget(path)
    make(path + ".tmp")
    os.rename(path + ".tmp", path)
    with open(path + ".done", "w") as f:
        json.dump(params, f)
    return path


def made_from(src: str, **extra) -> dict:
    """Cache parameters of a data set derived from the file *src*: it, as it is now."""
    st = os.stat(src)
    return {"src": src, "size": st.st_size, "mtime": st.st_mtime_ns, **extra}


# --- guest files and the ext4 disk -----------------------------------------------


def _base_lines() -> list[bytes]:
    """Lines of real English/technical text found on the machine (deterministic)."""
    lines: list[bytes] = []
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob("/usr/share/doc/*/copyright"))[:400]
    for p in paths:
        try:
            with open(p, "rb") as f:
                lines += [ln for ln in f.read().splitlines(keepends=True) if ln.strip()]
        except OSError:
            continue
        if len(lines) > 60000:
            break
    if len(lines) < 1000:  # a minimal system: made-up but text-like lines
        rng = np.random.default_rng(7)
        words = [bytes(rng.integers(97, 123, int(n))) for n in rng.integers(2, 10, 5000)]
        for _ in range(20000):
            idx = rng.integers(0, len(words), int(rng.integers(4, 14)))
            lines.append(b" ".join(words[i] for i in idx) + b"\n")
    return lines


def _text(rng: np.random.Generator, lines: list[bytes], size: int) -> bytes:
    out: list[bytes] = []
    n = 0
    while n < size:
        for i in rng.permutation(len(lines)):
            out.append(lines[i])
            n += len(lines[i])
            if n >= size:
                break
    return b"".join(out)[:size]


def guest_files(work: str, sizes: Sizes, seed: int = 1) -> str:
    """Directory of guest files: ~half random, ~half text. Returns its path."""

    def make(path: str) -> None:
        rng = np.random.default_rng(seed)
        lines = _base_lines()
        half = sizes.files // 2
        os.makedirs(os.path.join(path, "restore"))
        with open(os.path.join(path, RESTORE_FILE), "wb") as f:
            f.write(rng.bytes(sizes.restore_file))
        for kind, budget, lo, hi in (
            ("bin", half, 256 << 10, 32 * MiB),
            ("txt", half, 4096, 8 * MiB),
        ):
            made, i = 0, 0
            while made < budget:
                size = int(min(budget - made, np.exp(rng.uniform(np.log(lo), np.log(hi)))))
                d = os.path.join(path, f"{kind}{i // 100:03d}")
                os.makedirs(d, exist_ok=True)
                data = rng.bytes(size) if kind == "bin" else _text(rng, lines, size)
                with open(os.path.join(d, f"f{i:05d}.{kind}"), "wb") as f:
                    f.write(data)
                made += size
                i += 1

    params = {"files": sizes.files, "restore": sizes.restore_file, "seed": seed}
    return build_once(os.path.join(work, "files"), params, make)


def ext4_image(work: str, sizes: Sizes, files: str) -> str:
    """Sparse raw disk of ``sizes.disk`` bytes holding ext4 made from *files*."""

    def make(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.truncate(sizes.disk)
        run(
            ["mkfs.ext4", "-q", "-F", "-L", "benchguest", "-E", "nodiscard", "-d", files, tmp],
            env={**os.environ, "MKE2FS_DEVICE_SECTSIZE": "512"},
        )

    params = {"disk": sizes.disk, "files": sizes.files, "restore": sizes.restore_file}
    return build_once(os.path.join(work, "disk.img"), params, make)


def created_archive(work: str, image: str, name: str = "bench.vma") -> str:
    """*image* archived by ``vmafs create`` (the real writer, through QEMU)."""

    def make(tmp: str) -> None:
        conf = os.path.join(work, "qemu-server.conf")
        with open(conf, "w") as f:
            f.write("boot: order=scsi0\nmemory: 2048\nscsi0: local:100/vm-100-disk-0.raw,size=8G\n")
        write_archive(image, tmp, ["-c", conf], name=name)

    return build_once(os.path.join(work, name), made_from(image), make)


#: archive name -> why write_archive() had to fall back to `vmafs backup` for it
FALLBACKS: dict[str, str] = {}


def write_archive(image: str, out: str, options: list[str] = (), name: str = "") -> str:
    """Archive *image* with the real writer: ``vmafs create``; if that fails, the same
    writer path through ``vmafs backup`` against a qemu-storage-daemon the bench
    owns (``vmafs create`` loses its private daemon after ~10 s: see
    docs/benchmarks.md).  A fallback is recorded in :data:`FALLBACKS` under
    *name* (default: *out*'s file name).  Returns "create" or "backup"."""
    try:
        run([*VMAFS, "create", "-f", "--no-progress", *options, out, f"drive-scsi0={image}:raw"])
        return "create"
    except RuntimeError as e:
        FALLBACKS[name or os.path.basename(out)] = str(e).rsplit(": ", 1)[-1]
    write_archive_backup(image, out, options)
    return "backup"


#: stderr lines of the last write_archive_backup()
LAST_BACKUP_STDERR: list[str] = []


def write_archive_backup(image: str, out: str, options: list[str] = ()) -> None:
    """``vmafs backup`` of *image* (as drive-scsi0) from a qemu-storage-daemon we own."""
    sock = out + ".qmp.sock"
    qsd = start_storage_daemon(sock, raw_image_nodes(image))
    try:
        p = run(
            [*VMAFS, "backup", "--qmp", sock, "-o", out, "-f", "--no-progress", *options]
            + ["src=drive-scsi0"]
        )
        LAST_BACKUP_STDERR[:] = p.stderr.decode(errors="replace").strip().splitlines()
    finally:
        stop_storage_daemon(qsd)
        if os.path.exists(sock):
            os.unlink(sock)


def extracted(work: str, archive: str, name: str = "extracted") -> str:
    """``vmafs extract`` of *archive* (kept: the raw disk is a baseline's input)."""
    return build_once(
        os.path.join(work, name),
        made_from(archive),
        lambda tmp: run([*VMAFS, "extract", archive, tmp]),
    )


def raw_tar(work: str, raw: str) -> str:
    """An uncompressed tar holding the extracted raw disk (for ratarmount)."""
    return build_once(
        os.path.join(work, "disk.tar"),
        made_from(raw),
        lambda tmp: run(["tar", "-cf", tmp, "-C", os.path.dirname(raw), os.path.basename(raw)]),
    )


def zstd_archive(work: str, archive: str) -> str:
    """``zstd --threads=1`` of *archive*: one frame, as vzdump writes."""
    return build_once(
        os.path.join(work, os.path.basename(archive) + ".zst"),
        made_from(archive),
        lambda tmp: run(["zstd", "-q", "-f", "--threads=1", archive, "-o", tmp]),
    )


def seekable_archive(work: str, archive: str) -> str:
    """The writer's seekable .vma.zst form of *archive* (``vmafs recompress``)."""
    return build_once(
        os.path.join(work, "seekable.vma.zst"),
        made_from(archive),
        lambda tmp: run([*VMAFS, "recompress", archive, tmp]),
    )


def ext4_holding(work: str, name: str, src: str) -> str:
    """An ext4 image *name* holding one file, a copy of *src* (hard-linked in, so
    ``mkfs.ext4 -d`` copies it), with room to spare: a file system to put on a
    throttled loop device."""

    def make(tmp: str) -> None:
        d = tmp + ".d"
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        try:
            os.link(src, os.path.join(d, os.path.basename(src)))
            size = os.path.getsize(src)
            with open(tmp, "wb") as f:
                f.truncate(size + size // 8 + (256 << 20))
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", d, tmp])
        finally:
            shutil.rmtree(d, ignore_errors=True)

    return build_once(os.path.join(work, name), made_from(src), make)


def random_image(work: str, name: str, size: int, seed: int = 2) -> str:
    """A raw disk of *size* bytes of random data (nothing for zero detection to skip)."""

    def make(tmp: str) -> None:
        rng = np.random.default_rng(seed)
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MiB)
                f.write(rng.bytes(n))
                left -= n

    return build_once(os.path.join(work, name), {"size": size, "seed": seed}, make)


# --- the index-scale archive, written directly ---------------------------------


def live_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster order like a live QEMU backup's: 1 MiB requests (16 clusters) from
    64 parallel workers arrive shuffled within each window of 64 requests, and
    0.5% of the clusters come early, out of place (copy-before-write of guest
    writes, up to a tenth of the disk ahead)."""
    chunks = (n + 15) // 16
    key = (np.arange(chunks) // 64).astype(np.float64) + rng.random(chunks) * 0.999
    corder = np.argsort(key, kind="stable")
    order = (corder[:, None] * 16 + np.arange(16)).ravel()
    order = order[order < n]
    pos = np.arange(n, dtype=np.float64)
    early = rng.random(n) < 0.005
    pos[early] -= rng.random(int(early.sum())) * (n / 10)
    return order[np.argsort(pos, kind="stable")]


def build_sparse_vma(
    path: str,
    disk_size: int,
    data_bytes: int,
    *,
    seed: int = 3,
    slots: int = 0,
    order: str = "live",
    runs: int = 0,
    full: bool = False,
) -> dict:
    """Write a VMA archive of one *disk_size* disk with ~*data_bytes* of data spread over it.

    Every cluster appears exactly once, in *order* ``live`` (:func:`live_order`)
    or ``shuffled`` (a random permutation: the index builder's worst case);
    data clusters are full or partly stored (random masks; all full with
    *full*), the rest are all-zero slots (metadata only).  With *runs*, the
    data lies in that many runs of clusters (a used part of a disk) instead
    of at random clusters, so most extents are either full of data or empty.
    Extent headers are built as one numpy array; each gets its md5.  Returns facts about it.
    """
    slots = slots or PROXMOX_SLOTS_PER_EXTENT
    assert 1 <= slots <= SLOTS_PER_EXTENT
    rng = np.random.default_rng(seed)
    n = (disk_size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    k = max(1, min(n, data_bytes // CLUSTER_SIZE))
    if order == "shuffled":
        order = rng.permutation(n).astype(np.uint64)
    else:
        order = live_order(n, rng).astype(np.uint64)
    masks = np.zeros(n, dtype=np.uint64)
    if runs:  # one run at a random place in each of *runs* equal slices of the disk
        span = n // runs
        per = min(span, k // runs)
        starts = np.arange(runs) * span + rng.integers(0, span - per + 1, runs)
        data_clusters = (starts[:, None] + np.arange(per)).ravel()
        k = data_clusters.size
    else:
        data_clusters = rng.choice(n, size=k, replace=False)
    m = np.full(k, 0xFFFF, dtype=np.uint64)
    partial = rng.random(k) < (0 if full else 0.25)
    m[partial] = rng.integers(1, 0xFFFF, int(partial.sum()), dtype=np.uint64)
    masks[data_clusters] = m
    dev_id = np.uint64(1)

    e = (n + slots - 1) // slots
    info = np.zeros((e, SLOTS_PER_EXTENT), dtype=np.uint64)
    flat = np.zeros(e * slots, dtype=np.uint64)
    flat[:n] = (masks[order] << np.uint64(48)) | (dev_id << np.uint64(32)) | order
    info[:, :slots] = flat.reshape(e, slots)
    popcnt = np.zeros(e * slots, dtype=np.int64)
    mo = masks[order]
    for b in range(16):
        popcnt[:n] += ((mo >> np.uint64(b)) & np.uint64(1)).astype(np.int64)
    block_counts = popcnt.reshape(e, slots).sum(axis=1)

    uuid = uuidlib.UUID(int=int(rng.integers(0, 1 << 62)) << 64 | 12345).bytes
    head = np.zeros((e, EXTENT_HEADER_SIZE), dtype=np.uint8)
    head[:, 0:4] = np.frombuffer(VMA_EXTENT_MAGIC, dtype=np.uint8)
    head[:, 6:8] = block_counts.astype(">u2").view(np.uint8).reshape(e, 2)
    head[:, 8:24] = np.frombuffer(uuid, dtype=np.uint8)
    head[:, BLOCKINFO_OFFSET:] = info.astype(">u8").view(np.uint8).reshape(e, -1)
    mv = memoryview(head).cast("B")
    md5 = hashlib.md5
    for i in range(e):
        head[i, 24:40] = np.frombuffer(
            md5(mv[i * EXTENT_HEADER_SIZE : (i + 1) * EXTENT_HEADER_SIZE]).digest(), np.uint8
        )

    header = Header(
        uuid=uuid,
        ctime=1_764_000_000,
        configs=[Config("qemu-server.conf", b"scsi0: local:100/vm-100-disk-0.raw,size=1T\n")],
        devices={1: Device(1, "drive-scsi0", disk_size)},
    ).pack()
    stored = 0
    with open(path + ".tmp", "wb") as f:
        f.write(header)
        with_data = np.flatnonzero(block_counts)
        prev = 0
        for x in with_data:
            f.write(head[prev:x].tobytes())
            f.write(head[x].tobytes())
            nbytes = int(block_counts[x]) * BLOCK_SIZE
            f.write(rng.bytes(nbytes))
            stored += nbytes
            prev = x + 1
        f.write(head[prev:].tobytes())
    os.rename(path + ".tmp", path)
    return {"clusters": n, "extents": e, "data_clusters": k, "stored_bytes": stored}


def direct_archive(work: str, name: str, disk: int, data: int, **opts) -> tuple[str, dict]:
    """:func:`build_sparse_vma` of *disk*/*data* bytes (and *opts*) as *name*, cached;
    returns its path and its facts."""
    path = os.path.join(work, name)
    facts_path = path + ".json"
    if not os.path.exists(facts_path):
        _forget(path)

    def make(tmp: str) -> None:
        facts = build_sparse_vma(tmp, disk, data, **opts)
        with open(facts_path, "w") as f:
            json.dump(facts, f)

    build_once(path, {"disk": disk, "data": data, **opts, "v": 2}, make)
    with open(facts_path) as f:
        return path, json.load(f)


def sparse_archive(work: str, sizes: Sizes, order: str = "live") -> tuple[str, dict]:
    """The index-scale archive of *sizes* in cluster *order*, and its facts."""
    return direct_archive(
        work, f"sparse-{order}.vma", sizes.sparse_disk, sizes.sparse_data, order=order
    )


def describe(sizes: Sizes) -> dict:
    return asdict(sizes)


def nonzero_blocks(image: str) -> int:
    """4 KiB blocks of *image* that are not all zero (SEEK_DATA skips holes)."""
    count = 0
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        chunk = 16 * MiB
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pos = data - data % BLOCK_SIZE
            while pos < hole:
                n = min(chunk, hole - pos)
                n += -n % BLOCK_SIZE
                buf = os.pread(fd, n, pos)
                if len(buf) % BLOCK_SIZE:
                    buf += bytes(BLOCK_SIZE - len(buf) % BLOCK_SIZE)
                a = np.frombuffer(buf, dtype=np.uint64).reshape(-1, BLOCK_SIZE // 8)
                count += int(np.count_nonzero(a.any(axis=1)))
                pos += n
            off = hole
    finally:
        os.close(fd)
    return count


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "FULL",
    "QUICK",
    "RESTORE_FILE",
    "Sizes",
    "build_sparse_vma",
    "created_archive",
    "ext4_image",
    "extracted",
    "guest_files",
    "nonzero_blocks",
    "random_image",
    "raw_tar",
    "seekable_archive",
    "sha256_file",
    "sparse_archive",
    "zstd_archive",
]
