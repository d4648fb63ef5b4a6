"""``balloon-hint migrate-check`` on the lab's QEMU: one short real-guest migration with QEMU's
free page hinting, its RAM files diffed page by page (vmsim.lab_migrate).

With ``init_on_alloc=0`` the hinted blocks keep the random data the workload freed, and QEMU
never sends them: the two RAM files must differ, and every differing page must lie inside a hint
the poller read from the free page queue (a page outside would be a lost write). The guest must
then be healthy on the destination."""
from __future__ import annotations

import pytest

from vmsim.lab_migrate import CheckConfig, lab_build, run_check

pytestmark = pytest.mark.qemu


def test_real_guest_migration_differs_only_in_hinted_pages(lab):
    r = run_check(lab, lab_build(lab), CheckConfig(ram="512M", init_on_alloc=0, fill_mib=128))
    assert "error" not in r, r.get("error")
    assert r["migration"]["status"] == "completed"
    cap, pages = r["capture"], r["pages"]
    # Every published descriptor was read in time, and the round hinted most of the free RAM.
    assert cap["suspect"] == 0, cap
    assert cap["rounds_started"] >= 1 and cap["hints"] > 0, cap
    assert cap["hinted_bytes"] > r["memfree_before_kib"] * 1024 // 2, (cap, r)
    # Hinted pages that still hold the freed data were never sent: the files differ there...
    assert pages["differing"] > 0, pages
    # ...and only there.
    assert pages["lost"] == 0, r.get("lost_detail")
    assert pages["hinted"] == pages["differing"]
    # The whole migration carried fewer pages than the guest has.
    m = r["migration"]
    assert m["normal_pages"] + m["zero_pages"] < 512 * 256 * 3 // 4, m
    h = r["health"]
    assert h["keeper_ok"] and h["memtest_ok"], h
    assert not h["dmesg_bad"], h["dmesg_bad"]


def test_hinted_migration_without_the_poller_still_skips_the_freed_data(lab):
    """``--no-capture`` (CheckConfig.capture False): no poller spins on a CPU, so the run times
    the guest and QEMU alone. QEMU still skips the hinted blocks (the files differ, fewer pages
    go), but no hint is known, so no page is classified as hinted or lost."""
    r = run_check(lab, lab_build(lab), CheckConfig(ram="512M", init_on_alloc=0, fill_mib=128,
                                                   capture=False))
    assert "error" not in r, r.get("error")
    assert r["migration"]["status"] == "completed"
    assert r["captured"] is False
    assert r["capture"]["hints"] == 0 and r["capture"]["polls"] == 0, r["capture"]
    assert r["pages"]["differing"] > 0 and r["pages"]["classified"] is False, r["pages"]
    assert "lost" not in r["pages"]
    m = r["migration"]
    assert m["normal_pages"] + m["zero_pages"] < 512 * 256 * 3 // 4, m
    h = r["health"]
    assert h["keeper_ok"] and h["memtest_ok"], h
