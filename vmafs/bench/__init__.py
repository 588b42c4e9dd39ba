"""The benchmark suite (issue 5): ``python -m vmafs.bench``.

Makes its own data (:mod:`.datasets`), measures vmafs side by side with a
named baseline for each figure (:mod:`.figures`), and prints/writes a
markdown table with the machine described (:mod:`.report`).  Needs root
(loop devices, ``drop_caches``, mount(8)), FUSE and the QEMU tools; a figure
whose tool is missing says so in its row instead of a number.
"""
