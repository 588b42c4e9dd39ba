"""The benchmark suite (issues 5 and 18): ``python scripts/bench`` from a checkout.

Not part of the installed package.  Makes its own data (:mod:`.datasets`),
measures vmafs side by side with a named baseline for each figure
(:mod:`.figures` lists them; :mod:`.read_figures`, :mod:`.write_figures`,
:mod:`.zstd_figures`), and prints/writes a markdown table with the machine
described (:mod:`.report`).  Processes it drives: :mod:`.util` (commands,
mounts, timing), :mod:`.qemu` (qemu-storage-daemon, QEMU, nbdkit, QMP
through the writer's client).  Needs root (loop devices, ``drop_caches``,
mount(8)), FUSE and the QEMU tools; a figure whose tool is missing says so
in its row instead of a number.
"""
