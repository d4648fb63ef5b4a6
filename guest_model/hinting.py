"""Free page hinting, the driver's side (protocol.md section 4; Linux virtio_balloon.c).

Theory of operation
-------------------
The device starts a round by publishing a command id >= 2 in ``free_page_hint_cmd_id``; the
driver (``guest_model.driver``) reads it on a config interrupt and hands it to
``FreePageHinting.cmd_id_changed``. A round is:

1. the 4-byte start buffer holding the id (DR-9), posted after detaching used buffers;
2. steps of up to ``hint_batch`` blocks, each step costing the guest's time for its blocks
   (``FreePageHinting.step_cost``: allocation or visit, init_on_alloc zeroing, posting, over
   the driver's share of a vCPU), so workload events land between two steps. Before each step used
   buffers are reaped (free_page_vq has no callback: Linux polls). A block is posted as one
   writable element ``(gpa, bytes)`` only while more than one descriptor is free, keeping one
   for the STOP buffer; otherwise it is dropped (counted);
3. the STOP buffer (le32 0) when the strategy runs out of blocks or the id changes (DR-10);
   then a newer id that arrived meanwhile starts its round, as Linux's single work item does.

Where the blocks come from is the strategy:

* ``WalkStrategy`` (the 2017 seed): a stepping walker over the free lists
  (``guest_model.walk``) visits free blocks of at least ``min_order``; each is hinted while its
  pages stay free, so a workload may allocate and write them before the host sees the hint: the
  race the command ids exist for.
* ``CaptureStrategy`` (Linux >= 4.20): ``alloc_pages(order 10, unmovable, noretry)`` until it
  fails; each block is hinted and held (owner ``OWNER_BALLOON``) until DONE, or until the
  shrinker gives some back under memory pressure. A block that finds no room in the ring is
  freed at once, as Linux does.

DONE (DR-11) frees every held block; the shrinker (``shrink``) frees held blocks on demand.
"""
from __future__ import annotations

import enum
import logging
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from guest_model.buddy import MIGRATE_UNMOVABLE, OWNER_BALLOON
from guest_model.packed_vring import PackedDriverVring
from guest_model.vring import DriverVring, VringBroken, VringFull
from guestmem.clock import ScheduledEvent, Scheduler
from guestmem.units import PAGE_SHIFT, CmdId, bytes_to_pages
from protocol.balloon import (
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_HINT_BLOCK_ORDER,
    BalloonQueue,
)

if TYPE_CHECKING:
    from guest_model.driver import BalloonDriver

log = logging.getLogger(__name__)

#: Either ring layout; the driver uses both through the same methods.
Vring = DriverVring | PackedDriverVring

HINT_BLOCK_PAGES = 1 << VIRTIO_BALLOON_HINT_BLOCK_ORDER
_U32 = struct.Struct("<I")
#: A descriptor length is 32 bits: a block of 4 GiB or more (never for order <= 10) is hinted
#: in pieces of 2 GiB.
_DESC_LIMIT_PAGES = bytes_to_pages(1 << 32)
_PIECE_PAGES = bytes_to_pages(1 << 31)


class HintStrategy(enum.StrEnum):
    OFF = "off"
    WALK = "walk"  # the 2017 seed: hint blocks while they stay on the free lists
    CAPTURE = "capture"  # Linux >= 4.20: allocate order-10 blocks and hold them until DONE


class BlockWalker(Protocol):
    """A stepping walk over the free lists (``guest_model.walk.FreeBlockWalker``): each
    ``step()`` reports one free block as (first pfn, nr_pages), None when the walk is over."""

    def step(self) -> tuple[int, int] | None: ...


@dataclass(slots=True)
class Batch:
    """What one step of a strategy produced: blocks to post (first pfns, page counts), blocks
    visited in all (posted or dropped), and whether the strategy ran out of blocks."""

    pfns: np.ndarray
    nr_pages: np.ndarray
    visited: int
    exhausted: bool
    #: Pages of the captured blocks init_on_alloc cleared that had never been written.
    first_write: int = 0


class WalkStrategy:
    """The seed's walk: report free blocks found by a walker; nothing is allocated or held."""

    def __init__(self, walker: BlockWalker) -> None:
        self.walker = walker

    def batch(self, d: BalloonDriver, room: int) -> Batch:
        blocks: list[tuple[int, int]] = []
        exhausted = False
        for _ in range(d.opts.hint_batch):
            blk = self.walker.step()
            if blk is None:
                exhausted = True
                break
            blocks.append(blk)
        post = np.array(blocks[:room], dtype=np.int64).reshape(-1, 2)
        d.counters["hint_blocks_dropped_ring_full"] += len(blocks) - len(post)
        return Batch(post[:, 0], post[:, 1], len(blocks), exhausted)


class CaptureStrategy:
    """Linux's capture-and-hold: allocate order-10 blocks until none is left, hold each one."""

    def batch(self, d: BalloonDriver, room: int) -> Batch:
        got: list[int] = []
        dropped = 0
        exhausted = False
        counters = getattr(d.alloc, "counters", None)
        first0 = counters.get("zeroed_first_write_pages", 0) if counters is not None else 0
        for _ in range(d.opts.hint_batch):
            pfn = d.alloc.alloc_pages(VIRTIO_BALLOON_HINT_BLOCK_ORDER, MIGRATE_UNMOVABLE,
                                      noretry=True, owner=OWNER_BALLOON)
            if pfn is None:
                exhausted = True
                break
            if len(got) < room:
                got.append(pfn)
            else:
                # Linux: "When there is no available entry, just free it". Freeing makes the
                # next allocation likely return the same block, so the step ends here.
                d.alloc.free_pages(pfn, VIRTIO_BALLOON_HINT_BLOCK_ORDER)
                dropped += 1
                break
        d.counters["hint_blocks_dropped_ring_full"] += dropped
        d.s.held_blocks.extend(got)
        pfns = np.array(got, dtype=np.int64)
        first = (counters.get("zeroed_first_write_pages", 0) - first0
                 if counters is not None else 0)
        return Batch(pfns, np.full(pfns.size, HINT_BLOCK_PAGES, dtype=np.int64),
                     len(got) + dropped, exhausted, first)


@dataclass(slots=True)
class _Round:
    cmd_id: CmdId
    strategy: WalkStrategy | CaptureStrategy
    event: ScheduledEvent | None = None


class FreePageHinting:
    """One driver's hint rounds (see the module docstring). The round-to-round state the
    device can observe (ids, held blocks) lives in the driver's ``BalloonDriverState``."""

    def __init__(self, driver: BalloonDriver, strategy: HintStrategy) -> None:
        self.d = driver
        self.strategy = strategy
        self.round: _Round | None = None
        # Every (first pfns, page counts) batch posted, for ``hinted_mask``.
        self._posted: list[tuple[np.ndarray, np.ndarray]] = []
        # The start and stop ids live in separate 4-byte buffers (Linux keeps cmd_id_active
        # and cmd_id_stop apart so a late STOP cannot alias a start).
        self.start_buf = driver.area.alloc(4, 4)
        self.stop_buf = driver.area.alloc(4, 4)
        driver.mem.write(self.stop_buf, _U32.pack(VIRTIO_BALLOON_CMD_ID_STOP))

    @property
    def active(self) -> bool:
        return self.round is not None

    def cancel(self) -> None:
        """Drop the running round without a STOP (the device needs a reset)."""
        if self.round is not None and self.round.event is not None:
            Scheduler.cancel(self.round.event)
        self.round = None

    def cmd_id_changed(self, cmd_id: CmdId) -> None:
        d = self.d
        d.s.cmd_id_received = cmd_id
        if cmd_id == VIRTIO_BALLOON_CMD_ID_DONE:
            # DR-11: release every held page. A running round notices the change and stops.
            self.return_free_pages(None)
        if self.round is not None:
            return  # the round's next step sees the new id, sends STOP, then re-checks
        self._maybe_start_round()

    def _maybe_start_round(self) -> None:
        d = self.d
        cid = d.s.cmd_id_received
        if (self.strategy is HintStrategy.OFF or cid in (VIRTIO_BALLOON_CMD_ID_STOP,
                                                        VIRTIO_BALLOON_CMD_ID_DONE)
                or cid == d.s.cmd_id_active or not d.vq_ok(BalloonQueue.FREE_PAGE)):
            return
        vq = d.vqs[BalloonQueue.FREE_PAGE]
        vq.get_bufs()  # detach used buffers first, as Linux's send_cmd_id_start does
        d.s.cmd_id_active = cid
        d.mem.write(self.start_buf, _U32.pack(cid))
        try:
            vq.add_buf(out=[(self.start_buf, 4)], token="start")  # DR-9: exactly 4 bytes
        except (VringFull, VringBroken) as e:
            d.counters["control_buffer_failed"] += 1
            log.warning("virtio-balloon: cannot post start buffer for id %#x: %s", cid, e)
            return
        d.kick(BalloonQueue.FREE_PAGE)
        d.counters["start_sent"] += 1
        d.counters["rounds"] += 1
        strategy: WalkStrategy | CaptureStrategy
        if self.strategy is HintStrategy.WALK:
            assert d.walker_factory is not None
            strategy = WalkStrategy(d.walker_factory(d.opts.min_order))
        else:
            strategy = CaptureStrategy()
        self.round = _Round(cid, strategy)
        self.round.event = d.sched.after(0.0, self._step)

    def _step(self) -> None:
        r = self.round
        if r is None:
            return
        d = self.d
        r.event = None
        if not d.vq_ok(BalloonQueue.FREE_PAGE):
            self.round = None
            return
        if d.s.cmd_id_received != r.cmd_id:
            # DR-10: stop on STOP/DONE (or a newer round): Linux breaks out of its loop.
            d.counters["rounds_stopped_by_device"] += 1
            self._end_round()
            return
        vq = d.vqs[BalloonQueue.FREE_PAGE]
        vq.get_bufs()  # poll: reclaim descriptors of hints the device already used
        if not d.vq_ok(BalloonQueue.FREE_PAGE):
            # The reap found a used element the device made up and broke the ring: nothing
            # can be posted (not even STOP), and captured blocks would have nowhere to go.
            self.round = None
            return
        room = max(0, vq.num_free - 1)  # keep one slot for the STOP buffer (protocol.md 4.4/9)
        b = r.strategy.batch(d, room)
        if b.pfns.size:
            self._post_hints(vq, b.pfns, b.nr_pages)
        if b.visited:
            d.kick(BalloonQueue.FREE_PAGE)
        if b.exhausted:
            self._end_round()  # DR-10: out of free blocks -> STOP
            return
        delay = self.step_cost(b.visited, int(b.pfns.size), b.first_write)
        if room == 0:
            delay = max(delay, d.opts.ring_full_poll)
        r.event = d.sched.after(delay, self._step)

    def step_cost(self, visited: int, posted: int, first_write: int = 0) -> float:
        """Guest time of one step that visited (walk) or allocated (capture) ``visited`` blocks
        and posted ``posted`` of them, init_on_alloc having cleared ``first_write`` pages never
        written before (docs/cost-model.md). A step that found nothing still costs one visit:
        the driver looked."""
        o = self.d.opts
        n = max(visited, 1)
        if o.hint_cost_per_block is not None:
            t = n * o.hint_cost_per_block
        elif self.strategy is HintStrategy.WALK:
            t = n * o.hint_walk_cost + posted * o.hint_post_cost
        else:
            t = n * o.hint_alloc_cost + posted * o.hint_post_cost
            if getattr(self.d.alloc, "init_on_alloc", False):
                # init_on_alloc clears every block the capture allocates, dropped ones too.
                t += n * (HINT_BLOCK_PAGES << PAGE_SHIFT) / o.memory_bandwidth
                t += first_write * o.hint_first_write_cost
        return t / o.cpu_share

    def _post_hints(self, vq: Vring, pfns: np.ndarray, nr_pages: np.ndarray) -> None:
        d = self.d
        if (nr_pages >= _DESC_LIMIT_PAGES).any():
            pieces_p, pieces_n = [], []
            for p, n in zip(pfns.tolist(), nr_pages.tolist(), strict=True):
                for off in range(0, n, _PIECE_PAGES):
                    pieces_p.append(p + off)
                    pieces_n.append(min(_PIECE_PAGES, n - off))
            pfns = np.array(pieces_p[:vq.num_free - 1], dtype=np.int64)
            nr_pages = np.array(pieces_n[:vq.num_free - 1], dtype=np.int64)
        vq.add_single_bufs(pfns << PAGE_SHIFT, nr_pages << PAGE_SHIFT, writable=True)
        self._posted.append((pfns, nr_pages))
        d.counters["hints_sent"] += int(pfns.size)
        d.counters["hinted_pages"] += int(nr_pages.sum())

    def _end_round(self) -> None:
        """Send the STOP buffer (le32 0) for the current round, then look at the id again."""
        d = self.d
        self.round = None
        if d.vq_ok(BalloonQueue.FREE_PAGE):
            vq = d.vqs[BalloonQueue.FREE_PAGE]
            vq.get_bufs()
            try:
                vq.add_buf(out=[(self.stop_buf, 4)], token="stop")
                d.kick(BalloonQueue.FREE_PAGE)
                d.counters["stop_sent"] += 1
            except (VringFull, VringBroken) as e:
                d.counters["control_buffer_failed"] += 1
                log.warning("virtio-balloon: cannot post stop buffer: %s", e)
        # A new id that arrived meanwhile starts its round now (Linux re-runs the work item).
        self._maybe_start_round()

    def hinted_mask(self, ram_pages: int) -> np.ndarray:
        """Every page some hint of this driver covered (bool per page). With the walk strategy
        these pages stayed free: under page poisoning, one the host skipped reaches the
        destination without its poison (protocol.md 6.5)."""
        mask = np.zeros(ram_pages, dtype=np.bool_)
        if not self._posted:
            return mask
        starts = np.concatenate([p for p, _ in self._posted])
        ends = starts + np.concatenate([n for _, n in self._posted])
        # Merge overlapping or adjacent ranges, then set each merged run as one slice.
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
        new = np.r_[True, starts[1:] > ends[:-1]]
        run_ends = np.r_[ends[np.flatnonzero(new)[1:] - 1], ends[-1]]
        for lo, hi in zip(starts[new].tolist(), run_ends.tolist(), strict=True):
            mask[lo:min(hi, ram_pages)] = True
        return mask

    def return_free_pages(self, max_blocks: int | None) -> int:
        """Give up to ``max_blocks`` held hint blocks back to the allocator (all if None);
        returns the number of blocks freed. Linux ``return_free_pages_to_mm``."""
        d = self.d
        held = d.s.held_blocks
        n = len(held) if max_blocks is None else min(max_blocks, len(held))
        if n:
            # Most recently captured first (Linux pops its list); one bulk call gives the same
            # frees, list order and writes as a free_pages per 4 MiB block.
            pfns = np.array(held[len(held) - n:][::-1], dtype=np.int64)
            del held[len(held) - n:]
            d.alloc.free_blocks_bulk(pfns, VIRTIO_BALLOON_HINT_BLOCK_ORDER)
        if max_blocks is None:
            d.counters["hint_blocks_returned_done"] += n
        return n

    def shrink_count(self) -> int:
        return len(self.d.s.held_blocks) * HINT_BLOCK_PAGES

    def shrink(self, nr_to_scan: int) -> int:
        """Free ``ceil(nr_to_scan / 1024)`` held hint blocks; returns pages freed. A block may
        still sit in the ring unhinted: the spec allows reusing hinted pages early (DR-11)."""
        blocks = math.ceil(max(0, nr_to_scan) / HINT_BLOCK_PAGES)
        freed = self.return_free_pages(blocks)
        self.d.counters["hint_blocks_shrunk"] += freed
        return freed * HINT_BLOCK_PAGES
