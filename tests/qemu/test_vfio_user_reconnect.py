"""One ``balloon-hint serve`` for two QEMUs in turn: when the first client leaves, the device is
reset and the next QEMU's guest finds a fresh device (its driver binds and hints again)."""
from __future__ import annotations

import pytest

from tests.qemu.served import (
    Served,
    bound_balloon_features,
    run_round,
    start_served,
    vfio_user_device,
)
from vmsim.qemu_lab import QemuLab

pytestmark = pytest.mark.qemu


def test_second_qemu_gets_a_reset_device(lab: QemuLab) -> None:
    gen = start_served(lab)
    first = next(gen)
    assert run_round(first)["hints"] > 0
    first.ctl_call("set-target", pages=2048)
    first.wait_stats(lambda st: st["actual"] == 2048, "first guest to inflate")
    # Boot a second QEMU on the same server once the first is gone.
    first.vm.__exit__(None, None, None)
    first.wait_stats(lambda st: st["connections"] == 1 and st["status"] == 0,
                     "the device to be reset after the first client left", timeout=30)
    sock = first.ctl[:-len(".ctl")]
    with lab.boot(ram="1G", devices=[vfio_user_device(sock)], timeout=180) as vm:
        second = Served(vm, first.ctl, first.log_path)
        bound_balloon_features(vm)
        st = second.stats()
        assert st["connections"] == 2
        # The host's target survives a reset (QEMU keeps it too): the new guest inflates to it.
        second.wait_stats(lambda s: s["actual"] == 2048, "second guest to inflate to the target")
        r = run_round(second)
        assert r["hints"] > 0 and r["outside_ram"] == 0
        assert r["cmd_id"] > st["rounds"][0]["cmd_id"]  # ids never reused across a reset
        second.ctl_call("set-target", pages=0)
        assert second.stats()["dr_violations"] == {}
    gen.close()
