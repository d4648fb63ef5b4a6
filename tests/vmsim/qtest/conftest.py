"""Fixtures for tests against QEMU under qtest (no guest boots: each QEMU starts in ~0.1 s).

``qtest_qemu`` is the QEMU to use: ``$BALLOON_HINT_QTEST_QEMU`` (a path to any
qemu-system-x86_64 >= 8) or the lab's QEMU 11.1 (``scripts/test`` sets the lab up, so in CI
these tests run). When it cannot be a qtest peer the tests skip with ``QtestUnavailable``'s
message, which names the missing piece (no lab, no qtest accelerator, no virtio-balloon-pci
free-page-hint, QEMU too old).
"""
from __future__ import annotations

import os

import pytest

from vmsim.qtest.qemu import QemuBinary, QtestUnavailable, find_qemu

QEMU_ENV = "BALLOON_HINT_QTEST_QEMU"


@pytest.fixture(scope="session")
def qtest_qemu() -> QemuBinary:
    try:
        return find_qemu(os.environ.get(QEMU_ENV) or None)
    except QtestUnavailable as e:
        pytest.skip(f"no QEMU usable under qtest: {e}")
