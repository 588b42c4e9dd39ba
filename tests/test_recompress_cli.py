"""``vmafs recompress`` as a command: signals, temporary files, option ranges, stdout, errors.

The signal tests run the real command in a subprocess whose stream is held
after its first chunk (``_stream`` wrapped, see PAUSED), so the signal lands
deterministically while the temporary output file exists: no sleeps, no
race against a fast machine.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time

import pytest
from conftest import _unavailable, vmafs_cmd
from test_cli_support import assert_one_line_error, build, patterned_disk, run_cli

from vmafs.format import CLUSTER_SIZE
from vmafs.zstd_seekable import SEEKABLE_MAGIC

#: ``python -c PAUSED recompress ...``: the CLI, holding still after the first chunk
#: of the stream (the temporary file exists then) until a signal ends it.
PAUSED = """
import os, sys, time
import vmafs.writer.recompress as r
from vmafs.cli import main
marker = os.environ["PAUSE_MARKER"]
real = r._stream
def paused(source, on_chunk, progress):
    def first(offset, chunk):
        on_chunk(offset, chunk)
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(300)
    return real(source, first, progress)
r._stream = paused
sys.exit(main(sys.argv[1:]))
"""

WAIT = 60  # seconds to wait for the paused child: a limit, not a measurement


@pytest.fixture
def archive(tmp_path):
    """A small valid archive in its own directory (so OUT's directory starts empty)."""
    src = tmp_path / "in"
    src.mkdir()
    disks = {
        "drive-scsi0": patterned_disk(40 * CLUSTER_SIZE, 1),
        "drive-scsi1": bytes(CLUSTER_SIZE),
    }
    return build(src / "a.vma", disks).path


def _start_paused(archive, out, marker):
    env = dict(os.environ, PAUSE_MARKER=str(marker))
    env.pop("VMAFS_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, "recompress", "--no-progress", str(archive), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out_, err = proc.communicate()
            pytest.fail(f"the paused recompress never paused: {proc.returncode} {err}")
        time.sleep(0.01)
    return proc


def _temp_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_signal_removes_temp_file(tmp_path, archive, sig):
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "o.vma.zst"
    marker = tmp_path / "paused"
    proc = _start_paused(archive, out, marker)
    try:
        assert len(_temp_files(outdir)) == 1  # the stream is being written
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = assert_one_line_error(done, 128 + sig)
    assert line == f"vmafs: error: interrupted by {sig.name}; {out} was not created"
    assert stdout == ""
    assert os.listdir(outdir) == []
    # and nothing blocks the next run
    assert run_cli("recompress", archive, out).returncode == 0
    assert run_cli("verify", "--data", out).returncode == 0


def test_killed_run_leaves_a_temp_file_that_blocks_nothing(tmp_path, archive):
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "o.vma.zst"
    proc = _start_paused(archive, out, tmp_path / "paused")
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=WAIT)
    stale = _temp_files(outdir)
    assert len(stale) == 1
    assert stale[0].startswith(".o.vma.zst.")  # hidden, and beside OUT
    (outdir / "o.vma.zst.tmp").write_bytes(b"someone else's")  # the old fixed name, too
    proc = run_cli("recompress", archive, out)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("verify", "--data", out).returncode == 0
    # the stale files are left alone (they are not this run's)
    assert sorted(os.listdir(outdir)) == sorted(["o.vma.zst", "o.vma.zst.tmp", *stale])
    assert (outdir / "o.vma.zst.tmp").read_bytes() == b"someone else's"


@pytest.mark.parametrize(
    ("option", "value", "range_"),
    [
        ("--level", "30", "-131072 to 22"),
        ("--level", "23", "-131072 to 22"),
        ("--level", "-131073", "-131072 to 22"),
        ("--threads", "-5", "0 to 256"),
        ("--threads", "-1", "0 to 256"),
        ("--threads", "257", "0 to 256"),
    ],
)
def test_level_and_threads_out_of_range_are_usage_errors(tmp_path, archive, option, value, range_):
    out = tmp_path / "o.vma.zst"
    line = assert_one_line_error(run_cli("recompress", f"{option}={value}", archive, out), 2)
    assert f"argument {option}: {value} is out of range" in line, line
    assert range_ in line, line
    assert "internal error" not in line
    assert not out.exists() and _temp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("option", "value"), [("--level", "-5"), ("--level", "22"), ("--threads", "2")]
)
def test_level_and_threads_in_range_work(tmp_path, archive, option, value):
    out = tmp_path / "o.vma.zst"
    proc = run_cli("recompress", option, value, archive, out)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("verify", "--data", out).returncode == 0


def test_dash_streams_to_stdout(tmp_path, archive):
    out = tmp_path / "file.vma.zst"
    assert run_cli("recompress", archive, out).returncode == 0
    proc = subprocess.run(
        vmafs_cmd("recompress", archive, "-"), capture_output=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout == out.read_bytes()  # the same seekable file, seek table and all
    assert proc.stdout.endswith(SEEKABLE_MAGIC.to_bytes(4, "little"))
    assert not (tmp_path / "-").exists()
    assert _temp_files(tmp_path) == []


def test_dash_refuses_a_terminal(tmp_path, archive):
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            vmafs_cmd("recompress", archive, "-"),
            stdout=slave,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        os.close(slave)
        os.close(master)
    line = assert_one_line_error(proc)
    assert "terminal" in line
    assert not (tmp_path / "-").exists()


def test_dash_damaged_input_fails(tmp_path, archive):
    cut = tmp_path / "cut.vma"
    cut.write_bytes(archive.read_bytes()[:-5000])
    proc = subprocess.run(vmafs_cmd("recompress", cut, "-"), capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.decode().count("\n") == 1
    assert proc.stderr.startswith(b"vmafs: error: ")
    assert not proc.stdout.endswith(SEEKABLE_MAGIC.to_bytes(4, "little"))  # no seek table


def test_dash_write_error_names_stdout(archive):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            vmafs_cmd("recompress", archive, "-"),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    line = assert_one_line_error(proc)
    assert line == "vmafs: error: standard output: No space left on device"


def test_full_disk_names_the_output(tmp_path):
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    src = tmp_path / "in"
    src.mkdir()
    archive = build(src / "big.vma", {"drive-scsi0": os.urandom(4 << 20)}).path
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "o.vma.zst"
        line = assert_one_line_error(run_cli("recompress", archive, out))
        assert line == f"vmafs: error: {out}: No space left on device"
        assert os.listdir(mnt) == []  # no temp file, no OUT
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_output_directory_problems_name_the_users_path(tmp_path, archive):
    missing = tmp_path / "nodir" / "o.vma.zst"
    line = assert_one_line_error(run_cli("recompress", archive, missing))
    assert line == f"vmafs: error: {missing}: cannot create it: {missing.parent} does not exist"
    assert not missing.parent.exists()

    under_file = archive / "o.vma.zst"
    line = assert_one_line_error(run_cli("recompress", archive, under_file))
    assert line == f"vmafs: error: {under_file}: cannot create it: {archive} is not a directory"

    directory = tmp_path / "adir"
    directory.mkdir()
    line = assert_one_line_error(run_cli("recompress", archive, directory))
    assert line == f"vmafs: error: {directory}: is a directory (the output is a file to create)"
    assert os.listdir(directory) == []
    assert _temp_files(tmp_path) == []

    existing = tmp_path / "exists.vma.zst"
    existing.write_bytes(b"keep me")
    line = assert_one_line_error(run_cli("recompress", archive, existing))
    assert line == f"vmafs: error: {existing}: already exists; refusing to overwrite it"
    assert existing.read_bytes() == b"keep me"
