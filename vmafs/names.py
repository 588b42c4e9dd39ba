"""The file names under which an archive's devices and configs are shown.

Both the mount (:mod:`vmafs.fs`) and ``vmafs extract`` ask
:func:`safe_entry_names` which names to use, so a mounted archive and an
extracted one always look the same:

- ``disk-<devname>.raw`` for each disk, as Proxmox's ``vma extract`` names it;
- ``vmstate.bin`` for the RAM state, when the archive holds one;
- each config file under its own name (``qemu-server.conf``, ...);
- ``volumes/`` (mount only): a directory per disk holding its partitions
  and LVs as files (:func:`drive_dir_names`, :func:`volume_paths`).  The
  name is reserved: a config called ``volumes`` is always renamed, in the
  mount and in ``vmafs extract`` alike, so a config can never shadow it.

Config and device names come from the archive and are untrusted.  A name
is used as is only when it is a plain, safe file name (see
:func:`unsafe_reason`); otherwise, and when it clashes with an entry named
before it, it is replaced by a deterministic fallback and the entry records
why.  A name is never interpreted as a path, so nothing is ever written or
shown outside the one directory.

Everything here is pure: no I/O, no logging.  Callers log
:attr:`Entry.reason` for renamed entries (:func:`rename_messages`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from .format import Header

MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems
VMSTATE_FILE = "vmstate.bin"
#: The directory of volume files in a mount; no config may take this name.
VOLUMES_DIR = "volumes"
#: The file of a filesystem that fills its whole disk, in the disk's volume directory.
WHOLE_DISK_FILE = "disk"
RESERVED_NAMES = frozenset({VOLUMES_DIR})

# Unicode categories refused in a name: control characters (Cc: C0, DEL, C1),
# invisible format characters (Cf: bidi overrides that make a name display as
# another), line/paragraph separators, lone surrogates (undecodable bytes).
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}\Z")


@dataclass(frozen=True)
class Entry:
    """One file of the archive's directory.

    ``kind`` is ``"disk"``, ``"vmstate"`` or ``"config"``.  Disks and the
    vmstate carry ``dev_id``; configs carry ``config_index`` (position in
    ``Header.configs``, i.e. slot order) and ``data``.  ``original`` is the
    name as stored in the archive (device name for disks), ``reason`` is
    ``None`` unless the entry was renamed, then it says why.
    """

    name: str
    kind: str
    size: int
    original: str
    dev_id: int | None = None
    config_index: int | None = None
    data: bytes | None = field(default=None, repr=False)
    reason: str | None = None

    @property
    def renamed(self) -> bool:
        return self.reason is not None


def unsafe_reason(name: str) -> str | None:
    """Why *name* is not a plain safe file name, or ``None`` if it is one.

    Refused: empty, ``.`` and ``..``, any ``/``, NUL or other control or
    invisible format character, more than 255 bytes in UTF-8.
    """
    if not name:
        return "empty name"
    if name in (".", ".."):
        return f"name {name!r} refers to a directory"
    if "/" in name:
        return "name contains '/'"
    if "\0" in name:
        return "name contains NUL"
    for ch in name:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            return f"name contains control character U+{ord(ch):04X}"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"name is longer than {MAX_NAME_BYTES} bytes"
    return None


def safe_entry_names(archive) -> dict[str, Entry]:
    """Map each file name to show or extract to its :class:`Entry`.

    *archive* is an :class:`vmafs.archive.Archive` or a
    :class:`vmafs.format.Header`.  The order (and so who keeps a name on a
    clash) is fixed: disks by dev_id, then the vmstate, then configs in
    slot order; the first comer keeps a name, later ones are renamed.
    Fallback names: ``disk-dev<dev_id>.raw``, ``vmstate-dev<dev_id>.bin``,
    ``config-<index><suffix>`` (suffix kept from the original name when it
    is a short alphanumeric extension other than ``.raw``/``.bin``, else
    ``.conf``), each followed by
    ``~2``, ``~3``... if even that is taken.  Returned in that order.
    """
    header: Header = getattr(archive, "header", archive)
    entries: dict[str, Entry] = {}

    def place(entry: Entry, fallback: str, reason: str | None) -> None:
        name = entry.name
        if reason is None and name in entries:
            reason = f"name clashes with {entries[name].kind} {entries[name].original!r}"
        if reason is not None:
            name = _unique(fallback, entries)
        entries[name] = dataclasses.replace(entry, name=name, reason=reason)

    devices = [header.devices[i] for i in sorted(header.devices)]
    for dev in (d for d in devices if not d.is_vmstate):
        bad = unsafe_reason(dev.name)
        name = f"disk-{dev.name}.raw"
        if bad is None:
            bad = unsafe_reason(name)  # the prefix/suffix may push it over 255 bytes
        entry = Entry(name, "disk", dev.size, dev.name, dev_id=dev.dev_id)
        place(entry, f"disk-dev{dev.dev_id}.raw", f"device {bad}" if bad else None)
    for dev in (d for d in devices if d.is_vmstate):
        entry = Entry(VMSTATE_FILE, "vmstate", dev.size, dev.name, dev_id=dev.dev_id)
        place(entry, f"vmstate-dev{dev.dev_id}.bin", None)
    for i, cfg in enumerate(header.configs):
        bad = unsafe_reason(cfg.name)
        if bad is None and cfg.name in RESERVED_NAMES:
            bad = f"name {cfg.name!r} is reserved for the volumes directory"
        suffix = _SUFFIX.search(cfg.name)
        keep = suffix and suffix.group().lower() not in (".raw", ".bin")  # no fake disk names
        fallback = f"config-{i}{suffix.group() if keep else '.conf'}"
        entry = Entry(cfg.name, "config", len(cfg.data), cfg.name, config_index=i, data=cfg.data)
        place(entry, fallback, bad)
    return entries


def rename_messages(entries: Iterable[Entry]) -> list[str]:
    """One human-readable line per renamed entry, for the caller to log."""
    return [
        f"{e.kind} {e.original!r} shown as {e.name!r}: {e.reason}" for e in entries if e.renamed
    ]


def drive_dir_names(archive) -> dict[int, str]:
    """dev_id -> the name of each disk's directory under ``volumes/``.

    The device name when it is a safe file name (``drive-scsi0``), else
    ``dev<dev_id>``; ``~2``... on a clash.  Disks in dev_id order.
    """
    header: Header = getattr(archive, "header", archive)
    out: dict[int, str] = {}
    taken: dict[str, Entry] = {}
    for dev_id in sorted(header.devices):
        dev = header.devices[dev_id]
        if dev.is_vmstate:
            continue
        name = dev.name if unsafe_reason(dev.name) is None else f"dev{dev_id}"
        name = _unique(name, taken)
        taken[name] = Entry(name, "disk", dev.size, dev.name, dev_id=dev_id)
        out[dev_id] = name
    return out


def volume_paths(volumes) -> dict[str, tuple[str, ...]]:
    """Volume name -> its path inside its disk's directory, for the readable *volumes*.

    Partitions are files ``p<N>``, a whole-disk filesystem is the file
    ``disk`` and an LV is ``<vg>/<lv>``.  A VG whose name is also a file
    there (a VG called ``p1``) gets ``<vg>~2``.  Volumes that cannot be
    read (Volume.note) have no path.  *volumes* are of one drive or many.
    """
    out: dict[str, tuple[str, ...]] = {}
    files: dict[str, set[str]] = {}
    vg_dirs: dict[tuple[str, str], str] = {}
    readable = [v for v in volumes if v.note is None]
    for v in readable:
        if v.kind != "lv":
            name = v.local_name or WHOLE_DISK_FILE
            files.setdefault(v.drive, set()).add(name)
            out[v.name] = (name,)
    for v in readable:
        if v.kind == "lv":
            vg, _, lv = v.local_name.rpartition("/")
            key = (v.drive, vg)
            if key not in vg_dirs:
                taken = files.get(v.drive, set()) | {
                    d for (dr, _), d in vg_dirs.items() if dr == v.drive
                }
                name, n = vg, 2
                while name in taken:
                    name, n = f"{vg}~{n}", n + 1
                vg_dirs[key] = name
            out[v.name] = (vg_dirs[key], lv)
    return out


def _unique(name: str, taken: dict[str, Entry]) -> str:
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    n = 2
    while True:
        candidate = f"{stem}~{n}{dot}{ext}" if dot else f"{name}~{n}"
        if candidate not in taken:
            return candidate
        n += 1
