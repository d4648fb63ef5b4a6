"""Test-only vfio-user client: builds messages, feeds them to a ``VfioUserSession`` (sans-I/O) and
decodes its replies; plays the parts of QEMU's vfio-user-pci a device test needs.

``Client.request(cmd, payload, fds)`` returns ``(reply_header, reply_payload, other_actions)``;
``None`` for the reply when the session sent none (NO_REPLY). Region helpers read and write the
config space and BARs; ``driver_init()`` walks the virtio-pci init sequence (protocol.md 2.3)
through those registers, with rings in a memfd the session maps by DMA_MAP.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.transport.core import Outcome, Signal
from balloon_dev.transport.vfio_user import VfioUserSession
from balloon_dev.transport.virtio_pci import VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.fdutil import eventfd

RAM_SIZE = 16 << 20
BAR4 = vp.MODERN_BAR
CFG = vu.VFIO_PCI_CONFIG_REGION_INDEX


def memfd(size: int = RAM_SIZE) -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    return fd


def perform(outcome: Outcome) -> list[Any]:
    """Do what the server would for eventfd signals; return the signals and host effects."""
    for s in outcome.signals:
        os.write(s.fd, (1).to_bytes(8, "little"))
    return [*outcome.signals, *outcome.effects]


def signalled(actions: list[Any]) -> list[str]:
    """What the ``Signal`` actions name (``irq index I vector V``)."""
    return [a.what for a in actions if isinstance(a, Signal)]


class Client:
    def __init__(self, features: int | None = None, msix_vectors: int = 2) -> None:
        self.mem = GuestMemory()
        cfg = DeviceConfig() if features is None else DeviceConfig(offered_features=features)
        self.dev = BalloonDevice(self.mem, cfg)
        self.pci = VirtioPciFunction(self.dev, msix_vectors=msix_vectors)
        self.session = VfioUserSession(self.pci, self.mem)
        self.msg_id = 0
        self.ram_fd: int | None = None

    # -- raw messages ------------------------------------------------------------------------
    def raw(self, data: bytes, fds: list[int] | None = None) -> tuple[Any, bytes, list[Any]]:
        header = vu.decode_header(data[:vu.HEADER_SIZE])
        outcome = self.session.handle(vu.Message(header, data[vu.HEADER_SIZE:],
                                                 tuple(fds or ())))
        others = perform(outcome)
        if outcome.reply is None:
            return None, b"", others
        rh = vu.decode_header(outcome.reply[:vu.HEADER_SIZE])
        assert rh.msg_id == header.msg_id and rh.command == header.command
        assert rh.is_reply and rh.size == len(outcome.reply)
        return rh, outcome.reply[vu.HEADER_SIZE:], others

    def request(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None,
                flags: int = 0) -> tuple[Any, bytes, list[Any]]:
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        return self.raw(vu.encode_request(self.msg_id, cmd, payload, flags=flags), fds)

    def ok(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        h, p, _ = self.request(cmd, payload, fds)
        assert h is not None and not h.flags & vu.VFIO_USER_F_ERROR, (h, p)
        return p

    def error(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None,
              flags: int = 0) -> int:
        h, p, _ = self.request(cmd, payload, fds, flags)
        assert h is not None and h.flags & vu.VFIO_USER_F_ERROR, (h, p)
        assert h.size == vu.HEADER_SIZE and p == b""  # error replies are the bare header
        return int(h.error)

    # -- commands ----------------------------------------------------------------------------
    def version(self, caps: dict[str, Any] | None = None) -> dict[str, Any]:
        caps = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20} if caps is None else caps
        p = self.ok(vu.Command.VERSION, vu.build_version(0, 0, caps))
        major, minor = struct.unpack_from("=HH", p)
        assert (major, minor) == (0, 0)
        assert p.endswith(b"\0")
        return dict(json.loads(p[4:-1]))

    def map_ram(self, size: int = RAM_SIZE, gpa: int = 0) -> int:
        fd = memfd(size)
        self.ram_fd = os.dup(fd)  # the session closes its copy after mmap
        flags = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
        self.ok(vu.Command.DMA_MAP, vu.build_dma_map(flags, 0, gpa, size), [fd])
        return self.ram_fd

    def read(self, region: int, offset: int, count: int) -> bytes:
        h, p, _ = self.request(vu.Command.REGION_READ,
                               vu.build_region_access(offset, region, count))
        assert h is not None and not h.flags & vu.VFIO_USER_F_ERROR, h
        off, reg, cnt = struct.unpack_from("=QII", p)
        assert (off, reg, cnt) == (offset, region, count)
        return p[vu.REGION_ACCESS_SIZE:]

    def write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> list[Any]:
        flags = vu.VFIO_USER_F_NO_REPLY if posted else 0
        h, p, other = self.request(vu.Command.REGION_WRITE,
                                   vu.build_region_access(offset, region, len(data), data),
                                   flags=flags)
        if posted:
            assert h is None
        else:
            assert h is not None and not h.flags & vu.VFIO_USER_F_ERROR, h
            assert p == vu.build_region_access(offset, region, len(data))
        return other

    def rd(self, region: int, offset: int, size: int) -> int:
        return int.from_bytes(self.read(region, offset, size), "little")

    def wr(self, region: int, offset: int, value: int, size: int) -> list[Any]:
        return self.write(region, offset, value.to_bytes(size, "little"))

    def set_irqs(self, index: int, start: int, fds: list[int], flags: int | None = None,
                 count: int | None = None) -> None:
        if flags is None:
            flags = vu.VFIO_IRQ_SET_DATA_EVENTFD | vu.VFIO_IRQ_SET_ACTION_TRIGGER
        n = len(fds) if count is None else count
        self.ok(vu.Command.DEVICE_SET_IRQS, vu.build_irq_set(flags, index, start, n), fds)

    # -- a virtio-pci driver's init sequence, through registers -------------------------------
    def driver_init(self, *, msix: bool = True, features_mask: int | None = None) -> list[int]:
        """Reset, negotiate, set up every queue with rings in RAM, DRIVER_OK. Returns the
        MSI-X eventfds (config vector 0, queues vector 1) when ``msix``."""
        c = vp
        fds: list[int] = []
        if msix:
            fds = [eventfd(), eventfd()]
            ctrl = self.rd(CFG, 0x40 + c.PCI_MSIX_FLAGS, 2)
            self.wr(CFG, 0x40 + c.PCI_MSIX_FLAGS, ctrl | c.PCI_MSIX_FLAGS_ENABLE, 2)
            self.set_irqs(vu.VFIO_PCI_MSIX_IRQ_INDEX, 0, [os.dup(f) for f in fds])
        self.wr(BAR4, c.COMMON_STATUS, 0, 1)
        self.wr(BAR4, c.COMMON_STATUS, 1 | 2, 1)
        feats = 0
        for sel in (0, 1):
            self.wr(BAR4, c.COMMON_DFSELECT, sel, 4)
            feats |= self.rd(BAR4, c.COMMON_DF, 4) << (32 * sel)
        if features_mask is not None:
            feats &= features_mask
        for sel in (0, 1):
            self.wr(BAR4, c.COMMON_GFSELECT, sel, 4)
            self.wr(BAR4, c.COMMON_GF, (feats >> (32 * sel)) & 0xFFFFFFFF, 4)
        self.wr(BAR4, c.COMMON_STATUS, 1 | 2 | 8, 1)
        assert self.rd(BAR4, c.COMMON_STATUS, 1) & 8, "FEATURES_OK refused"
        if msix:
            self.wr(BAR4, c.COMMON_MSIX, 0, 2)
            assert self.rd(BAR4, c.COMMON_MSIX, 2) == 0
        nq = self.rd(BAR4, c.COMMON_NUMQ, 2)
        base = 0x100000
        for q in range(nq):
            self.wr(BAR4, c.COMMON_Q_SELECT, q, 2)
            size = self.rd(BAR4, c.COMMON_Q_SIZE, 2)
            desc, avail, used = base, base + 16 * size, base + 0x8000
            base += 0x10000
            if msix:
                self.wr(BAR4, c.COMMON_Q_MSIX, 1, 2)
                assert self.rd(BAR4, c.COMMON_Q_MSIX, 2) == 1
            for off, val in ((c.COMMON_Q_DESCLO, desc), (c.COMMON_Q_AVAILLO, avail),
                             (c.COMMON_Q_USEDLO, used)):
                self.wr(BAR4, off, val & 0xFFFFFFFF, 4)
                self.wr(BAR4, off + 4, val >> 32, 4)
            self.wr(BAR4, c.COMMON_Q_ENABLE, 1, 2)
            assert self.rd(BAR4, c.COMMON_Q_ENABLE, 2) == 1
        if feats >> 4 & 1:  # PAGE_POISON: poison_val before DRIVER_OK (DR-12)
            self.wr(BAR4, c.DEVICE_CFG_OFFSET + 0xC, 0xAAAAAAAA, 4)
        self.wr(BAR4, c.COMMON_STATUS, 1 | 2 | 8 | 4, 1)
        return fds

    def queue_rings(self, q: int) -> tuple[int, int, int, int]:
        """(size, desc, avail, used) as driver_init laid them out."""
        self.wr(BAR4, vp.COMMON_Q_SELECT, q, 2)
        size = self.rd(BAR4, vp.COMMON_Q_SIZE, 2)
        return (size, self.rd(BAR4, vp.COMMON_Q_DESCLO, 4), self.rd(BAR4, vp.COMMON_Q_AVAILLO, 4),
                self.rd(BAR4, vp.COMMON_Q_USEDLO, 4))

    def close(self) -> None:
        self.session.close()
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None
