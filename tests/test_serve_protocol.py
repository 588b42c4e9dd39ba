"""vmafs serve's exports at the protocol level: a raw-socket client against the
server in-process (negotiation, structured reads, block status, refusals,
hostile clients).  Real clients (qemu-img, nbdinfo, QEMU) are in test_serve.py."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct

import pytest
import trio
from conftest import FIXTURES_DIR
from nbd_client import Client
from serve_support import evict, offset_map

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE
from vmafs.nbd import protocol as nbd
from vmafs.serve.run import open_server


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "two-disks.vma"
    shutil.copy(FIXTURES_DIR / "two-disks.vma", path)
    with Archive.open(path) as a:
        yield a


async def with_server(archive, tmp_path, body, threads=False, **kw):
    server = open_server(archive, socket=str(tmp_path / "s.sock"), threads=threads)
    if archive.source.kind == "plain":  # compressed archives always read in threads
        assert all(e.inline != threads for e in server.exports.values())
    for key, value in kw.items():
        setattr(server, key, value)
    with trio.fail_after(120):  # a hang is a failure, not a timing assertion
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            await body(server, server.socket_path)
            n.cancel_scope.cancel()
    return server


def run(archive, tmp_path, body, threads=False, **kw):
    return trio.run(lambda: with_server(archive, tmp_path, body, threads, **kw))


async def structured(path: str, name: str = "drive-scsi0", contexts=("base:allocation",)):
    """A client in transmission on *name* with structured replies and *contexts*."""
    c = await Client.connect(path)
    await c.greeting()
    await c.option(nbd.NBD_OPT_STRUCTURED_REPLY)
    assert (await c.opt_reply())[1] == nbd.NBD_REP_ACK
    if contexts:
        replies = await c.meta(nbd.NBD_OPT_SET_META_CONTEXT, name, list(contexts))
        assert replies[-1][0] == nbd.NBD_REP_ACK
    assert (await c.go(name))[-1][0] == nbd.NBD_REP_ACK
    return c


async def simple(path: str, name: str = "drive-scsi0") -> Client:
    c = await Client.connect(path)
    await c.greeting()
    assert (await c.go(name))[-1][0] == nbd.NBD_REP_ACK
    return c


async def read_structured(c: Client, offset: int, length: int, flags: int = 0):
    """(bytes, [(chunk type, offset, length)]) of a structured READ."""
    cookie = await c.request(nbd.NBD_CMD_READ, offset, length, flags=flags)
    buf = bytearray(length)
    seen = []
    for rtype, payload in await c.chunks(cookie):
        if rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack(">Q", payload[:8])
            buf[off - offset : off - offset + len(payload) - 8] = payload[8:]
            seen.append((rtype, off, len(payload) - 8))
        elif rtype == nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", payload)
            seen.append((rtype, off, n))
        else:
            err, mlen = struct.unpack(">IH", payload[:6])
            return err, payload[6 : 6 + mlen].decode()
    return bytes(buf), seen


async def block_status(c: Client, offset: int, length: int, flags: int = 0):
    cookie = await c.request(nbd.NBD_CMD_BLOCK_STATUS, offset, length, flags=flags)
    [(rtype, payload)] = await c.chunks(cookie)
    if rtype != nbd.NBD_REPLY_TYPE_BLOCK_STATUS:
        return struct.unpack(">I", payload[:4])[0]
    (ctx,) = struct.unpack(">I", payload[:4])
    assert ctx == 1
    return [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]


def merged(extents):
    out = []
    for start, stop, hole in extents:
        if out and out[-1][2] == hole and out[-1][1] == start:
            out[-1] = (out[-1][0], stop, hole)
        else:
            out.append((start, stop, hole))
    return out


# --- negotiation ---------------------------------------------------------------------------


def test_list_info_aliases_and_options(archive, tmp_path):
    async def body(server, path):
        c = await Client.connect(path)
        await c.greeting()
        await c.option(nbd.NBD_OPT_LIST)
        replies = await c.opt_replies(nbd.NBD_OPT_LIST)
        assert replies[-1][0] == nbd.NBD_REP_ACK
        names = []
        for rtype, data in replies[:-1]:
            assert rtype == nbd.NBD_REP_SERVER
            (n,) = struct.unpack(">I", data[:4])
            names.append(data[4 : 4 + n].decode())
            assert b"two-disks.vma" in data[4 + n :]  # the description
        assert names == ["drive-scsi0", "drive-scsi1"]  # aliases are not listed

        # INFO through the alias: size, read-only flags, block sizes
        infos = (nbd.NBD_INFO_NAME, nbd.NBD_INFO_DESCRIPTION, nbd.NBD_INFO_BLOCK_SIZE)
        replies = await c.go("scsi1", nbd.NBD_OPT_INFO, infos)
        assert replies[-1] == (nbd.NBD_REP_ACK, b"")
        info = {struct.unpack(">H", d[:2])[0]: d[2:] for _, d in replies[:-1]}
        size, tflags = struct.unpack(">QH", info[nbd.NBD_INFO_EXPORT])
        assert size == archive.device(2).size
        for flag in ("READ_ONLY", "SEND_FLUSH", "SEND_CACHE", "CAN_MULTI_CONN", "SEND_DF"):
            assert tflags & getattr(nbd, f"NBD_FLAG_{flag}"), flag
        assert not tflags & (nbd.NBD_FLAG_SEND_TRIM | nbd.NBD_FLAG_SEND_WRITE_ZEROES)
        assert struct.unpack(">III", info[nbd.NBD_INFO_BLOCK_SIZE]) == (512, 65536, 32 << 20)
        assert info[nbd.NBD_INFO_NAME] == b"scsi1"

        assert (await c.go("drive-nope"))[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
        assert (await c.go(""))[-1][0] == nbd.NBD_REP_ERR_UNKNOWN  # two disks: no default
        # meta contexts need structured replies first
        r = await c.meta(nbd.NBD_OPT_SET_META_CONTEXT, "scsi0", ["base:allocation"])
        assert r[-1][0] == nbd.NBD_REP_ERR_INVALID
        for opt in (nbd.NBD_OPT_STARTTLS, 11, 4, 0xABCD):  # no TLS configured, unknown
            await c.option(opt)
            assert (await c.opt_reply())[1] == nbd.NBD_REP_ERR_UNSUP
        await c.option(nbd.NBD_OPT_STRUCTURED_REPLY)
        assert (await c.opt_reply())[1] == nbd.NBD_REP_ACK
        r = await c.meta(nbd.NBD_OPT_LIST_META_CONTEXT, "scsi0", [])
        assert r == [(nbd.NBD_REP_META_CONTEXT, b"\0\0\0\0base:allocation"), (nbd.NBD_REP_ACK, b"")]
        r = await c.meta(nbd.NBD_OPT_SET_META_CONTEXT, "scsi0", ["qemu:dirty-bitmap:x"])
        assert r == [(nbd.NBD_REP_ACK, b"")]  # not ours: no context, no error
        r = await c.meta(nbd.NBD_OPT_SET_META_CONTEXT, "nope", ["base:allocation"])
        assert r[-1][0] == nbd.NBD_REP_ERR_UNKNOWN
        await c.option(nbd.NBD_OPT_ABORT)
        assert (await c.opt_reply())[1] == nbd.NBD_REP_ACK
        assert await c.closed_by_server()
        c.close()

        # old-style EXPORT_NAME through an alias, with the 124 zero bytes
        c = await Client.connect(path)
        await c.greeting(cflags=1)
        await c.option(nbd.NBD_OPT_EXPORT_NAME, b"scsi0")
        size, _ = struct.unpack(">QH", await c.recv(10))
        assert size == archive.device(1).size and await c.recv(124) == bytes(124)
        cookie = await c.request(nbd.NBD_CMD_READ, 0, 4096)
        assert await c.any_reply(4096) == ("simple", cookie, 0, archive.read(1, 0, 4096))
        c.close()

    run(archive, tmp_path, body)


# --- reads and block status --------------------------------------------------------------------


@pytest.mark.parametrize("kind", [".vma", ".vma.zst", ".vma.gz", ".vma.lzo"])
def test_reads_and_block_status_match_the_offset_map(tmp_path, kind):
    """Every disk, whole: block status = the stored/zero ranges of the offset map,
    structured reads send those holes as OFFSET_HOLE and the data byte-exact."""
    src = FIXTURES_DIR / f"two-disks{kind}"
    shutil.copy(src, tmp_path / src.name)
    with Archive.open(tmp_path / src.name) as a:

        async def body(server, path):
            for dev in a.devices:
                want = offset_map(a, dev.dev_id)
                assert any(h for _, _, h in want) and any(not h for _, _, h in want)
                c = await structured(path, dev.name)
                got, pos = [], 0
                while pos < dev.size:  # the client asks again from where a reply stopped
                    for n, flags in await block_status(c, pos, dev.size - pos):
                        assert flags in (0, nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO)
                        got.append((pos, pos + n, flags != 0))
                        pos += n
                assert merged(got) == want
                # one extent only with REQ_ONE
                [(n, flags)] = await block_status(c, 0, dev.size, nbd.NBD_CMD_FLAG_REQ_ONE)
                assert (n, bool(flags)) == (want[0][1], want[0][2])

                data, seen = await read_structured(c, 0, dev.size)
                assert data == a.read(dev.dev_id, 0, dev.size)
                hole = nbd.NBD_REPLY_TYPE_OFFSET_HOLE
                holes = [(o, o + n, True) for t, o, n in seen if t == hole]
                assert holes == [w for w in want if w[2]]  # no zero bytes crossed the wire
                # DF: one data chunk, holes as zeros
                data, seen = await read_structured(c, 0, dev.size, nbd.NBD_CMD_FLAG_DF)
                assert data == a.read(dev.dev_id, 0, dev.size)
                assert [t for t, _, _ in seen] == [nbd.NBD_REPLY_TYPE_OFFSET_DATA]
                # an unaligned tail that ends at the disk's end is fine
                tail = dev.size - 4096 - 512
                data, _ = await read_structured(c, tail, dev.size - tail)
                assert data == a.read(dev.dev_id, tail, dev.size)
                c.close()

        run(a, tmp_path, body)


@pytest.mark.parametrize("name", ["two-disks.vma", "zero-disk.vma", "unaligned.vma"])
def test_is_hole_agrees_with_next_data_everywhere(tmp_path, name):
    """The O(1) test small reads use is the lseek rule, cluster by cluster."""
    shutil.copy(FIXTURES_DIR / name, tmp_path / name)
    with Archive.open(tmp_path / name) as a:
        for dev in a.devices:
            for off in range(0, dev.size, CLUSTER_SIZE // 2):
                assert a.is_hole(dev.dev_id, off) == (a.next_data(dev.dev_id, off) != off), off


def test_simple_replies_read_holes_as_zeros(archive, tmp_path):
    async def body(server, path):
        c = await simple(path, "scsi0")
        size = archive.device(1).size
        cookie = await c.request(nbd.NBD_CMD_READ, 0, size)
        assert await c.any_reply(size) == ("simple", cookie, 0, archive.read(1, 0, size))
        c.close()

    run(archive, tmp_path, body)


def test_refused_requests_keep_the_connection(archive, tmp_path):
    size = 5242880  # drive-scsi0

    async def body(server, path):
        c = await structured(path, contexts=())
        for cmd, off, n, flags, payload, err in [
            (nbd.NBD_CMD_WRITE, 0, 512, 0, b"w" * 512, errno.EPERM),
            (nbd.NBD_CMD_WRITE_ZEROES, 0, 4096, 0, b"", errno.EPERM),
            (nbd.NBD_CMD_TRIM, 0, 4096, 0, b"", errno.EPERM),
            (99, 0, 512, 0, b"", errno.EINVAL),  # unknown command
            (nbd.NBD_CMD_CACHE, 0, 512, 1, b"", errno.EINVAL),  # unknown flag
            (nbd.NBD_CMD_FLUSH, 0, 0, 0, b"", 0),
            (nbd.NBD_CMD_CACHE, 0, size, 0, b"", 0),
        ]:
            cookie = await c.request(cmd, off, n, payload, flags)
            assert await c.any_reply() == ("simple", cookie, err, b""), cmd
        for off, n, err in [
            (size - 512, 1024, errno.EINVAL),  # past the end
            (1 << 62, 512, errno.EINVAL),
            (100, 512, errno.EINVAL),  # misaligned
            (0, 100, errno.EINVAL),
            (0, 0, errno.EINVAL),
            (0, (32 << 20) + 512, errno.EOVERFLOW),  # over the maximum block size
        ]:
            cookie = await c.request(nbd.NBD_CMD_READ, off, n)
            [(rtype, payload)] = await c.chunks(cookie)
            assert rtype == nbd.NBD_REPLY_TYPE_ERROR
            assert struct.unpack(">I", payload[:4])[0] == err, (off, n)
        # BLOCK_STATUS without a negotiated context
        assert await block_status(c, 0, 4096) == errno.EINVAL
        # still serving
        data, _ = await read_structured(c, 0, 8192)
        assert data == archive.read(1, 0, 8192)
        await c.request(nbd.NBD_CMD_DISC, 0, 0)
        assert await c.closed_by_server()
        c.close()
        assert server.errors == 12
        assert not server.closed_reasons

    run(archive, tmp_path, body)


@pytest.mark.parametrize("threads", [False, True], ids=["inline", "threads"])
def test_many_clients_at_once(archive, tmp_path, threads):
    want = {d.dev_id: archive.read(d.dev_id, 0, d.size) for d in archive.devices}

    async def reader(path, i, results):
        dev = archive.devices[i % 2]
        c = await structured(path, dev.name)
        step = 5 * CLUSTER_SIZE
        got = bytearray()
        for off in range(0, dev.size, step):
            n = min(step, dev.size - off)
            data, _ = await read_structured(c, off, n)
            got += data
        results[i] = bytes(got) == want[dev.dev_id]
        c.close()

    async def body(server, path):
        results = {}
        async with trio.open_nursery() as n:
            for i in range(24):
                n.start_soon(reader, path, i, results)
        assert results == dict.fromkeys(range(24), True)

    run(archive, tmp_path, body, threads)


@pytest.mark.parametrize("mode", ["inline", "threads", "cold"])
def test_a_batch_of_requests_in_one_write_gets_every_reply_right(archive, tmp_path, mode):
    """Requests that arrive together are answered together (the replies of
    small reads are held back until no whole request is left to read, and
    their buffers are reused once sent): each reply still carries its own
    request's bytes, holes, errors and block status.  Cold: the archive is
    not in the page cache, so the reader hands its reads to worker threads."""
    threads = mode == "threads"
    size = archive.device(1).size
    sizes = [4096, 512, 65536, 131072, 262144, 8192]
    # distinct data (the first MiB is all data), then runs across holes and data
    reads = [((i * 7 * 4096) % (1 << 19), sizes[i % len(sizes)]) for i in range(60)]
    reads += [(2555904, 131072), (3080192, 262144), (5111808, 131072)]

    async def body(server, path):
        c = await structured(path)
        batch = b"".join(
            struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.NBD_CMD_READ, i, off, n)
            for i, (off, n) in enumerate(reads)
        )
        head = struct.Struct(">IHHQQI")
        batch += head.pack(nbd.REQUEST_MAGIC, 0, nbd.NBD_CMD_READ, 100, size, 512)  # past the end
        batch += head.pack(nbd.REQUEST_MAGIC, 0, nbd.NBD_CMD_BLOCK_STATUS, 101, 0, size)
        if mode == "cold":
            evict(archive.path)
            with pytest.raises(BlockingIOError):
                archive.readinto(1, 0, bytearray(4096), cached_only=True)
        await c.send(batch)
        got = {i: bytearray(n) for i, (_, n) in enumerate(reads)}
        done, error, extents = set(), None, None
        while len(done) < len(reads) + 2:
            _, cookie, flags, rtype, payload = await c.any_reply()
            if rtype == nbd.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                start = off - reads[cookie][0]
                got[cookie][start : start + len(payload) - 8] = payload[8:]
            elif rtype == nbd.NBD_REPLY_TYPE_ERROR:
                error = (cookie, struct.unpack(">I", payload[:4])[0])
            elif rtype == nbd.NBD_REPLY_TYPE_BLOCK_STATUS:
                extents = (cookie, len(payload))
            if flags & nbd.NBD_REPLY_FLAG_DONE:
                done.add(cookie)
        for i, (off, n) in enumerate(reads):
            assert got[i] == archive.read(1, off, n), (i, off, n)
        assert error == (100, errno.EINVAL)
        assert extents is not None and extents[0] == 101
        data, _ = await read_structured(c, 0, 65536)  # and the connection goes on
        assert data == archive.read(1, 0, 65536)
        c.close()

    run(archive, tmp_path, body, threads)


def _server_side(peer) -> socket.socket | None:
    """This process's socket (a dup) whose peer is *peer*: the in-process server's end."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # not a socket
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername() == peer:
                return sock
        except OSError:  # not connected
            pass
        sock.close()
    return None


def test_tcp_connections_send_without_delay(archive):
    """TCP_NODELAY on each accepted connection (replies are whole messages already)."""

    async def main():
        server = open_server(archive, tcp=("127.0.0.1", 0))
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                c = await Client.connect(("127.0.0.1", server.port))
                await c.greeting()  # the server has accepted
                ours = _server_side(c.sock.getsockname())
                assert ours is not None
                with ours:
                    assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert (await c.go("scsi0"))[-1][0] == nbd.NBD_REP_ACK
                assert await c.call(nbd.NBD_CMD_FLUSH, 0, 0) == 0
                c.close()
                n.cancel_scope.cancel()

    trio.run(main)


# --- hostile clients -------------------------------------------------------------------------


async def _option_flood(c):
    await c.greeting()
    await c.send(struct.pack(">QII", nbd.IHAVEOPT, 0xBAD, 0) * 1100)


async def _huge_option(c):
    await c.greeting()
    await c.send(struct.pack(">QII", nbd.IHAVEOPT, nbd.NBD_OPT_GO, 1 << 20))


async def _bad_request_magic(c):
    await c.greeting()
    await c.go("scsi0")
    await c.send(struct.pack(">IHHQQI", 0xBADBAD, 0, nbd.NBD_CMD_READ, 1, 0, 512))


async def _huge_write(c):
    await c.greeting()
    await c.go("scsi0")
    await c.request(nbd.NBD_CMD_WRITE, 0, 0xFFFFFFFF)  # and never the 4 GiB


async def _truncated_request(c):
    await c.greeting()
    await c.go("scsi0")
    await c.send(struct.pack(">IHH", nbd.REQUEST_MAGIC, 0, nbd.NBD_CMD_READ))
    c.sock.shutdown(trio.socket.SHUT_WR)


async def _abandoned_handshake(c):
    await c.greeting()  # then nothing: the handshake times out


async def _garbage_greeting(c):
    await c.recv(18)
    await c.send(b"GET / HTTP/1.1\r\n\r\n")


HOSTILE = {
    "option flood": (_option_flood, "more than 1024 options"),
    "huge option": (_huge_option, "too long"),
    "bad request magic": (_bad_request_magic, "bad request magic"),
    "huge write": (_huge_write, "exceeds max block"),
    "truncated request": (_truncated_request, "truncated"),
    "abandoned handshake": (_abandoned_handshake, "handshake took more than"),
    "garbage greeting": (_garbage_greeting, "client flags"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_client_is_closed_and_others_never_notice(archive, tmp_path, case, caplog):
    attack, reason = HOSTILE[case]

    async def body(server, path):
        good = await structured(path, "scsi0")  # connected before, reading throughout
        bad = await Client.connect(path)
        await attack(bad)
        data, _ = await read_structured(good, 0, 65536)
        assert data == archive.read(1, 0, 65536)
        assert await bad.closed_by_server()
        bad.close()
        assert len(server.closed_reasons) == 1 and reason in server.closed_reasons[0]
        data, _ = await read_structured(good, 65536, 65536)
        assert data == archive.read(1, 65536, 65536)
        good.close()

    with caplog.at_level("WARNING", logger="vmafs.serve"):
        run(archive, tmp_path, body, handshake_timeout=1.0)
    assert any(reason in r.getMessage() for r in caplog.records)  # the log line


def test_half_open_client_still_gets_its_replies(archive, tmp_path):
    """Requests sent, then the client shuts its write side: the replies arrive."""

    async def body(server, path):
        c = await simple(path, "scsi0")
        cookies = [await c.request(nbd.NBD_CMD_READ, i * 65536, 65536) for i in range(8)]
        c.sock.shutdown(trio.socket.SHUT_WR)
        got = {}
        for _ in cookies:
            kind, cookie, err, data = await c.any_reply(65536)
            got[cookie] = (err, data)
        assert got == {k: (0, archive.read(1, i * 65536, 65536)) for i, k in enumerate(cookies)}
        assert await c.closed_by_server()
        c.close()

    run(archive, tmp_path, body)


def test_a_client_that_never_reads_its_replies_blocks_only_itself(archive, tmp_path):
    async def body(server, path):
        greedy = await simple(path, "scsi0")
        for _ in range(64):  # ~64 MiB of replies nobody reads: the socket buffer fills
            await greedy.request(nbd.NBD_CMD_READ, 0, 1 << 20)
        other = await structured(path, "scsi1")
        data, _ = await read_structured(other, 0, 1 << 20)
        assert data == archive.read(2, 0, 1 << 20)
        other.close()
        greedy.close()  # abandoned: the server drops it without a fuss
        with trio.fail_after(30):
            while server.connections:
                await trio.sleep(0.01)

    run(archive, tmp_path, body)
