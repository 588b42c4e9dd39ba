"""Machine description and the markdown table."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from .ctx import Row


def _first_line(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    fuse = _first_line(["pkg-config", "--modversion", "fuse3"])
    if fuse in ("?", "not installed"):
        fuse = _first_line(["fusermount3", "-V"])
    try:
        import pyfuse3

        pyfuse = pyfuse3.__version__
    except Exception:  # noqa: BLE001 - only a description
        pyfuse = "?"
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": mem,
        "kernel": platform.release(),
        "libfuse": f"{fuse} (pyfuse3 {pyfuse})",
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "python": sys.version.split()[0],
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    out = [
        "| figure | baseline | baseline value | vmafs value | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "n/a"}[r.met]
        out.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    r.figure,
                    r.baseline,
                    r.base_value,
                    r.vmafs_value,
                    r.ratio,
                    r.target,
                    met,
                )
            )
            + " |"
        )
    return "\n".join(out)


def row_notes(rows: list[Row]) -> str:
    lines = []
    for i, r in enumerate(rows, 1):
        if r.note:
            lines.append(f"{i}. {r.figure}: {r.note}")
    return "\n".join(lines)
