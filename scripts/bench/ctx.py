"""What every figure gets and gives: the run's context and one table row."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import datasets as ds

#: the disk's file name inside a mounted bench archive
DISK = "disk-drive-scsi0.raw"


@dataclass
class Row:
    figure: str
    baseline: str
    base_value: str
    vmafs_value: str
    ratio: str
    target: str
    met: bool | None
    note: str = ""


@dataclass
class Ctx:
    work: str
    sizes: ds.Sizes
    notes: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, object] = field(default_factory=dict)  # dataset paths, built lazily
    facts: dict[str, object] = field(default_factory=dict)

    def note(self, section: str, text: str | list[str]) -> None:
        lines = self.notes.setdefault(section, [])
        lines.extend([text] if isinstance(text, str) else text)

    def mnt(self, name: str) -> str:
        p = os.path.join(self.work, "mnt", name)
        os.makedirs(p, exist_ok=True)
        return p

    def get(self, key: str):
        """The data set *key*, built on first use (cached in the work dir)."""
        if key not in self.data:
            t0 = time.perf_counter()
            self.data[key] = self._build(key)
            self.facts.setdefault("build_s", {})[key] = round(time.perf_counter() - t0, 2)
        return self.data[key]

    def _build(self, key: str):
        w, s = self.work, self.sizes
        builders = {
            "files": lambda: ds.guest_files(w, s),
            "image": lambda: ds.ext4_image(w, s, self.get("files")),
            "archive": lambda: ds.created_archive(w, self.get("image")),
            "raw": lambda: os.path.join(ds.extracted(w, self.get("archive")), DISK),
            "tar": lambda: ds.raw_tar(w, self.get("raw")),
            "zst": lambda: ds.zstd_archive(w, self.get("archive")),
            "seekable": lambda: ds.seekable_archive(w, self.get("archive")),
            "sparse": lambda: ds.sparse_archive(w, s),
            "sparse-shuffled": lambda: ds.sparse_archive(w, s, "shuffled"),
            "wdisk": lambda: ds.random_image(w, "writer-disk.img", s.writer_disk),
            "data-archive": lambda: ds.created_archive(w, self.get("wdisk"), "data.vma"),
            "data-raw": lambda: os.path.join(
                ds.extracted(w, self.get("data-archive"), "data-extracted"), DISK
            ),
            "ldisk": lambda: ds.random_image(w, "latency-disk.img", s.latency_disk, seed=4),
        }
        return builders[key]()


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y > 0 else "n/a"


def mounted_disk(mnt: str) -> str:
    return os.path.join(mnt, DISK)
