"""The libguestfs side of the appliance engine: run by Debian's /usr/bin/python3.

libguestfs's Python binding (python3-guestfs) is built for the system
Python only, while vmafs runs in its own virtual environment; so
:mod:`vmafs.guest.appliance` starts this file as a child process
(``/usr/bin/python3 -I appliance_worker.py DRIVE...``) and talks to it
over its stdin and stdout.  It imports nothing but the standard library
and guestfs, and never vmafs.

The drives are added read-only (libguestfs puts a throwaway overlay over
each) and the appliance is launched once.  Then requests are answered
until ``quit`` or end of input:

- request: one JSON line ``{"op": NAME, "args": [...]}``;
- answer: one JSON line ``{"ok": VALUE}`` or ``{"error": TEXT, "errno": N}``;
  for ``pread`` the ``ok`` value is a byte count and that many raw bytes
  follow the line.

The first answer, sent unasked, is the launch's: ``{"ok": {"devices":
[...], "partitions": [...], "lvs": [...]}}`` or its error.

``vmafs mount --guest`` uses a second set of requests: ``mkmountpoint``
and ``mount_at`` lay out several filesystems side by side in the
appliance, and ``mount_local`` shows that tree through FUSE on a host
directory, answers ``ok`` and then serves it (libguestfs's
``mount_local_run``) until the host unmounts it; after that answer nothing
more is read or written on the channel (the host closes its ends and leaves
this process running), and the appliance is shut down once it returns.
"""

import json
import os
import sys

#: Names per lstatnslist/readlinklist call: keeps each reply well under
#: libguestfs's 4 MiB message limit.
BATCH = 1000
#: The largest pread libguestfs answers in one message is just under 2 MiB.
MAX_PREAD = 1 << 20
STAT_KEYS = (
    "st_mode",
    "st_size",
    "st_uid",
    "st_gid",
    "st_nlink",
    "st_atime_sec",
    "st_atime_nsec",
    "st_mtime_sec",
    "st_mtime_nsec",
)


def _stat(s):
    return {k: s[k] for k in STAT_KEYS}


class Worker:
    def __init__(self, g, channel):
        self.g = g
        self.channel = channel

    def send(self, message, data=b""):
        self.channel.write(json.dumps(message).encode() + b"\n")
        if data:
            self.channel.write(data)
        self.channel.flush()

    # -- operations ------------------------------------------------------------

    def op_mount(self, device):
        """Mount *device* read-only as the guest root (whatever was there is unmounted)."""
        self.g.umount_all()
        # "ro" on a writable overlay: a dirty journal is replayed into the
        # overlay (never into the backup), as the guest itself would on boot.
        self.g.mount_options("ro", device, "/")
        return self.g.vfs_type(device)

    def op_mkmountpoint(self, path):
        self.g.mkmountpoint(path)

    def op_mount_at(self, device, mountpoint, options):
        """Mount *device* on *mountpoint* (made by mkmountpoint) with *options*."""
        self.g.mount_options(options, device, mountpoint)

    def op_mount_local(self, directory, options):
        """Show the appliance's mounted tree on the host's *directory*, read-only."""
        self.g.mount_local(directory, readonly=True, options=options)

    def op_lstat(self, path):
        return _stat(self.g.lstatns(path))

    def op_readlink(self, path):
        return self.g.readlink(path)

    def op_scandir(self, path):
        names = self.g.ls(path)
        out = []
        for i in range(0, len(names), BATCH):
            batch = names[i : i + BATCH]
            stats = [_stat(s) for s in self.g.lstatnslist(path, batch)]
            links = [
                n
                for n, s in zip(batch, stats, strict=True)
                if (s["st_mode"] & 0o170000) == 0o120000
            ]
            targets = (
                dict(zip(links, self.g.readlinklist(path, links), strict=True)) if links else {}
            )
            for name, s in zip(batch, stats, strict=True):
                out.append([name, s, targets.get(name)])
        return out

    def op_pread(self, path, count, offset):
        return self.g.pread(path, min(count, MAX_PREAD), offset)

    # -- the loop -----------------------------------------------------------------

    def serve(self, requests):
        for line in requests:
            request = json.loads(line)
            op = request["op"]
            if op == "quit":
                return
            try:
                result = getattr(self, "op_" + op)(*request["args"])
            except RuntimeError as e:
                self.send({"error": str(e), "errno": self.g.last_errno() or None})
                continue
            if op == "pread":
                self.send({"ok": len(result)}, result)
            else:
                self.send({"ok": result})
            if op == "mount_local":
                # The host waits for the answer above, then for this call to
                # serve FUSE requests; it returns once the host unmounts.
                self.channel.close()
                self.g.mount_local_run()
                return


def main(drives):
    # The protocol owns the real stdout; anything libguestfs or its children
    # print goes to stderr (fd 1 is pointed there before they start).
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import guestfs  # noqa: PLC0415 - exists for the system python only; after fd 1 moved

    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    worker = Worker(g, channel)
    try:
        for drive in drives:
            g.add_drive_opts(drive, readonly=True, format="raw")
        g.launch()
        worker.send(
            {"ok": {"devices": g.list_devices(), "partitions": g.list_partitions(), "lvs": g.lvs()}}
        )
    except RuntimeError as e:
        worker.send({"error": f"libguestfs launch failed: {e}", "errno": None})
        return 1
    try:
        worker.serve(sys.stdin.buffer)
    finally:
        try:
            g.shutdown()
        finally:
            g.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
