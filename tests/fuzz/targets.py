"""Fuzz targets: one function per input surface, ``target(data: bytes) -> None``.

Each target turns arbitrary bytes into input for one surface, feeds it through the surface's
real entry point and checks the invariant of issue 15 item 9:

* every input is handled or refused with the error type of whoever is at fault (the guest's
  ring contents: a counted guest fault, never an exception out of ``notify``; a peer's message:
  an error reply; a scenario file: ``ScenarioError``, a ``UsageError``, on one line naming the
  file); nothing else escapes and no internal error is logged;
* no access outside guest memory (the device asks only for views inside a region, and writes
  only where the device may: used rings, packed descriptors' used fields, event areas);
* effects stay inside guest RAM (hinted and reported ranges, inflated and deflated pfns);
* fds come back: a target that hands fds over checks, when its session is closed, that the
  process holds no more fds than before (``engine`` also checks the count around every input).

A target raises ``AssertionError`` (or lets the unexpected exception through) when the invariant
breaks; the engine (``tests.fuzz.engine``, atheris's libFuzzer) then keeps the input as a crash.
Inputs are small records read by ``Reader`` so that mutations stay meaningful: a byte picks the
operation, the next ones its arguments.

The targets are written against the surfaces' entry points (``BalloonDevice``,
``vmsim.scenario.loads``, the control line handler, the vfio-user and vhost-user sessions) and
build everything per input, so inputs are independent and a crash replays alone.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

TARGETS: dict[str, Callable[[bytes], None]] = {}


def target(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
    TARGETS[fn.__name__] = fn
    return fn


class Reader:
    """Arguments read off the input; past its end every read returns zeros (so a short input
    is still a whole program)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.bytes(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.bytes(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.bytes(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.bytes(8))[0])


class ErrorLogs(logging.Handler):
    """Collects ERROR records (``log.exception`` of an internal error) of the project's
    loggers: a surface that caught an unexpected exception and logged it still broke."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ErrorLogs:
        for name in ("balloon_dev", "protocol", "guestmem", "vmsim"):
            lg = logging.getLogger(name)
            lg.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("balloon_dev", "protocol", "guestmem", "vmsim"):
            logging.getLogger(name).removeHandler(self)
        if self.records and exc[0] is None:
            r = self.records[0]
            raise AssertionError(f"internal error logged: {r.name}: {r.getMessage()[:300]}"
                                 + (f"\n{logging.Formatter().formatException(r.exc_info)}"
                                    if r.exc_info else ""))


# -- scenario TOML ----------------------------------------------------------------------------
@target
def scenario_toml(data: bytes) -> None:
    """``vmsim.scenario.loads``: a ``ScenarioError`` on one line naming the file, or a scenario
    inside every limit the loader promises."""
    from protocol.errors import UsageError
    from vmsim import scenario as sc

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # still text: the parser must refuse it or take it
    try:
        s = sc.loads(text, "fuzz.toml")
    except sc.ScenarioError as e:
        msg = str(e)
        assert isinstance(e, UsageError)
        assert msg.startswith("fuzz.toml"), msg[:200]
        assert "\n" not in msg and "\r" not in msg, msg[:200]
        assert len(msg) < 1000, len(msg)
        return
    g = s.guest
    assert 64 << 20 <= g.ram_bytes <= sc.MAX_GUEST_RAM and g.ram_bytes % 4096 == 0
    assert 0 <= g.seed < 2**64
    assert g.ram_bytes / s.migration.bandwidth_Bps <= sc.MAX_FIRST_ROUND_S
    assert s.migration.bandwidth_Bps > 0 and s.migration.downtime_limit_s > 0
    for w in s.workloads:
        assert w.kind in sc.WORKLOAD_KINDS
        rate = w.params.get("rate")
        if rate is not None:
            assert 0 < rate <= min(sc.MAX_WORKLOAD_RATE, sc.MAX_RATE_PER_RAM * g.ram_bytes)
        if w.kind == "idle":
            assert w.params["duration"] <= sc.MAX_TIME_LIMIT_S
        if "size" in w.params:
            assert 0 <= w.params["size"] <= g.ram_bytes


# -- control socket JSON ----------------------------------------------------------------------
def _control() -> tuple[Any, Any]:
    from balloon_dev.control import HostControl
    from balloon_dev.device import BalloonDevice
    from balloon_dev.device_config import DeviceConfig
    from guestmem import GuestMemory

    mem = GuestMemory()
    mem.add_region(0, bytearray(1 << 16), "ram")
    dev = BalloonDevice(mem, DeviceConfig(ram_pages=16))
    return dev, HostControl(dev, lambda fn: list(fn(dev)), lambda: 0.0,
                            in_guest_ram=mem.contains)


@target
def control_json(data: bytes) -> None:
    """The control socket's line handler: each line gets one JSON object with ``return`` or
    ``error`` (and the request's ``id``), never an internal error."""
    import json

    from balloon_dev.transport.control_server import _control_reply

    _dev, hc = _control()
    with ErrorLogs():
        for line in data.split(b"\n")[:16]:
            if not line.strip():
                continue
            out = _control_reply(hc, line)
            assert out.endswith(b"\n") and out.count(b"\n") == 1, out[:200]
            reply = json.loads(out)
            assert isinstance(reply, dict) and ("return" in reply) != ("error" in reply), reply


# -- rings: the device core fed arbitrary guest memory ----------------------------------------
RING_RAM = 1 << 16            # byte-backed guest RAM at gpa 0
RING_RAM_PAGES = 64           # the device is told RAM is 256 KiB: 48 pages of it have no bytes
WINDOW = 0x4000               # where the fuzzer writes: rings (0x1000-0x2400) and buffers
RING_BASE, RING_STRIDE, QSIZE = 0x1000, 0x400, 8


class WatchedMemory:
    """Guest memory that records every view the device asks for outside its regions (guest
    memory refuses it with ``GuestMemoryError``), and every writable view outside the places a
    device may write."""

    def __init__(self) -> None:
        from guestmem import GuestMemory

        class Watched(GuestMemory):
            def view(inner, gpa: int, length: int, *, writable: bool = False) -> Any:
                if not inner.contains(gpa, length):
                    self.outside.append((gpa, length))
                elif writable and not any(a <= gpa and gpa + length <= a + n
                                          for a, n in self.writable):
                    self.bad_writes.append((gpa, length))
                return super().view(gpa, length, writable=writable)

        self.mem = Watched()
        self.ram = bytearray(RING_RAM)
        self.mem.add_region(0, self.ram, "ram")
        self.outside: list[tuple[int, int]] = []
        self.bad_writes: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []


def _ring_device(packed: bool) -> tuple[Any, WatchedMemory, Callable[[int], list[Any]]]:
    from balloon_dev.device import BalloonDevice
    from balloon_dev.device_config import DEFAULT_OFFERED_FEATURES, DeviceConfig
    from protocol.balloon import (
        CFG_POISON_VAL,
        VIRTIO_BALLOON_F_PAGE_POISON,
        VIRTIO_BALLOON_F_REPORTING,
    )
    from protocol.virtio import VIRTIO_F_RING_PACKED, DeviceStatus, feature_mask

    w = WatchedMemory()
    offered = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING)
    if packed:
        offered |= feature_mask(VIRTIO_F_RING_PACKED)
    dev = BalloonDevice(w.mem, DeviceConfig(offered_features=offered, ram_pages=RING_RAM_PAGES,
                                            queue_sizes=(QSIZE,) * 5))
    ack, drv = int(DeviceStatus.ACKNOWLEDGE), int(DeviceStatus.DRIVER)
    fok, dok = int(DeviceStatus.FEATURES_OK), int(DeviceStatus.DRIVER_OK)

    def init(features_mask: int) -> list[Any]:
        out = list(dev.write_status(0))
        dev.write_status(ack)
        dev.write_status(ack | drv)
        dev.write_driver_features(dev.device_features & ~features_mask)
        dev.write_status(ack | drv | fok)
        w.writable.clear()
        is_packed = dev.negotiated(VIRTIO_F_RING_PACKED)  # the input may have masked it off
        for q in range(dev.num_queues):
            base = RING_BASE + RING_STRIDE * q
            if is_packed:
                desc, driver, device = base, base + 16 * QSIZE, base + 16 * QSIZE + 4
                # the device writes used descriptors (id, len, flags) and its event area
                w.writable += [(desc, 16 * QSIZE), (device, 4)]
            else:
                desc, driver, device = base, base + 16 * QSIZE, base + 0x100
                w.writable.append((device, 6 + 8 * QSIZE))
            try:
                dev.set_queue(q, QSIZE, desc, driver, device)
                dev.enable_queue(q)
            except Exception as e:  # noqa: BLE001 - a usage error of ours, not the guest's
                if not _is_usage_error(e):
                    raise
        if dev.negotiated(VIRTIO_BALLOON_F_PAGE_POISON):  # DR-12: before DRIVER_OK
            out += dev.write_config(CFG_POISON_VAL, struct.pack("<I", 0xAA))
        out += dev.write_status(ack | drv | fok | dok)
        return out

    return dev, w, init


def _is_usage_error(e: BaseException) -> bool:
    from protocol.errors import UsageError
    return isinstance(e, UsageError)


def _check_effects(effects: list[Any]) -> None:
    from balloon_dev.effects import Deflated, Inflated, PagesHinted, PagesReported

    ram = RING_RAM_PAGES * 4096
    for e in effects:
        if isinstance(e, (PagesHinted, PagesReported)):
            for gpa, n in e.ranges:
                assert 0 <= gpa and n > 0 and gpa + n <= ram, (type(e).__name__, hex(gpa), n)
        elif isinstance(e, (Inflated, Deflated)):
            for pfn in e.pfns:
                assert 0 <= pfn < RING_RAM_PAGES, (type(e).__name__, pfn)


def _ring_program(data: bytes, packed: bool) -> None:
    from balloon_dev.effects import PrecopyEvent

    dev, w, init = _ring_device(packed)
    r = Reader(data)
    effects: list[Any] = init(0)
    events = list(PrecopyEvent)
    with ErrorLogs():
        steps = 0
        while r.more() and steps < 64:
            steps += 1
            faults = sum(dev.counters.values())
            op = r.u8() % 8
            if op in (0, 1):  # guest writes ring or buffer bytes (most inputs are these)
                off = r.u16() % WINDOW
                n = min(r.u8() % 48, WINDOW - off)
                w.ram[off:off + n] = r.bytes(n)
            elif op == 2:
                effects += dev.notify(r.u8() % dev.num_queues)
            elif op == 3:
                sub = r.u8() % 7
                if sub == 0:
                    effects += dev.free_page_start()
                elif sub == 1:
                    effects += dev.free_page_stop()
                elif sub == 2:
                    effects += dev.free_page_done()
                elif sub == 3:
                    effects += dev.set_target(r.u32())
                elif sub == 4:
                    effects += dev.request_stats()
                else:
                    effects += dev.precopy_notify(events[r.u8() % len(events)], bool(sub & 1))
            elif op == 4:
                off = r.u8() % (dev.config_size + 4)
                effects += dev.write_config(off, r.bytes(1 + r.u8() % 4))
            elif op == 5:
                dev.read_config(r.u8() % (dev.config_size + 4), 1 + r.u8() % 8)
            elif op == 6:
                effects += dev.write_status(r.u8())
            else:
                effects += init(r.u64())
            # A buffer in RAM the device was told of but that has no bytes (or that vanished)
            # is refused by guest memory's own bounds check at the moment of use; the device
            # must then count the guest's fault, not carry on as if it had read something.
            if w.outside:
                assert sum(dev.counters.values()) > faults, (
                    f"device asked for memory outside RAM without counting a fault: "
                    f"{w.outside[:3]}")
                w.outside.clear()
            assert not w.bad_writes, f"device wrote outside the used areas: {w.bad_writes[:3]}"
            _check_effects(effects)
            effects = []


@target
def split_ring(data: bytes) -> None:
    """The device core over split rings (indirect tables and event index offered): any guest
    memory contents, notifications, host requests, config and status writes."""
    _ring_program(data, packed=False)


@target
def packed_ring(data: bytes) -> None:
    """The same over packed rings (RING_PACKED negotiated unless the input masks it off)."""
    _ring_program(data, packed=True)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# The socket peers' targets live apart (they build fds and sessions); importing them here
# registers them in TARGETS.
from tests.fuzz import peer_targets  # noqa: E402,F401
