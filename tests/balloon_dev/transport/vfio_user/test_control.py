"""Host control (balloon_dev.control): commands, the hint-round log, the control socket and
``balloon-hint ctl``."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import trio

from balloon_dev.control import HostControl
from balloon_dev.effects import HintRoundStopped, PagesHinted, PagesReported
from balloon_dev.transport.control_server import serve_control
from protocol import virtio_pci as vp
from protocol.errors import UsageError
from tests.balloon_dev.transport.vfio_user.client import BAR4, Client, perform
from vmsim.cmd_ctl import call
from vmsim.cmd_serve import parse_features, qemu_options

BLOCK = 4 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ctl(ram: Client) -> tuple[HostControl, Client, Clock]:
    ram.driver_init(msix=True)
    clock = Clock()
    hc = HostControl(ram.dev, lambda fn: perform(ram.session.host(fn)), clock,
                     in_guest_ram=ram.mem.contains)
    return hc, ram, clock


def test_hint_round_is_logged(ctl: tuple[HostControl, Client, Clock]) -> None:
    hc, c, clock = ctl
    ans = hc.execute({"execute": "hint-start", "id": 7})
    assert ans["id"] == 7
    cmd_id = ans["return"]["cmd-id"]
    assert cmd_id == c.rd(BAR4, vp.DEVICE_CFG_OFFSET + 8, 4) == 0x80000001
    clock.t += 2.5
    hc.on_effects([PagesHinted.from_ranges(cmd_id, ((0, BLOCK), (BLOCK, BLOCK))),
                   PagesHinted.from_ranges(cmd_id, ((0x123000, 0x1000), (1 << 40, BLOCK))),
                   HintRoundStopped(cmd_id)])
    r = hc.execute({"execute": "stats"})["return"]["rounds"][0]
    assert r == {"cmd_id": cmd_id, "requested_at": 100.0, "hints": 4,
                 "hinted_bytes": 3 * BLOCK + 0x1000, "outside_ram": 1,
                 "not_block_aligned": 1, "stopped_after_s": 2.5}


def test_reported_ranges_are_totalled_and_checked(ctl: tuple[HostControl, Client, Clock]) -> None:
    hc, _, _ = ctl
    hc.on_effects([PagesReported(((0x200000, 0x200000), (1 << 40, 0x200000)))])
    t = hc.execute({"execute": "stats"})["return"]["totals"]
    assert (t["reported_ranges"], t["reported_bytes"], t["reported_outside_ram"]) == \
        (2, 0x400000, 1)


def test_commands_reach_the_device(ctl: tuple[HostControl, Client, Clock]) -> None:
    hc, c, _ = ctl
    assert hc.execute({"execute": "set-target", "arguments": {"pages": 512}}) == {"return": {}}
    assert c.dev.num_pages == 512
    st = hc.execute({"execute": "stats"})["return"]
    assert st["num_pages"] == 512 and st["actual"] == 0 and st["dr_violations"] == {}
    hc.execute({"execute": "hint-start"})
    assert hc.execute({"execute": "hint-stop"}) == {"return": {}}
    assert c.rd(BAR4, vp.DEVICE_CFG_OFFSET + 8, 4) == 0
    hc.execute({"execute": "hint-done"})
    assert c.rd(BAR4, vp.DEVICE_CFG_OFFSET + 8, 4) == 1
    # The round the host stopped is over; its stop time is logged.
    rounds = hc.execute({"execute": "stats"})["return"]["rounds"]
    assert rounds[0]["stopped_after_s"] is not None


@pytest.mark.parametrize(("msg", "cls"), [
    ({"execute": "reboot"}, "CommandNotFound"),
    ({"exec": "stats"}, "GenericError"),
    ([1, 2], "GenericError"),
    ({"execute": "set-target"}, "GenericError"),
    ({"execute": "set-target", "arguments": {"pages": -1}}, "GenericError"),
    ({"execute": "set-target", "arguments": {"pages": True}}, "GenericError"),
    ({"execute": "set-target", "arguments": [1]}, "GenericError"),
])
def test_bad_commands_get_qmp_errors(ctl: tuple[HostControl, Client, Clock], msg: Any,
                                     cls: str) -> None:
    hc, _, _ = ctl
    assert hc.execute(msg)["error"]["class"] == cls


def test_hint_start_without_a_negotiated_feature_is_an_error() -> None:
    c = Client()
    c.version()
    hc = HostControl(c.dev, lambda fn: perform(c.session.host(fn)), Clock(),
                     in_guest_ram=c.mem.contains)
    ans = hc.execute({"execute": "hint-start"})  # no driver yet: nothing negotiated
    assert ans["error"]["class"] == "GenericError"
    c.close()


def test_control_socket_and_ctl_client(ctl: tuple[HostControl, Client, Clock]) -> None:
    hc, c, _ = ctl
    d = tempfile.mkdtemp(prefix="bh-ctl-")
    path = os.path.join(d, "ctl.sock")

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(serve_control, path, hc)
            assert os.stat(path).st_mode & 0o777 == 0o600
            ans = await trio.to_thread.run_sync(call, path, "set-target", {"pages": 99})
            assert ans == {"return": {}}
            ans = await trio.to_thread.run_sync(call, path, "stats")
            assert ans["return"]["num_pages"] == 99
            ans = await trio.to_thread.run_sync(call, path, "bogus")
            assert ans["error"]["class"] == "CommandNotFound"
            n.cancel_scope.cancel()

    trio.run(main)
    assert c.dev.num_pages == 99
    os.rmdir(d)


def test_serve_feature_list_and_qemu_options() -> None:
    m = parse_features("STATS_VQ, free_page_hint,VIRTIO_BALLOON_F_PAGE_POISON")
    assert m == (1 << 32) | (1 << 1) | (1 << 3) | (1 << 4)
    with pytest.raises(UsageError, match="unknown feature 'FLY'"):
        parse_features("FLY")
    opts = qemu_options("/run/x.sock")
    dev = opts[opts.index("-device") + 1]
    assert '"driver":"vfio-user-pci"' in dev and '"path":"/run/x.sock"' in dev
    assert any("memory-backend-memfd" in o and "share=on" in o for o in opts)
