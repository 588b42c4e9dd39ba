"""vmafs serve's zero-copy READ replies: a plain archive's bytes go out with
sendfile (from the event loop while they are in the page cache, from a
worker thread otherwise).  Exact bytes with holes and partly stored
clusters, every reply kind, many clients, clients that stop reading, a
SIGTERM during a stalled reply, and an archive that shrinks under a reply."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess

import pytest
import trio
from conftest import FIXTURES_DIR
from nbd_client import Client
from serve_support import TIMEOUT, evict, served
from test_serve_protocol import read_structured, simple, structured
from vmafactory import build_archive, sparse_disk

from vmafs.archive import Archive
from vmafs.format import BLOCK_SIZE
from vmafs.nbd import protocol as nbd
from vmafs.nbd.filesend import FileRange, cached
from vmafs.serve.run import open_server

MiB = 1 << 20
#: reads this large are never answered inline (copied): always file ranges
BIG = 4 * MiB


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(archive path, {dev_id: content}): two disks of random data with holes,
    clusters with only some 4 KiB blocks stored, a ragged tail, in shuffled order."""
    disks = {
        "drive-scsi0": sparse_disk(24 * MiB, 7, zero_clusters=0.2, zero_blocks=0.25),
        "drive-scsi1": sparse_disk(9 * MiB + 3 * BLOCK_SIZE + 512, 8, zero_blocks=0.5),
    }
    path = tmp_path_factory.mktemp("zerocopy") / "mixed.vma"
    build_archive(disks, order="shuffled", seed=3).write(path)
    return path, {1: disks["drive-scsi0"], 2: disks["drive-scsi1"]}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """(archive path, content): one 24 MiB disk stored whole, clusters in order
    (a 4 MiB read is one range of the archive file)."""
    content = sparse_disk(24 * MiB, 9, zero_clusters=0.0, zero_blocks=0.0)
    path = tmp_path_factory.mktemp("zerocopy") / "dense.vma"
    build_archive({"drive-scsi0": content}).write(path)
    return path, content


def _copy(src, tmp_path):
    return shutil.copy(src, tmp_path / os.path.basename(src))


async def _serving(archive, path, body, *, limiter_tokens=None, guard=120, **kw):
    server = open_server(archive, socket=path)
    if limiter_tokens is not None:  # the exports share one limiter
        next(iter(server.exports.values())).limiter.total_tokens = limiter_tokens
    for key, value in kw.items():
        setattr(server, key, value)
    with trio.fail_after(guard):  # a hang is a failure, not a timing assertion
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            await body(server)
            n.cancel_scope.cancel()
    return server


def serve_in_process(archive, tmp_path, body, **kw):
    return trio.run(lambda: _serving(archive, str(tmp_path / "s.sock"), body, **kw))


async def read_simple(c: Client, offset: int, length: int, flags: int = 0) -> bytes:
    cookie = await c.request(nbd.NBD_CMD_READ, offset, length, flags=flags)
    kind, got, err, data = await c.any_reply(length)
    assert (kind, got, err) == ("simple", cookie, 0)
    return data


# --- exact bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_large_reads_are_sent_from_the_file_with_exact_bytes(mixed, tmp_path, cache):
    """Structured replies (holes as OFFSET_HOLE), DF replies (one data chunk,
    holes as zeros) and simple replies: every byte right, and every stored
    byte sent from the archive file (sent_from_files counts exactly those).
    Cold: the archive is out of the page cache before each read, so the
    ranges go through worker threads."""
    src, content = mixed
    with Archive.open(_copy(src, tmp_path)) as archive:
        # the bytes each disk stores (clipped at its end), in the archive file
        stored = {
            d: sum(p[2] for p in archive.segments(d, 0, len(c)) if type(p) is tuple)
            for d, c in content.items()
        }

        def fresh() -> None:
            if cache == "cold":
                evict(archive.path)
                assert not cached(FileRange(archive.fd, 0, os.path.getsize(archive.path)))

        async def body(server):
            passes = 0
            for dev_id, want in content.items():
                name = archive.device(dev_id).name
                c = await structured(server.socket_path, name)
                for flags in (0, nbd.NBD_CMD_FLAG_DF):
                    got = bytearray()
                    for off in range(0, len(want), BIG):
                        fresh()
                        data, seen = await read_structured(c, off, min(BIG, len(want) - off), flags)
                        if flags:  # DF: one data chunk, whatever holes it covers
                            assert [t for t, _, _ in seen] == [nbd.NBD_REPLY_TYPE_OFFSET_DATA]
                        got += data
                    assert got == want, (name, flags)
                    passes += 1
                c.close()
                c = await simple(server.socket_path, name)
                got = bytearray()
                for off in range(0, len(want), BIG):
                    fresh()
                    got += await read_simple(c, off, min(BIG, len(want) - off))
                assert got == want, name
                passes += 1
                c.close()
            assert server.sent_from_files == 3 * sum(stored.values())

        serve_in_process(archive, tmp_path, body)


def test_fixture_disks_over_sendfile_match_their_checksums(tmp_path):
    """The Proxmox-written fixture (partly stored clusters in its ext4 image):
    whole disks in 4 MiB and 32 MiB reads hash to the manifest's sha256."""
    path = _copy(FIXTURES_DIR / "ext4-guest.vma", tmp_path)
    manifest = json.loads((FIXTURES_DIR / "ext4-guest.vma.json").read_text())
    with Archive.open(path) as archive:

        async def body(server):
            for dev in manifest["devices"]:
                for step in (BIG, 32 * MiB):
                    c = await structured(server.socket_path, dev["name"])
                    h = hashlib.sha256()
                    for off in range(0, dev["size"], step):
                        data, _ = await read_structured(c, off, min(step, dev["size"] - off))
                        h.update(data)
                    assert h.hexdigest() == dev["sha256"], (dev["name"], step)
                    c.close()
            assert server.sent_from_files > 0

        serve_in_process(archive, tmp_path, body)


@pytest.mark.qemu
@pytest.mark.slow
def test_real_clients_many_at_once(require_qemu, require_nbd_tools, mixed, tmp_path):
    """nbdcopy (4 connections each) and qemu-img convert, several at once,
    against one `vmafs serve`: every copy equals the disk."""
    src, content = mixed
    with served(_copy(src, tmp_path), tmp_path) as srv:
        procs = []
        for i in range(4):
            dev_id = 1 + i % 2
            out = tmp_path / f"copy{i}.raw"
            uri = srv.uri(f"drive-scsi{dev_id - 1}")
            cmd = (
                [require_nbd_tools.nbdcopy, "--connections=4", uri, str(out)]
                if i < 2
                else [require_qemu.qemu_img, "convert", "-O", "raw", uri, str(out)]
            )
            procs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), out, dev_id))
        for proc, out, dev_id in procs:
            _, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err
            assert out.read_bytes() == content[dev_id], out.name


# --- clients that stop reading ----------------------------------------------------------------


async def _stall(path: str, offset: int) -> Client:
    """A client whose 4 MiB READ at *offset* is under way: it read the reply's
    first bytes (so the header is out), then stops reading."""
    c = await structured(path)
    await c.request(nbd.NBD_CMD_READ, offset, BIG)
    await c.recv(4096)
    return c


def test_clients_that_stop_reading_hold_no_worker_thread(dense, tmp_path):
    """Cold ranges are sent from worker threads, 2 at most here: 4 clients
    stall in the middle of such replies, and a 5th client (cold too) still
    reads a whole region, right."""
    src, content = dense
    with Archive.open(_copy(src, tmp_path)) as archive:

        async def body(server):
            evict(archive.path)
            assert not cached(FileRange(archive.fd, 0, os.path.getsize(archive.path)))
            stalled = []
            try:
                for i in range(4):
                    stalled.append(await _stall(server.socket_path, i * BIG))
                evict(archive.path)  # what the stalled replies hold stays; the rest is cold
                c = await structured(server.socket_path)
                got = bytearray()
                for off in range(16 * MiB, 24 * MiB, MiB):
                    data, _ = await read_structured(c, off, MiB)
                    got += data
                assert got == content[16 * MiB : 24 * MiB]
                c.close()
            finally:  # a failure must not leave threads sending to them
                for s in stalled:
                    s.close()

        serve_in_process(archive, tmp_path, body, limiter_tokens=2, guard=60)


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_sigterm_during_a_stalled_reply_exits(dense, tmp_path, cache):
    """A client stops reading in the middle of a reply sent from the event loop
    (warm) or from a worker thread (cold); SIGTERM still stops the server
    (stop() fails if it does not exit), and another client was served meanwhile."""
    src, content = dense
    path = _copy(src, tmp_path)

    async def clients(sock: str) -> list[socket.socket]:
        """The stalled clients' sockets (outliving this trio run)."""
        if cache == "cold":
            evict(path)
        stalled = []
        for offset in (0, BIG):
            c = await _stall(sock, offset)
            stalled.append(socket.socket(fileno=os.dup(c.sock.fileno())))
            c.close()
        c = await structured(sock)
        data, _ = await read_structured(c, 8 * MiB, BIG)
        assert data == content[8 * MiB : 8 * MiB + BIG]
        c.close()
        return stalled

    with served(path, tmp_path) as srv:
        stalled = trio.run(clients, str(srv.socket))
        try:
            srv.stop()  # asserts the daemon is gone
        finally:
            for s in stalled:
                s.close()


# --- an archive that shrinks ------------------------------------------------------------------


def test_archive_shrunk_under_a_reply_closes_that_connection(dense, tmp_path, caplog):
    """The header and the first bytes of a 4 MiB data chunk are out when the
    archive is cut short: the rest cannot be sent, so the connection is
    closed (log line with the export and the request), the client gets only
    right bytes then EOF, and another client goes on."""
    src, content = dense
    path = _copy(src, tmp_path)
    with Archive.open(path) as archive:
        [(fd, cut_from, _)] = archive.segments(1, MiB, MiB)

        async def body(server):
            other = await structured(server.socket_path)
            c = await structured(server.socket_path)
            cookie = await c.request(nbd.NBD_CMD_READ, 0, BIG)
            magic, flags, rtype, got_cookie, length = struct.unpack(">IHHQI", await c.recv(20))
            assert (magic, rtype, got_cookie) == (
                nbd.STRUCTURED_REPLY_MAGIC,
                nbd.NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
            )
            assert length == 8 + BIG and struct.unpack(">Q", await c.recv(8)) == (0,)
            os.truncate(path, cut_from)  # device bytes from 1 MiB on are gone
            got = bytearray()
            while True:
                data = await c.sock.recv(1 << 20)
                if not data:
                    break
                got += data
            assert MiB <= len(got) < BIG  # what was sent before the cut, and no more
            assert got == content[: len(got)]
            c.close()
            while not any("ended at offset" in r for r in server.closed_reasons):
                await trio.sleep(0.01)  # the client saw EOF; the server logs right after
            # the other connection is unharmed: bytes before the cut are still served
            data, _ = await read_structured(other, 0, 512 * 1024)
            assert data == content[: 512 * 1024]
            other.close()

        with caplog.at_level("WARNING", logger="vmafs.serve"):
            serve_in_process(archive, tmp_path, body)
    [line] = [r.getMessage() for r in caplog.records if "ended at offset" in r.getMessage()]
    assert "'drive-scsi0'" in line and "READ at 0+4194304" in line and f"{cut_from}" in line


def test_archive_shrunk_before_a_read_gets_an_error_reply(dense, tmp_path):
    """Cut short before the read: the size check before sending finds it, the
    read gets EIO with the reason, and the connection goes on."""
    src, content = dense
    path = _copy(src, tmp_path)
    with Archive.open(path) as archive:
        [(_, cut_from, _)] = archive.segments(1, 8 * MiB, MiB)

        async def body(server):
            c = await structured(server.socket_path)
            os.truncate(path, cut_from)
            err, message = await read_structured(c, 6 * MiB, BIG)
            assert err == errno.EIO and "shrank" in message, message
            data, _ = await read_structured(c, 0, BIG)  # still open, still right
            assert data == content[:BIG]
            c.close()
            assert server.sent_from_files == BIG

        serve_in_process(archive, tmp_path, body)


def test_cached_tells_what_the_page_cache_holds(dense, tmp_path):
    """The event loop sends a range itself only when cached() says every page is
    in memory: a dropped file is not, a read one is, a range past the end is not."""
    path = _copy(dense[0], tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.path.getsize(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        evict(path)
        assert not cached(FileRange(fd, 0, size))
        os.pread(fd, 2 * MiB, MiB)
        assert cached(FileRange(fd, MiB, 2 * MiB))
        assert cached(FileRange(fd, MiB + 100, 4096))
        assert not cached(FileRange(fd, MiB, 12 * MiB))  # the rest is still on disk
        os.pread(fd, size, 0)
        assert cached(FileRange(fd, 0, size))
        assert not cached(FileRange(fd, size - 4096, 8192))  # past the end
    finally:
        os.close(fd)
