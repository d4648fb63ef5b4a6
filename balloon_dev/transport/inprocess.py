"""In-process transport: the guest driver calls the device core directly, in one Python process.

Theory of operation: ``InProcessTransport`` offers the guest's ``VirtioTransport`` operations
(docs/interfaces.md) by duck typing - it does not import ``guest_model`` (layering rule) - and
turns each into a call on ``balloon_dev.device.BalloonDevice``. The effects the device returns
are split in two:

- guest effects (``NotifyQueue``, ``ConfigChanged``) become calls of the interrupt handlers the
  driver registered with ``set_interrupt_handlers``;
- every other effect goes to each host listener added with ``add_host_listener(fn)``, in order.

Delivery is never re-entrant: effects are appended to one FIFO and delivered only when the
outermost transport call is about to return. A handler (guest or host) that calls back into
the transport (the driver refilling a queue from its interrupt handler, a host listener asking
for the next hint round) only queues more effects, which the same outer loop delivers after the
handler returns. So a driver never sees its own handler run in the middle of one of its calls.
Host-initiated calls (``transport.device.set_target(...)`` etc.) return effects to the caller;
``host_call(fn, *args)`` runs one and delivers its effects the same way.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from balloon_dev.device import BalloonDevice
from balloon_dev.effects import ConfigChanged, Effect, NotifyQueue

log = logging.getLogger(__name__)

HostListener = Callable[[Effect], None]


class InProcessTransport:
    def __init__(self, dev: BalloonDevice) -> None:
        self.device = dev
        self._on_queue: Callable[[int], None] | None = None
        self._on_config: Callable[[], None] | None = None
        self._listeners: list[HostListener] = []
        self._pending: deque[Effect] = deque()
        self._delivering = False
        self.interrupts = {"queue": 0, "config": 0, "dropped": 0}

    # -- wiring ----------------------------------------------------------------------------
    def set_interrupt_handlers(self, on_queue: Callable[[int], None],
                               on_config: Callable[[], None]) -> None:
        self._on_queue = on_queue
        self._on_config = on_config

    def add_host_listener(self, fn: HostListener) -> None:
        self._listeners.append(fn)

    def remove_host_listener(self, fn: HostListener) -> None:
        self._listeners.remove(fn)

    # -- delivery --------------------------------------------------------------------------
    def _run(self, effects: list[Effect]) -> None:
        self._pending.extend(effects)
        if self._delivering:
            return  # an outer call is delivering; it will reach these
        self._delivering = True
        try:
            while self._pending:
                self._deliver(self._pending.popleft())
        finally:
            self._delivering = False

    def _deliver(self, e: Effect) -> None:
        if isinstance(e, NotifyQueue):
            self.interrupts["queue"] += 1
            if self._on_queue is None:
                self.interrupts["dropped"] += 1
                return
            self._on_queue(e.queue)
        elif isinstance(e, ConfigChanged):
            self.interrupts["config"] += 1
            if self._on_config is None:
                self.interrupts["dropped"] += 1
                return
            self._on_config()
        else:
            for fn in list(self._listeners):
                fn(e)

    def host_call(self, fn: Callable[..., list[Effect]], *args: Any) -> list[Effect]:
        """Run a host request on the device (e.g. ``dev.free_page_start``) and deliver its
        effects; returns them too."""
        effects = fn(*args)
        self._run(list(effects))
        return effects

    def deliver(self, effects: list[Effect]) -> None:
        """Deliver effects a host obtained by calling the device directly."""
        self._run(list(effects))

    # -- VirtioTransport (guest side) ------------------------------------------------------
    def get_device_features(self) -> int:
        return self.device.device_features

    def set_driver_features(self, features: int) -> None:
        self.device.write_driver_features(features)

    def get_status(self) -> int:
        return self.device.status

    def set_status(self, status: int) -> None:
        self._run(self.device.write_status(status))

    def read_config(self, offset: int, size: int) -> bytes:
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self._run(self.device.write_config(offset, data))

    def config_generation(self) -> int:
        return self.device.config_generation

    def num_queues(self) -> int:
        return self.device.num_queues

    def queue_max_size(self, q: int) -> int:
        return self.device.queue_max_size(q)

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        self.device.set_queue(q, size, desc, avail, used)

    def enable_queue(self, q: int) -> None:
        self._run(self.device.enable_queue(q))

    def notify(self, q: int) -> None:
        self._run(self.device.notify(q))

    def reset(self) -> None:
        self._run(self.device.reset())
