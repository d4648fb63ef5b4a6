"""Test-only raw packed-ring writer (protocol.md 1.8): writes descriptors and event areas exactly as
told, including what no correct driver would write. Imports nothing from guest_model, so device
tests can write what the driver never would.

Usage::

    mem = make_memory()
    r = RawPackedRing.layout(mem, 0x1000, 8)   # ring at 0x1000, driver/device areas after it
    r.add([(BUF, 4, 0), (BUF + 64, 100, WRITE)], bid=7)   # two slots, head published last
    q = PackedDeviceVirtqueue(mem, 8, r.desc, r.driver, r.device)
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from guestmem import GuestMemory
from protocol.virtqueue import (
    DESC_SIZE,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_PACKED_DESC_F_AVAIL,
    VIRTQ_PACKED_DESC_F_USED,
)

AVAIL, USED = VIRTQ_PACKED_DESC_F_AVAIL, VIRTQ_PACKED_DESC_F_USED
_PDESC = struct.Struct("<QIHH")


def pack_pdesc(addr: int, length: int, bid: int, flags: int) -> bytes:
    return _PDESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, bid & 0xFFFF, flags & 0xFFFF)


@dataclass
class RawPackedRing:
    mem: GuestMemory
    size: int
    desc: int
    driver: int
    device: int
    next_avail: int = 0
    avail_wrap: int = 1

    @classmethod
    def layout(cls, mem: GuestMemory, base: int, size: int) -> RawPackedRing:
        desc = base
        driver = base + ((DESC_SIZE * size + 15) & ~15)
        device = driver + 16
        mem.fill(desc, DESC_SIZE * size, 0)
        mem.fill(driver, 32, 0)
        return cls(mem, size, desc, driver, device)

    def avail_flags(self, wrap: int) -> int:
        return AVAIL if wrap else USED

    def set_desc(self, slot: int, addr: int, length: int, bid: int, flags: int) -> None:
        self.mem.write(self.desc + DESC_SIZE * slot, pack_pdesc(addr, length, bid, flags))

    def add(self, bufs: Sequence[tuple[int, int, int]], bid: int = 0, *,
            next_on_last: bool = False, publish: bool = True) -> int:
        """Write a chain at next_avail (flags given are NEXT-less; NEXT added on all but the last,
        or on every one with ``next_on_last``), the head's flags last. Returns the head slot."""
        head = self.next_avail
        slots = []
        for i, (addr, length, flags) in enumerate(bufs):
            slot = self.next_avail
            f = flags | self.avail_flags(self.avail_wrap)
            if i < len(bufs) - 1 or next_on_last:
                f |= VIRTQ_DESC_F_NEXT
            slots.append((slot, addr, length, f))
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        for slot, addr, length, f in slots[1:]:
            self.set_desc(slot, addr, length, bid, f)
        slot, addr, length, f = slots[0]
        self.set_desc(slot, addr, length, bid, f if publish else 0)
        return head

    def raw(self, slot: int) -> bytes:
        return self.mem.read(self.desc + DESC_SIZE * slot, DESC_SIZE)

    def used(self, slot: int) -> tuple[int, int, int]:
        """(id, len, flags) of the descriptor at ``slot``."""
        _, length, bid, flags = _PDESC.unpack(self.raw(slot))
        return bid, length, flags

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.mem.write(self.driver, struct.pack("<HH", off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        ow, fl = struct.unpack("<HH", self.mem.read(self.device, 4))
        return ow, fl
