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
from dataclasses import asdict, dataclass

import numpy as np

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
from vmafs.writer.storage_daemon import raw_image_nodes, start_storage_daemon, stop_storage_daemon

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


def _done(path: str, params: dict) -> bool:
    try:
        with open(path + ".done") as f:
            return json.load(f) == params and os.path.exists(path)
    except (OSError, ValueError):
        return False


def _mark(path: str, params: dict) -> None:
    with open(path + ".done", "w") as f:
        json.dump(params, f)


def _forget(path: str) -> None:
    for p in (path + ".done", path):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


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
    path = os.path.join(work, "files")
    params = {"files": sizes.files, "restore": sizes.restore_file, "seed": seed}
    if _done(path, params):
        return path
    _forget(path)
    rng = np.random.default_rng(seed)
    lines = _base_lines()
    half = sizes.files // 2
    os.makedirs(os.path.join(path, "restore"))
    with open(os.path.join(path, RESTORE_FILE), "wb") as f:
        f.write(rng.bytes(sizes.restore_file))
    for kind, budget, lo, hi in (("bin", half, 256 << 10, 32 * MiB), ("txt", half, 4096, 8 * MiB)):
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
    _mark(path, params)
    return path


def ext4_image(work: str, sizes: Sizes, files: str) -> str:
    """Sparse raw disk of ``sizes.disk`` bytes holding ext4 made from *files*."""
    path = os.path.join(work, "disk.img")
    params = {"disk": sizes.disk, "files": sizes.files, "restore": sizes.restore_file}
    if _done(path, params):
        return path
    _forget(path)
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    with open(tmp, "wb") as f:
        f.truncate(sizes.disk)
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "benchguest", "-E", "nodiscard", "-d", files, tmp],
        env={**os.environ, "MKE2FS_DEVICE_SECTSIZE": "512"},
    )
    os.rename(tmp, path)
    _mark(path, params)
    return path


def created_archive(work: str, image: str, name: str = "bench.vma") -> str:
    """*image* archived by ``vmafs create`` (the real writer, through QEMU)."""
    path = os.path.join(work, name)
    st = os.stat(image)
    params = {"image": image, "size": st.st_size, "mtime": st.st_mtime_ns}
    if _done(path, params):
        return path
    _forget(path)
    conf = os.path.join(work, "qemu-server.conf")
    with open(conf, "w") as f:
        f.write("boot: order=scsi0\nmemory: 2048\nscsi0: local:100/vm-100-disk-0.raw,size=8G\n")
    write_archive(image, path, ["-c", conf])
    _mark(path, params)
    return path


#: why the last write_archive() had to fall back to `vmafs backup` (None: it did not)
FALLBACKS: dict[str, str] = {}


def write_archive(image: str, out: str, options: list[str] = ()) -> str:
    """Archive *image* with the real writer: ``vmafs create``; if that fails, the same
    writer path through ``vmafs backup`` against a qemu-storage-daemon the bench
    owns (``vmafs create`` loses its private daemon after ~10 s: see
    docs/benchmarks.md).  Returns "create" or "backup"."""
    try:
        run([*VMAFS, "create", "-f", "--no-progress", *options, out, f"drive-scsi0={image}:raw"])
        return "create"
    except RuntimeError as e:
        FALLBACKS[out] = str(e).rsplit(": ", 1)[-1]
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


def extracted(work: str, archive: str) -> str:
    """``vmafs extract`` of *archive* (kept: the raw disk is a baseline's input)."""
    path = os.path.join(work, "extracted")
    st = os.stat(archive)
    params = {"archive": archive, "size": st.st_size, "mtime": st.st_mtime_ns}
    if _done(path, params):
        return path
    _forget(path)
    run([*VMAFS, "extract", archive, path])
    _mark(path, params)
    return path


def raw_tar(work: str, raw: str) -> str:
    """An uncompressed tar holding the extracted raw disk (for ratarmount)."""
    path = os.path.join(work, "disk.tar")
    st = os.stat(raw)
    params = {"raw": raw, "size": st.st_size, "mtime": st.st_mtime_ns}
    if _done(path, params):
        return path
    _forget(path)
    run(["tar", "-cf", path + ".tmp", "-C", os.path.dirname(raw), os.path.basename(raw)])
    os.rename(path + ".tmp", path)
    _mark(path, params)
    return path


def zstd_archive(work: str, archive: str) -> str:
    """``zstd --threads=1`` of *archive*: one frame, as vzdump writes."""
    path = os.path.join(work, os.path.basename(archive) + ".zst")
    st = os.stat(archive)
    params = {"archive": archive, "size": st.st_size, "mtime": st.st_mtime_ns}
    if _done(path, params):
        return path
    _forget(path)
    run(["zstd", "-q", "-f", "--threads=1", archive, "-o", path + ".tmp"])
    os.rename(path + ".tmp", path)
    _mark(path, params)
    return path


def seekable_archive(work: str, archive: str) -> str:
    """The writer's seekable .vma.zst form of *archive* (``vmafs recompress``)."""
    path = os.path.join(work, "seekable.vma.zst")
    st = os.stat(archive)
    params = {"archive": archive, "size": st.st_size, "mtime": st.st_mtime_ns}
    if _done(path, params):
        return path
    _forget(path)
    run([*VMAFS, "recompress", archive, path])
    _mark(path, params)
    return path


def random_image(work: str, name: str, size: int, seed: int = 2) -> str:
    """A raw disk of *size* bytes of random data (nothing for zero detection to skip)."""
    path = os.path.join(work, name)
    params = {"size": size, "seed": seed}
    if _done(path, params):
        return path
    _forget(path)
    rng = np.random.default_rng(seed)
    with open(path + ".tmp", "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(rng.bytes(n))
            left -= n
    os.rename(path + ".tmp", path)
    _mark(path, params)
    return path


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
) -> dict:
    """Write a VMA archive of one *disk_size* disk with ~*data_bytes* of data spread over it.

    Every cluster appears exactly once, in *order* ``live`` (:func:`live_order`)
    or ``shuffled`` (a random permutation: the index builder's worst case);
    data clusters are full or partly stored (random masks), the rest are
    all-zero slots (metadata only).  Extent headers are built as one numpy
    array; each gets its md5.  Returns facts about it.
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
    data_clusters = rng.choice(n, size=k, replace=False)
    m = np.full(k, 0xFFFF, dtype=np.uint64)
    partial = rng.random(k) < 0.25
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


def sparse_archive(work: str, sizes: Sizes, order: str = "live") -> tuple[str, dict]:
    path = os.path.join(work, f"sparse-{order}.vma")
    params = {"disk": sizes.sparse_disk, "data": sizes.sparse_data, "order": order, "v": 2}
    facts_path = path + ".json"
    if _done(path, params) and os.path.exists(facts_path):
        with open(facts_path) as f:
            return path, json.load(f)
    _forget(path)
    facts = build_sparse_vma(path, sizes.sparse_disk, sizes.sparse_data, order=order)
    with open(facts_path, "w") as f:
        json.dump(facts, f)
    _mark(path, params)
    return path, facts


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
