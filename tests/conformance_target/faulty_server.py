"""A deliberately broken virtio-balloon device server, for proving that the conformance_target
checks can fail (a check that cannot fail is worthless).

Run as ``python -m tests.conformance_target.faulty_server --fault NAME[,NAME] [--vhost-user]
SOCK CTL``: our own device and vfio-user (or vhost-user) server, as ``balloon-hint serve`` builds
them (over vhost-user with every queue 128 entries, as there), with the device core
wrapped in ``FaultyDevice``, which breaks exactly one rule per fault. ``FAULTS`` maps each fault
to the requirement ids whose checks must then FAIL (tests/test_cmd_conformance_target.py runs
them). The wrapper sees what the device sees (guest memory, ring addresses) and nothing more.
"""
from __future__ import annotations

import argparse
import struct
from typing import Any

import trio

from balloon_dev.control import HostControl
from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import (
    ConfigChanged,
    Deflated,
    Inflated,
    NeedsReset,
    NotifyQueue,
    PagesReported,
)
from balloon_dev.transport.control_server import serve_control, wall_clock
from balloon_dev.transport.vfio_user_server import VfioUserServer
from balloon_dev.transport.vhost_user_server import VhostUserServer
from balloon_dev.transport.virtio_pci import VirtioPciFunction
from guestmem import GuestMemory, GuestMemoryError
from protocol.balloon import BalloonQueue
from protocol.virtio import DeviceStatus
from protocol.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmsim.cmd_serve import VHOST_USER_VQ_SIZE, parse_features

#: fault -> (what it breaks, ids whose checks must FAIL)
FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "early-use": ("uses a kicked buffer and interrupts before DRIVER_OK", ("V-10", "D-16")),
    "used-len": ("reports len 4 in every used element", ("D-17",)),
    "reuse-id": ("publishes the same command id for every round", ("D-9",)),
    "no-stop": ("ignores the host's stop: no STOP published", ("D-8",)),
    "no-done": ("ignores the host's done: no DONE published", ("D-13",)),
    "scribble-hints": ("zeroes every hint buffer it pops, whatever the round state",
                       ("D-10", "D-11", "D-12", "V-9")),
    "write-readable": ("writes into readable inflate/deflate buffers", ("V-9",)),
    "scribble-neighbour": ("zeroes the page after each inflated pfn", ("D-3",)),
    "scribble-deflated": ("zeroes deflated pages on the next inflate", ("D-4",)),
    "silent-reset": ("sets DEVICE_NEEDS_RESET without a config interrupt", ("V-1", "V-2")),
    "keep-stats": ("never returns the stats buffer to the driver", ("D-6",)),
    "report-zero": ("zeroes reported pages although poison_val is not 0", ("D-15",)),
    "refuse-features": ("refuses FEATURES_OK for any subset", ("D-1",)),
    "live-id-at-reset": ("keeps a round's id published across a device reset", ("D-16", "D-8")),
    "qemu-cmd-id-read": ("reads 0 for free_page_hint_cmd_id once the driver started the round "
                         "(QEMU's START state)", ("D-10",)),
}

_ELEM = struct.Struct("<II")


class FaultyDevice:
    """``BalloonDevice`` with one or more rules broken (see ``FAULTS``); everything else is
    passed through to the real core."""

    def __init__(self, dev: BalloonDevice, mem: GuestMemory, faults: set[str]) -> None:
        self._dev = dev
        self._mem = mem
        self._faults = faults
        self._rings: dict[int, tuple[int, int, int, int]] = {}  # q -> size, desc, avail, used
        self._last_id: int | None = None
        self._deflated: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dev, name)

    # -- helpers ----------------------------------------------------------------------------
    def _queue(self, which: BalloonQueue) -> int | None:
        return self._dev.queue_layout().get(which)

    def _pending_descs(self, q: int) -> list[tuple[int, int, int]]:
        """(addr, len, flags) of direct descriptors of every chain published but not yet used."""
        if q not in self._rings:
            return []
        size, desc, avail, used = self._rings[q]
        out = []
        try:
            a_idx, u_idx = self._mem.read_u16(avail + 2), self._mem.read_u16(used + 2)
            for k in range((a_idx - u_idx) & 0xFFFF if (a_idx - u_idx) & 0xFFFF <= size else 0):
                i = self._mem.read_u16(avail + 4 + 2 * ((u_idx + k) % size))
                for _ in range(size):
                    if i >= size:
                        break
                    addr, length, flags, nxt = struct.unpack(
                        "<QIHH", self._mem.read(desc + 16 * i, 16))
                    out.append((addr, length, flags))
                    if not flags & VIRTQ_DESC_F_NEXT:
                        break
                    i = nxt
        except GuestMemoryError:
            pass
        return out

    def _zero(self, gpa: int, n: int) -> None:
        try:
            self._mem.fill(gpa, n, 0)
        except GuestMemoryError:
            pass

    # -- transport-facing -------------------------------------------------------------------
    def set_queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        self._rings[q] = (size, desc, driver, device)
        self._dev.set_queue(q, size, desc, driver, device)

    def write_status(self, v: int) -> list[Any]:
        if "refuse-features" in self._faults and v & DeviceStatus.FEATURES_OK:
            v &= ~DeviceStatus.FEATURES_OK
        if v == 0:
            return self._after_reset(lambda: self._dev.write_status(0))
        return self._filter(self._dev.write_status(v))

    def reset(self) -> list[Any]:
        return self._after_reset(self._dev.reset)

    def _after_reset(self, do: Any) -> list[Any]:
        return self._filter(do())

    def read_config(self, offset: int, size: int) -> bytes:
        data = self._dev.read_config(offset, size)
        if "live-id-at-reset" in self._faults and self._last_id is not None \
                and not self._dev.status & DeviceStatus.DRIVER_OK and offset <= 8 < offset + size:
            # The last round's id stays published although no driver can answer it now.
            raw = bytearray(data)
            raw[8 - offset:12 - offset] = struct.pack("<I", self._last_id)[:offset + size - 8]
            data = bytes(raw)
        return data

    def notify(self, q: int) -> list[Any]:
        f = self._faults
        if "early-use" in f and not self._dev.status & DeviceStatus.DRIVER_OK \
                and q in self._rings:
            size, _, avail, used = self._rings[q]
            if self._mem.read_u16(avail + 2) != self._mem.read_u16(used + 2):
                head = self._mem.read_u16(avail + 4)
                self._mem.write(used + 4, _ELEM.pack(head, 0))
                self._mem.write_u16(used + 2, 1)
                return [NotifyQueue(q)]
        if "scribble-hints" in f and q == self._queue(BalloonQueue.FREE_PAGE):
            for addr, length, flags in self._pending_descs(q):
                if flags & VIRTQ_DESC_F_WRITE:
                    self._zero(addr, length)
        readable = []
        if "write-readable" in f and q in (self._queue(BalloonQueue.INFLATE),
                                          self._queue(BalloonQueue.DEFLATE)):
            readable = [(a, n) for a, n, fl in self._pending_descs(q)
                        if not fl & VIRTQ_DESC_F_WRITE]
        before = self._mem.read_u16(self._rings[q][3] + 2) if q in self._rings else 0
        eff = self._dev.notify(q)
        for a, n in readable:
            self._zero(a, min(n, 4))
        if "used-len" in f and q in self._rings:
            size, _, _, used = self._rings[q]
            after = self._mem.read_u16(used + 2)
            for k in range((after - before) & 0xFFFF):
                at = used + 4 + 8 * ((before + k) % size)
                head, _ = _ELEM.unpack(self._mem.read(at, 8))
                self._mem.write(at, _ELEM.pack(head, 4))
        return self._filter(eff)

    def _filter(self, eff: list[Any]) -> list[Any]:
        f = self._faults
        out = []
        reset = any(isinstance(e, NeedsReset) for e in eff)
        for e in eff:
            if "silent-reset" in f and reset and isinstance(e, ConfigChanged):
                continue
            if isinstance(e, Inflated):
                if "scribble-neighbour" in f:
                    for p in e.pfns:
                        self._zero((p + 1) * 4096, 4096)
                if "scribble-deflated" in f:
                    for p in self._deflated:
                        self._zero(p * 4096, 4096)
                    self._deflated = []
            if isinstance(e, Deflated):
                self._deflated.extend(e.pfns)
            if isinstance(e, PagesReported) and "report-zero" in f:
                for g, n in e.ranges:
                    self._zero(g, n)
            out.append(e)
        return out

    # -- host-facing ------------------------------------------------------------------------
    def free_page_start(self) -> list[Any]:
        if "reuse-id" in self._faults and self._last_id is not None:
            self._dev.hint.state.cmd_id = self._last_id - 1
        eff = self._dev.free_page_start()
        self._last_id = self._dev.hint.state.cmd_id
        return eff

    def free_page_stop(self) -> list[Any]:
        return [] if "no-stop" in self._faults else self._dev.free_page_stop()

    def free_page_done(self) -> list[Any]:
        return [] if "no-done" in self._faults else self._dev.free_page_done()

    def request_stats(self) -> list[Any]:
        return [] if "keep-stats" in self._faults else self._dev.request_stats()


def build(sock: str, faults: set[str], features: str | None,
          vhost_user: bool = False) -> tuple[Any, HostControl]:
    unknown = faults - set(FAULTS)
    if unknown:
        raise SystemExit(f"--fault: unknown {sorted(unknown)} (known: {', '.join(FAULTS)})")
    mem = GuestMemory()
    # Over vhost-user every ring has the front-end's one vq_size, so the queues are sized as
    # `balloon-hint serve --vhost-user` sizes them (QEMU's reporting queue of 32 would refuse
    # SET_VRING_NUM 128, and every check would fail on that instead of on the fault).
    sizes = {"queue_sizes": (VHOST_USER_VQ_SIZE,) * 5} if vhost_user else {}
    core = BalloonDevice(mem, DeviceConfig(offered_features=parse_features(features),
                                           qemu_cmd_id_read="qemu-cmd-id-read" in faults,
                                           **sizes))
    dev = FaultyDevice(core, mem, faults)
    holder: list[HostControl] = []
    server: Any
    if vhost_user:
        server = VhostUserServer(dev, mem, sock,  # type: ignore[arg-type]
                                 on_effects=lambda e: holder[0].on_effects(e))
    else:
        pci = VirtioPciFunction(dev)  # type: ignore[arg-type]
        server = VfioUserServer(sock, pci, mem, on_effects=lambda e: holder[0].on_effects(e))
    control = HostControl(dev, server.host_call, wall_clock, in_guest_ram=mem.contains,
                          extra_stats=server.stats)
    holder.append(control)
    return server, control


async def _main(server: Any, control: HostControl, ctl: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, ctl, control)
        await nursery.start(server.run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault", required=True, help="comma-separated: " + ", ".join(FAULTS))
    p.add_argument("--features", default=None)
    p.add_argument("--vhost-user", action="store_true", help="serve vhost-user, not vfio-user")
    p.add_argument("sock")
    p.add_argument("ctl")
    a = p.parse_args(argv)
    server, control = build(a.sock, {f.strip() for f in a.fault.split(",") if f.strip()},
                            a.features, a.vhost_user)
    try:
        trio.run(_main, server, control, a.ctl)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
