"""PCI over qtest: configuration space through ports 0xcf8/0xcfc, enumeration of bus 0, BAR
sizing and assignment, the capability list: what firmware and a guest's PCI core do before a
driver binds.

Theory of operation
-------------------
Configuration mechanism #1 (q35 keeps it beside ECAM): write ``0x80000000 | bus << 16 |
device << 11 | function << 8 | (offset & 0xfc)`` to port 0xcf8, then access the dword at port
0xcfc (a byte or word at ``0xcfc + (offset & 3)``). Two qtest commands per access.

``enumerate_bus0`` lists the functions present (vendor id not 0xffff; functions 1-7 only on a
multi-function device); with ``-nodefaults`` and no bridges, bus 0 is all there is.
``PciFunction.assign_bars(allocator)`` sizes each memory BAR (write all ones, read back, restore),
places it at the next naturally aligned address of a ``BarAllocator`` (by default the window
libqos uses on the PC machines, 0xE0000000 + 512 MiB, below the IOAPIC/LAPIC), programs it
(both halves of a 64-bit BAR) and turns on memory decoding and bus mastering. I/O BARs are left
unassigned: the virtio-pci modern interface needs none (the device is started with
``disable-legacy=on``). ``capabilities()`` walks the list from offset 0x34, bounded against
loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from protocol import virtio_pci as vp
from protocol.errors import EnvironmentFailure, UsageError
from vmsim.qtest.wire import QtestConnection

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
#: libqos's 32-bit PCI memory window on the PC machines.
PCI_HOLE = (0xE0000000, 0x20000000)
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_HEADER_TYPE_MULTI = 0x80


class PciError(EnvironmentFailure):
    """The machine's PCI devices are not what we expect (no such device, a broken list)."""


def _cfg_addr(bus: int, dev: int, fn: int, off: int) -> int:
    if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8 and 0 <= off < 256):
        raise UsageError(f"PCI {bus:02x}:{dev:02x}.{fn} offset {off:#x}: out of range")
    return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (off & 0xFC)


class PciConfig:
    """Config space accesses of one machine through 0xcf8/0xcfc."""

    def __init__(self, qt: QtestConnection) -> None:
        self.qt = qt

    def read(self, bdf: tuple[int, int, int], off: int, size: int) -> int:
        if size not in (1, 2, 4) or off % size:
            raise UsageError(f"PCI config read of {size} bytes at {off:#x}: not aligned")
        a = _cfg_addr(*bdf, off)
        port = CONFIG_DATA + (off & 3)
        verb = {1: "inb", 2: "inw", 4: "inl"}[size]
        r = self.qt.pipeline([f"outl {CONFIG_ADDRESS:#x} {a:#x}", f"{verb} {port:#x}"])
        return int(r[1][0], 0)

    def write(self, bdf: tuple[int, int, int], off: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or off % size:
            raise UsageError(f"PCI config write of {size} bytes at {off:#x}: not aligned")
        if not 0 <= value < 1 << (8 * size):
            raise UsageError(f"PCI config value {value:#x} does not fit {size} bytes")
        a = _cfg_addr(*bdf, off)
        port = CONFIG_DATA + (off & 3)
        verb = {1: "outb", 2: "outw", 4: "outl"}[size]
        self.qt.pipeline([f"outl {CONFIG_ADDRESS:#x} {a:#x}", f"{verb} {port:#x} {value:#x}"])


@dataclass
class BarAllocator:
    """Hands out naturally aligned addresses from one window."""

    base: int = PCI_HOLE[0]
    size: int = PCI_HOLE[1]
    next: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.next < 0:
            self.next = self.base

    def alloc(self, size: int) -> int:
        addr = (self.next + size - 1) & ~(size - 1)
        if addr + size > self.base + self.size:
            raise PciError(f"no room for a BAR of {size:#x} bytes in the PCI window")
        self.next = addr + size
        return addr


@dataclass
class Bar:
    index: int
    addr: int
    size: int
    is64: bool


@dataclass
class Capability:
    pos: int
    cap_id: int
    raw: bytes  # the capability's bytes (up to the next 16 or its own length)


class PciFunction:
    """One function on bus 0: its config space and BARs."""

    def __init__(self, cfg: PciConfig, bdf: tuple[int, int, int]) -> None:
        self.cfg = cfg
        self.bdf = bdf
        self.vendor_id = self.read(vp.PCI_VENDOR_ID, 2)
        self.device_id = self.read(vp.PCI_DEVICE_ID, 2)
        self.bars: dict[int, Bar] = {}

    def __repr__(self) -> str:
        b, d, f = self.bdf
        return f"PciFunction({b:02x}:{d:02x}.{f} {self.vendor_id:04x}:{self.device_id:04x})"

    def read(self, off: int, size: int) -> int:
        return self.cfg.read(self.bdf, off, size)

    def write(self, off: int, size: int, value: int) -> None:
        self.cfg.write(self.bdf, off, size, value)

    def read_block(self, off: int, n: int) -> bytes:
        """``n`` bytes of config space from a dword-aligned ``off`` (dword reads)."""
        out = bytearray()
        for o in range(off, off + n, 4):
            out += self.read(o, 4).to_bytes(4, "little")
        return bytes(out[:n])

    # -- BARs -------------------------------------------------------------------------------
    def assign_bars(self, allocator: BarAllocator) -> dict[int, Bar]:
        """Size and place every memory BAR; enable memory decoding and bus mastering."""
        cmd = self.read(vp.PCI_COMMAND, 2)
        # Decoding off while BARs move (as firmware does), so no half-programmed BAR decodes.
        self.write(vp.PCI_COMMAND, 2, cmd & ~(vp.PCI_COMMAND_MEMORY | vp.PCI_COMMAND_IO))
        i = 0
        while i < 6:
            off = PCI_BASE_ADDRESS_0 + 4 * i
            orig = self.read(off, 4)
            if orig & vp.PCI_BASE_ADDRESS_SPACE_IO:
                i += 1
                continue
            is64 = bool(orig & PCI_BASE_ADDRESS_MEM_TYPE_64)
            self.write(off, 4, 0xFFFFFFFF)
            lo = self.read(off, 4)
            hi = 0xFFFFFFFF
            if is64:
                orig_hi = self.read(off + 4, 4)
                self.write(off + 4, 4, 0xFFFFFFFF)
                hi = self.read(off + 4, 4)
                self.write(off + 4, 4, orig_hi)
            self.write(off, 4, orig)
            mask = (hi << 32 | (lo & ~0xF)) if is64 else (lo & ~0xF)
            if mask:
                width = 64 if is64 else 32
                size = (~mask & ((1 << width) - 1)) + 1
                addr = allocator.alloc(size)
                self.write(off, 4, (addr & 0xFFFFFFFF) | (orig & 0xF))
                if is64:
                    self.write(off + 4, 4, addr >> 32)
                self.bars[i] = Bar(i, addr, size, is64)
            i += 2 if is64 else 1
        self.write(vp.PCI_COMMAND, 2, (cmd | vp.PCI_COMMAND_MEMORY | vp.PCI_COMMAND_MASTER)
                   & ~vp.PCI_COMMAND_IO)
        return self.bars

    # -- capabilities -----------------------------------------------------------------------
    def capabilities(self) -> list[Capability]:
        if not self.read(vp.PCI_STATUS, 2) & vp.PCI_STATUS_CAP_LIST:
            return []
        cfg = self.read_block(0, vp.PCI_CONFIG_SPACE_SIZE)
        pos = cfg[vp.PCI_CAPABILITY_LIST] & ~3
        out: list[Capability] = []
        seen: set[int] = set()
        while pos:
            # At most 48 capabilities fit in the 192 bytes after the header: a loop is broken.
            if pos in seen or pos < 0x40 or pos + 2 > len(cfg) or len(seen) >= 48:
                raise PciError(f"{self!r}: capability list broken at {pos:#x}")
            seen.add(pos)
            out.append(Capability(pos, cfg[pos], cfg[pos:pos + 24]))
            pos = cfg[pos + 1] & ~3
        return out


def enumerate_bus0(qt: QtestConnection) -> list[PciFunction]:
    """Every function present on bus 0."""
    cfg = PciConfig(qt)
    out = []
    for dev in range(32):
        if cfg.read((0, dev, 0), vp.PCI_VENDOR_ID, 2) == 0xFFFF:
            continue
        multi = cfg.read((0, dev, 0), vp.PCI_HEADER_TYPE, 1) & PCI_HEADER_TYPE_MULTI
        for fn in range(8 if multi else 1):
            if fn and cfg.read((0, dev, fn), vp.PCI_VENDOR_ID, 2) == 0xFFFF:
                continue
            out.append(PciFunction(cfg, (0, dev, fn)))
    return out


def find_function(qt: QtestConnection, vendor_id: int, device_id: int) -> PciFunction:
    for f in enumerate_bus0(qt):
        if f.vendor_id == vendor_id and f.device_id == device_id:
            return f
    raise PciError(f"no PCI device {vendor_id:04x}:{device_id:04x} on bus 0")
