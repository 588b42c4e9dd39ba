"""The appliance engine needs no root: ``vmafs get --engine appliance`` run as the
user ``nobody`` brings every file of the NTFS fixture back exact (``mount --guest``
does need root, with either engine, and says so).

The test interpreter may live where ``nobody`` cannot enter (pyenv under /root,
mode 0700), so its prefix and the venv's site-packages are bind-mounted
read-only into a world-readable directory, and this checkout's ``vmafs``
package is copied there (a clone in a mode-0700 temporary directory cannot
be entered through a bind mount either): the same code and interpreter,
another user.  libguestfs keeps its appliance
cache for that user in /var/tmp/.guestfs-65534, as for any user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from guesttree import copy_archive, expected, tree_of_dir, volumes

from vmafs.mount import mount_table

REPO = Path(__file__).resolve().parent.parent
USER = "nobody"


def _binds(top: Path) -> dict[str, str]:
    """{directory under *top*: what is bind-mounted there}."""
    return {
        "py": sys.base_prefix,
        "site": sysconfig.get_paths()["purelib"],
    }


@pytest.fixture
def as_other_user(require_fuse, require_guestfs):
    """(argv prefix running this checkout's vmafs as ``nobody``, a directory it owns)."""
    if os.geteuid() != 0:
        pytest.skip("running a command as another user needs root")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not on PATH (util-linux)")
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} here")
    top = Path(tempfile.mkdtemp(prefix="vmafs-other-user-", dir="/var/tmp"))
    top.chmod(0o755)
    mounted: list[Path] = []
    try:
        for name, source in _binds(top).items():
            (top / name).mkdir()
            subprocess.run(["mount", "--bind", "-o", "ro", source, top / name], check=True)
            mounted.append(top / name)
        shutil.copytree(
            REPO / "vmafs", top / "src" / "vmafs", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in [top / "src", *(top / "src").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        home = top / "home"
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
        python = top / "py" / os.path.relpath(os.path.realpath(sys.executable), sys.base_prefix)
        argv = [
            "runuser", "-u", USER, "--", "env",
            f"HOME={home}",
            f"LD_LIBRARY_PATH={top / 'py' / 'lib'}",  # a pyenv build's rpath points at /root
            f"PYTHONPATH={top / 'src'}:{top / 'site'}",
            str(python), "-m", "vmafs",
        ]  # fmt: skip
        yield argv, home
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", path], check=False)
        # Never rmtree over a bind mount of the checkout: remove only what this made.
        if not [p for p in mount_table() if p.startswith(str(top) + "/")]:
            shutil.rmtree(top / "home", ignore_errors=True)
            shutil.rmtree(top / "src", ignore_errors=True)
            for name in _binds(top):
                with_dir = top / name
                if with_dir.exists():
                    with_dir.rmdir()
            top.rmdir()


@pytest.mark.slow
def test_get_through_the_appliance_as_another_user(as_other_user):
    argv, home = as_other_user
    archive = copy_archive("ntfs-mbr.vma", home / "a")
    archive.chmod(0o644)
    dest = home / "out"
    dest.mkdir()
    uid = pwd.getpwnam(USER).pw_uid
    os.chown(dest, uid, -1)
    proc = subprocess.run(
        [*argv, "get", "--engine", "appliance", archive, "sata0/p1:/", dest],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=home,
    )
    assert proc.returncode == 0, proc.stderr
    (volume,) = volumes("ntfs-mbr.vma")
    assert tree_of_dir(dest) == expected(volume)
    assert {os.lstat(p).st_uid for p in dest.rglob("*")} == {uid}  # written as that user


def test_mount_guest_as_another_user_says_it_needs_root(as_other_user):
    argv, home = as_other_user
    proc = subprocess.run(
        [*argv, "mount", "--guest", "x.vma", home], capture_output=True, text=True, cwd=home
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("vmafs: error: mount --guest needs root"), proc.stderr
    assert "vmafs ls/cat/get --engine appliance" in proc.stderr
    assert proc.stderr.count("\n") == 1
