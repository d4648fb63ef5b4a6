"""What our two test clients playing QEMU's part share (``vmsim.vfio_user_client`` and
``vmsim.vhost_user_client``).

Theory of operation: each client is an independent peer of the device it drives and has its own
wire protocol; what they have in common is QEMU's side of the set-up around it. ``QemuRoleClient``
holds that: the unix socket to the device (connected with the client's timeout; a refused
connection is a ``DeviceFault`` naming the path), guest RAM as a sealed memfd mapped
at gpa 0 of a ``GuestMemory`` (``vmsim.guest_ram``; the device gets the fd in the client's own
message), and interrupts: the two handlers the guest driver registers (``VirtioTransport``),
called only from ``poll_interrupts()``, never from inside another call. Interrupts are
"vectors": ``config_vector`` for config changes, ``queue_vectors[q]`` for queue ``q`` (several
queues may share one: all of them are told, drivers tolerate spurious interrupts). The object
is a context manager (``connect()`` on entry, ``close()`` on exit). Everything the device does
wrong, as seen from a client, is a ``DeviceFault`` (a ``protocol.errors.PeerFault``: here the
peer is the device). A subclass implements ``connect``, ``close`` and ``_drain`` (the vectors
that fired since the last call, counted in ``irq_counts``) with its protocol's steps.
"""
from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Callable
from typing import Any, Self

from guestmem import GuestMemory
from protocol.errors import PeerFault, UsageError
from vmsim.guest_ram import create_guest_ram, release_guest_ram


class DeviceFault(PeerFault):
    """The device (the client's peer) misbehaved or refused a request. ``errno`` is the errno
    of a vfio-user error reply, 0 for anything else."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message, errno=err or 0, counter="device_faults")


class ClientUsageError(UsageError, ValueError):
    """A client built with a bad argument (a RAM size, a queue size): the caller's mistake
    (a ``ValueError`` too, for callers that catch that)."""


class QemuRoleClient:
    """Socket, guest RAM and interrupt handlers of a client in QEMU's role (module docstring)."""

    def __init__(self, path: str, *, ram_bytes: int, timeout: float) -> None:
        if ram_bytes <= 0 or ram_bytes % mmap.PAGESIZE:
            raise ClientUsageError(f"ram_bytes={ram_bytes:#x}: must be a positive multiple of "
                                   f"{mmap.PAGESIZE}")
        self.path = path
        self.ram_bytes = ram_bytes
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.mem = GuestMemory()
        self._memfd: int | None = None
        self._ram: mmap.mmap | None = None
        self._on_queue: Callable[[int], None] | None = None
        self._on_config: Callable[[], None] | None = None
        self.config_vector = 0
        self.queue_vectors: dict[int, int] = {}
        self.irq_counts: list[int] = []

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _open_socket(self) -> None:
        """Connect ``self.sock`` to ``path``; every later wait is bounded by ``timeout``."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise DeviceFault(f"{self.path}: cannot connect: {e}") from None
        self.sock = s

    def _map_guest_ram(self) -> int:
        """Guest RAM at gpa 0 of ``mem``; returns the memfd to hand to the device."""
        self._memfd, self._ram = create_guest_ram(self.ram_bytes)
        self.mem.add_region(0, self._ram, name="ram")
        return self._memfd

    def _release_guest_ram(self) -> None:
        release_guest_ram(self.mem, self._ram, self._memfd)
        self._ram = self._memfd = None

    # -- interrupts -------------------------------------------------------------------------
    @staticmethod
    def _read_eventfd(fd: int) -> int:
        """Signals an eventfd counted since its last read (0 if none: it is non-blocking)."""
        try:
            return int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return 0

    def _drain(self) -> list[int]:
        raise NotImplementedError

    def poll_interrupts(self) -> int:
        """Deliver every pending interrupt to the handlers; returns how many vectors fired."""
        fired = self._drain()
        for v in fired:
            if v == self.config_vector and self._on_config is not None:
                self._on_config()
            if self._on_queue is not None:
                for q, qv in sorted(self.queue_vectors.items()):
                    if qv == v:
                        self._on_queue(q)
        return len(fired)

    def discard_interrupts(self) -> None:
        """Count and drop pending signals without calling the handlers."""
        self._drain()

    def set_interrupt_handlers(self, on_queue: Callable[[int], None],
                               on_config: Callable[[], None]) -> None:
        self._on_queue, self._on_config = on_queue, on_config
