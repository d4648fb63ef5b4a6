"""Hypothesis stateful test: a random (often broken) driver and a random host drive the device.

Whatever the guest writes - status bytes, features, config, queue addresses, descriptor tables,
available rings - and whatever the host asks, no device call raises, the device never hits an
internal error, and the only guest memory it writes is the used ring of an enabled queue
(V-9: never readable buffers or the descriptor table).
"""
from __future__ import annotations

import logging
import struct

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import PagesHinted, PrecopyEvent
from guestmem import GuestMemory
from protocol.balloon import (
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from protocol.virtio import feature_mask
from protocol.virtqueue import used_ring_size

MEM = 1 << 20  # one byte-backed region [0, 1 MiB); addresses up to MEM + 64 KiB are tried
OFFERED = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING,
                                                  VIRTIO_BALLOON_F_MUST_TELL_HOST)
SANE_STATUS = [0, 1, 3, 11, 15, 0x4F, 0x80, 0x8F, 7, 5, 0x40]

addr = st.one_of(st.integers(0, MEM + 0x10000), st.sampled_from([0, 0x1000, 0x8000, 0x10000]),
                 st.integers(0, 1 << 64))
small_addr = st.integers(0, MEM - 1).map(lambda a: a & ~0xF)


def cid_noise(data) -> int:
    return data.draw(st.sampled_from([0, 1, 2, 0x80000000, 0xFFFFFFFF]))


class DeviceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._quiet = logging.getLogger("balloon_dev")
        self._old_level = self._quiet.level
        self._quiet.setLevel(logging.CRITICAL)  # thousands of expected guest-error warnings
        self.mem = GuestMemory()
        self.ram = bytearray(MEM)
        self.mem.add_region(0, self.ram, "ram")
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=OFFERED,
                                                        ram_pages=MEM >> 12))
        # What the driver set up per queue (the test's own record, to aim its writes).
        self.queues: dict[int, tuple[int, int, int, int]] = {}

    def teardown(self) -> None:
        self._quiet.setLevel(self._old_level)

    # -- the device-call wrapper: no exception, only used rings written ---------------------
    def _allowed(self) -> list[tuple[int, int]]:
        out = []
        for q in range(self.dev.num_queues):
            if self.dev.queue_enabled(q):
                slot = self.dev._slots[q]
                out.append((slot.device, used_ring_size(slot.size)))
        return out

    def call(self, fn, *args):
        before = bytes(self.ram)
        allowed = self._allowed()
        result = fn(*args)
        allowed += self._allowed()
        diff = np.frombuffer(before, np.uint8) != np.frombuffer(self.ram, np.uint8)
        changed = np.nonzero(diff)[0]
        if changed.size:
            ok = np.zeros(MEM, dtype=bool)
            for a, n in allowed:
                ok[max(a, 0):max(min(a + n, MEM), 0)] = True
            bad = changed[~ok[changed]]
            assert bad.size == 0, \
                f"device wrote guest memory at {int(bad[0]):#x} outside any used ring"
        return result

    # -- driver: control plane ----------------------------------------------------------------
    @rule(v=st.one_of(st.sampled_from(SANE_STATUS), st.integers(0, 255)))
    def write_status(self, v: int) -> None:
        self.call(self.dev.write_status, v)

    @rule(f=st.one_of(st.just(OFFERED), st.integers(0, (1 << 64) - 1),
                      st.integers(0, OFFERED).map(lambda x: x & OFFERED)))
    def write_features(self, f: int) -> None:
        self.call(self.dev.write_driver_features, f)

    @rule(off=st.integers(0, 24), data=st.binary(min_size=0, max_size=8))
    def write_config(self, off: int, data: bytes) -> None:
        self.call(self.dev.write_config, off, data)

    @rule(off=st.integers(0, 24), size=st.integers(0, 8))
    def read_config(self, off: int, size: int) -> None:
        assert len(self.call(self.dev.read_config, off, size)) == size

    @rule(q=st.integers(0, 6), size=st.sampled_from([0, 1, 2, 3, 4, 16, 32, 128, 256, 1024, 2048]),
          desc=st.one_of(small_addr, addr), drv=st.one_of(small_addr, addr),
          used=st.one_of(small_addr, addr))
    def set_queue(self, q: int, size: int, desc: int, drv: int, used: int) -> None:
        self.call(self.dev.set_queue, q, size, desc, drv, used)
        self.queues[q] = (size, desc, drv, used)

    @rule(q=st.integers(0, 6))
    def enable_queue(self, q: int) -> None:
        self.call(self.dev.enable_queue, q)

    @rule(q=st.integers(-1, 6))
    def kick(self, q: int) -> None:
        effects = self.call(self.dev.notify, q)
        for e in effects:
            event(f"kick: {type(e).__name__}")
            if isinstance(e, PagesHinted):
                # D-10: hints are only ever attributed to the current round's id.
                assert e.cmd_id == self.dev.hint.cmd_id
        if self.dev.status & 64:
            event("device needs reset")

    @rule()
    def reset(self) -> None:
        self.call(self.dev.reset)

    @initialize(features=st.sampled_from([OFFERED, OFFERED & ~feature_mask(29),
                                          OFFERED & ~feature_mask(28)]),
                base=st.sampled_from([0x10000, 0x20000, 0x8000]), live=st.booleans())
    def start(self, features: int, base: int, live: bool) -> None:
        """Half of the runs start from a correctly initialised device."""
        if live:
            self.init_properly(features, base)

    @rule(features=st.sampled_from([OFFERED, OFFERED & ~feature_mask(29),
                                    OFFERED & ~feature_mask(28)]),
          base=st.sampled_from([0x10000, 0x20000, 0x8000]))
    def init_properly(self, features: int, base: int) -> None:
        """A correct initialisation with rings inside memory, so ring chaos hits a live device."""
        self.call(self.dev.write_status, 0)
        for v in (1, 3):
            self.call(self.dev.write_status, v)
        self.call(self.dev.write_driver_features, features)
        self.call(self.dev.write_status, 11)
        for q in range(self.dev.num_queues):
            size = min(self.dev.queue_max_size(q), 64)
            desc = base + q * 0x4000
            args = (size, desc, desc + 16 * size, (desc + 16 * size + 6 + 2 * size + 0xFF) & ~0xFF)
            self.call(self.dev.set_queue, q, *args)
            self.call(self.dev.enable_queue, q)
            self.queues[q] = args
        self.call(self.dev.write_status, 15)

    # -- driver: ring contents (writes by the test, not checked) ------------------------------
    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def write_desc(self, data) -> None:
        q = data.draw(st.sampled_from(sorted(self.queues)))
        size, desc, _, _ = self.queues[q]
        i = data.draw(st.integers(0, max(size, 1) - 1))
        a = data.draw(st.one_of(small_addr, addr))
        n = data.draw(st.one_of(st.integers(0, 64), st.sampled_from([4, 8, 10, 0x400000]),
                                st.integers(0, 0xFFFFFFFF)))
        flags = data.draw(st.integers(0, 7))
        nxt = data.draw(st.integers(0, max(size, 1)))
        gpa = desc + 16 * i
        if 0 <= gpa and gpa + 16 <= MEM:
            self.ram[gpa:gpa + 16] = struct.pack("<QIHH", a & ((1 << 64) - 1), n, flags, nxt)

    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def publish(self, data) -> None:
        q = data.draw(st.sampled_from(sorted(self.queues)))
        size, _, drv, _ = self.queues[q]
        if not (0 <= drv and drv + 6 + 2 * max(size, 1) <= MEM):
            return
        idx = struct.unpack_from("<H", self.ram, drv + 2)[0]
        k = data.draw(st.integers(1, 4))
        for j in range(k):
            head = data.draw(st.one_of(st.integers(0, max(size, 1) - 1), st.integers(0, 0xFFFF)))
            slot = (idx + j) % max(size, 1)
            struct.pack_into("<H", self.ram, drv + 4 + 2 * slot, head)
        jump = data.draw(st.one_of(st.just(k), st.integers(0, 0xFFFF)))
        struct.pack_into("<H", self.ram, drv + 2, (idx + jump) & 0xFFFF)

    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def post_plausible(self, data) -> None:
        """A well-formed one- or two-descriptor chain with plausible (or random) contents."""
        q = data.draw(st.sampled_from(sorted(self.queues)))
        size, desc, drv, _ = self.queues[q]
        if not (size and 0 <= desc and desc + 16 * size <= MEM and 0 <= drv
                and drv + 6 + 2 * size <= MEM):
            return
        cid = self.dev.hint.cmd_id
        payload = data.draw(st.one_of(
            st.sampled_from([struct.pack("<I", cid), struct.pack("<I", 0), b"\x01\0\0\0"]),
            st.lists(st.integers(0, 300), min_size=1, max_size=8).map(
                lambda p: struct.pack(f"<{len(p)}I", *p)),
            st.lists(st.tuples(st.integers(0, 20), st.integers(0, 1 << 40)), min_size=1,
                     max_size=4).map(lambda e: b"".join(struct.pack("<HQ", *x) for x in e)),
            st.binary(min_size=1, max_size=12)))
        buf = 0xC0000 + 64 * data.draw(st.integers(0, 1000))
        self.ram[buf:buf + len(payload)] = payload
        i = data.draw(st.integers(0, size - 1))
        kind = data.draw(st.sampled_from(["out", "in", "out+in"]))
        hint = (data.draw(st.integers(0, MEM)) & ~0xFFF,
                data.draw(st.sampled_from([0x1000, 0x400000])))
        if kind == "out":
            struct.pack_into("<QIHH", self.ram, desc + 16 * i, buf, len(payload), 0, 0)
        elif kind == "in":
            struct.pack_into("<QIHH", self.ram, desc + 16 * i, hint[0], hint[1], 2, 0)
        else:
            j = (i + 1) % size
            struct.pack_into("<QIHH", self.ram, desc + 16 * i, buf, len(payload), 1, j)
            struct.pack_into("<QIHH", self.ram, desc + 16 * j, hint[0], hint[1], 2, 0)
        idx = struct.unpack_from("<H", self.ram, drv + 2)[0]
        struct.pack_into("<H", self.ram, drv + 4 + 2 * (idx % size), i)
        struct.pack_into("<H", self.ram, drv + 2, (idx + 1) & 0xFFFF)
        if data.draw(st.booleans()):
            self.kick(q)

    def _post_simple(self, q: int, k: int, gpa: int, n: int, flags: int) -> bool:
        """Descriptor k of queue q = one buffer, published; False if the ring is not in memory."""
        size, desc, drv, _ = self.queues[q]
        if not (size and 0 <= desc and desc + 16 * size <= MEM and 0 <= drv
                and drv + 6 + 2 * size <= MEM):
            return False
        i = k % size
        struct.pack_into("<QIHH", self.ram, desc + 16 * i, gpa, n, flags, 0)
        idx = struct.unpack_from("<H", self.ram, drv + 2)[0]
        struct.pack_into("<H", self.ram, drv + 4 + 2 * (idx % size), i)
        struct.pack_into("<H", self.ram, drv + 2, (idx + 1) & 0xFFFF)
        return True

    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def hint_round(self, data) -> None:
        """The host opens a round and a (mostly) correct driver answers on free_page_vq."""
        q = self.dev.queue_layout().get(BalloonQueue.FREE_PAGE)
        if q is None or q not in self.queues:
            return
        self.call(self.dev.free_page_start)
        cid = self.dev.hint.cmd_id if data.draw(st.integers(0, 4)) else cid_noise(data)
        self.ram[0xB0000:0xB0004] = struct.pack("<I", cid)
        k = data.draw(st.integers(0, 1 << 16))
        if not self._post_simple(q, k, 0xB0000, 4, 0):
            return
        for j in range(data.draw(st.integers(0, 5))):
            self._post_simple(q, k + 1 + j, data.draw(st.integers(0, MEM)) & ~0xFFF, 0x1000, 2)
        self.kick(q)
        if data.draw(st.booleans()):
            self.ram[0xB0010:0xB0014] = b"\0\0\0\0"
            self._post_simple(q, k + 7, 0xB0010, 4, 0)
            self.kick(q)

    @precondition(lambda self: self.queues)
    @rule(pfns=st.lists(st.integers(0, 300), min_size=1, max_size=6))
    def inflate_then_deflate(self, pfns) -> None:
        layout = self.dev.queue_layout()
        for lq, off in ((BalloonQueue.INFLATE, 0xB1000), (BalloonQueue.DEFLATE, 0xB2000)):
            q = layout[lq]
            if q not in self.queues:
                return
            payload = struct.pack(f"<{len(pfns)}I", *pfns)
            self.ram[off:off + len(payload)] = payload
            if self._post_simple(q, len(pfns), off, len(payload), 0):
                self.kick(q)

    @rule(a=st.integers(0, MEM - 16), payload=st.binary(min_size=1, max_size=16))
    def scribble(self, a: int, payload: bytes) -> None:
        self.ram[a:a + len(payload)] = payload

    # -- host -----------------------------------------------------------------------------------
    @rule(which=st.sampled_from(["start", "stop", "done", "stats"]))
    def host(self, which: str) -> None:
        fn = {"start": self.dev.free_page_start, "stop": self.dev.free_page_stop,
              "done": self.dev.free_page_done, "stats": self.dev.request_stats}[which]
        self.call(fn)

    @rule(ev=st.sampled_from(list(PrecopyEvent)), running=st.booleans())
    def precopy(self, ev: PrecopyEvent, running: bool) -> None:
        self.call(self.dev.precopy_notify, ev, running)

    @rule(n=st.integers(0, 0xFFFFFFFF))
    def set_target(self, n: int) -> None:
        self.call(self.dev.set_target, n)

    @invariant()
    def no_internal_error(self) -> None:
        assert self.dev.counters.get("internal_error", 0) == 0


DeviceMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_device_survives_random_driver = DeviceMachine.TestCase
