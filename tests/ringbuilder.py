"""Test-only raw ring writer: puts descriptors and available entries into guest memory exactly as
told, including adversarial contents. It is deliberately not the driver (guest_model/vring.py):
device tests must be able to write what no correct driver would."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from guestmem import GuestMemory
from protocol.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtqDesc,
    avail_ring_size,
    desc_table_size,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@dataclass
class RawRing:
    mem: GuestMemory
    size: int
    desc: int
    driver: int
    device: int
    avail_idx: int = 0

    @classmethod
    def layout(cls, mem: GuestMemory, base: int, size: int) -> RawRing:
        """Place a ring at ``base`` (descriptor table, then avail, then used, 4 KiB aligned)."""
        desc = base
        driver = desc + desc_table_size(size)
        device = (driver + avail_ring_size(size) + 4095) & ~4095
        return cls(mem, size, desc, driver, device)

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * i,
                       VirtqDesc.build(dict(addr=addr, len=length, flags=flags, next=nxt)))

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write(self.driver + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.driver + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.driver, flags)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.driver + 4 + 2 * self.size, idx & 0xFFFF)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.device + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        off = self.device + 4 + 8 * (i % self.size)
        return self.mem.read_u32(off), self.mem.read_u32(off + 4)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.device + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.device)
