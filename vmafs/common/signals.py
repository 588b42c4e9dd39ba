"""How every vmafs command reacts to the signals that ask it to stop.

One rule for all of them: the first stop signal starts a clean stop (temporary
files removed, QEMU jobs cancelled, the filesystem unmounted); later signals
never cut that clean-up short; once the work is committed (the archive is
under its name) no signal changes the outcome.  SIGHUP counts: a dropped ssh
session must not leave half-done work behind.

The rule is applied in two kinds of program:

- synchronous commands (extract, recompress): :func:`first_signal_raises`
  turns the first signal into an exception raised where the main thread is;
- trio programs (backup, create, the mount's serve loop): :func:`receive`
  hands each signal to a callback from a task; :class:`SignalGuard` uses it
  to cancel a whole command, and :class:`LateSignals` covers the moments
  when no receiver listens (before it starts, after it closed).

trio is imported only by the trio functions, so synchronous commands do not
pay for it at start-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

#: Signals that stop a command cleanly: Ctrl-C, kill's default, the terminal
#: or ssh session going away.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def first_signal_raises(
    signals: Sequence[int],
    make_exc: Callable[[int], BaseException],
    *,
    ignore: Callable[[], bool] = lambda: False,
) -> Iterator[None]:
    """In the block, the first of *signals* raises ``make_exc(signum)``.

    Later ones are ignored, so the cleanup they unwind into runs to its end;
    so is every one once ``ignore()`` is true (the work is committed).  Off
    the main thread (in-process callers) signals are left alone.
    """
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if fired or ignore():
            return
        fired = True
        raise make_exc(signum)

    old = {}
    try:
        for signum in signals:
            old[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def signals_deferred(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Hold *signals* back until the block is done (they are delivered then).

    Around steps that must not be cut in two by a handler that raises: creating
    a temporary file and remembering its name; linking it to its final name
    and marking it committed.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


async def receive(
    on_signal: Callable[[int], None],
    signals: Sequence[int] = STOP_SIGNALS,
    *,
    listening: trio.Event | None = None,
) -> None:
    """Call ``on_signal(signum)`` for each of *signals* until cancelled (a trio task).

    *listening* is set once the receiver is installed: a signal from then on
    is delivered to *on_signal*; one before went to the previous handlers.
    """
    import trio  # noqa: PLC0415 - trio programs only

    with trio.open_signal_receiver(*signals) as received:
        if listening is not None:
            listening.set()
        async for signum in received:
            on_signal(signum)


class EarlySignals:
    """Records the signals that arrive before the trio loop listens for them.

    A handler for ``signal.signal`` until a trio receiver (:func:`receive`)
    takes over; the program then acts on :attr:`received`.  The mount
    installs it before ``pyfuse3.init``: from then on a SIGTERM with its
    default action would kill the process and leave a dead mount (ENOTCONN).
    """

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, _frame) -> None:
        self.received.append(signum)


def unwrap_group(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one, else *exc* itself.

    trio wraps whatever leaves a nursery in an ``ExceptionGroup``; users must
    see the real error ("AF_UNIX path too long"), not "Exceptions from Trio
    nursery (1 sub-exception)".
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class SignalGuard:
    """The stop signals for a whole trio command: ``await SignalGuard(interrupted).run(fn)``.

    While a :attr:`delegate` is set (the phase that has its own clean abort,
    e.g. a running backup), each signal goes to it.  Otherwise the first
    signal cancels *fn*, whose ``async with`` blocks clean up, and ``run``
    raises ``interrupted(signum)`` - unless *fn* had already returned a
    result (the work is committed: success stands).  An exception group of
    one from *fn* is raised as that one exception (the CLI prints it as one
    line).
    """

    def __init__(
        self, interrupted: Callable[[int], BaseException], signals: Sequence[int] = STOP_SIGNALS
    ) -> None:
        import trio  # noqa: PLC0415 - trio programs only

        self.signals = tuple(signals)
        self.signum: int | None = None
        self.delegate: Callable[[int], None] | None = None
        self._interrupted = interrupted
        self._scope: trio.CancelScope | None = None
        #: set once the guard's signal receiver is installed (inside :meth:`run`)
        self.listening = trio.Event()

    async def run(self, fn: Callable[..., Awaitable[Any]], *args, **kwargs):
        import trio  # noqa: PLC0415

        error: Exception | None = None
        result = None
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._scope:
                nursery.start_soon(self._watch)
                try:
                    result = await fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - re-raised below, outside the nursery
                    error = unwrap_group(e)
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if result is None and self.signum is not None:
            raise self._interrupted(self.signum)
        return result

    async def _watch(self) -> None:
        await receive(self._on_signal, self.signals, listening=self.listening)

    def _on_signal(self, signum: int) -> None:
        if self.delegate is not None:
            self.delegate(signum)
        elif self.signum is None:
            self.signum = signum
            self._scope.cancel()


class _Committable(Protocol):
    @property
    def committed(self) -> bool: ...


class LateSignals:
    """Signals while a :class:`SignalGuard` does not listen: nothing lost, nothing wrong.

    The guard's receiver exists only while trio runs the command, and it
    starts listening only once the command's first await has let it run.

    - Once :attr:`output` is committed a signal changes nothing: the command
      succeeds.  (The guard's receiver restores these handlers when it closes;
      without them a SIGTERM while the work was being wound down or the
      interpreter exited killed the process with 143 and no message although
      the output was complete.)
    - Inside trio, before the output is committed, SIGINT goes to trio's
      handler (it knows where a KeyboardInterrupt is safe) and a signal whose
      default is to kill is recorded instead: :meth:`ready`, awaited before
      the output is created, raises ``interrupted(signum)`` for it; after the
      command has failed it changes nothing (the status says failure).
    - Outside trio the dispositions the process started with apply again.

    After a successful run (:meth:`committed`) the signals are ignored until
    the process exits (for CLI entry points): any window left would be one
    for a wrong status.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, interrupted: Callable[[int], BaseException]) -> None:
        self.output: _Committable | None = None
        self.pending: int | None = None
        self._interrupted = interrupted
        #: dispositions before trio.run (restored by nobody: see the class docs)
        self._outside = {s: signal.getsignal(s) for s in self.SIGNALS}
        #: dispositions inside trio.run (SIGINT: trio's KeyboardInterrupt handler)
        self._inside: dict[int, object] = {}
        self._in_trio = False
        self._guard: SignalGuard | None = None

    async def run(self, guard: SignalGuard, main: Callable[[], Awaitable[Any]]):
        """``guard.run(main)`` with these handlers installed below the guard's receiver."""
        self._guard = guard
        for signum in self.SIGNALS:
            self._inside[signum] = signal.signal(signum, self._handle)
        self._in_trio = True
        try:
            return await guard.run(main)
        finally:
            self._in_trio = False

    async def ready(self) -> None:
        """Wait until the guard listens, then raise for a signal that came before."""
        await self._guard.listening.wait()
        if self.pending is not None:
            raise self._interrupted(self.pending)

    def committed(self) -> None:
        """The output is complete: ignore these signals from now until the exit.

        SIG_IGN, not a Python handler: the interpreter resets Python handlers
        to SIG_DFL while it shuts down, and a signal then would still kill.
        """
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        if self.output is not None and self.output.committed:
            return  # the output is complete: success stands
        previous = (self._inside if self._in_trio else self._outside).get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        elif self._in_trio:
            if self.pending is None:
                self.pending = signum
        else:  # SIG_DFL outside trio: die of the signal, as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
