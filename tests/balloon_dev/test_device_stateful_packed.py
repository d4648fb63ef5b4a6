"""The stateful random-driver test (test_device_stateful.py) with RING_PACKED offered: the same
random (often broken) driver and host, plus a rule that posts packed descriptors (plausible or
not, with either wrap marking) on packed queues. No device call raises, no internal error, and
the device writes only where a packed device may: its queues' descriptor rings (used
descriptors) and device event areas, or the used rings of split queues."""
from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import initialize, precondition, rule

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from protocol.virtio import VIRTIO_F_RING_PACKED, feature_mask
from protocol.virtqueue import used_ring_size
from tests.balloon_dev.test_device_stateful import MEM, OFFERED, DeviceMachine

PACKED_OFFERED = OFFERED | feature_mask(VIRTIO_F_RING_PACKED)
FEATURES = [PACKED_OFFERED, PACKED_OFFERED & ~feature_mask(29),
            PACKED_OFFERED & ~feature_mask(28), OFFERED]
AVAIL, USED = 1 << 7, 1 << 15


class PackedDeviceMachine(DeviceMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=PACKED_OFFERED,
                                                        ram_pages=MEM >> 12))

    def _allowed(self) -> list[tuple[int, int]]:
        out = []
        for q in range(self.dev.num_queues):
            if self.dev.queue_enabled(q):
                slot = self.dev._slots[q]
                if isinstance(slot.vq, PackedDeviceVirtqueue):
                    out += [(slot.desc, 16 * slot.size), (slot.device, 4)]
                else:
                    out.append((slot.device, used_ring_size(slot.size)))
        return out

    @initialize(features=st.sampled_from(FEATURES), base=st.sampled_from([0x10000, 0x20000]),
                live=st.booleans())
    def start(self, features: int, base: int, live: bool) -> None:
        if live:
            self.init_properly(features, base)

    @rule(features=st.sampled_from(FEATURES), base=st.sampled_from([0x10000, 0x20000, 0x8000]))
    def init_properly(self, features: int, base: int) -> None:
        DeviceMachine.init_properly(self, features, base)

    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def post_packed(self, data) -> None:
        """One or two packed descriptors at the device's next slot (or anywhere), marked
        available for its lap (or the wrong lap), then maybe a kick."""
        q = data.draw(st.sampled_from(sorted(self.queues)))
        slot = self.dev._slots.get(q)
        vq = slot.vq if slot is not None else None
        if not isinstance(vq, PackedDeviceVirtqueue) or not 0 <= vq.desc <= MEM - 16 * vq.size:
            return
        n = data.draw(st.integers(1, 2))
        start = vq.last_avail_idx if data.draw(st.booleans()) else data.draw(
            st.integers(0, vq.size - 1))
        wrap = vq.avail_wrap ^ data.draw(st.sampled_from([0, 0, 0, 1]))
        payload = data.draw(st.sampled_from([struct.pack("<I", self.dev.hint.cmd_id),
                                             struct.pack("<2I", 5, 6), b"\x01\0\0\0"]))
        buf = 0xC0000 + 64 * data.draw(st.integers(0, 1000))
        self.ram[buf:buf + len(payload)] = payload
        bid = data.draw(st.integers(0, 0xFFFF))
        descs = [(buf, len(payload), 0), (data.draw(st.integers(0, MEM)) & ~0xFFF, 0x1000, 2)]
        for k in reversed(range(n)):  # the head last
            s = (start + k) % vq.size
            w = wrap ^ (start + k >= vq.size)
            a, ln, f = descs[k] if n == 2 else descs[data.draw(st.integers(0, 1))]
            f |= (1 if k < n - 1 else 0) | (AVAIL if w else USED)
            struct.pack_into("<QIHH", self.ram, vq.desc + 16 * s, a, ln, bid, f)
        event("packed descriptors posted")
        if data.draw(st.booleans()):
            self.kick(q)


PackedDeviceMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_packed_device_survives_random_driver = PackedDeviceMachine.TestCase
