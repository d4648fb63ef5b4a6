"""Free page reporting (protocol.md 3.7) from a real Linux guest over vfio-user: with REPORTING
offered (five queues, reporting_vq of 32), the blocks the guest frees after a hint round's DONE
come back as reported ranges inside guest RAM."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocol.balloon import VIRTIO_BALLOON_F_REPORTING
from tests.qemu.served import Served, balloon_dev_dir, run_round, start_served
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu

FEATURES = "STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,REPORTING,RING_EVENT_IDX,RING_INDIRECT_DESC"


@pytest.fixture(scope="module")
def served_reporting(lab: QemuLab) -> Iterator[Served]:
    yield from start_served(lab, features=FEATURES)


@pytest.mark.spec("D-17")
def test_guest_reports_freed_blocks(served_reporting: Served) -> None:
    s = served_reporting
    d = balloon_dev_dir(s.vm)
    feats = s.vm.run(f"cat {d}/features").strip()
    assert feats[VIRTIO_BALLOON_F_REPORTING] == "1", feats
    r = run_round(s)  # the guest grabs its free memory ...
    assert r["hints"] > 0
    s.ctl_call("hint-done")  # ... and frees it on DONE: page_reporting reports the blocks
    st = s.wait_stats(lambda x: x["totals"]["reported_ranges"] >= 16, "reported ranges",
                      timeout=120)
    assert st["totals"]["reported_outside_ram"] == 0
    assert st["totals"]["reported_bytes"] >= 16 * (2 << 20)  # pageblock-order (2 MiB) blocks
    assert st["dr_violations"] == {}
    assert st["totals"]["needs_reset"] == 0
