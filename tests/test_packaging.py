"""How vmafs installs: ``writer/`` becomes ``vmafs.writer``, and a checkout maps it the same way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, *, cwd: Path, pythonpath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_checkout_maps_vmafs_writer_to_its_own_writer_folder():
    # The shared venv's editable install may point at another checkout: the
    # checkout on sys.path must win, for vmafs and for vmafs.writer alike.
    out = _python(
        "import vmafs.writer.packer as p, vmafs; print(vmafs.__file__); print(p.__file__)",
        cwd=REPO,
    )
    vmafs_file, packer_file = out.splitlines()
    assert Path(vmafs_file) == REPO / "vmafs" / "__init__.py"
    assert Path(packer_file) == REPO / "writer" / "packer.py"


@pytest.mark.slow
def test_wheel_installs_writer_under_vmafs_only(tmp_path):
    # Build from a copy: building writes build/ and *.egg-info beside the sources.
    # Without build isolation (the venv's setuptools and wheel): no download.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("vmafs", "writer"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("vmafs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vmafs", wheel.name.split("-py")[0] + ".dist-info"}
    assert "vmafs/writer/packer.py" in names and "vmafs/writer/cli.py" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    )
    assert b"vmafs = vmafs.cli:entry" in entry_points
    assert b"mount.vmafs = vmafs.mount" in entry_points

    # Installed, outside any checkout: vmafs.writer comes from the wheel and
    # there is no top-level writer.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert not (target / "writer").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _python(
        "import importlib.util, vmafs.writer.cli as c; print(c.__file__); "
        "s = importlib.util.find_spec('writer'); print(s and s.origin)",
        cwd=elsewhere,
        pythonpath=str(target),
    )
    cli_file, top_level_writer = out.splitlines()
    assert Path(cli_file) == target / "vmafs" / "writer" / "cli.py"
    # The console scripts run from the install, writer commands included.
    env = dict(os.environ, PYTHONPATH=str(target))
    for script, args, expect in (
        ("vmafs", ["create", "--help"], "usage: vmafs create"),
        ("mount.vmafs", ["-h"], "mount.vmafs"),
    ):
        proc = subprocess.run(
            [target / "bin" / script, *args], cwd=elsewhere, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0 and expect in proc.stdout, proc.stdout + proc.stderr
    # (The venv running the tests may have an editable install of an older
    # layout with a top-level writer: only the wheel's own files count.)
    assert not top_level_writer.startswith(str(target)), top_level_writer
