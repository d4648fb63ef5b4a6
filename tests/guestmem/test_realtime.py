"""``guestmem.clock.RealTime``: the scheduler's time follows a (here fake) wall clock."""
from __future__ import annotations

from guestmem.clock import RealTime, Scheduler


def test_events_run_when_the_wall_clock_reaches_them_and_lag_is_kept():
    wall = [100.0]
    sched = Scheduler()
    sched.run_until(5.0)
    ran: list[float] = []
    for t in (5.1, 5.2, 5.5):
        sched.at(t, lambda: ran.append(sched.now))
    rt = RealTime(sched, wall=lambda: wall[0])
    assert rt.run_due() == 0 and sched.now == 5.0
    assert rt.next_in() == 5.1 - 5.0
    wall[0] = 100.25  # the wall clock moved 0.25 s: two events are due
    assert rt.run_due() == 2
    assert ran == [5.1, 5.2] and sched.now == 5.25
    assert abs(rt.lag - 0.15) < 1e-9  # the 5.1 event ran 0.15 s late
    wall[0] = 101.0
    assert rt.run_due(max_events=0) == 0 and sched.now == 5.25  # bounded: clock not moved
    assert rt.run_due() == 1 and sched.now == 6.0
    assert rt.next_in() is None
