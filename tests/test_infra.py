"""The test infrastructure itself: fixture archives, manifests, real-part probes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    FIXTURES_DIR,
    fixture_archives,
    is_mounted,
    load_manifest,
    loop_device,
    unmount,
)

DECOMPRESS = {".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"], ".lzo": ["lzop", "-dc"]}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_every_plain_fixture_has_a_manifest():
    plain = fixture_archives(compressed=False)
    assert plain, f"no fixture archives in {FIXTURES_DIR}"
    for archive in plain:
        m = load_manifest(archive)
        assert m["archive"] == archive.name
        assert m["devices"] is not None and m["configs"] is not None


@pytest.mark.parametrize("archive", fixture_archives(), ids=lambda p: p.name)
def test_fixture_archive_matches_manifest_checksum(archive):
    """Each fixture (and each compressed copy, decompressed by the real tool) is intact."""
    want = load_manifest(archive)["archive_sha256"]
    if archive.suffix == ".vma":
        assert sha256_file(archive) == want
        return
    argv = [*DECOMPRESS[archive.suffix], str(archive)]
    h = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(1 << 20):
            h.update(chunk)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}"
    assert h.hexdigest() == want


def test_load_manifest_accepts_all_spellings(manifest):
    want = manifest("two-disks")
    for name in ("two-disks.vma", "two-disks.vma.zst", "two-disks.vma.json", "two-disks.vma.gz"):
        assert manifest(name) == want
    assert manifest(FIXTURES_DIR / "two-disks.vma.lzo") == want
    with pytest.raises(FileNotFoundError):
        manifest("no-such-archive.vma")


def test_fixtures_dir_holds_what_its_readme_lists(fixtures_dir):
    """The fixture points at tests/fixtures, and that holds every archive its README lists.

    Each table row of the README names a fixture; each must be there as a
    plain .vma with its manifest, and nothing else may be, so that a
    fixture added or lost shows up here.
    """
    assert fixtures_dir.resolve() == (Path(__file__).resolve().parent / "fixtures")
    listed = set(re.findall(r"^\| ([\w-]+) \|", (fixtures_dir / "README.md").read_text(), re.M))
    listed.discard("archive")  # the table's heading
    present = {p.name.removesuffix(".vma") for p in fixtures_dir.glob("*.vma")}
    assert listed and listed == present, (listed, present)
    for name in listed:
        assert (fixtures_dir / f"{name}.vma.json").is_file(), name


def test_fuse_probe(require_fuse):
    assert os.access(require_fuse, os.X_OK)


def test_qemu_probe(require_qemu):
    for path in vars(require_qemu).values():
        assert os.access(path, os.X_OK)
    out = subprocess.run(
        [require_qemu.qemu_img, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "raw" in out and "qcow2" in out


def test_loop_mount_of_an_unmounted_built_ext4_image(require_loop, tmp_path):
    """The path the demo and the guest tests take: mkfs.ext4 -d, losetup -r, mount ro,noload."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("vmafs-test\n")
    img = tmp_path / "guest.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "vmafstest", "-d", str(tree), str(img)],
        check=True,
        capture_output=True,
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(img) as dev:
        assert dev.startswith("/dev/loop")
        subprocess.run(["mount", "-o", "ro,noload", dev, str(mnt)], check=True, capture_output=True)
        try:
            assert (mnt / "etc" / "hostname").read_text() == "vmafs-test\n"
        finally:
            unmount(mnt, fuse=False)
    assert not is_mounted(mnt)


_SERVE_FOREVER = """
import sys, pyfuse3, trio
pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"fsname=vmafs-dead-probe"})
print("mounted", flush=True)
trio.run(pyfuse3.main)
"""


def test_unmount_clears_a_fuse_mount_whose_process_died(require_fuse, tmp_path):
    """The cleanup helper must see and remove a dead FUSE mount (stat gives ENOTCONN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_FOREVER, str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "mounted"
        assert is_mounted(mnt)
        proc.kill()
        proc.wait(timeout=30)
        assert is_mounted(mnt), "a dead FUSE mount stays in the mount table"
        assert not os.path.ismount(mnt), "os.path.ismount misses it (why is_mounted exists)"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        unmount(mnt)
    assert not is_mounted(mnt)


def test_ci_runs_the_readme_test_command():
    """README's two set-up commands exist, and .ci/run runs exactly the test one."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    # as root, with no sudo (a Proxmox VE host has none), and through sudo for others
    assert "\nbash scripts/demo" in readme and "\nbash scripts/test" in readme
    assert "sudo bash scripts/demo" in readme
    assert (repo / "scripts" / "demo").is_file() and (repo / "scripts" / "test").is_file()
    commands = [
        line.strip()
        for line in (repo / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert any(c.split("||")[0].strip() == "bash scripts/test" for c in commands), commands
