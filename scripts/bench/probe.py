"""A vmafs mount that counts the read requests the kernel sends (tuning notes only).

``python -m bench.probe ARCHIVE MOUNTPOINT STATS.json [direct_io] [threads]``
serves the archive in the foreground with :class:`vmafs.fs.VmaFS` and the
mount options ``vmafs mount`` uses, counting each read's size; prints
``ready`` on stdout when the mount answers, and writes a JSON histogram
``{size: count}`` to STATS.json when it is unmounted.  It subclasses the fs
rather than changing it: the measured read path is the real one plus one
dict update per request.
"""

from __future__ import annotations

import collections
import json
import sys

from vmafs.archive import Archive
from vmafs.fs import VmaFS
from vmafs.mount import MountOptions, fuse_options, serve


class CountingFS(VmaFS):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sizes: collections.Counter[int] = collections.Counter()

    async def read(self, fh, off, size):
        self.sizes[size] += 1
        return await super().read(fh, off, size)


def main(argv: list[str]) -> int:
    archive_path, mnt, stats = argv[:3]
    flags = set(argv[3:])
    opts = MountOptions(direct_io="direct_io" in flags, threads="threads" in flags)
    archive = Archive.open(archive_path)
    ops = CountingFS(archive, direct_io=opts.direct_io, threaded=opts.threads)

    def ready(err: str | None) -> None:
        print(err or "ready", flush=True)

    try:
        status = serve(ops, mnt, fuse_options(opts, archive_path), ready)
    finally:
        archive.close()
        with open(stats, "w") as f:
            json.dump({str(k): v for k, v in sorted(ops.sizes.items())}, f)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
