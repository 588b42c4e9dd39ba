"""``vmafs mount``: what the mounted files hold, read through the real kernel FUSE.

Every Proxmox fixture against its manifest, out-of-order archives at odd
offsets and from several threads, the ext4 guest through a loop device,
``qemu-img convert`` from the mount, hostile names and incomplete archives.
Lifecycle (daemon, signals, errors, umount, mount.vmafs) is in
test_mount_lifecycle.py; names.py's rules alone in test_mount_names.py.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import fixture_archives, load_manifest, loop_device, unmount
from test_mount_support import GUARD, mounted, run_vmafs, sha256_file
from vmafactory import HOSTILE_CONFIG_NAMES, build_archive, missing_cluster, sparse_disk

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE
from vmafs.names import VOLUMES_DIR, safe_entry_names, unsafe_reason

pytestmark = pytest.mark.fuse

# Read paths of the filesystem: default (page cache), -o direct_io, -o threads.
MODES = {"buffered": (), "direct_io": ("direct_io",), "threads": ("threads",)}


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


# --- Proxmox-written fixtures ---------------------------------------------------------


@pytest.mark.parametrize("archive", fixture_archives(), ids=lambda p: p.name)
def test_fixture_mount_matches_manifest(archive, mnt, tmp_path, require_fuse):
    m = load_manifest(archive)
    if not archive.name.endswith(".vma"):
        # Compressed: indexed once, with a side index written beside the
        # archive; keep that out of tests/fixtures.
        archive = Path(shutil.copy(archive, tmp_path))
    with Archive.open(archive) as a:
        ctime = a.header.ctime
        stored = {d.name: a.stored_bytes(d.dev_id) for d in a.devices}
    disks = {f"disk-{d['name']}.raw": d for d in m["devices"]}
    configs = {c["name"]: c for c in m["configs"]}
    with mounted(archive, mnt):
        volumes = [VOLUMES_DIR] if disks else []  # volumes/ only where there is a disk
        assert sorted(os.listdir(mnt)) == sorted([*disks, *configs, *volumes])
        root = os.stat(mnt)
        assert root.st_mode == stat.S_IFDIR | 0o500
        assert (root.st_uid, root.st_gid) == (os.getuid(), os.getgid())
        for name, d in disks.items():
            st = os.stat(mnt / name)
            assert st.st_mode == stat.S_IFREG | 0o400, name
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
            assert st.st_size == d["size"], name
            assert st.st_blocks * 512 == stored[d["name"]], name
            assert st.st_mtime == st.st_ctime == st.st_atime == ctime
            assert sha256_file(mnt / name) == d["sha256"], name
        for name, c in configs.items():
            st = os.stat(mnt / name)
            assert st.st_mode == stat.S_IFREG | 0o400
            assert st.st_size == c["size"]
            assert st.st_blocks == (c["size"] + 511) // 512
            assert sha256_file(mnt / name) == c["sha256"], name
        # df counts exactly the stored data: nothing free, nothing more.
        vfs = os.statvfs(mnt)
        total = sum(stored.values()) + sum((c["size"] + 511) // 512 * 512 for c in m["configs"])
        assert vfs.f_blocks * vfs.f_frsize == total
        assert vfs.f_bfree == 0


def test_writes_are_refused(mnt, require_fuse, fixtures_dir):
    archive = fixtures_dir / "two-disks.vma"
    with mounted(archive, mnt):
        disk = mnt / "disk-drive-scsi0.raw"
        before = sha256_file(disk)
        attempts = {
            "open for writing": lambda: os.open(disk, os.O_WRONLY),
            "open read-write": lambda: os.open(disk, os.O_RDWR),
            "truncate": lambda: os.truncate(disk, 0),
            "create": lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o600),
            "unlink": lambda: os.unlink(mnt / "qemu-server.conf"),
            "rename": lambda: os.rename(mnt / "qemu-server.conf", mnt / "x"),
            "mkdir": lambda: os.mkdir(mnt / "d"),
            "chmod": lambda: os.chmod(disk, 0o666),
            "chown": lambda: os.chown(disk, 1, 1),
            "utime": lambda: os.utime(disk, (0, 0)),
            "symlink": lambda: os.symlink("/etc/passwd", mnt / "link"),
            "setxattr": lambda: os.setxattr(disk, "user.x", b"1"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), what
        assert sorted(os.listdir(mnt)) == sorted(
            [
                "disk-drive-scsi0.raw",
                "disk-drive-scsi1.raw",
                "qemu-server.conf",
                "qemu-server.fw",
                VOLUMES_DIR,
            ]
        )
        assert sha256_file(disk) == before
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if f" {mnt} " in ln)
        assert line.split()[5].split(",")[0] == "ro"  # per-mount flags
        assert "default_permissions" in line


# --- out-of-order archives at any offset -------------------------------------------------


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """Two disks (ragged sizes, zero clusters, partial-zero clusters) and a vmstate,
    clusters shuffled across devices, 59-slot extents."""
    disks = {
        "drive-scsi0": sparse_disk(37 * CLUSTER_SIZE + 4096 + 512, 11),
        "drive-virtio1": sparse_disk(20 * CLUSTER_SIZE + 1536, 12, zero_clusters=0.5),
    }
    vmstate = sparse_disk(9 * CLUSTER_SIZE + 100, 13, zero_clusters=0.1)
    b = build_archive(disks, vmstate=vmstate, order="shuffled", seed=5, slots=59)
    path = b.write(tmp_path_factory.mktemp("shuffled") / "shuffled.vma")
    files = {
        "disk-drive-scsi0.raw": b.disks[1],
        "disk-drive-virtio1.raw": b.disks[2],
        "vmstate.bin": b.disks[3],
    }
    return path, files, b


def _ranges(size: int, rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Random (offset, length) pairs, biased to cluster/block edges and the end of file."""
    out = [(0, 1), (size - 1, 1), (size - 1, 4096), (size, 10), (size + 4096, 1), (0, size + 1)]
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            off = rng.randrange(0, size // CLUSTER_SIZE + 1) * CLUSTER_SIZE + rng.choice(
                [-1, 0, 1, 511, 4095, 4096]
            )
        elif kind < 0.4:
            off = size - rng.randrange(1, 70000)
        else:
            off = rng.randrange(0, size)
        off = max(0, off)
        length = rng.choice([1, 7, 512, 4095, 4097, 65535, 65537, 131073, rng.randrange(1, 300000)])
        out.append((off, length))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_reads_at_odd_offsets_match_archive(shuffled, mnt, mode, require_fuse):
    path, files, b = shuffled
    rng = random.Random(mode)
    with Archive.open(path) as a, mounted(path, mnt, *MODES[mode]):
        ids = {
            f"disk-{d.name}.raw" if not d.is_vmstate else "vmstate.bin": d.dev_id for d in a.devices
        }
        assert sorted(os.listdir(mnt)) == sorted([*files, "qemu-server.conf", VOLUMES_DIR])
        for name, content in files.items():
            assert os.stat(mnt / name).st_size == len(content)
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                for off, length in _ranges(len(content), rng, 120):
                    got = os.pread(fd, length, off)
                    assert got == content[off : off + length], (name, off, length)
                    assert got == a.read(ids[name], off, length), (name, off, length)
            finally:
                os.close(fd)
            assert sha256_file(mnt / name, 65536 + 3) == sha256_file_bytes(content)


def sha256_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_readers(shuffled, mnt, mode, require_fuse):
    path, files, _ = shuffled
    errors: list[str] = []
    reads = Counter()

    def reader(k: int) -> None:
        rng = random.Random(k)
        name = sorted(files)[k % len(files)]
        content = files[name]
        try:
            with open(mnt / name, "rb", buffering=0) as f:
                for off, length in _ranges(len(content), rng, 60):
                    if os.pread(f.fileno(), length, off) != content[off : off + length]:
                        errors.append(f"{name} [{off}, +{length})")
                    reads[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {e!r}")

    with mounted(path, mnt, *MODES[mode]):
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD)
        assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []
    assert len(reads) == 8 and all(n > 60 for n in reads.values())


# --- real consumers: a loop device and qemu-img -------------------------------------------


@pytest.mark.loop
@pytest.mark.parametrize("mode", ["buffered", "direct_io"])
def test_ext4_guest_through_loop_device(
    fixtures_dir, mnt, tmp_path, mode, require_fuse, require_loop
):
    archive = fixtures_dir / "ext4-guest.vma"
    m = load_manifest(archive)
    guest = tmp_path / "guest"
    guest.mkdir()
    with mounted(archive, mnt, *MODES[mode]):
        with loop_device(mnt / "disk-drive-virtio0.raw") as dev:
            try:
                subprocess.run(
                    ["mount", "-o", "ro,noload", dev, guest],
                    check=True,
                    capture_output=True,
                    timeout=GUARD,
                )
                files = m["guest_files"]["drive-virtio0"]
                assert len(files) > 10
                for rel, digest in files.items():
                    assert sha256_file(guest / rel.lstrip("/")) == digest, rel
            finally:
                unmount(guest, fuse=False)


@pytest.mark.qemu
def test_qemu_img_convert_from_mount(fixtures_dir, mnt, tmp_path, require_fuse, require_qemu):
    archive = fixtures_dir / "ext4-guest.vma"
    dev = load_manifest(archive)["devices"][0]
    raw = tmp_path / "disk.raw"
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img = require_qemu.qemu_img
    with mounted(archive, mnt):
        disk = mnt / f"disk-{dev['name']}.raw"
        shutil.copyfile(disk, raw)
        subprocess.run(
            [qemu_img, "convert", "-f", "raw", "-O", "qcow2", disk, qcow2],
            check=True,
            capture_output=True,
            timeout=GUARD,
        )
    assert sha256_file(raw) == dev["sha256"]
    compare = [qemu_img, "compare", "-f", "raw", "-F", "qcow2", raw, qcow2]
    proc = subprocess.run(compare, capture_output=True, text=True, timeout=GUARD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The comparison can fail: one changed byte in the raw is found.
    with open(raw, "r+b") as f:
        f.seek(dev["size"] // 2)
        byte = f.read(1)
        f.seek(dev["size"] // 2)
        f.write(bytes([byte[0] ^ 1]))
    proc = subprocess.run(compare, capture_output=True, text=True, timeout=GUARD)
    assert proc.returncode == 1, proc.stdout + proc.stderr


# --- untrusted names --------------------------------------------------------------------


def test_hostile_names_shown_safely(mnt, tmp_path, require_fuse):
    configs = [(n, f"config {i}\n".encode()) for i, n in enumerate(HOSTILE_CONFIG_NAMES)]
    configs.append(("disk-drive-scsi0.raw", b"a config posing as a disk\n"))
    configs.append(("vmstate.bin", b"a config posing as the vmstate\n"))
    disks = [("drive-scsi0", sparse_disk(2 * CLUSTER_SIZE, 1)), ("../../evil", b"\1" * 4096)]
    b = build_archive(disks, configs=configs, vmstate=b"\2" * 8192)
    archive = b.write(tmp_path / "hostile.vma")
    with Archive.open(archive) as a:
        expected = safe_entry_names(a)
    logfile = tmp_path / "mount.log"
    with mounted(archive, mnt, f"logfile={logfile}"):
        shown = os.listdir(mnt)
        assert sorted(shown) == sorted([*expected, VOLUMES_DIR])
        assert len(shown) == len(configs) + 4
        for name in shown:
            assert unsafe_reason(name) is None, name
            assert os.path.dirname(os.path.realpath(mnt / name)) == str(mnt)
        # The real disk and vmstate keep their names; every config is shown exactly once.
        assert (mnt / "disk-drive-scsi0.raw").read_bytes() == b.disks[1]
        assert (mnt / "vmstate.bin").read_bytes() == b.disks[3]
        assert (mnt / "disk-dev2.raw").read_bytes() == b.disks[2]
        contents = Counter(
            (mnt / e.name).read_bytes() for e in expected.values() if e.kind == "config"
        )
        assert contents == Counter(data for _, data in configs)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    log = logfile.read_text()
    assert "config '../../x' shown as 'config-0.conf'" in log
    assert "disk '../../evil' shown as 'disk-dev2.raw'" in log


# --- incomplete archives -------------------------------------------------------------------


def test_incomplete_archive_refused_then_eio(mnt, tmp_path, require_fuse):
    content = sparse_disk(8 * CLUSTER_SIZE, 3, zero_clusters=0.0, zero_blocks=0.0)
    b = build_archive({"drive-scsi0": content, "drive-scsi1": content[: 2 * CLUSTER_SIZE]})
    archive = missing_cluster(b, dev_id=1, cluster=2).write(tmp_path / "incomplete.vma")

    proc = run_vmafs("mount", archive, mnt)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmafs: error: ")
    assert "allow_incomplete" in proc.stderr and "cluster 2" in proc.stderr
    assert os.listdir(mnt) == []

    logfile = tmp_path / "mount.log"
    with mounted(archive, mnt, "allow_incomplete", f"logfile={logfile}"):
        disk = mnt / "disk-drive-scsi0.raw"
        fd = os.open(disk, os.O_RDONLY)
        try:
            for off, length in [(2 * CLUSTER_SIZE, 1), (3 * CLUSTER_SIZE - 1, 1)]:
                with pytest.raises(OSError) as e:
                    os.pread(fd, length, off)
                assert e.value.errno == errno.EIO, (off, length)
            # A read running into the hole stops short before it (read(2) semantics).
            got = os.pread(fd, 8 * CLUSTER_SIZE, 0)
            assert len(got) <= 2 * CLUSTER_SIZE and got == content[: len(got)]
            # The rest of the disk, the other disk and the directory still work.
            assert os.pread(fd, CLUSTER_SIZE, 0) == content[:CLUSTER_SIZE]
            assert (
                os.pread(fd, 100, 2 * CLUSTER_SIZE - 100) == content[2 * CLUSTER_SIZE - 100 :][:100]
            )
            assert os.pread(fd, 5 * CLUSTER_SIZE, 3 * CLUSTER_SIZE) == content[3 * CLUSTER_SIZE :]
        finally:
            os.close(fd)
        assert (mnt / "disk-drive-scsi1.raw").read_bytes() == content[: 2 * CLUSTER_SIZE]
        assert len(os.listdir(mnt)) == 4  # two disks, the config, volumes/
    log = logfile.read_text()
    assert "incomplete archive: 1 clusters missing" in log
    assert "never written" in log


def test_archive_shrinking_under_the_mount_gives_eio(mnt, tmp_path, fixtures_dir, require_fuse):
    """Damage after mounting costs the reads that hit it, never the filesystem."""
    archive = tmp_path / "two-disks.vma"
    shutil.copyfile(fixtures_dir / "two-disks.vma", archive)
    m = load_manifest(archive)
    logfile = tmp_path / "mount.log"
    with mounted(archive, mnt, f"logfile={logfile}"):
        os.truncate(archive, os.path.getsize(archive) // 2)
        d = m["devices"][1]  # stored after the first disk: now beyond the end
        with pytest.raises(OSError) as e:
            sha256_file(mnt / f"disk-{d['name']}.raw")
        assert e.value.errno == errno.EIO
        # Still serving: the directory, attributes, configs.
        assert len(os.listdir(mnt)) == 5  # two disks, two configs, volumes/
        assert os.stat(mnt / f"disk-{d['name']}.raw").st_size == d["size"]
        assert sha256_file(mnt / "qemu-server.conf") == m["configs"][0]["sha256"]
    assert "ERROR" in logfile.read_text()


def test_full_directory_of_256_configs(mnt, tmp_path, require_fuse):
    """readdir continues where the kernel's buffer ran full (start_id), nothing lost or doubled."""
    configs = [(f"c{i:03d}-" + "n" * 60 + ".conf", f"{i}\n".encode()) for i in range(256)]
    b = build_archive({"drive-scsi0": sparse_disk(CLUSTER_SIZE, 2)}, configs=configs)
    archive = b.write(tmp_path / "many.vma")
    with mounted(archive, mnt):
        names = os.listdir(mnt)
        assert len(names) == len(set(names)) == 258
        assert sorted(names) == sorted(
            ["disk-drive-scsi0.raw", VOLUMES_DIR, *(n for n, _ in configs)]
        )
        assert (mnt / configs[200][0]).read_bytes() == b"200\n"


def test_mmap_shared_works_buffered(shuffled, mnt, require_fuse):
    """The default (page cache) read path supports MAP_SHARED mmap; direct_io would not."""
    import mmap

    path, files, _ = shuffled
    with mounted(path, mnt):
        content = files["disk-drive-scsi0.raw"]
        with open(mnt / "disk-drive-scsi0.raw", "rb") as f:
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                assert len(m) == len(content)
                assert m[:] == content
                assert m[CLUSTER_SIZE - 3 : CLUSTER_SIZE + 5] == content[CLUSTER_SIZE - 3 :][:8]


# A reader in its own process, so the filesystem's debug trace names it by pid.
_READER = r"""
import mmap, os, sys
path, flags, off, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
fd = os.open(path, os.O_RDONLY | flags)
try:
    n = os.preadv(fd, [buf], off)
finally:
    os.close(fd)
sys.stdout.buffer.write(buf[:n])
"""


def _read_in_child(path: Path, flags: int, off: int, size: int) -> tuple[int, bytes]:
    """(pid, bytes) of one pread by a new process opening *path* with *flags*."""
    argv = [sys.executable, "-c", _READER, str(path), str(flags), str(off), str(size)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=GUARD)
    assert proc.returncode == 0, err
    return proc.pid, out


def _read_requests_by_pid(log: Path) -> Counter:
    """READ requests in libfuse's debug trace (``-o debug``), counted by requesting pid."""
    return Counter(
        int(line.rsplit("pid:", 1)[1])
        for line in log.read_text().splitlines()
        if "opcode: READ " in line
    )


def test_o_direct_opens_read_around_the_page_cache(mnt, tmp_path, require_fuse):
    """On the default mount an O_DIRECT open (qemu-img convert -T none, dd
    iflag=direct) reaches the filesystem on every read and leaves the page cache
    alone, while buffered opens share the cached pages (FOPEN_KEEP_CACHE): a
    one-off copy can skip the second copy of the data without -o direct_io."""
    content = sparse_disk(64 * CLUSTER_SIZE, 9, zero_clusters=0.0, zero_blocks=0.0)
    archive = build_archive({"drive-scsi0": content}).write(tmp_path / "a.vma")
    log = tmp_path / "fuse.log"
    size = 16 * 4096
    direct_off, cached_off = CLUSTER_SIZE, 32 * CLUSTER_SIZE
    with mounted(archive, mnt, "debug", f"logfile={log}"):
        disk = mnt / "disk-drive-scsi0.raw"
        readers = {}
        for name, flags, off in [
            ("direct", os.O_DIRECT, direct_off),
            ("direct again", os.O_DIRECT, direct_off),
            ("buffered", 0, cached_off),
            ("buffered again", 0, cached_off),
            ("buffered after direct", 0, direct_off),
        ]:
            pid, data = _read_in_child(disk, flags, off, size)
            assert data == content[off : off + size], name
            readers[name] = pid
    requests = _read_requests_by_pid(log)
    seen = {name: requests[pid] for name, pid in readers.items()}
    assert seen["direct"] == seen["direct again"] == 1, seen  # 64 KiB: one request each
    assert seen["buffered"] >= 1 and seen["buffered again"] == 0, seen  # cached across opens
    assert seen["buffered after direct"] >= 1, seen  # O_DIRECT filled no page cache


def test_failed_reads_are_logged_at_a_bounded_rate(caplog, monkeypatch):
    """A reader hammering a damaged region must not flood syslog: a burst, then a count."""
    from vmafs import fs  # imports pyfuse3

    now = [1000.0]
    monkeypatch.setattr(fs.time, "monotonic", lambda: now[0])
    errors = fs._ErrorLog(burst=3, window=10.0)
    with caplog.at_level("WARNING", logger="vmafs.fs"):
        for i in range(50):
            errors(40, "read failed %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"read failed {i}" for i in range(3)]
        now[0] += 10.0
        errors(40, "read failed %d", 50)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "47 more failed reads not logged in the last 10 s",
        "read failed 50",
    ]
