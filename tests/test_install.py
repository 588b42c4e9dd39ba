"""Installing vmafs on a host: set-up's QEMU rule against a Proxmox-like QEMU, the .deb.

Set-up is tested against a stand-in ``pve-qemu-kvm`` built with equivs that
conflicts with, replaces and provides Debian's QEMU packages, the way
Proxmox VE's does.  The stand-in is never installed on this machine: a copy
of dpkg's status file says it is (``VMAFS_DPKG_ADMINDIR`` for dpkg-query,
``-o Dir::State::status`` for apt), with Debian's QEMU packages taken out,
and set-up runs up to apt's simulated plan (``VMAFS_SETUP_DRY_RUN=1``).  The
resolver that decides what would be removed is the real apt, on the real
package lists; only the "installed" list is the stand-in's.

The .deb test builds the package (``scripts/build-deb``), installs it with
dpkg, uses /usr/bin/vmafs and /sbin/mount.vmafs, and purges it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, in_ci, is_mounted
from test_mount_support import GUARD, cleanup, holders

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup"
DEBIAN_QEMU = ("qemu-utils", "qemu-system-x86", "qemu-system-common", "qemu-system-data")
QEMU_COMMANDS = ("qemu-img", "qemu-system-x86_64", "qemu-storage-daemon")


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"needs {', '.join(missing)} (bash scripts/setup --test installs them)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


# --- set-up and a Proxmox-like QEMU -------------------------------------------------------


def _installed_version(pkg: str) -> str | None:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", pkg],
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[1] if len(out) == 2 and out[0] == "installed" else None


@pytest.fixture(scope="module")
def pve_qemu_standin(tmp_path_factory) -> Path:
    """A pve-qemu-kvm .deb built with equivs: Conflicts/Replaces/Provides Debian's QEMU,
    ships qemu-img, qemu-system-x86_64 and qemu-storage-daemon (scripts)."""
    _need("equivs-build", "dpkg-deb", "apt-get")
    work = tmp_path_factory.mktemp("equivs")
    for cmd in QEMU_COMMANDS:
        script = work / cmd
        script.write_text(f"#!/bin/sh\necho '{cmd} (stand-in for pve-qemu-kvm) 8.1.5'\n")
        script.chmod(0o755)
    # Versioned Provides, as Proxmox's: dependants asking for a version stay met.
    provides = ", ".join(f"{p} (= {v})" for p in DEBIAN_QEMU if (v := _installed_version(p)))
    (work / "control").write_text(
        "Section: admin\nPriority: optional\nStandards-Version: 4.6.2\n"
        "Package: pve-qemu-kvm\nVersion: 8.1.5-1\nArchitecture: all\n"
        f"Conflicts: {', '.join(DEBIAN_QEMU)}\nReplaces: {', '.join(DEBIAN_QEMU)}\n"
        f"Provides: {provides or ', '.join(DEBIAN_QEMU)}\n"
        + "Files:"
        + "".join(f" {cmd} /usr/bin/\n" for cmd in QEMU_COMMANDS)
        + "Description: stand-in for Proxmox VE's QEMU (vmafs tests only)\n"
    )
    proc = subprocess.run(
        ["equivs-build", "control"], cwd=work, capture_output=True, text=True, timeout=GUARD
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (deb,) = work.glob("pve-qemu-kvm_*.deb")
    return deb


def _package(stanza: str) -> str | None:
    m = re.search(r"^Package: (\S+)", stanza, re.M)
    return m.group(1) if m else None


def _status_with(deb: Path, admindir: Path) -> None:
    """dpkg's status as if *deb* were installed in place of Debian's QEMU packages."""
    admindir.mkdir()
    (admindir / "info").mkdir()
    (admindir / "updates").mkdir()
    stanzas = Path("/var/lib/dpkg/status").read_text().split("\n\n")
    kept = [s for s in stanzas if _package(s) not in DEBIAN_QEMU]
    control = subprocess.run(["dpkg-deb", "-f", deb], capture_output=True, text=True, check=True)
    fields = control.stdout.strip().splitlines()
    fields.insert(1, "Status: install ok installed")
    kept.append("\n".join(fields))
    (admindir / "status").write_text("\n\n".join(s.strip("\n") for s in kept if s.strip()) + "\n")


def _path_without_qemu(tmp_path: Path) -> str:
    """A PATH with every command of /usr/bin and /usr/sbin but QEMU's."""
    bindir = tmp_path / "bin-no-qemu"
    bindir.mkdir()
    for d in ("/usr/sbin", "/usr/bin"):
        for name in os.listdir(d):
            if not name.startswith("qemu") and not (bindir / name).exists():
                (bindir / name).symlink_to(os.path.join(d, name))
    return str(bindir)


def _setup(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SETUP), *args],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env={**os.environ, "VMAFS_SETUP_DRY_RUN": "1", **env},
    )


def test_setup_leaves_a_proxmox_qemu_alone(pve_qemu_standin, tmp_path):
    admindir = tmp_path / "dpkg"
    _status_with(pve_qemu_standin, admindir)
    root = tmp_path / "standin"
    subprocess.run(["dpkg-deb", "-x", pve_qemu_standin, root], check=True)
    env = {
        "VMAFS_DPKG_ADMINDIR": str(admindir),
        "VMAFS_APT_OPTS": f"-o Dir::State::status={admindir}/status",
        # the stand-in's commands are the QEMU this host has
        "PATH": f"{root}/usr/bin:{_path_without_qemu(tmp_path)}",
    }
    proc = _setup("--test", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"QEMU: {root}/usr/bin/qemu-img and the rest found; left as it is" in proc.stderr
    plan = proc.stdout
    assert "plan: " in plan, plan
    assert not re.search(r"\bqemu-", plan.replace("pve-qemu-kvm", "")), plan  # none wanted
    assert "remove" not in plan, plan


def test_setup_refuses_a_plan_that_removes_the_proxmox_qemu(pve_qemu_standin, tmp_path):
    """Without any QEMU command, set-up wants Debian's QEMU; with pve-qemu-kvm
    installed, apt's plan removes it, and set-up stops before changing anything."""
    admindir = tmp_path / "dpkg"
    _status_with(pve_qemu_standin, admindir)
    env = {
        "VMAFS_DPKG_ADMINDIR": str(admindir),
        "VMAFS_APT_OPTS": f"-o Dir::State::status={admindir}/status",
        "PATH": _path_without_qemu(tmp_path),
    }
    proc = _setup("--writer", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "plan: wanted " in proc.stdout and "qemu-system-x86" in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("setup: error: installing ") and "would remove: pve-qemu-kvm" in err, err
    assert "never removes packages" in err


def test_runtime_setup_wants_no_qemu(tmp_path):
    """The runtime role (mount, list, verify, extract, serve) asks for no QEMU at all,
    even on a machine that has none."""
    _need("apt-get", "dpkg-query")
    admindir = tmp_path / "dpkg"
    admindir.mkdir()
    (admindir / "info").mkdir()
    (admindir / "updates").mkdir()
    stanzas = Path("/var/lib/dpkg/status").read_text().split("\n\n")
    (admindir / "status").write_text(
        "\n\n".join(s for s in stanzas if not (_package(s) or "").startswith("qemu")) + "\n"
    )
    env = {
        "VMAFS_DPKG_ADMINDIR": str(admindir),
        "VMAFS_APT_OPTS": f"-o Dir::State::status={admindir}/status",
        "PATH": _path_without_qemu(tmp_path),
    }
    proc = _setup(env=env)
    assert proc.returncode == 0, proc.stderr
    assert "qemu" not in proc.stdout + proc.stderr.lower(), proc.stdout + proc.stderr


# --- the Debian package ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.fuse
def test_deb_installs_runs_and_purges(tmp_path, require_fuse):
    _need("dpkg-deb", "dpkg-architecture", "gcc", "pkg-config")
    if os.geteuid() != 0:
        pytest.fail("needs root (dpkg -i)") if in_ci() else pytest.skip("needs root (dpkg -i)")
    if subprocess.run(["dpkg-query", "-W", "vmafs"], capture_output=True).returncode == 0:
        pytest.fail("a vmafs package is installed here already; this test would replace it")
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-deb"), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    deb = Path(build.stdout.strip().splitlines()[-1])
    info = subprocess.run(["dpkg-deb", "-I", deb], capture_output=True, text=True).stdout
    depends = re.search(r"Depends: (.*)", info).group(1)
    assert "qemu" not in depends  # nothing that conflicts with Proxmox VE's QEMU
    archive = tmp_path / "two-disks.vma.zst"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.zst", archive)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("VMAFS_CACHE_DIR", None)  # the package's default cache, which purge removes
    cache = Path("/var/cache/vmafs")
    cache_existed = cache.exists()
    try:
        inst = subprocess.run(["dpkg", "-i", deb], capture_output=True, text=True, timeout=GUARD)
        assert inst.returncode == 0, inst.stdout + inst.stderr
        for path in (
            "/usr/bin/vmafs",
            "/sbin/mount.vmafs",
            "/usr/share/man/man1/vmafs.1.gz",
            "/lib/systemd/system/vmafs-mount@.service",
            "/usr/libexec/vmafs/vzdump-hook-vmafs-index",
        ):
            assert os.path.exists(path), path
        unit = Path("/lib/systemd/system/vmafs-mount@.service").read_text()
        assert "ExecStart=/usr/bin/vmafs mount" in unit

        def run(*argv):
            return subprocess.run(argv, capture_output=True, text=True, timeout=GUARD, env=env)

        listed = run("/usr/bin/vmafs", "list", archive)
        assert listed.returncode == 0 and "DEV: dev_id=1" in listed.stdout, listed.stderr
        # mount(8)'s helper from /sbin, then the packaged umount
        mounted = run("mount", "-t", "vmafs", archive, mnt)
        assert mounted.returncode == 0, mounted.stderr
        assert (mnt / "qemu-server.conf").read_bytes()
        (pid,) = holders(archive)
        assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"/usr/lib/vmafs/bin/" in f.read()
        assert run("/usr/bin/vmafs", "umount", mnt).returncode == 0
        assert not is_mounted(mnt) and not holders(archive)
        # the side index went to the package's cache, not beside the archive
        assert not (tmp_path / "two-disks.vma.zst.vmafs-index").exists()
        if not cache_existed:
            assert cache.is_dir()
    finally:
        cleanup(archive, mnt)
        purge = subprocess.run(["dpkg", "--purge", "vmafs"], capture_output=True, text=True)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    for path in ("/usr/lib/vmafs", "/usr/bin/vmafs", "/sbin/mount.vmafs", "/usr/libexec/vmafs"):
        assert not os.path.lexists(path), path
    assert not cache.exists()
    assert subprocess.run(["dpkg-query", "-W", "vmafs"], capture_output=True).returncode != 0
