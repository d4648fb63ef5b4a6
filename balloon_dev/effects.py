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

All effects are frozen, slotted dataclasses that compare and hash by value: they hold tuples
and ints, except ``PagesHinted``, whose hints are two read-only numpy arrays (a kick of 32768
hints is two arrays, not 32768 tuples) compared by value.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from guestmem.units import PAGE_SHIFT, CmdId, Pfn, QueueIndex, whole_pages_in_arrays

# A (guest-physical address, length in bytes) pair, as found in a descriptor.
Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class NotifyQueue:
    """Raise the used-buffer notification of transport queue ``queue``."""

    queue: QueueIndex


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """Raise the configuration-change notification (only emitted once DRIVER_OK is set)."""


@dataclass(frozen=True, slots=True, eq=False)
class PagesHinted:
    """Free page hints received during the round ``cmd_id`` (protocol.md 4.4 rule 4), as arrays.

    Hint ``i`` is the writable buffer the driver gave, reduced to the whole pages inside it
    (rule 5): ``count[i]`` pages from ``first_pfn[i]`` (0 when the buffer holds no whole page),
    in the driver's order. Both arrays are int64 and read-only (an array handed in whole is
    taken over and frozen, a view is copied); equality and hash go by value.
    Only emitted while the round is in FREE_PAGE_HINT_S_START.
    """

    cmd_id: CmdId
    first_pfn: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        for name in ("first_pfn", "count"):
            a = np.asarray(getattr(self, name), dtype=np.int64)
            if a.base is not None:
                a = a.copy()  # a view: own the data, so nobody can change it through the base
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        if self.first_pfn.shape != self.count.shape or self.first_pfn.ndim != 1:
            raise ValueError("PagesHinted: first_pfn and count must be 1-d arrays of one length")

    @classmethod
    def from_ranges(cls, cmd_id: int, ranges: Iterable[Range]) -> PagesHinted:
        """The hints of buffers ``ranges`` [(gpa, len), ...]."""
        rs = list(ranges)
        gpas = np.fromiter((a for a, _ in rs), np.uint64, len(rs))
        lens = np.fromiter((n for _, n in rs), np.uint64, len(rs))
        first, count = whole_pages_in_arrays(gpas, lens)
        return cls(CmdId(cmd_id), first, count)

    def __len__(self) -> int:
        return int(self.count.size)

    @property
    def ranges(self) -> tuple[Range, ...]:
        """The hinted whole pages as (gpa, len) ranges, for logs and checks."""
        return tuple(zip((self.first_pfn << PAGE_SHIFT).tolist(),
                         (self.count << PAGE_SHIFT).tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PagesHinted):
            return NotImplemented
        return (self.cmd_id == other.cmd_id and np.array_equal(self.first_pfn, other.first_pfn)
                and np.array_equal(self.count, other.count))

    def __hash__(self) -> int:
        return hash((self.cmd_id, self.first_pfn.tobytes(), self.count.tobytes()))


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
