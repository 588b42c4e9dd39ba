"""Smoke tests for the benchmark suite (scripts/bench, imported as ``bench``): the
data builders, the entry point and the table formatter on tiny sizes.  No timing
assertions: the numbers are the benchmark's business, these tests check that
what it builds is right."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from bench import datasets as ds
from bench.cli import _keep_analysis, render
from bench.ctx import Ctx, Row
from bench.reads import random_offsets
from bench.report import machine, table
from conftest import in_ci

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE

TINY = ds.Sizes(
    disk=64 << 20,
    files=4 << 20,
    restore_file=256 << 10,
    sparse_disk=256 << 20,
    sparse_data=2 << 20,
    writer_disk=1 << 20,
    latency_disk=1 << 20,
    random_reads=10,
    label="tiny",
)


def test_live_order_is_a_permutation_and_out_of_order():
    rng = np.random.default_rng(0)
    order = ds.live_order(5000, rng)
    assert sorted(order.tolist()) == list(range(5000))
    assert np.any(np.diff(order) < 0)


@pytest.mark.parametrize("order", ["live", "shuffled"])
def test_sparse_archive_reads_back(tmp_path, order):
    path = str(tmp_path / "s.vma")
    facts = ds.build_sparse_vma(path, 256 << 20, 2 << 20, seed=5, order=order)
    assert facts["clusters"] == (256 << 20) // CLUSTER_SIZE
    with Archive.open(path) as a:  # validates every extent, every cluster once
        assert a.missing_clusters(1) == 0
        assert a.stored_bytes(1) == facts["stored_bytes"]
        ranges = list(a.allocated_ranges(1))
        stored = sum(length for _, length in ranges)
        assert stored == facts["data_clusters"] * CLUSTER_SIZE
        # data lies where the index says, zeros elsewhere
        off, length = ranges[0]
        assert any(a.read(1, off, length))
        if off:
            assert not any(a.read(1, 0, off))


def test_sparse_archive_is_cached(tmp_path):
    path, facts = ds.sparse_archive(str(tmp_path), TINY)
    mtime = os.stat(path).st_mtime_ns
    again, facts2 = ds.sparse_archive(str(tmp_path), TINY)
    assert (again, facts2) == (path, facts)
    assert os.stat(path).st_mtime_ns == mtime


def test_build_once_rebuilds_only_when_params_change(tmp_path):
    path = str(tmp_path / "thing")
    made = []

    def make(tmp: str) -> None:
        made.append(tmp)
        with open(tmp, "w") as f:
            f.write(str(len(made)))

    assert ds.build_once(path, {"a": 1}, make) == path
    assert ds.build_once(path, {"a": 1}, make) == path
    assert made == [path + ".tmp"]
    ds.build_once(path, {"a": 2}, make)
    assert len(made) == 2 and open(path).read() == "2"


def test_build_once_keeps_nothing_of_a_failed_build(tmp_path):
    path = str(tmp_path / "thing")

    def make(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError):
        ds.build_once(path, {}, make)
    assert not os.path.exists(path) and not os.path.exists(path + ".done")
    ds.build_once(path, {}, lambda tmp: open(tmp, "w").close())  # the leftover .tmp is no bar
    assert os.path.exists(path + ".done")


def test_made_from_changes_with_the_source(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x")
    before = ds.made_from(str(src))
    src.write_bytes(b"xy")
    assert ds.made_from(str(src)) != before


def test_runs_from_a_checkout_with_one_command(tmp_path):
    """`python scripts/bench` imports this checkout's bench and vmafs, not an installed copy."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "bench"), "--only", "nosuch"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert p.returncode == 2, p.stderr
    assert "unknown figure(s): nosuch" in p.stdout and "restore" in p.stdout


def test_the_bench_is_not_in_the_installed_package():
    import vmafs

    assert not os.path.exists(os.path.join(os.path.dirname(vmafs.__file__), "bench"))


def test_random_offsets_lie_in_stored_data(tmp_path):
    path = str(tmp_path / "s.vma")
    ds.build_sparse_vma(path, 64 << 20, 1 << 20, seed=6)
    offsets = random_offsets(path, 50)
    assert len(set(offsets)) == 50
    with Archive.open(path) as a:
        ranges = list(a.allocated_ranges(1))
    for off in offsets:
        assert off % 4096 == 0
        assert any(start <= off < start + length for start, length in ranges)


def test_guest_files_half_text(tmp_path):
    files = ds.guest_files(str(tmp_path), TINY)
    sizes = {"bin": 0, "txt": 0}
    for root, _, names in os.walk(files):
        if root.endswith("restore"):
            continue
        for n in names:
            ext = n.rsplit(".", 1)[-1]
            if ext in sizes:
                sizes[ext] += os.path.getsize(os.path.join(root, n))
    assert sizes["bin"] == sizes["txt"] == TINY.files // 2
    text = next(os.path.join(r, n) for r, _, ns in os.walk(files) for n in ns if n.endswith(".txt"))
    with open(text, "rb") as f:
        data = f.read(4096)
    assert data.count(b"\n") > 10  # lines of text, not random bytes
    assert sum(32 <= b < 127 or b in b"\t\n" for b in data) > 0.95 * len(data)
    assert os.path.getsize(os.path.join(files, ds.RESTORE_FILE)) == TINY.restore_file


def test_ext4_image_holds_the_files(tmp_path):
    if not (shutil.which("mkfs.ext4") and shutil.which("debugfs")):
        if in_ci():
            pytest.fail("mkfs.ext4/debugfs (e2fsprogs) missing")
        pytest.skip("needs e2fsprogs")
    files = ds.guest_files(str(tmp_path), TINY)
    image = ds.ext4_image(str(tmp_path), TINY, files)
    assert os.path.getsize(image) == TINY.disk
    out = subprocess.run(
        ["debugfs", "-R", f"cat /{ds.RESTORE_FILE}", image], capture_output=True, check=True
    ).stdout
    with open(os.path.join(files, ds.RESTORE_FILE), "rb") as f:
        assert hashlib.sha256(out).digest() == hashlib.sha256(f.read()).digest()
    blocks = ds.nonzero_blocks(image)
    assert TINY.files // 4096 <= blocks < TINY.disk // 4096


def test_nonzero_blocks_counts_data_not_holes(tmp_path):
    p = tmp_path / "img"
    with open(p, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096 + bytes(4096) + b"y")  # 2 non-zero blocks, one zero block between
        f.seek(40 << 20)
        f.write(os.urandom(3 * 4096))
    assert ds.nonzero_blocks(str(p)) == 5


def test_table_escapes_and_marks():
    rows = [
        Row("a | b", "base", "1 s", "2 s", "2.00x", "<= 1.0x", False, "why"),
        Row("c", "-", "-", "not measured: `x` not found", "-", "-", None),
        Row("d", "-", "-", "3", "-", ">= 1", True),
    ]
    text = table(rows).splitlines()
    assert text[0].startswith("| figure | baseline | baseline value | vmafs value | ratio |")
    assert len(text) == 2 + len(rows)
    assert "a \\| b" in text[2] and text[2].endswith("| **no** |")
    assert text[3].endswith("| n/a |") and text[4].endswith("| yes |")
    assert all(line.count(" | ") == 6 for line in text[2:])


def test_render_keeps_the_analysis_block(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("old\n<!-- BEGIN ANALYSIS -->\nhand-written\n<!-- END ANALYSIS -->\ntrailer\n")
    analysis = _keep_analysis(str(out))
    assert analysis.startswith("<!-- BEGIN ANALYSIS -->") and "hand-written" in analysis
    ctx = Ctx(str(tmp_path), TINY)
    ctx.note("Section", ["| a |", "line"])

    class Args:
        quick = True

    text = render([Row("f", "b", "1", "2", "3", "t", True)], ctx, machine(), Args, 1.0, analysis)
    assert "## Machine" in text and "load average at start" in text
    assert "| f | b | 1 | 2 | 3 | t | yes |" in text
    assert "### Section" in text and "hand-written" in text and "trailer" not in text


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_zstd_source_benchmark_reports_the_targets():
    from bench.zstd_source import benchmark
    from conftest import FIXTURES_DIR

    path = str(FIXTURES_DIR / "ext4-guest.vma.zst")
    r = benchmark(path, reads=20)
    assert r["size"] == os.path.getsize(FIXTURES_DIR / "ext4-guest.vma")
    assert r["needed_scan"] == 1 and r["frames"] == 1
    assert r["index_bytes"] > 0 and r["compressed_bytes"] == os.path.getsize(path)
    for key in ("scan_ratio", "index_ratio", "read_p99_ms", "scan_cpu_ratio"):
        assert r[key] >= 0


def test_every_bench_module_imports():
    """A figure module that a merge left importing a removed name fails here, not in
    the next full bench run (nothing else imports it before that run)."""
    import importlib
    import pkgutil

    import bench

    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if m.name != "__main__"]
    assert {"figures", "cli", "datasets", "serve", "slow_figures"} <= set(names)
    for name in names:
        importlib.import_module(f"bench.{name}")
    from bench.cli import ALL
    from bench.figures import FIGURES

    assert "serve" in FIGURES and set(FIGURES) <= set(ALL)


def test_guest_data_option_keeps_its_data_sets_apart():
    """``--guest-data 5.5``: the files grow, the disk grows to hold them with room to
    spare, and the work directory differs from the usual data set's."""
    big = ds.with_guest_data(ds.FULL, int(5.5e9))
    assert big.files == 5_500_000_000 and big.disk == ds.FULL.disk
    assert ds.work_name(big) == "full-5.5gb" and ds.work_name(ds.FULL) == "full"
    huge = ds.with_guest_data(ds.QUICK, 20 * 10**9)
    assert huge.disk >= huge.files * 5 // 4 and huge.disk % (1 << 30) == 0
    assert ds.work_name(huge) == "quick-20gb" and ds.work_name(ds.QUICK) == "quick"
    assert ds.work_name(ds.with_guest_data(ds.FULL, ds.FULL.files)) == "full"


@pytest.mark.fuse
@pytest.mark.loop
def test_timeline_splits_a_real_get(tmp_path, require_fuse, require_loop):
    """The get figure's phases come from a real ``vmafs get``'s own events: every
    phase found, in order, adding up to the command's wall time."""
    from bench import timeline
    from guesttree import copy_archive

    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    archive = str(copy_archive("pve-gpt.vma.zst", tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["get", "--engine", "kernel", archive, "scsi0/p1:/", str(out)]
    wall, phases = timeline.timed_get(argv, archive, str(tmp_path / "timeline.tsv"))
    assert os.listdir(out)  # the copy happened
    assert len(phases) == len(timeline.GET_PHASES) and all(p > 0 for p in phases)
    assert sum(phases) == pytest.approx(wall)
    with pytest.raises(RuntimeError, match="lacks"):
        events = [ln.split("\t") for ln in (tmp_path / "timeline.tsv").read_text().splitlines()]
        timeline.get_phases([e for e in events if e[3] != "os.fork"], archive, 0.0, wall)
