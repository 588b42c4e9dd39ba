"""Edge cases of the command line found by an audit: each test failed before its fix.

Mount logfile paths, symlinked and non-empty mount points, signals during
extract, library warnings in the CLI's format, usage errors after the
command, empty extract arguments, a failing stdout, non-UTF-8 archive paths.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, is_mounted, vmafs_cmd
from test_cli_support import assert_one_line_error, build, patterned_disk, run_cli
from test_mount_support import (
    GUARD,
    cleanup,
    mount_helper_cmd,
    mounted,
    run_vmafs,
    wait_until,
)

from vmafs import sidecar
from vmafs.format import CLUSTER_SIZE

TWO_DISKS = FIXTURES_DIR / "two-disks.vma"
TWO_DISKS_FILES = ["disk-drive-scsi0.raw", "disk-drive-scsi1.raw", "qemu-server.conf"]


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def _one_line(proc: subprocess.CompletedProcess, prog: str = "vmafs") -> str:
    assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


# --- 1. -o logfile=RELATIVE ------------------------------------------------------------


def test_relative_logfile_is_taken_from_the_callers_directory(tmp_path, mnt, require_fuse):
    # The filesystem process changes to /: a relative logfile used to fail
    # ('rel.log': traceback, "No such file or directory: ''") or land under /.
    archive = tmp_path / "two-disks.vma"
    shutil.copyfile(TWO_DISKS, archive)
    for option, expected in (
        ("logfile=rel.log", tmp_path / "rel.log"),
        ("logfile=logs/sub.log", tmp_path / "logs" / "sub.log"),
    ):
        try:
            proc = subprocess.run(
                vmafs_cmd("mount", "-o", option, "two-disks.vma", "mnt"),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=GUARD,
            )
            assert proc.returncode == 0, proc.stderr
            assert proc.stderr == ""
            assert is_mounted(mnt)
            wait_until(
                lambda p=expected: p.exists() and "mounted on" in p.read_text(), 20, "the log"
            )
        finally:
            cleanup(archive, mnt)


def test_unusable_logfile_is_one_line_before_detaching(tmp_path, mnt, require_fuse):
    afile = tmp_path / "file"
    afile.write_text("x")
    try:
        proc = run_vmafs("mount", "-o", f"logfile={afile}/x.log", TWO_DISKS, mnt)
        assert proc.returncode == 1
        assert "not a directory" in _one_line(proc)
        assert not is_mounted(mnt)
    finally:
        cleanup(TWO_DISKS, mnt)


# --- 2. symlinked mount points ---------------------------------------------------------


def test_symlinked_mountpoint_is_busy_and_unmounts(tmp_path, mnt, require_fuse):
    link = tmp_path / "link"
    link.symlink_to(mnt)
    try:
        proc = run_vmafs("mount", TWO_DISKS, link)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt)
        for target in (link, mnt):  # a second mount, through either name, is refused
            proc = run_vmafs("mount", TWO_DISKS, target)
            assert proc.returncode == 1
            assert "busy" in _one_line(proc)
        proc = run_vmafs("umount", link)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
    finally:
        cleanup(TWO_DISKS, mnt)


# --- 3. signals during extract ----------------------------------------------------------

_WAIT_IN_SECOND_WRITE = """
import os, sys, time
import vmafs.commands.extract as ex
from vmafs.cli import main

real = ex.write_sparse
calls = []

def write_then_wait(fd, buf, offset):
    n = real(fd, buf, offset)
    calls.append(n)
    if len(calls) == 2:  # the first disk is written, the second is being written
        os.write(int(sys.argv[1]), b"x")
        time.sleep(60)  # the test's signal arrives here
    return n

ex.write_sparse = write_then_wait
sys.exit(main(["extract", "--no-progress", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT", "SIGTERM"])
def test_signal_from_outside_removes_partial_files(tmp_path, sig):
    # SIGHUP (ssh gone) and SIGQUIT used to kill extract with its partial files left.
    disks = {"drive-scsi0": patterned_disk(2 * CLUSTER_SIZE, 1), "drive-scsi1": os.urandom(1 << 20)}
    b = build(tmp_path / "a.vma", disks)
    out = tmp_path / "out"
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAIT_IN_SECOND_WRITE, str(w), str(b.path), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(w,),
    )
    os.close(w)
    try:
        assert os.read(r, 1) == b"x", proc.communicate(timeout=GUARD)
        assert sorted(os.listdir(out)) == ["disk-drive-scsi0.raw", "disk-drive-scsi1.raw"]
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=GUARD)
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, stderr
    assert stderr == (
        f"vmafs: error: extract: {sig}: stopped; the files written so far were removed\n"
    )
    assert stdout == ""
    assert not out.exists()


# --- 4. library warnings in the CLI's format -----------------------------------------------


def _corrupt_side_index(tmp_path: Path) -> Path:
    """A copy of a compressed fixture whose side index fails its checksum."""
    archive = tmp_path / "two-disks.vma.zst"
    if not archive.exists():
        shutil.copyfile(FIXTURES_DIR / "two-disks.vma.zst", archive)
        proc = run_cli("index", archive)
        assert proc.returncode == 0, proc.stderr
    side = Path(sidecar.cache_path(str(archive)))  # where the rebuild writes it again
    blob = bytearray(side.read_bytes())
    blob[len(blob) // 2] ^= 1
    side.write_bytes(bytes(blob))
    return archive


def test_library_warning_is_a_vmafs_warning_line(tmp_path):
    archive = _corrupt_side_index(tmp_path)
    proc = run_cli("list", "--json", archive)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmafs: warning: "), proc.stderr
    assert "not used, rebuilding" in lines[0]
    # --debug shows the informational messages too, in the same format
    _corrupt_side_index(tmp_path)
    proc = run_cli("--debug", "list", "--json", archive)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("vmafs: ") for line in proc.stderr.splitlines()), proc.stderr
    assert "vmafs: info: " in proc.stderr and "side index saved" in proc.stderr


def test_error_records_are_one_error_line(capsys):
    from vmafs.common.console import stderr_logging

    root = logging.getLogger()
    before = list(root.handlers), root.level
    with stderr_logging():
        logging.getLogger("vmafs.test").error("bad\nthing")
        logging.getLogger("vmafs.test").info("not shown")
        try:
            raise ValueError("x")
        except ValueError:
            logging.getLogger("vmafs.test").exception("failed")
    assert capsys.readouterr().err == "vmafs: error: bad thing\nvmafs: error: failed\n"
    assert (list(root.handlers), root.level) == before


def test_mount_logging_coexists_with_the_cli_handler(tmp_path, mnt, require_fuse):
    # The warning comes while the archive is opened, before the mount sets up
    # its own logging (-f: "vmafs: LEVEL: ..." on stderr); each line once.
    archive = _corrupt_side_index(tmp_path)
    proc = subprocess.Popen(
        vmafs_cmd("mount", "-f", archive, mnt), stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "the mount")
        assert is_mounted(mnt)
    finally:
        cleanup(archive, mnt)
    _, stderr = proc.communicate(timeout=GUARD)
    lines = stderr.splitlines()
    assert proc.returncode == 0, stderr
    assert lines[0].startswith("vmafs: warning: ") and "not used, rebuilding" in lines[0], stderr
    assert sum("mounted on" in line for line in lines) == 1, stderr
    assert all(line.startswith("vmafs: ") for line in lines), stderr


# --- 5. unknown option after the command -------------------------------------------------


def test_unknown_option_after_command_points_at_its_help(tmp_path):
    line = assert_one_line_error(run_cli("verify", "--bogus", "x"), status=2)
    assert line == (
        "vmafs: error: verify: unrecognized arguments: --bogus (see 'vmafs verify --help')"
    )
    line = assert_one_line_error(run_cli("extract", TWO_DISKS, tmp_path / "o", "--nope"), 2)
    assert "extract: unrecognized arguments: --nope" in line
    assert "(see 'vmafs extract --help')" in line
    assert not (tmp_path / "o").exists()
    # before the command word it is the top level's
    line = assert_one_line_error(run_cli("--bogus", "verify", "x"), status=2)
    assert line == "vmafs: error: unrecognized arguments: --bogus (see 'vmafs --help')"


# --- 6. non-empty mount points ------------------------------------------------------------


def test_nonempty_mountpoint_refused_unless_asked(mnt, require_fuse):
    (mnt / "precious.txt").write_text("keep me\n")
    try:
        proc = run_vmafs("mount", TWO_DISKS, mnt)
        assert proc.returncode == 1
        err = _one_line(proc)
        assert "not empty" in err and "-o nonempty" in err
        assert not is_mounted(mnt)
        proc = subprocess.run(
            mount_helper_cmd(TWO_DISKS, mnt, "-f"), capture_output=True, text=True, timeout=GUARD
        )
        assert proc.returncode == 1
        assert "not empty" in _one_line(proc, "mount.vmafs")
        with mounted(TWO_DISKS, mnt, "nonempty"):
            assert sorted(os.listdir(mnt))[:3] == TWO_DISKS_FILES
        assert (mnt / "precious.txt").read_text() == "keep me\n"
    finally:
        cleanup(TWO_DISKS, mnt)


# --- 7. empty extract arguments -------------------------------------------------------------


def test_empty_drive_name_is_a_usage_error(tmp_path):
    out = tmp_path / "out"
    for drives in ("", "drive-scsi0,", "drive-scsi0,,drive-scsi1", ","):
        line = assert_one_line_error(run_cli("extract", TWO_DISKS, out, "-d", drives), 2)
        assert "extract: argument -d/--drives: empty drive name" in line, drives
        assert "(see 'vmafs extract --help')" in line
        assert not out.exists()


def test_empty_or_unreachable_target_directory(tmp_path):
    line = assert_one_line_error(run_cli("extract", TWO_DISKS, ""), 2)
    assert "extract: argument DIR: the target directory name is empty" in line
    missing = tmp_path / "nowhere" / "out"
    line = assert_one_line_error(run_cli("extract", TWO_DISKS, missing))
    assert line == (
        f"vmafs: error: cannot create the target directory {missing}: "
        f"No such file or directory (its parent directory {missing.parent} does not exist)"
    )


# --- 8. stdout fails after a complete extraction ----------------------------------------------


def test_verbose_to_full_stdout_says_so(tmp_path):
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            vmafs_cmd("extract", "-v", TWO_DISKS, out),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=GUARD,
        )
    line = assert_one_line_error(proc)
    assert line == (
        "vmafs: error: writing to stdout: No space left on device "
        f"(the extraction into {out} is complete)"
    )
    assert sorted(os.listdir(out)) == [*TWO_DISKS_FILES, "qemu-server.fw"]
    assert (out / "disk-drive-scsi0.raw").stat().st_size == 5242880


def test_other_commands_to_full_stdout_say_stdout(tmp_path):
    for argv in (
        ("list", TWO_DISKS),
        ("list", "--json", TWO_DISKS),
        ("config", TWO_DISKS),
        ("verify", "-v", TWO_DISKS),
    ):
        with open("/dev/full", "w") as full:
            proc = subprocess.run(
                vmafs_cmd(*argv), stdout=full, stderr=subprocess.PIPE, text=True, timeout=GUARD
            )
        line = assert_one_line_error(proc)
        assert line == "vmafs: error: writing to stdout: No space left on device", argv


# --- 9. list --json of a path that is not UTF-8 ------------------------------------------------


@pytest.mark.parametrize("env", [{"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "ascii"}])
def test_json_of_non_utf8_path_is_valid_utf8(tmp_path, env):
    raw = os.fsencode(tmp_path) + b"/b\xffd-\xc3\xa9.vma"  # an invalid byte, then a valid e-acute
    shutil.copyfile(TWO_DISKS, raw)
    proc = subprocess.run(
        vmafs_cmd("list", "--json", os.fsdecode(raw)),
        capture_output=True,
        timeout=GUARD,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode("utf-8")  # strict: raises on invalid UTF-8
    assert "\\udcff" in text and "-\u00e9.vma" in text  # valid text stays as it is
    assert os.fsencode(json.loads(text)["archive"]) == raw
