"""Inflating and deflating the balloon, the driver's side (protocol.md 3.4, 6.3; Linux
``fill_balloon`` / ``leak_balloon`` and ``virtio_balloon_oom_notify``).

Theory of operation
-------------------
A resize (``work``) moves ``num_pages`` towards the device's target one buffer at a time: up to
256 pfns per buffer, one buffer in flight; the next step waits for the device to use it
(interrupt or poll, ``ack``), then ``actual`` is written (DR-7). Inflated pages are allocated
with ``owner=OWNER_BALLOON`` and ``noretry`` (Linux's ``balloon_page_alloc`` is
``__GFP_NORETRY``: inflating never reclaims); deflated pages are given back to the allocator
only after the device acknowledged them (always, as Linux does; with MUST_TELL_HOST it is
required).

Deflate on OOM (``oom_notify``, registered with the allocator at probe when DEFLATE_ON_OOM is
negotiated) gives up to 256 balloon pages per call, told to the device first as Linux does; a
device that has not used the buffer by the end of the kick delays the pages only with
MUST_TELL_HOST (without it they are freed at once, the spec allows it). It never restarts a
resize: Linux leaves ``actual`` below the target until the next one.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

import numpy as np

from guest_model.buddy import MIGRATE_MOVABLE, OWNER_BALLOON
from guest_model.vring import VringBroken, VringFull
from guestmem.clock import ScheduledEvent, Scheduler
from protocol.balloon import (
    CFG_ACTUAL,
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    BalloonQueue,
)

if TYPE_CHECKING:
    from guest_model.driver import BalloonDriver

log = logging.getLogger(__name__)

#: Linux OOM notifier: pages given back per call with DEFLATE_ON_OOM.
OOM_NR_PAGES = 256
_U32 = struct.Struct("<I")


def _token(kind: str) -> str:
    """The ring token of a pfn buffer: a "told" deflate (pages already free) is a deflate."""
    return "deflate" if kind == "told" else kind


class BalloonResize:
    """One driver's inflate/deflate queue work and its OOM notifier (see the module docstring).
    The balloon's pages, size and target live in the driver's ``BalloonDriverState``."""

    def __init__(self, driver: BalloonDriver) -> None:
        self.d = driver
        self.pfn_buf = driver.area.alloc(4 * VIRTIO_BALLOON_ARRAY_PFNS_MAX, 4)
        self.event: ScheduledEvent | None = None
        # The pfn buffer in flight: (kind, pfns), kind "inflate", "deflate" or "told".
        self.inflight: tuple[str, np.ndarray] | None = None
        # Pages deflated on OOM without MUST_TELL_HOST: already free, the host not told yet.
        self.untold: list[int] = []
        # A resize is under way (Linux's update_balloon_size_func re-queues itself until the
        # target is reached); an OOM deflate alone does not start one.
        self.resizing = False

    def start(self) -> None:
        """The target moved: resize unless a step is already due or a buffer in flight."""
        self.resizing = True
        if self.inflight is None and self.event is None:
            self.event = self.d.sched.after(0.0, self.work)

    def cancel(self) -> None:
        """Stop resizing (the device needs a reset); the balloon's pages stay where they are."""
        if self.event is not None:
            Scheduler.cancel(self.event)
        self.event = None
        self.resizing = False

    def held_pfns(self) -> list[tuple[int, int]]:
        """(pfn, 1) of the pages of an inflate or deflate buffer in flight (a "told" deflate
        names pages the guest took back on OOM: not held)."""
        if self.inflight is None or self.inflight[0] == "told":
            return []
        return [(int(p), 1) for p in self.inflight[1]]

    def work(self) -> None:
        """One step towards the target: at most 256 pfns in one buffer (protocol.md 3.4)."""
        d = self.d
        self.event = None
        if not d.ready or self.inflight is not None:
            return
        diff = d.s.target - d.s.num_pages
        if self.untold:
            # DR-5: pages taken back on OOM are reported on deflateq, after the fact (allowed
            # without MUST_TELL_HOST). They are free already: the ack frees nothing.
            q = BalloonQueue.DEFLATE
            pfns = np.array(self.untold[:VIRTIO_BALLOON_ARRAY_PFNS_MAX], dtype=np.int64)
            del self.untold[:pfns.size]
            self._post(q, "told", pfns)
            return
        if diff == 0:
            self.resizing = False
            return
        if not self.resizing:
            return  # an OOM deflate moved num_pages away from the target; Linux leaves it so
        if diff > 0:
            q = BalloonQueue.INFLATE
            want = min(diff, VIRTIO_BALLOON_ARRAY_PFNS_MAX)
            # balloon_page_alloc: __GFP_NORETRY, so inflating never reclaims nor calls the OOM
            # notifiers (which would deflate the balloon to inflate it).
            pfns = np.asarray(d.alloc.alloc_pages_bulk(want, MIGRATE_MOVABLE,
                                                          owner=OWNER_BALLOON, noretry=True),
                              dtype=np.int64)
            if pfns.size < want:
                d.counters["inflate_alloc_failed"] += 1
                log.info("virtio-balloon: out of puff, got %d of %d pages", pfns.size, want)
            if pfns.size == 0:
                self.event = d.sched.after(d.opts.balloon_retry_delay, self.work)
                return
            kind = "inflate"
        else:
            q = BalloonQueue.DEFLATE
            want = min(-diff, VIRTIO_BALLOON_ARRAY_PFNS_MAX, len(d.s.balloon_pfns))
            if want == 0:
                return
            pfns = np.array(d.s.balloon_pfns[-want:], dtype=np.int64)
            del d.s.balloon_pfns[-want:]
            kind = "deflate"
        self._post(q, kind, pfns)

    def _post(self, q: BalloonQueue, kind: str, pfns: np.ndarray) -> bool:
        """Post one pfn buffer (the only one in flight) and kick; undo on failure."""
        d = self.d
        if not d.vq_ok(q):
            self._undo(kind, pfns)
            return False
        d.mem.write(self.pfn_buf, pfns.astype("<u4").tobytes())
        try:
            d.vqs[q].add_buf(out=[(self.pfn_buf, 4 * int(pfns.size))], token=_token(kind))
        except (VringFull, VringBroken) as e:
            log.warning("virtio-balloon: cannot post %s buffer: %s", kind, e)
            self._undo(kind, pfns)
            return False
        self.inflight = (kind, pfns)
        d.counters["balloon_buffers"] += 1
        d.kick(q)
        return True

    def _undo(self, kind: str, pfns: np.ndarray) -> None:
        d = self.d
        if kind == "inflate":
            d.alloc.free_pages_bulk(pfns)
        elif kind == "deflate":
            d.s.balloon_pfns.extend(pfns.tolist())
        # "told": the pages are the guest's already; the host just never hears of them.

    def ack(self) -> bool:
        """Reap the pfn buffer in flight if the device used it; whether it did."""
        d = self.d
        if self.inflight is None:
            return False
        kind, pfns = self.inflight
        q = BalloonQueue.INFLATE if kind == "inflate" else BalloonQueue.DEFLATE
        if not d.vq_ok(q):
            return False
        toks, _ = d.vqs[q].get_bufs()
        if _token(kind) not in toks:
            return False  # spurious interrupt; keep waiting (one buffer in flight)
        self.inflight = None
        n = int(pfns.size)
        if kind == "inflate":
            d.s.balloon_pfns.extend(pfns.tolist())
            d.s.num_pages += n
            d.counters["inflated_pages"] += n
        elif kind == "deflate":
            # DR-5/DR-6: the device has acknowledged; only now may the pages be reused.
            d.alloc.free_pages_bulk(pfns)
            d.s.num_pages -= n
            d.counters["deflated_pages"] += n
        else:
            d.counters["deflate_told_late_pages"] += n
        # DR-7: tell the device where the balloon is.
        d.t.write_config(CFG_ACTUAL, _U32.pack(d.s.num_pages))
        if d.s.num_pages == d.s.target:
            self.resizing = False
        if self.untold or (self.resizing and d.s.num_pages != d.s.target):
            self.event = d.sched.after(n * d.opts.balloon_cost_per_page, self.work)
        return True

    def oom_notify(self) -> int:
        """Linux's OOM notifier with DEFLATE_ON_OOM (registered with the allocator at probe):
        give up to 256 balloon pages back; returns the pages freed now (protocol.md 6.3).

        Linux's ``leak_balloon`` always tells the host first, waits for the used buffer, then
        frees, with or without MUST_TELL_HOST. The model cannot wait inside an allocation, so
        it posts the deflate buffer and looks once: a device that answered inside the kick (the
        in-process one) has used it, and the pages are freed now, in Linux's order. Otherwise,
        with MUST_TELL_HOST the pages wait for the ack (DR-5, DR-6) and this call frees nothing;
        without it they are freed at once, which the spec allows (DR-4, DR-5), and the buffer
        in flight only informs the host. If another pfn buffer is in flight (Linux would wait
        for the balloon lock): with MUST_TELL_HOST nothing is freed (counted), without it the
        pages are freed and reported on deflateq once the queue is free. A device that needs a
        reset frees nothing (Linux would wait for an ack that never comes).
        """
        d = self.d
        if not d.has(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            return 0
        n = min(OOM_NR_PAGES, len(d.s.balloon_pfns))
        if n == 0:
            return 0
        must_tell = d.has(VIRTIO_BALLOON_F_MUST_TELL_HOST)
        if not d.ready or (must_tell and self.inflight is not None):
            d.counters["oom_deflate_blocked"] += 1
            return 0
        pfns = np.array(d.s.balloon_pfns[-n:], dtype=np.int64)
        del d.s.balloon_pfns[-n:]
        if self.inflight is None:
            if not self._post(BalloonQueue.DEFLATE, "deflate", pfns):
                return 0  # the queue is broken; the pages went back into the balloon
            if self.ack():  # freed them, updated actual
                d.counters["oom_deflated_pages"] += n
                return n
            if must_tell:
                return 0  # freed when the device uses the buffer
            # Not used yet: the pages need not wait; the buffer in flight frees nothing.
            self.inflight = ("told", pfns)
        else:
            self.untold.extend(pfns.tolist())
        d.alloc.free_pages_bulk(pfns)
        d.s.num_pages -= n
        d.counters["oom_deflated_pages"] += n
        # update_balloon_size: actual follows at once.
        d.t.write_config(CFG_ACTUAL, _U32.pack(d.s.num_pages))
        return n
