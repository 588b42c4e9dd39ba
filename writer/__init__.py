"""The write path: VMA archives from QEMU push-mode backup jobs.

Meets the read path (``vmafs``) only in the shared format module
(``vmafs.format``) and the error family (``vmafs.errors``).
"""
