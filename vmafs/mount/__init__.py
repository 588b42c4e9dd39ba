"""Mount lifecycle: ``vmafs mount``, ``vmafs umount`` and ``mount.vmafs``.

What the mounted files look like is :mod:`vmafs.fs`; docs/mount.md is the
user's reference.  One job per module:

- :mod:`.options`: ``-o`` parsing and the options handed to libfuse;
- :mod:`.checks`: what must fail before the process detaches;
- :mod:`.mounting`: :func:`mount`, the steps below in order;
- :mod:`.daemon`: :func:`~.daemon.daemonize`, fork + readiness pipe
  (reusable by any command that serves in the background);
- :mod:`.serve`: ``pyfuse3.init``, the trio loop, signals;
- :mod:`.logs`: where a mount logs;
- :mod:`.umount`: ``vmafs umount``;
- :mod:`.cli` and :mod:`.helper`: ``vmafs mount|umount`` and ``mount.vmafs``.

Sequence of ``vmafs mount ARCHIVE MOUNTPOINT``:

1. parse ``-o`` options (unknown ones are a usage error, exit 2);
2. check MOUNTPOINT (symlinks resolved) is an empty directory and not a
   mount point already (``-o nonempty`` allows a non-empty one);
3. open the archive (:meth:`Archive.open` validates every extent; an
   incomplete archive is refused unless ``-o allow_incomplete``);
4. unless ``-f``: fork; the parent waits on a pipe until the filesystem
   process reports "mounted and answering" or the reason it failed, and
   exits 0 or 1 accordingly.  So every error is reported on the terminal
   before anything detaches, and the mount is usable when the command
   returns;
5. the filesystem process mounts (``pyfuse3.init``), runs ``pyfuse3.main``
   under trio, and on SIGTERM/SIGINT/SIGHUP ends the loop and unmounts.
   ``pyfuse3.close()`` runs on every exit path.

Logging: ``-f`` logs to stderr.  Detached, logs go to ``-o logfile=PATH``
if given (a relative PATH is taken from where ``vmafs mount`` was started),
else to syslog through /dev/log (journald or a syslog daemon), else, when
nothing listens there, to ``$XDG_STATE_HOME/vmafs/mount.log``
(``~/.local/state/vmafs/mount.log``; ``/var/log/vmafs.log`` for root).
"""

from .checks import check_logfile, check_mountpoint, mount_table, mountpoint_path, open_archive
from .cli import MOUNT_OPTIONS_HELP, register, run, run_umount
from .errors import MountError, UsageError
from .helper import mount_helper_main
from .mounting import mount
from .options import DEFAULT_READAHEAD_KB, MountOptions, fuse_options, parse_options
from .serve import serve, set_readahead
from .umount import loop_devices_on, umount

__all__ = [
    "DEFAULT_READAHEAD_KB",
    "MOUNT_OPTIONS_HELP",
    "MountError",
    "MountOptions",
    "UsageError",
    "check_logfile",
    "check_mountpoint",
    "fuse_options",
    "loop_devices_on",
    "mount",
    "mount_helper_main",
    "mount_table",
    "mountpoint_path",
    "open_archive",
    "parse_options",
    "register",
    "run",
    "run_umount",
    "serve",
    "set_readahead",
    "umount",
]
