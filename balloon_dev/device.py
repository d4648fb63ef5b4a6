"""The virtio-balloon device core (sans-I/O): features, status, config space, queues, hinting.

Theory of operation
-------------------
``BalloonDevice`` is a synchronous state machine over a ``GuestMemory``. Its entry points are
what a transport observes (feature and status writes, config reads/writes, queue set-up, a
queue kick, reset) and what the host asks (set the balloon target, ask for statistics, start /
stop / end a free page hint round, migration events). Each returns a list of effects
(``balloon_dev.effects``) and performs nothing itself; the only guest memory it writes is the
used rings, through ``balloon_dev.virtqueue.DeviceVirtqueue`` (or, when the driver negotiates
RING_PACKED, ``balloon_dev.packed_virtqueue.PackedDeviceVirtqueue``: used descriptors and the
device event area). RING_PACKED is offered only when ``DeviceConfig.offered_features`` says so.

Queues are numbered as protocol.md 3.3 says: from the *offered* features, compacted (0
inflate, 1 deflate, then stats, free_page, reporting if offered), or the spec's literal 0..4
with ``DeviceConfig.fixed_queue_numbering``. A kick pops every pending chain of the queue in one
batch, handles them in order, pushes every used element with ``len = 0`` (D-17) in one batch and
emits the host effects first and the ``NotifyQueue`` last (so the host acts before the guest
is told a buffer was used: D-3, D-4, D-15). A transport whose guest runs concurrently sets
``host_sink`` so host effects are handled before the used elements even reach guest memory.

Nothing is used or notified before DRIVER_OK (D-16, V-10): a kick that arrives earlier is
counted and remembered, and the queue is processed when DRIVER_OK is set.

Guest errors never raise out of ``notify()`` (or any transport-facing call): a malformed chain
is used with len 0 and counted; a broken ring (``RingBroken``: V-1, V-2, ring outside memory)
sets DEVICE_NEEDS_RESET (+ ``ConfigChanged`` when DRIVER_OK, protocol.md 2.2) and the device
then ignores kicks until reset. Every guest error bumps a named counter in ``counters`` and is
logged at warning with hex detail. A bug of ours met while processing a kick is logged with
its traceback, counted as ``internal_error`` and also ends in DEVICE_NEEDS_RESET rather than an
exception into the transport (the stateful test asserts it never happens). Our own callers'
mistakes (a host asking for hint rounds on a device that does not offer them, a target above
2^32-1) raise ``ValueError``.

Decisions
---------
- FEATURES_OK is refused when the driver's features are not a subset of the offered ones, lack
  VERSION_1, or (compacted numbering) decline an offered stats/hint queue while accepting a later
  one: the driver would then number its queues differently from us (protocol.md Open question
  1; Linux counts negotiated features, QEMU offered ones). With
  ``refuse_without_must_tell_host`` it is also refused when MUST_TELL_HOST is offered and not
  accepted (D-1).
- Status writes that skip a step (e.g. DRIVER_OK without FEATURES_OK) or clear a bit without a
  reset are guest errors that put the device in DEVICE_NEEDS_RESET (see ``status.py``).
- Config writes before FEATURES_OK are ignored and counted (protocol.md 2.3 step 4); writes to
  the read-only ``num_pages`` / ``free_page_hint_cmd_id`` and past the window are ignored and
  counted; ``poison_val`` is writable only with PAGE_POISON negotiated and before DRIVER_OK.
- Reset returns the device to its power-on state except three things, on purpose: the host's
  target ``num_pages`` (host state, as in QEMU: the next driver should inflate to it), the hint
  command-id counter (as in QEMU, so ids stay unique over the device's life; see ``hint.py``),
  and ``config_generation``, which only ever moves forward (a driver comparing generations
  across a reset can never see a stale equal value).
- ``HintRoundStopped`` is emitted once per round, when it ends for any reason.
- free_page_vq out buffers whose length is not 4 (protocol.md 4.4 rule 2) are a guest error
  (DR-9): counted, used with len 0, no state change. QEMU would read the first 4 bytes of a
  longer buffer; we do not guess.

The driver checker and the legacy interface
-------------------------------------------
Every driver requirement (protocol.md 4.6 DR-n) the device can see broken is judged by its
``DriverChecker`` (``balloon_dev.driver_checker``: which ids are observable and how), logged
and counted in ``dr_violations`` and ``counters``. With ``DeviceConfig.legacy`` the device
presents the virtio 0.9.5 interface; the handlers whose meaning differs there live in
``balloon_dev.legacy.LegacyInterface``, which says what differs.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from balloon_dev.balloon_queues import BalloonQueues
from balloon_dev.config_space import ConfigSpace
from balloon_dev.device_config import (
    DEFAULT_OFFERED_FEATURES,
    U32_MAX,
    U64_MASK,
    DeviceConfig,
    DeviceState,
    DeviceUsageError,
    QueueSlot,
    Vq,
    has,
)
from balloon_dev.driver_checker import DriverChecker
from balloon_dev.effects import (
    ActualChanged,
    ConfigChanged,
    Effect,
    NeedsReset,
    NotifyQueue,
    PrecopyEvent,
    Range,
)
from balloon_dev.free_page import FreePageHinting
from balloon_dev.hint import HintEvent, HintSession
from balloon_dev.legacy import LEGACY_VRING_ALIGN, LegacyInterface
from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from balloon_dev.status import (
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    NEEDS_RESET,
    judge_status_write,
)
from balloon_dev.virtqueue import Chain, ChainBatch, DeviceVirtqueue, RingBroken
from guestmem.memory import GuestMemory
from guestmem.units import QueueIndex, pages_to_bytes
from protocol.balloon import (
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    BalloonQueue,
    config_size,
    queue_layout,
)
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_SUSPEND,
    VIRTIO_F_VERSION_1,
)

__all__ = ["DEFAULT_OFFERED_FEATURES", "BalloonDevice", "DeviceConfig", "DeviceUsageError"]

log = logging.getLogger(__name__)

#: Bound on drain passes per kick (each pass pops up to a queue's worth of buffers).
_MAX_PASSES_PER_KICK = 64



class BalloonDevice:
    def __init__(self, mem: GuestMemory, cfg: DeviceConfig | None = None) -> None:
        self.mem = mem
        self.cfg = cfg if cfg is not None else DeviceConfig()
        self._offered = self.cfg.offered_features
        self._counters: dict[str, int] = {}
        #: The DR-n judge (balloon_dev.driver_checker); counts into ``_counters`` too.
        self.checker = DriverChecker(self._counters)
        #: The legacy handlers when the device presents the legacy interface, else None.
        self._legacy = LegacyInterface(self) if self.cfg.legacy else None
        #: What the driver is shown: the legacy interface has one 32-bit feature word.
        self._visible = self._offered & U32_MAX if self._legacy is not None else self._offered
        self._config_size = config_size(self._offered)
        self._layout = queue_layout(self._offered, fixed=self.cfg.fixed_queue_numbering)
        self._num_queues = max(self._layout.values()) + 1
        self._slots: dict[int, QueueSlot] = {
            tq: QueueSlot(lq, self.cfg.queue_sizes[int(lq)]) for lq, tq in self._layout.items()}
        self.state = DeviceState()
        #: The free page hint session (QEMU's states); driven by ``_free_page``.
        self.hint = HintSession(qemu_cmd_id_read=self.cfg.qemu_cmd_id_read)
        self._free_page = FreePageHinting(self, self.hint)
        self._queues = BalloonQueues(self)
        self._config = ConfigSpace(self)
        #: If set, the host effects of a kick are handed to this callable *before* the used
        #: elements are written to guest memory, and not returned. For transports whose guest
        #: runs concurrently with the device (vfio-user): otherwise the guest could see a
        #: buffer used (by polling) before the host discarded its pages. The sink must not
        #: call back into the device. Unset (in-process, where the guest runs only between
        #: device calls): host effects are returned in order, before the NotifyQueue.
        self.host_sink: Callable[[list[Effect]], None] | None = None
        #: The free_page_vq's chains as arrays (``FreePageHinting.handle_batch``); False takes
        #: them one ``Chain`` at a time (``handle``), the reference the batched path is held to.
        self.batched_free_page = True

    # == bookkeeping ==========================================================================
    def count(self, name: str, fmt: str, *args: object, level: int = logging.WARNING,
              n: int = 1) -> None:
        """A guest error: bump counter ``name`` by ``n`` and log ``fmt % args``."""
        self._counters[name] = self._counters.get(name, 0) + n
        log.log(level, "guest error %s: " + fmt, name, *args)

    @property
    def dr_violations(self) -> dict[str, int]:
        """DR id -> times the driver broke it (``DriverChecker``), over the device's life."""
        return self.checker.violations

    @property
    def counters(self) -> dict[str, int]:
        """Guest faults by name: the device's own, DR-n ids, and each queue's as
        "<queue>.<name>"."""
        out = dict(self._counters)
        for slot in self._slots.values():
            _fold_queue_counters(slot, out)
        return out

    @property
    def _live(self) -> bool:
        st = self.state.status
        return bool(st & DRIVER_OK) and not st & (NEEDS_RESET | FAILED)

    def negotiated(self, bit: int) -> bool:
        if self._legacy is not None:
            # Legacy features hold from the moment they are written (no FEATURES_OK step).
            return has(self.state.driver_features, bit)
        return bool(self.state.status & FEATURES_OK) and has(self.state.driver_features, bit)

    @property
    def legacy(self) -> bool:
        """True when the device presents the legacy (virtio 0.9.5) interface."""
        return self._legacy is not None

    @property
    def legacy_interface(self) -> LegacyInterface | None:
        return self._legacy

    def any_queue_enabled(self) -> bool:
        return any(s.vq is not None for s in self._slots.values())

    def config_changed(self, effects: list[Effect], notify: bool = True) -> None:
        """A device-side config change: always a new generation; an interrupt if DRIVER_OK
        (QEMU's virtio_notify_config() is a no-op before DRIVER_OK, protocol.md 2.4)."""
        self.state.config_generation += 1
        if notify and self.state.status & DRIVER_OK:
            effects.append(ConfigChanged())

    def _needs_reset(self, reason: str) -> list[Effect]:
        effects: list[Effect] = []
        if self.state.status & NEEDS_RESET:
            return effects
        self.count("needs_reset", "%s", reason)
        self.state.status |= NEEDS_RESET
        effects.append(NeedsReset(reason))
        # protocol.md 2.2: setting NEEDS_RESET while DRIVER_OK requires a config notification.
        # A legacy driver has no such bit to read (the device only goes quiet, as QEMU's
        # broken legacy devices do), so there is nothing to notify it of.
        self.config_changed(effects, notify=self._legacy is None)
        return effects

    # == features and status ==================================================================
    @property
    def device_features(self) -> int:
        return self._visible

    @property
    def driver_features(self) -> int:
        return self.state.driver_features

    def write_driver_features(self, value: int) -> None:
        if self._legacy is not None:
            self._legacy.write_features(value)
            return
        if self.state.status & FEATURES_OK:
            # virtio 1.x 3.1.1: features are fixed once FEATURES_OK is set.
            self.count("features_write_after_features_ok", "driver features %#x written after "
                       "FEATURES_OK (kept %#x)", value, self.state.driver_features)
            return
        if value < 0 or value > U64_MASK:
            self.count("features_write_out_of_range", "driver features %#x", value)
            value &= U64_MASK
        self.state.driver_features = value

    def _validate_features(self) -> bool:
        f = self.state.driver_features
        if f & ~self._offered:
            self.count("features_not_offered", "driver accepted %#x, offered %#x (extra %#x)",
                       f, self._offered, f & ~self._offered)
            return False
        if not has(f, VIRTIO_F_VERSION_1):
            self.count("features_no_version_1", "driver features %#x lack VERSION_1; no legacy "
                       "interface is implemented", f)
            return False
        if has(self._offered, VIRTIO_BALLOON_F_MUST_TELL_HOST) and not has(
                f, VIRTIO_BALLOON_F_MUST_TELL_HOST):
            self.checker.must_tell_host_declined(f, legacy=False)
            if self.cfg.refuse_without_must_tell_host:
                # D-1: the device may refuse FEATURES_OK here.
                self.count("features_refused_must_tell_host", "refusing FEATURES_OK (D-1)")
                return False
        if self.layout_differs(f):
            self.count("features_queue_layout_mismatch", "driver features %#x decline an "
                       "offered queue before an accepted one: queue numbering would differ "
                       "(offered %#x)", f, self._offered)
            return False
        return True

    def layout_differs(self, f: int) -> bool:
        """Would a driver counting only the queues of features ``f`` number them differently
        from our compacted layout (protocol.md 3.3)? Never with fixed numbering."""
        if self.cfg.fixed_queue_numbering:
            return False
        theirs = queue_layout(f)
        return any(self._layout[q] != i for q, i in theirs.items())

    @property
    def status(self) -> int:
        if self._legacy is not None:
            return self.state.status & ~NEEDS_RESET  # no such bit in the legacy interface
        return self.state.status

    def write_status(self, v: int) -> list[Effect]:
        v &= 0xFF
        if v == 0:
            return self.reset()
        old = self.state.status
        verdict = judge_status_write(
            old, v, suspend_negotiated=self.negotiated(VIRTIO_F_SUSPEND),
            validate_features=self._validate_features, legacy=self._legacy is not None)
        for name in verdict.ignored:
            self.count(name, "status write %#04x (status %#04x): bit ignored", v, old)
        self.state.status = verdict.status
        if verdict.features_refused:
            log.info("FEATURES_OK refused for driver features %#x", self.state.driver_features)
        if verdict.broken is not None:
            self.count("status_bad_sequence", "%s (status was %#04x)", verdict.broken, old)
            return self._needs_reset(verdict.broken)
        effects: list[Effect] = []
        if verdict.newly_set & DRIVER_OK:
            effects += self._on_driver_ok()
        return effects

    def _on_driver_ok(self) -> list[Effect]:
        effects: list[Effect] = []
        if self._legacy is not None:
            self._legacy.check_features()
        if self.negotiated(VIRTIO_BALLOON_F_PAGE_POISON) and not self.state.poison_written:
            self.checker.poison_not_written()
        # Kicks that came before DRIVER_OK were not acted on (D-16); act on them now.
        for q in sorted(self.state.deferred_kicks):
            effects += self.notify(q)
        self.state.deferred_kicks.clear()
        return effects

    # == config space =========================================================================
    @property
    def config_generation(self) -> int:
        return self.state.config_generation

    @property
    def config_size(self) -> int:
        return self._config_size

    @property
    def poison_val(self) -> int:
        return self.state.poison_val

    @property
    def num_pages(self) -> int:
        return self.state.num_pages

    @property
    def actual(self) -> int:
        return self.state.actual

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config.read(offset, size)

    def write_config(self, offset: int, data: bytes) -> list[Effect]:
        return self._config.write(offset, data)

    # == queues ===============================================================================
    @property
    def num_queues(self) -> int:
        return self._num_queues

    def queue_layout(self) -> dict[BalloonQueue, int]:
        """Logical queue -> transport index (protocol.md 3.3)."""
        return dict(self._layout)

    def queue_max_size(self, q: int) -> int:
        slot = self._slots.get(q)
        return slot.max_size if slot is not None else 0

    def _slot(self, q: int, what: str) -> QueueSlot | None:
        slot = self._slots.get(q) if isinstance(q, int) else None
        if slot is None:
            self.count("queue_bad_index", "%s on queue %r: no such queue (%d queues)", what, q,
                       self._num_queues)
        return slot

    def set_queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        slot = self._slot(q, "set_queue")
        if slot is None:
            return
        if slot.vq is not None:
            self.count("queue_setup_while_enabled", "queue %d: set_queue while enabled ignored", q)
            return
        if self.state.status & DRIVER_OK:
            self.count("queue_setup_after_driver_ok", "queue %d: set_queue after DRIVER_OK "
                       "ignored", q)
            return
        # Packed queue sizes need not be powers of two (protocol.md 1.8); split ones must.
        pow2 = not self.negotiated(VIRTIO_F_RING_PACKED)
        if size <= 0 or size > slot.max_size or (pow2 and size & (size - 1)):
            self.count("queue_bad_size", "queue %d: size %d not a power of two <= %d", q, size,
                       slot.max_size)
            slot.configured = False
            return
        for name, addr, align in (("desc", desc, 16), ("driver", driver, 2),
                                  ("device", device, 4)):
            if addr < 0 or addr > U64_MASK or addr % align:
                self.count("queue_misaligned", "queue %d: %s area %#x not %d-aligned", q, name,
                           addr, align)
                slot.configured = False
                return
        slot.size, slot.desc, slot.driver, slot.device = size, desc, driver, device
        slot.configured = True

    def enable_queue(self, q: int) -> list[Effect]:
        slot = self._slot(q, "enable_queue")
        if slot is None or slot.vq is not None:
            return []
        if not slot.configured:
            self.count("queue_enable_unconfigured", "queue %d enabled without a valid set-up", q)
            return []
        if self._legacy is None and not self.state.status & FEATURES_OK:
            # (Legacy has no FEATURES_OK: its features hold from when they were written.)
            self.count("queue_enable_before_features_ok", "queue %d enabled before FEATURES_OK",
                       q)
            return []
        f = self.state.driver_features
        # RING_PACKED negotiated: every queue is packed (virtio 1.3 2.8); only offered when
        # DeviceConfig.offered_features asks for it (default off, as QEMU's packed=off).
        ring = PackedDeviceVirtqueue if has(f, VIRTIO_F_RING_PACKED) else DeviceVirtqueue
        slot.vq = ring(
            self.mem, slot.size, slot.desc, slot.driver, slot.device,
            event_idx=has(f, VIRTIO_F_RING_EVENT_IDX),
            indirect=has(f, VIRTIO_F_RING_INDIRECT_DESC),
            name=slot.logical.name.lower(), ram=self._ram_ranges_for_vq())
        return []

    def _ram_ranges_for_vq(self) -> list[tuple[int, int]] | None:
        """Where buffers may lie (V-8): guest RAM [0, ram_pages * 4 KiB), whose content may be
        modelled rather than byte-backed (hint and report ranges are only arithmetic), plus
        every byte-backed region. None (no ram_pages): the byte-backed regions only."""
        if self.cfg.ram_pages is None:
            return None
        ram = pages_to_bytes(self.cfg.ram_pages)
        return [(0, ram)] + [(r.gpa, r.size) for r in self.mem.regions]

    def set_queue_legacy(self, q: int, pfn: int, align: int = LEGACY_VRING_ALIGN) -> list[Effect]:
        """Legacy queue set-up: the driver gives one page frame number; the ring is one block
        there (protocol.md 1.7), of the queue's fixed size (a legacy driver cannot choose it).
        A non-zero pfn sets the queue up and enables it; 0 (Linux writes it when tearing a
        queue down, after a reset) sets nothing up."""
        if self._legacy is None:
            raise DeviceUsageError(f"set_queue_legacy(queue {q}): the device presents the modern "
                                   "interface (DeviceConfig.legacy is False)")
        slot = self._slot(q, "set_queue_legacy")
        if slot is None:
            return []
        return self._legacy.set_queue(q, slot.max_size, pfn, align)

    def queue_enabled(self, q: int) -> bool:
        slot = self._slots.get(q)
        return slot is not None and slot.vq is not None

    # == kicks ================================================================================
    def notify(self, q: int) -> list[Effect]:
        """A kick on transport queue ``q``. Never raises on guest data."""
        slot = self._slot(q, "notify")
        if slot is None:
            return []
        if slot.vq is None:
            self.count("notify_queue_not_enabled", "kick on queue %d that is not enabled", q)
            return []
        st = self.state.status
        if st & NEEDS_RESET:
            self.count("notify_while_needs_reset", "kick on queue %d ignored (needs reset)", q)
            return []
        if st & FAILED:
            self.count("notify_after_failed", "kick on queue %d ignored (driver FAILED)", q)
            return []
        if not st & DRIVER_OK:
            # D-16 / V-10: no buffer is used before DRIVER_OK; remember the kick for then.
            self.count("notify_before_driver_ok", "kick on queue %d before DRIVER_OK deferred", q)
            if slot.logical == BalloonQueue.REPORTING:
                self.checker.reporting_before_driver_ok()
            self.state.deferred_kicks.add(q)
            return []
        try:
            return self._process(q, slot, slot.vq)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not crash the VMM either
            log.exception("internal error while processing queue %d", q)
            self._counters["internal_error"] = self._counters.get("internal_error", 0) + 1
            return self._needs_reset(f"internal error on queue {q}: {type(e).__name__}: {e}")

    def _process(self, q: int, slot: QueueSlot, vq: Vq) -> list[Effect]:
        """Drain the queue: host effects of every pass in order, then one ``NotifyQueue`` if
        any pass asked for it, so the guest is told last even when a concurrent guest made us
        take several passes. After re-enabling notifications the ring is checked once more: a
        buffer the driver published between our last pop and the re-enable would otherwise
        get no kick (its avail idx already passed the avail_event we had written), and a real,
        concurrent guest would stall with that buffer pending.

        A ring that breaks in any pass (pop, push, notification area: ``RingBroken``) ends the
        drain in DEVICE_NEEDS_RESET; what earlier passes did (host effects, used elements
        already written and their notification) is still returned, since the device's state
        (e.g. the balloon's pfns) already reflects it."""
        effects: list[Effect] = []
        notify = False
        try:
            for _ in range(_MAX_PASSES_PER_KICK):
                batch = vq.pop_batch()
                if not len(batch):
                    # With EVENT_IDX, ask for a kick on the next buffer the driver adds.
                    vq.enable_notifications()
                    if vq.pending() == 0:
                        break
                    continue
                notify |= self._handle_batch(slot, vq, batch, effects)
            else:
                # The driver keeps adding as fast as we drain: leave the rest for the next kick,
                # which the driver will send because notifications stay enabled.
                self.count("kick_pass_limit", "queue %d: still busy after %d passes", q,
                           _MAX_PASSES_PER_KICK)
        except RingBroken as e:
            broken = self._needs_reset(f"queue {q} ({slot.logical.name.lower()}): {e}")
        else:
            broken = []
        if notify:
            effects.append(NotifyQueue(QueueIndex(q)))
        return effects + broken

    def _handle_batch(self, slot: QueueSlot, vq: Vq, batch: ChainBatch,
                      effects: list[Effect]) -> bool:
        """Act on popped chains: host effects go to ``host_sink`` or are appended to
        ``effects`` (before the used elements are written, so they survive a used ring that
        turns out broken); returns whether the driver wants a used-buffer notification."""
        host: list[Effect] = []
        used: list[tuple[int, int]] | np.ndarray  # (head, len) pairs, or heads used with len 0
        lq = slot.logical
        if lq == BalloonQueue.FREE_PAGE and self.batched_free_page:
            self._free_page.handle_batch(vq, batch, host)
            used = batch.heads  # every element used with len 0 (protocol.md 4.2), in order
        else:
            used = []
            self._handle_chains(lq, vq, batch.chains(), host, used)
        if self.host_sink is not None:
            # QEMU order: act on the buffers (discard, hint) before using them (D-3, D-4, D-15).
            if host:
                self.host_sink(host)
        else:
            effects += host
        if not len(used):
            return False
        # D-17: len 0 on every balloon used element
        if isinstance(used, np.ndarray):
            vq.push_heads(used)
        else:
            vq.push_many(used)
        return vq.should_notify()

    def _handle_chains(self, lq: BalloonQueue, vq: Vq, chains: list[Chain], host: list[Effect],
                       used: list[tuple[int, int]]) -> None:
        if lq == BalloonQueue.INFLATE or lq == BalloonQueue.DEFLATE:
            self._queues.pfns(lq, vq, chains, host, used)
        elif lq == BalloonQueue.STATS:
            self._queues.stats(vq, chains, host, used)
        elif lq == BalloonQueue.FREE_PAGE:
            self._free_page.handle(vq, chains, host, used)
        else:
            self._queues.reporting(chains, host, used)

    def malformed(self, lq: BalloonQueue, ch: Chain) -> None:
        self.count("malformed_chain", "%s head %d: %s (used with len 0)", lq.name.lower(),
                   ch.head, ch.error)

    def request_stats(self) -> list[Effect]:
        """Host asks for fresh statistics: give the held buffer back to the driver."""
        slot = self._slots.get(self._layout.get(BalloonQueue.STATS, -1))
        head = self.state.stats_head
        if slot is None or slot.vq is None or head is None or not self._live:
            return []
        self.state.stats_head = None
        try:
            slot.vq.push(head, 0)
            if slot.vq.should_notify():
                return [NotifyQueue(QueueIndex(self._layout[BalloonQueue.STATS]))]
        except RingBroken as e:
            return self._needs_reset(f"stats queue: {e}")
        return []


    # -- free page hinting: the host's requests (balloon_dev.free_page) -----------------------
    def free_page_start(self) -> list[Effect]:
        """Start a hint round: a new command id, published with a config interrupt."""
        return self._free_page.start()

    def free_page_stop(self) -> list[Effect]:
        """Stop hinting (D-8: whenever hints cannot be used, e.g. before a bitmap sync)."""
        return self._free_page.stop()

    def free_page_done(self) -> list[Effect]:
        """The host no longer needs the hinted pages (D-13); the driver may free them."""
        return self._free_page.done()

    def precopy_notify(self, event: PrecopyEvent, vm_running: bool) -> list[Effect]:
        """QEMU's precopy notifier (protocol.md 5.4)."""
        return self._free_page.precopy_notify(event, vm_running)

    def ram_mask(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray | None:
        """``ram_ranges`` for arrays (uint64): which ranges lie within RAM, None for all."""
        ram = self.cfg.ram_pages
        if ram is None:
            return None
        limit = np.uint64(pages_to_bytes(ram))
        # limit - lens wraps only where lens > limit, which the first term already refuses
        ok = (lens <= limit) & (addrs <= limit - lens)
        if ok.all():
            return None
        self.count("hint_range_not_ram", "%d hint ranges beyond RAM %#x dropped",
                   int(ok.size - np.count_nonzero(ok)), int(limit))
        return ok

    def ram_ranges(self, ranges: tuple[Range, ...]) -> list[Range]:
        """The ranges that lie within RAM (all when its size is unknown); the rest counted."""
        ram = self.cfg.ram_pages
        if ram is None:
            return list(ranges)
        limit = pages_to_bytes(ram)
        ok = [(a, n) for a, n in ranges if a + n <= limit]
        if len(ok) != len(ranges):
            self.count("hint_range_not_ram", "%d hint ranges beyond RAM %#x dropped",
                       len(ranges) - len(ok), limit)
        return ok

    # == host requests ========================================================================
    def set_target(self, num_pages: int) -> list[Effect]:
        """Ask the driver to hold ``num_pages`` 4 KiB pages in the balloon."""
        if not 0 <= num_pages <= U32_MAX:
            raise DeviceUsageError(f"set_target({num_pages}): num_pages is a le32 "
                                   f"(0..{U32_MAX:#x})")
        effects: list[Effect] = []
        if num_pages != self.state.num_pages:
            self.state.num_pages = num_pages
            self.config_changed(effects)
        return effects

    # == reset ================================================================================
    def reset(self) -> list[Effect]:
        """Back to power-on (see the module docstring for the three things kept)."""
        effects: list[Effect] = []
        self._free_page.fire(HintEvent.RESET, effects)
        if self.state.actual:
            effects.append(ActualChanged(0))
        gen = self.state.config_generation
        num_pages = self.state.num_pages
        self.state = DeviceState(num_pages=num_pages, config_generation=gen + 1)
        self.checker.reset()
        if self._legacy is not None:
            self._legacy.reset()
        for slot in self._slots.values():
            # Keep the queue's guest-error counts: counters cover the device's whole life.
            _fold_queue_counters(slot, self._counters)
            slot.vq = None
            slot.configured = False
            slot.size = slot.desc = slot.driver = slot.device = 0
        self._queues.reset()
        return effects


def _fold_queue_counters(slot: QueueSlot, into: dict[str, int]) -> None:
    """Add the slot's live queue counters to ``into`` as "<queue>.<name>"."""
    if slot.vq is None:
        return
    prefix = slot.logical.name.lower()
    for k, v in slot.vq.counters.items():
        key = f"{prefix}.{k}"
        into[key] = into.get(key, 0) + v
