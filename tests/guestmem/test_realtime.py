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


def test_a_wall_time_budget_cuts_a_turn_short():
    wall = [0.0]
    sched = Scheduler()

    def slow() -> None:
        wall[0] += 0.004  # each event takes 4 ms of wall time
    for i in range(10):
        sched.at(0.001 * i, slow)
    rt = RealTime(sched, wall=lambda: wall[0])
    wall[0] = 1.0
    assert rt.run_due(max_wall_s=0.01) == 3  # started at 0, 4, 8 ms; not at 12
    assert sched.now == 0.002  # the clock stays at the last event run
    assert rt.run_due() == 7 and sched.now > 1.0
