"""vmafs: Proxmox VMA backups as a read-only filesystem, and a VMA writer for QEMU backups."""

__version__ = "0.1.0"


def _find_writer_in_checkout() -> None:
    """Make ``vmafs.writer`` resolve to the checkout's top-level ``writer/`` folder.

    The writer's sources live in ``writer/`` beside ``vmafs/`` (the design
    fixes that folder), and an installed wheel has them at ``vmafs/writer/``
    (``package_dir`` in setup.py).  Running from a checkout - a worktree with
    ``python -m vmafs`` or pytest, which put the checkout first on sys.path,
    or an editable install - there is no ``vmafs/writer/``: this finder,
    first on ``sys.meta_path``, maps ``vmafs.writer`` to the ``writer/`` next
    to *this* ``vmafs/``.  Resolving from this file, not from an editable
    install's recorded path, means a second checkout using the same venv runs
    its own writer, not the one the venv was installed from.  Nothing is
    added to sys.path, so no top-level ``writer`` becomes importable.
    """
    import os  # noqa: PLC0415 - here, so nothing stays in the vmafs namespace
    import sys  # noqa: PLC0415

    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(here)
    writer = os.path.join(checkout, "writer")
    if os.path.isdir(os.path.join(here, "writer")):
        return  # installed from a wheel: vmafs/writer/ is a plain subpackage
    if not (
        os.path.isfile(os.path.join(checkout, "pyproject.toml"))
        and os.path.isfile(os.path.join(writer, "__init__.py"))
    ):
        return  # not a checkout: leave the import system alone
    # Only a checkout pays for these (an installed vmafs starts without them).
    import importlib.abc  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    class _CheckoutWriter(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != f"{__name__}.writer":
                return None  # its submodules are found through its __path__ = [writer]
            return importlib.util.spec_from_file_location(
                fullname,
                os.path.join(writer, "__init__.py"),
                submodule_search_locations=[writer],
            )

    sys.meta_path.insert(0, _CheckoutWriter())


_find_writer_in_checkout()
del _find_writer_in_checkout
