"""The vmafs command line as a whole: help, version, usage errors, error contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, vmafs_cmd
from test_cli_support import assert_one_line_error, run_cli

import vmafs

READER_COMMANDS = ["list", "config", "verify", "extract"]


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"vmafs {vmafs.__version__}"


def test_version_imports_no_command():
    code = (
        "import sys; from vmafs.cli import main; main(['--version']); "
        "print(sorted(m for m in sys.modules if m.startswith(('vmafs.', 'writer', 'numpy'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-1] == (
        "['vmafs.cli', 'vmafs.common', 'vmafs.common.console', 'vmafs.errors']"
    )


def test_top_level_help_lists_commands():
    proc = run_cli("-h")
    assert proc.returncode == 0
    for cmd in READER_COMMANDS:
        assert f"\n    {cmd} " in proc.stdout or f"\n    {cmd}\n" in proc.stdout, cmd
    assert "examples:" in proc.stdout


@pytest.mark.parametrize("cmd", READER_COMMANDS)
def test_command_help_has_examples(cmd):
    proc = run_cli(cmd, "-h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: vmafs {cmd} ")
    assert "examples:" in proc.stdout
    assert f"vmafs {cmd} " in proc.stdout.split("examples:")[1]


def test_no_command_is_a_usage_error():
    line = assert_one_line_error(run_cli(), status=2)
    assert "no command" in line


def test_unknown_command_is_a_usage_error():
    line = assert_one_line_error(run_cli("frobnicate"), status=2)
    assert "frobnicate" in line


@pytest.mark.parametrize("cmd", READER_COMMANDS)
def test_missing_arguments_are_one_line_usage_errors(cmd):
    line = assert_one_line_error(run_cli(cmd), status=2)
    assert line.startswith(f"vmafs: error: {cmd}: ")
    assert f"'vmafs {cmd} --help'" in line


def test_unknown_option_is_a_usage_error():
    assert_one_line_error(run_cli("list", "--bogus", FIXTURES_DIR / "two-disks.vma"), status=2)


@pytest.mark.parametrize("cmd", ["list", "config", "verify"])
def test_missing_archive(cmd, tmp_path):
    missing = tmp_path / "nope.vma"
    line = assert_one_line_error(run_cli(cmd, missing))
    assert str(missing) in line
    assert "No such file or directory" in line


@pytest.mark.parametrize("cmd", ["list", "config", "verify"])
def test_not_an_archive(cmd, tmp_path):
    junk = tmp_path / "junk.vma"
    junk.write_bytes(b"this is not a VMA archive at all\n" * 100)
    line = assert_one_line_error(run_cli(cmd, junk))
    assert "not a VMA archive" in line


def test_directory_as_archive(tmp_path):
    assert_one_line_error(run_cli("list", tmp_path))


def test_debug_shows_traceback(tmp_path):
    junk = tmp_path / "junk.vma"
    junk.write_bytes(b"x" * 100)
    for proc in (
        run_cli("--debug", "list", junk),
        run_cli("list", "--debug", junk),
        run_cli("list", junk, env={"VMAFS_DEBUG": "1"}),
    ):
        assert proc.returncode == 1
        assert "Traceback" in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("vmafs: error: ")


@pytest.mark.parametrize("cmd", ["list", "config"])
def test_closed_stdout_pipe_is_quiet(cmd):
    # `vmafs list X | head -0`: exit 141 like a C tool killed by SIGPIPE, nothing on stderr.
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            vmafs_cmd(cmd, FIXTURES_DIR / "two-disks.vma"),
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_main_returns_status_in_process(capsys):
    from vmafs.cli import main

    assert main(["list", str(FIXTURES_DIR / "no-disks.vma")]) == 0
    assert "CFG: size: 226 name: qemu-server.conf" in capsys.readouterr().out
    assert main(["config", str(FIXTURES_DIR / "no-disks.vma"), "-c", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmafs: error: ") and err.count("\n") == 1


def test_reader_commands_do_not_import_fuse_or_qemu_stacks():
    # Start-up time: `vmafs list` imports only the list command's module.
    code = (
        "import sys; from vmafs.cli import main; "
        f"rc = main(['list', {str(FIXTURES_DIR / 'no-disks.vma')!r}]); "
        "heavy = [m for m in ('trio', 'pyfuse3', 'qemu', 'vmafs.writer', 'vmafs.mount') "
        "if m in sys.modules]; "
        "print('HEAVY', heavy, rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines()[-1] == "HEAVY [] 0", proc.stdout + proc.stderr


def test_unknown_command_lists_every_command():
    line = assert_one_line_error(run_cli("frobnicate"), status=2)
    for cmd in READER_COMMANDS:
        assert f"'{cmd}'" in line


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_cli_reference_covers_every_command_and_option():
    # docs/cli.md must not drift from the parser: every command and option is in it.
    from vmafs.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert f"vmafs {name}" in text, name
        for action in p._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help") or action.help == "==SUPPRESS==":
                    continue
                assert opt in text, f"{name} {opt}"


def test_man_page_renders_cleanly():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(DOCS / "vmafs.1")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    page = (DOCS / "vmafs.1").read_text()
    for cmd in READER_COMMANDS:
        assert f'.SS "{cmd} ' in page


def test_missing_command_module_is_one_line(capsys, monkeypatch):
    # A command whose module (or optional dependency) is not installed: asked
    # for by name it is a clear one-line error; otherwise it is just not listed.
    from vmafs.cli import main

    monkeypatch.setitem(sys.modules, "vmafs.mount", None)
    assert main(["mount", "a.vma", "/mnt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmafs: error: mount: not available here (") and err.count("\n") == 1
    assert main(["list", str(FIXTURES_DIR / "no-disks.vma")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["-h"])
    assert "\n    mount " not in capsys.readouterr().out
