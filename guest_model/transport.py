"""What the guest's virtio driver needs from a transport: the ``VirtioTransport`` protocol.

A real guest reaches its device through a transport (virtio-pci's common config, MMIO registers,
...). The balloon driver in ``guest_model.driver`` only needs the operations below; anything that
provides them by duck typing can carry it: ``balloon_dev.transport.inprocess.InProcessTransport``
(which must not import this module, see the layering rules), or a fake in tests.

Interrupts go the other way: the driver registers two callbacks with
``set_interrupt_handlers(on_queue, on_config)``; the transport calls ``on_queue(q)`` when the
device used buffers on transport queue ``q`` and ``on_config()`` after a configuration change.
A transport must never call them re-entrantly from inside one of the driver's own calls
(docs/interfaces.md: effects are queued and delivered after the device call returns), so the
driver's handlers may call back into the transport freely.

Queue indices here are *transport* indices, i.e. after the compaction of protocol.md 3.3.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from guestmem.units import Gpa, QueueIndex


@runtime_checkable
class VirtioTransport(Protocol):
    """The driver's view of a virtio device (docs/interfaces.md "Transports to the guest")."""

    def get_device_features(self) -> int:
        """The 64-bit feature set the device offers."""
        ...

    def set_driver_features(self, features: int) -> None:
        """Write the accepted subset (the transport splits it into 32-bit halves if it must)."""
        ...

    def get_status(self) -> int: ...

    def set_status(self, status: int) -> None:
        """Write the status byte; 0 resets the device."""
        ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def config_generation(self) -> int: ...

    def num_queues(self) -> int: ...

    def queue_max_size(self, q: QueueIndex) -> int:
        """Largest size of transport queue ``q``; 0 means the queue does not exist."""
        ...

    def setup_queue(self, q: QueueIndex, size: int, desc: Gpa, avail: Gpa, used: Gpa) -> None:
        """Give queue ``q`` its size and the guest-physical addresses of its three areas."""
        ...

    def enable_queue(self, q: QueueIndex) -> None: ...

    def notify(self, q: QueueIndex) -> None:
        """Kick queue ``q`` (the driver added buffers)."""
        ...

    def set_interrupt_handlers(self, on_queue: Callable[[int], None],
                               on_config: Callable[[], None]) -> None: ...

    def reset(self) -> None: ...
