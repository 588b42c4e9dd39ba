"""The writer's inputs: image formats, paths, names, rates, output names, signals at exit.

Each test here was written against a confirmed bug of `vmafs create`/`backup`
(a guest-written qcow2 header pulling in a host file, --socket-dir ignored,
names the reader refuses, ...) and fails on the code before its fix.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import loop_device, vmafs_cmd
from test_backup_support import (
    MiB,
    archive_disks,
    file_sha256,
    finish,
    leftovers,
    one_line_error,
    random_raw,
    run,
    start_backup,
    vm,
    vmafs_verify,
)
from vmafs.writer.cli import parse_rate
from vmafs.writer.output import ArchiveOutput
from vmafs.writer.packer import Packer

from vmafs.errors import WriterError

TIMEOUT = 120
SECRET = b"SECRET host file\n"


def create(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        vmafs_cmd("create", *args), capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd
    )


def qcow2_over_host_file(tmp_path: Path) -> tuple[Path, Path]:
    """(secret.raw, disk.img): a 4 MiB raw disk whose guest wrote a qcow2 header
    naming secret.raw as its backing file."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET.ljust(MiB, b"\0"))
    disk = tmp_path / "disk.img"
    run("qemu-img", "create", "-f", "qcow2", "-b", secret, "-F", "raw", disk, "1M")
    os.truncate(disk, 4 * MiB)
    return secret, disk


# --- 1: a guessed format never pulls in another file ----------------------------------------


def test_block_device_without_format_is_raw(require_qemu, require_loop, tmp_path):
    """A block device whose content is a qcow2 header with a backing file is
    backed up as the raw device, not as the host file named as backing."""
    _, disk = qcow2_over_host_file(tmp_path)
    out = tmp_path / "blk.vma"
    with loop_device(disk) as dev:
        proc = create(out, f"d={dev}")
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"d": (4 * MiB, file_sha256(disk))}


@pytest.mark.parametrize("kind", ["backing", "data-file", "vmdk-extent"])
def test_probed_file_referring_to_other_files_is_refused(require_qemu, tmp_path, kind):
    """A regular file probed as an image that names other files is refused (one
    line saying how to follow them); with IMAGE:FORMAT it is followed."""
    secret, disk = qcow2_over_host_file(tmp_path)
    fmt = "qcow2"
    if kind == "data-file":
        disk = tmp_path / "df.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={secret}", disk, "1M")
    elif kind == "vmdk-extent":
        fmt = "vmdk"
        disk = tmp_path / "d.vmdk"
        disk.write_text(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            f'createType="monolithicFlat"\n\nRW 2048 FLAT "{secret}" 0\n'
        )
    out = tmp_path / "g.vma"
    proc = create(out, f"d={disk}")
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert str(secret) in line and f"d={disk}:{fmt}" in line, line
    assert leftovers(tmp_path) == []
    if kind == "backing":
        proc = create(out, f"d={disk}:qcow2")
        assert proc.returncode == 0, proc.stderr
        assert archive_disks(out) == {"d": (MiB, file_sha256(secret))}


def test_probed_qcow2_without_backing_still_works(require_qemu, tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=31)
    img = tmp_path / "plain.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
    out = tmp_path / "q.vma"
    proc = create(out, f"d={img}")
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"d": (MiB, file_sha256(raw))}


# --- 2: backup --socket-dir -------------------------------------------------------------------


def test_backup_socket_dir_is_used(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 2 * MiB, seed=32)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    out = tmp_path / "b.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        rc, _, err = finish(
            start_backup(
                "--qmp",
                machine.qmp_path,
                "-o",
                out,
                "--socket-dir",
                tmp_path / "nope",
                "drive-scsi0",
            )
        )
        assert rc == 1, err
        assert f"--socket-dir {tmp_path / 'nope'}" in one_line_error(err)
        assert leftovers(tmp_path) == []

        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", out, "--speed", "1M", "--socket-dir", sockets,
            "drive-scsi0",
        )  # fmt: skip
        try:
            machine.wait_job_running()
            used = [p.name for p in sockets.iterdir()]
        finally:
            rc, _, err = finish(proc)
        assert rc == 0, err
    assert len(used) == 1 and used[0].startswith("vmafs-nbd-"), used
    assert list(sockets.iterdir()) == []
    assert archive_disks(out) == {"drive-scsi0": (2 * MiB, file_sha256(src))}


# --- 3: relative paths with a colon -----------------------------------------------------------


def test_relative_image_path_with_colon(require_qemu, tmp_path):
    raw = random_raw(tmp_path / "c:d.raw", MiB, seed=33)
    proc = create("out.vma", "d=c:d.raw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(tmp_path / "out.vma") == {"d": (MiB, file_sha256(raw))}


# --- 4, 5: device and config names ------------------------------------------------------------


BAD_DEVNAMES = [
    (b"a\nb", "control character"),
    (b"a/b", "'/'"),
    (b"..", "directory"),
    (b"x" * 247, "longer than 246 bytes"),
    (b"caf\xe9", "not valid UTF-8"),
    (b"vmstate", "RAM state"),
]


@pytest.mark.parametrize("devname, why", BAD_DEVNAMES, ids=lambda v: repr(v)[:20])
def test_create_refuses_bad_devnames(tmp_path, devname, why):
    """Refused up front, one line naming the name; nothing written, no QEMU started."""
    raw = random_raw(tmp_path / "r.raw", MiB, seed=34)
    out = tmp_path / "n.vma"
    argv = [*map(os.fsencode, vmafs_cmd("create", out)), devname + b"=" + bytes(raw)]
    proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    line = one_line_error(proc.stderr.decode(errors="replace"))
    assert proc.returncode == 1
    assert why in line and "device name" in line, line
    assert leftovers(tmp_path) == []


def test_create_accepts_the_longest_devname(require_qemu, tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=35)
    out = tmp_path / "n.vma"
    proc = create(out, f"{'x' * 246}={raw}")
    assert proc.returncode == 0, proc.stderr
    assert vmafs_verify(out).returncode == 0


@pytest.mark.parametrize(
    "name, why",
    [(b"caf\xe9.conf", "not valid UTF-8"), (b"a\tb.conf", "control character"),
     (b"disk-d.raw", "clashes")],
)  # fmt: skip
def test_create_refuses_bad_config_names(tmp_path, name, why):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=36)
    conf = os.path.join(os.fsencode(tmp_path), name)
    with open(conf, "wb") as f:
        f.write(b"memory: 512\n")
    out = tmp_path / "n.vma"
    argv = [*map(os.fsencode, vmafs_cmd("create", out, "-c")), conf, b"d=" + bytes(raw)]
    proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    line = one_line_error(proc.stderr.decode(errors="replace"))
    assert proc.returncode == 1
    assert why in line and "config name" in line, line
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("drive, why", [("scsi0=a\nb", "control character"),
                                        ("scsi0=vmstate", "RAM state")])  # fmt: skip
def test_backup_refuses_bad_devnames_before_connecting(tmp_path, drive, why):
    """Checked before QMP is even opened (the socket here does not exist)."""
    out = tmp_path / "b.vma"
    rc, _, err = finish(start_backup("--qmp", tmp_path / "no.qmp", "-o", out, drive))
    assert rc == 1
    assert why in one_line_error(err)
    assert leftovers(tmp_path) == []


def test_packer_refuses_bad_names():
    for devices, configs in [
        ([("a\nb", 1)], []),
        ([("a/b", 1)], []),
        ([("x" * 247, 1)], []),
        ([("caf\udce9", 1)], []),
        ([("d", 1)], [(b"caf\xe9.conf", b"")]),
        ([("d", 1)], [("disk-d.raw", b"")]),
    ]:
        with pytest.raises(WriterError, match="name"):
            Packer(io.BytesIO(), devices, configs)
    Packer(io.BytesIO(), [("vmstate", 1), ("x" * 246, 1)])  # the packer may write RAM state


# --- 6: an empty image ------------------------------------------------------------------------


def test_empty_image_names_the_image(require_qemu, tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    proc = create(tmp_path / "e.vma", f"drive-scsi0={empty}")
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert str(empty) in line and "drive-scsi0" in line and "src0" not in line, line
    assert leftovers(tmp_path) == []


# --- 7: stdout closed -------------------------------------------------------------------------


def test_closed_stdout_is_a_clear_error(tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=37)
    argv = ["sh", "-c", 'exec "$@" >&-', "sh", *vmafs_cmd("create", "-", f"d={raw}:raw")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert "stdout is closed" in line and "internal error" not in line, line


# --- 8: --speed -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "10000000T", "8388608T", "-1"])
def test_parse_rate_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="bad rate"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["inf", "nan", "10000000T"])
def test_speed_out_of_range_is_a_usage_error(tmp_path, text):
    proc = create("--speed", text, tmp_path / "s.vma", f"d={tmp_path}/x.raw")
    assert proc.returncode == 2
    assert "bad rate" in one_line_error(proc.stderr)


def test_highest_rate_is_accepted_by_qemu(require_qemu, tmp_path):
    assert parse_rate("8388607T") <= (1 << 63) - 1  # QEMU's int64
    raw = random_raw(tmp_path / "r.raw", MiB, seed=38)
    out = tmp_path / "s.vma"
    proc = create("--speed", "8388607T", out, f"d={raw}:raw")
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"d": (MiB, file_sha256(raw))}


# --- 9: compressed-looking output names -------------------------------------------------------


@pytest.mark.parametrize("suffix", [".vma.gz", ".vma.lzo", ".vma.zstd", ".vma.GZ", ".vma.xz"])
def test_foreign_compression_suffix_is_refused(tmp_path, suffix):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=39)
    proc = create(tmp_path / f"a{suffix}", f"d={raw}:raw")
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert ".vma.zst" in line and "gzip" in line, line
    assert leftovers(tmp_path) == []
    with pytest.raises(WriterError):
        ArchiveOutput(tmp_path / f"b{suffix}")
    ArchiveOutput(tmp_path / f"c{suffix}", compress=None).abort()  # explicit: the caller knows


def test_upper_case_zst_is_zstd(require_qemu, tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=40)
    out = tmp_path / "a.vma.ZST"
    proc = create(out, f"d={raw}:raw")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    assert archive_disks(out) == {"d": (MiB, file_sha256(raw))}


# --- 10: the output's directory ---------------------------------------------------------------


def test_missing_output_directory_names_the_archive(tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=41)
    proc = create(tmp_path / "nodir" / "x.vma", f"d={raw}:raw")
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert "nodir/x.vma" in line and "does not exist" in line and ".tmp" not in line, line


def test_force_onto_a_directory_fails_before_copying(tmp_path):
    raw = random_raw(tmp_path / "r.raw", MiB, seed=42)
    target = tmp_path / "isdir"
    target.mkdir()
    proc = create("-f", target, f"d={raw}:raw")
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert f"{target}: is a directory" in line and ".tmp" not in line, line
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


# --- 11: signals around the commit ------------------------------------------------------------


def _spam_sigterm(proc: subprocess.Popen) -> None:
    """SIGTERM every millisecond until *proc* exits."""
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.001)


def test_sigterm_after_commit_exits_0(require_qemu, tmp_path):
    """Signals that arrive once the archive is under its name change nothing:
    exit 0, no message, a whole archive (was: 143 and silence)."""
    raw = random_raw(tmp_path / "r.raw", 2 * MiB, seed=43)
    out = tmp_path / "late.vma"
    proc = subprocess.Popen(
        vmafs_cmd("create", out, f"d={raw}:raw"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + TIMEOUT
    while not out.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "create did not finish"
        time.sleep(0.0005)
    _spam_sigterm(proc)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert err == b""
    assert archive_disks(out) == {"d": (2 * MiB, file_sha256(raw))}


@pytest.mark.parametrize("delay", [0.0, 0.5, 0.7, 0.9, 1.1])
def test_sigterm_at_any_moment_never_exits_0_without_an_archive(require_qemu, tmp_path, delay):
    """Whenever the signals start: exit 0 only with a complete archive, else no archive."""
    raw = random_raw(tmp_path / "r.raw", 2 * MiB, seed=44)
    out = tmp_path / "any.vma"
    proc = subprocess.Popen(
        vmafs_cmd("create", out, f"d={raw}:raw"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(delay)
    _spam_sigterm(proc)
    _, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode == 0:
        assert err == b""
        assert archive_disks(out) == {"d": (2 * MiB, file_sha256(raw))}
    else:
        assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 1), err
        assert not out.exists()
    assert [n for n in leftovers(tmp_path) if n != out.name] == []


def test_late_signals_stay_ignored_after_commit():
    """Unit check of the handler: committed -> ignored; not committed -> the old default."""
    from vmafs.common.signals import LateSignals

    class Out:
        committed = False

    late = LateSignals(lambda signum: AssertionError(signum))
    late.output = Out()
    seen = []
    late._outside[signal.SIGINT] = lambda s, f: seen.append(s)
    late._handle(signal.SIGINT, None)
    assert seen == [signal.SIGINT]
    late._in_trio, late._inside[signal.SIGTERM] = True, signal.SIG_DFL
    late._handle(signal.SIGTERM, None)  # inside trio, before the guard: kept for ready()
    assert late.pending == signal.SIGTERM
    late._in_trio = False
    Out.committed = True
    late._handle(signal.SIGINT, None)
    late._handle(signal.SIGTERM, None)  # would kill this process if not ignored
    assert seen == [signal.SIGINT]


def test_signal_before_the_guard_listens_is_reported_once_it_does():
    """SIGTERM inside trio before the SignalGuard's receiver exists: kept, and
    ready() - which waits for the receiver - reports it; nothing was created."""
    import trio
    from vmafs.writer.backup import BackupInterrupted, interrupted, signal_guard

    from vmafs.common.signals import LateSignals

    saved = {s: signal.getsignal(s) for s in LateSignals.SIGNALS}
    late = LateSignals(lambda signum: interrupted(signum, "nothing written"))
    guard = signal_guard()
    order = []

    async def main():
        os.kill(os.getpid(), signal.SIGTERM)  # before main's first await: no receiver yet
        order.append(guard.listening.is_set())
        await late.ready()
        order.append("not reached")

    try:
        with pytest.raises(BackupInterrupted) as info:
            trio.run(late.run, guard, main)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert order == [False] and guard.listening.is_set()
    assert info.value.signum == signal.SIGTERM and "nothing written" in str(info.value)
