"""Packed virtqueues with a real QEMU (11.1) and a real Linux guest (6.1), over vfio-user.

``balloon-hint serve --features ...,RING_PACKED`` offers RING_PACKED (off by default); Linux's
virtio_ring accepts it, so every balloon queue is packed: the device side is
balloon_dev/packed_virtqueue.py talking to Linux's virtio_ring_packed code. The guest must show
bit 34 in its sysfs ``features``, finish a hint round to its STOP with hints inside RAM, and
inflate / deflate to a target, with no virtio error in its kernel log and no guest fault
counted by the device.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocol.virtio import VIRTIO_F_RING_PACKED
from tests.qemu.served import (
    HINT_BLOCK,
    RAM_BYTES,
    Served,
    bound_balloon_features,
    run_round,
    start_served,
    virtio_errors,
)
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu

FEATURES = "STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,RING_EVENT_IDX,RING_INDIRECT_DESC,RING_PACKED"


@pytest.fixture(scope="module")
def served(lab: QemuLab) -> Iterator[Served]:
    yield from start_served(lab, "vfio-user", features=FEATURES)


def test_guest_negotiates_ring_packed(served: Served) -> None:
    features = bound_balloon_features(served.vm)
    assert features[VIRTIO_F_RING_PACKED] == "1", features
    st = served.stats()
    assert st["driver_features"] >> VIRTIO_F_RING_PACKED & 1
    assert st["status"] & 0x4, st  # DRIVER_OK


def test_hint_round_over_packed_rings(served: Served) -> None:
    r = run_round(served)
    assert r["hints"] > 0 and r["hints"] * HINT_BLOCK == r["hinted_bytes"], r
    assert r["hinted_bytes"] <= RAM_BYTES
    assert r["outside_ram"] == 0 and r["not_block_aligned"] == 0, r
    served.ctl_call("hint-done")


def test_inflate_then_deflate_over_packed_rings(served: Served) -> None:
    target = 16384  # 64 MiB in 4 KiB pages
    served.ctl_call("set-target", pages=target)
    st = served.wait_stats(lambda s: s["actual"] == target, f"actual to reach {target}")
    assert st["totals"]["inflated_pages"] >= target
    served.ctl_call("set-target", pages=0)
    st = served.wait_stats(lambda s: s["actual"] == 0, "actual to return to 0")
    assert st["totals"]["deflated_pages"] >= target


def test_no_ring_fault_and_no_guest_error(served: Served) -> None:
    log = served.vm.dmesg()
    assert virtio_errors(log) == [], "\n".join(virtio_errors(log))
    assert "Call Trace" not in log
    st = served.stats()
    assert st["totals"]["needs_reset"] == 0
    assert st["dr_violations"] == {}, st["dr_violations"]
    faults = {k: v for k, v in st.get("device_counters", {}).items() if "." in k and v}
    assert faults == {}, faults
