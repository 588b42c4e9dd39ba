"""writer.backup's abort rules for NBD requests (no QEMU needed).

Once a backup is doomed, every write is acknowledged and dropped: an NBD
error would fail the guest write whose copy-before-write waits on it.
tests/test_backup.py checks the same with real QEMU (disk full while the
guest writes); these pin the three cases down deterministically.
"""

from __future__ import annotations

import errno

import trio
import trio.testing
from vmafs.writer.backup import _Abort, _watched
from vmafs.writer.nbd import Export

from vmafs.errors import WriterError


class Inner:
    """An export whose writes fail, block, or record, as the test says."""

    def __init__(self) -> None:
        self.calls = []
        self.mode = "ok"

    async def on_write(self, offset, data):
        self.calls.append(offset)
        if self.mode == "fail":
            raise WriterError(f"writing the archive failed: [Errno {errno.ENOSPC}] No space left")
        if self.mode == "block":
            await trio.sleep_forever()

    async def on_zero(self, offset, length):
        await self.on_write(offset, None)

    def export(self) -> Export:
        return Export(size=1 << 20, on_write=self.on_write, on_zero=self.on_zero)


def test_failure_is_recorded_then_acknowledged_and_later_writes_dropped():
    async def main():
        inner, abort = Inner(), _Abort()
        ex = _watched(inner.export(), abort)
        await ex.on_write(0, b"x")
        assert abort.cause is None
        inner.mode = "fail"
        await ex.on_write(65536, b"x")  # no exception: acknowledged
        assert "No space left" in abort.cause
        assert isinstance(abort.exc, WriterError)
        await ex.on_write(131072, b"x")
        await ex.on_zero(196608, 65536)
        assert inner.calls == [0, 65536]  # nothing reaches the packer once doomed

    trio.run(main)


def test_requests_waiting_in_the_packer_are_released_by_the_abort():
    async def main():
        inner, abort = Inner(), _Abort()
        inner.mode = "block"  # e.g. waiting for backpressure behind a slow disk
        ex = _watched(inner.export(), abort)
        done = []

        async def request(off):
            await ex.on_write(off, b"x")
            done.append(off)

        async with trio.open_nursery() as nursery:
            for off in (0, 65536, 131072):
                nursery.start_soon(request, off)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [] and len(abort.inflight) == 3
            abort("interrupted by SIGTERM; backup cancelled")
        assert sorted(done) == [0, 65536, 131072]
        assert abort.inflight == set()

    trio.run(main)


def test_after_the_commit_point_errors_are_not_swallowed():
    async def main():
        inner, abort = Inner(), _Abort()
        ex = _watched(inner.export(), abort)
        abort.closed = True
        inner.mode = "fail"
        try:
            await ex.on_write(0, b"x")
        except WriterError:
            pass
        else:
            raise AssertionError("a failure after the commit point was acknowledged")
        assert abort.cause is None

    trio.run(main)
