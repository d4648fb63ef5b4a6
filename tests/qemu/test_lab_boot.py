"""The QEMU lab itself: finding the cache, booting a guest, the serial command protocol, QMP."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vmsim import qemu_lab
from vmsim.qemu_lab import GuestCommandError, LabMissing, QemuLab, QmpError

pytestmark = pytest.mark.qemu


# -- no guest needed ------------------------------------------------------------------------------


def test_find_names_the_fix_when_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("BALLOON_HINT_CACHE", str(tmp_path))
    with pytest.raises(LabMissing, match=r"lab\.json missing.*scripts/qemu-lab setup"):
        QemuLab.find()


def test_find_names_the_missing_piece(tmp_path, monkeypatch):
    monkeypatch.setenv("BALLOON_HINT_CACHE", str(tmp_path))
    (tmp_path / "lab.json").write_text(json.dumps({
        "qemu_root": "trixie", "qemu_version": "11.1.3", "kernel": "k/vmlinuz",
        "kernel_release": "6.1.0", "initrd": "initramfs.cpio.gz"}))
    with pytest.raises(LabMissing, match=r"QEMU tree stamp .*missing: run scripts/qemu-lab"):
        QemuLab.find()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BALLOON_HINT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert qemu_lab.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BALLOON_HINT_CACHE")
    assert qemu_lab.cache_dir() == tmp_path / "x" / "balloon-hint"


def test_command_line_shape(lab):
    cmd = lab.command_line(ram="512M", devices=["virtio-balloon-pci"], append="quiet",
                           qmp_path="/tmp/q.sock")
    joined = " ".join(cmd)
    assert "-accel tcg" in joined and "-nodefaults" in joined
    assert "memory-backend-memfd,id=mem,size=536870912,share=on" in joined
    assert "q35,memory-backend=mem" in joined
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 panic=-1 quiet"
    assert cmd[cmd.index("-device") + 1] == "virtio-balloon-pci"
    with pytest.raises(ValueError, match="ram="):
        lab.command_line(ram="lots")


def test_lab_qemu_is_new_enough(lab):
    major, minor = (int(x) for x in lab.qemu_version.split(".")[:2])
    assert (major, minor) >= (10, 1)  # vfio-user-pci first shipped in 10.1 (protocol.md 7.7)


def test_guest_modules_resolve_in_kernel_tree(lab):
    moddir = lab.cache / "kernel/lib/modules" / lab.kernel_release
    paths = qemu_lab.module_paths(moddir, qemu_lab.GUEST_MODULES)
    assert [p.name for p in paths] == [m + ".ko" for m in qemu_lab.GUEST_MODULES]
    # The load order must respect modules.dep: every dependency comes earlier.
    deps = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[Path(mod).name] = [Path(d).name for d in rest.split()]
    seen: set[str] = set()
    for p in paths:
        assert set(deps[p.name]) <= seen, f"{p.name} needs {deps[p.name]} before it"
        seen.add(p.name)


def read_newc(data: bytes) -> dict[str, bytes]:
    """Entries of a cpio "newc" archive (the initramfs format), parsed independently of the
    writer in scripts/qemu-lab."""
    out: dict[str, bytes] = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad cpio magic at {off}"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off: off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = body


def test_initramfs_holds_busybox_modules_and_init(lab):
    import gzip

    files = read_newc(gzip.decompress(lab.initrd.read_bytes()))
    assert files["bin/busybox"][:4] == b"\x7fELF"
    for m in qemu_lab.GUEST_MODULES:
        assert files[f"lib/modules/{m}.ko"][:4] == b"\x7fELF", m
    init = files["init"].decode()
    assert init.startswith("#!/bin/busybox sh")
    assert " ".join(qemu_lab.GUEST_MODULES) in init  # loaded in dependency order
    assert "echo BH_LAB_READY" in init and "mount -t devtmpfs" in init


# -- one booted guest shared by the tests below ---------------------------------------------------


@pytest.fixture(scope="module")
def guest(lab):
    with lab.boot(ram="512M", timeout=180) as vm:
        yield vm


def test_guest_runs_the_lab_kernel(guest, lab):
    assert guest.run("uname -r").strip() == lab.kernel_release
    assert "BH_LAB_READY" in guest.console_log


def test_virtio_modules_loaded(guest):
    loaded = {line.split()[0] for line in guest.run("cat /proc/modules").splitlines()}
    assert set(qemu_lab.GUEST_MODULES) <= loaded


def test_run_keeps_output_and_status(guest):
    assert guest.run("echo one; echo two >&2") == "one\ntwo\n"
    assert guest.run("printf abc") == "abc"
    assert guest.run("exit 3", check=False) == ""
    assert guest.last_status == 3
    with pytest.raises(GuestCommandError) as ei:
        guest.run("echo bad; exit 7")
    assert ei.value.status == 7 and ei.value.output == "bad\n"


def test_run_survives_quoting_syntax_errors_and_long_commands(guest):
    # Quotes, markers and a broken command must not desynchronise the console protocol.
    assert guest.run("""echo "it's" 'BH_END_1 0' \\$x""") == "it's BH_END_1 0 $x\n"
    out = guest.run("if then fi", check=False)
    assert guest.last_status != 0 and "syntax" in out
    long_cmd = "; ".join(f"echo {i}" for i in range(1500))  # > 4095 bytes: the tty line limit
    assert len(long_cmd) > 4096
    assert guest.run(long_cmd).split() == [str(i) for i in range(1500)]
    assert guest.run("echo still-in-sync") == "still-in-sync\n"


def test_run_timeout_names_the_wait(guest):
    with pytest.raises(qemu_lab.LabVMError, match="timed out"):
        guest.run("sleep 3", timeout=0.5)
    # The late output of the timed-out command is not taken for the next command's.
    assert guest.run("sleep 3; echo after") == "after\n"


def test_orphaned_background_jobs_do_not_end_the_shell(guest):
    # A background job outlives the sh that started it and is re-parented to PID 1; killing it
    # used to end the console shell (then PID 1) when that shell was PID 1 itself.
    for _ in range(3):
        pid = guest.run("(while :; do usleep 20000; done) >/dev/null 2>&1 & echo $!").strip()
        assert guest.run("cat /proc/1/cmdline | tr '\\0' ' '").startswith("/bin/busybox sh")
        guest.run(f"kill {pid}")
        assert guest.run("echo alive") == "alive\n"
    assert "BH_SHELL_EXITED" not in guest.console_log


def test_qmp_commands_and_errors(guest):
    assert guest.qmp("query-status")["status"] == "running"
    ver = guest.qmp("query-version")["qemu"]
    assert (ver["major"], ver["minor"]) >= (10, 1)
    with pytest.raises(QmpError, match="CommandNotFound"):
        guest.qmp("no-such-command")


def test_dmesg_has_the_boot_log(guest):
    text = guest.dmesg()
    assert re.search(r"Linux version 6\.1\.", text)
    assert "Run /init as init process" in text
