"""``vmafs serve ARCHIVE``: every disk of an archive as a read-only NBD export.

Parsing only; :mod:`vmafs.serve.run` starts the server.  docs/serve.md is
the user's reference.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..common.progress import add_progress_options
from ..nbd.protocol import NBD_DEFAULT_PORT as DEFAULT_PORT
from ._common import open_archive

HELP = "serve every disk of an archive as a read-only NBD export (qemu-img, nbdcopy, QEMU)"

DESCRIPTION = """\
Serve each disk of ARCHIVE over NBD, read-only, with no mount and no root:
one export per disk named after its drive (drive-scsi0, also reachable as
scsi0).  Reads answer holes without sending zeros, and block status
(base:allocation) reports the same holes as SEEK_HOLE in a mount, so
qemu-img convert, nbdcopy and QEMU skip them.

By default the server listens on a Unix socket of mode 0600 (only you, and
root, can connect); --bind listens on TCP instead.  With --tls-cert and
--tls-key every client must start TLS first (NBD_OPT_STARTTLS).  The command
returns once the exports accept connections and prints their NBD URIs; the
server runs on, detached, until SIGTERM or SIGINT (-f: in the foreground)."""

EPILOG = """\
examples:
  vmafs serve backup.vma.zst --socket /tmp/backup.sock --pidfile /tmp/backup.pid
  qemu-img convert -p -O qcow2 'nbd+unix:///drive-scsi0?socket=/tmp/backup.sock' disk.qcow2
  nbdinfo --map 'nbd+unix:///scsi0?socket=/tmp/backup.sock'
  kill $(cat /tmp/backup.pid)
  vmafs serve backup.vma --bind 0.0.0.0 --tls-cert server-cert.pem --tls-key server-key.pem

See docs/serve.md for what each NBD option and command does."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="the .vma (or .vma.zst/.gz/.lzo) file")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket to listen on, created mode 0600 "
        "(default: $XDG_RUNTIME_DIR/vmafs/ARCHIVE-NAME.nbd, /run/vmafs/... for root)",
    )
    where.add_argument(
        "--bind", metavar="ADDR", help="listen on TCP at ADDR (e.g. 127.0.0.1, ::, 0.0.0.0)"
    )
    p.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"TCP port with --bind (default {DEFAULT_PORT})",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--pidfile", metavar="FILE", help="write the server's process id to FILE")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate: TLS is then required")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-ca", metavar="PEM", help="CA certificates: clients must show a certificate it signed"
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="serve an interrupted or cut-short backup; reads of its missing clusters "
        "fail with EIO",
    )
    p.add_argument(
        "--threads",
        action="store_true",
        help="read an uncompressed archive in worker threads only (by default a read the "
        "page cache holds runs in the event loop, any other in a worker thread)",
    )
    p.add_argument("--logfile", metavar="PATH", help="log here instead of syslog when detached")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serve.run import ServeConfig, ServeError, default_socket, serve  # noqa: PLC0415

    if args.port != DEFAULT_PORT and args.bind is None:
        sys.stderr.write("vmafs: error: serve: --port needs --bind (see 'vmafs serve --help')\n")
        return 2
    cfg = ServeConfig(
        archive=os.path.abspath(args.archive),
        socket=args.socket or (None if args.bind else default_socket(args.archive)),
        bind=args.bind,
        port=args.port,
        foreground=args.foreground,
        pidfile=args.pidfile,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        logfile=args.logfile,
        verbose=args.verbose,
        threads=args.threads,
    )
    archive = open_archive(args.archive, args, allow_incomplete=args.allow_incomplete)
    try:
        try:
            serve(cfg, archive)
        except ServeError as e:
            sys.stderr.write(f"vmafs: error: {' '.join(str(e).split())}\n")
            return 1
    finally:
        archive.close()
    if not args.foreground:
        # The server runs detached; tearing down this interpreter (numpy, trio,
        # the index) would only delay the caller.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
