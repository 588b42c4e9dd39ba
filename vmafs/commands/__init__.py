"""Reader subcommands of the ``vmafs`` CLI (list, config, verify, extract).

Each module has ``register(subparsers)`` and ``run(args) -> int``; see
:mod:`vmafs.cli` for the error contract and docs/cli.md for the reference.
"""
