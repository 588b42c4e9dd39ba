"""``python scripts/bench [--quick] [--out FILE] [--workdir DIR] [--only F,...] [--keep]``.

Builds the data sets (cached in the work directory with ``--keep``), runs
each figure against its baseline, prints the markdown table and writes it,
with the machine described and the tuning measurements, to ``--out``
(default docs/benchmarks.md for a full run, none for ``--quick``/``--only``).
A hand-written analysis block between ``<!-- BEGIN ANALYSIS -->`` and
``<!-- END ANALYSIS -->`` in an existing output file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

from . import datasets as ds
from .ctx import Ctx, Row
from .figures import FIGURES
from .report import machine, row_notes, table
from .tuning import TUNING
from .util import use_this_checkout

ALL = [*FIGURES, *TUNING]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench", description=__doc__.split("\n")[2])
    p.add_argument("--quick", action="store_true", help="small data sets (~3 minutes)")
    p.add_argument(
        "--out",
        help="markdown file to write ('-': none; default: docs/benchmarks.md for a full run "
        "of every figure, none for --quick or --only, so a partial run never replaces "
        "the recorded one)",
    )
    p.add_argument("--workdir", default="/var/tmp/vmafs-bench", help="where data sets are built")
    p.add_argument("--only", default="", help="comma-separated figures: " + ",".join(ALL))
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the data sets")
    p.add_argument(
        "--guest-data",
        type=float,
        metavar="GB",
        help="GB of guest files on the ext4 disk (default 1.5, --quick 0.15; the disk grows "
        "to hold them): the restore and get figures on a larger archive, e.g. 5.5 for "
        "issue 18's >= 5 GB restore target; its data sets are kept apart (work dir "
        "full-5.5gb)",
    )
    return p.parse_args(argv)


def _row_for_failure(name: str, e: BaseException) -> Row:
    from .util import Skip

    why = str(e) if isinstance(e, Skip) else f"failed: {type(e).__name__}: {e}"
    return Row(name, "-", "-", f"not measured: {why}", "-", "-", None)


def _keep_analysis(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    a, b = text.find("<!-- BEGIN ANALYSIS -->"), text.find("<!-- END ANALYSIS -->")
    if a < 0 or b < a:
        return ""
    return text[a : b + len("<!-- END ANALYSIS -->")]


def render(rows: list[Row], ctx: Ctx, mach: dict, args, elapsed: float, analysis: str = "") -> str:
    mode = "--quick" if args.quick else "full"
    out = [
        "# Benchmarks",
        "",
        "Written by `python scripts/bench` (issues 5 and 18); regenerate with "
        "`sudo .venv/bin/python scripts/bench --keep` (root: loop devices, "
        "drop_caches, mount). Every number below was measured in one run "
        f"({mode}, {elapsed / 60:.1f} min including building the data); nothing is "
        "copied from elsewhere. A figure that could not run says why.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in mach.items()),
        "",
        "## Data sets",
        "",
        f"- ext4 disk: {ctx.sizes.disk >> 30} GiB raw holding ~{ctx.sizes.files / 1e9:.2f} GB of "
        "files (half random, half shuffled-line text), built with `mkfs.ext4 -d`, archived by "
        "`vmafs create bench.vma drive-scsi0=disk.img:raw` (through qemu-storage-daemon, out "
        "of order); compressed copies: `zstd --threads=1` (one frame, as vzdump) and "
        "`vmafs recompress` (seekable).",
        f"- index scale: a {ctx.sizes.sparse_disk >> 30} GiB sparse disk with "
        f"{ctx.sizes.sparse_data >> 20} MiB of data at random clusters, every cluster once, "
        "in live-backup order (1 MiB runs shuffled in windows of 64, 0.5% early) and, for the "
        "worst case, fully shuffled (58 slots per extent), written directly with numpy.",
        f"- writer: {ctx.sizes.writer_disk >> 20} MiB raw disk of random data; write latency: "
        f"{ctx.sizes.latency_disk >> 20} MiB.",
        *(
            f"- {os.path.basename(k)}: `vmafs create` failed ({v}); made with `vmafs backup` "
            "from a bench-owned qemu-storage-daemon instead (same writer path)."
            for k, v in ds.FALLBACKS.items()
        ),
        "- build times (s, 0 = reused from the cache): "
        + ", ".join(f"{k} {v}" for k, v in ctx.facts.get("build_s", {}).items()),
        "",
        "## Results",
        "",
        table(rows),
        "",
        "Notes per row:",
        "",
        row_notes(rows),
        "",
    ]
    if ctx.notes:
        out += ["## Tuning measurements (this run)", ""]
        for section, lines in ctx.notes.items():
            out += [f"### {section}", "", *lines, ""]
    if analysis:
        out += [analysis, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    use_this_checkout()
    mach = machine()  # load average before we add any
    t_start = time.perf_counter()
    sizes = ds.QUICK if args.quick else ds.FULL
    if args.guest_data:
        sizes = ds.with_guest_data(sizes, int(args.guest_data * 1e9))
    only = [x for x in args.only.split(",") if x] or ALL
    if args.out is None:
        args.out = "-" if args.quick or args.only else "docs/benchmarks.md"
    unknown = set(only) - set(ALL)
    if unknown:
        print(f"unknown figure(s): {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
        return 2
    if os.geteuid() != 0:
        print(
            "note: not root: loop devices, drop_caches and mount will be skipped", file=sys.stderr
        )
    os.makedirs(args.workdir, exist_ok=True)
    label = ds.work_name(sizes)
    if args.keep:
        work = os.path.join(args.workdir, label)
        os.makedirs(work, exist_ok=True)
    else:
        work = tempfile.mkdtemp(prefix=f"{label}-", dir=args.workdir)
    ctx = Ctx(os.path.abspath(work), sizes)
    rows: list[Row] = []
    timings = {}
    try:
        for name in only:
            fn = FIGURES.get(name) or TUNING[name]
            t0 = time.perf_counter()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                rows += fn(ctx)
            except Exception as e:  # noqa: BLE001 - reported in the table, run goes on
                traceback.print_exc()
                rows.append(_row_for_failure(name, e))
            timings[name] = round(time.perf_counter() - t0, 1)
            print(f"   {name}: {timings[name]} s", file=sys.stderr, flush=True)
    finally:
        ctx.facts["figure_s"] = timings
        try:
            with open(os.path.join(args.workdir, f"facts-{label}.json"), "w") as f:
                json.dump(ctx.facts, f, indent=1, default=str)
        except OSError:
            pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    print(table(rows))
    if args.out != "-":
        text = render(rows, ctx, mach, args, elapsed, _keep_analysis(args.out))
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)
        print(f"wrote {args.out} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
