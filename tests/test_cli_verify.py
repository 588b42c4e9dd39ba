"""``vmafs verify``: passes on every good archive, names the damage on every bad one."""

from __future__ import annotations

import re
import shutil
import struct

import pytest
from conftest import FIXTURES_DIR, fixture_archives
from test_cli_support import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    UUID,
    Built,
    assert_one_line_error,
    build,
    flip_bit,
    patterned_disk,
    rewrite_header_md5,
    run_cli,
)
from vmafactory import hostile_base, hostile_cases

import vmafs.errors

# Two disks, several extents (slots=4 -> 4 clusters per extent), partial-zero clusters.
DISKS = {
    "drive-scsi0": patterned_disk(10 * CLUSTER_SIZE, 1),
    "drive-scsi1": patterned_disk(5 * CLUSTER_SIZE + 3 * 512, 2),
}


def _good(tmp_path, **kw) -> Built:
    return build(tmp_path / "a.vma", DISKS, slots=4, **kw)


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_proxmox_fixtures_verify(archive):
    for extra in ([], ["--data"], ["-v"]):
        proc = run_cli("verify", *extra, archive)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        if extra != ["-v"]:
            assert proc.stdout == ""  # silent on success, like vma verify


def test_verbose_statistics(tmp_path):
    b = build(tmp_path / "a.vma", DISKS, slots=4, order="shuffled")
    proc = run_cli("verify", "-v", "--data", b.path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "CFG: size: 12 name: qemu-server.conf"
    assert out[1].startswith("DEV: dev_id=1 size: 655360 devname: drive-scsi0")
    # patterned_disk: cluster c is zero when c % 3 == 0, full when 1, half when 2.
    # drive-scsi0: 10 clusters -> zero 0,3,6,9; full 1,4,7; half 2,5,8.
    stats0 = next(line for line in out if line.startswith("STATS: dev_id=1 "))
    assert "clusters: 10 data: 6 zero: 4 missing: 0" in stats0
    assert f"stored: {(3 * 16 + 3 * 8) * BLOCK_SIZE} " in stats0
    ext = next(line for line in out if line.startswith("ARCHIVE: "))
    assert f"extents: {len(b.extent_offsets)} " in ext
    assert out[-1].endswith("structure and data verified")


# --- hostile input: each damage gives its specific error -------------------------------


def _set_u32(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">I", value))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def header_bitflip(tmp_path):
    b = _good(tmp_path)
    flip_bit(b.path, 4096 + 32 + 8 + 7)  # size of dev 1 in the device table
    return b.path, "ChecksumError", r"header md5 mismatch \(archive offset 32\)"


def extent_header_bitflip(tmp_path):
    b = _good(tmp_path)
    off = b.extent_offsets[1] + 40 + 8 + 3  # second slot's cluster number
    flip_bit(b.path, off)
    return b.path, "ChecksumError", rf"extent header md5 mismatch \(archive offset {off - 51}\)"


def extent_magic(tmp_path):
    b = _good(tmp_path)
    flip_bit(b.path, b.extent_offsets[2])
    return b.path, "ExtentError", rf"bad extent magic .*archive offset {b.extent_offsets[2]}\)"


def extent_uuid(tmp_path):
    b = _good(tmp_path, extent_uuid=bytes(16))
    return b.path, "UuidMismatchError", r"extent uuid differs"


def truncated_inside_extent(tmp_path):
    b = _good(tmp_path)
    last = b.extent_offsets[-1]
    _truncate(b.path, last + 512 + BLOCK_SIZE)
    return b.path, "TruncatedError", rf"ends inside an extent's data .*archive offset {last}\)"


def truncated_inside_extent_header(tmp_path):
    b = _good(tmp_path)
    last = b.extent_offsets[-1]
    _truncate(b.path, last + 100)
    return b.path, "TruncatedError", rf"archive offset {last}\)"


def truncated_at_extent_boundary(tmp_path):
    # What Proxmox's verify misses: the file ends cleanly, clusters are missing.
    b = _good(tmp_path)
    _truncate(b.path, b.extent_offsets[-2])
    return b.path, "IncompleteArchiveError", r"incomplete.*never written.*dev \d+, cluster \d+\)"


def missing_cluster(tmp_path):
    b = _good(tmp_path, skip={(1, 7)})
    return b.path, "IncompleteArchiveError", r"1 of 10 clusters.*\(dev 1, cluster 7\)"


def duplicate_cluster(tmp_path):
    stored = b"\x55" * BLOCK_SIZE
    b = _good(tmp_path, extra=[(1, 4, 1, stored)])
    return b.path, "DuplicateClusterError", r"stored twice \(archive offset \d+, dev 1, cluster 4\)"


def cluster_out_of_range(tmp_path):
    b = _good(tmp_path, extra=[(2, 6, 0, b"")])  # drive-scsi1 has clusters 0..5
    return b.path, "ClusterRangeError", r"beyond the end of the device.*dev 2, cluster 6\)"


def dev_id_255(tmp_path):
    b = _good(tmp_path, extra=[(255, 0, 0, b"")])
    return b.path, "UnknownDeviceError", r"dev_id 255.*dev 255, cluster 0\)"


def dev_id_unregistered(tmp_path):
    b = _good(tmp_path, extra=[(3, 0, 1, b"\1" * BLOCK_SIZE)])
    return b.path, "UnknownDeviceError", r"dev_id 3, which the header does not register"


def absurd_header_size(tmp_path):
    b = _good(tmp_path)
    _set_u32(b.path, 56, 0xFFFFFE00)
    return b.path, "HeaderError", r"absurd header_size 4294966784"


def unaligned_header_size(tmp_path):
    b = _good(tmp_path)
    _set_u32(b.path, 56, 12800 + 1)
    return b.path, "HeaderError", r"absurd header_size 12801"


def absurd_blob_length(tmp_path):
    b = _good(tmp_path)
    with open(b.path, "rb") as f:
        head = f.read(12288)
    (name_ptr,) = struct.unpack_from(">I", head, 2044)  # first config's name blob
    with open(b.path, "r+b") as f:
        f.seek(12288 + name_ptr)
        f.write(struct.pack("<H", 0xFFFF))
    rewrite_header_md5(b.path)
    return b.path, "HeaderError", r"length 65535 overruns the blob buffer"


def trailing_garbage(tmp_path):
    b = _good(tmp_path)
    with open(b.path, "ab") as f:
        f.write(b"garbage" * 100)
    return b.path, "TrailingDataError", rf"after the last extent.*archive offset {b.size - 700}\)"


def vmstate_out_of_order(tmp_path):
    disks = {"drive-scsi0": bytes(CLUSTER_SIZE), "vmstate": b"\7" * (3 * CLUSTER_SIZE)}
    b = build(tmp_path / "a.vma", disks, skip={(2, 1)}, extra=[(2, 1, 0, b"")])
    return b.path, "VmstateOrderError", r"vmstate cluster out of order"


def traversal_config_name(tmp_path):
    configs = [("qemu-server.conf", b"x"), ("../../x", b"evil")]
    b = _good(tmp_path, configs=configs)
    return b.path, "HeaderError", r"config name '\.\./\.\./x' is not a safe file name"


def traversal_device_name(tmp_path):
    b = build(tmp_path / "a.vma", {"../../etc/x": bytes(CLUSTER_SIZE)})
    return b.path, "HeaderError", r"device name '\.\./\.\./etc/x' is not a safe file name"


def bad_magic_file(tmp_path):
    b = _good(tmp_path)
    flip_bit(b.path, 0)
    return b.path, "SourceError", r"not a VMA archive"


def bad_version(tmp_path):
    b = _good(tmp_path)
    _set_u32(b.path, 4, 2)
    return b.path, "HeaderError", r"unsupported VMA version 2"


CORRUPTIONS = [
    header_bitflip,
    extent_header_bitflip,
    extent_magic,
    extent_uuid,
    truncated_inside_extent,
    truncated_inside_extent_header,
    truncated_at_extent_boundary,
    missing_cluster,
    duplicate_cluster,
    cluster_out_of_range,
    dev_id_255,
    dev_id_unregistered,
    absurd_header_size,
    unaligned_header_size,
    absurd_blob_length,
    trailing_garbage,
    vmstate_out_of_order,
    traversal_config_name,
    traversal_device_name,
    bad_magic_file,
    bad_version,
]


def test_good_archive_passes(tmp_path):
    for order in ("sequential", "shuffled"):
        b = build(tmp_path / f"{order}.vma", DISKS, slots=4, order=order)
        proc = run_cli("verify", "--data", b.path)
        assert proc.returncode == 0, proc.stderr


def _ends_with_next_step(line: str, error: str | type) -> bool:
    """The line ends with what to do about an error of class *error*, and names no class."""
    cls = getattr(vmafs.errors, error) if isinstance(error, str) else error
    if re.search(r"\b[A-Z][a-z]+[A-Za-z]*Error\b", line):
        return False
    if cls.readable_in_part:  # clusters missing, cut inside an extent
        return line.endswith("reads what is there (missing clusters read as errors)")
    if issubclass(cls, vmafs.errors.FormatError | vmafs.errors.ConsistencyError):
        return line.endswith("restore from another copy of this backup")
    return not line.endswith("backup") and "allow_incomplete" not in line


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=lambda f: f.__name__)
def test_damage_is_named(tmp_path, damage, capsys):
    # In-process (vmafs.cli.main) for speed; the subprocess contract is covered
    # by test_damage_in_a_subprocess and test_damage_also_refused_by_extract.
    from vmafs.cli import main

    path, error_class, pattern = damage(tmp_path)
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    line = captured.err.rstrip("\n")
    assert line.startswith(f"vmafs: error: {path}: verify failed: ")
    assert _ends_with_next_step(line, error_class), line
    assert re.search(pattern, line), line


@pytest.mark.parametrize(
    "damage", [header_bitflip, truncated_inside_extent], ids=lambda f: f.__name__
)
def test_damage_in_a_subprocess(tmp_path, damage):
    path, error_class, pattern = damage(tmp_path)
    line = assert_one_line_error(run_cli("verify", path))
    assert _ends_with_next_step(line, error_class) and re.search(pattern, line), line


@pytest.mark.parametrize(
    "damage",
    [extent_header_bitflip, duplicate_cluster, truncated_at_extent_boundary, absurd_blob_length],
    ids=lambda f: f.__name__,
)
def test_damage_also_refused_by_extract(tmp_path, damage):
    path, _, pattern = damage(tmp_path)
    target = tmp_path / "out"
    line = assert_one_line_error(run_cli("extract", path, target))
    assert re.search(pattern, line), line
    assert not target.exists()  # validated before anything is written


def test_verify_leaves_no_side_index(tmp_path):
    # verify reads the archive itself and neither trusts nor writes a side index.
    path = tmp_path / "two-disks.vma.zst"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.zst", path)
    assert run_cli("verify", path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two-disks.vma.zst"]


def test_uuid_is_in_every_extent(tmp_path):
    # The builder stamps the archive uuid: the uuid test above really changes it.
    b = _good(tmp_path)
    data = b.path.read_bytes()
    for off in b.extent_offsets:
        assert data[off + 8 : off + 24] == UUID


# --- the shared corruption table (tests/vmafactory.py), in-process for speed --------------

_HOSTILE = hostile_cases()


@pytest.mark.parametrize("case", _HOSTILE, ids=[c.name for c in _HOSTILE])
def test_vmafactory_damage_is_named(case, tmp_path, capsys):
    from vmafs.cli import main

    path = case.write(tmp_path / "d.vma")
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vmafs: error: {path}: verify failed: ")
    line = lines[0]
    # SourceError subclasses (bad magic) are raised before any VMA parsing.
    assert _ends_with_next_step(line, case.error), line
    for piece in case.location():
        assert piece in line, (piece, line)
    if case.match:
        assert case.match in line, line


def test_vmafactory_base_is_valid(tmp_path):
    path = hostile_base().write(tmp_path / "base.vma")
    proc = run_cli("verify", "-v", "--data", path)
    assert proc.returncode == 0, proc.stderr
    assert "VMSTATE: dev_id=3 " in proc.stdout
