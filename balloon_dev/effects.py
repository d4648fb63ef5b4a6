"""Effects: what the sans-I/O balloon device core asks its transport and host to do.

Theory of operation: every entry point of ``balloon_dev.device.BalloonDevice`` returns a list of
effects instead of performing anything (conventions 10). Two audiences read them:

- the *guest side* of a transport: ``NotifyQueue(q)`` (raise the used-buffer interrupt of
  transport queue ``q``) and ``ConfigChanged()`` (raise the configuration interrupt);
- the *host*: ``PagesHinted``, ``PagesReported``, ``Inflated``, ``Deflated``, ``StatsReceived``,
  ``ActualChanged``, ``HintRoundStopped`` and ``NeedsReset``.

Order inside one list is meaningful: a host effect about a buffer always comes *before* the
``NotifyQueue`` that tells the guest the buffer was used, so a host that acts on the effects in
order has acted (e.g. discarded an inflated page, D-3) before the guest may reuse the memory.

All effects are frozen, slotted dataclasses holding only tuples and ints, so they compare and
hash by value and can be logged or stored as-is.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from guestmem.units import CmdId, Pfn, QueueIndex

# A (guest-physical address, length in bytes) pair, as found in a descriptor.
Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class NotifyQueue:
    """Raise the used-buffer notification of transport queue ``queue``."""

    queue: QueueIndex


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """Raise the configuration-change notification (only emitted once DRIVER_OK is set)."""


@dataclass(frozen=True, slots=True)
class PagesHinted:
    """Free page hints received during the round ``cmd_id`` (protocol.md 4.4 rule 4).

    ``ranges`` are the writable descriptors exactly as the driver gave them; the consumer rounds
    to whole pages (rule 5). Only emitted while the round is in FREE_PAGE_HINT_S_START.
    """

    cmd_id: CmdId
    ranges: tuple[Range, ...]


@dataclass(frozen=True, slots=True)
class PagesReported:
    """One free page reporting chain (protocol.md 3.7); the buffer is used right after."""

    ranges: tuple[Range, ...]


@dataclass(frozen=True, slots=True)
class Inflated:
    """PFNs (4 KiB units) the driver put into the balloon; the host may discard them (D-3)."""

    pfns: tuple[Pfn, ...]


@dataclass(frozen=True, slots=True)
class Deflated:
    """PFNs (4 KiB units) the driver takes back; emitted before the buffer is used (D-4)."""

    pfns: tuple[Pfn, ...]


@dataclass(frozen=True, slots=True)
class StatsReceived:
    """A statistics buffer: known tag name (``StatTag`` name, e.g. "MEMFREE") -> value."""

    stats: dict[str, int]

    def __hash__(self) -> int:  # dict fields are unhashable; hash the sorted items
        return hash(tuple(sorted(self.stats.items())))


@dataclass(frozen=True, slots=True)
class ActualChanged:
    """The driver wrote a new ``actual`` (pages in the balloon, 4 KiB units)."""

    actual: int


@dataclass(frozen=True, slots=True)
class HintRoundStopped:
    """Hint round ``cmd_id`` is over: the driver's STOP arrived, or the host stopped, ended,
    superseded it, or the device was reset. Emitted exactly once per round."""

    cmd_id: CmdId


@dataclass(frozen=True, slots=True)
class NeedsReset:
    """The device entered DEVICE_NEEDS_RESET because of a guest error described in ``reason``."""

    reason: str


Effect = (NotifyQueue | ConfigChanged | PagesHinted | PagesReported | Inflated | Deflated
          | StatsReceived | ActualChanged | HintRoundStopped | NeedsReset)

#: Effects a transport delivers to the guest; every other effect is for the host.
GUEST_EFFECTS = (NotifyQueue, ConfigChanged)


class PrecopyEvent(enum.Enum):
    """Migration notifications the device reacts to (QEMU's ``PRECOPY_NOTIFY_*``, protocol.md
    5.4)."""

    SETUP = "PRECOPY_NOTIFY_SETUP"
    BEFORE_BITMAP_SYNC = "PRECOPY_NOTIFY_BEFORE_BITMAP_SYNC"
    AFTER_BITMAP_SYNC = "PRECOPY_NOTIFY_AFTER_BITMAP_SYNC"
    COMPLETE = "PRECOPY_NOTIFY_COMPLETE"
    CLEANUP = "PRECOPY_NOTIFY_CLEANUP"
