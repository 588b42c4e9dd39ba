"""The environment that makes libguestfs's appliance start on this host.

libguestfs's ``direct`` backend runs QEMU itself (no libvirtd needed).  It
uses KVM whenever ``/dev/kvm`` opens, but on some hosts (nested or
restricted virtualisation) KVM opens and then cannot run a vCPU: QEMU
aborts and the launch fails.  :func:`kvm_runs` asks QEMU itself, with a
paused KVM machine that it quits at once (~0.1 s), and only when that
fails is the appliance told to use TCG (``force_tcg``: emulation, a launch
of ~15 s instead of ~3 s).  Settings the user gave in the environment win.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

QEMU = "qemu-system-x86_64"


@functools.cache
def kvm_runs() -> bool:
    """True when QEMU can start a KVM machine with ``-cpu host`` here (as libguestfs does)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = shutil.which(QEMU)
    if qemu is None:
        return False
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-display", "none"]
    argv += ["-nodefaults", "-S", "-monitor", "stdio"]
    try:
        proc = subprocess.run(
            argv, input="quit\n", capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def libguestfs_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """*base* (default os.environ) plus the libguestfs backend settings for this host."""
    env = dict(os.environ if base is None else base)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    if "LIBGUESTFS_BACKEND_SETTINGS" not in env and not kvm_runs():
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env
