"""QEMU's own virtio-balloon as a peer of our guest driver: ``QemuBalloon``.

Theory of operation
-------------------
``QemuBalloon(qemu=None, ram_bytes=..., device=BalloonDeviceOptions(...))`` starts a
``QtestMachine`` with::

    -object iothread,id=io0
    -device virtio-balloon-pci,id=balloon0,disable-legacy=on,iothread=io0,free-page-hint=on,...

(the iothread is required by free-page-hint; ``disable-legacy=on`` makes it a modern-only
device, 1af4:1045, since our driver speaks only the modern interface), finds the device on
bus 0, and gives it a ``QtestVirtioPci`` transport (``transport``): hand that to
``guest_model`` (``SimGuest``/``BalloonDriver``) exactly as the in-process or vfio-user
transports. Guest RAM is ``mem`` (the machine's shared file).

The host side is QEMU's, reached through QMP and qtest; these calls play the part our control
socket plays for our device (``host(command, **args)`` takes ``balloon-hint ctl`` commands):

* ``set_target(pages)`` -> QMP ``balloon`` with ``value = RAM size - pages * 4 KiB`` (QEMU
  derives ``num_pages`` from the RAM size, reserved top included);
* ``request_stats()`` -> the device property ``guest-stats-polling-interval`` set to 0 then 1:
  QEMU then arms its stats timer (QEMU_CLOCK_VIRTUAL, which only qtest moves) to expire at
  once, so the held stats buffer is returned on the next main-loop turn, and never again
  unless asked (the re-armed timer waits for a ``clock_step``);
* ``guest_stats()`` -> QOM ``guest-stats`` (QEMU's names ``stat-free-memory`` ...; -1 = unset);
* ``hint_start()``: QEMU starts a hint round only from its migration code (the precopy
  notifier after a dirty-bitmap sync), so this starts a migration (cancelling a running one
  first, which publishes DONE) into a unix socket of ours, read and dropped by a thread: the
  first bitmap sync, at migration set-up, publishes a new command id. The round stays current
  until the first pass over RAM ends (the next sync publishes STOP and a new id, or, with
  nothing dirty, QEMU completes the migration, stops the VM and publishes DONE). To keep that
  pass long, ``max-bandwidth`` is set low (4 KiB/s; QEMU's rate limiting still lets about
  1.3 MB/s through on these machines, whatever the setting below that) and the top of the RAM
  file holds ``ballast_bytes`` of non-zero data no guest model owns (32 MiB: a first pass of
  about 25 s; QEMU sends a zero page in a few bytes, so a mostly zero guest alone would finish
  it in under a second). The stream must be read: QEMU writes it while holding the RAM bitmap
  lock that its hint handler (``qemu_guest_free_page_hint``) takes, so a stalled reader stalls
  hinting too. Returns the id (read from config space, or the last one seen if the driver
  already moved the device to START, where the field reads 0);
* ``hint_sync()`` (QEMU only, ``host("hint-sync")``): the migration runs unthrottled to its
  next dirty-bitmap sync (STOP, then a new id) and pauses before switchover, VM stopped;
* ``hint_done()`` -> QMP ``migrate_cancel``: the precopy CLEANUP notification publishes DONE
  (a migration paused before switchover is cancelled too, and the VM runs again);
* a host ``hint-stop`` does not exist in QEMU (STOP is published only just before a bitmap
  sync, and followed at once by a new id or DONE): ``host("hint-stop")`` raises
  ``HostUnsupported``.

While a hint round runs, QEMU's iothread polls the free page queue (it loops for the whole
round, virtio-balloon.c ``virtio_ballloon_get_free_page_hints``), so it keeps one host core
busy until STOP/DONE.

Queue numbering: QEMU creates inflate 0, deflate 1, stats 2 (it always offers STATS_VQ), then
free_page if offered, then reporting if offered, by *offered* features; our driver, like
Linux, counts *negotiated* ones. They agree as long as the driver accepts STATS_VQ (and
FREE_PAGE_HINT whenever REPORTING is used): docs/qemu-deviations.md.
"""
from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from protocol.balloon import CFG_FREE_PAGE_HINT_CMD_ID
from protocol.errors import EnvironmentFailure, UsageError
from protocol.virtio_pci import VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID
from vmsim.qtest.machine import PAGE, RESERVED_BYTES, QmpError, QtestMachine
from vmsim.qtest.pci import find_function
from vmsim.qtest.qemu import QemuBinary, find_qemu
from vmsim.qtest.virtio_pci import QtestVirtioPci

VIRTIO_ID_BALLOON = 5
DEVICE_ID = "balloon0"
QOM_PATH = f"/machine/peripheral/{DEVICE_ID}"
#: QEMU's first command id is this + 1 (it pre-increments; virtio-balloon.h CMD_ID_MIN).
QEMU_CMD_ID_MIN = 0x80000000
#: Bandwidth of the migration that carries a hint round (bytes/s; module docstring).
HINT_MIGRATION_BANDWIDTH = 4096
#: QEMU's largest migration downtime-limit (ms).
MAX_DOWNTIME_MS = 2_000_000
#: Non-zero RAM beyond the guest's that keeps that migration in its first pass (bytes).
BALLAST_BYTES = 32 << 20
_BALLAST_BYTE = 0xA5
#: QEMU's stat names -> protocol.md 3.5 tag names, as ``balloon-hint ctl stats`` shows them.
STAT_NAMES = {"stat-swap-in": "SWAP_IN", "stat-swap-out": "SWAP_OUT",
              "stat-major-faults": "MAJFLT", "stat-minor-faults": "MINFLT",
              "stat-free-memory": "MEMFREE", "stat-total-memory": "MEMTOT",
              "stat-available-memory": "AVAIL", "stat-disk-caches": "CACHES",
              "stat-htlb-pgalloc": "HTLB_PGALLOC", "stat-htlb-pgfail": "HTLB_PGFAIL"}


class HostUnsupported(EnvironmentFailure):
    """QEMU has no host request for this (the message says why)."""


class HostTimeout(EnvironmentFailure):
    """QEMU did not do what a host request asks within the timeout."""


def _onoff(b: bool) -> str:
    return "on" if b else "off"


@dataclass
class BalloonDeviceOptions:
    """Properties of QEMU's virtio-balloon-pci (defaults: QEMU's, but free-page-hint on)."""

    free_page_hint: bool = True
    free_page_reporting: bool = False
    deflate_on_oom: bool = False
    page_poison: bool = True
    event_idx: bool = True
    indirect_desc: bool = True
    packed: bool = False
    #: MSI-X vectors (QEMU's default for the balloon is 2: config + all queues shared).
    vectors: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def device_arg(self) -> str:
        props = [f"virtio-balloon-pci,id={DEVICE_ID}", "disable-legacy=on",
                 f"free-page-hint={_onoff(self.free_page_hint)}",
                 f"free-page-reporting={_onoff(self.free_page_reporting)}",
                 f"deflate-on-oom={_onoff(self.deflate_on_oom)}",
                 f"page-poison={_onoff(self.page_poison)}",
                 f"event_idx={_onoff(self.event_idx)}",
                 f"indirect_desc={_onoff(self.indirect_desc)}",
                 f"packed={_onoff(self.packed)}"]
        if self.free_page_hint:
            props.append("iothread=io0")
        if self.vectors is not None:
            props.append(f"vectors={self.vectors}")
        props += [f"{k}={v}" for k, v in self.extra.items()]
        return ",".join(props)


class QemuBalloon:
    """QEMU + its virtio-balloon-pci under qtest, with our transport and QEMU's host side."""

    def __init__(self, qemu: QemuBinary | str | None = None, *, ram_bytes: int = 64 << 20,
                 device: BalloonDeviceOptions | None = None, incoming: str | None = None,
                 ballast_bytes: int = BALLAST_BYTES, extra_args: tuple[str, ...] = (),
                 timeout: float = 10.0) -> None:
        q = qemu if isinstance(qemu, QemuBinary) else find_qemu(qemu)
        self.options = device or BalloonDeviceOptions()
        if ballast_bytes < 0 or ballast_bytes % (1 << 20):
            raise UsageError(f"ballast_bytes={ballast_bytes:#x}: must be a multiple of 1 MiB")
        self.machine = QtestMachine(q, ram_bytes=ram_bytes,
                                    reserved_bytes=RESERVED_BYTES + ballast_bytes,
                                    objects=["iothread,id=io0"],
                                    devices=[self.options.device_arg()], incoming=incoming,
                                    extra_args=extra_args, timeout=timeout)
        self._ballast_bytes = ballast_bytes
        self._ballast_filled = False
        self._sink: socket.socket | None = None
        self._sink_thread: threading.Thread | None = None
        self._sink_stop = threading.Event()
        self.sink_bytes = 0  # migration stream bytes read and dropped
        self.timeout = timeout
        try:
            fn = find_function(self.machine.qt, VIRTIO_PCI_VENDOR_ID,
                               VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BALLOON)
            self.transport = QtestVirtioPci(self.machine, fn)
        except BaseException:
            self.machine.close()
            raise
        self.mem = self.machine.mem

    def close(self) -> None:
        self._sink_stop.set()
        if self._sink_thread is not None:
            self._sink_thread.join(timeout=5)
            self._sink_thread = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self.machine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- balloon target and statistics ----------------------------------------------------------
    def set_target(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` 4 KiB pages in the balloon (``num_pages``)."""
        total = self.machine.total_bytes
        if not isinstance(pages, int) or not 0 <= pages < total // PAGE:
            raise UsageError(f"set-target pages={pages!r}: must be in 0..{total // PAGE - 1}")
        self.machine.qmp("balloon", value=total - pages * PAGE)

    def request_stats(self) -> None:
        """Have QEMU return the stats buffer it holds (see the module docstring)."""
        for interval in (0, 1):
            self.machine.qmp("qom-set", path=QOM_PATH,
                             property="guest-stats-polling-interval", value=interval)

    def guest_stats(self) -> dict[str, Any]:
        return dict(self.machine.qmp("qom-get", path=QOM_PATH, property="guest-stats"))

    # -- free page hinting (through QEMU's migration) -------------------------------------------
    def read_cmd_id(self) -> int:
        return int(struct.unpack("<I", self.transport.read_config(
            CFG_FREE_PAGE_HINT_CMD_ID, 4))[0])

    def migration_status(self) -> str:
        return str(self.machine.qmp("query-migrate").get("status", "none"))

    def _wait(self, cond: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not cond():
            if time.monotonic() > deadline:
                raise HostTimeout(f"QEMU: {what} did not happen within {self.timeout} s "
                                  f"(migration {self.migration_status()})")
            time.sleep(0.002)

    def _sink_uri(self) -> str:
        """A unix socket that swallows migration streams: a thread accepts and reads them, so
        QEMU's migration thread never blocks writing (it writes while holding the RAM bitmap
        lock that QEMU's hint handler needs: a stalled reader would stall hinting too)."""
        if self._sink is None:
            path = os.path.join(self.machine.tmpdir, "sink.sock")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(4)
            self._sink = s
            self._sink_thread = threading.Thread(target=self._drain_sink, daemon=True,
                                                 name="qemu-migration-sink")
            self._sink_thread.start()
        return f"unix:{self._sink.getsockname()}"

    def _drain_sink(self) -> None:
        assert self._sink is not None
        sel = selectors.DefaultSelector()
        self._sink.setblocking(False)
        sel.register(self._sink, selectors.EVENT_READ)
        try:
            while not self._sink_stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._sink:
                        try:
                            c, _ = self._sink.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ)
                        continue
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.sink_bytes += len(data)
                    else:  # end of stream
                        sel.unregister(sock)
                        sock.close()
        finally:
            for key in list(sel.get_map().values()):
                if key.fileobj is not self._sink:
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()

    def hint_start(self) -> int:
        """Publish a new command id (a migration starts; see the module docstring)."""
        if not self.options.free_page_hint:
            raise HostUnsupported("the device was started with free-page-hint=off")
        if self.migration_status() in ("setup", "active", "pre-switchover", "device"):
            self.hint_done()
        if self._ballast_bytes and not self._ballast_filled:
            # Written on first use, not at start-up: filling tmpfs pages costs ~0.2 s.
            ballast = self.machine.reserved_view()[RESERVED_BYTES:]
            np.frombuffer(ballast, dtype=np.uint8)[:] = _BALLAST_BYTE
            self._ballast_filled = True
        before = self.read_cmd_id()
        self.machine.qmp("migrate-set-parameters", **{
            "max-bandwidth": HINT_MIGRATION_BANDWIDTH, "downtime-limit": 300})
        # hint_sync lets the migration run to its end; it must then wait, not switch over.
        self.machine.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "pause-before-switchover", "state": True}])
        self.machine.qmp("migrate", uri=self._sink_uri())
        seen: list[int] = []

        def published() -> bool:
            v = self.read_cmd_id()
            seen.append(v)
            # A new id, or 0 after one: the driver already started the round (QEMU reads 0
            # in START, docs/qemu-deviations.md).
            return v >= 2 and v != before or (v == 0 and any(x >= 2 for x in seen))

        self._wait(published, "a new free_page_hint_cmd_id")
        v = seen[-1]
        return v if v >= 2 else max(x for x in seen if x >= 2)

    def hint_sync(self) -> int:
        """Let the hint round's migration reach its next dirty-bitmap sync, where QEMU cannot
        use hints: its precopy notifier publishes STOP, then a new id (each with a config
        notification). The migration is unthrottled and given QEMU's largest downtime limit
        (2000 s), so that what is left to send is at once under its switchover threshold: it
        syncs once (exactly one STOP and one new id), then stops before switchover
        (``pause-before-switchover``, set by ``hint_start``) with the VM stopped, until
        ``hint_done`` cancels it and the VM runs again. (With a small limit QEMU syncs again
        every iteration of its pass's tail: hundreds of ids.) Returns the id published last."""
        if self.migration_status() not in ("setup", "active"):
            raise UsageError("hint-sync: no hint round's migration is running (hint-start "
                             "first)")
        self.machine.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                                      "downtime-limit": MAX_DOWNTIME_MS})
        self._wait(lambda: self.migration_status() == "pre-switchover",
                   "the migration's end of pass (pre-switchover)")
        return self.read_cmd_id()

    def hint_done(self) -> None:
        """End the migration; QEMU publishes DONE (1)."""
        st = self.migration_status()
        if st in ("none", "cancelled", "completed", "failed"):
            return
        try:
            self.machine.qmp("migrate_cancel")
        except QmpError:
            pass  # it ended on its own meanwhile
        self._wait(lambda: self.migration_status() in ("cancelled", "failed", "completed"),
                   "migrate_cancel")
        if self.options.free_page_hint:
            self._wait(lambda: self.read_cmd_id() == 1, "DONE after the migration ended")

    # -- the control-socket view ----------------------------------------------------------------
    def host(self, command: str, **args: Any) -> dict[str, Any]:
        """``balloon-hint ctl`` commands against QEMU: ``hint-start`` (-> ``cmd-id``),
        ``hint-done``, ``set-target`` (``pages``), ``request-stats``, ``stats`` (->
        ``guest_stats`` by protocol.md tag name, unset ones left out, and QEMU's raw
        ``qemu_guest_stats``). ``hint-stop`` raises ``HostUnsupported``."""
        if command == "hint-start":
            return {"cmd-id": self.hint_start()}
        if command == "hint-done":
            self.hint_done()
            return {}
        if command == "hint-sync":
            return {"cmd-id": self.hint_sync()}
        if command == "hint-stop":
            raise HostUnsupported(
                "QEMU has no host request that publishes STOP: it publishes STOP only just "
                "before a dirty-bitmap sync of a running migration, followed at once by a new "
                "command id (or DONE)")
        if command == "set-target":
            self.set_target(int(args.get("pages", 0)))
            return {}
        if command == "request-stats":
            self.request_stats()
            return {}
        if command == "stats":
            raw = self.guest_stats()
            stats = raw.get("stats", {})
            named = {STAT_NAMES[k]: v for k, v in stats.items()
                     if k in STAT_NAMES and v != 2**64 - 1 and v != -1}
            return {"guest_stats": named, "qemu_guest_stats": raw}
        raise UsageError(f"QEMU host: unknown command {command!r}")
