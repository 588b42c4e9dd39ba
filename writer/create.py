"""``vmafs create``: an archive from image files, through a private qemu-storage-daemon.

Any image QEMU reads (raw, qcow2, vmdk, a block device, a qcow2 with its
backing chain when its format is given: :func:`_source_node` says why a
guessed format never follows one) becomes a disk of the archive by the same
path as a live backup (:mod:`vmafs.writer.backup`): a qemu-storage-daemon is
started with only a QMP monitor on one end of a socketpair (no socket file,
no race on a path), each image is added read-only with ``blockdev-add`` (so
a bad image is a clean QMP error, not daemon stderr to parse), and the
daemon runs the same ``blockdev-backup`` transaction into the writer's NBD
server.

The daemon (:class:`~vmafs.writer.storage_daemon.StorageDaemon`) is stopped
in every path: on success, on error, on Ctrl-C, and even when vmafs itself is
killed.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from vmafs.common.signals import SignalGuard
from vmafs.errors import BackupError

from .backup import BackupResult, DriveSpec, ProgressFn, backup, resolve_disks
from .output import ArchiveOutput
from .packer import check_names
from .storage_daemon import StorageDaemon

__all__ = ["ImageSpec", "create", "parse_image_spec", "probe_format"]

log = logging.getLogger("writer.create")

#: image formats accepted after the last ':' of DEVNAME=IMAGE:FORMAT (QEMU's format drivers)
FORMATS = frozenset("raw qcow2 qcow qed vmdk vdi vhdx vpc parallels dmg cloop bochs luks".split())
#: formats whose blockdev-add takes ``"backing": null`` (no backing chain opened)
_BACKING_FORMATS = frozenset({"qcow2", "qcow", "qed", "vmdk"})


@dataclass(frozen=True)
class ImageSpec:
    """``DEVNAME=IMAGE[:FORMAT]`` from the command line; ``fmt`` None = probe."""

    devname: str
    path: str
    fmt: str | None = None


def parse_image_spec(text: str) -> ImageSpec:
    """Split ``DEVNAME=IMAGE[:FORMAT]``.

    ``:FORMAT`` is taken only when it names a QEMU image format and the whole
    text is not itself an existing file, so paths with colons still work.
    """
    devname, sep, rest = text.partition("=")
    if not sep or not devname or not rest:
        raise ValueError(f"bad image {text!r}: expected DEVNAME=IMAGE[:FORMAT]")
    path, fmt = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and not os.path.exists(rest):
        if tail not in FORMATS:
            raise ValueError(
                f"bad image {text!r}: unknown format {tail!r} (one of {', '.join(sorted(FORMATS))})"
            )
        path, fmt = head, tail
    return ImageSpec(devname, path, fmt)


async def probe_image(path: str) -> dict:
    """``qemu-img info`` of *path*: the format it detects and what the image refers to.

    qemu-img gets an absolute path: a relative one with a colon (``c:d.raw``)
    would be taken as a protocol prefix.  It does not open backing files.
    """
    try:
        proc = await trio.run_process(
            ["qemu-img", "info", "--output=json", os.path.abspath(path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except FileNotFoundError as e:
        raise BackupError("qemu-img not found (Debian package qemu-utils)") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BackupError(f"{path}: {msg[-1] if msg else 'qemu-img info failed'}")
    return json.loads(proc.stdout)


async def probe_format(path: str) -> str:
    """The image format ``qemu-img info`` detects for *path*."""
    return (await probe_image(path))["format"]


def _other_files(info: dict) -> list[str]:
    """Files besides itself that a probed image would make QEMU read."""
    out = []
    if info.get("backing-filename"):
        out.append(f"backing file {info['backing-filename']}")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        out.append(f"data file {data['data-file']}")
    own = os.path.realpath(info.get("filename", ""))
    for extent in data.get("extents") or []:  # vmdk: a descriptor names its extent files
        name = extent.get("filename", "")
        if name and os.path.realpath(name) != own and f"extent {name}" not in out:
            out.append(f"extent {name}")
    return out


async def _source_node(i: int, img: ImageSpec) -> dict:
    """The read-only ``blockdev-add`` arguments for *img* (format checked or probed).

    The format of an image is only guessed when the user did not name it,
    and a guess must never make vmafs read a file other than the one named:
    a guest owns the bytes of its disk and can write a qcow2 header with a
    backing file such as /etc/shadow into it.  So a block device (LVM, ZFS,
    RBD volume: guest-written raw) without a FORMAT is raw, and a regular
    file that probes as an image referring to other files is refused until
    the user writes IMAGE:FORMAT.
    """
    file_node = _file_node(img.path)
    node = {"node-name": f"src{i}", "read-only": True, "file": file_node}
    if img.fmt is not None:
        return {"driver": img.fmt, **node}
    if file_node["driver"] == "host_device":
        return {"driver": "raw", **node}
    info = await probe_image(img.path)
    fmt = info["format"]
    others = _other_files(info)
    if others:
        raise BackupError(
            f"{img.path}: probed as {fmt} with {', '.join(others)}; an image whose format "
            f"is guessed may not pull in other files: write {img.devname}={img.path}:{fmt} "
            "to follow them"
        )
    if fmt in _BACKING_FORMATS:
        node["backing"] = None  # and none may appear between the probe and the open
    return {"driver": fmt, **node}


def _file_node(path: str) -> dict:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BackupError(f"{path}: {e.strerror}") from e
    if stat.S_ISBLK(st.st_mode):
        driver = "host_device"
    elif stat.S_ISREG(st.st_mode):
        driver = "file"
    else:
        raise BackupError(f"{path}: not a regular file or block device")
    return {"driver": driver, "filename": os.path.abspath(path)}


async def create(
    output: ArchiveOutput,
    images: Sequence[ImageSpec],
    configs: Iterable[tuple[str, bytes]] = (),
    *,
    speed: int = 0,
    progress: ProgressFn | None = None,
    signals: SignalGuard | None = None,
) -> BackupResult:
    """Write *images* into *output* (which this owns: committed or aborted)."""
    try:
        if not images:
            raise BackupError("no images given")
        if len({i.devname for i in images}) != len(images):
            raise BackupError("two images have the same device name")
        configs = list(configs)
        check_names(
            [i.devname for i in images], [os.path.basename(os.fsdecode(n)) for n, _ in configs]
        )
        nodes = [await _source_node(i, img) for i, img in enumerate(images)]
        async with StorageDaemon() as qsd:
            for img, node in zip(images, nodes, strict=True):
                try:
                    await qsd.qmp.execute("blockdev-add", node)
                except BackupError as e:
                    raise BackupError(
                        f"{img.path}: {e.message.removeprefix('blockdev-add: ')}"
                    ) from e
            sizes = {
                n["node-name"]: n["image"]["virtual-size"]
                for n in await qsd.qmp.execute("query-named-block-nodes", {"flat": True})
            }
            for img, node in zip(images, nodes, strict=True):
                if sizes.get(node["node-name"], 0) <= 0:  # an archive has no empty disks
                    raise BackupError(f"{img.path} (device {img.devname}): the image is empty")
            specs = [
                DriveSpec(n["node-name"], img.devname) for img, n in zip(images, nodes, strict=True)
            ]
            disks = await resolve_disks(qsd.qmp, specs)
            disks = [
                type(d)(d.devname, d.node, d.size, img.path)
                for d, img in zip(disks, images, strict=True)
            ]
            return await backup(
                qsd.qmp,
                disks,
                output,
                configs,
                speed=speed,
                progress=progress,
                signals=signals,
                # no guest write waits behind this job: QEMU's default queue depth
                job_perf=None,
            )
    except BaseException:
        output.abort()
        raise
