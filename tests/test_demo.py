"""scripts/demo, the README's demo command, run for real (minus set-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"
HELLO = "Hello from inside the guest filesystem!"


def run_demo(tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """Run the demo with this test's interpreter and TMPDIR inside *tmp_path*."""
    work = tmp_path / "tmp"
    work.mkdir()
    wrapper = tmp_path / "vmafs"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vmafs "$@"\n')
    wrapper.chmod(0o755)
    env = {
        **os.environ,
        "VMAFS_SKIP_SETUP": "1",
        "VMAFS": str(wrapper),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(work),
        **extra_env,
    }
    return subprocess.run(
        ["bash", str(DEMO)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_nothing_left(tmp_path: Path) -> None:
    work = tmp_path / "tmp"
    assert list(work.iterdir()) == [], "the demo left its work directory behind"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    assert not [m for m in mounts if m.startswith(str(work))], "the demo left a mount behind"
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(work) not in loops, f"the demo left a loop device attached: {loops}"


@pytest.mark.slow
def test_demo_prints_a_guest_file_and_cleans_up(require_fuse, require_loop, tmp_path):
    proc = run_demo(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert HELLO in proc.stdout, out
    assert proc.stdout.rstrip().endswith("demo: OK"), out
    assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_demo_cleans_up_when_a_step_fails(require_fuse, require_loop, tmp_path):
    # Fail just before the demo's own clean-up step, when the archive is
    # FUSE-mounted, its disk is on a loop device and the guest fs is mounted.
    proc = run_demo(tmp_path, VMAFS_DEMO_FAIL_BEFORE_STEP="5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert HELLO in proc.stdout, out
    assert "demo: FAILED" in proc.stderr, out
    assert_nothing_left(tmp_path)
