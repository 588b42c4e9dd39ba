"""writer.nbd: QEMU as the client, plus hand-made hostile clients on a raw socket."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import stat
import struct
import subprocess

import pytest
import trio
from nbd_client import Client
from vmafs.writer import nbd
from vmafs.writer.nbd import Export, NbdServer
from vmafs.writer.output import ArchiveOutput
from vmafs.writer.packer import Packer

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE


class Recorder:
    """An export that records what it receives (in memory)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.writes: list[tuple[int, bytes | None, int]] = []
        self.flushes = 0

    async def on_write(self, offset, data):
        self.writes.append((offset, bytes(data), len(data)))

    async def on_zero(self, offset, length):
        self.writes.append((offset, None, length))

    async def on_flush(self):
        self.flushes += 1

    def export(self) -> Export:
        return Export(self.size, self.on_write, self.on_zero, self.on_flush, "test export")


async def with_server(tmp_path, exports, body, **kw):
    path = str(tmp_path / "nbd.sock")
    server = NbdServer(path, exports, **kw)
    with trio.fail_after(120):  # a hang is a failure, not a timing assertion
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            await body(server, path)
            n.cancel_scope.cancel()
    assert not os.path.exists(path)  # removed on exit
    return server


# --- handshake ----------------------------------------------------------------------------


def test_handshake_list_info_go_and_unsupported_options(tmp_path):
    rec = Recorder(3 * CLUSTER_SIZE + 4608)
    other = Recorder(CLUSTER_SIZE * 7)

    async def body(server, path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # only this user may write
        c = await Client.connect(path)
        await c.greeting()
        await c.option(nbd.NBD_OPT_LIST)
        names = []
        while True:
            _, rtype, data = await c.opt_reply()
            if rtype == nbd.NBD_REP_ACK:
                break
            assert rtype == nbd.NBD_REP_SERVER
            (nlen,) = struct.unpack(">I", data[:4])  # then the name, then its description
            names.append((data[4 : 4 + nlen].decode(), data[4 + nlen :].decode()))
        assert names == [("drive-scsi0", "test export"), ("drive-efidisk0", "test export")]
        for opt in (8, 5, 9, 10, 11, 1234):  # STRUCTURED_REPLY, STARTTLS, META_CONTEXT, ...
            await c.option(opt, b"\0" * 8)
            assert (await c.opt_reply())[1] == nbd.NBD_REP_ERR_UNSUP
        replies = await c.go("nope")
        assert replies[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
        replies = await c.go(
            "drive-scsi0",
            nbd.NBD_OPT_INFO,
            (nbd.NBD_INFO_NAME, nbd.NBD_INFO_DESCRIPTION, nbd.NBD_INFO_BLOCK_SIZE),
        )
        assert replies[-1] == (nbd.NBD_REP_ACK, b"")
        infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies[:-1]}
        size, tflags = struct.unpack(">QH", infos[nbd.NBD_INFO_EXPORT])
        assert size == rec.size
        assert tflags & nbd.NBD_FLAG_SEND_WRITE_ZEROES and tflags & nbd.NBD_FLAG_SEND_FLUSH
        assert not tflags & 2  # not read-only: it takes writes
        assert struct.unpack(">III", infos[nbd.NBD_INFO_BLOCK_SIZE]) == (512, 65536, 1 << 20)
        assert infos[nbd.NBD_INFO_NAME] == b"drive-scsi0"
        assert infos[nbd.NBD_INFO_DESCRIPTION] == b"test export"
        await c.option(nbd.NBD_OPT_GO, b"\0\0")  # malformed GO
        assert (await c.opt_reply())[1] == nbd.NBD_REP_ERR_INVALID
        replies = await c.go("drive-efidisk0")
        assert replies[-1][0] == nbd.NBD_REP_ACK
        assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, CLUSTER_SIZE) == 0
        assert await c.call(nbd.NBD_CMD_FLUSH, 0, 0) == 0
        await c.request(nbd.NBD_CMD_DISC, 0, 0)
        assert await c.closed_by_server()
        c.close()

        # old-style EXPORT_NAME, with the 124 zero bytes when NO_ZEROES is not set
        c = await Client.connect(path)
        await c.greeting(cflags=1)
        await c.option(nbd.NBD_OPT_EXPORT_NAME, b"drive-scsi0")
        size, tflags = struct.unpack(">QH", await c.recv(10))
        assert size == rec.size and await c.recv(124) == bytes(124)
        assert await c.call(nbd.NBD_CMD_WRITE, 0, 4096, b"\1" * 4096) == 0
        c.close()

        c = await Client.connect(path)
        await c.greeting()
        await c.option(nbd.NBD_OPT_ABORT)
        assert (await c.opt_reply())[1] == nbd.NBD_REP_ACK
        assert await c.closed_by_server()
        c.close()

    exports = {"drive-scsi0": rec.export(), "drive-efidisk0": other.export()}
    trio.run(lambda: with_server(tmp_path, exports, body, max_block=1 << 20))
    assert other.writes == [(0, None, CLUSTER_SIZE)] and other.flushes == 1
    assert rec.writes == [(0, b"\1" * 4096, 4096)]


# --- commands and hostile input -------------------------------------------------------


async def connected(path: str, name: str = "d") -> Client:
    c = await Client.connect(path)
    await c.greeting()
    assert (await c.go(name))[-1][0] == nbd.NBD_REP_ACK
    return c


def test_commands_errors_keep_the_connection(tmp_path):
    rec = Recorder(8 * CLUSTER_SIZE)

    async def body(server, path):
        c = await connected(path)
        assert await c.call(nbd.NBD_CMD_READ, 0, 4096) == errno.EPERM
        assert (
            await c.call(
                nbd.NBD_CMD_WRITE, 7 * CLUSTER_SIZE, 2 * CLUSTER_SIZE, bytes(2 * CLUSTER_SIZE)
            )
            == errno.ENOSPC
        )
        assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 8 * CLUSTER_SIZE, 512) == errno.ENOSPC
        assert await c.call(4, 0, CLUSTER_SIZE) == errno.EINVAL  # TRIM: not advertised
        assert await c.call(99, 0, 0) == errno.EINVAL  # unknown command
        assert await c.call(nbd.NBD_CMD_WRITE, 0, 16, bytes(16), flags=1 << 7) == errno.EINVAL
        assert await c.call(nbd.NBD_CMD_WRITE, 0, 0) == errno.EINVAL
        # still serving on the same connection
        assert await c.call(nbd.NBD_CMD_WRITE, 0, 512, b"x" * 512, flags=nbd.NBD_CMD_FLAG_FUA) == 0
        assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, CLUSTER_SIZE, CLUSTER_SIZE, flags=2 | 16) == 0
        c.close()
        assert server.errors == 7

    trio.run(lambda: with_server(tmp_path, {"d": rec.export()}, body))
    assert rec.writes == [(0, b"x" * 512, 512), (CLUSTER_SIZE, None, CLUSTER_SIZE)]


async def _bad_option_magic(c):
    await c.greeting()
    await c.send(struct.pack(">QII", 0xDEADBEEF, nbd.NBD_OPT_GO, 0))


async def _unknown_client_flags(c):
    await c.greeting(cflags=1 | 1 << 9)


async def _not_fixed_newstyle(c):
    await c.greeting(cflags=0)


async def _huge_option(c):
    await c.greeting()
    await c.send(struct.pack(">QII", nbd.IHAVEOPT, nbd.NBD_OPT_GO, 0xFFFFFFFF))


async def _unknown_export_name(c):
    await c.greeting()
    await c.option(nbd.NBD_OPT_EXPORT_NAME, b"../../etc/passwd")


async def _bad_request_magic(c):
    await c.greeting()
    await c.go("d")
    await c.send(struct.pack(">IHHQQI", 0x12345678, 0, nbd.NBD_CMD_WRITE, 1, 0, 512))


async def _huge_write(c):
    await c.greeting()
    await c.go("d")
    await c.request(nbd.NBD_CMD_WRITE, 0, 0xFFFFFFFF)  # then never sends the 4 GiB


async def _truncated_write(c):
    await c.greeting()
    await c.go("d")
    await c.request(nbd.NBD_CMD_WRITE, 0, CLUSTER_SIZE, b"y" * 1000)
    c.sock.shutdown(socket.SHUT_WR)


HOSTILE = {
    "bad option magic": (_bad_option_magic, "bad option magic"),
    "unknown client flags": (_unknown_client_flags, "unknown client flags"),
    "not fixed newstyle": (_not_fixed_newstyle, "fixed newstyle"),
    "huge option": (_huge_option, "too long"),
    "unknown export": (_unknown_export_name, "unknown export"),
    "bad request magic": (_bad_request_magic, "bad request magic"),
    "huge write": (_huge_write, "exceeds max block"),
    "truncated write": (_truncated_write, "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_client_is_disconnected_and_the_server_keeps_serving(tmp_path, case):
    attack, reason = HOSTILE[case]
    rec = Recorder(4 * CLUSTER_SIZE)

    async def body(server, path):
        bad = await Client.connect(path)
        await attack(bad)
        assert await bad.closed_by_server()
        bad.close()
        assert len(server.closed_reasons) == 1 and reason in server.closed_reasons[0]
        good = await connected(path)
        assert await good.call(nbd.NBD_CMD_WRITE, 0, 4096, b"z" * 4096) == 0
        await good.request(nbd.NBD_CMD_DISC, 0, 0)
        assert await good.closed_by_server()
        good.close()

    trio.run(lambda: with_server(tmp_path, {"d": rec.export()}, body))
    assert rec.writes == [(0, b"z" * 4096, 4096)]  # nothing of the hostile client got through


def test_replies_out_of_order_and_requests_concurrent(tmp_path):
    """Request 1 cannot complete before request 2 has started: a server that
    handled one request at a time would deadlock here (caught by fail_after)."""
    second_started = trio.Event()
    order = []

    async def on_write(offset, data):
        if offset == 0:
            await second_started.wait()
        else:
            second_started.set()
        order.append(offset)

    async def on_zero(offset, length):
        raise AssertionError("not used")

    async def body(server, path):
        c = await connected(path)
        first = await c.request(nbd.NBD_CMD_WRITE, 0, 512, bytes(512))
        second = await c.request(nbd.NBD_CMD_WRITE, CLUSTER_SIZE, 512, bytes(512))
        assert [await c.reply(), await c.reply()] == [(second, 0), (first, 0)]
        c.close()

    trio.run(
        lambda: with_server(tmp_path, {"d": Export(2 * CLUSTER_SIZE, on_write, on_zero)}, body)
    )
    assert order == [CLUSTER_SIZE, 0]


def test_write_buffers_are_reused_and_released_after_the_callback(tmp_path):
    """Payloads land in receive buffers the server reuses; the view a callback got
    is released once it returns, so one kept by mistake fails loudly instead of
    silently showing a later request's data."""
    kept: list[memoryview] = []
    copies: dict[int, bytes] = {}
    owners = []  # kept alive, so distinct buffers have distinct ids

    async def on_write(offset, data):
        kept.append(data)
        owners.append(data.obj)
        copies[offset] = bytes(data)
        await trio.sleep(0)  # let the next request be received meanwhile

    async def on_zero(offset, length):
        raise AssertionError("not used")

    payloads = {i * CLUSTER_SIZE: os.urandom(CLUSTER_SIZE // (1 + i % 3)) for i in range(64)}

    async def body(server, path):
        c = await connected(path)
        for off, payload in payloads.items():
            await c.request(nbd.NBD_CMD_WRITE, off, len(payload), payload)
        assert sorted([err for _, err in [await c.reply() for _ in payloads]]) == [0] * 64
        c.close()

    trio.run(
        lambda: with_server(
            tmp_path, {"d": Export(64 * CLUSTER_SIZE, on_write, on_zero)}, body, max_in_flight=4
        )
    )
    assert copies == payloads
    assert len({id(o) for o in owners}) <= 5  # max_in_flight in use + one being received
    with pytest.raises(ValueError):
        bytes(kept[0])  # released


def test_callback_errors_map_to_nbd_errors(tmp_path):
    async def on_write(offset, data):
        if offset == 0:
            raise nbd.NbdCommandError(errno.ENOSPC)
        raise RuntimeError("bug in a callback")

    async def on_zero(offset, length):
        raise ValueError("unaligned")

    async def body(server, path):
        c = await connected(path)
        assert await c.call(nbd.NBD_CMD_WRITE, 0, 512, bytes(512)) == errno.ENOSPC
        assert await c.call(nbd.NBD_CMD_WRITE, 512, 512, bytes(512)) == errno.EIO
        assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, 512) == errno.EINVAL
        assert await c.call(nbd.NBD_CMD_FLUSH, 0, 0) == 0  # no on_flush: nothing to do
        c.close()

    trio.run(lambda: with_server(tmp_path, {"d": Export(CLUSTER_SIZE, on_write, on_zero)}, body))


def test_packer_export_rejects_unaligned_writes_and_conflicts(tmp_path):
    async def main():
        async with Packer(io.BytesIO(), [("d", 4 * CLUSTER_SIZE)]) as p:

            async def body(server, path):
                c = await connected(path)
                assert await c.call(nbd.NBD_CMD_WRITE, 4096, 4096, b"a" * 4096) == errno.EINVAL
                data = b"b" * CLUSTER_SIZE
                assert await c.call(nbd.NBD_CMD_WRITE, 0, CLUSTER_SIZE, data) == 0
                assert await c.call(nbd.NBD_CMD_WRITE, 0, CLUSTER_SIZE, data) == 0  # identical
                assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, CLUSTER_SIZE) == errno.EIO
                c.close()

            await with_server(tmp_path, {"d": p.export("d")}, body)
            assert p.duplicates_dropped == 1

    trio.run(main)


# --- real QEMU as the client ---------------------------------------------------------------


def make_qcow2(qemu, path, size: int, script: list[str]) -> None:
    subprocess.run([qemu.qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    args = [a for cmd in script for a in ("-c", cmd)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(path)], check=True, capture_output=True)


def raw_sha256(qemu, src, tmp_path) -> str:
    raw = tmp_path / (src.name + ".raw")
    subprocess.run([qemu.qemu_img, "convert", "-O", "raw", str(src), str(raw)], check=True)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.unlink()
    return digest


@pytest.mark.qemu
def test_qemu_img_convert_into_the_archive(tmp_path, require_qemu):
    """Two disks written concurrently by two qemu-img processes; sha256 round trip."""
    disks = {
        "drive-scsi0": (
            64 * 1024 * 1024 + 4608,
            [
                "write -P 0xab 0 1M",  # data
                "write -z 2M 1M",  # zero clusters
                "write -P 0x11 5M 4k",  # one 4 KiB block in a cluster
                "write -P 0 10M 128k",  # allocated, but zeros
                "write -P 0x22 64M 4608",  # the final partial cluster
            ],
        ),  # everything else: unallocated
        "drive-efidisk0": (540672, ["write -P 0x5e 0 256k", "write -P 0x77 512k 16k"]),
    }
    sources = {}
    for name, (size, script) in disks.items():
        sources[name] = tmp_path / f"{name}.qcow2"
        make_qcow2(require_qemu, sources[name], size, script)
    sock = str(tmp_path / "nbd.sock")
    target = tmp_path / "vzdump-qemu-100.vma"

    async def main(out):
        devices = [(name, size) for name, (size, _) in disks.items()]
        async with Packer(out, devices, [("qemu-server.conf", b"name: t\n")]) as packer:
            exports = {name: packer.export(name) for name in disks}
            server = NbdServer(sock, exports, max_block=1 << 20)
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                async with trio.open_nursery() as jobs:
                    for name, src in sources.items():
                        # -S 0: qemu-img's own 4 KiB sparse detection would send
                        # sub-cluster writes, which a backup job never does
                        cmd = [
                            require_qemu.qemu_img,
                            "convert",
                            "-n",
                            "-S",
                            "0",
                            "-O",
                            "raw",
                            str(src),
                            f"nbd+unix:///{name}?socket={sock}",
                        ]
                        jobs.start_soon(lambda c=cmd: trio.run_process(c, capture_stderr=True))
                n.cancel_scope.cancel()
            assert packer.missing() == {1: 0, 2: 0}
            await packer.finish()
            return server

    with ArchiveOutput(target) as out:
        server = trio.run(main, out)
        out.commit()
    assert server.errors == 0
    with Archive.open(target) as archive:
        for dev in archive.devices:
            got = hashlib.sha256(archive.read(dev.dev_id, 0, dev.size)).hexdigest()
            assert got == raw_sha256(require_qemu, sources[dev.name], tmp_path), dev.name
        # zero detection: far less stored than the disk sizes
        assert archive.stored_bytes(1) < 4 * 1024 * 1024


@pytest.mark.qemu
def test_qemu_io_writes_land_and_reads_fail(tmp_path, require_qemu):
    rec = Recorder(1 << 20)

    async def body(server, path):
        cmd = [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read 0 64k",
            "-c",
            "write -z 64k 64k",
            f"nbd+unix:///d?socket={path}",
        ]
        proc = await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
        out = proc.stdout.decode() + proc.stderr.decode()
        assert "wrote 65536/65536 bytes at offset 0" in out
        assert "read failed: Operation not permitted" in out
        assert proc.returncode != 0

    trio.run(lambda: with_server(tmp_path, {"d": rec.export()}, body))
    assert rec.writes == [
        (0, b"\x5a" * CLUSTER_SIZE, CLUSTER_SIZE),
        (CLUSTER_SIZE, None, CLUSTER_SIZE),
    ]
