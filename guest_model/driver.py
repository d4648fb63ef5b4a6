"""The guest's virtio-balloon driver, modelled on Linux drivers/virtio/virtio_balloon.c
(protocol.md section 6).

Theory of operation
-------------------
The driver meets the device only through guest memory (rings built by ``guest_model.vring`` in
the driver area), config-space bytes and notifications, all through a ``VirtioTransport``
(``guest_model.transport``). It never imports ``balloon_dev``.

*Probe* (``probe()``) follows protocol.md 2.3 and Linux's ``virtballoon_validate`` /
``virtballoon_probe``: reset, ACKNOWLEDGE, DRIVER, negotiate (never ACCESS_PLATFORM; PAGE_POISON
only when the guest poisons or zeroes freed pages; REPORTING dropped when the guest poisons but
PAGE_POISON is unavailable), FEATURES_OK and re-check, then the queues in the fixed slot order
inflate, deflate, stats, free_page, reporting with absent ones skipped (compacted numbering,
protocol.md 3.3, counted from the *negotiated* features as Linux does), ``poison_val`` written,
the stats buffer posted, DRIVER_OK, the stats queue kicked. A failed probe sets FAILED and
raises ``ProbeError``.

*Work* runs as events on the shared ``guestmem.clock.Scheduler`` so that guest workloads and the
host's migration interleave with it. Interrupt handlers only record what happened and schedule
work (as Linux queues work items), so they are safe whenever a transport calls them:

* config interrupt -> ``_config_work``: read ``num_pages`` and ``free_page_hint_cmd_id`` (stable
  under ``config_generation``); start balloon resizing if the target moved; for the hint ID:
  DONE frees every held block, STOP ends a running round, a new ID >= 2 starts a round (after
  the running one, if any, has sent its STOP, as Linux's single work item does).
* hint rounds: ``guest_model.hinting`` (the walk and capture strategies, DONE, the shrinker);
* balloon resizing and deflate on OOM: ``guest_model.balloon``;
* stats: one buffer posted at probe; when the device uses it, it is refilled and reposted.
* free page reporting: ``guest_model.page_reporting``.

*DEVICE_NEEDS_RESET.* Linux's virtio core never resets a device on its own when it sets
NEEDS_RESET, and virtio_balloon has no handler for it (only freeze/restore reset the device);
the driver does not even read the bit, so it keeps posting, and every activity that waits for a
used buffer (resize, reporting, stats) waits forever. The model reads the status on a config
interrupt and stops device work at once (``needs_reset``; no buffer is posted again, scheduled
steps are cancelled), which the device sees the same way: nothing it would use. What Linux would
keep stays kept: balloon pages, blocks isolated for an unanswered report; held hint blocks stay
shrinkable, and a DONE read from config space still frees them. A new driver instance (unbind
and probe again) is how a guest recovers; this class does not re-probe.

Simulated costs (seconds, all overridable in ``DriverOptions``): a hinted block costs its
allocation (1.5 us) or free-list visit (1 us), the init_on_alloc zeroing of 4 MiB at
``memory_bandwidth`` (10 GB/s: 0.42 ms) when the allocator zeroes, and posting it (3.5 us),
divided by the driver's ``cpu_share`` of a vCPU; ``balloon_cost_per_page`` 0.5 us,
``report_cost_per_block`` 5 us. They set how fast a round progresses relative to the host
sending pages; docs/cost-model.md says where each comes from.

Device faults (a ring the device broke, a config read that never stabilises) are logged, counted
in ``counters`` and survived: the affected activity stops, the rest of the driver carries on.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from guest_model.balloon import OOM_NR_PAGES, BalloonResize
from guest_model.buddy import BuddyAllocator, Zone
from guest_model.hinting import (
    HINT_BLOCK_PAGES,
    BlockWalker,
    FreePageHinting,
    HintStrategy,
    Vring,
)
from guest_model.packed_vring import alloc_packed_vring
from guest_model.page_reporting import (
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_ORDER,
    FreePageReporting,
)
from guest_model.transport import VirtioTransport
from guest_model.vring import DriverArea, alloc_vring
from guest_model.walk import FreeBlockWalker
from guestmem import GuestMemory
from guestmem.clock import Scheduler
from guestmem.units import CmdId, QueueIndex, pages_to_bytes
from protocol.balloon import (
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    CFG_POISON_VAL,
    STAT_ENTRY_SIZE,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_HINT_BLOCK_ORDER,
    BalloonQueue,
    StatTag,
    queue_layout,
)
from protocol.errors import Fault, UsageError
from protocol.virtio import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    feature_mask,
)

log = logging.getLogger(__name__)

__all__ = [
    "DRIVER_FEATURES", "HINT_BLOCK_PAGES", "OOM_NR_PAGES", "PAGE_POISON_VAL",
    "PAGE_REPORTING_CAPACITY", "PAGE_REPORTING_ORDER", "BalloonDriver", "BalloonDriverState",
    "BlockWalker", "DriverOptions", "HintStrategy", "PageAllocator", "ProbeError",
]
#: Linux poisons freed pages with PAGE_POISON = 0xaa; poison_val is four such bytes.
PAGE_POISON_VAL = 0xAAAAAAAA
_CONFIG_READ_RETRIES = 16
_U32 = struct.Struct("<I")

#: Features this driver knows (Linux's ``features[]`` table plus the ring features; Linux's
#: virtio_ring keeps RING_PACKED too, and then every queue is packed).
DRIVER_FEATURES = feature_mask(
    VIRTIO_F_VERSION_1, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING)


class ProbeError(Fault):
    """The device cannot be driven (feature refused, queue missing or too small): the device's
    fault, seen from the guest; the driver sets FAILED."""

    def __init__(self, message: str) -> None:
        super().__init__(message, counter="probe_failed")


class PageAllocator(Protocol):
    """What the driver needs from the guest's page allocator (guest_model.buddy)."""

    @property
    def ram_pages(self) -> int: ...

    def alloc_pages(self, order: int, migratetype: int = ..., *, cpu: int = ...,
                    noretry: bool = ..., owner: int = ...) -> int | None: ...

    def free_pages(self, pfn: int, order: int, *, cpu: int = ...) -> None: ...

    def alloc_pages_bulk(self, nr_pages: int, migratetype: int = ..., *,
                         owner: int = ..., noretry: bool = ...) -> np.ndarray: ...

    def free_pages_bulk(self, pfns: np.ndarray) -> None: ...

    def free_blocks_bulk(self, pfns: np.ndarray, order: int, *, cpu: int = ...) -> None: ...

    def nr_free_pages(self, zone: int | None = None) -> int: ...

    zones: list[Zone]

    def isolate_free_block(self, order: int, *, zone: int | None = None,
                           migratetype: int | None = None,
                           skip_reported: bool = True) -> int | None: ...

    def nr_unreported_blocks(self, zone: int, order: int, migratetype: int) -> int: ...

    def free_counts(self) -> np.ndarray: ...

    def register_free_notifier(self, notify: Callable[[int], None]) -> None: ...

    def putback_block(self, pfn: int, order: int, *, reported: bool = False) -> None: ...

    def register_oom_notifier(self, notify: Callable[[], int]) -> None: ...


@dataclass(slots=True)
class DriverOptions:
    hint_strategy: HintStrategy | str = HintStrategy.CAPTURE
    #: Smallest block order the walk strategy hints (the seed's ``min_order``).
    min_order: int = VIRTIO_BALLOON_HINT_BLOCK_ORDER
    #: Walk strategy: False follows stale free-list links exactly as the 2017 seed did
    #: (guest_model.walk explains the hazard); True re-checks each block under the "lock".
    walk_safe: bool = True
    #: Guest memory debugging, as the allocator is configured (drive validate()).
    page_poisoning: bool = False
    init_on_free: bool = False
    #: Features the driver is willing to take (ANDed with what it knows and what is offered).
    accept_features: int = DRIVER_FEATURES
    #: Blocks per simulated step of a hint round (both strategies): workload events interleave
    #: between steps, not inside one. 16 keeps long rounds cheap in events; 1 gives per-block
    #: interleaving (a workload can take or write a block between two hints of a walk, as a
    #: real guest's other CPUs can between two reports of the seed's lock-dropping walk).
    hint_batch: int = 16
    #: The guest's cost of a hint round (docs/cost-model.md, "The guest's side of a round"):
    #: per captured block the allocation (``hint_alloc_cost``), the init_on_alloc zeroing of
    #: its 4 MiB at ``memory_bandwidth`` bytes/s (only when the allocator zeroes), and posting
    #: the buffer (``hint_post_cost``: a descriptor and a kick, a VM exit); per walked block the
    #: free-list visit (``hint_walk_cost``) plus posting. All of it runs on one vCPU of which
    #: the driver's work item gets ``cpu_share`` (1: an otherwise idle guest). When
    #: ``hint_cost_per_block`` is set it replaces all of these by one flat cost per block.
    hint_cost_per_block: float | None = None
    hint_alloc_cost: float = 1.5e-6
    hint_post_cost: float = 3.5e-6
    hint_walk_cost: float = 1.0e-6
    memory_bandwidth: float = 10e9
    #: Extra cost of clearing a page never written before: the host backs it on that first
    #: write (a host page fault; under TCG with file-backed RAM tens of us). 0: no such cost.
    hint_first_write_cost: float = 0.0
    cpu_share: float = 1.0
    balloon_cost_per_page: float = 5e-7
    #: Linux sleeps 200 ms when it cannot allocate balloon pages ("Out of puff!").
    balloon_retry_delay: float = 0.2
    #: Simulation deviation: Linux spins allocating and freeing while the ring is full; we wait
    #: this long before the next try so a stalled device does not cost millions of events.
    ring_full_poll: float = 1e-3
    #: Linux's PAGE_REPORTING_DELAY: a requested pass starts this much later.
    report_interval: float = 2.0
    report_cost_per_block: float = 5e-6
    stats: Callable[[], dict[int, int]] | None = None


@dataclass(slots=True)
class BalloonDriverState:
    """Everything the driver remembers between events (snapshotable)."""

    features: int = 0
    cmd_id_received: CmdId = CmdId(VIRTIO_BALLOON_CMD_ID_STOP)  # last id read from config
    cmd_id_active: CmdId = CmdId(VIRTIO_BALLOON_CMD_ID_STOP)  # id of the round last started
    num_pages: int = 0  # pages in the balloon
    balloon_pfns: list[int] = field(default_factory=list)
    held_blocks: list[int] = field(default_factory=list)  # hint blocks (capture), LIFO
    target: int = 0


class BalloonDriver:
    """The guest's balloon driver. ``probe()`` brings the device up; then work runs on ``sched``.

    ``walker_factory(min_order)`` returns a fresh walker for the walk strategy; by default a
    safe ``guest_model.walk.FreeBlockWalker`` over ``allocator``.
    """

    def __init__(self, transport: VirtioTransport, mem: GuestMemory, allocator: PageAllocator,
                 sched: Scheduler, area: DriverArea, options: DriverOptions | None = None, *,
                 walker_factory: Callable[[int], BlockWalker] | None = None) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = allocator
        self.sched = sched
        self.area = area
        self.opts = options or DriverOptions()
        if self.opts.hint_batch < 1:
            raise UsageError(f"DriverOptions.hint_batch={self.opts.hint_batch}: must be >= 1")
        if not 0 < self.opts.cpu_share <= 1 or not self.opts.memory_bandwidth > 0:
            raise UsageError(f"DriverOptions: cpu_share={self.opts.cpu_share} must be in (0, 1] "
                             f"and memory_bandwidth={self.opts.memory_bandwidth} positive")
        try:
            self.strategy = HintStrategy(self.opts.hint_strategy)
        except ValueError:
            raise UsageError(f"DriverOptions.hint_strategy={self.opts.hint_strategy!r}: must be "
                             "one of off, walk, capture") from None
        if self.strategy is HintStrategy.WALK and walker_factory is None:
            if not isinstance(allocator, BuddyAllocator):
                raise UsageError("hint strategy 'walk' needs a walker_factory for this allocator")
            buddy, safe = allocator, self.opts.walk_safe

            def buddy_walker(mo: int) -> BlockWalker:
                return FreeBlockWalker(buddy, mo, safe=safe)

            walker_factory = buddy_walker
        self.walker_factory = walker_factory
        self.s = BalloonDriverState()
        self.vqs: dict[BalloonQueue, Vring] = {}
        self.qindex: dict[BalloonQueue, QueueIndex] = {}
        self._by_index: dict[QueueIndex, BalloonQueue] = {}
        self._broken_seen: set[BalloonQueue] = set()
        self.ready = False
        self.failed: str | None = None
        self._config_pending = False
        self.needs_reset = False
        self.poison_val: int | None = None
        self.counters: dict[str, int] = {
            "rounds": 0, "rounds_stopped_by_device": 0, "hints_sent": 0, "hinted_pages": 0,
            "hint_blocks_dropped_ring_full": 0, "hint_blocks_returned_done": 0,
            "hint_blocks_shrunk": 0, "start_sent": 0, "stop_sent": 0,
            "control_buffer_failed": 0, "config_changes": 0, "config_read_unstable": 0,
            "inflated_pages": 0, "deflated_pages": 0, "inflate_alloc_failed": 0,
            "balloon_buffers": 0, "stats_buffers": 0, "reports": 0, "reported_pages": 0,
            "vring_broken": 0, "device_needs_reset": 0, "oom_deflated_pages": 0,
            "oom_deflate_blocked": 0, "deflate_told_late_pages": 0,
        }
        # Driver-area order: the hint control buffers, the pfn buffer, the stats buffer.
        self.hint = FreePageHinting(self, self.strategy)
        self.reporting = FreePageReporting(self)
        self.balloon = BalloonResize(self)
        self._stats_tags = [StatTag(i) for i in range(10)]  # the spec's tags 0-9
        self._stats_buf = area.alloc(STAT_ENTRY_SIZE * len(self._stats_tags), 8)

    # ==== probe ================================================================================
    def has(self, bit: int) -> bool:
        return bool(self.s.features >> bit & 1)

    def validate(self, offered: int) -> int:
        """The subset of ``offered`` to accept (Linux ``virtballoon_validate`` + feature table)."""
        want = offered & self.opts.accept_features & DRIVER_FEATURES
        # protocol.md 2.1: Linux always clears ACCESS_PLATFORM (it is not in DRIVER_FEATURES
        # either; kept explicit because a device insisting on it must see it refused).
        want &= ~(1 << VIRTIO_F_ACCESS_PLATFORM)
        if not (self.opts.page_poisoning or self.opts.init_on_free):
            # protocol.md 3.6 / DR-2: PAGE_POISON only if freed pages are poisoned or zeroed.
            want &= ~(1 << VIRTIO_BALLOON_F_PAGE_POISON)
        elif not want >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
            # DR-2: reported pages would lose their poison pattern.
            want &= ~(1 << VIRTIO_BALLOON_F_REPORTING)
        return want

    def _fail(self, why: str) -> ProbeError:
        self.failed = why
        self.t.set_status(self.t.get_status() | DeviceStatus.FAILED)
        log.warning("virtio-balloon probe failed: %s", why)
        return ProbeError(why)

    def probe(self) -> None:
        """Initialise the device (protocol.md 2.3) and start the driver."""
        t = self.t
        t.set_interrupt_handlers(self._on_queue_irq, self._on_config_irq)
        t.reset()
        t.set_status(0)
        if t.get_status() != 0:
            raise self._fail("device did not reset (status reads back non-zero)")
        t.set_status(DeviceStatus.ACKNOWLEDGE)
        t.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        offered = t.get_device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise self._fail("device does not offer VERSION_1 (legacy devices unsupported)")
        self.s.features = self.validate(offered)
        t.set_driver_features(self.s.features)
        st = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        t.set_status(st)
        if not t.get_status() & DeviceStatus.FEATURES_OK:
            raise self._fail(f"device refused features {self.s.features:#x}")
        self._setup_queues()
        if self.has(VIRTIO_BALLOON_F_PAGE_POISON):
            # DR-12: written before DRIVER_OK, never changed afterwards. Linux: 0 with
            # init_on_free (freed pages read as zero), else the PAGE_POISON pattern.
            self.poison_val = 0 if self.opts.init_on_free and not self.opts.page_poisoning \
                else PAGE_POISON_VAL
            t.write_config(CFG_POISON_VAL, _U32.pack(self.poison_val))
        if BalloonQueue.STATS in self.vqs:
            # Prime the stats queue so the device can ask for stats by using it (protocol.md 3.5).
            self._fill_stats()
            self.vqs[BalloonQueue.STATS].add_buf(
                out=[(self._stats_buf, STAT_ENTRY_SIZE * len(self._stats_tags))], token="stats")
        t.set_status(st | DeviceStatus.DRIVER_OK)
        self.ready = True
        if BalloonQueue.STATS in self.vqs:
            self.kick(BalloonQueue.STATS)  # no kicks before DRIVER_OK (V-10)
        if self.has(VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            # Linux registers its OOM notifier at probe only with DEFLATE_ON_OOM (protocol.md 6.3).
            self.alloc.register_oom_notifier(self.balloon.oom_notify)
        if self.has(VIRTIO_BALLOON_F_REPORTING):
            # page_reporting_register: frees of large blocks request passes; the first pass
            # ("initial flush of zones") is requested now.
            self.alloc.register_free_notifier(self.reporting.request)
            self.reporting.request()
        # Linux probe ends with virtballoon_changed() if the target already differs.
        self._schedule_config_work()

    def _setup_queues(self) -> None:
        layout = queue_layout(self.s.features)
        t = self.t
        event_idx = self.has(VIRTIO_F_RING_EVENT_IDX)
        indirect = self.has(VIRTIO_F_RING_INDIRECT_DESC)
        packed = self.has(VIRTIO_F_RING_PACKED)
        if t.num_queues() < len(layout):
            raise self._fail(f"device has {t.num_queues()} queues, features need {len(layout)}")
        for q, i in sorted(layout.items(), key=lambda kv: kv[1]):
            idx = QueueIndex(i)
            size = t.queue_max_size(idx)
            if size == 0:
                raise self._fail(f"queue {idx} ({q.name}) does not exist")
            if size & (size - 1) and not packed:  # packed sizes need not be (protocol.md 1.8)
                raise self._fail(f"queue {idx} ({q.name}) size {size} is not a power of two")
            if q is BalloonQueue.FREE_PAGE and size < 2:
                raise self._fail(f"free_page_vq has {size} entries; at least 2 needed")
            if q is BalloonQueue.REPORTING and size < PAGE_REPORTING_CAPACITY:
                raise self._fail(f"reporting_vq has {size} entries; at least "
                                 f"{PAGE_REPORTING_CAPACITY} needed")
            alloc = alloc_packed_vring if packed else alloc_vring
            vq = alloc(self.mem, self.area, size, event_idx=event_idx, indirect=indirect,
                       name=q.name.lower())
            t.setup_queue(idx, size, vq.desc_gpa, vq.avail_gpa, vq.used_gpa)
            t.enable_queue(idx)
            if q is BalloonQueue.FREE_PAGE:
                vq.disable_cb()  # Linux registers free_page_vq without a callback: it polls
            self.vqs[q] = vq
            self.qindex[q] = idx
            self._by_index[idx] = q

    # ==== plumbing ==============================================================================
    def kick(self, q: BalloonQueue) -> None:
        if self.vqs[q].kick_prepare():
            self.t.notify(self.qindex[q])

    def vq_ok(self, q: BalloonQueue) -> bool:
        vq = self.vqs.get(q)
        if vq is None:
            return False
        if vq.broken:
            if q not in self._broken_seen:
                self._broken_seen.add(q)
                self.counters["vring_broken"] += 1
            return False
        return True

    def _read_config_u32s(self, offsets: Sequence[int]) -> list[int] | None:
        """Read le32 fields so that all come from one config generation (protocol.md 2.4)."""
        for _ in range(_CONFIG_READ_RETRIES):
            gen = self.t.config_generation()
            vals = [_U32.unpack(self.t.read_config(off, 4))[0] for off in offsets]
            if self.t.config_generation() == gen:
                return vals
        self.counters["config_read_unstable"] += 1
        log.warning("virtio-balloon: config_generation kept changing over %d reads",
                    _CONFIG_READ_RETRIES)
        return None

    def _on_queue_irq(self, idx: int) -> None:
        q = self._by_index.get(QueueIndex(idx))
        if q is None or not self.ready:
            return
        if q in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE):
            self.sched.after(0.0, self.balloon.ack)
        elif q is BalloonQueue.STATS:
            self.sched.after(0.0, self._stats_request)
        elif q is BalloonQueue.REPORTING:
            self.sched.after(0.0, self.reporting.ack)
        # free_page_vq has no callback (polled); a spurious interrupt is harmless.

    def _on_config_irq(self) -> None:
        if not self.ready and not self.needs_reset:
            return
        self.counters["config_changes"] += 1
        self._schedule_config_work()

    def _schedule_config_work(self) -> None:
        if not self._config_pending:
            self._config_pending = True
            self.sched.after(0.0, self._config_work)

    # ==== config changes =========================================================================
    def _config_work(self) -> None:
        self._config_pending = False
        if not self.ready and not self.needs_reset:
            return
        if self.needs_reset or self.t.get_status() & DeviceStatus.DEVICE_NEEDS_RESET:
            self._device_needs_reset()
            return
        offs = [CFG_NUM_PAGES]
        if self.has(VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            offs.append(CFG_FREE_PAGE_HINT_CMD_ID)
        vals = self._read_config_u32s(offs)
        if vals is None:
            return
        self.s.target = vals[0]
        if self.s.target != self.s.num_pages:
            self.balloon.start()
        if len(vals) > 1:
            self.hint.cmd_id_changed(CmdId(vals[1]))

    def _device_needs_reset(self) -> None:
        """The device set DEVICE_NEEDS_RESET (see the module docstring for what Linux does).

        Device work stops: no buffer is posted again, scheduled steps are cancelled. What the
        driver holds stays where it is, as in Linux: balloon pages (deflating needs the device),
        blocks isolated for an unanswered report (Linux's reporting worker waits for the used
        buffer forever), and held hint blocks, which the shrinker can still free and which a
        DONE read from config space still frees (Linux's config handler does not know about the
        bit and needs no queue for that).
        """
        if not self.needs_reset:
            self.needs_reset = True
            self.ready = False
            self.counters["device_needs_reset"] += 1
            log.warning("virtio-balloon: device set DEVICE_NEEDS_RESET; no more device work "
                        "(Linux does not reset on its own)")
            self.balloon.cancel()
            self.reporting.cancel()
            self.hint.cancel()
        if self.has(VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            vals = self._read_config_u32s([CFG_FREE_PAGE_HINT_CMD_ID])
            if vals is not None and vals[0] == VIRTIO_BALLOON_CMD_ID_DONE:
                self.s.cmd_id_received = CmdId(vals[0])
                self.return_free_pages(None)

    # ==== stats ==================================================================================
    def _fill_stats(self) -> None:
        vals: dict[int, int] = {int(tag): 0 for tag in self._stats_tags}
        total = pages_to_bytes(self.alloc.ram_pages)
        free = pages_to_bytes(self.alloc.nr_free_pages())
        vals[StatTag.MEMTOT] = total
        vals[StatTag.MEMFREE] = free
        vals[StatTag.AVAIL] = free
        if self.opts.stats is not None:
            vals.update({int(k): int(v) for k, v in self.opts.stats().items()})
        # DR-8: the same subset every time, one entry per tag.
        buf = b"".join(struct.pack("<HQ", int(tag), vals[int(tag)] & (1 << 64) - 1)
                       for tag in self._stats_tags)
        self.mem.write(self._stats_buf, buf)

    def _stats_request(self) -> None:
        if not self.vq_ok(BalloonQueue.STATS):
            return
        vq = self.vqs[BalloonQueue.STATS]
        toks, _ = vq.get_bufs()
        if "stats" not in toks:
            return
        self._fill_stats()
        vq.add_buf(out=[(self._stats_buf, STAT_ENTRY_SIZE * len(self._stats_tags))],
                   token="stats")
        self.counters["stats_buffers"] += 1
        self.kick(BalloonQueue.STATS)

    # ==== views for the guest assembly ===========================================================
    def held_pfn_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of every page the driver holds: hint blocks and balloon pages."""
        out = [(p, HINT_BLOCK_PAGES) for p in self.s.held_blocks]
        out += [(p, 1) for p in self.s.balloon_pfns]
        return out + self.balloon.held_pfns()

    def isolated_pfn_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the free blocks isolated for a report the device has not used
        yet: free pages, not the driver's (their content stays what the guest left)."""
        return self.reporting.isolated_pfn_ranges()

    def oom_notify(self) -> int:
        """The OOM notifier with DEFLATE_ON_OOM (``guest_model.balloon``); pages freed now."""
        return self.balloon.oom_notify()

    # ==== free page hinting (guest_model.hinting) ================================================
    @property
    def hinting(self) -> bool:
        """A hint round is running."""
        return self.hint.active

    def return_free_pages(self, max_blocks: int | None) -> int:
        """Give up to ``max_blocks`` held hint blocks back (all if None); blocks freed."""
        return self.hint.return_free_pages(max_blocks)

    # Shrinker (Linux virtio_balloon_shrinker_count / _scan): only hint blocks are given back.
    def shrink_count(self) -> int:
        return self.hint.shrink_count()

    def shrink(self, nr_to_scan: int) -> int:
        """Free ``ceil(nr_to_scan / 1024)`` held hint blocks; returns pages freed."""
        return self.hint.shrink(nr_to_scan)
