"""The guest-disk fixtures (tests/fixtures/guests/) and their manifests, for the
restore tests: what every volume holds, and readers of the same facts from a
GuestFS, from a copied tree and from a mounted directory, so each route can be
compared with the manifest exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from vmafs.guest.entry import GuestFS

GUESTS_DIR = Path(__file__).resolve().parent / "fixtures" / "guests"
ARCHIVES = ("pve-gpt.vma.zst", "ntfs-mbr.vma")


def manifest(archive: str) -> dict:
    name = archive.removesuffix(".zst").removesuffix(".vma")
    return json.loads((GUESTS_DIR / f"{name}.json").read_text())


def copy_archive(archive: str, where: Path) -> Path:
    """A copy of the fixture in *where* (opening one writes a side index beside it)."""
    where.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(GUESTS_DIR / archive, where / archive))


def volumes(archive: str) -> list[dict]:
    return manifest(archive)["volumes"]


def _record(kind: str, data: bytes | None = None, target: str | None = None) -> dict:
    if kind == "file":
        assert data is not None
        return {"type": "file", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if kind == "symlink":
        return {"type": "symlink", "target": target}
    return {"type": kind}


def tree_of_fs(fs: GuestFS, top: str = "/") -> dict[str, dict]:
    """{path: record} of everything below *top* of an engine's GuestFS."""
    out: dict[str, dict] = {}
    for entry in fs.scandir(top):
        if entry.kind == "file":
            out[entry.path] = _record("file", b"".join(fs.read(entry.path, 1 << 16)))
        else:
            out[entry.path] = _record(entry.kind, target=entry.target)
        if entry.kind == "dir":
            out.update(tree_of_fs(fs, entry.path))
    return out


def tree_of_dir(root: str | os.PathLike) -> dict[str, dict]:
    """{path: record} of a host directory, symlinks not followed (a copy or a mount)."""
    root = os.fspath(root)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            path = "/" + os.path.relpath(full, root)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                out[path] = _record("symlink", target=os.readlink(full))
            elif stat.S_ISDIR(mode):
                out[path] = _record("dir")
            elif stat.S_ISREG(mode):
                out[path] = _record("file", Path(full).read_bytes())
            else:
                out[path] = _record("other")
    return out


def expected(volume: dict) -> dict[str, dict]:
    """The manifest's files of *volume* in the records' shape."""
    return {
        path: {k: v for k, v in rec.items() if k in ("type", "size", "sha256", "target")}
        for path, rec in volume["files"].items()
    }
