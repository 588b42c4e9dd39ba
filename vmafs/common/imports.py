"""Importing a module in a thread while the caller does something else.

Worth it when the caller mostly waits outside the GIL (zstd, zlib, I/O) or
when the page cache is cold: the imports' own file reads then overlap the
caller's.  A failed import is left to the caller's own ``import``
statement, which raises it properly.

Only modules that share no package with what the caller imports meanwhile:
two threads importing one package at once can meet in a circular import and
one of them gets a partially initialised module (``cannot import name ...
from partially initialized module``).  Third-party leaves such as pyfuse3
and trio are safe; vmafs's own modules, which import numpy, are not.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading


class BackgroundImport:
    """``imp = BackgroundImport("pyfuse3", "trio"); ...; imp.join()``: *modules* imported."""

    def __init__(self, *modules: str) -> None:
        self.modules = modules
        self._interval = sys.getswitchinterval()
        # The caller's thread wants the GIL back after each call into zstd; behind
        # a busy import thread it would wait a whole interval (5 ms) each time.
        sys.setswitchinterval(min(self._interval, 0.0005))
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="vmafs-import", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        for module in self.modules:
            with contextlib.suppress(BaseException):
                importlib.import_module(module)

    def join(self) -> None:
        """Wait for the import to end (at once if it has); idempotent."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            sys.setswitchinterval(self._interval)


@contextlib.contextmanager
def importing_meanwhile(*modules: str):
    """Import *modules* in a thread while the block runs; joined at its end."""
    imp = BackgroundImport(*modules)
    try:
        yield
    finally:
        imp.join()
