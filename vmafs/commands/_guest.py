"""What ``vmafs ls``, ``cat`` and ``get`` share: the engine option and the session."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator

ENGINE_HELP = (
    "how guest filesystems are read: 'appliance' (libguestfs in a small VM: the host "
    "kernel never parses the guest's filesystems; the default when libguestfs is "
    "installed) or 'kernel' (root: read-only loop mounts on the host, much faster); "
    "see docs/restore.md"
)


def add_guest_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    parser.add_argument(
        "target",
        metavar="VOLUME:/PATH",
        help=f"{what}: a volume as 'vmafs volumes' names it (scsi0/p1 = drive-scsi0/p1), "
        "a colon, and an absolute path inside it",
    )
    parser.add_argument("--engine", choices=("appliance", "kernel"), default=None, help=ENGINE_HELP)


@contextlib.contextmanager
def opened_volume(args: argparse.Namespace) -> Iterator:
    """(session, volume, GuestFS, GuestPath) for ``args.target``, torn down on exit.

    SIGTERM and SIGHUP unwind like Ctrl-C, so the mounts and the appliance
    are taken down whichever way the command ends (short of SIGKILL).
    """
    from ..common.progress import Progress, want_progress  # noqa: PLC0415
    from ..common.signals import first_signal_raises  # noqa: PLC0415
    from ..guest.paths import parse_guest_path  # noqa: PLC0415
    from ..guest.session import GuestSession, default_engine  # noqa: PLC0415

    target = parse_guest_path(args.target)
    engine = args.engine or default_engine()

    def interrupted(signum: int) -> BaseException:
        return KeyboardInterrupt(signal.Signals(signum).name)

    with first_signal_raises((signal.SIGTERM, signal.SIGHUP), interrupted):
        with Progress("indexing", enabled=want_progress(getattr(args, "progress", None))) as bar:
            session = GuestSession(args.archive, engine, progress=bar)
            session.__enter__()
        try:
            volume = session.find(target.volume)
            yield session, volume, session.open(volume), target
        finally:
            session.close()
