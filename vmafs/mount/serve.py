"""Serving a mount: ``pyfuse3.init``, the trio loop, signals and readiness."""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence

from ..common.signals import EarlySignals

log = logging.getLogger("vmafs.mount")

READY_TIMEOUT = 60.0  # seconds the filesystem process may take to answer its first stat

#: Signals that unmount and end the process.  SIGHUP does not: a daemon has
#: no terminal to lose, and log rotators send it by habit (it is logged).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CAUGHT_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def serve(
    ops,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[str | None], None],
    readahead_kb: int = 0,
    alongside: Sequence[Callable[[], Awaitable[None]]] = (),
) -> int:
    """Mount *ops* on *mountpoint* and serve until unmounted or signalled.

    Calls ``on_ready(None)`` once the mount answers a stat, or
    ``on_ready(message)`` if it never comes up.  A non-zero *readahead_kb* is
    set on the mount's backing device first (see :func:`set_readahead`).
    Each of *alongside* runs as a task in the loop until the loop ends
    (cancelled then).  Returns the exit status.
    """
    import pyfuse3  # noqa: PLC0415
    import trio  # noqa: PLC0415

    early = EarlySignals()
    previous = {sig: signal.signal(sig, early) for sig in CAUGHT_SIGNALS}
    try:
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            on_ready(f"cannot mount on {mountpoint}: {e}")
            if "mount" in str(e):
                # The session exists but is not mounted: free it.  (After a failed
                # fuse_session_new there is no session, and close() would crash.)
                pyfuse3.close(unmount=False)
            return 1
        status = 1
        try:
            # pyfuse3's worker tasks: the filesystem says how many it needs
            # (VmaFS.worker_tasks), else pyfuse3's default
            workers = getattr(ops, "worker_tasks", 99)
            status = trio.run(
                _main_loop, mountpoint, on_ready, readahead_kb, early, alongside, workers
            )
        except BaseException as e:
            log.exception("filesystem loop failed")
            on_ready(f"filesystem failed: {e}")
            raise
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def set_readahead(st_dev: int, kib: int) -> None:
    """Set the readahead of the mount with device number *st_dev* to *kib* KiB.

    Only root may write the sysfs knob; otherwise the kernel's default stays
    (logged, not an error: reads are correct either way, only slower).
    """
    path = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("readahead stays at the kernel default: cannot write %s: %s", path, e.strerror)
    else:
        log.debug("readahead set to %d KiB (%s)", kib, path)


async def _main_loop(
    mountpoint: str,
    on_ready: Callable[[str | None], None],
    readahead_kb: int = 0,
    early: EarlySignals | None = None,
    alongside: Sequence[Callable[[], Awaitable[None]]] = (),
    workers: int = 99,
) -> int:
    import pyfuse3  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from ..common.signals import receive as receive_signals  # noqa: PLC0415

    result: dict = {"status": 0, "ready": False, "signal": None}

    async def fs_loop(cancel: trio.CancelScope) -> None:
        try:
            await pyfuse3.main(1, workers)
        finally:
            cancel.cancel()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if signum not in STOP_SIGNALS:
            log.info(
                "%s: ignored, %s stays mounted (unmount with 'vmafs umount')", name, mountpoint
            )
            return
        log.info("%s: unmounting %s", name, mountpoint)
        result["signal"] = name
        pyfuse3.terminate()

    async def replay_early_signals(listening: trio.Event) -> None:
        # Once the receiver listens nothing more lands in *early*: act on what did.
        await listening.wait()
        for signum in early.received if early else ():
            on_signal(signum)

    async def wait_ready() -> None:
        with trio.move_on_after(READY_TIMEOUT):
            parent_dev = os.stat(os.path.dirname(mountpoint) or "/").st_dev
            while True:
                try:
                    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
                except OSError as e:  # e.g. ENOTCONN while the kernel sets up
                    log.debug("waiting for the mount: %s", e)
                    await trio.sleep(0.05)
                    continue
                if st.st_dev != parent_dev:
                    if readahead_kb:
                        set_readahead(st.st_dev, readahead_kb)
                    result["ready"] = True
                    log.info("mounted on %s", mountpoint)
                    on_ready(None)
                    return
                await trio.sleep(0.05)
        on_ready(f"{mountpoint}: the mount did not come up within {READY_TIMEOUT:.0f}s")
        pyfuse3.terminate()
        result["status"] = 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs_loop, nursery.cancel_scope)
        listening = trio.Event()
        nursery.start_soon(
            functools.partial(receive_signals, on_signal, CAUGHT_SIGNALS, listening=listening)
        )
        nursery.start_soon(replay_early_signals, listening)
        nursery.start_soon(wait_ready)
        for task in alongside:
            nursery.start_soon(task)
    if not result["ready"]:
        if result["signal"]:
            # Asked to stop: not a failure of the filesystem, but no mount either.
            on_ready(f"{mountpoint}: {result['signal']} before the mount was ready")
            return 0
        on_ready(f"{mountpoint}: the filesystem ended before the mount was ready")
        return 1
    return result["status"]
