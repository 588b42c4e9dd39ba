"""The floor of a pyfuse3 filesystem: one read-only file whose read is one ``os.pread``.

``python -m bench.minimalfs FILE MOUNTPOINT`` serves *FILE* as
``MOUNTPOINT/<its name>`` in the foreground, prints ``ready`` when the
mount answers and returns when it is unmounted.  It is the bench's
baseline for what pyfuse3 and trio cost per request: no index, no
lookup, nothing vmafs does, with pyfuse3's default options plus ``ro``.
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio


class OneFile(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.name = os.path.basename(path).encode()
        self.size = os.fstat(self.fd).st_size

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_nlink = inode, 1
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o555
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o444, self.size
        return a

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start, token):
        if start == 0:
            pyfuse3.readdir_reply(token, self.name, await self.getattr(2), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


def main(path: str, mnt: str) -> None:
    pyfuse3.init(OneFile(path), mnt, set(pyfuse3.default_options) | {"ro", "fsname=minimalfs"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
