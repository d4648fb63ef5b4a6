"""The in-process transport: calls reach the device, interrupts are delivered after the call
returns (never re-entrantly), host effects reach the listeners."""
from __future__ import annotations

import struct

from balloon_dev.device import DeviceConfig
from balloon_dev.effects import ActualChanged, HintRoundStopped, Inflated, PagesHinted
from balloon_dev.transport.inprocess import InProcessTransport
from protocol.balloon import CFG_ACTUAL, VIRTIO_BALLOON_F_REPORTING, BalloonQueue
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, feature_mask
from tests.balloon_dev.devharness import ACK, DOK, DRV, FOK, Harness, cmd, pfn_bytes

Q = BalloonQueue
FEATURES = DeviceConfig().offered_features & ~feature_mask(VIRTIO_F_RING_EVENT_IDX)


class FakeDriver:
    """Records interrupts and whether one arrived while a device method was running, or while
    another handler was running (both would be re-entrant delivery)."""

    def __init__(self, t: InProcessTransport) -> None:
        self.t = t
        self.depth = [0]
        self.in_handler = False
        self.log: list[tuple[str, int]] = []
        self.reentrant = 0
        self.host_seen_in_handler: list = []
        dev = t.device
        for name in ("notify", "write_status", "write_config", "free_page_start", "set_target",
                     "reset", "enable_queue"):
            f = getattr(dev, name)

            def wrapped(*a, f=f):
                self.depth[0] += 1
                try:
                    return f(*a)
                finally:
                    self.depth[0] -= 1
            setattr(dev, name, wrapped)
        t.set_interrupt_handlers(self.on_queue, self.on_config)

    def call(self, name: str, *args):
        return getattr(self.t, name)(*args)

    def _enter(self) -> None:
        self.reentrant += self.depth[0] > 0 or self.in_handler

    def on_queue(self, q: int) -> None:
        self._enter()
        self.log.append(("queue", q))

    def on_config(self) -> None:
        self._enter()
        self.in_handler = True
        try:
            self.log.append(("config", self.t.config_generation()))
            # Handlers may call back into the transport: this write's effect (ActualChanged)
            # is delivered by the outer loop after this handler returns.
            self.t.write_config(CFG_ACTUAL, struct.pack("<I", 1))
            self.host_seen_in_handler = list(self.host)
        finally:
            self.in_handler = False


def make():
    h = Harness()
    t = InProcessTransport(h.dev)
    drv = FakeDriver(t)
    host: list = []
    drv.host = host
    t.add_host_listener(host.append)
    return h, t, drv, host


def test_init_through_transport_and_interrupts_after_call():
    h, t, drv, host = make()
    assert t.get_device_features() == h.dev.device_features
    drv.call("set_status", 0)
    drv.call("set_status", ACK)
    drv.call("set_status", ACK | DRV)
    drv.call("set_driver_features", FEATURES)
    drv.call("set_status", ACK | DRV | FOK)
    assert t.get_status() == ACK | DRV | FOK
    assert t.num_queues() == 4 and t.queue_max_size(3) == 1024 and t.queue_max_size(4) == 0
    h.setup_queues()  # rings via the harness (same device)
    drv.call("set_status", ACK | DRV | FOK | DOK)
    h.post_out(Q.INFLATE, pfn_bytes(3, 4))
    drv.call("notify", 0)
    assert host == [Inflated((3, 4))]
    assert drv.log == [("queue", 0)]
    assert drv.reentrant == 0


def test_host_call_delivers_config_interrupt_and_handler_can_reenter():
    h, t, drv, host = make()
    h.init(FEATURES)
    t.host_call(h.dev.free_page_start)
    assert drv.log and drv.log[0][0] == "config"
    assert drv.reentrant == 0
    assert h.dev.actual == 1  # the handler's write went through...
    assert ActualChanged(1) in host and ActualChanged(1) not in drv.host_seen_in_handler
    cid = h.read_cmd_id()
    h.post_out(Q.FREE_PAGE, cmd(cid))
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x1000)])
    h.post_out(Q.FREE_PAGE, cmd(0))
    drv.call("notify", h.tq(Q.FREE_PAGE))
    assert [type(e) for e in host[-2:]] == [PagesHinted, HintRoundStopped]
    assert drv.log[-1] == ("queue", h.tq(Q.FREE_PAGE))
    assert drv.reentrant == 0


def test_reset_and_config_passthrough():
    h, t, drv, host = make()
    h.init(FEATURES)
    assert t.read_config(0, 4) == b"\0\0\0\0"
    t.reset()
    assert t.get_status() == 0


def test_interrupts_without_handlers_are_counted_not_raised():
    h = Harness(DeviceConfig(offered_features=DeviceConfig().offered_features
                             | feature_mask(VIRTIO_BALLOON_F_REPORTING)))
    t = InProcessTransport(h.dev)
    h.init(FEATURES)
    t.host_call(h.dev.set_target, 5)
    assert t.interrupts == {"queue": 0, "config": 1, "dropped": 1}
