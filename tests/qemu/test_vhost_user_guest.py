"""The balloon device served over vhost-user to a real QEMU (11.1) and a real Linux guest (6.1).

QEMU has no vhost-user balloon; its generic front-end ``vhost-user-test-device-pci`` with
``virtio-id=5`` exposes whatever the back-end offers (protocol.md 8.5). One guest is booted for
the whole module (TCG guests are slow, the machine's cores are shared): ``balloon-hint serve
--vhost-user`` runs in a subprocess on a socket in a temp folder, QEMU connects through
``-chardev socket``, and the tests drive the device through the control socket (``balloon-hint
ctl``'s ``call``), reading the guest with shell commands and its kernel log.

The front-end's options (``num_vqs=4,vq_size=128,config_size=16``: four compacted queues, one
ring size for all, a 16-byte config window) are explained at ``VHOST_USER_DEVICE`` in
``tests/qemu/served.py``, which also holds the helpers shared with the vfio-user guest tests.

What is checked: the Linux driver binds and negotiates FREE_PAGE_HINT; the back-end went live and
maps guest RAM; host-driven hint rounds run to their STOP and every hint lies in guest RAM as a
4 MiB-aligned 4 MiB block; ``num_pages`` inflates the balloon and ``actual`` follows (SET_CONFIG),
and deflating returns it; statistics arrive; unbinding and rebinding the guest driver (a device
reset seen as a vhost-user stop and restart) leaves a working device; pausing and resuming the VM
resumes the device where it stopped; no kernel-log virtio error,
no driver-checker violation, no vhost-user peer error.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from protocol.balloon import VIRTIO_BALLOON_F_FREE_PAGE_HINT
from tests.qemu.served import (
    HINT_BLOCK,
    RAM_BYTES,
    Served,
    balloon_dev_dir,
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
    yield from start_served(lab, "vhost-user")


def test_driver_binds_and_negotiates_free_page_hint(served: Served) -> None:
    features = bound_balloon_features(served.vm)
    assert features[VIRTIO_BALLOON_F_FREE_PAGE_HINT] == "1", features
    st = served.wait_stats(lambda s: s["live"], "the back-end to go live", timeout=60)
    assert st["transport"] == "vhost-user"
    assert st["driver_features"] >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1
    assert st["status"] & 0x4, st  # DRIVER_OK
    # Guest RAM came as memfd regions (SET_MEM_TABLE) and covers the 1 GiB.
    assert sum(size for _gpa, size in st["memory_regions"]) >= RAM_BYTES


@pytest.mark.spec("D-10")
def test_hint_rounds_lie_in_guest_ram(served: Served) -> None:
    # Several rounds in a row: each one must reach the guest's STOP (a lost kick on the free page
    # queue shows up as a round that never stops).
    rounds = []
    for _ in range(4):
        held_free = mem_free(served)
        r = run_round(served)
        rounds.append(r)
        served.ctl_call("hint-done")
        # DONE: the driver returns every held block; wait for that before the next round.
        wait_mem_free(served, held_free - HINT_BLOCK)
    # Idle 1 GiB guest: at least half of RAM comes back as hints in a round, even through a
    # 128-entry free page queue.
    for r in rounds:
        assert r["hinted_bytes"] >= RAM_BYTES // 2, r
        assert r["hints"] * HINT_BLOCK == r["hinted_bytes"]
    assert [r["cmd_id"] for r in rounds] == [rounds[0]["cmd_id"] + i for i in range(4)]
    for r in served.stats()["rounds"]:
        assert r["outside_ram"] == 0, r
        assert r["not_block_aligned"] == 0, r
        assert r["stopped_after_s"] is not None, r


def test_inflate_then_deflate_follows_target(served: Served) -> None:
    target = 16384  # 64 MiB in 4 KiB pages
    served.ctl_call("set-target", pages=target)
    # actual reaches us as SET_CONFIG from the front-end.
    st = served.wait_stats(lambda s: s["actual"] == target, f"actual to reach {target}")
    assert st["num_pages"] == target
    assert st["totals"]["inflated_pages"] >= target
    served.ctl_call("set-target", pages=0)
    st = served.wait_stats(lambda s: s["actual"] == 0, "actual to return to 0")
    assert st["totals"]["deflated_pages"] >= target


def test_statistics_arrive(served: Served) -> None:
    before = served.stats()["totals"]["stats_buffers"]
    served.ctl_call("request-stats")
    st = served.wait_stats(lambda s: s["totals"]["stats_buffers"] > before, "a stats buffer")
    assert st["guest_stats"].get("MEMTOT", 0) > RAM_BYTES // 2, st["guest_stats"]


def test_vm_stop_cont_resumes_the_device(served: Served) -> None:
    before = served.stats()["session_counters"]
    stops, resumes = before.get("device_stops", 0), before.get("device_resumes", 0)
    served.ctl_call("set-target", pages=4096)
    served.wait_stats(lambda s: s["actual"] == 4096, "actual to reach 4096")
    # Pausing the VM stops the vhost device (every ring's GET_VRING_BASE) ...
    served.vm.qmp("stop")
    served.wait_stats(lambda s: s["session_counters"].get("device_stops", 0) > stops
                      and not s["live"], "the vhost-user stop")
    # ... and resuming hands the same rings back at the bases we reported: a resume, not a
    # reset (the balloon keeps its pages, no buffer is replayed).
    served.vm.qmp("cont")
    st = served.wait_stats(lambda s: s["live"], "the restart", timeout=60)
    assert st["session_counters"].get("device_resumes", 0) == resumes + 1, st["session_counters"]
    assert st["actual"] == 4096
    inflated = st["totals"]["inflated_pages"]
    served.ctl_call("set-target", pages=0)
    st = served.wait_stats(lambda s: s["actual"] == 0, "actual to return to 0")
    assert st["totals"]["inflated_pages"] == inflated  # nothing replayed
    assert st["dr_violations"] == {}, st["dr_violations"]


def test_driver_rebind_is_a_stop_and_restart(served: Served) -> None:
    d = balloon_dev_dir(served.vm)
    name = os.path.basename(d)
    stops = served.stats()["session_counters"].get("device_stops", 0)
    # Unbinding resets the device: QEMU stops the vhost device (GET_VRING_BASE on every ring).
    served.vm.run(f"echo {name} > /sys/bus/virtio/drivers/virtio_balloon/unbind")
    served.wait_stats(lambda s: s["session_counters"].get("device_stops", 0) > stops
                      and not s["live"], "the vhost-user stop")
    served.vm.run(f"echo {name} > /sys/bus/virtio/drivers/virtio_balloon/bind")
    served.wait_stats(lambda s: s["live"] and s["status"] & 0x4, "the restart", timeout=60)
    r = run_round(served)
    served.ctl_call("hint-done")
    assert r["hinted_bytes"] > 0 and r["outside_ram"] == 0, r


def test_guest_kernel_log_has_no_virtio_error(served: Served) -> None:
    log = served.vm.dmesg()
    bad = virtio_errors(log)
    assert bad == [], "\n".join(bad)
    assert "Call Trace" not in log


def test_no_violation_and_no_peer_error(served: Served) -> None:
    st = served.stats()
    assert st["dr_violations"] == {}, st["dr_violations"]
    assert st["totals"]["needs_reset"] == 0
    # QEMU's front-end never sent us anything we had to refuse.
    assert st["session_counters"].get("peer_errors", 0) == 0, (
        st["session_counters"], served.server_log()[-3000:])
    assert st["server_counters"].get("framing_errors", 0) == 0
    assert "Traceback" not in served.server_log()
