"""Simulated time both sides of a simulated VM share: a clock and a discrete-event scheduler.

Nothing in the core reads the wall clock. The guest (workloads, the driver's hint walk) and the
host (migration sending pages) advance the same ``SimClock`` by scheduling events on one
``Scheduler``: ``run_until(t)`` runs every event due at or before ``t`` in time order (ties in
scheduling order), setting ``clock.now`` to each event's time, then leaves the clock at ``t``.
So a guest write can land between two pages the host sends, as on a real machine. It lives
beside guest memory because both the guest model and the device use it and neither may import
the other.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SimClock:
    now: float = 0.0  # seconds


@dataclass(order=True, slots=True)
class ScheduledEvent:
    """A call waiting in a ``Scheduler``: the handle ``at``/``after`` return, for ``cancel``."""

    time: float
    seq: int
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False, default=())
    cancelled: bool = field(compare=False, default=False)


class Scheduler:
    def __init__(self, clock: SimClock | None = None) -> None:
        self.clock = clock if clock is not None else SimClock()
        self._heap: list[ScheduledEvent] = []
        self._seq = itertools.count()
        self.events_run = 0

    @property
    def now(self) -> float:
        return self.clock.now

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> ScheduledEvent:
        """Run ``fn(*args)`` at simulated time ``t`` (not before now)."""
        ev = ScheduledEvent(max(t, self.clock.now), next(self._seq), fn, args)
        heapq.heappush(self._heap, ev)
        return ev

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> ScheduledEvent:
        return self.at(self.clock.now + max(dt, 0.0), fn, *args)

    @staticmethod
    def cancel(ev: ScheduledEvent) -> None:
        ev.cancelled = True

    def peek_time(self) -> float | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].time if self._heap else None

    def run_next(self) -> bool:
        """Run the earliest pending event; False when none is left."""
        t = self.peek_time()
        if t is None:
            return False
        ev = heapq.heappop(self._heap)
        self.clock.now = ev.time
        self.events_run += 1
        ev.fn(*ev.args)
        return True

    def run_until(self, t: float) -> None:
        while True:
            nt = self.peek_time()
            if nt is None or nt > t:
                break
            self.run_next()
        if t > self.clock.now:
            self.clock.now = t

    def pending(self) -> int:
        return sum(1 for e in self._heap if not e.cancelled)


class RealTime:
    """The real-time mode of a ``Scheduler``: simulated time follows the wall clock.

    The one place that reads the wall clock, for a guest model running beside a real host
    (QEMU under qtest, ``vmsim.qtest.host_migrate``), where the host's time is real. From the
    moment it is made, ``due()`` is the scheduler's start time plus the wall time elapsed;
    ``run_due()`` runs what is due by then. When the model's work takes longer than the time it
    models, it falls behind: ``lag`` keeps the largest gap seen (events ran late by that much).
    """

    def __init__(self, sched: Scheduler, wall: Callable[[], float] | None = None) -> None:
        import time
        self.sched = sched
        self._wall = wall or time.perf_counter
        self._w0 = self._wall()
        self._s0 = sched.now
        self.lag = 0.0

    def due(self) -> float:
        return self._s0 + (self._wall() - self._w0)

    def run_due(self, max_events: int | None = None, max_wall_s: float | None = None) -> int:
        """Run every event due by now (at most ``max_events``, and none started after
        ``max_wall_s`` wall seconds); returns how many ran."""
        t = self.due()
        stop = None if max_wall_s is None else self._wall() + max_wall_s
        n = 0
        while (nt := self.sched.peek_time()) is not None and nt <= t:
            if (max_events is not None and n >= max_events) or (
                    stop is not None and n and self._wall() >= stop):
                max_events = n  # cut short: the clock stays at the last event
                break
            self.lag = max(self.lag, t - nt)
            self.sched.run_next()
            n += 1
        if t > self.sched.now and (max_events is None or n < max_events):
            self.sched.clock.now = t
        return n

    def next_in(self) -> float | None:
        """Wall seconds until the next event is due (<= 0: due now); None with none queued."""
        nt = self.sched.peek_time()
        return None if nt is None else nt - self.due()
