"""Slow backup storage on this machine: a block device throttled for the processes
in a cgroup (v1 blkio, which this kernel has; no device-mapper, so no dm-delay).

``with throttled(dev, iops, bps) as t:`` makes a fresh cgroup whose reads of
*dev* are limited to *iops* requests and *bps* bytes per second; start a child
in it with ``subprocess.run(..., preexec_fn=t.join)``.  The cgroup is named
per process, so two bench runs on one machine do not share a limit.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .util import Skip

BLKIO = "/sys/fs/cgroup/blkio"


@dataclass(frozen=True)
class Throttle:
    path: str  # the cgroup's directory

    def join(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``)."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def _majmin(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _limit(path: str, majmin: str, iops: int, bps: int) -> None:
    for name, value in (("read_iops_device", iops), ("read_bps_device", bps)):
        with open(os.path.join(path, f"blkio.throttle.{name}"), "w") as f:
            f.write(f"{majmin} {value}\n")


@contextlib.contextmanager
def throttled(dev: str, iops: int, bps: int) -> Iterator[Throttle]:
    """A cgroup whose reads of block device *dev* are throttled; removed afterwards."""
    if not os.path.isdir(BLKIO):
        raise Skip("no cgroup v1 blkio controller (and no dm-delay) to throttle a loop device")
    path = os.path.join(BLKIO, f"vmafs-bench-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    majmin = _majmin(dev)
    try:
        _limit(path, majmin, iops, bps)
        yield Throttle(path)
    finally:
        try:
            _limit(path, majmin, 0, 0)
        except OSError:
            pass
        for _ in range(20):  # the last member may still be exiting
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.2)
