"""The ``vmafs`` command line: one argparse parser, one subcommand per module.

Every command lives in its own module exposing::

    def register(subparsers) -> None   # adds its subparser and set_defaults(func=run)
    def run(args) -> int               # exit status

and is listed in :data:`COMMANDS` below.  Modules are imported lazily and a
module that is not there yet (or whose optional dependency is missing, e.g.
pyfuse3 for ``mount``) is left out, so ``vmafs list`` keeps working on a
machine without FUSE.

Error contract (docs/cli.md, "EXIT STATUS"): every failure is reported as one
line ``vmafs: error: <message>`` on stderr.  Exit status 1 for errors, 2 for
usage errors, 130 for Ctrl-C, 141 when stdout is a closed pipe.  Tracebacks
are shown only with ``--debug`` or ``VMAFS_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .common.console import (
    PROG,
    StdoutError,
    describe_oserror,
    discard_stdout,
    stderr_logging,
    writing_stdout,
)
from .errors import VmaError

#: (command names it registers, module, register function), in the order
#: ``vmafs -h`` shows them.  To add a command: append one line here.  The
#: names let ``vmafs list X`` import only the list module (not trio, pyfuse3,
#: qemu.qmp): start-up time matters for scripts calling vmafs in a loop.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("list",), "vmafs.commands.list", "register"),
    (("config",), "vmafs.commands.config", "register"),
    (("verify",), "vmafs.commands.verify", "register"),
    (("extract",), "vmafs.commands.extract", "register"),
    (("index",), "vmafs.commands.index", "register"),
    (("volumes",), "vmafs.commands.volumes", "register"),
    (("recompress",), "vmafs.writer.recompress", "register"),
    (("ls",), "vmafs.commands.ls", "register"),
    (("cat",), "vmafs.commands.cat", "register"),
    (("get",), "vmafs.commands.get", "register"),
    (("mount", "umount"), "vmafs.mount", "register"),
    (("serve",), "vmafs.commands.serve", "register"),
    (("backup",), "vmafs.writer.cli", "register_backup"),
    (("create",), "vmafs.writer.cli", "register_create"),
    (("restore",), "vmafs.writer.restore", "register"),
]

DESCRIPTION = """\
Read Proxmox VE VMA backups (vzdump-qemu-*.vma, .vma.zst, .vma.gz, .vma.lzo)
without restoring them: list, print configs, verify, extract, or mount them
as a read-only filesystem of raw disk images; and write VMA archives.  The
list/config/verify/extract commands behave like Proxmox's own `vma` tool."""

EPILOG = """\
examples:
  vmafs list vzdump-qemu-100-2024_01_01-00_00_00.vma.zst
  vmafs config backup.vma -c qemu-server.fw
  vmafs verify -v backup.vma
  vmafs extract backup.vma restore/ -d drive-scsi0
  vmafs mount backup.vma /mnt/backup

Run 'vmafs COMMAND -h' for the options of a command; docs/cli.md has the full
reference.  Set VMAFS_DEBUG=1 (or pass --debug) to get tracebacks."""


class CommandUnavailable(Exception):
    """The requested command's module or one of its dependencies is not installed."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, like every other error."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports an unknown option after the command at the top level
        # ("see 'vmafs --help'"); the command's own parser should say it.
        args = list(sys.argv[1:] if args is None else args)
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self._parser_of(namespace, args, extras[0]).error(
                "unrecognized arguments: " + " ".join(extras)
            )
        return namespace

    def _parser_of(
        self, namespace: argparse.Namespace, args: list[str], extra: str
    ) -> argparse.ArgumentParser:
        """The command's parser if *extra* came after the command word, else this one."""
        command = getattr(namespace, "command", None)
        action = self._subparsers and next(
            (a for a in self._subparsers._group_actions if a.choices), None
        )
        if not command or action is None or command not in action.choices:
            return self
        where = args.index(command) if command in args else len(args)
        if extra in args[:where]:
            return self
        return action.choices[command]

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog[len(PROG) :].strip() if self.prog.startswith(PROG) else self.prog
        hint = f"'{self.prog} --help'" if sub else f"'{PROG} --help'"
        where = f"{sub}: " if sub else ""
        sys.stderr.write(f"{PROG}: error: {where}{message} (see {hint})\n")
        sys.exit(2)


class _Formatter(argparse.HelpFormatter):
    """Re-wrap plain paragraphs to the terminal; keep indented blocks as written.

    Descriptions and epilogs are split at blank lines.  A paragraph with an
    indented line (examples, lists, sample output) is printed verbatim; any
    other paragraph is filled to the width, so one-line descriptions and
    hand-wrapped ones both come out right.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.strip("\n").split("\n\n"):
            lines = para.split("\n")
            if any(line[:1].isspace() for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def _requested_command(argv: Sequence[str]) -> str | None:
    """The command word of *argv* (first non-option), or None."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
        if arg in ("-h", "--help", "--version"):
            return None
    return None


def _load_commands(debug: bool, only: str | None = None) -> list:
    """Import the command modules, leaving out those that are not installed.

    With *only* (a command name from COMMANDS) just that command's module is
    imported; otherwise all of them (for ``-h`` and usage errors).
    """
    entries = [e for e in COMMANDS if only in e[0]] if only else []
    loaded = []
    for _names, modname, fname in entries or COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing.split(".")[0] == "vmafs" and not modname.startswith(missing):
                raise  # one of our modules imports something that is not there: a bug
            # The command module is not installed, or an optional dependency
            # (pyfuse3, qemu.qmp) is missing.
            if only:
                raise CommandUnavailable(f"{only}: not available here ({e})") from e
            if debug:
                sys.stderr.write(f"{PROG}: debug: command module {modname} left out: {e}\n")
            continue
        func = getattr(mod, fname, None)
        if func is None:
            if debug:
                sys.stderr.write(f"{PROG}: debug: {modname} has no {fname}()\n")
            continue
        loaded.append(func)
    return loaded


def build_parser(debug: bool = False, only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="show a traceback on errors (same as VMAFS_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=_Parser
    )
    for register in _load_commands(debug, only):
        register(subparsers)
    # --debug is also accepted after the command name ("vmafs list --debug X").
    for sub in subparsers.choices.values():
        if sub.formatter_class is argparse.HelpFormatter:  # not chosen by the command
            sub.formatter_class = _Formatter
        try:
            sub.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        except argparse.ArgumentError:
            pass  # the command defines its own --debug
    return parser


def _env_debug() -> bool:
    return os.environ.get("VMAFS_DEBUG", "") not in ("", "0", "no", "false")


def _fail(message: str, debug: bool, status: int = 1) -> int:
    if debug:
        traceback.print_exc()
    # One line, whatever the message holds (names in archives are untrusted).
    line = " ".join(str(message).split("\n"))
    sys.stderr.write(f"{PROG}: error: {line}\n")
    return status


#: Commands that leave nothing behind in this process when they return (no
#: threads still writing, no atexit work): :func:`entry` ends the process at
#: once for them instead of tearing the interpreter down.  Tearing down
#: numpy, trio and pyfuse3 module by module costs 0.1-0.7 s (more on a busy
#: machine) that a one-file restore would otherwise wait for (issue 13).
QUICK_EXIT = frozenset({"ls", "cat", "get", "volumes", "mount", "umount", "list", "config"})

#: Commands that configure logging themselves (``vmafs.writer.cli._setup_logging``
#: sets up the root logger only when it has no handler yet).
OWN_LOGGING = frozenset({"backup", "create", "restore"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (console script entry point)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _env_debug() or "--debug" in argv
    if [a for a in argv if a != "--debug"] == ["--version"]:
        # Answered without the command modules, whose imports (numpy, trio) take ~0.5 s.
        print(f"{PROG} {__version__}")
        return 0
    try:
        parser = build_parser(debug, _requested_command(argv))
        args = parser.parse_args(argv)
        debug = debug or bool(getattr(args, "debug", False))
        func = getattr(args, "func", None)
        if func is None:
            parser.error("no command given")
        own = getattr(args, "command", None) in OWN_LOGGING
        with contextlib.nullcontext() if own else stderr_logging(PROG, debug):
            status = func(args)
        with writing_stdout():
            sys.stdout.flush()
        return int(status or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # stdout went away (vmafs list X | head): quiet, like a C tool killed by SIGPIPE.
        discard_stdout()
        return 141
    except (VmaError, CommandUnavailable) as e:
        return _fail(str(e), debug)
    except OSError as e:
        if e.errno == errno.EPIPE:
            return 141
        if isinstance(e, StdoutError):
            discard_stdout()
        return _fail(describe_oserror(e), debug)
    except SystemExit:
        raise
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "vmafs":
            raise
        # A dependency imported lazily by a command (pyfuse3, zstandard, ...).
        return _fail(f"{e} (a dependency of this command is not installed)", debug)
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless debugging
        if debug:
            traceback.print_exc()
            return 1
        return _fail(
            f"internal error: {type(e).__name__}: {e} (run with --debug for a traceback)", False
        )


def entry() -> None:
    """The ``vmafs`` program (console script, ``python -m vmafs``): :func:`main`, then exit.

    For the commands in :data:`QUICK_EXIT` the process ends with
    ``os._exit`` once stdout and stderr are flushed and logging is shut
    down, skipping the interpreter's teardown; other commands exit normally.
    """
    argv = sys.argv[1:]
    status = main(argv)
    if _requested_command(argv) in QUICK_EXIT:
        quick_exit(status)
    sys.exit(status)


def quick_exit(status: int) -> None:
    """Flush what is buffered and end the process now, without interpreter teardown."""
    import logging  # noqa: PLC0415 - imported by then whenever it has handlers to flush

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: main() has reported it already
            status = status or 120  # what Python's own exit gives then
    os._exit(status)


if __name__ == "__main__":
    entry()
