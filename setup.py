"""Package discovery for setuptools; everything else is in pyproject.toml.

The writer's sources stay in the top-level ``writer/`` folder but install as
``vmafs.writer`` (no top-level ``writer`` package in site-packages, where any
other project may use that name).  pyproject.toml's ``packages.find`` cannot
map a discovered folder under another package, hence this file: every package
under ``vmafs/``, plus ``writer/`` (and any subpackage it grows) as
``vmafs.writer``.  A checkout without installing maps the same name at import
time (``vmafs/__init__.py``).
"""

from setuptools import find_packages, setup

writer = ["vmafs.writer"] + [f"vmafs.writer.{p}" for p in find_packages("writer")]
setup(
    packages=find_packages(include=["vmafs", "vmafs.*"]) + writer,
    package_dir={"vmafs.writer": "writer"},
)
