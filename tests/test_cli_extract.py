"""``vmafs extract``: exact, sparse, never outside DIR, never over existing files."""

from __future__ import annotations

import hashlib
import os
import resource
import stat

import pytest
from conftest import FIXTURES_DIR, fixture_archives, load_manifest
from test_cli_support import CLUSTER_SIZE, assert_one_line_error, build, patterned_disk, run_cli


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_extract_fixture_matches_manifest(archive, tmp_path):
    m = load_manifest(archive)
    out = tmp_path / "out"
    proc = run_cli("extract", archive, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    expected = {f"disk-{d['name']}.raw": d for d in m["devices"]}
    expected.update({c["name"]: c for c in m["configs"]})
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, item in expected.items():
        st = os.stat(out / name)
        assert st.st_size == item["size"], name
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert _sha256(out / name) == item["sha256"], name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700


def test_zero_disk_is_sparse(tmp_path):
    out = tmp_path / "out"
    assert run_cli("extract", FIXTURES_DIR / "zero-disk.vma", out).returncode == 0
    st = os.stat(out / "disk-drive-scsi0.raw")
    assert st.st_size == 256 << 20
    assert st.st_blocks * 512 <= 64 << 10  # nothing but metadata allocated


def test_partly_zero_disk_allocates_only_data(tmp_path):
    data = patterned_disk(30 * CLUSTER_SIZE, 5)  # 1/3 zero, 1/3 full, 1/3 half clusters
    b = build(tmp_path / "a.vma", {"drive-scsi0": data}, order="shuffled")
    out = tmp_path / "out"
    assert run_cli("extract", b.path, out).returncode == 0
    disk = out / "disk-drive-scsi0.raw"
    assert disk.read_bytes() == data
    stored = 10 * CLUSTER_SIZE + 10 * CLUSTER_SIZE // 2
    allocated = os.stat(disk).st_blocks * 512
    assert stored <= allocated < stored + 8 * CLUSTER_SIZE, allocated


def test_out_of_order_archive_with_vmstate(tmp_path):
    disks = {
        "drive-scsi0": patterned_disk(40 * CLUSTER_SIZE + 4096, 11),
        "drive-virtio1": patterned_disk(7 * CLUSTER_SIZE + 512, 12, zero_every=2),
        "drive-efidisk0": patterned_disk(528 * 1024, 13),
        "vmstate": os.urandom(3 * CLUSTER_SIZE + 1000),
    }
    b = build(tmp_path / "a.vma", disks, order="shuffled", slots=59, seed=7)
    out = tmp_path / "out"
    proc = run_cli("extract", b.path, out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == sorted(
        [f"disk-{n}.raw" for n in disks if n != "vmstate"] + ["vmstate.bin", "qemu-server.conf"]
    )
    for name, data in disks.items():
        fname = "vmstate.bin" if name == "vmstate" else f"disk-{name}.raw"
        assert (out / fname).read_bytes() == data, name


def test_drive_filter(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("extract", FIXTURES_DIR / "two-disks.vma", out, "-d", "drive-scsi1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["disk-drive-scsi1.raw", "qemu-server.conf", "qemu-server.fw"]
    m = load_manifest("two-disks")
    assert _sha256(out / "disk-drive-scsi1.raw") == m["devices"][1]["sha256"]


def test_drive_filter_lists_and_repeats(tmp_path):
    archive = FIXTURES_DIR / "two-disks.vma"
    for i, args in enumerate(
        (["-d", "drive-scsi0,drive-scsi1"], ["-d", "drive-scsi0", "--drives", "drive-scsi1"])
    ):
        out = tmp_path / f"out{i}"
        assert run_cli("extract", archive, out, *args).returncode == 0
        assert len(os.listdir(out)) == 4


def test_vmstate_only_when_listed_with_d(tmp_path):
    disks = {"drive-scsi0": patterned_disk(2 * CLUSTER_SIZE, 1), "vmstate": b"\3" * 5000}
    b = build(tmp_path / "a.vma", disks)
    run_cli("extract", b.path, tmp_path / "o1", "-d", "drive-scsi0")
    assert "vmstate.bin" not in os.listdir(tmp_path / "o1")
    run_cli("extract", b.path, tmp_path / "o2", "-d", "vmstate")
    assert sorted(os.listdir(tmp_path / "o2")) == ["qemu-server.conf", "vmstate.bin"]
    assert (tmp_path / "o2" / "vmstate.bin").read_bytes() == b"\3" * 5000


def test_unknown_drive_is_refused_before_writing(tmp_path):
    out = tmp_path / "out"
    line = assert_one_line_error(
        run_cli("extract", FIXTURES_DIR / "two-disks.vma", out, "-d", "drive-scsi9")
    )
    assert "'drive-scsi9'" in line and "drive-scsi0, drive-scsi1" in line
    assert not out.exists()


def test_existing_empty_directory_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    assert run_cli("extract", FIXTURES_DIR / "no-disks.vma", out).returncode == 0
    assert os.listdir(out) == ["qemu-server.conf"]


def test_refuses_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "qemu-server.conf"
    keep.write_text("mine\n")
    line = assert_one_line_error(run_cli("extract", FIXTURES_DIR / "two-disks.vma", out))
    assert "not empty" in line
    assert keep.read_text() == "mine\n"
    assert os.listdir(out) == ["qemu-server.conf"]


def test_refuses_a_file_as_target(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    line = assert_one_line_error(run_cli("extract", FIXTURES_DIR / "no-disks.vma", target))
    assert "Not a directory" in line
    assert target.read_text() == "x"


def test_missing_parent_directory(tmp_path):
    line = assert_one_line_error(
        run_cli("extract", FIXTURES_DIR / "no-disks.vma", tmp_path / "a" / "b")
    )
    assert "No such file or directory" in line


def test_hostile_names_stay_inside(tmp_path):
    """Proxmox's own extract writes a config named ../../x outside its target."""
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    configs = [
        ("qemu-server.conf", b"ok"),
        ("../../x", b"evil1"),
        ("/etc/passwd-vmafs-test", b"evil2"),
        ("..", b"evil3"),
        ("disk-drive-scsi0.raw", b"evil4"),  # clashes with the disk's file
        ("a\nb", b"evil5"),
    ]
    b = build(
        tmp_path / "a.vma",
        {"drive-scsi0": patterned_disk(CLUSTER_SIZE, 1), "../../dev": bytes(CLUSTER_SIZE)},
        configs,
    )
    before = sorted(p for p in tmp_path.rglob("*"))
    out = work / "out"
    proc = run_cli("extract", b.path, out)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "deep" / "x").exists()
    assert not os.path.exists("/etc/passwd-vmafs-test")
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out))
    assert after == before  # nothing new anywhere but inside DIR
    files = sorted(os.listdir(out))
    assert all("/" not in f and f not in (".", "..") for f in files)
    assert len(files) == len(configs) + 2  # every entry kept, under a safe name
    contents = {(out / f).read_bytes() for f in files}
    assert {b"ok", b"evil1", b"evil2", b"evil3", b"evil4", b"evil5"} <= contents
    assert (out / "disk-drive-scsi0.raw").read_bytes() == patterned_disk(CLUSTER_SIZE, 1)
    assert (out / "qemu-server.conf").read_bytes() == b"ok"
    # each rename is reported, one warning line per entry
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 6 and all(w.startswith("vmafs: warning: ") for w in warnings)


def test_symlinked_directory_entries_are_not_followed(tmp_path):
    # A symlink in the (empty-checked) DIR cannot exist, but O_NOFOLLOW|O_EXCL is
    # the real guard: check it by racing nothing, directly through the writer.
    from vmafs.commands import extract

    d = tmp_path / "d"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, d / "qemu-server.conf")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        job = extract._Extraction(None, str(d), fd, created_dir=False)
        with pytest.raises(Exception, match="already exists"):
            job._create("qemu-server.conf")
        with pytest.raises(Exception, match="unsafe"):
            job._create("../victim")
    finally:
        os.close(fd)
    assert victim.read_text() == "keep"


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_failure_removes_partial_files(tmp_path):
    # unaligned.vma: disk-drive-sata0 (68.5 KiB) fits under the limit, then
    # disk-drive-ide1 (1 MiB + 512) cannot be sized: EFBIG. The first disk must go too.
    out = tmp_path / "out"
    proc = run_cli(
        "extract", FIXTURES_DIR / "unaligned.vma", out, preexec_fn=_limit_file_size(512 << 10)
    )
    line = assert_one_line_error(proc)
    assert "File too large" in line and "disk-drive-ide1.raw" in line
    assert not out.exists()


def test_failure_keeps_a_directory_it_did_not_create(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(
        "extract", FIXTURES_DIR / "unaligned.vma", out, preexec_fn=_limit_file_size(512 << 10)
    )
    assert_one_line_error(proc)
    assert out.is_dir() and os.listdir(out) == []


def test_progress_bar(tmp_path):
    proc = run_cli("extract", "--progress", FIXTURES_DIR / "two-disks.vma", tmp_path / "a")
    assert proc.returncode == 0
    assert "extracting disk-drive-scsi1.raw  100% [" in proc.stderr
    assert proc.stderr.endswith("\x1b[K")  # the bar erases itself
    # not a terminal, not asked for: no bar
    proc = run_cli("extract", FIXTURES_DIR / "two-disks.vma", tmp_path / "b")
    assert proc.stderr == ""
    proc = run_cli("extract", "--no-progress", FIXTURES_DIR / "two-disks.vma", tmp_path / "c")
    assert proc.stderr == ""


def test_verbose_lists_files(tmp_path):
    proc = run_cli("extract", "-v", FIXTURES_DIR / "two-disks.vma", tmp_path / "o")
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert f"{tmp_path / 'o' / 'disk-drive-scsi0.raw'}: 5242880 bytes, " in lines[0]


def test_incomplete_archive_is_refused(tmp_path):
    b = build(
        tmp_path / "a.vma", {"drive-scsi0": patterned_disk(4 * CLUSTER_SIZE, 1)}, skip={(1, 2)}
    )
    line = assert_one_line_error(run_cli("extract", b.path, tmp_path / "out"))
    assert "IncompleteArchive" not in line and "never written" in line
    assert not (tmp_path / "out").exists()


_SIGNAL_AFTER_FIRST_WRITE = """
import os, signal, sys
import vmafs.commands.extract as ex
from vmafs.cli import main

real = ex.write_sparse
calls = []

def write_then_signal(fd, buf, offset):
    n = real(fd, buf, offset)
    calls.append(n)
    if len(calls) == 2:  # the first disk is on disk, the second is half written
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return n

ex.write_sparse = write_then_signal
sys.exit(main(["extract", "--no-progress", *sys.argv[2:]]))
"""


@pytest.mark.parametrize(("sig", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_removes_partial_files(tmp_path, sig, status):
    # A real signal arrives in the middle of writing: extract cleans up after itself.
    import subprocess
    import sys

    # drive-scsi0: one write (cluster 1); drive-scsi1: signalled during its first write.
    disks = {"drive-scsi0": patterned_disk(2 * CLUSTER_SIZE, 1), "drive-scsi1": os.urandom(1 << 20)}
    b = build(tmp_path / "a.vma", disks)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_FIRST_WRITE, sig, str(b.path), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_vmafactory_hostile_names(tmp_path):
    # The shared table of names a filesystem must not follow (tests/vmafactory.py).
    from vmafactory import HOSTILE_CONFIG_NAMES, hostile_names_archive

    b = hostile_names_archive()
    path = b.write(tmp_path / "names.vma")
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    before = sorted(tmp_path.rglob("*"))
    proc = run_cli("extract", path, out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out)) == before
    files = os.listdir(out)
    # every config is there (under its own or a safe name), plus the disk
    assert len(files) == len(HOSTILE_CONFIG_NAMES) + 1
    got = sorted((out / f).read_bytes() for f in files if f != "disk-drive-scsi0.raw")
    assert got == sorted(f"config {i}\n".encode() for i in range(len(HOSTILE_CONFIG_NAMES)))
    for f in files:
        assert f.isprintable() and "/" not in f and f not in ("", ".", "..")
        assert stat.S_ISREG(os.lstat(out / f).st_mode)
    assert (out / "disk-drive-scsi0.raw").read_bytes() == b.disks[1]
    # verify names them (Proxmox never writes such names)
    line = assert_one_line_error(run_cli("verify", path))
    assert "is not a safe file name" in line


def test_target_swapped_for_symlink_after_mkdir(tmp_path, monkeypatch):
    # An attacker in a shared parent (/tmp) replaces the new DIR with a symlink
    # right after mkdir: extract must not follow it.
    from vmafs.commands import extract

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "out"
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777):
        real_mkdir(path, mode)
        os.rmdir(path)
        os.symlink(elsewhere, path)

    monkeypatch.setattr(extract.os, "mkdir", mkdir_then_swap)
    with pytest.raises(extract.VmaError, match="replaced while opening"):
        extract._open_target(str(target))
    assert os.listdir(elsewhere) == []


def test_allow_incomplete_extracts_what_is_there(tmp_path):
    data = patterned_disk(6 * CLUSTER_SIZE, 4)  # clusters 1, 4 full; 2, 5 half
    b = build(tmp_path / "a.vma", {"drive-scsi0": data}, skip={(1, 4), (1, 5)})
    out = tmp_path / "out"
    proc = run_cli("extract", "--allow-incomplete", b.path, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "vmafs: warning: disk-drive-scsi0.raw: 2 of 6 clusters were never written; "
        "extracted as zeros\n"
    )
    got = (out / "disk-drive-scsi0.raw").read_bytes()
    assert got == data[: 4 * CLUSTER_SIZE] + bytes(2 * CLUSTER_SIZE)


def test_allow_incomplete_archive_cut_inside_an_extent(tmp_path):
    data = patterned_disk(8 * CLUSTER_SIZE, 6)
    b = build(tmp_path / "a.vma", {"drive-scsi0": data}, slots=2)
    with open(b.path, "r+b") as f:
        f.truncate(b.extent_offsets[-1] + 700)  # the last extent (clusters 6, 7) is partial
    out = tmp_path / "out"
    assert_one_line_error(run_cli("extract", b.path, out))
    proc = run_cli("extract", "--allow-incomplete", b.path, out)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 8 clusters were never written" in proc.stderr
    got = (out / "disk-drive-scsi0.raw").read_bytes()
    assert got == data[: 6 * CLUSTER_SIZE] + bytes(2 * CLUSTER_SIZE)


def test_progress_bar_by_default_on_a_terminal(tmp_path):
    import pty
    import subprocess

    from conftest import vmafs_cmd

    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            vmafs_cmd("extract", FIXTURES_DIR / "two-disks.vma", tmp_path / "o"),
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
            env={**os.environ, "TERM": "xterm"},
        )
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert b"extracting disk-drive-scsi1.raw  100% [" in seen
