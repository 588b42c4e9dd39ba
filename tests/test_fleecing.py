"""``vmafs backup --fleecing``: the guest never waits on the writer (real QEMU).

The VM is a PC (``-S``: prelaunch, or running where the test says) with
virtio-blk-pci disks.  "Guest writes" are HMP ``qemu-io -d <dev>/virtio-backend``
writes: they go through the guest device's BlockBackend, so after vmafs
re-pointed the device they take the guest's route through the
copy-before-write filter.  qemu-io prints its result on QEMU's stdout, which
the tests read to see that every write succeeded.

The bound on a guest write's duration is derived from the configured
``--cbw-timeout`` (timeout + a wide margin for a loaded machine), not a
performance figure: in push mode a write waits for the writer without any
bound, and with a stopped writer forever.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import vmafs_cmd
from test_backup_support import (
    TIMEOUT,
    MiB,
    Vm,
    archive_disks,
    file_sha256,
    finish,
    leftovers,
    one_line_error,
    random_raw,
    small_tmpfs,
    start_backup,
    vm,
    vmafs_verify,
)

from vmafs.format import CLUSTER_SIZE

pytestmark = pytest.mark.qemu

CBW_TIMEOUT = 5
#: a guest write must finish within this: the cbw timeout plus room for a loaded box
WRITE_BOUND = CBW_TIMEOUT + 10


def pc(require_qemu, tmp: Path, disks: dict[str, Path], *, running: bool = False):
    """A PC with one virtio-blk-pci device per disk (device id = key, drive drive-<id>)."""
    extra: list[str] = [] if running else ["-S"]
    for dev, image in disks.items():
        extra += [
            "-drive",
            f"if=none,id=drive-{dev},file={image},format=raw,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive=drive-{dev},id={dev}",
        ]
    return vm(require_qemu.qemu_system, tmp, {}, machine="pc", extra=tuple(extra))


def graph(machine: Vm, devs=("vd0",)) -> tuple:
    """Everything a backup must leave as it found it: nodes, drives, the devices' drives."""
    return (
        machine.cmd("query-named-block-nodes", flat=True),
        machine.cmd("query-block"),
        [machine.cmd("qom-get", path=f"/machine/peripheral/{d}", property="drive") for d in devs],
    )


def device_write(machine: Vm, dev: str, pattern: int, offset: int, length: int = 4096) -> float:
    """A guest write through device *dev*'s own path; returns how long it took."""
    t0 = time.monotonic()
    machine.mon.settimeout(WRITE_BOUND)  # a write stuck on the writer fails the test
    try:
        machine.hmp(f'qemu-io -d {dev}/virtio-backend "write -P {pattern:#x} {offset} {length}"')
    except TimeoutError:
        raise AssertionError(
            f"a guest write at {offset} waited more than {WRITE_BOUND} s"
        ) from None
    finally:
        machine.mon.settimeout(None)
    return time.monotonic() - t0


def write_results(machine: Vm) -> tuple[int, list[str]]:
    """(writes that succeeded, lines of failed writes) from qemu-io's output on QEMU's stdout."""
    text = machine.stdout_path.read_text(errors="replace")
    ok = sum(1 for line in text.splitlines() if line.startswith("wrote "))
    failed = [line for line in text.splitlines() if "failed" in line]
    return ok, failed


def fleece_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def guest_writes(machine: Vm, size: int, count: int, pattern: int) -> tuple[list[int], float]:
    """*count* 4 KiB writes into distinct clusters of the second half (not yet copied by a
    throttled job); returns their offsets and the longest one took."""
    offsets = [size - (i + 1) * CLUSTER_SIZE for i in range(count)]
    longest = max(device_write(machine, "vd0", pattern, off) for off in offsets)
    return offsets, longest


def assert_landed(image: Path, offsets: list[int], pattern: int) -> None:
    with open(image, "rb") as f:
        for off in offsets:
            f.seek(off)
            assert f.read(4096) == bytes([pattern]) * 4096, f"guest write at {off} lost"


# --- refusals (no QEMU needed: checked before connecting) ------------------------------------


def _refused(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        vmafs_cmd("backup", "--qmp", tmp_path / "none.qmp", "-o", tmp_path / "x.vma", *args, "d0"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "x.vma").exists()
    return one_line_error(proc.stderr)


def test_missing_fleecing_dir_is_refused(tmp_path):
    line = _refused(tmp_path, "--fleecing", str(tmp_path / "nope"))
    assert "no such directory" in line and "mkdir -p" in line, line


def test_fleecing_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    assert "not a directory" in _refused(tmp_path, "--fleecing", str(tmp_path / "f"))


def test_read_only_fleecing_dir_is_refused(tmp_path):
    with small_tmpfs(tmp_path / "ro", options="ro") as ro:
        line = _refused(tmp_path, "--fleecing", str(ro))
    assert "cannot create files there" in line and "Read-only file system" in line, line


def test_fleecing_dir_without_room_for_the_reserve_is_refused(tmp_path):
    with small_tmpfs(tmp_path / "tiny", "1m") as tiny:
        line = _refused(tmp_path, "--fleecing", str(tiny), "--fleecing-reserve", "2M")
        assert fleece_dirs(tiny) == []
    assert "less than the reserve of 2.0 MiB" in line and "--fleecing-reserve" in line, line


@pytest.mark.parametrize("value", ["0", "-1", "x", "3601"])
def test_bad_cbw_timeout_is_a_usage_error(tmp_path, value):
    proc = subprocess.run(
        vmafs_cmd("backup", "--qmp", "q", "-o", "x", "--cbw-timeout", value, "d0"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and "bad timeout" in proc.stderr, proc.stderr


def test_fleecing_options_without_fleecing_are_refused(tmp_path):
    assert "add --fleecing DIR" in _refused(tmp_path, "--cbw-timeout", "3")
    assert "add --fleecing DIR" in _refused(tmp_path, "--fleecing-reserve", "1G")


def test_drive_without_a_guest_device_is_refused(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=40)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive0": (src, "raw")}) as machine:
        before = machine.cmd("query-named-block-nodes", flat=True)
        rc, _, err = finish(
            start_backup(
                "--qmp", machine.qmp_path, "-o", tmp_path / "x.vma", "--fleecing", fleece, "drive0"
            )
        )
        assert machine.cmd("query-named-block-nodes", flat=True) == before
    assert rc == 1
    assert "not attached to a guest device" in one_line_error(err)
    assert fleece_dirs(fleece) == [] and leftovers(tmp_path) == []


# --- success: point in time, graph restored ----------------------------------------------


@pytest.mark.slow
def test_point_in_time_and_the_graph_restored(require_qemu, tmp_path):
    """Guest writes after the start do not leak into the archive, land on the disk,
    and afterwards the block graph is exactly what it was; the images are gone."""
    size = 16 * MiB
    src = random_raw(tmp_path / "src.raw", size, seed=41)
    original = file_sha256(src)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    out = tmp_path / "f.vma"
    with pc(require_qemu, tmp_path, {"vd0": src}) as machine:
        before = graph(machine)
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", out, "-v", "--progress", "--speed", "4M",
            "--fleecing", fleece, "--cbw-timeout", str(CBW_TIMEOUT), "vd0",
        )  # fmt: skip
        try:
            machine.wait_job_running()
            during = graph(machine)
            assert during != before  # the filter is in the guest's path
            assert any(n["drv"] == "copy-before-write" for n in during[0])
            assert during[1][0]["device"] == "drive-vd0"  # the same BlockBackend
            assert len(fleece_dirs(fleece)) == 1
            offsets, _ = guest_writes(machine, size, 16, 0xAB)
            assert machine.our_jobs()[0]["offset"] < size // 2
        finally:
            rc, _, err = finish(proc)
        assert rc == 0, err
        assert graph(machine) == before
        assert machine.our_nodes() == []
    assert "fleecing images peaked at" in err
    # the progress line shows the images' size: metadata at first, then 16 clusters more
    sizes = re.findall(r"fleecing ([0-9.]+) KiB|fleecing ([0-9.]+) MiB", err)
    assert sizes, err
    peak = re.search(r"fleecing images peaked at ([0-9.]+) (KiB|MiB)", err)
    assert float(peak[1]) * (1024 if peak[2] == "MiB" else 1) >= 16 * 64, err
    ok, failed = write_results(machine)
    assert failed == [] and ok == 16
    assert_landed(src, offsets, 0xAB)
    assert vmafs_verify(out).returncode == 0
    assert archive_disks(out) == {"drive-vd0": (size, original)}
    assert fleece_dirs(fleece) == []


@pytest.mark.slow
def test_two_drives_of_a_running_vm(require_qemu, tmp_path):
    """A running VM is paused only while the filters go in, and runs afterwards;
    both drives back up and the graph comes back."""
    a = random_raw(tmp_path / "a.raw", 4 * MiB, seed=42)
    b = random_raw(tmp_path / "b.raw", 2 * MiB + 4096, seed=43)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    out = tmp_path / "two.vma"
    with pc(require_qemu, tmp_path, {"vd0": a, "vd1": b}, running=True) as machine:
        assert machine.cmd("query-status")["running"]
        # SeaBIOS negotiates virtio features without a write cache shortly after
        # start, which turns the drives' writeback off: let it, before comparing
        deadline = time.monotonic() + TIMEOUT
        while any(b["inserted"]["cache"]["writeback"] for b in machine.cmd("query-block")):
            assert time.monotonic() < deadline, "the firmware never set up the disks"
            time.sleep(0.05)
        before = graph(machine, ("vd0", "vd1"))
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", out, "--fleecing", fleece, "vd0", "vd1")
        )
        assert rc == 0, err
        assert graph(machine, ("vd0", "vd1")) == before
        assert machine.cmd("query-status")["running"]
        events = [e["event"] for e in machine.mon.get_events()]
        assert "STOP" in events and "RESUME" in events, events
    assert archive_disks(out) == {
        "drive-vd0": (4 * MiB, file_sha256(a)),
        "drive-vd1": (2 * MiB + 4096, file_sha256(b)),
    }
    assert fleece_dirs(fleece) == []


# --- the guarantee: a stopped, killed or full writer never touches the guest -------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigstop", "sigkill", "enospc"])
def test_guest_writes_never_fail_nor_wait(require_qemu, tmp_path, fault):
    size = 16 * MiB
    src = random_raw(tmp_path / "src.raw", size, seed=44)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    with small_tmpfs(tmp_path / "out", "2m" if fault == "enospc" else "64m") as outdir:
        out = outdir / "fault.vma"
        with pc(require_qemu, tmp_path, {"vd0": src}) as machine:
            before = graph(machine)
            proc = start_backup(
                "--qmp", machine.qmp_path, "-o", out, "--speed", "1M",
                "--fleecing", fleece, "--cbw-timeout", str(CBW_TIMEOUT), "vd0",
            )  # fmt: skip
            try:
                machine.wait_job_running(min_offset=1)
                if fault == "sigstop":
                    proc.send_signal(signal.SIGSTOP)
                elif fault == "sigkill":
                    proc.kill()
                offsets, longest = guest_writes(machine, size, 24, 0xEE)
                if fault == "sigstop":
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)
            finally:
                rc, _, err = finish(proc)
            ok, failed = write_results(machine)
            assert failed == [] and ok == len(offsets), failed
            assert longest < WRITE_BOUND, f"a guest write waited {longest:.1f} s"
            if fault == "sigkill":
                assert rc == -signal.SIGKILL
                # nothing could clean up: the filter stays in the guest's path (guest
                # writes still work, see above) until the next backup removes it
                machine.wait_event("BLOCK_JOB_COMPLETED")
                assert graph(machine) != before
                rc2, _, err2 = finish(
                    start_backup(
                        "--qmp",
                        machine.qmp_path,
                        "-o",
                        tmp_path / "next.vma",
                        "--fleecing",
                        fleece,
                        "vd0",
                    )  # fmt: skip
                )
                assert rc2 == 0, err2
                assert "removed fleecing filter" in err2 and "left in front of" in err2, err2
            else:
                assert rc == (143 if fault == "sigstop" else 1), err
                line = one_line_error(err)
                want = "interrupted by SIGTERM" if fault == "sigstop" else "No space left"
                assert want in line, line
            assert graph(machine) == before
            assert machine.our_jobs() == [] and machine.our_nodes() == []
        assert not out.exists()
        if fault != "sigkill":
            assert leftovers(outdir) == []  # a SIGKILLed vmafs leaves its temp file (docs)
    assert fleece_dirs(fleece) == []
    assert_landed(src, offsets, 0xEE)


@pytest.mark.slow
def test_sigint_restores_the_graph(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 8 * MiB, seed=45)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    with pc(require_qemu, tmp_path, {"vd0": src}) as machine:
        before = graph(machine)
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", tmp_path / "i.vma", "--speed", "1M",
            "--fleecing", fleece, "vd0",
        )  # fmt: skip
        try:
            machine.wait_job_running()
            proc.send_signal(signal.SIGINT)
        finally:
            rc, _, err = finish(proc)
        assert rc == 130 and "interrupted by SIGINT" in one_line_error(err)
        assert graph(machine) == before
    assert fleece_dirs(fleece) == [] and leftovers(tmp_path) == []


def test_fleecing_dir_full_drops_the_snapshot_not_the_guest_write(require_qemu, tmp_path):
    """The fleecing image cannot take the old data: break-snapshot lets the guest write
    through and the backup fails with a line that says why."""
    size = 16 * MiB
    src = random_raw(tmp_path / "src.raw", size, seed=46)
    with small_tmpfs(tmp_path / "fleece", "1m") as fleece:
        with pc(require_qemu, tmp_path, {"vd0": src}) as machine:
            before = graph(machine)
            proc = start_backup(
                "--qmp", machine.qmp_path, "-o", tmp_path / "b.vma", "--speed", "1M",
                "--fleecing", fleece, "--fleecing-reserve", "512K", "vd0",
            )  # fmt: skip
            try:
                machine.wait_job_running()
                offsets, _ = guest_writes(machine, size, 32, 0x77)  # 2 MiB of old data
            finally:
                rc, _, err = finish(proc)
            assert graph(machine) == before
        assert fleece_dirs(fleece) == []
    assert rc == 1
    line = one_line_error(err)
    assert "the fleecing snapshot was dropped" in line and "guest's writes went on" in line, line
    ok, failed = write_results(machine)
    assert failed == [] and ok == 32
    assert_landed(src, offsets, 0x77)
    assert leftovers(tmp_path) == []


def test_qemu_killed_leaves_no_fleecing_image(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 8 * MiB, seed=47)
    fleece = tmp_path / "fleece"
    fleece.mkdir()
    with pc(require_qemu, tmp_path, {"vd0": src}) as machine:
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", tmp_path / "k.vma", "--speed", "1M",
            "--fleecing", fleece, "vd0",
        )  # fmt: skip
        try:
            machine.wait_job_running(min_offset=1)
            assert len(fleece_dirs(fleece)) == 1
            machine.kill()
        finally:
            rc, _, err = finish(proc)
    assert rc == 1 and "QEMU went away" in one_line_error(err)
    assert fleece_dirs(fleece) == [] and leftovers(tmp_path) == []
