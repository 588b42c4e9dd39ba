"""``mount.vmafs``: the helper mount(8) runs for ``-t vmafs`` (fstab, ``mount``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import VmaError
from .checks import check_mountpoint, open_archive
from .cli import MOUNT_OPTIONS_HELP, fail
from .errors import MountError, UsageError
from .mounting import mount
from .options import parse_options


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.vmafs SOURCE TARGET [-sfnv] [-o OPTS]``: mount(8)'s helper convention.

    ``-n`` (no mtab) and ``-t`` are accepted and ignored, ``-s`` ignores
    unknown options, ``-f`` (fake) checks everything but does not mount,
    ``-v`` logs debug messages.  Always detaches, as mount(8) expects.
    """
    prog = "mount.vmafs"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=mount_helper_main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MOUNT_OPTIONS_HELP,
    )
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    parser.add_argument("-n", action="store_true", help="ignored (no mtab is written)")
    parser.add_argument("-s", action="store_true", help="sloppy: ignore unknown options")
    parser.add_argument("-f", action="store_true", help="fake: check, do not mount")
    parser.add_argument("-v", action="store_true", help="verbose logging")
    parser.add_argument("-t", dest="type", help="ignored")
    parser.add_argument("-N", dest="namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.namespace:
        return fail(prog, "-N (mount namespaces) is not supported", 2)
    from ..common.console import stderr_logging  # noqa: PLC0415 - light

    try:
        with stderr_logging(prog):
            return _helper(args, prog)
    except KeyboardInterrupt:
        return 130


def _helper(args: argparse.Namespace, prog: str) -> int:
    try:
        opts = parse_options(args.options, sloppy=args.s)
        if args.f:
            check_mountpoint(args.target, nonempty=opts.nonempty)
            open_archive(args.source, opts.allow_incomplete).close()
            return 0
        return mount(args.source, args.target, opts, verbose=args.v)
    except UsageError as e:
        return fail(prog, str(e), 2)
    except MountError as e:
        return fail(prog, str(e))
    except VmaError as e:
        return fail(prog, str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return fail(prog, f"{where}{e.strerror or e}")
