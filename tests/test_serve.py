"""``vmafs serve`` with real clients: qemu-img, nbdinfo, nbdcopy, a QEMU drive, TLS,
and the daemon's life cycle through the CLI."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, vmafs_cmd
from serve_support import (
    KINDS,
    TIMEOUT,
    archive_of_kind,
    compare,
    extract,
    free_port,
    make_certs,
    qemu_map,
    served,
)
from serve_support import (
    offset_map as archive_map,
)
from test_backup_support import one_line_error, vm

from vmafs.archive import Archive
from vmafs.nbd.server import MAX_SOCKET_PATH


def offset_map(path: Path, dev_id: int) -> list[tuple[int, int, bool]]:
    with Archive.open(path) as a:
        return archive_map(a, dev_id)


@pytest.mark.qemu
@pytest.mark.parametrize("kind", KINDS)
def test_qemu_img_info_map_convert_every_kind(require_qemu, tmp_path, kind):
    archive = archive_of_kind(kind, tmp_path)
    ref = extract(archive, tmp_path / "extracted")
    with served(archive, tmp_path) as srv:
        assert srv.uris == [srv.uri("drive-scsi0"), srv.uri("drive-scsi1")]
        for dev_id, name in ((1, "drive-scsi0"), (2, "scsi1")):  # by name and by alias
            uri = srv.uri(name)
            info = json.loads(
                subprocess.run(
                    [require_qemu.qemu_img, "info", "--output=json", uri],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=TIMEOUT,
                ).stdout
            )
            disk = ref / f"disk-drive-scsi{dev_id - 1}.raw"
            assert info["virtual-size"] == disk.stat().st_size
            assert qemu_map(require_qemu.qemu_img, uri) == offset_map(archive, dev_id)
            out = tmp_path / f"{dev_id}.qcow2"
            subprocess.run(
                [require_qemu.qemu_img, "convert", "-O", "qcow2", uri, str(out)],
                check=True,
                timeout=TIMEOUT,
            )
            compare(require_qemu.qemu_img, out, disk)


@pytest.mark.qemu
def test_nbdinfo_list_map_and_nbdcopy(require_qemu, require_nbd_tools, tmp_path):
    archive = archive_of_kind("zstd-one-frame", tmp_path)
    ref = extract(archive, tmp_path / "extracted")
    with served(archive, tmp_path) as srv:
        listing = json.loads(
            subprocess.run(
                [require_nbd_tools.nbdinfo, "--list", "--json", srv.uri("")],
                capture_output=True,
                text=True,
                check=True,
                timeout=TIMEOUT,
            ).stdout
        )
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert sorted(exports) == ["drive-scsi0", "drive-scsi1"]
        e = exports["drive-scsi1"]
        assert e["is_read_only"] and e["can_multi_conn"] and e["can_cache"]
        assert e["block_size_minimum"] == 512 and e["block_size_preferred"] == 65536
        assert "base:allocation" in e["contexts"]
        for dev_id, name in ((1, "scsi0"), (2, "drive-scsi1")):
            out = subprocess.run(
                [require_nbd_tools.nbdinfo, "--map", "--json", srv.uri(name)],
                capture_output=True,
                text=True,
                check=True,
                timeout=TIMEOUT,
            ).stdout
            got = []
            for x in json.loads(out):
                hole = x["type"] == 3
                assert x["type"] in (0, 3)
                start, stop = x["offset"], x["offset"] + x["length"]
                if got and got[-1][2] == hole:
                    got[-1] = (got[-1][0], stop, hole)
                else:
                    got.append((start, stop, hole))
            assert got == offset_map(archive, dev_id)
            copy = tmp_path / f"copy{dev_id}.raw"
            subprocess.run(
                [require_nbd_tools.nbdcopy, srv.uri(name), str(copy)], check=True, timeout=TIMEOUT
            )
            assert copy.read_bytes() == (ref / f"disk-drive-scsi{dev_id - 1}.raw").read_bytes()


@pytest.mark.qemu
def test_qemu_drive_over_the_export(require_qemu, tmp_path):
    """QEMU's own block layer on the export: a backup job copies it into a raw file."""
    archive = archive_of_kind("plain", tmp_path)
    ref = extract(archive, tmp_path / "extracted") / "disk-drive-scsi1.raw"
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * ref.stat().st_size)  # every byte must be overwritten
    with served(archive, tmp_path) as srv:
        extra = (
            "-blockdev",
            f"driver=nbd,node-name=src,server.type=unix,server.path={srv.socket},"
            "export=scsi1,read-only=on",
            "-blockdev",
            f"driver=file,node-name=dstfile,filename={target}",
            "-blockdev",
            "driver=raw,node-name=dst,file=dstfile",
        )
        with vm(require_qemu.qemu_system, tmp_path, {}, extra=extra) as machine:
            machine.cmd(
                "blockdev-backup", **{"job-id": "j", "device": "src"}, target="dst", sync="full"
            )
            ev = machine.wait_event("BLOCK_JOB_COMPLETED")
            assert "error" not in ev["data"], ev
    assert target.read_bytes() == ref.read_bytes()


@pytest.mark.qemu
def test_tls_with_qemu_img_x509(require_qemu, require_openssl, tmp_path):
    archive = archive_of_kind("plain", tmp_path)
    ref = extract(archive, tmp_path / "extracted") / "disk-drive-scsi0.raw"
    certs = make_certs(require_openssl, tmp_path / "pki")
    # QEMU's client directory: ca-cert.pem plus its own client-cert/key.pem
    port = free_port()
    tls = [
        "--bind", "127.0.0.1", "--port", str(port),
        "--tls-cert", str(certs / "server-cert.pem"), "--tls-key", str(certs / "server-key.pem"),
        "--tls-ca", str(certs / "ca-cert.pem"),
    ]  # fmt: skip
    with served(archive, tmp_path, *tls) as srv:
        assert srv.uris == [
            f"nbds://127.0.0.1:{port}/drive-scsi0",
            f"nbds://127.0.0.1:{port}/drive-scsi1",
        ]
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=scsi0"
        obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
        out = tmp_path / "tls.qcow2"
        subprocess.run(
            [require_qemu.qemu_img, "convert", "--object", obj, "--image-opts",
             f"{opts},tls-creds=tls0", "-O", "qcow2", str(out)],
            check=True, timeout=TIMEOUT,
        )  # fmt: skip
        compare(require_qemu.qemu_img, out, ref)
        # without TLS: refused during the handshake
        plain = subprocess.run(
            [require_qemu.qemu_img, "info", "--image-opts", opts],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        # a client certificate not signed by --tls-ca: the TLS handshake fails
        other = make_certs(require_openssl, tmp_path / "other")
        (other / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
        bad = subprocess.run(
            [require_qemu.qemu_img, "info", "--object", f"tls-creds-x509,id=tls0,dir={other},"
             "endpoint=client", "--image-opts", f"{opts},tls-creds=tls0"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert bad.returncode != 0, bad.stdout


def test_daemon_socket_mode_pidfile_and_sigterm(tmp_path):
    archive = archive_of_kind("plain", tmp_path)
    with served(archive, tmp_path) as srv:
        st = os.stat(srv.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.getsid(srv.pid) != os.getsid(0)  # detached: a session of its own
    assert not srv.socket.exists() and not srv.pidfile.exists()


def test_foreground_prints_uris_and_stops_on_sigint(tmp_path):
    archive = archive_of_kind("plain", tmp_path)
    sock = tmp_path / "fg.sock"
    proc = subprocess.Popen(
        vmafs_cmd("serve", archive, "--socket", sock, "-f"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline().strip()
        assert first == f"nbd+unix:///drive-scsi0?socket={sock}"
        assert sock.exists()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not sock.exists()


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--tls-cert", "c.pem"], 1, "TLS needs both --tls-cert and --tls-key"),
        (["--tls-cert", "nope.pem", "--tls-key", "nope.pem"], 1, "nope.pem: no such file"),
        (["--port", "1234"], 2, "--port needs --bind"),
        (["--bind", "127.0.0.1", "--port", "0"], 2, "not a TCP port"),
        (["--socket", "FILE"], 1, "exists and is not a socket"),
        (["--socket", "LONG"], 1, f"longer than the {MAX_SOCKET_PATH} bytes"),
    ],
)
def test_errors_are_one_line_before_detaching(tmp_path, args, status, message):
    archive = archive_of_kind("plain", tmp_path)
    (tmp_path / "FILE").write_text("not a socket")
    args = [
        str(tmp_path / "FILE") if a == "FILE" else str(tmp_path / ("x" * 120)) if a == "LONG" else a
        for a in args
    ]
    proc = subprocess.run(
        vmafs_cmd("serve", archive, *args), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == status
    assert message in one_line_error(proc.stderr)
    assert (tmp_path / "FILE").read_text() == "not a socket"


def test_archive_errors_and_a_busy_port(tmp_path):
    proc = subprocess.run(
        vmafs_cmd("serve", tmp_path / "missing.vma", "--socket", tmp_path / "s"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1 and "missing.vma" in one_line_error(proc.stderr)
    archive = archive_of_kind("plain", tmp_path)
    port = free_port()
    with served(archive, tmp_path, "--bind", "127.0.0.1", "--port", str(port)):
        proc = subprocess.run(
            vmafs_cmd("serve", archive, "--bind", "127.0.0.1", "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(proc.stderr)


def test_no_disk_to_serve(tmp_path):
    archive = Path(tmp_path / "no-disks.vma")
    archive.write_bytes((FIXTURES_DIR / "no-disks.vma").read_bytes())
    proc = subprocess.run(
        vmafs_cmd("serve", archive, "--socket", tmp_path / "s"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1 and "no disk to serve" in one_line_error(proc.stderr)
