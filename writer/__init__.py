"""The write path (installed as ``vmafs.writer``): VMA archives from QEMU backup jobs.

Imports of the read path's package are limited to the shared layers
(``vmafs.format``, ``vmafs.errors``, ``vmafs.names``, ``vmafs.common``);
tests/test_layering.py enforces it.  The sources stay in the top-level
``writer/`` folder; setup.py and ``vmafs/__init__.py`` map them to
``vmafs.writer``.  The logger names (``writer.nbd``, ``writer.packer``, ...)
are message labels and kept as they were.
"""
