"""``vmafs config ARCHIVE [-c NAME]...``: print configuration files, like ``vma config``."""

from __future__ import annotations

import argparse
import sys

from ..common.console import writing_stdout
from ..errors import VmaError
from ._common import load_header, printable

DEFAULT_CONFIG = "qemu-server.conf"

HELP = "print a configuration file stored in an archive"

DESCRIPTION = f"""\
Write the configuration file NAME stored in ARCHIVE to standard output,
byte for byte (default: {DEFAULT_CONFIG}, the VM's configuration).
With several -c options the files are written one after another, in the
order given.  Fails if a name is not in the archive; `vmafs list` shows
the names (CFG lines).  Only the header is read."""

EPILOG = """\
examples:
  vmafs config backup.vma                     # the VM config (qemu-server.conf)
  vmafs config backup.vma -c qemu-server.fw   # its firewall rules
  vmafs config backup.vma.zst > 100.conf"""


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    p.add_argument(
        "-c",
        "--config",
        dest="names",
        metavar="NAME",
        action="append",
        help=f"config file to print (default: {DEFAULT_CONFIG}); may be repeated",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    header = load_header(args.archive)
    by_name = {}
    for cfg in header.configs:
        by_name.setdefault(cfg.name, cfg)  # first wins, as in Proxmox's reader
    names = args.names or [DEFAULT_CONFIG]
    missing = [n for n in names if n not in by_name]
    if missing:
        have = ", ".join(printable(c.name) for c in header.configs) or "none"
        raise VmaError(
            f"no configuration named {printable(missing[0])!r} (the archive has: {have})"
        ).name_archive(args.archive)
    out = sys.stdout.buffer
    with writing_stdout():
        for name in names:
            out.write(by_name[name].data)
        out.flush()
    return 0
