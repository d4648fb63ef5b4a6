"""The vfio-user balloon with a guest that cannot use MSI-X (``pci=nomsi``): the INTx fallback.

Virtio-pci then raises INTx with ISR bits; over vfio-user INTx is an automasked eventfd that
QEMU unmasks after the guest's EOI (protocol.md 7.4, 7.6). A separate module (and guest) from
test_vfio_user_guest.py so only one guest runs at a time.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.qemu.served import (
    Served,
    bound_balloon_features,
    run_round,
    start_served,
)
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def served_intx(lab: QemuLab) -> Iterator[Served]:
    yield from start_served(lab, append="pci=nomsi")


def test_intx_guest_binds_hints_and_inflates(served_intx: Served) -> None:
    s = served_intx
    bound_balloon_features(s.vm)
    irqs = s.vm.run("cat /proc/interrupts")
    assert not re.search(r"PCI-MSI.*virtio", irqs), irqs  # no MSI-X vectors: INTx
    r = run_round(s)
    assert r["hints"] > 0 and r["outside_ram"] == 0 and r["not_block_aligned"] == 0
    s.ctl_call("hint-done")
    s.ctl_call("set-target", pages=4096)
    s.wait_stats(lambda st: st["actual"] == 4096, "actual to reach 4096 over INTx")
    s.ctl_call("set-target", pages=0)
    st = s.wait_stats(lambda st: st["actual"] == 0, "actual back to 0 over INTx")
    assert st["dr_violations"] == {}
    assert st["session_counters"].get("irq_signalled_0", 0) > 0  # INTx eventfd used
    assert st["session_counters"].get("irq_signalled_2", 0) == 0  # no MSI-X
