"""``QemuBinary.check`` names the missing piece when a QEMU cannot be a qtest peer (fake
binaries: shell scripts answering like QEMU would)."""
from __future__ import annotations

import os

import pytest

from vmsim.qtest.qemu import QemuBinary, QtestUnavailable


def fake_qemu(tmp_path, body: str) -> str:
    p = tmp_path / "qemu-system-x86_64"
    p.write_text("#!/bin/sh\n" + body)
    os.chmod(p, 0o755)
    return str(p)


VERSION = 'if [ "$1" = -version ]; then echo "QEMU emulator version {v}"; exit 0; fi\n'


def test_not_a_binary(tmp_path):
    with pytest.raises(QtestUnavailable, match="not an executable"):
        QemuBinary.at(str(tmp_path / "nope"))


def test_too_old(tmp_path):
    q = QemuBinary.at(fake_qemu(tmp_path, VERSION.format(v="7.2.0")))
    with pytest.raises(QtestUnavailable, match=r"QEMU 7\.2\.0.*needs >= 8\.0"):
        q.check()


def test_no_qtest_accelerator(tmp_path):
    body = VERSION.format(v="9.2.1") + (
        'if [ "$2" = help ]; then echo "Accelerators supported in QEMU binary:"; echo tcg; '
        'exit 0; fi\n'
        'echo "qemu-system-x86_64: -accel qtest: invalid accelerator qtest" >&2; exit 1\n')
    q = QemuBinary.at(fake_qemu(tmp_path, body))
    with pytest.raises(QtestUnavailable, match="qtest accelerator is not available"):
        q.check()


def test_no_free_page_hint(tmp_path):
    body = VERSION.format(v="9.2.1") + (
        'if [ "$2" = help ]; then echo qtest; exit 0; fi\n'
        'if [ "$1" = -device ]; then echo "virtio-balloon-pci options:"; '
        'echo "  deflate-on-oom=<bool>"; exit 0; fi\nexit 1\n')
    q = QemuBinary.at(fake_qemu(tmp_path, body))
    with pytest.raises(QtestUnavailable, match="no free-page-hint"):
        q.check()
