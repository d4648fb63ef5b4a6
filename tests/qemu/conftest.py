"""Fixtures for tests that boot real guests under QEMU (the lab of ``scripts/qemu-lab``).

``lab`` is the cached lab; when it is not set up the test is skipped with the LabMissing
message, which names the missing piece and the command that builds it. ``scripts/test`` always
runs ``scripts/qemu-lab setup`` first, so in CI nothing here is skipped.

Guests are slow under TCG and the machine's cores are shared: tests boot one guest at a time and
share a booted guest between tests where they can (module-scoped fixtures in the test files).
"""
from __future__ import annotations

import pytest

from vmsim.qemu_lab import LabMissing, QemuLab


@pytest.fixture(scope="session")
def lab() -> QemuLab:
    try:
        return QemuLab.find()
    except LabMissing as e:
        pytest.skip(f"QEMU lab missing: {e}")
