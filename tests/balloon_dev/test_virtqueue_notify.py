"""Notification liveness: the device ring (balloon_dev/virtqueue.py) against the driver ring
(guest_model/vring.py) when each side acts only on the other's notifications.

The device pops only when kicked and returns buffers whenever it likes (held chains, as with the
stats buffer or a hint being processed); the driver reaps only in its interrupt handler or when
it polls after re-enabling callbacks. Whatever the interleaving, with or without EVENT_IDX, no
kick and no interrupt may be lost: once both sides quiesce, every buffer was seen by the device
and reaped by the driver. A lost wake-up here is a hung balloon in a real guest.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_dev.virtqueue import Chain, DeviceVirtqueue
from guest_model.vring import DriverArea, alloc_vring
from guestmem import GuestMemory

AREA = 0x100000
AREA_SIZE = 0x40000
BUF = AREA + 0x20000


class Pair:
    def __init__(self, size: int, event_idx: bool) -> None:
        mem = GuestMemory()
        mem.add_region(AREA, bytearray(AREA_SIZE), "driver-area")
        area = DriverArea(mem, AREA, AREA_SIZE)
        self.drv = alloc_vring(mem, area, size, event_idx=event_idx, name="drv")
        self.dev = DeviceVirtqueue(mem, size, self.drv.desc_gpa, self.drv.avail_gpa,
                                   self.drv.used_gpa, event_idx=event_idx, name="dev")
        self.held: list[Chain] = []
        self.cb_enabled = True
        self.sent = 0
        self.reaped = 0
        self.kicks = 0
        self.irqs = 0
        self.busy = False  # a busy device counts kicks but re-checks the ring by itself later

    # -- device: acts only on kicks --------------------------------------------------------
    def kick(self) -> None:
        self.kicks += 1
        if self.busy:
            return
        while True:  # the usual device loop: suppress, drain, re-enable, re-check
            self.dev.disable_notifications()
            self.held += self.dev.pop_many()
            self.dev.enable_notifications()
            if self.dev.pending() == 0:
                break

    def complete(self, n: int) -> None:
        done, self.held = self.held[:n], self.held[n:]
        if not done:
            return
        self.dev.push_many([(c.head, 0) for c in done])
        if self.dev.should_notify():
            self.irq()

    # -- driver: reaps only on interrupts or when it polls ---------------------------------------
    def irq(self) -> None:
        self.irqs += 1
        if self.cb_enabled:
            self.poll()

    def poll(self) -> None:
        while True:
            self.drv.disable_cb()
            toks, _ = self.drv.get_bufs()
            self.reaped += len(toks)
            if self.drv.enable_cb():
                break
        self.cb_enabled = True

    def add(self, n: int) -> None:
        n = min(n, self.drv.num_free)
        for _ in range(n):
            self.drv.add_buf(in_=[(BUF + 0x10 * (self.sent % 64), 0x10)], token=self.sent)
            self.sent += 1
        if self.drv.kick_prepare():
            self.kick()

    def mask(self) -> None:
        self.cb_enabled = False
        self.drv.disable_cb()


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9)), max_size=120),
       event_idx=st.booleans(), size=st.sampled_from([4, 8]))
def test_no_lost_kicks_or_interrupts(ops: list[tuple[int, int]], event_idx: bool,
                                     size: int) -> None:
    p = Pair(size, event_idx)
    for op, n in ops:
        if op == 0:
            p.add(n)
        elif op == 1:
            p.complete(n)
        elif op == 2:
            p.mask()  # the driver stops taking interrupts for a while
        else:
            p.poll()  # ... and later polls and re-enables them
    # Quiesce: a masked driver re-enables (its own duty); the device finishes what it holds.
    if not p.cb_enabled:
        p.poll()
    p.complete(len(p.held))
    assert p.dev.pending() == 0, "a kick was lost: buffers sit in the avail ring unseen"
    assert p.reaped == p.sent, "an interrupt was lost: used buffers sit unreaped"
    assert p.drv.in_flight == 0 and p.dev.in_flight == 0


def test_suppression_actually_suppresses() -> None:
    """Not just liveness: while the device has notifications off, adds stop kicking (with
    EVENT_IDX at most the one already armed), and while the driver has callbacks off,
    completions do not interrupt; re-enabling and re-checking picks everything up."""
    for event_idx in (False, True):
        p = Pair(8, event_idx)
        p.add(1)
        assert p.kicks == 1 and len(p.held) == 1
        p.busy = True
        p.dev.disable_notifications()
        for _ in range(7):
            p.add(1)
        # Without EVENT_IDX the NO_NOTIFY flag stops every kick; with it, avail_event still
        # names the next entry (armed before disabling), so exactly one more kick comes.
        assert p.kicks == (2 if event_idx else 1) and p.dev.pending() == 7
        p.busy = False
        p.kick()  # the device's own re-check
        assert len(p.held) == 8 and p.dev.pending() == 0
        p.mask()
        for _ in range(8):
            p.complete(1)
        assert p.reaped == 0 and p.irqs == 0
        p.poll()
        assert p.reaped == 8
        kicks = p.kicks
        p.add(1)  # the device loop re-enabled notifications: this one kicks again
        assert p.kicks == kicks + 1
