"""A QEMU machine with no guest CPU running, driven over qtest: ``QtestMachine``.

Theory of operation
-------------------
``QtestMachine(qemu, ram_bytes, devices=..., ...)`` starts::

    qemu -accel qtest -qtest unix:T -qtest-log none -qmp unix:Q -nodefaults -display none
         -M q35,memory-backend=mem -m RAM
         -object memory-backend-file,id=mem,size=RAM,mem-path=DIR/ram,share=on
         [-object iothread,id=io0 ...] [-device ...] [-incoming URI]

in a private temporary folder on a tmpfs (``/dev/shm`` when there is one): we listen on the
qtest and QMP sockets, QEMU connects to both as it starts (so no polling for a socket file),
then the QMP greeting is read and ``qmp_capabilities`` sent. Start-up takes ~60 ms on these
machines; ``start_seconds`` keeps the measured time.

*Guest RAM is the shared file*, mapped here (``MAP_SHARED``) and exposed as a
``guestmem.GuestMemory`` (``mem``) with q35's layout: RAM below 4 GiB is
``[0, min(RAM, lowmem))`` with lowmem 0xB0000000 (0x80000000 when RAM >= 0xB0000000), the rest
at 4 GiB (``ram_ranges``). So rings and pages the guest model writes through ``mem`` are in
QEMU's RAM, and what QEMU's device writes (used rings, MSI messages) shows up in ``mem`` at
once. The top ``reserved_bytes`` of the file are not part of ``mem``: they are guest RAM no
guest model owns (as firmware-reserved memory would be), where the virtio transport routes its
MSI-X messages (``reserved_gpa``).

*Two write paths.* Writes through the mapping are cheap but invisible to QEMU's dirty bitmaps,
which only record writes made by QEMU itself (devices, and qtest's ``write``/``b64write``/
``memset``, which go through the guest CPU's address space). While a migration runs, every
byte the guest changes must be written through qtest, or the destination may miss it:
``write(gpa, data)``, ``fill(gpa, n, byte)``, and ``rewrite(gpa, n)`` (sends the bytes already
in the mapping again, so QEMU marks those pages dirty). ``WriteThrough`` does that for a
``GuestMemory``: set as its ``dirty_log``, every range the guest model marks dirty is queued
and ``flush()`` rewrites the queued ranges (merged, one ``b64write`` pipeline). Outside a
migration the mapping is enough. Note that q35 routes ``[0xA0000, 0x100000)`` (legacy VGA
window, option ROM and BIOS areas) away from RAM: qtest writes there do not reach the file.

QMP: ``qmp(command, **args)`` returns the ``return`` value (``QmpError`` for an error reply);
events are kept in ``qmp_events``. ``close()`` (or leaving the ``with`` block) kills QEMU, unmaps
the file and removes the folder; a finalizer does the same if the object is dropped.
"""
from __future__ import annotations

import logging
import mmap
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from guestmem import GuestMemory
from protocol.errors import EnvironmentFailure, UsageError
from vmsim.qmp import QmpClient, kill_and_remove
from vmsim.qmp import QmpError as QmpError  # callers catch vmsim.qtest.machine.QmpError
from vmsim.qtest.qemu import QemuBinary, find_qemu
from vmsim.qtest.wire import QtestConnection

log = logging.getLogger(__name__)

PAGE = 4096
GIB = 1 << 30
#: q35's RAM split (hw/i386/pc_q35.c): below 4 GiB up to 0xB0000000, or 2 GiB when the RAM
#: reaches 0xB0000000; the rest starts at 4 GiB.
Q35_LOWMEM = 0xB0000000
Q35_LOWMEM_BIG = 0x80000000
FOUR_GIB = 1 << 32
#: Where qtest writes do not reach RAM on q35 (VGA window, option ROMs, BIOS).
LEGACY_HOLE = (0xA0000, 0x100000)
#: Default RAM reserved at the top of the file for the transport's MSI-X mailboxes.
RESERVED_BYTES = 1 << 20


class QemuStartError(EnvironmentFailure):
    """QEMU did not start (its stderr is in the message)."""


def q35_ram_ranges(total: int) -> list[tuple[int, int, int]]:
    """(gpa, file offset, size) of each RAM piece of a q35 machine with ``total`` bytes."""
    lowmem = Q35_LOWMEM_BIG if total >= Q35_LOWMEM else Q35_LOWMEM
    below = min(total, lowmem)
    out = [(0, 0, below)]
    if total > below:
        out.append((FOUR_GIB, below, total - below))
    return out


def _tmp_base() -> str | None:
    """A tmpfs folder for the RAM file: /dev/shm when present (else the default temp dir)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class QtestMachine:
    """A q35 QEMU under qtest with its RAM in a shared file (see the module docstring).

    ``qemu``: a ``QemuBinary``, or None for ``find_qemu()`` (the lab's). ``ram_bytes``: the
    guest's RAM (a multiple of 2 MiB); ``reserved_bytes`` more are added at the top of the file
    for the transport. ``objects``/``devices``: ``-object``/``-device`` values. ``incoming``:
    ``-incoming`` URI for a migration destination (``defer`` to give it later with QMP
    ``migrate-incoming``). ``extra_args`` go last.
    """

    def __init__(self, qemu: QemuBinary | None = None, *, ram_bytes: int = 64 << 20,
                 reserved_bytes: int = RESERVED_BYTES, objects: Sequence[str] = (),
                 devices: Sequence[str] = (), incoming: str | None = None,
                 extra_args: Sequence[str] = (), timeout: float = 10.0) -> None:
        if ram_bytes <= 0 or ram_bytes % (2 << 20):
            raise UsageError(f"ram_bytes={ram_bytes:#x}: must be a positive multiple of 2 MiB")
        if reserved_bytes < PAGE or reserved_bytes % (1 << 20):
            raise UsageError(f"reserved_bytes={reserved_bytes:#x}: must be a positive "
                             "multiple of 1 MiB")
        self.qemu = qemu or find_qemu()
        self.ram_bytes = ram_bytes
        self.total_bytes = ram_bytes + reserved_bytes
        self.timeout = timeout
        self.tmpdir = tempfile.mkdtemp(prefix="bh-qtest-", dir=_tmp_base())
        self.ram_path = os.path.join(self.tmpdir, "ram")
        self.qtest_path = os.path.join(self.tmpdir, "qtest.sock")
        self.qmp_path = os.path.join(self.tmpdir, "qmp.sock")
        self._stderr_path = os.path.join(self.tmpdir, "qemu.stderr")
        self.ram_ranges = q35_ram_ranges(self.total_bytes)
        self.args = ["-accel", "qtest", "-qtest", f"unix:{self.qtest_path}",
                     "-qtest-log", "none", "-qmp", f"unix:{self.qmp_path}",
                     "-nodefaults", "-display", "none",
                     "-M", "q35,memory-backend=mem", "-m", f"{self.total_bytes >> 20}M",
                     "-object", f"memory-backend-file,id=mem,size={self.total_bytes},"
                                f"mem-path={self.ram_path},share=on"]
        for o in objects:
            self.args += ["-object", o]
        for d in devices:
            self.args += ["-device", d]
        if incoming is not None:
            self.args += ["-incoming", incoming]
        self.args += list(extra_args)
        self.argv = [*self.qemu.argv, *self.args]  # for logs and messages
        self.qt: QtestConnection
        self._qmp: QmpClient | None = None
        self._ram: mmap.mmap | None = None
        self.mem = GuestMemory()
        self.start_seconds = 0.0
        self._listeners: list[socket.socket] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- start / stop -------------------------------------------------------------------------
    def _listen(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        s.settimeout(0.02)
        self._listeners.append(s)
        return s

    def _accept(self, lsock: socket.socket, what: str, deadline: float) -> socket.socket:
        while True:
            try:
                conn, _ = lsock.accept()
                return conn
            except TimeoutError:
                pass
            if self.proc.poll() is not None:
                raise QemuStartError(f"{self.qemu.name} exited with {self.proc.returncode} "
                                     f"before connecting its {what} socket:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                raise QemuStartError(f"{self.qemu.name} did not connect its {what} socket "
                                     f"within {self.timeout} s:\n{self.stderr[-3000:]}")

    def _start(self) -> None:
        qt_l, qmp_l = self._listen(self.qtest_path), self._listen(self.qmp_path)
        self._stderr = open(self._stderr_path, "wb")
        t0 = time.monotonic()
        log.info("starting %s", " ".join(self.argv))
        self.proc = self.qemu.popen(self.args, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                    stderr=self._stderr)
        self._finalizer = weakref.finalize(self, kill_and_remove, self.proc, self.tmpdir)
        deadline = t0 + self.timeout
        self.qt = QtestConnection(self._accept(qt_l, "qtest", deadline), timeout=self.timeout)
        self._qmp = QmpClient(self._accept(qmp_l, "QMP", deadline), self.timeout)
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        self._map_ram()
        # A first command proves the qtest side is served (QEMU has finished machine init).
        if self.qt.endianness() != "little":
            raise QemuStartError(f"{self.qemu.name}: not a little-endian target")
        self.start_seconds = time.monotonic() - t0

    def _map_ram(self) -> None:
        fd = os.open(self.ram_path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < self.total_bytes:
                raise QemuStartError(f"RAM file {self.ram_path} has {size} bytes, expected "
                                     f"{self.total_bytes}")
            self._ram = mmap.mmap(fd, self.total_bytes, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        view = memoryview(self._ram)
        for i, (gpa, off, size) in enumerate(self.ram_ranges):
            # The guest's RAM is the file minus the reserved top, which stays out of ``mem``.
            size = min(size, max(0, self.ram_bytes - off))
            if size:
                self.mem.add_region(gpa, view[off:off + size], name=f"ram{i}")

    @property
    def stderr(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Kill QEMU, unmap its RAM, remove the folder (idempotent)."""
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        if getattr(self, "qt", None) is not None:
            self.qt.close()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for r in list(self.mem.regions):
            self.mem.remove_region(r.gpa).buf.release()
        if self._ram is not None:
            try:
                self._ram.close()
            except BufferError:
                pass  # numpy views of the rings still exist; the mapping goes with them
            self._ram = None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()
        else:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses ----------------------------------------------------------------------------
    def gpa_of_offset(self, off: int) -> int:
        """The guest-physical address of byte ``off`` of the RAM file."""
        for gpa, foff, size in self.ram_ranges:
            if foff <= off < foff + size:
                return gpa + off - foff
        raise UsageError(f"offset {off:#x} is outside the {self.total_bytes:#x}-byte RAM file")

    @property
    def reserved_gpa(self) -> int:
        """Guest-physical start of the reserved top of RAM (not in ``mem``)."""
        return self.gpa_of_offset(self.ram_bytes)

    def reserved_view(self) -> memoryview:
        """The reserved RAM, as bytes of the shared mapping."""
        assert self._ram is not None
        return memoryview(self._ram)[self.ram_bytes:self.total_bytes]

    # -- the qtest write path (visible to QEMU's dirty log) -----------------------------------
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory through QEMU (dirty-logged); the mapping sees it at once."""
        self.mem.view(gpa, len(data))  # bounds: a range outside guest RAM raises here
        self.qt.b64write(gpa, data)

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self.mem.view(gpa, n)
        self.qt.memset(gpa, n, byte)

    def rewrite(self, gpa: int, n: int) -> None:
        """Send the bytes already in the mapping at ``[gpa, gpa+n)`` through QEMU again, so its
        dirty log records them (for writes made through the mapping)."""
        self.qt.b64write(gpa, self.mem.view(gpa, n))

    # -- QMP ------------------------------------------------------------------------------------
    def qmp(self, command: str, **args: Any) -> Any:
        """One QMP command; hyphenated argument names as ``**{"max-bandwidth": n}``."""
        if self._qmp is None:
            raise QmpError("QMP is closed")
        return self._qmp.execute(command, args)

    @property
    def qmp_events(self) -> list[dict[str, Any]]:
        return self._qmp.events if self._qmp is not None else []

    # -- migration --------------------------------------------------------------------------------
    def migrate_to(self, dst: QtestMachine, *, parameters: dict[str, Any] | None = None,
                   capabilities: dict[str, bool] | None = None) -> None:
        """Start migrating this machine into ``dst`` (started with ``incoming="defer"``) over a
        unix socket in ``dst``'s folder; ``parameters`` / ``capabilities`` are set on this side
        first (QMP ``migrate-set-parameters`` names, e.g. ``{"max-bandwidth": n,
        "downtime-limit": ms}``; ``{"pause-before-switchover": True}``). Returns at once: follow
        it with ``wait_migration``."""
        sock = os.path.join(dst.tmpdir, "migrate.sock")
        dst.qmp("migrate-incoming", uri=f"unix:{sock}")
        if capabilities:
            self.qmp("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": v} for k, v in capabilities.items()])
        if parameters:
            self.qmp("migrate-set-parameters", **parameters)
        self.qmp("migrate", uri=f"unix:{sock}")

    def wait_migration(self, want: Sequence[str], timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``want``; returns that answer.
        A migration that fails or is cancelled (unless wanted) raises ``QmpError``."""
        deadline = time.monotonic() + timeout
        while True:
            info = dict(self.qmp("query-migrate"))
            st = info.get("status", "none")
            if st in want:
                return info
            if st in ("failed", "cancelled"):
                raise QmpError(f"migration {st}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration still {st} after {timeout} s (waiting for "
                               f"{'/'.join(want)})")
            time.sleep(0.005)


class WriteThrough:
    """A ``dirty_log`` for a ``GuestMemory`` backed by a ``QtestMachine``: ranges the guest
    model marks dirty (after writing them through the mapping) are queued; ``flush()`` rewrites
    them through qtest so QEMU's dirty log records them (see the module docstring). Queued
    ranges are merged to whole pages; one pipeline of ``b64write`` per flush. ``enabled`` as
    ``guestmem.DirtyLog``: off, nothing is queued."""

    def __init__(self, machine: QtestMachine) -> None:
        self.m = machine
        self.enabled = True
        self._pages: set[int] = set()
        self.flushed_pages = 0

    def start(self) -> None:
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def mark_bytes(self, gpa: int, length: int) -> None:
        if self.enabled and length > 0:
            self._pages.update(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))

    def mark_range(self, first_pfn: int, count: int) -> None:
        if self.enabled and count > 0:
            self._pages.update(range(first_pfn, first_pfn + count))

    def mark_pfns(self, pfns: np.ndarray) -> None:
        if self.enabled:
            self._pages.update(int(p) for p in np.asarray(pfns).ravel())

    def pending(self) -> int:
        return len(self._pages)

    def flush(self) -> int:
        """Rewrite every queued page through qtest; returns how many pages were sent."""
        if not self._pages:
            return 0
        pfns = np.array(sorted(self._pages), dtype=np.int64)
        self._pages.clear()
        # Runs of consecutive pages become one write each.
        breaks = np.nonzero(np.diff(pfns) != 1)[0] + 1
        for run in np.split(pfns, breaks):
            self.m.rewrite(int(run[0]) * PAGE, len(run) * PAGE)
        self.flushed_pages += len(pfns)
        return len(pfns)
