"""A QMP connection to QEMU that trio code can use without blocking the NBD server.

Why a separate thread with its own asyncio loop:

qemu.qmp (the QMP library QEMU itself maintains) is asyncio-based; the NBD
server and the packer are trio.  The backup's hot path is the NBD server: a
guest write that hits a not-yet-copied cluster waits until the writer has
replied to QEMU's copy-before-write, so nothing else may ever stall the trio
loop.  The alternatives were worse:

- trio-asyncio runs both on one loop: one more dependency, and a slow QMP
  callback would run on the NBD server's loop;
- the synchronous ``qemu.qmp.legacy.QEMUMonitorProtocol`` in a worker thread
  runs its own loop per call, cannot wait for a command and an event at the
  same time, and is not thread-safe;
- so :class:`QmpConnection` owns one daemon thread that runs an asyncio loop
  and the :class:`qemu.qmp.QMPClient`.  Trio code calls :meth:`execute`
  (the command is submitted with ``asyncio.run_coroutine_threadsafe`` and the
  trio task sleeps on a :class:`trio.Event`, cancellable, no worker thread
  held), and reads QMP events from :attr:`events`, a trio memory channel fed
  from the asyncio thread through the trio token.  The two loops share no
  state except those hand-overs.

Errors are :class:`QemuError` (a :class:`vmafs.errors.BackupError`): a command
QEMU refused (``.qmp_class`` holds the QMP error class, e.g.
``GenericError``), a connection that failed or broke (``.lost`` is True).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any

import trio
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from vmafs.errors import BackupError

__all__ = ["QemuError", "QmpConnection", "parse_address"]

log = logging.getLogger("writer.qmp")

#: seconds to wait for QEMU's greeting and capabilities negotiation
CONNECT_TIMEOUT = 10.0


class QemuError(BackupError):
    """QEMU refused a QMP command, or the QMP connection failed or was lost."""

    def __init__(self, message: str, *, qmp_class: str | None = None, lost: bool = False) -> None:
        super().__init__(message)
        self.qmp_class = qmp_class
        self.lost = lost


def parse_address(text: str) -> str | tuple[str, int]:
    """A QMP address from the command line: a Unix socket path, or ``HOST:PORT`` (TCP).

    Anything containing ``/`` or naming an existing file is a path.
    """
    if "/" in text or os.path.exists(text) or ":" not in text:
        return text
    host, _, port = text.rpartition(":")
    try:
        return (host.strip("[]") or "localhost", int(port))
    except ValueError:
        return text


def _where(address) -> str:
    if isinstance(address, socket.socket):
        return "socket"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


def _connect_failure(e: QMPError, client: QMPClient) -> str:
    """Why ``QMPClient.connect`` failed, in one line that says what the peer did.

    qemu.qmp wraps the root cause, which is often message-less (``EOFError()``
    for a peer that hangs up) or spans lines (a greeting that is not JSON).
    """
    root = getattr(e, "exc", None) or e
    if isinstance(root, EOFError):
        if client.greeting is None:
            return "the peer closed the connection without sending a QMP greeting (is it QEMU?)"
        return "the peer closed the connection during capabilities negotiation (is it QEMU?)"
    detail = " ".join(str(root).split()) or type(root).__name__
    if isinstance(root, GreetingError):
        return f"the peer's greeting is not QMP (is it QEMU?): {detail}"
    if isinstance(root, NegotiationError):
        return f"the peer refused qmp_capabilities (is it QEMU?): {detail}"
    return detail


class QmpConnection:
    """One QMP session, used from trio.

    Create with ``conn = await QmpConnection.open(address)`` (a Unix socket
    path, a ``(host, port)`` tuple, or an already connected ``socket.socket``
    such as one end of a socketpair whose other end QEMU got as
    ``-chardev socket,fd=N``).  Always ``await conn.aclose()`` (or use
    ``async with``).

    :attr:`events` receives every QMP event from the moment the session is
    up, as plain dicts ``{"event": ..., "data": {...}, "timestamp": {...}}``,
    in QEMU's order; there is one consumer.  :attr:`lost` is set when the
    connection breaks (QEMU exited or closed the monitor); afterwards every
    :meth:`execute` raises ``QemuError(lost=True)``.
    """

    def __init__(self, name: str = "vmafs") -> None:
        self.name = name
        self.lost = trio.Event()
        self.lost_reason = ""
        self._send, self.events = trio.open_memory_channel(math.inf)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self._tasks: list[asyncio.Task] = []

    # -- opening and closing --

    @classmethod
    async def open(
        cls,
        address: str | tuple[str, int] | socket.socket,
        *,
        name: str = "vmafs",
        timeout: float = CONNECT_TIMEOUT,
    ) -> QmpConnection:
        self = cls(name)
        try:
            try:
                await self._call(self._a_connect(address), timeout=timeout, what="connect")
            except QemuError as e:
                if e.lost:
                    raise
                if self._client is not None and self._client.greeting is not None:
                    what = (
                        f"the peer sent a QMP greeting but did not answer qmp_capabilities "
                        f"within {timeout:g} s (is it QEMU?)"
                    )
                else:
                    what = (
                        f"no greeting within {timeout:g} s (is another client connected? "
                        "a QMP socket serves one client at a time)"
                    )
                raise QemuError(
                    f"cannot connect to QMP at {_where(address)}: {what}", lost=True
                ) from e
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def _a_connect(self, address) -> None:
        client = QMPClient(self.name)
        listener = EventListener()
        client.register_listener(listener)
        self._client = client
        try:
            await client.connect(address)
        except QMPError as e:
            raise QemuError(
                f"cannot connect to QMP at {_where(address)}: {_connect_failure(e, client)}",
                lost=True,
            ) from e
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._a_pump_events(listener)))
        self._tasks.append(loop.create_task(self._a_watch_runstate(client)))

    async def _a_pump_events(self, listener: EventListener) -> None:
        async for event in listener:
            self._to_trio(self._send.send_nowait, dict(event))

    async def _a_watch_runstate(self, client: QMPClient) -> None:
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        if not self._closed:
            self._to_trio(self._mark_lost, "the QMP connection to QEMU was closed (QEMU exited?)")

    def _to_trio(self, fn, *args) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            log.info("%s", reason)
            self.lost.set()

    async def aclose(self) -> None:
        """Disconnect and stop the thread (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            try:
                with trio.move_on_after(5):
                    await self._call(self._client.disconnect(), what="disconnect")
            except Exception as e:  # noqa: BLE001 - e.g. an assertion in qemu.qmp after a
                log.debug("disconnect: %r", e)  # cancelled connect; closing must not fail
        with trio.move_on_after(5):
            await self._call(self._a_stop_tasks(), what="stop")
        self._loop.call_soon_threadsafe(self._loop.stop)
        await trio.to_thread.run_sync(self._thread.join, 5)
        if not self._thread.is_alive():
            self._loop.close()
        self._send.close()

    async def _a_stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> QmpConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # -- commands --

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float = 60.0
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises :class:`QemuError`: QEMU's error text for a refused command,
        ``lost=True`` when the connection is gone.  Cancelling the trio task
        abandons the wait (QEMU may still run the command).
        """
        if self.lost.is_set():
            raise QemuError(f"{command}: {self.lost_reason}", lost=True)
        if self._client is None or self._closed:
            raise QemuError(f"{command}: not connected", lost=True)
        args = dict(arguments) if arguments else None
        log.debug("-> %s %s", command, args)
        result = await self._call(
            self._client.execute(command, args), timeout=timeout, what=command
        )
        log.debug("<- %s %s", command, result)
        return result

    async def _call(self, coro, *, timeout: float | None = None, what: str) -> Any:
        """Run *coro* on the asyncio thread; sleep in trio until it is done."""
        cfut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_fut) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        cfut.add_done_callback(wake)
        try:
            if timeout is None:
                await done.wait()
            else:
                with trio.fail_after(timeout):
                    await done.wait()
        except trio.TooSlowError:
            cfut.cancel()
            raise QemuError(f"{what}: QEMU did not answer within {timeout:g} s") from None
        except BaseException:
            cfut.cancel()
            raise
        try:
            return cfut.result()
        except ExecuteError as e:
            raise QemuError(f"{what}: {e}", qmp_class=e.error_class) from e
        except QemuError:
            raise
        except (QMPError, OSError, EOFError, concurrent.futures.CancelledError) as e:
            reason = self.lost_reason or f"QMP connection failed: {e or type(e).__name__}"
            self._mark_lost(reason)
            raise QemuError(f"{what}: {reason}", lost=True) from e

    async def hmp(self, command_line: str, *, timeout: float = 60.0) -> str:
        """Run a human monitor command (tests use ``qemu-io``); returns its output."""
        return await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
