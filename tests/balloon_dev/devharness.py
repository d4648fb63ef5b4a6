"""Test harness for the device core: guest memory, a device, and raw rings a test writes by hand.

Not a driver: it writes exactly the descriptors a test asks for (vmsim.conformance.rings), so tests
can play a correct driver or a broken one. Layout: 16 MiB of byte-backed RAM at gpa 0; rings at
1 MiB (64 KiB apart), buffers from 2 MiB, hint blocks anywhere in RAM.
"""
from __future__ import annotations

import struct

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import Effect
from balloon_dev.hint import START
from guestmem import GuestMemory
from protocol.balloon import (
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_PAGE_POISON,
    BalloonQueue,
)
from protocol.virtio import DeviceStatus
from vmsim.conformance.rings import NEXT, WRITE, RawRing

RAM_BYTES = 16 << 20
RING_BASE = 0x100000
RING_STRIDE = 0x10000
DATA_BASE = 0x200000
DATA_END = 0x400000

ACK = int(DeviceStatus.ACKNOWLEDGE)
DRV = int(DeviceStatus.DRIVER)
FOK = int(DeviceStatus.FEATURES_OK)
DOK = int(DeviceStatus.DRIVER_OK)
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)


class Harness:
    def __init__(self, cfg: DeviceConfig | None = None) -> None:
        self.mem = GuestMemory()
        self.ram = bytearray(RAM_BYTES)
        self.mem.add_region(0, self.ram, "ram")
        self.dev = BalloonDevice(self.mem, cfg or DeviceConfig())
        self.rings: dict[BalloonQueue, RawRing] = {}
        self._next_desc: dict[BalloonQueue, int] = {}
        self._data = DATA_BASE

    # -- initialisation ----------------------------------------------------------------------
    def negotiate(self, features: int | None = None) -> bool:
        """Steps 1-6 of protocol.md 2.3; True when FEATURES_OK stuck."""
        d = self.dev
        d.write_status(0)
        d.write_status(ACK)
        d.write_status(ACK | DRV)
        d.write_driver_features(d.device_features if features is None else features)
        d.write_status(ACK | DRV | FOK)
        return bool(d.status & FOK)

    def setup_queues(self) -> None:
        for lq, tq in self.dev.queue_layout().items():
            size = self.dev.queue_max_size(tq)
            ring = RawRing.layout(self.mem, RING_BASE + RING_STRIDE * int(lq), size)
            self.rings[lq] = ring
            self._next_desc[lq] = 0
            self.dev.set_queue(tq, size, ring.desc, ring.driver, ring.device)
            self.dev.enable_queue(tq)

    def init(self, features: int | None = None, poison: int | None = 0,
             driver_ok: bool = True) -> list[Effect]:
        assert self.negotiate(features), f"FEATURES_OK refused: {self.dev.counters}"
        self.setup_queues()
        if poison is not None and self.dev.driver_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
            self.dev.write_config(CFG_POISON_VAL, struct.pack("<I", poison))
        if driver_ok:
            return self.dev.write_status(ACK | DRV | FOK | DOK)
        return []

    def init_legacy(self, features: int | None = None, poison: int | None = 0) -> list[Effect]:
        """A legacy (virtio 0.9.5) driver's initialisation of a ``DeviceConfig(legacy=True)``
        device: reset, ACKNOWLEDGE, DRIVER, one 32-bit feature word, each ring given as one
        page frame number (``set_queue_legacy``; ``RawRing.layout`` puts the areas where
        protocol.md 1.7 does, so tests read the rings independently of the device), DRIVER_OK.
        No FEATURES_OK step."""
        d = self.dev
        d.write_status(0)
        d.write_status(ACK)
        d.write_status(ACK | DRV)
        d.write_driver_features(d.device_features if features is None else features)
        for lq, tq in d.queue_layout().items():
            base = RING_BASE + RING_STRIDE * int(lq)
            self.rings[lq] = RawRing.layout(self.mem, base, d.queue_max_size(tq))
            self._next_desc[lq] = 0
            d.set_queue_legacy(tq, base >> 12)
            assert d.queue_enabled(tq), f"legacy queue {tq} not enabled: {d.counters}"
        if poison is not None and d.driver_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
            d.write_config(CFG_POISON_VAL, struct.pack("<I", poison))
        return d.write_status(ACK | DRV | DOK)

    # -- buffers ---------------------------------------------------------------------------
    def tq(self, lq: BalloonQueue) -> int:
        return self.dev.queue_layout()[lq]

    def alloc(self, data: bytes) -> int:
        gpa = self._data
        self._data += (len(data) + 15) & ~15 or 16
        assert self._data <= DATA_END, "harness data area exhausted"
        self.mem.write(gpa, data)
        return gpa

    def _desc(self, lq: BalloonQueue) -> int:
        ring = self.rings[lq]
        i = self._next_desc[lq]
        self._next_desc[lq] = (i + 1) % ring.size
        return i

    def post_chain(self, lq: BalloonQueue, parts: list[tuple[int, int, bool]]) -> int:
        """Post one chain of (gpa, len, writable) descriptors; returns its head."""
        ring = self.rings[lq]
        idx = [self._desc(lq) for _ in parts]
        for k, (gpa, n, wr) in enumerate(parts):
            last = k == len(parts) - 1
            flags = (WRITE if wr else 0) | (0 if last else NEXT)
            ring.set_desc(idx[k], gpa, n, flags, 0 if last else idx[k + 1])
        ring.publish(idx[0])
        return idx[0]

    def post_out(self, lq: BalloonQueue, data: bytes) -> int:
        return self.post_chain(lq, [(self.alloc(data), len(data), False)])

    def post_in(self, lq: BalloonQueue, ranges: list[tuple[int, int]]) -> int:
        return self.post_chain(lq, [(a, n, True) for a, n in ranges])

    def kick(self, lq: BalloonQueue) -> list[Effect]:
        return self.dev.notify(self.tq(lq))

    def used(self, lq: BalloonQueue) -> list[tuple[int, int]]:
        ring = self.rings[lq]
        return [ring.used_elem(i) for i in range(ring.used_idx())]

    def read_cmd_id(self) -> int:
        return int.from_bytes(self.dev.read_config(8, 4), "little")

    def open_hint_round(self) -> int:
        """Host starts a hint round, the driver answers with its cmd id: the round is in START.
        Returns the cmd id."""
        self.dev.free_page_start()
        cid = self.read_cmd_id()
        self.post_out(BalloonQueue.FREE_PAGE, cmd(cid))
        self.kick(BalloonQueue.FREE_PAGE)
        assert self.dev.hint.status == START
        return cid


def pfn_bytes(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def cmd(value: int) -> bytes:
    return struct.pack("<I", value)


def stats_bytes(*entries: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", t, v) for t, v in entries)
