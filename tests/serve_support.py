"""Helpers for the tests of ``vmafs serve`` and ``vmafs restore --live`` with real clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import FIXTURES_DIR, vmafs_cmd

TIMEOUT = 60

#: the archive kinds vmafs reads, each made from the two-disks fixture
KINDS = ["plain", "zstd-one-frame", "zstd-seekable", "gzip", "lzo"]


def archive_of_kind(kind: str, tmp: Path) -> Path:
    """A copy (or, for seekable zstd, a recompression) of the two-disks fixture."""
    src = {
        "plain": "two-disks.vma",
        "zstd-one-frame": "two-disks.vma.zst",
        "gzip": "two-disks.vma.gz",
        "lzo": "two-disks.vma.lzo",
    }.get(kind)
    if src is not None:
        return Path(shutil.copy(FIXTURES_DIR / src, tmp / src))
    out = tmp / "two-disks-seekable.vma.zst"
    subprocess.run(
        vmafs_cmd("recompress", FIXTURES_DIR / "two-disks.vma", out, "--no-progress"),
        check=True,
        capture_output=True,
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pid: int, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


class Served:
    """A ``vmafs serve`` daemon started through the CLI; stopped with SIGTERM."""

    def __init__(self, archive: Path, tmp: Path, *extra: str) -> None:
        self.socket = tmp / "serve.sock"
        self.pidfile = tmp / "serve.pid"
        where = [] if "--bind" in extra else ["--socket", str(self.socket)]
        proc = subprocess.run(
            vmafs_cmd("serve", archive, *where, "--pidfile", self.pidfile, *extra),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr
        self.uris = proc.stdout.split()
        self.pid = int(self.pidfile.read_text())

    def uri(self, name: str = "drive-scsi0") -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        assert wait_gone(self.pid), "vmafs serve did not exit on SIGTERM"


@contextlib.contextmanager
def served(archive: Path, tmp: Path, *extra: str):
    server = Served(archive, tmp, *extra)
    try:
        yield server
    finally:
        server.stop()


def offset_map(archive, dev_id: int) -> list[tuple[int, int, bool]]:
    """(start, stop, is_hole) of a whole disk from an open Archive's stored ranges
    (``allocated_ranges``: the offset map's masks, not the lseek functions)."""
    size = archive.device(dev_id).size
    out, pos = [], 0
    for off, n in archive.allocated_ranges(dev_id):
        if off > pos:
            out.append((pos, off, True))
        out.append((off, off + n, False))
        pos = off + n
    if pos < size:
        out.append((pos, size, True))
    return out


def qemu_map(qemu_img: str, uri: str) -> list[tuple[int, int, bool]]:
    """(start, stop, is_zero_hole) extents of ``qemu-img map``, neighbours of a kind merged."""
    out = subprocess.run(
        [qemu_img, "map", "--output=json", "-f", "raw", uri],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT,
    ).stdout
    merged: list[tuple[int, int, bool]] = []
    for e in json.loads(out):
        hole = not e["data"]
        assert e["zero"] == hole, e
        start, stop = e["start"], e["start"] + e["length"]
        if merged and merged[-1][2] == hole and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop, hole)
        else:
            merged.append((start, stop, hole))
    return merged


def extract(archive: Path, dest: Path) -> Path:
    subprocess.run(
        vmafs_cmd("extract", archive, dest, "--no-progress"),
        check=True,
        capture_output=True,
        timeout=TIMEOUT * 5,
    )
    return dest


def compare(qemu_img: str, a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "raw") -> None:
    proc = subprocess.run(
        [qemu_img, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 5,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_certs(openssl: str, d: Path, host_ip: str = "127.0.0.1") -> Path:
    """A CA, a server certificate for *host_ip*, a client certificate, in QEMU's file names
    (``dir`` of tls-creds-x509): ca-cert.pem, server-*.pem, client-*.pem."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=TIMEOUT)

    ossl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=vmafs test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for role, usage, san in (
        ("server", "serverAuth", f"IP:{host_ip}"),
        ("client", "clientAuth", "DNS:client"),
    ):
        ossl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem",
            "-out", f"{role}.csr", "-subj", f"/CN={role}",
        )  # fmt: skip
        ext = d / f"{role}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
        )
        ossl(
            "x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", f"{role}-cert.pem", "-extfile", ext.name,
        )  # fmt: skip
    return d


def evict(path) -> None:
    """Drop *path*'s pages from the page cache (written back first): the next
    read waits for the disk, and a RWF_NOWAIT read is refused."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
