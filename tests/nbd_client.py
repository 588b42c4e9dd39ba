"""A raw-socket NBD client for protocol-level tests (writer.nbd and vmafs serve).

Just enough NBD to drive a server byte by byte: fixed newstyle, options,
simple and structured replies.  Hostile tests send whatever they like with
:meth:`Client.send`.
"""

from __future__ import annotations

import socket
import struct

import trio

from vmafs.nbd import protocol as nbd


class Client:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.cookie = 0

    @classmethod
    async def connect(cls, where: str | tuple[str, int]) -> Client:
        family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        await sock.connect(where)
        return cls(sock)

    async def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def closed_by_server(self) -> bool:
        try:
            while True:
                data = await self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True

    async def greeting(self, cflags: int = 3) -> None:
        magic, opt, hflags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert hflags == nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES
        await self.send(struct.pack(">I", cflags))

    async def option(self, opt: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    async def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", await self.recv(20))
        assert magic == nbd.REPLY_MAGIC_OPT
        return opt, rtype, await self.recv(length)

    async def opt_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """Replies to *opt* up to and including the first that is not INFO/SERVER/META."""
        replies = []
        while True:
            o, rtype, data = await self.opt_reply()
            assert o == opt
            replies.append((rtype, data))
            if rtype not in (nbd.NBD_REP_INFO, nbd.NBD_REP_SERVER, nbd.NBD_REP_META_CONTEXT):
                return replies

    async def go(self, name: str, opt: int = nbd.NBD_OPT_GO, infos=(nbd.NBD_INFO_BLOCK_SIZE,)):
        raw = name.encode()
        req = (
            struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        )
        await self.option(opt, req)
        return await self.opt_replies(opt)

    async def meta(self, opt: int, name: str, queries: list[str]) -> list[tuple[int, bytes]]:
        raw = name.encode()
        body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            body += struct.pack(">I", len(q)) + q.encode()
        await self.option(opt, body)
        return await self.opt_replies(opt)

    async def request(self, cmd: int, offset: int, length: int, payload=b"", flags=0) -> int:
        self.cookie += 1
        head = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, self.cookie, offset, length)
        await self.send(head + payload)
        return self.cookie

    async def reply(self) -> tuple[int, int]:
        magic, err, cookie = struct.unpack(">IIQ", await self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return cookie, err

    async def call(self, cmd: int, offset: int, length: int, payload=b"", flags=0) -> int:
        cookie = await self.request(cmd, offset, length, payload, flags)
        got, err = await self.reply()
        assert got == cookie
        return err

    async def any_reply(self, read_length: int = 0):
        """One simple reply (``("simple", cookie, err, data)``, *read_length* bytes of data
        when err is 0) or one structured chunk (``("chunk", cookie, flags, type, payload)``)."""
        magic = struct.unpack(">I", await self.recv(4))[0]
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", await self.recv(12))
            data = await self.recv(read_length) if err == 0 and read_length else b""
            return "simple", cookie, err, data
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, cookie, length = struct.unpack(">HHQI", await self.recv(16))
        return "chunk", cookie, flags, rtype, await self.recv(length)

    async def chunks(self, cookie: int) -> list[tuple[int, bytes]]:
        """Every chunk (type, payload) of the structured reply to *cookie*, through DONE."""
        out = []
        while True:
            kind, got, *rest = await self.any_reply()
            assert kind == "chunk" and got == cookie, (kind, got, rest)
            flags, rtype, payload = rest
            out.append((rtype, payload))
            if flags & nbd.NBD_REPLY_FLAG_DONE:
                return out

    def close(self) -> None:
        self.sock.close()
