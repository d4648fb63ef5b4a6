"""The lab on a host that has Debian's own QEMU installed (a likely set-up for hypervisor people).

The set-up installs Debian's ``qemu-system-x86`` with apt-get when it is absent (root only);
the lab must neither use it nor break because of it. A host QEMU puts its modules in
``/usr/lib/x86_64-linux-gnu/qemu``, QEMU's built-in module folder: the lab's QEMU must load its
modules from its own tree only (checked with the dynamic loader's ``LD_DEBUG=files`` log), both
with the tree's ``qemu-bundle`` (what setup makes) and, for a tree made before it, through the
private mount namespace."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from vmsim import qemu_lab
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu

PACKAGE = "qemu-system-x86"
HOST_QEMU = "/usr/bin/qemu-system-x86_64"


def installed() -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True,
                         text=True)
    return out.returncode == 0 and "install ok installed" in out.stdout


@pytest.fixture(scope="module")
def host_qemu() -> str:
    """Debian's QEMU on the host (installed here if absent); returns its version line."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian host (no dpkg-query)")
    if not installed():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"Debian's {PACKAGE} is absent and installing it needs root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=1200).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=600, check=True)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, r.stderr[-2000:]
    assert installed() and os.access(HOST_QEMU, os.X_OK)
    assert qemu_lab.HOST_QEMU_MODDIR.is_dir(), "the host QEMU has no module folder"
    return subprocess.run([HOST_QEMU, "-version"], capture_output=True, text=True,
                          timeout=60).stdout.splitlines()[0]


def loaded_modules(lab: QemuLab) -> list[str]:
    """The QEMU modules (``.so`` files in a ``qemu`` folder) the lab's QEMU loads to list its
    devices, from the dynamic loader's log."""
    r = lab.run(["-device", "help"], env={"LD_DEBUG": "files"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"vfio-user-pci"' in r.stdout
    return sorted(set(re.findall(r"file=(\S+/qemu/[^/\s]+\.so)", r.stderr)))


def assert_only_tree_modules(lab: QemuLab) -> None:
    mods = loaded_modules(lab)
    tree = str(lab.root / qemu_lab.TREE_MODDIR)
    assert mods, "no module loaded at all: the check would prove nothing"
    foreign = [m for m in mods if not os.path.realpath(m).startswith(os.path.realpath(tree))]
    assert foreign == []


def test_lab_qemu_ignores_the_host_qemu(lab: QemuLab, host_qemu: str):
    """the tree's QEMU answers (its version, not the host's), lists vfio-user-pci, and loads
    modules from the tree only"""
    assert qemu_lab.bundle_ok(lab.root), "setup makes qemu-bundle: run scripts/qemu-lab setup"
    assert lab.qemu_command(["-version"])[0] == str(qemu_lab.loader(lab.root))  # no namespace
    out = lab.run(["-version"]).stdout
    assert f"version {lab.qemu_version}" in out and out.splitlines()[0] != host_qemu
    assert_only_tree_modules(lab)


def test_guest_boots_beside_the_host_qemu(lab: QemuLab, host_qemu: str):
    with lab.boot(ram="512M", devices=["virtio-balloon-pci"]) as vm:
        assert vm.run("cat /sys/bus/virtio/devices/*/device").split() == ["0x0005"]
        maps = open(f"/proc/{vm.proc.pid}/maps").read()
        assert str(qemu_lab.HOST_QEMU_MODDIR) + "/" not in maps


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="the private mount namespace needs root and unshare(1)")
def test_tree_without_bundle_runs_in_a_private_namespace(lab: QemuLab, host_qemu: str,
                                                         tmp_path):
    """a tree set up before qemu-bundle existed: QEMU's executable is then a loader with no
    bundle beside it (a copy of the tree's, in a temporary folder), so QEMU would search the
    host's module folder; the namespace route keeps QEMU's argv whole (the old wrapper shifted
    the loader away) and every module it loads is the tree's"""
    fake = tmp_path / "usr/lib/x86_64-linux-gnu"
    fake.mkdir(parents=True)
    shutil.copy2(os.path.realpath(qemu_lab.loader(lab.root)), fake / "ld-linux-x86-64.so.2")
    base = qemu_lab.qemu_argv(lab.root)
    assert base[0] == str(qemu_lab.loader(lab.root))
    base[0] = str(fake / "ld-linux-x86-64.so.2")
    # Control: without the namespace this QEMU reaches for the host's modules (Debian 12's
    # qemu-system-x86 has ui-opengl, which the tree lacks) and aborts.
    bare = subprocess.run([*base, "-device", "help"], env={**lab.env(), "LD_DEBUG": "files"},
                          capture_output=True, text=True, timeout=120)
    assert f"file={qemu_lab.HOST_QEMU_MODDIR}/" in bare.stderr, bare.stderr[-1000:]
    assert bare.returncode != 0
    argv = qemu_lab.private_moddir(lab.root / qemu_lab.TREE_MODDIR, qemu_lab.HOST_QEMU_MODDIR,
                                   base)
    r = subprocess.run([*argv, "-device", "help"], env={**lab.env(), "LD_DEBUG": "files"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"vfio-user-pci"' in r.stdout
    mods = set(re.findall(r"file=(\S+/qemu/[^/\s]+\.so)", r.stderr))
    assert mods
    # Inside the namespace the host's folder shows the tree's files: whatever was loaded from
    # either path is a module of the tree.
    tree = {p.name for p in (lab.root / qemu_lab.TREE_MODDIR).glob("*.so")}
    assert {os.path.basename(m) for m in mods} <= tree
