"""vmafs.nbd.buffers: reply and payload buffers reused, within bounds."""

from __future__ import annotations

from vmafs.nbd.buffers import BufferPool


def test_a_buffer_given_back_is_taken_again_for_a_like_size():
    pool = BufferPool(4)
    buf = pool.take(1 << 20)
    assert len(buf) == 1 << 20
    pool.give(buf)
    assert pool.take(1 << 20) is buf
    pool.give(buf)
    assert pool.take(600_000) is buf  # at most twice the size asked for
    pool.give(buf)
    assert pool.take(4096) is not buf  # a 4 KiB read does not tie up 1 MiB
    assert pool.take(2 << 20) is not buf


def test_bounds_on_what_is_kept():
    pool = BufferPool(2, max_size=1 << 20, min_size=65536)
    assert len(pool.take(512)) == 65536
    big = pool.take(2 << 20)
    pool.give(big)
    assert pool.take(2 << 20) is not big  # larger than max_size: dropped
    kept = [pool.take(65536) for _ in range(3)]
    for buf in kept:
        pool.give(buf)
    again = [pool.take(65536) for _ in range(3)]
    assert sum(any(a is k for k in kept) for a in again) == 2  # max_buffers
