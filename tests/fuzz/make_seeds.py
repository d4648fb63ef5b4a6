"""Seed inputs for the ring and peer targets: programs a correct driver would run (inflate,
deflate, stats, a free page hint round, a report, an indirect table) and a correct peer's
messages (vfio-user queries, config access, interrupts; vhost-user queries, rings handed over
and kicked), in the record format ``targets.py`` and ``peer_targets.py`` read, so the fuzzer
starts from deep, valid paths and mutates them into near misses.

    python -m tests.fuzz.make_seeds   # (re)writes tests/fuzz/seeds/*/seed-*
"""
from __future__ import annotations

import struct
from pathlib import Path

from tests.fuzz.targets import QSIZE, RING_BASE, RING_STRIDE

BUF = 0x3000
AVAIL, USED, NEXT, WRITE, INDIRECT = 1 << 7, 1 << 15, 1, 2, 4


def write(off: int, data: bytes) -> bytes:
    out = b""
    for i in range(0, len(data), 40):
        chunk = data[i:i + 40]
        out += bytes([0]) + struct.pack("<H", off + i) + bytes([len(chunk)]) + chunk
    return out


def notify(q: int) -> bytes:
    return bytes([2, q])


def host(sub: int, arg: bytes = b"") -> bytes:
    return bytes([3, sub]) + arg


def split_chain(q: int, bufs: list[tuple[int, int, int]], slot: int = 0,
                indirect: bool = False) -> bytes:
    """Descriptors for ``bufs`` (gpa, len, flags) from ``slot`` on, head in avail ring entry
    ``slot``, avail idx ``slot + 1``; with ``indirect`` the chain is a table at BUF + 0x800."""
    base = RING_BASE + RING_STRIDE * q
    out = b""
    descs = b""
    for i, (gpa, n, fl) in enumerate(bufs):
        last = i == len(bufs) - 1
        nxt = (0 if indirect else slot) + i + 1
        descs += struct.pack("<QIHH", gpa, n, fl | (0 if last else NEXT), 0 if last else nxt)
    if indirect:
        out += write(BUF + 0x800, descs)
        out += write(base + 16 * slot, struct.pack("<QIHH", BUF + 0x800, len(descs), INDIRECT, 0))
    else:
        out += write(base + 16 * slot, descs)
    avail = base + 16 * QSIZE
    out += write(avail + 4 + 2 * slot, struct.pack("<H", slot))
    out += write(avail, struct.pack("<HH", 0, slot + 1))
    return out


def packed_chain(q: int, bufs: list[tuple[int, int, int]], slot: int = 0,
                 indirect: bool = False) -> bytes:
    base = RING_BASE + RING_STRIDE * q
    bid = slot
    out = b""
    for i, (gpa, n, fl) in enumerate(reversed(bufs)):  # the head is published last
        k = slot + len(bufs) - 1 - i
        last = i == 0
        out += write(base + 16 * k, struct.pack("<QIHH", gpa, n, bid,
                                                fl | AVAIL | (0 if last else NEXT)))
    return out


def programs(packed: bool) -> dict[str, bytes]:
    chain = packed_chain if packed else split_chain
    pfns = struct.pack("<3I", 1, 2, 40)
    stats = struct.pack("<HQHQ", 0, 1 << 20, 4, 1 << 30)
    out = {
        "inflate": write(BUF, pfns) + chain(0, [(BUF, len(pfns), 0)]) + notify(0),
        "deflate": write(BUF, pfns) + chain(1, [(BUF, len(pfns), 0)]) + notify(1),
        "stats": host(4) + write(BUF, stats) + chain(2, [(BUF, len(stats), 0)]) + notify(2),
        "hint-round": host(0) + write(BUF, struct.pack("<I", 0x80000001))
        + chain(3, [(BUF, 4, 0)]) + notify(3) + chain(3, [(0x8000, 0x4000, WRITE)], slot=1)
        + notify(3) + host(1) + host(2),
        "report": chain(4, [(0x8000, 0x1000, WRITE), (0x10000, 0x2000, WRITE)]) + notify(4),
        "target": host(3, struct.pack("<I", 16)) + bytes([5, 4, 4]),
    }
    if not packed:
        out["indirect"] = (write(BUF, pfns) + split_chain(0, [(BUF, 4, 0), (BUF + 4, 8, 0)],
                                                          indirect=True) + notify(0))
    return out


def main() -> None:
    here = Path(__file__).parent / "seeds"
    for name, packed in (("split_ring", False), ("packed_ring", True)):
        d = here / name
        d.mkdir(parents=True, exist_ok=True)
        for label, data in programs(packed).items():
            (d / f"seed-{label}").write_bytes(data)


def vfio_programs() -> dict[str, bytes]:
    """Records of ``peer_targets.vfio_user``: after the start byte (VERSION and DMA_MAP of RAM),
    op 3 = a message: msg_id, command index, flags index, payload length, payload, fd count."""
    from protocol import vfio_user as vu
    commands = [int(c) for c in vu.Command]

    def msg(cmd: int, payload: bytes, fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
        out = bytes([3]) + struct.pack("<HBBH", 9, commands.index(cmd), 0, len(payload))
        return out + payload + bytes([len(fds)]) + b"".join(bytes([k]) for k in fds)

    C = vu.Command
    info = (msg(C.DEVICE_GET_INFO, vu.build_device_info(16, 0, 0, 0))
            + b"".join(msg(C.DEVICE_GET_REGION_INFO, vu.build_region_info(32, 0, i, 0))
                       for i in (0, 4, 7, 9))
            + b"".join(msg(C.DEVICE_GET_IRQ_INFO, vu.build_irq_info(16, 0, i, 0))
                       for i in (0, 2)))
    cfg = vu.VFIO_PCI_CONFIG_REGION_INDEX
    return {
        "info": b"\x01" + info,
        "config": b"\x01" + msg(C.REGION_READ, vu.build_region_access(0, cfg, 64))
        + msg(C.REGION_WRITE, vu.build_region_access(4, cfg, 2, b"\x06\x00")),
        "irqs": b"\x01" + msg(C.DEVICE_SET_IRQS, vu.build_irq_set(
            vu.VFIO_IRQ_SET_DATA_EVENTFD | vu.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 2), [0, 0]),
        "unmap": b"\x01" + msg(C.DMA_UNMAP, vu.build_dma_unmap(0, 0, 1 << 16)),
        "no-version": b"\x00" + info,
    }


def vhost_programs() -> dict[str, bytes]:
    """Records of ``peer_targets.vhost_user``: start byte (REPLY_ACK, RAM, features), op 2 = a
    ring handed over in RAM, op 1 = kick every ring, op 4 = a message (request index, flags
    index, payload length, payload, fd count)."""
    from protocol import vhost_user as vu
    R = vu.VhostUserRequest
    requests = [int(x) for x in R]

    def msg(req: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return (bytes([4, requests.index(req), flags]) + struct.pack("<H", len(payload))
                + payload + b"\x00")

    rings = b"".join(bytes([2, q, 1]) + struct.pack("<HHH", 0x100 * q, 0x100 * q + 0x80,
                                                   0x100 * q + 0xC0) for q in range(5))
    return {
        "queries": b"\x01" + msg(R.GET_FEATURES) + msg(R.GET_PROTOCOL_FEATURES)
        + msg(R.GET_QUEUE_NUM) + msg(R.GET_MAX_MEM_SLOTS)
        + msg(R.GET_CONFIG, vu.build_config(0, bytes(8))),
        "rings-live": b"\x01" + rings + b"\x01" + msg(R.GET_VRING_BASE, vu.build_vring_state(0, 0)),
        "config": b"\x01" + msg(R.SET_CONFIG, vu.build_config(0, bytes(4)), 2),
        "no-start": b"\x00" + rings + b"\x01",
    }


def write_peer_seeds() -> None:
    here = Path(__file__).parent / "seeds"
    for name, progs in (("vfio_user", vfio_programs()), ("vhost_user", vhost_programs())):
        d = here / name
        d.mkdir(parents=True, exist_ok=True)
        for label, data in progs.items():
            (d / f"seed-{label}").write_bytes(data)


if __name__ == "__main__":
    main()
    write_peer_seeds()
