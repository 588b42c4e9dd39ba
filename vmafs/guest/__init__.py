"""Files inside the guest filesystems of an archive: ``vmafs ls/cat/get`` and
``vmafs mount --guest``, through one of two engines.

    entry.py       Entry (one name, lstat'ed) and the GuestFS protocol both engines answer
    paths.py       VOLUME:/path arguments; symlinks resolved inside the guest's own root
    appliance.py   the appliance engine: libguestfs in a small VM (isolated, no root)
    appliance_worker.py  its side in Debian's /usr/bin/python3 (python3-guestfs)
    accel.py       KVM or TCG for the appliance, asked of QEMU itself
    kernel.py      the kernel engine: read-only loop mounts without journal replay (root)
    session.py     an archive mounted privately + one engine: what ls/cat/get use
    listing.py     ls output (lines, -l, JSON)
    copy.py        get: copy a file or tree, never outside DEST
    tree.py        mount --guest / umount: every guest filesystem under one directory

docs/restore.md explains the engines' trade-off.
"""
