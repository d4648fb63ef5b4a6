"""What every socket transport shares: the device-core interface, the peer error, the outcome.

Theory of operation
-------------------
A transport session (``vfio_user.VfioUserSession``, ``vhost_user.VhostUserSession``) is sans-I/O:
its server reads one framed message and the session answers with one ``Outcome`` -- the reply
bytes to send (or none), the eventfds to signal, the device core's host effects, and whether the
connection must close. The server performs an outcome in one fixed order (``ORDER`` below).

Handlers refuse a message by raising ``PeerError``, the transports' one peer-error type: it is a
``protocol.errors.PeerFault`` that always names the errno the reply carries and the counter to
bump. ``protocol`` decoders raise plain ``PeerFault`` (they cannot import this package); a
session catches both the same way (``count_peer_fault``): log at warning, bump ``peer_errors``
and the fault's own counter, answer with the protocol's failure reply, close the message's fds.

``DeviceCore`` is the part of ``balloon_dev.device.BalloonDevice`` a transport drives, written
once for both (the vfio-user side reaches it through ``virtio_pci.VirtioPciFunction``).

The connection policies the two servers share are decided in ``connection`` (one place, with
the reasons).
"""
from __future__ import annotations

import errno as _errno
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from balloon_dev.effects import Effect
from protocol.errors import PeerFault

#: How a server performs an ``Outcome``: host effects first, then the peer's interrupts (eventfds
#: and back-end channel messages), then the reply. Host effects before interrupts: the host must
#: have acted on a buffer (discarded an inflated page, D-3) before the guest hears it was used.
#: Everything before the reply: a peer waiting for the reply may rely on what its message caused
#: having happened when the reply arrives.
ORDER = ("effects", "signals", "backend", "reply")


class DeviceCore(Protocol):
    """What a transport uses of ``BalloonDevice`` (docs/interfaces.md)."""

    @property
    def device_features(self) -> int: ...
    @property
    def driver_features(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def config_generation(self) -> int: ...
    @property
    def config_size(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    def write_driver_features(self, value: int) -> None: ...
    def write_status(self, v: int) -> list[Effect]: ...
    def read_config(self, offset: int, size: int) -> bytes: ...
    def write_config(self, offset: int, data: bytes) -> list[Effect]: ...
    def queue_max_size(self, q: int) -> int: ...
    def set_queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None: ...
    def enable_queue(self, q: int) -> list[Effect]: ...
    def queue_enabled(self, q: int) -> bool: ...
    def notify(self, q: int) -> list[Effect]: ...
    def reset(self) -> list[Effect]: ...


class PeerError(PeerFault):
    """A transport refuses a peer's message: ``errno`` for the error reply (vfio-user carries
    it; vhost-user only says "failed"), ``counter`` for ``stats``. The connection stays up."""

    def __init__(self, counter: str, message: str, *, errno: int = _errno.EINVAL) -> None:
        super().__init__(message, errno=errno, counter=counter)


def count_peer_fault(counters: Counter[str], fault: PeerFault, log: logging.Logger,
                     what: str) -> None:
    """Record a refused message: ``peer_errors`` and the fault's counter, one warning."""
    counters["peer_errors"] += 1
    if fault.counter != "peer_errors":
        counters[fault.counter] += 1
    log.warning("%s refused (%s): %s", what, fault.counter, fault)


@dataclass(frozen=True, slots=True)
class Signal:
    """Write 1 to eventfd ``fd``: an interrupt for the peer (``what`` names it for the log)."""

    fd: int
    what: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a server does after one message or one host call, in ``ORDER``."""

    reply: bytes | None = None
    signals: tuple[Signal, ...] = ()
    effects: tuple[Effect, ...] = ()  # host effects only: the guest-facing ones became signals
    backend: tuple[bytes, ...] = ()  # vhost-user back-end channel messages (CONFIG_CHANGE_MSG)
    close: bool = False
