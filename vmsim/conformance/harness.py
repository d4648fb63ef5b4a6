"""Driver-side harness for checking a virtio-balloon device (vmsim/conformance/checks).

The device is reached through ``vmsim.vfio_user_client.VfioUserClient`` or
``vmsim.vhost_user_client.VhostUserClient`` (QEMU's role); nothing here imports ``balloon_dev``:
the device under test is a peer seen only through its socket, guest memory, config bytes and
interrupts. The ``qemu`` target is QEMU's own virtio-balloon-pci: each check starts a fresh QEMU
under qtest (``vmsim.qtest.QemuBalloon``, ~0.1 s; ``QEMU_DEVICE``: every feature QEMU can
offer) and drives it through ``QtestVirtioPci``; its host requests go to that QEMU (QMP and its
migration, ``QemuBalloon.host``), and one QEMU has no equivalent for (``hint-stop``) skips the
check with QEMU's reason.

Two ways to drive it:

* ``RawGuest``: the virtio initialisation one step at a time (protocol.md 2.3) with rings
  written by hand (``vmsim.conformance.rings.RawRing``), so a check can kick before DRIVER_OK, post
  chains no correct driver would, and read every used element;
* ``DriverGuest``: our real guest (``guest_model.guest.SimGuest``: buddy allocator + balloon
  driver) over the client; ``pump(cond)`` delivers interrupts and runs the driver's events
  until ``cond()`` holds or a wall-clock timeout passes.

Host requests (start a hint round, set a target, ask for stats) need the target's host-control
socket, which speaks balloon-hint's line-delimited JSON (``balloon-hint ctl``), or QEMU's own
host side. Checks that need it are skipped, and reported NOT COVERED, when the target has none.

Where the spec leaves a choice and a target takes one protocol.md does not prefer, a check may
verify exactly that documented behaviour and say so with ``note(text)`` (``qemu_behaviour``
for QEMU): the text is shown after the id's PASS.

``Canary`` fills guest RAM outside the driver area with a per-page pattern and later lists the
pages that changed: the device may only change pages the spec lets it change.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guest_model.guest import GuestOptions, SimGuest
from guestmem import GuestMemory, PageVersions
from guestmem.clock import Scheduler, SimClock
from protocol.balloon import VIRTIO_BALLOON_F_PAGE_POISON, BalloonQueue, queue_layout
from protocol.errors import EnvironmentFailure
from protocol.virtio import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_EVENT_IDX,
    DeviceStatus,
    feature_mask,
)
from protocol.virtqueue import used_ring_size
from vmsim.client_base import DeviceFault
from vmsim.cmd_ctl import call as ctl_call
from vmsim.conformance.report import NOTE_PROPERTY
from vmsim.conformance.rings import RawRing
from vmsim.qtest.balloon import BalloonDeviceOptions, HostUnsupported, QemuBalloon
from vmsim.qtest.virtio_pci import QtestVirtioPci
from vmsim.vfio_user_client import VfioUserClient
from vmsim.vhost_user_client import VhostUserClient

#: Any front-end: all implement VirtioTransport plus the same interrupt helpers.
Client = VfioUserClient | VhostUserClient | QtestVirtioPci

#: QEMU's device for the qemu target: every feature it can offer (it has no MUST_TELL_HOST;
#: STATS_VQ it always offers), so that every check QEMU can take runs.
QEMU_DEVICE = BalloonDeviceOptions(free_page_hint=True, free_page_reporting=True,
                                   deflate_on_oom=True, page_poison=True)
#: The QEMU of the running check: host requests of the qemu target go to it.
_qemu_peer: QemuBalloon | None = None
#: The running check (set by the checks' autouse fixture), for ``note``.
_current_item: Any = None
#: Where QEMU's behaviours the spec leaves open are described.
QEMU_DEVIATIONS = "docs/qemu-deviations.md"


def note(text: str) -> None:
    """Say ``text`` with the running check's verdict (printed after its id's PASS): for a
    choice the spec leaves open, where the check verified exactly the target's documented
    behaviour instead of protocol.md's preference."""
    if _current_item is not None:
        _current_item.user_properties.append((NOTE_PROPERTY, text))

#: What our own server offers when it is the target: everything, so that every check runs.
ALL_FEATURES = ("MUST_TELL_HOST,STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,REPORTING,RING_EVENT_IDX,"
                "RING_INDIRECT_DESC")
RAM_BYTES = 64 << 20
PAGE = 4096
DRIVER_AREA = (0x100000, 4 << 20)  # as vmsim lays a VM out (docs/interfaces.md)
RING_BASE = DRIVER_AREA[0]
#: Buffers a RawGuest writes (pfn lists, stats, control words) live here, inside the area.
SCRATCH = DRIVER_AREA[0] + (3 << 20)
#: How long a check waits for the device to do what it must (wall clock, seconds).
WAIT = 3.0
#: How long a check waits to be reasonably sure the device did *not* do something.
QUIET = 0.3

ACK, DRV, FOK, DOK = (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER, DeviceStatus.FEATURES_OK,
                      DeviceStatus.DRIVER_OK)
NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET


def pfn_bytes(*pfns: int) -> bytes:
    """An inflate/deflate buffer: the pfns as little-endian u32s (protocol.md 3.4)."""
    return struct.pack(f"<{len(pfns)}I", *pfns)


class HostError(EnvironmentFailure):
    """The target's control socket answered with an error (the device under test, outside
    balloon-hint, refused a host command)."""


@dataclass(frozen=True)
class Target:
    kind: str  # "vfio-user", "vhost-user" or "qemu" (path: its binary, "" for the lab's)
    path: str
    control: str | None = None

    @property
    def has_host(self) -> bool:
        """Host requests can be made (a control socket, or QEMU's own host side)."""
        return self.kind == "qemu" or self.control is not None

    def host(self, command: str, **arguments: Any) -> dict[str, Any]:
        if self.kind == "qemu":
            if _qemu_peer is None:
                raise HostError(f"{command}: no QEMU is running (connect first)")
            try:
                return _qemu_peer.host(command, **arguments)
            except HostUnsupported as e:
                pytest.skip(f"QEMU: {e}")
        if self.control is None:
            pytest.skip("the target has no host-control socket (pass --target-control)")
        ans = ctl_call(self.control, command, arguments or None)
        if "error" in ans:
            raise HostError(f"{command}: {ans['error']}")
        return dict(ans.get("return", {}))

    def require_host(self) -> None:
        if not self.has_host:
            pytest.skip("needs host requests: the target has no host-control socket "
                        "(pass --target-control)")


def qemu_behaviour(target: Target, what: str) -> None:
    """Note a documented QEMU behaviour (``QEMU_DEVIATIONS``) seen on a qemu target."""
    assert target.kind == "qemu"
    note(f"documented QEMU behaviour ({QEMU_DEVIATIONS}): {what}")


def connect_qemu(target: Target) -> QtestVirtioPci:
    """A fresh QEMU for one check (``target.path``: its binary, or empty for the lab's);
    closing the transport stops it."""
    global _qemu_peer
    if _qemu_peer is not None:
        _qemu_peer.close()
    peer = QemuBalloon(target.path or None, ram_bytes=RAM_BYTES, device=QEMU_DEVICE)
    _qemu_peer = peer

    def stop() -> None:
        global _qemu_peer
        peer.close()
        if _qemu_peer is peer:
            _qemu_peer = None
    peer.transport.on_close = stop
    return peer.transport


def connect(target: Target) -> Client:
    """A connected client. A server that serves one client at a time may refuse us while it
    is still noticing that the previous check's client left; that is retried for a while."""
    if target.kind == "qemu":
        return connect_qemu(target)
    deadline = time.monotonic() + WAIT
    while True:
        c: Client
        if target.kind == "vhost-user":
            c = VhostUserClient(target.path, ram_bytes=RAM_BYTES, timeout=WAIT)
        else:
            c = VfioUserClient(target.path, ram_bytes=RAM_BYTES, timeout=WAIT)
        try:
            c.connect()
            return c
        except DeviceFault as e:
            if getattr(e, "errno", None) is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def wait_for(cond: Callable[[], bool], timeout: float = WAIT,
             client: Client | None = None) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if client is not None:
            client.wait_interrupt(min(left, 0.01))
        else:
            time.sleep(min(left, 0.005))


def wait_irq(client: Client, vector: int, baseline: int, timeout: float = WAIT) -> bool:
    """Wait until ``vector`` has been signalled more than ``baseline`` times in all."""
    def fired() -> bool:
        client.wait_interrupt(0.01)
        client.discard_interrupts()
        return client.irq_counts[vector] > baseline
    return wait_for(fired, timeout)


class Canary:
    """A per-page pattern over guest RAM outside the driver area (or over given ranges)."""

    def __init__(self, mem: GuestMemory, ranges: Iterable[tuple[int, int]] | None = None,
                 seed: int = 1) -> None:
        self.mem = mem
        if ranges is None:
            a, n = DRIVER_AREA
            ranges = [(0, a), (a + n, RAM_BYTES - a - n)]
        self.ranges = [(g, n) for g, n in ranges if n > 0]
        self.seed = seed
        for g, n in self.ranges:
            self.rewrite(g, n)

    def pattern(self, gpa: int, n: int) -> np.ndarray:
        # Every 8-byte word holds its own address xor the seed: any change shows, and a page
        # copied elsewhere does not match either.
        words = np.arange(gpa, gpa + n, 8, dtype=np.uint64)
        return words ^ np.uint64(self.seed * 0x9E3779B97F4A7C15 & (2**64 - 1))

    def rewrite(self, gpa: int, n: int) -> None:
        view = np.frombuffer(self.mem.view(gpa, n, writable=True), dtype=np.uint8)
        view[:] = self.pattern(gpa, n).view(np.uint8)

    def changed_pages(self, skip: Iterable[tuple[int, int]] = ()) -> list[int]:
        """Page numbers inside the canary ranges whose bytes differ, except ``skip`` ranges."""
        out: list[int] = []
        skip_pages: set[int] = set()
        for g, n in skip:
            skip_pages.update(range(g // PAGE, (g + n + PAGE - 1) // PAGE))
        for g, n in self.ranges:
            have = np.frombuffer(self.mem.view(g, n), dtype=np.uint64)
            bad = np.nonzero((have != self.pattern(g, n)).reshape(-1, PAGE // 8).any(axis=1))[0]
            out.extend(int(p) + g // PAGE for p in bad if int(p) + g // PAGE not in skip_pages)
        return out


class RawGuest:
    """Hand-driven initialisation and hand-written rings (see the module docstring)."""

    def __init__(self, client: Client) -> None:
        self.c = client
        self.mem = client.mem
        self.rings: dict[BalloonQueue, RawRing] = {}
        self.index: dict[BalloonQueue, int] = {}
        self.features = 0
        self.offered = 0
        self._scratch = SCRATCH
        self.seen_used: dict[BalloonQueue, int] = {}

    # -- initialisation ---------------------------------------------------------------------
    def negotiate(self, accept: int | None = None, *, drop: int = 0) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features; True if FEATURES_OK stuck. By default
        everything offered is accepted except EVENT_IDX and ACCESS_PLATFORM (``drop`` removes
        more): without EVENT_IDX every used buffer interrupts and every kick counts, so a
        check never waits on suppression; ACCESS_PLATFORM Linux never takes (protocol.md
        2.1)."""
        c = self.c
        c.reset()
        c.set_status(ACK)
        c.set_status(ACK | DRV)
        self.offered = c.get_device_features()
        want = self.offered if accept is None else accept
        self.features = want & ~(drop | feature_mask(VIRTIO_F_RING_EVENT_IDX,
                                                     VIRTIO_F_ACCESS_PLATFORM))
        c.set_driver_features(self.features)
        c.set_status(ACK | DRV | FOK)
        return bool(c.get_status() & FOK)

    def setup_queues(self) -> None:
        self.index = queue_layout(self.features)
        base = RING_BASE
        for q, idx in sorted(self.index.items(), key=lambda kv: kv[1]):
            size = self.c.queue_max_size(idx)
            assert size > 0, f"queue {idx} ({q.name}) reads size 0"
            r = RawRing.layout(self.mem, base, size)
            for g, n in ((r.desc, r.device + used_ring_size(size) - r.desc),):
                self.mem.fill(g, n, 0)
            self.c.setup_queue(idx, size, r.desc, r.driver, r.device)
            self.c.enable_queue(idx)
            self.rings[q] = r
            self.seen_used[q] = 0
            base = (r.device + used_ring_size(size) + 4095) & ~4095

    def start(self, *, drop: int = 0, driver_ok: bool = True, poison: int | None = None) -> None:
        """Initialise with every queue on raw rings; with PAGE_POISON negotiated ``poison_val``
        is written (Linux's pattern unless ``poison`` says otherwise), as DR-12 asks."""
        assert self.negotiate(drop=drop), f"FEATURES_OK refused for {self.features:#x}"
        self.setup_queues()
        if self.features >> VIRTIO_BALLOON_F_PAGE_POISON & 1 and poison is None:
            poison = 0xAAAAAAAA
        if poison is not None:
            self.c.write_config(0xC, poison.to_bytes(4, "little"))
        if driver_ok:
            self.driver_ok()

    def driver_ok(self) -> None:
        self.c.set_status(ACK | DRV | FOK | DOK)

    # -- buffers ----------------------------------------------------------------------------
    def buf(self, data: bytes | int) -> tuple[int, int]:
        """Scratch bytes in the driver area: ``data`` written, or ``data`` zero bytes."""
        n = data if isinstance(data, int) else len(data)
        g = self._scratch
        self._scratch = (g + max(n, 1) + 63) & ~63
        assert self._scratch <= DRIVER_AREA[0] + DRIVER_AREA[1], "scratch area exhausted"
        if not isinstance(data, int):
            self.mem.write(g, data)
        return g, n

    def post(self, q: BalloonQueue, bufs: list[tuple[int, int, int]], *, head: int = 0,
             kick: bool = True) -> int:
        """Write ``(addr, len, flags)`` as a chain at descriptor ``head`` and publish it."""
        r = self.rings[q]
        h = r.chain(bufs, start=head)
        r.publish(h)
        if kick:
            self.kick(q)
        return h

    def kick(self, q: BalloonQueue) -> None:
        self.c.notify(self.index[q])

    def used_idx(self, q: BalloonQueue) -> int:
        return self.rings[q].used_idx()

    def wait_used(self, q: BalloonQueue, n: int = 1,
                  timeout: float = WAIT) -> list[tuple[int, int]]:
        """Wait until ``n`` more used elements than last time appeared; return the new ones."""
        r = self.rings[q]
        first = self.seen_used[q]
        wait_for(lambda: (r.used_idx() - first) & 0xFFFF >= n, timeout, self.c)
        got = (r.used_idx() - first) & 0xFFFF
        self.seen_used[q] = (first + got) & 0xFFFF
        return r.used_elems(first, got)

    def status(self) -> int:
        return self.c.get_status()

    def used_areas(self) -> list[tuple[int, int]]:
        return [r.used_area for r in self.rings.values()]


class DriverGuest:
    """Our guest (allocator + balloon driver) probed over the client."""

    def __init__(self, client: Client, **driver: Any) -> None:
        self.c = client
        self.sched = Scheduler(SimClock(0.0))
        self.pages = PageVersions(RAM_BYTES // PAGE)
        self.g = SimGuest(client.mem, self.pages, self.sched, client,
                          GuestOptions(ram_bytes=RAM_BYTES, driver_area=DRIVER_AREA,
                                       driver=driver))
        self.driver = self.g.driver

    def pump(self, until: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Deliver interrupts and run the driver's work until ``until()`` (True) or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.c.poll_interrupts()
            self.sched.run_until(self.sched.now + 1e-3)
            if until():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not self.sched.peek_time():
                self.c.wait_interrupt(min(left, 0.005))

    def settle(self, seconds: float = QUIET) -> None:
        """Let the device and the driver run for a while (for "nothing must happen" checks)."""
        self.pump(lambda: False, seconds)


class ServerStartError(EnvironmentFailure, RuntimeError):
    """A device server started for the checks exited, or did not make its socket in time."""


def start_server(argv: list[str], sock: str, ctl: str | None, timeout: float = 20.0,
                 cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
    """Start a device server ``argv`` (in folder ``cwd``: a ``python -m`` of a module outside
    the installed packages needs its checkout there) and wait until its sockets exist and the
    control socket (if any) accepts connections. Its log goes to a temporary file, not a pipe: a
    server that logs every guest error at warning would block once a pipe nobody reads filled
    up."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=None if cwd is None else str(cwd),
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout

    def ready() -> bool:
        if not os.path.exists(sock) or (ctl is not None and not os.path.exists(ctl)):
            return False
        if ctl is None:
            return True
        # The file exists from bind(); connections are taken only after listen().
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(ctl)
            except OSError:
                return False
        return True

    while not ready():
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            log.close()
            raise ServerStartError(f"device server exited with {proc.returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            raise ServerStartError(f"device server did not create {sock} within {timeout} s")
        time.sleep(0.02)
    log.close()  # the child keeps its own descriptor
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
