"""Running the read-only NBD server for an archive: listen, announce, daemonize, stop.

:mod:`vmafs.commands.serve` parses the command line into a :class:`ServeConfig`;
:func:`serve` does the rest.  ``vmafs restore --live`` runs the same server
inside its own trio loop through :func:`open_server`.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import stat
import urllib.parse
from dataclasses import dataclass

import trio

from ..archive import Archive
from ..mount.daemon import DaemonError, Ready, daemonize
from ..mount.logs import setup_process_logging
from ..nbd.protocol import NBD_DEFAULT_PORT as DEFAULT_PORT
from ..nbd.server import MAX_SOCKET_PATH, NbdServer, tls_context
from .export import exports_for

log = logging.getLogger("vmafs.serve")

#: largest READ answered (and advertised): what QEMU asks for at most
MAX_BLOCK = 32 * 1024 * 1024


class ServeError(Exception):
    """The server cannot start; the message is the one line to print."""


@dataclass
class ServeConfig:
    """What ``vmafs serve`` was asked for (docs/serve.md)."""

    archive: str
    socket: str | None = None
    bind: str | None = None
    port: int = DEFAULT_PORT
    foreground: bool = False
    pidfile: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    logfile: str | None = None
    verbose: bool = False
    threads: bool = False


def default_socket(archive: str) -> str:
    """``$XDG_RUNTIME_DIR/vmafs/<archive name>.nbd`` (``/run/vmafs/`` for root)."""
    base = os.path.basename(archive)
    if os.getuid() == 0:
        runtime = "/run"
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmafs-{os.getuid()}"
    return os.path.join(runtime, "vmafs", f"{base}.nbd")


def load_tls(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The TLS context of --tls-cert/--tls-key/--tls-ca, or None without them."""
    if not (cfg.tls_cert or cfg.tls_key or cfg.tls_ca):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ServeError("TLS needs both --tls-cert and --tls-key (PEM files)")
    for option, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)) + (
        (("--tls-ca", cfg.tls_ca),) if cfg.tls_ca else ()
    ):
        if not os.path.isfile(path):
            raise ServeError(f"{option} {path}: no such file (a PEM file is expected)")
    try:
        return tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
    except (ssl.SSLError, OSError) as e:
        files = ", ".join(f for f in (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if f)
        raise ServeError(f"TLS: cannot load {files}: {e}") from None


def uris(server: NbdServer, names: list[str]) -> list[str]:
    """The NBD URI of each export (``nbds``: TLS required)."""
    scheme = "nbds" if server.tls is not None else "nbd"
    out = []
    for name in names:
        quoted = urllib.parse.quote(name, safe="")
        if server.socket_path:
            sock = urllib.parse.quote(server.socket_path, safe="/")
            out.append(f"{scheme}+unix:///{quoted}?socket={sock}")
        else:
            host = server.tcp[0]
            host = f"[{host}]" if ":" in host else host
            out.append(f"{scheme}://{host}:{server.port}/{quoted}")
    return out


def open_server(
    archive: Archive,
    *,
    socket: str | None = None,
    tcp: tuple[str, int] | None = None,
    tls: ssl.SSLContext | None = None,
    threads: bool = False,
) -> NbdServer:
    """An :class:`NbdServer` for every disk of *archive* (not started)."""
    exports, aliases = exports_for(archive, threads=threads)
    if not exports:
        raise ServeError(f"{archive.path}: the archive holds no disk to serve")
    return NbdServer(
        exports, unix=socket, tcp=tcp, aliases=aliases, tls=tls, max_block=MAX_BLOCK, logger=log
    )


def _check_socket_path(path: str) -> str:
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ServeError(
            f"--socket {path}: longer than the {MAX_SOCKET_PATH} bytes a Unix socket path "
            "may have; choose a shorter path"
        )
    if os.path.lexists(path) and not _is_socket(path):
        raise ServeError(f"--socket {path}: exists and is not a socket; remove it or use another")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return path


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


async def _run(server: NbdServer, cfg: ServeConfig, on_ready: Ready) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; ready once the socket accepts."""
    stopped_by: list[str] = []
    # The receiver is in place before anyone hears "ready": a signal sent right
    # after must still stop the server cleanly (socket and pidfile removed).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(server.serve)
            except OSError as e:
                where = server.socket_path or f"{server.tcp[0]}:{server.tcp[1]}"
                on_ready(f"cannot listen on {where}: {e.strerror or e}")
                return 1
            if cfg.pidfile:
                _write_pidfile(cfg.pidfile)
            log.info("serving %s: %s", cfg.archive, " ".join(uris(server, list(server.exports))))
            on_ready(None)
            async for signum in sigs:
                stopped_by.append(signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    if cfg.pidfile:
        try:
            os.unlink(cfg.pidfile)
        except FileNotFoundError:
            pass
    log.info("%s: stopped serving %s", stopped_by[0] if stopped_by else "exit", cfg.archive)
    return 0


def serve(cfg: ServeConfig, archive: Archive) -> list[str]:
    """Start serving *archive*; returns the export URIs once clients can connect.

    In the foreground (``cfg.foreground``) this prints the URIs itself and
    returns only when stopped by a signal.  Raises :class:`ServeError`.
    """
    tls = load_tls(cfg)
    if cfg.bind is not None:
        server = open_server(archive, tcp=(cfg.bind, cfg.port), tls=tls, threads=cfg.threads)
        server.port = cfg.port
    else:
        server = open_server(
            archive, socket=_check_socket_path(cfg.socket), tls=tls, threads=cfg.threads
        )
    if cfg.pidfile:
        cfg.pidfile = os.path.abspath(cfg.pidfile)
    if cfg.logfile:
        cfg.logfile = os.path.abspath(cfg.logfile)
    names = list(server.exports)
    announced = uris(server, names)

    if cfg.foreground:
        setup_process_logging(cfg.logfile, detached=False, verbose=cfg.verbose)
        errors: list[str] = []

        def on_ready(error: str | None) -> None:
            if error:
                errors.append(error)
            else:
                print("\n".join(announced), flush=True)

        trio.run(_run, server, cfg, on_ready)
        if errors:
            raise ServeError(errors[0])
        return announced

    def setup() -> None:
        setup_process_logging(cfg.logfile, detached=True, verbose=cfg.verbose, name="serve.log")

    try:
        daemonize(
            lambda ready: trio.run(_run, server, cfg, ready), what="the NBD server", setup=setup
        )
    except DaemonError as e:
        raise ServeError(str(e)) from None
    print("\n".join(announced), flush=True)
    return announced
