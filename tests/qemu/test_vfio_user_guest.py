"""The balloon device served over vfio-user to a real QEMU (11.1) and a real Linux guest (6.1).

One guest is booted for the whole module (TCG guests are slow and the machine's cores are
shared): ``balloon-hint serve`` runs in a subprocess on a socket in a temp folder, QEMU connects
with ``vfio-user-pci``, and the tests drive the device through the control socket
(``balloon-hint ctl``'s ``call``), reading the guest with shell commands and its kernel log.

What is checked: the Linux driver binds and negotiates FREE_PAGE_HINT; several hint rounds run
to their STOP; an idle 1 GiB guest hints at least half its RAM in a round; every hinted range is
inside guest RAM and is a 4 MiB-aligned 4 MiB block; ``num_pages`` inflates the balloon,
``actual`` follows and deflating returns it; the kernel log shows no virtio/balloon error; the
device's driver checker saw no DR-n violation.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from protocol.balloon import VIRTIO_BALLOON_F_FREE_PAGE_HINT
from tests.qemu.served import (
    HINT_BLOCK,
    RAM_BYTES,
    Served,
    bound_balloon_features,
    mem_free,
    run_round,
    start_served,
    virtio_errors,
    wait_mem_free,
)
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def served(lab: QemuLab) -> Iterator[Served]:
    yield from start_served(lab, "vfio-user")


def test_driver_binds_and_negotiates_free_page_hint(served: Served) -> None:
    features = bound_balloon_features(served.vm)
    assert features[VIRTIO_BALLOON_F_FREE_PAGE_HINT] == "1", features
    st = served.stats()
    assert st["driver_features"] >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1
    assert st["status"] & 0x4, st  # DRIVER_OK
    # MSI-X is used: the guest shows our two vectors.
    irqs = served.vm.run("cat /proc/interrupts")
    assert re.search(r"virtio\d+-config", irqs), irqs


def test_hint_rounds_idle_guest_hints_half_its_ram(served: Served) -> None:
    first = run_round(served)
    # Idle 1 GiB guest: at least half of RAM comes back as hints in one round.
    assert first["hinted_bytes"] >= RAM_BYTES // 2, first
    assert first["hints"] * HINT_BLOCK == first["hinted_bytes"]
    held_free = mem_free(served)
    served.ctl_call("hint-done")
    # DONE: the driver gives every held block back. Wait for that before the next round, or the
    # next id may reach the driver's work item before it saw DONE (it reads only the latest id).
    wait_mem_free(served, held_free + first["hinted_bytes"] // 2)
    # More rounds: after DONE the guest frees its blocks, so the next round hints again; a round
    # started while the guest still holds its blocks finishes too (with little to hint).
    second = run_round(served)
    third = run_round(served)
    served.ctl_call("hint-done")
    assert second["hinted_bytes"] >= RAM_BYTES // 4, second
    rounds = served.stats()["rounds"]
    assert len(rounds) >= 3
    for r in rounds:
        assert r["outside_ram"] == 0, r
        assert r["not_block_aligned"] == 0, r
        assert r["stopped_after_s"] is not None, r
    assert third["cmd_id"] == second["cmd_id"] + 1 == first["cmd_id"] + 2


def test_inflate_then_deflate_follows_target(served: Served) -> None:
    target = 16384  # 64 MiB in 4 KiB pages
    served.ctl_call("set-target", pages=target)
    st = served.wait_stats(lambda s: s["actual"] == target, f"actual to reach {target}")
    assert st["num_pages"] == target
    assert st["totals"]["inflated_pages"] >= target
    served.ctl_call("set-target", pages=0)
    st = served.wait_stats(lambda s: s["actual"] == 0, "actual to return to 0")
    assert st["totals"]["deflated_pages"] >= target


def test_guest_kernel_log_has_no_virtio_error(served: Served) -> None:
    log = served.vm.dmesg()
    bad = virtio_errors(log)
    assert bad == [], "\n".join(bad)
    assert "Call Trace" not in log


@pytest.mark.spec("DR-9")
@pytest.mark.spec("DR-10")
@pytest.mark.spec("DR-12")
def test_driver_checker_reports_no_violation(served: Served) -> None:
    st = served.stats()
    assert st["dr_violations"] == {}, st["dr_violations"]
    assert st["totals"]["needs_reset"] == 0
    # The session served the real client without a single peer error.
    assert st["session_counters"].get("peer_errors", 0) == 0, st["session_counters"]
    assert st["server_counters"].get("framing_errors", 0) == 0
