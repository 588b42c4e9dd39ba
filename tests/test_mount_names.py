"""vmafs.names: which file names a mount shows and extract writes (pure, no FUSE)."""

from __future__ import annotations

import pytest
from vmafactory import HOSTILE_CONFIG_NAMES

from vmafs.format import Config, Device, Header
from vmafs.names import VMSTATE_FILE, safe_entry_names, unsafe_reason

UUID = bytes(range(16))


def header(devices=(), configs=()) -> Header:
    devs = {i: Device(i, name, size) for i, (name, size) in enumerate(devices, start=1)}
    return Header(UUID, 0, [Config(n, d) for n, d in configs], devs)


def test_proxmox_names():
    h = header(
        [("drive-scsi0", 5 << 20), ("drive-efidisk0", 528 << 10), ("vmstate", 123456)],
        [("qemu-server.conf", b"a"), ("qemu-server.fw", b"bb")],
    )
    entries = safe_entry_names(h)
    assert list(entries) == [
        "disk-drive-scsi0.raw",
        "disk-drive-efidisk0.raw",
        VMSTATE_FILE,
        "qemu-server.conf",
        "qemu-server.fw",
    ]
    e = entries["disk-drive-efidisk0.raw"]
    assert (e.kind, e.dev_id, e.size, e.original, e.renamed) == (
        "disk",
        2,
        528 << 10,
        "drive-efidisk0",
        False,
    )
    v = entries[VMSTATE_FILE]
    assert (v.kind, v.dev_id, v.size) == ("vmstate", 3, 123456)
    fw = entries["qemu-server.fw"]
    assert (fw.kind, fw.config_index, fw.data, fw.size) == ("config", 1, b"bb", 2)


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        (".", "directory"),
        ("..", "directory"),
        ("../../x", "'/'"),
        ("a/b", "'/'"),
        ("/etc/passwd", "'/'"),
        ("a\0b", "NUL"),
        ("evil\nname", "U+000A"),
        ("\x1b[31mred", "U+001B"),
        ("tab\there", "U+0009"),
        ("del\x7f", "U+007F"),
        ("c1\x85", "U+0085"),
        ("rtl\u202egnp.exe", "U+202E"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),  # 256 bytes in UTF-8
    ],
)
def test_unsafe_names(name, why):
    reason = unsafe_reason(name)
    assert reason is not None and why in reason


@pytest.mark.parametrize("name", ["qemu-server.conf", ".hidden", "x" * 255, "é" * 127, "a b", "…"])
def test_safe_names(name):
    assert unsafe_reason(name) is None


def test_hostile_configs_renamed_deterministically():
    configs = [(n, f"config {i}\n".encode()) for i, n in enumerate(HOSTILE_CONFIG_NAMES)]
    h = header([("drive-scsi0", 1 << 16)], configs)
    entries = safe_entry_names(h)
    assert safe_entry_names(h) == entries  # deterministic
    assert len(entries) == 1 + len(configs)  # nothing dropped
    for name, e in entries.items():
        assert unsafe_reason(name) is None and e.name == name
    by_index = {e.config_index: e for e in entries.values() if e.kind == "config"}
    assert by_index[0].name == "config-0.conf" and "'/'" in by_index[0].reason
    assert by_index[2].name == "config-2.conf" and by_index[2].original == ".."
    # Duplicates: the first keeps the name, the second is renamed.
    first, second = (i for i, n in enumerate(HOSTILE_CONFIG_NAMES) if n == "qemu-server.conf")
    assert by_index[first].name == "qemu-server.conf" and not by_index[first].renamed
    assert by_index[second].name == f"config-{second}.conf"
    assert "clashes" in by_index[second].reason


def test_clashes_between_kinds_and_with_fallbacks():
    h = header(
        [("drive-scsi0", 4096), ("a/b", 4096), ("vmstate", 4096)],
        [
            ("disk-drive-scsi0.raw", b"1"),  # poses as the disk
            ("vmstate.bin", b"2"),  # poses as the vmstate
            ("disk-dev2.raw", b"3"),  # the fallback name of disk "a/b": disks come first
            ("x.fw", b"4"),
            ("x.fw", b"5"),  # renamed, keeps its suffix
            ("config-4.fw", b"6"),  # its own name is the fallback given to the one before
        ],
    )
    entries = safe_entry_names(h)
    assert entries["disk-drive-scsi0.raw"].kind == "disk"
    assert entries["disk-dev2.raw"].kind == "disk" and entries["disk-dev2.raw"].original == "a/b"
    assert entries["vmstate.bin"].kind == "vmstate"
    data = {e.data: name for name, e in entries.items() if e.kind == "config"}
    assert data == {
        b"1": "config-0.conf",
        b"2": "config-1.conf",
        b"3": "config-2.conf",
        b"4": "x.fw",
        b"5": "config-4.fw",
        b"6": "config-5.fw",
    }


def test_fallback_of_fallback_gets_a_counter():
    h = header([], [("config-1.conf", b"1"), ("..", b"2")])
    entries = safe_entry_names(h)
    assert {e.data: n for n, e in entries.items()} == {
        b"1": "config-1.conf",
        b"2": "config-1~2.conf",
    }


def test_device_name_too_long_for_prefix():
    h = header([("d" * 250, 4096)])  # safe alone, but disk-<name>.raw is 259 bytes
    (entry,) = safe_entry_names(h).values()
    assert entry.name == "disk-dev1.raw" and "255" in entry.reason
