"""Mount lifecycle: daemon readiness, signals, errors before detaching, umount, mount.vmafs."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import is_mounted, loop_device, unmount, vmafs_cmd
from test_mount_support import (
    GUARD,
    cleanup,
    holders,
    kill_holders,
    mount_helper_cmd,
    mounted,
    run_vmafs,
    run_vmafs_many,
    sha256_file,
    wait_until,
)
from vmafactory import hostile_cases

pytestmark = pytest.mark.fuse


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def two_disks(fixtures_dir) -> Path:
    return fixtures_dir / "two-disks.vma"


def _one_line_error(proc: subprocess.CompletedProcess, prog: str = "vmafs") -> str:
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def _mount_option_field(mnt: Path) -> tuple[str, str, str]:
    """(per-mount options, source, super options) of *mnt* from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                sep = fields.index("-")
                return fields[5], fields[sep + 2], fields[sep + 3]
    raise AssertionError(f"{mnt} not mounted")


# --- daemon mode ----------------------------------------------------------------------------


def _readahead_kb(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        return int(f.read())


def _default_readahead_kb() -> int:
    """1024, or 960 where spliced replies cap requests (test_mount_segments checks that)."""
    from types import SimpleNamespace

    from vmafs.fs import READ_SEGMENTS_SUPPORTED, SplicePipe
    from vmafs.mount import DEFAULT_READAHEAD_KB
    from vmafs.mount.mounting import whole_requests

    pipe = SplicePipe.probe() if READ_SEGMENTS_SUPPORTED else None
    return whole_requests(
        DEFAULT_READAHEAD_KB, SimpleNamespace(max_pages=pipe.max_pages if pipe else 0)
    )


@pytest.mark.parametrize(("option", "expected"), [(None, None), ("readahead=256", 256)])
def test_readahead_of_the_mount(two_disks, mnt, option, expected, require_fuse, manifest):
    """The mount's readahead is raised (root) so buffered reads arrive as big requests."""
    args = ("-o", option) if option else ()
    expected = expected or _default_readahead_kb()
    try:
        proc = run_vmafs("mount", two_disks, mnt, *args)
        assert proc.returncode == 0, proc.stderr
        assert _readahead_kb(mnt) == expected
        d = manifest(two_disks)["devices"][0]
        assert sha256_file(mnt / f"disk-{d['name']}.raw") == d["sha256"]
    finally:
        cleanup(two_disks, mnt)


def test_readahead_option_checked(two_disks, mnt, require_fuse):
    proc = run_vmafs("mount", two_disks, mnt, "-o", "readahead=lots")
    assert proc.returncode == 2 and "readahead=lots" in _one_line_error(proc)
    assert not is_mounted(mnt)


def test_daemon_returns_when_ready_and_umount(two_disks, mnt, require_fuse, manifest):
    try:
        proc = run_vmafs("mount", two_disks, mnt)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
        # Ready means ready: no waiting before the first access.
        assert is_mounted(mnt)
        assert sha256_file(mnt / "qemu-server.conf") == manifest(two_disks)["configs"][0]["sha256"]
        (pid,) = holders(two_disks)
        # Detached: its own session, not a child of the command that returned.
        assert os.getsid(pid) != os.getsid(0)
        proc = run_vmafs("umount", mnt)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert not is_mounted(mnt)
        wait_until(lambda: not holders(two_disks), 20, "the filesystem process to exit")
        # Unmounted twice: a clear error.
        assert "not mounted" in _one_line_error(run_vmafs("umount", mnt))
    finally:
        cleanup(two_disks, mnt)


def test_fusermount_u_works_too(two_disks, mnt, require_fuse):
    with mounted(two_disks, mnt):
        (pid,) = holders(two_disks)
        subprocess.run(["fusermount3", "-u", mnt], check=True, timeout=GUARD)
        assert not is_mounted(mnt)
        wait_until(lambda: not holders(two_disks), 20, "the filesystem process to exit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_daemon(two_disks, mnt, sig, require_fuse):
    with mounted(two_disks, mnt):
        (pid,) = holders(two_disks)
        os.kill(pid, sig)
        wait_until(lambda: not is_mounted(mnt), 20, "the mount to go away")
        wait_until(lambda: not holders(two_disks), 20, "the filesystem process to exit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_signal_unmounts_cleanly(two_disks, mnt, sig, require_fuse):
    proc = subprocess.Popen(
        vmafs_cmd("mount", "-f", two_disks, mnt),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "the mount")
        assert proc.poll() is None
        assert os.stat(mnt / "disk-drive-scsi1.raw").st_size == 3149824
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=GUARD)
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)
        assert "unmounting" in err and "unmounted" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup(two_disks, mnt)


def _wait_for_log(path: Path, text: str, what: str) -> str:
    wait_until(lambda: path.exists() and text in path.read_text(errors="replace"), 20, what)
    return path.read_text(errors="replace")


def test_sighup_keeps_the_mount_and_a_rotated_log_is_reopened(
    two_disks, mnt, tmp_path, require_fuse
):
    log = tmp_path / "vmafs.log"
    with mounted(two_disks, mnt, f"logfile={log}"):
        (pid,) = holders(two_disks)
        log.rename(tmp_path / "vmafs.log.1")  # what logrotate does first
        os.kill(pid, signal.SIGHUP)
        text = _wait_for_log(log, "SIGHUP", "the SIGHUP line in the new log file")
        assert "stays mounted" in text
        assert is_mounted(mnt)
        assert os.stat(mnt / "disk-drive-scsi1.raw").st_size == 3149824
        assert holders(two_disks) == {pid}


def test_sigusr1_dumps_the_stacks_into_the_log(two_disks, mnt, tmp_path, require_fuse):
    log = tmp_path / "vmafs.log"
    with mounted(two_disks, mnt, f"logfile={log}"):
        (pid,) = holders(two_disks)
        os.kill(pid, signal.SIGUSR1)

        # The dump reaches the log line by line through a forwarding thread: wait
        # for the main thread's frame (it waits in the trio loop's module), not
        # only for the dump's first line.
        def main_frame_logged() -> bool:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            return any("SIGUSR1 stack dump" in x and "serve.py" in x for x in lines)

        wait_until(main_frame_logged, 20, "the main thread's frame in the stack dump")
        assert is_mounted(mnt)
        assert sha256_file(mnt / "qemu-server.conf")


def test_debug_option_turns_on_libfuse_tracing(two_disks, mnt, tmp_path, require_fuse):
    log = tmp_path / "vmafs.log"
    with mounted(two_disks, mnt, "debug", f"logfile={log}"):
        os.stat(mnt / "qemu-server.conf")
        # libfuse's own trace (stderr of the detached process goes to the log file)
        text = _wait_for_log(log, "opcode: LOOKUP", "libfuse's request trace")
        assert "DEBUG" in text  # and vmafs's debug messages
    proc = subprocess.Popen(
        vmafs_cmd("mount", "-f", "-o", "debug", two_disks, mnt),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "the mount")
        os.stat(mnt / "qemu-server.conf")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=GUARD)
        assert "opcode: LOOKUP" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup(two_disks, mnt)


# A SIGTERM between pyfuse3.init (the kernel mount exists) and the loop's
# signal handlers: simulated by sending it from inside pyfuse3.init.
_EARLY_SIGNAL = """
import os, signal, sys
import pyfuse3
real_init = pyfuse3.init
def init(*args):
    real_init(*args)
    os.kill(os.getpid(), signal.SIGTERM)
pyfuse3.init = init
from vmafs.cli import main
sys.exit(main(["mount", "-f", sys.argv[1], sys.argv[2]]))
"""


def test_signal_right_after_the_kernel_mount_leaves_no_dead_mount(two_disks, mnt, require_fuse):
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _EARLY_SIGNAL, str(two_disks), str(mnt)],
            capture_output=True,
            text=True,
            timeout=GUARD,
        )
        assert proc.returncode == 0, proc.stderr
        assert "SIGTERM" in proc.stderr and "unmounted" in proc.stderr
        assert not is_mounted(mnt)
    finally:
        cleanup(two_disks, mnt)


# --- errors are reported before detaching ------------------------------------------------------


def test_bad_archives_refused_before_detaching(mnt, tmp_path, require_fuse):
    """The whole corruption table: one-line error, exit 1, nothing mounted or left running."""
    cases = hostile_cases()
    paths = [case.write(tmp_path / f"{case.name}.vma") for case in cases]
    try:
        results = run_vmafs_many([["mount", p, mnt] for p in paths])
        for case, proc in zip(cases, results, strict=True):
            assert proc.returncode == 1, (case.name, proc.stderr)
            _one_line_error(proc)
            if case.name == "missing-cluster":
                assert "allow_incomplete" in proc.stderr
        assert len(results) == len(cases) > 30
        assert not is_mounted(mnt)
        assert not any(holders(p) for p in paths)
    finally:
        unmount(mnt)
        for p in paths:
            kill_holders(p)


def test_unusable_sources_and_mountpoints(two_disks, mnt, tmp_path, require_fuse):
    not_vma = tmp_path / "notes.txt"
    not_vma.write_text("hello\n" * 1000)
    empty = tmp_path / "empty.vma"
    empty.write_bytes(b"")
    afile = tmp_path / "file"
    afile.write_text("x")
    cases = [
        (("mount", tmp_path / "missing.vma", mnt), 1, "missing.vma"),
        (("mount", not_vma, mnt), 1, ""),
        (("mount", empty, mnt), 1, ""),
        (("mount", two_disks, tmp_path / "nodir"), 1, "nodir"),
        (("mount", two_disks, afile), 1, "not a directory"),
        (("mount", two_disks, mnt, "-o", "rw,bogus"), 2, "unknown mount option 'bogus'"),
        (("mount", two_disks, mnt, "-o", "uid=nosuchuser-xyz"), 2, "no such user"),
        (("umount", mnt), 1, "not mounted"),
        (("umount", "/proc"), 1, "not a vmafs mount (filesystem type proc)"),
    ]
    results = run_vmafs_many([argv for argv, _, _ in cases])
    for (argv, status, text), proc in zip(cases, results, strict=True):
        assert proc.returncode == status, (argv, proc.stderr)
        assert text in _one_line_error(proc), argv
    assert not is_mounted(mnt)


def test_mountpoint_busy_refused(two_disks, mnt, fixtures_dir, require_fuse):
    other = fixtures_dir / "unaligned.vma"
    with mounted(two_disks, mnt):
        proc = run_vmafs("mount", other, mnt)
        assert proc.returncode == 1
        assert "busy" in _one_line_error(proc)
        assert not holders(other)
        assert "disk-drive-scsi0.raw" in os.listdir(mnt)  # the first mount is untouched


@pytest.mark.loop
def test_umount_while_loop_device_attached(fixtures_dir, mnt, require_fuse, require_loop):
    archive = fixtures_dir / "ext4-guest.vma"
    with mounted(archive, mnt):
        with loop_device(mnt / "disk-drive-virtio0.raw") as dev:
            proc = run_vmafs("umount", mnt)
            assert proc.returncode == 1
            err = _one_line_error(proc)
            assert "busy" in err and f"losetup -d {dev}" in err
            assert is_mounted(mnt)
            with open(dev, "rb") as f:  # still served
                assert len(f.read(4096)) == 4096
        proc = run_vmafs("umount", mnt)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.loop
@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_umount_waits_until_the_archive_is_released(
    fixtures_dir, tmp_path, mnt, suffix, require_fuse, require_loop
):
    """Right after a first mount of a compressed archive (the process writes the side
    index once the mount is up), 'vmafs umount' returns only once the process has
    exited: the ext4 filesystem the archive lives on unmounts at once, not 'busy'."""
    image, store = tmp_path / "store.img", tmp_path / "store"
    store.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, timeout=GUARD)
    subprocess.run(["mount", "-o", "loop", image, store], check=True, timeout=GUARD)
    try:
        archive = store / f"ext4-guest.vma{suffix}"
        archive.write_bytes((fixtures_dir / archive.name).read_bytes())
        env = {"VMAFS_CACHE_DIR": str(store / "cache")}  # the side index goes there too
        proc = subprocess.run(
            vmafs_cmd("mount", archive, mnt),
            capture_output=True,
            text=True,
            timeout=GUARD,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stderr
        proc = run_vmafs("umount", mnt)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert not holders(archive)  # at once, no waiting
        done = subprocess.run(["umount", store], capture_output=True, text=True, timeout=GUARD)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(store)
    finally:
        cleanup(tmp_path / "none", mnt)
        unmount(store, fuse=False)


def test_umount_removes_the_lock_file(two_disks, mnt, require_fuse):
    """The process's lock file goes once 'vmafs umount' has seen it exit (a 'vmafs
    get' mounts on a new temporary directory each time: they would pile up)."""
    from vmafs.mount.running import lock_path

    with mounted(two_disks, mnt):
        path = lock_path(os.path.realpath(mnt))
        assert os.path.exists(path)
        proc = run_vmafs("umount", mnt)
        assert (proc.returncode, proc.stderr) == (0, "")
    assert not os.path.exists(path)


def test_a_removed_lock_file_is_not_held(tmp_path, monkeypatch):
    """A holder that locked a file a waiter removed meanwhile starts over on a new
    one, and a waiter removes only the file it locked."""
    from vmafs.mount import running

    monkeypatch.setattr(running, "lock_dir", lambda: str(tmp_path))
    path = running.lock_path("/some/mount")
    old = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # as a waiter holding the old file
    os.unlink(path)  # ... removed between the holder's open and its flock:
    real_flock = running.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the first file the holder opened is the removed one
            os.dup2(old, fd)
        return real_flock(fd, op)

    monkeypatch.setattr(running.fcntl, "flock", flock)
    fd = running.hold("/some/mount")
    monkeypatch.setattr(running.fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2 and running._names(fd, path)
        # A waiter that holds the removed file must not remove the holder's new one.
        assert not running._names(old, path)
    finally:
        os.close(fd)
        os.close(old)
    running.wait_released("/some/mount")  # the holder closed it: gone, and the file too
    assert not os.path.exists(path)


def test_umount_timeout_names_the_process(two_disks, mnt, require_fuse):
    """A process that does not exit after the unmount: the error gives its pid."""
    with mounted(two_disks, mnt):
        (pid,) = holders(two_disks)
        os.kill(pid, signal.SIGSTOP)  # it cannot see the unmount, let alone exit
        try:
            proc = run_vmafs("umount", "--timeout", "0.5", mnt)
            assert proc.returncode == 1
            err = _one_line_error(proc)
            assert f"pid {pid}" in err and f"kill {pid}" in err
            assert not is_mounted(mnt)
        finally:
            os.kill(pid, signal.SIGCONT)


# --- options ------------------------------------------------------------------------------


def test_options_uid_gid_fsname_allow_other(two_disks, require_fuse):
    # A world-traversable mount point, so another user's access is decided by
    # the mount alone (tmp_path lives under a 0700 directory).
    mnt = Path(tempfile.mkdtemp(prefix="vmafs-allow-other-"))
    try:
        os.chmod(mnt, 0o755)
        opts = "allow_other,uid=65534,gid=65533,fsname=my-backup"
        with mounted(two_disks, mnt, opts):
            flags, source, super_opts = _mount_option_field(mnt)
            assert flags.split(",")[0] == "ro"
            assert source == "my-backup"
            assert "allow_other" in super_opts and "default_permissions" in super_opts
            st = os.stat(mnt / "qemu-server.conf")
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65533, 0o400)
            conf = str(mnt / "qemu-server.conf")

            def cat_as(uid: int) -> subprocess.CompletedProcess:
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
                return subprocess.run(
                    [*argv, "cat", conf], capture_output=True, timeout=GUARD, check=False
                )

            assert cat_as(65534).returncode == 0  # the owner given by uid=
            denied = cat_as(12345)  # anyone else: mode 0400 enforced (default_permissions)
            assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    finally:
        cleanup(two_disks, mnt)
        os.rmdir(mnt)


def test_without_allow_other_only_the_owner_gets_in(two_disks, require_fuse):
    mnt = Path(tempfile.mkdtemp(prefix="vmafs-private-"))
    try:
        os.chmod(mnt, 0o755)
        with mounted(two_disks, mnt, "uid=65534"):
            _, _, super_opts = _mount_option_field(mnt)
            assert "allow_other" not in super_opts
            proc = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", mnt],
                capture_output=True,
                timeout=GUARD,
            )
            assert proc.returncode != 0  # FUSE keeps other users out altogether
    finally:
        cleanup(two_disks, mnt)
        os.rmdir(mnt)


# --- mount.vmafs (mount(8) helper convention) ------------------------------------------------


def test_mount_helper(two_disks, mnt, require_fuse, manifest):
    generic = "rw,defaults,noauto,user,_netdev,nofail,x-systemd.automount,uid=4321"
    try:
        proc = subprocess.run(
            mount_helper_cmd(two_disks, mnt, "-n", "-v", "-o", generic),
            capture_output=True,
            text=True,
            timeout=GUARD,
        )
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt)
        flags, _, _ = _mount_option_field(mnt)
        assert flags.split(",")[0] == "ro"  # rw from fstab does not make it writable
        assert os.stat(mnt / "qemu-server.fw").st_uid == 4321
        d = manifest(two_disks)["devices"][1]
        assert sha256_file(mnt / f"disk-{d['name']}.raw") == d["sha256"]
    finally:
        cleanup(two_disks, mnt)

    def helper(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            mount_helper_cmd(*args), capture_output=True, text=True, timeout=GUARD
        )

    # -f (fake): everything checked, nothing mounted.
    assert helper(two_disks, mnt, "-f").returncode == 0
    assert not is_mounted(mnt)
    # Unknown options: refused, or ignored with -s (sloppy).
    proc = helper(two_disks, mnt, "-f", "-o", "frobnicate")
    assert proc.returncode == 2 and "frobnicate" in _one_line_error(proc, "mount.vmafs")
    assert helper(two_disks, mnt, "-f", "-s", "-o", "frobnicate").returncode == 0
    # Errors: one line, non-zero, nothing mounted.
    proc = helper(Path(mnt) / "nope.vma", mnt)
    assert proc.returncode == 1 and "nope.vma" in _one_line_error(proc, "mount.vmafs")
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("name", "threaded"), [("two-disks.vma.zst", True), ("two-disks.vma", False)]
)
def test_compressed_archives_are_served_from_worker_threads(
    fixtures_dir, tmp_path, mnt, name, threaded, require_fuse
):
    """A cold decompression must not hold up the loop: compressed mounts use threads."""
    archive = tmp_path / name
    shutil.copyfile(fixtures_dir / name, archive)
    log = tmp_path / "vmafs.log"
    with mounted(archive, mnt, f"logfile={log}"):
        assert sha256_file(mnt / "qemu-server.conf")
        text = log.read_text()
    assert ("reads run in worker threads" in text) == threaded, text
