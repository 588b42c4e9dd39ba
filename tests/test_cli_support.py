"""Archive builder and CLI runner shared by the tests/test_cli_*.py modules.

Archives are built with the shared format code (vmafs.format.Header and
ExtentPacker), the same code the writer uses, so they are byte-exact VMA;
``Built`` records where every extent starts so tests can damage exactly
the byte they mean to.  The tests at the bottom check the builder itself
against the CLI on archives that must be valid.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from conftest import vmafs_cmd

from vmafs.format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    Config,
    Device,
    ExtentPacker,
    Header,
    encode_cluster,
)

UUID = bytes(range(16))


@dataclass
class Built:
    """An archive written by :func:`build`, with what a test needs to damage it."""

    path: Path
    header: Header
    disks: dict[str, bytes]  # device name -> full content (vmstate included)
    extent_offsets: list[int] = field(default_factory=list)  # start of each extent

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def cluster_list(header: Header, disks: dict[str, bytes]) -> list[tuple[int, int]]:
    """Every (dev_id, cluster) of every device, device by device, in order."""
    out = []
    for dev_id, dev in sorted(header.devices.items()):
        out += [(dev_id, c) for c in range(dev.clusters)]
    return out


def build(
    path: Path,
    disks: dict[str, bytes],
    configs: list[tuple[str, bytes]] | None = None,
    *,
    ctime: int = 1_700_000_000,
    order: str = "sequential",
    slots: int = 58,
    seed: int = 1,
    extra: list[tuple[int, int, int, bytes]] | None = None,
    skip: set[tuple[int, int]] | None = None,
    uuid: bytes = UUID,
    extent_uuid: bytes | None = None,
) -> Built:
    """Write an archive of *disks* (name -> bytes; the name "vmstate" is the RAM state).

    order: "sequential" or "shuffled" (vmstate clusters always stay in order,
    interleaved with the shuffled disk clusters).  *extra* appends raw slots
    (dev_id, cluster, mask, stored) after the real ones, for duplicates and
    bad dev_ids; *skip* leaves clusters out (an incomplete archive).
    """
    if configs is None:
        configs = [("qemu-server.conf", b"memory: 512\n")]
    devices = {
        i: Device(i, name, len(data)) for i, (name, data) in enumerate(disks.items(), start=1)
    }
    header = Header(uuid, ctime, [Config(n, d) for n, d in configs], devices)
    head = header.pack()
    content = {i: disks[d.name] for i, d in devices.items()}
    slots_list = [s for s in cluster_list(header, disks) if s not in (skip or set())]
    if order == "shuffled":
        rng = random.Random(seed)
        vm = [s for s in slots_list if devices[s[0]].is_vmstate]
        other = [s for s in slots_list if not devices[s[0]].is_vmstate]
        rng.shuffle(other)
        merged, vi = [], 0
        for s in other:  # interleave vmstate in order at random points
            while vi < len(vm) and rng.random() < 0.3:
                merged.append(vm[vi])
                vi += 1
            merged.append(s)
        slots_list = merged + vm[vi:]
    packer = ExtentPacker(extent_uuid or uuid, slots_per_extent=slots)
    offsets = []
    pos = len(head)
    chunks = [head]

    def emit(blob: bytes) -> None:
        nonlocal pos
        if blob:
            offsets.append(pos)
            chunks.append(blob)
            pos += len(blob)

    for dev_id, c in slots_list:
        data = content[dev_id][c * CLUSTER_SIZE : (c + 1) * CLUSTER_SIZE]
        mask, stored = encode_cluster(data)
        emit(packer.add(dev_id, c, mask, stored))
    for dev_id, c, mask, stored in extra or []:
        emit(packer.add(dev_id, c, mask, stored))
    emit(packer.flush())
    path.write_bytes(b"".join(chunks))
    return Built(path, header, dict(disks), offsets)


def patterned_disk(size: int, seed: int, *, zero_every: int = 3) -> bytes:
    """A disk with data clusters, all-zero clusters and partial-zero clusters."""
    rng = random.Random(seed)
    out = bytearray(size)
    for c in range((size + CLUSTER_SIZE - 1) // CLUSTER_SIZE):
        kind = c % zero_every
        start = c * CLUSTER_SIZE
        if kind == 0:
            continue  # whole cluster zero
        for b in range(16):
            if kind == 2 and b % 2:
                continue  # partial-zero cluster
            lo = start + b * BLOCK_SIZE
            hi = min(lo + BLOCK_SIZE, size)
            if lo < hi:
                out[lo:hi] = rng.randbytes(hi - lo)
    return bytes(out)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def rewrite_header_md5(path: Path) -> None:
    """Recompute the header md5 after a deliberate edit (to get past the checksum)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(12288))
        (header_size,) = struct.unpack_from(">I", head, 56)
        f.seek(0)
        buf = bytearray(f.read(header_size))
        buf[32:48] = bytes(16)
        f.seek(32)
        f.write(hashlib.md5(buf).digest())


def run_cli(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m vmafs ARGS`` and capture text output (60 s limit)."""
    full_env = dict(os.environ)
    full_env.pop("VMAFS_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        vmafs_cmd(*args), capture_output=True, text=True, timeout=60, env=full_env, **kw
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int = 1) -> str:
    """The process failed with *status* and exactly one 'vmafs: error:' line; returns it."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmafs: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# --- the builder checks itself through the CLI --------------------------------------


def test_built_archives_verify(tmp_path):
    disks = {"drive-scsi0": patterned_disk(5 * CLUSTER_SIZE + 512, 1)}
    for order, slots in (("sequential", 58), ("shuffled", 59), ("shuffled", 1)):
        b = build(tmp_path / f"{order}{slots}.vma", disks, order=order, slots=slots)
        assert len(b.extent_offsets) >= 1
        proc = run_cli("verify", b.path)
        assert proc.returncode == 0, proc.stderr


def test_builder_damage_is_detected(tmp_path):
    # Guards the helpers: a flipped bit and a recomputed md5 really change the file.
    b = build(tmp_path / "a.vma", {"d": bytes(CLUSTER_SIZE)})
    before = b.path.read_bytes()
    flip_bit(b.path, 100)
    assert b.path.read_bytes() != before
    rewrite_header_md5(b.path)
    line = assert_one_line_error(run_cli("verify", b.path))
    # byte 100 lies in the reserved area (from offset 60): that, not the md5, is the finding
    assert line.endswith(
        f"{b.path}: verify failed: reserved header bytes are not zero (archive offset 60); "
        "the archive is damaged: restore from another copy of this backup"
    ), line
