"""The project's three error families, shared by every package.

Who is at fault decides how an error travels:

* ``Fault`` -- the guest or a socket peer broke the protocol (a bad descriptor, a stale command
  id, a malformed vfio-user message). A fault is logged with hex detail and counted under
  ``counter``; the core catches it where it arises and turns it into a reply, a zero-length used
  element or DEVICE_NEEDS_RESET. It never escapes a notification or message handler.
  ``GuestFault`` for the (simulated or real) guest, ``PeerFault`` for a socket peer (with the
  errno the reply carries).
* ``UsageError`` -- our own caller misused an API, or a user gave a bad scenario file or argument.
  Raised with a message naming the file, key or argument; the CLI prints it on one line and
  exits 2.
* Anything else is a bug in balloon-hint and is allowed to raise with its traceback.

Errors of the environment (a lab VM that did not boot, a missing QEMU) are none of these: they
derive from ``EnvironmentFailure`` and the CLI reports them with exit 1.
"""
from __future__ import annotations

import errno as _errno


class BalloonHintError(Exception):
    """Root of every error balloon-hint raises on purpose."""


class Fault(BalloonHintError):
    """A guest or peer broke the protocol; counted under ``counter``, survived."""

    def __init__(self, message: str, *, counter: str = "faults") -> None:
        super().__init__(message)
        self.counter = counter


class GuestFault(Fault):
    """The guest (its rings, buffers, config writes) broke the protocol."""


class PeerFault(Fault):
    """A socket peer sent a message we refuse; ``errno`` goes into the error reply."""

    def __init__(self, message: str, *, errno: int = _errno.EINVAL,
                 counter: str = "peer_errors") -> None:
        super().__init__(message, counter=counter)
        self.errno = errno


class FramingLost(PeerFault):
    """A socket peer's byte stream can no longer be split into messages (a bad header, a size
    beyond the limit): the connection must close. Counted under ``framing_errors``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno=_errno.EPROTO, counter="framing_errors")


class UsageError(BalloonHintError):
    """Our caller or user asked for something invalid; the message names what and where."""


class EnvironmentFailure(BalloonHintError):
    """Something outside balloon-hint failed (a lab VM, a QEMU binary, the host)."""
