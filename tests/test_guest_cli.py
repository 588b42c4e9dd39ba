"""``vmafs ls``, ``cat`` and ``get`` from the command line, on the guest-disk fixtures.

The kernel engine runs every case (fast); the appliance engine runs one command
per engine-specific path (each is a launch: ~15 s without KVM).  Errors are one
line ``vmafs: error: ...`` naming the volume and path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from conftest import vmafs_cmd
from guesttree import copy_archive, expected, tree_of_dir, volumes

NOTES_SHA = "3ba0445b3002d12b26f83006ba67a77cb435ccdcb59df4baf00899f5378364d8"


def _vmafs(*args, check=True, env=None):
    proc = subprocess.run(vmafs_cmd(*args), capture_output=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def _error_line(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("vmafs: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def pve(tmp_path_factory):
    return copy_archive("pve-gpt.vma.zst", tmp_path_factory.mktemp("pve"))


@pytest.fixture(scope="module")
def ntfs(tmp_path_factory):
    return copy_archive("ntfs-mbr.vma", tmp_path_factory.mktemp("ntfs"))


@pytest.fixture
def kernel(require_fuse, require_loop):
    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    return ["--engine", "kernel"]


def test_ls(pve, kernel):
    out = _vmafs("ls", *kernel, pve, "scsi0/pve/root:/home/alice").stdout.decode()
    assert out.splitlines() == ["file with spaces.txt", "notes.txt"]


def test_ls_long_shows_symlink_targets(pve, kernel):
    out = _vmafs("ls", "-l", *kernel, pve, "drive-scsi0/pve/root:/root").stdout.decode()
    (line,) = out.splitlines()
    assert line.startswith("lrwxrwxrwx") and line.endswith("notes-link -> /home/alice/notes.txt")


def test_ls_recursive_json_lists_every_file(ntfs, kernel):
    out = _vmafs("ls", "-R", "--json", *kernel, ntfs, "sata0/p1:/").stdout
    records = json.loads(out)
    want = expected(volumes("ntfs-mbr.vma")[0])
    assert {r["path"]: r["type"] for r in records} == {p: r["type"] for p, r in want.items()}
    report = next(r for r in records if r["path"].endswith("report.txt"))
    assert report["size"] == 19 and report["volume"] == "drive-sata0/p1"


def test_cat_follows_symlinks_inside_the_guest(pve, kernel):
    out = _vmafs("cat", *kernel, pve, "scsi0/pve/root:/root/notes-link").stdout
    assert hashlib.sha256(out).hexdigest() == NOTES_SHA


def test_get_a_tree_then_refuse_then_force(pve, kernel, tmp_path):
    proc = _vmafs("get", "--progress", *kernel, pve, "scsi0/pve/data:/", tmp_path)
    assert "copying drive-scsi0/pve/data:/" in proc.stderr.decode()  # the bar, when asked
    data = next(v for v in volumes("pve-gpt.vma.zst") if v["name"].endswith("data"))
    assert tree_of_dir(tmp_path) == expected(data)
    err = _error_line(
        _vmafs("get", *kernel, pve, "scsi0/pve/data:/data.txt", tmp_path, check=False)
    )
    assert "data.txt exists; use --force" in err
    _vmafs("get", "--force", *kernel, pve, "scsi0/pve/data:/data.txt", tmp_path)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("scsi0/p1", "expected VOLUME:/PATH"),
        ("scsi0/p9:/", "no volume 'scsi0/p9'"),
        ("scsi0/p2:/", "drive-scsi0/p2: an LVM physical volume"),
        ("scsi0/p1:/nope", "drive-scsi0/p1:/nope: No such file or directory"),
        ("scsi0/p1:/grub", "drive-scsi0/p1:/grub: a directory"),
    ],
)
def test_cat_errors_are_one_line(pve, kernel, target, words):
    assert words in _error_line(_vmafs("cat", *kernel, pve, target, check=False))


def test_without_libguestfs_the_error_says_how_to_install_it(pve):
    env = dict(os.environ, VMAFS_GUESTFS_PYTHON="/nonexistent/python3")
    err = _error_line(_vmafs("ls", pve, "scsi0/p1:/", check=False, env=env))
    assert "apt-get install --no-install-recommends libguestfs-tools python3-guestfs" in err
    assert "--engine kernel" in err


@pytest.mark.slow
def test_appliance_is_the_default_engine_and_reads_unicode_names(
    ntfs, require_fuse, require_guestfs, tmp_path
):
    _vmafs("get", ntfs, "sata0/p1:/Users/Bob/Documents", tmp_path)
    want = expected(volumes("ntfs-mbr.vma")[0])
    got = {"/Users/Bob" + p: r for p, r in tree_of_dir(tmp_path).items()}
    assert got == {p: r for p, r in want.items() if p.startswith("/Users/Bob/Documents")}


def _fuse_mount_of(archive) -> str | None:
    """The mount point of the session's private FUSE mount of *archive* (its source)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[1] == str(archive):
                return left.split()[4]
    return None


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_mid_copy_takes_everything_down(pve, kernel, signame, tmp_path):
    """`vmafs cat` blocked writing a 1 MiB file into a pipe nobody reads, with the
    archive, the loop device and the guest filesystem all mounted: a stop signal
    unwinds the session, and nothing is left mounted or attached."""
    import signal
    import time

    from vmafs.mount import loop_devices_on, mount_table

    archive = tmp_path / "pve.vma.zst"
    os.link(pve, archive)  # a name of its own: its FUSE mount is this test's
    proc = subprocess.Popen(
        vmafs_cmd("cat", *kernel, str(archive), "scsi0/p1:/vmlinuz-fake"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        mp = None
        while mp is None or not any(
            p.startswith(os.path.dirname(mp) + "/fs") for p in mount_table()
        ):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the guest filesystem never came up"
            time.sleep(0.05)
            mp = mp or _fuse_mount_of(archive)
        workdir = os.path.dirname(mp)
        assert loop_devices_on(workdir)
        time.sleep(0.3)  # cat is now blocked on the full pipe
        proc.send_signal(getattr(signal, signame))
        # The signal alone unwinds it: the teardown is done while stdout is still
        # full and unread (closed only afterwards, so that its last flush ends).
        while os.path.exists(workdir):
            assert time.monotonic() < deadline, "no teardown after the signal"
            time.sleep(0.05)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) in (1, 130, 141), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any(p.startswith(workdir) for p in mount_table())
    assert not loop_devices_on(workdir)
    assert not os.path.exists(workdir)
