"""``vmafs list ARCHIVE [--json]``: what an archive holds.

The default output is byte for byte what Proxmox's ``vma list`` prints, so
scripts written for it keep working::

    CFG: size: 226 name: qemu-server.conf
    DEV: dev_id=1 size: 5242880 devname: drive-scsi0
    VMSTATE: dev_id=2 memory: 536870912
    CTIME: Tue Mar  5 14:02:11 2024

Like ``vma list`` it reads only the header (instant even for a compressed
archive) and prints the creation time in local time, as ctime(3) does.
``--json`` also walks the extents to report what is stored per device.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid as uuidlib

from ..common.console import writing_stdout
from ..common.progress import add_progress_options
from ..format import Header
from ._common import load_header, open_archive, printable

HELP = "show the configs, devices and creation time of an archive"

DESCRIPTION = """\
Show the configuration files, devices and creation time stored in ARCHIVE,
in the format of Proxmox's `vma list`:

  CFG: size: <bytes> name: <config name>          one line per config
  DEV: dev_id=<id> size: <bytes> devname: <name>  one line per disk
  VMSTATE: dev_id=<id> memory: <bytes>            the RAM state, if saved
  CTIME: <creation time, local time, as ctime(3)>

Only the header is read, so this is instant and works on incomplete archives.
Control characters in names are shown escaped (\\n, \\x1b).

With --json, the whole archive is indexed and a JSON object is printed:
uuid, ctime (seconds since the epoch), ctime_iso (UTC), complete, configs
[{name, size}] and devices [{dev_id, name, size, vmstate, clusters,
stored_bytes, missing_clusters}]."""

EPILOG = """\
examples:
  vmafs list vzdump-qemu-100-2024_03_05-14_02_11.vma.zst
  vmafs list --json backup.vma | jq '.devices[] | {name, size}'"""


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    p.add_argument(
        "--json", action="store_true", help="print JSON with stored/missing data per device"
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def format_ctime(ctime: int) -> str:
    """The creation time as C's ctime(3) prints it, without the newline."""
    try:
        return time.ctime(ctime)
    except (OverflowError, ValueError, OSError):
        return f"(invalid time {ctime})"


def proxmox_lines(header: Header) -> list[str]:
    """The lines ``vma list`` prints for *header*, without newlines."""
    lines = [f"CFG: size: {len(c.data)} name: {printable(c.name)}" for c in header.configs]
    for dev_id in sorted(header.devices):
        dev = header.devices[dev_id]
        if dev.is_vmstate:
            lines.append(f"VMSTATE: dev_id={dev_id} memory: {dev.size}")
        else:
            lines.append(f"DEV: dev_id={dev_id} size: {dev.size} devname: {printable(dev.name)}")
    lines.append(f"CTIME: {format_ctime(header.ctime)}")
    return lines


def describe(archive) -> dict:
    """The ``--json`` object for an opened :class:`~vmafs.archive.Archive`."""
    header = archive.header
    try:
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header.ctime))
    except (OverflowError, ValueError, OSError):
        iso = None
    return {
        "archive": archive.path,
        "uuid": str(uuidlib.UUID(bytes=header.uuid)),
        "ctime": header.ctime,
        "ctime_iso": iso,
        "complete": archive.index.complete,
        "configs": [{"name": c.name, "size": len(c.data)} for c in header.configs],
        "devices": [
            {
                "dev_id": dev.dev_id,
                "name": dev.name,
                "size": dev.size,
                "vmstate": dev.is_vmstate,
                "clusters": dev.clusters,
                "stored_bytes": archive.stored_bytes(dev.dev_id),
                "missing_clusters": archive.missing_clusters(dev.dev_id),
            }
            for dev in archive.devices
        ],
    }


def _escape_surrogate(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def json_text(obj) -> str:
    """*obj* as JSON text that is always valid UTF-8.

    Text stays as it is (``ensure_ascii=False``: names read as written),
    except the lone surrogates by which Python carries the bytes of a path
    that is not valid UTF-8 (surrogateescape: byte 0xff is U+DCFF): each is
    written as the JSON escape ``\\udcff``.  Raw, they would be invalid UTF-8
    in the output; escaped, ``os.fsencode(json.loads(text)["archive"])``
    gives back the path's bytes.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return _SURROGATE.sub(_escape_surrogate, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def write_json(obj) -> None:
    """Print *obj* as JSON encoded as UTF-8, whatever the locale's encoding (RFC 8259)."""
    data = json_text(obj) + "\n"
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text stream without bytes underneath (in-process callers)
        sys.stdout.write(data)
        return
    sys.stdout.flush()
    out.write(data.encode("utf-8"))
    out.flush()


def run(args: argparse.Namespace) -> int:
    if args.json:
        # allow_incomplete: listing an interrupted backup is how you find out what it lacks.
        with open_archive(args.archive, args, allow_incomplete=True) as archive:
            obj = describe(archive)
        with writing_stdout():
            write_json(obj)
        return 0
    header = load_header(args.archive)
    with writing_stdout():
        sys.stdout.write("".join(line + "\n" for line in proxmox_lines(header)))
    return 0
