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
- (Modern interface; see "Legacy interface" below for the other one.)
  FEATURES_OK is refused when the driver's features are not a subset of the offered ones, lack
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

Driver checker (``dr_violations``)
---------------------------------
The device also judges the driver against protocol.md 4.6 DR-n where it can see the breach; each
one is logged at warning with its id and counted in ``dr_violations`` and in ``counters``.

Observable here:
- DR-1: MUST_TELL_HOST offered and not accepted (a "should").
- DR-6: a deflate names a pfn that is not in the balloon (never inflated, or deflated already).
- DR-8: a second stats buffer while the device holds one; a duplicate tag in one buffer; a
  buffer whose tag set differs from the previous buffer's.
- DR-9: a free_page_vq out buffer that is not exactly 4 bytes; a second start for an id.
- DR-10: a hint after the driver's own STOP (or before its first start) and before its next
  matching start. Hints that race with a host-published STOP are not counted: the driver may
  not have seen the change yet.
- DR-12: ``poison_val`` changed after DRIVER_OK; PAGE_POISON negotiated but ``poison_val``
  never written before DRIVER_OK.
- DR-13 (in part): free page reporting kicked before DRIVER_OK.
- DR-7 (legacy interface only): a write to ``actual`` that is not one 4-byte write.

Not observable from the device (it cannot see guest page contents, page use or intentions):
DR-2 (whether the guest poisons or zeroes freed pages, and what it expects of them), DR-3 and
the rest of DR-7 (inflate/deflate/actual timing: the driver may batch, so no single moment is
wrong), DR-4, DR-5, DR-11 and the rest of DR-13 (page use and page contents).

Legacy interface (``DeviceConfig.legacy``)
------------------------------------------
The same core can present the virtio 0.9.5 interface a legacy driver speaks (protocol.md 1.7,
3.2-3.5, 4.6). What differs, and only with ``legacy=True``:

- Features: one 32-bit word; the driver sees bits 0-31 of the offered features (never
  VERSION_1) and its write is taken at once, minus bits not offered (counted). There is no
  FEATURES_OK (``status.LEGACY_PREREQUISITES``: DRIVER_OK follows DRIVER), so nothing can be
  refused: a driver that declines MUST_TELL_HOST is served whatever
  ``refuse_without_must_tell_host`` says (D-2), only noted as DR-1 at DRIVER_OK. Without
  MUST_TELL_HOST the driver may reuse balloon pages before the deflate is used; the device asks
  nothing else of it. Feature writes after a ring is set up are ignored and counted (the rings
  were built for the earlier ones).
- ``actual`` (D-5): config reads show the bytes as written, but the device acts on the value
  (``actual``, ``ActualChanged``) only when a write covers its most significant byte (offset 7),
  so a driver writing it byte by byte, low to high, is never taken at a half-written value.
  A write that is not all 4 bytes at once is noted as DR-7. Config fields stay little-endian
  (protocol.md 3.2); config writes are accepted at any time (no FEATURES_OK step).
- Statistics (D-7): the first stats buffer after initialisation is held, as always, but its
  values are not read (no ``StatsReceived``, no DR-8 tag-set baseline); counted as
  ``stats_first_buffer_ignored``.
- Endianness: legacy rings, pfn arrays and stats entries are guest-endian. The device assumes a
  little-endian guest (x86-64, and arm64 as Linux runs it), where guest-endian is little-endian,
  so they are read exactly as on the modern interface. Big-endian legacy guests are not served.
- Rings: a transport that has only the legacy single address calls ``set_queue_legacy(q, pfn)``
  (one block at ``pfn << 12``, the queue's fixed size, used ring on the next 4 KiB); a
  transport that knows the three addresses may keep using ``set_queue``.
- DEVICE_NEEDS_RESET does not exist there: a broken ring still stops the device (and emits
  ``NeedsReset`` for the host), but ``status`` does not show the bit and no config interrupt is
  sent.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from balloon_dev.effects import (
    ActualChanged,
    ConfigChanged,
    Deflated,
    Effect,
    HintRoundStopped,
    Inflated,
    NeedsReset,
    NotifyQueue,
    PagesHinted,
    PagesReported,
    PrecopyEvent,
    Range,
    StatsReceived,
)
from balloon_dev.hint import START as HINT_START
from balloon_dev.hint import Act, HintEvent, HintSession
from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from balloon_dev.status import (
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    NEEDS_RESET,
    judge_status_write,
)
from balloon_dev.virtqueue import Chain, DeviceVirtqueue, RingBroken
from guestmem.memory import GuestMemory
from protocol.balloon import (
    CFG_ACTUAL,
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    CFG_POISON_VAL,
    QEMU_FREE_PAGE_QUEUE_SIZE,
    QEMU_QUEUE_SIZE,
    QEMU_REPORTING_QUEUE_SIZE,
    STAT_ENTRY_SIZE,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
    StatTag,
    config_size,
    queue_layout,
)
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_SUSPEND,
    VIRTIO_F_UNUSED_30,
    VIRTIO_F_VERSION_1,
    feature_mask,
)
from protocol.virtqueue import VIRTQ_MAX_SIZE, avail_ring_size, desc_table_size

log = logging.getLogger(__name__)

#: Either ring layout; the device uses both through the same methods.
_Vq = DeviceVirtqueue | PackedDeviceVirtqueue

#: Legacy virtio-pci's ring alignment (the used ring starts on the next 4 KiB boundary).
LEGACY_VRING_ALIGN = 4096
#: Bound on drain passes per kick (each pass pops up to a queue's worth of buffers).
_MAX_PASSES_PER_KICK = 64

U32_MAX = 0xFFFFFFFF
U64_MASK = (1 << 64) - 1

#: RING_PACKED is not in the default set: QEMU's virtio devices default to packed=off, so a
#: guest of a default QEMU balloon never sees packed rings; offer it explicitly to test them.
DEFAULT_OFFERED_FEATURES = feature_mask(
    VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC)

#: Largest inflate/deflate buffer we read (Linux sends <= 1 KiB; 1 MiB = 256 Ki pfns = 1 GiB).
MAX_PFN_BUFFER = 1 << 20
#: Largest stats buffer we read: 64 entries (Linux sends <= 16).
MAX_STATS_BUFFER = 64 * STAT_ENTRY_SIZE
#: The packed stats entry (protocol.md 3.5) as a numpy record.
_STAT_DTYPE = np.dtype([("tag", "<u2"), ("val", "<u8")])  # itemsize 10, no padding
_CONFIG_FIELDS = ((CFG_NUM_PAGES, "num_pages"), (CFG_ACTUAL, "actual"),
                  (CFG_FREE_PAGE_HINT_CMD_ID, "free_page_hint_cmd_id"),
                  (CFG_POISON_VAL, "poison_val"))


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How the device is built (host choices, fixed for its life)."""

    offered_features: int = DEFAULT_OFFERED_FEATURES
    #: Per logical queue (inflate, deflate, stats, free_page, reporting): QEMU's sizes.
    queue_sizes: tuple[int, int, int, int, int] = (
        QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, QEMU_FREE_PAGE_QUEUE_SIZE,
        QEMU_REPORTING_QUEUE_SIZE)
    fixed_queue_numbering: bool = False
    #: QEMU reads free_page_hint_cmd_id as 0 while START (protocol.md 5.2); default: the id.
    qemu_cmd_id_read: bool = False
    #: D-1: refuse FEATURES_OK when MUST_TELL_HOST is offered and not accepted.
    refuse_without_must_tell_host: bool = False
    #: Guest RAM size in 4 KiB pages (RAM is [0, ram_pages * 4 KiB)), if known: pfns and hint /
    #: report ranges beyond it are not RAM and are skipped and counted (QEMU skips non-RAM
    #: pfns), and descriptors may point into RAM that is not byte-backed (a simulated guest's
    #: RAM is modelled by PageVersions; V-8 is checked against RAM plus the byte-backed
    #: regions). None: buffers must lie in byte-backed regions; pfns are not bound-checked.
    ram_pages: int | None = None
    #: The legacy (virtio 0.9.5) interface instead of the modern one (module docstring, "Legacy
    #: interface"): the driver sees only bits 0-31 of ``offered_features`` (so no VERSION_1;
    #: offering it is allowed, as a transitional device does on its modern interface), features
    #: are taken when written and never refused (D-2), ``actual`` is acted on once its most
    #: significant byte is written (D-5), the first stats buffer's values are ignored (D-7), and
    #: ``set_queue_legacy(q, pfn)`` places a ring from one address (protocol.md 1.7).
    #: ``refuse_without_must_tell_host`` does not apply to the legacy interface (D-2).
    legacy: bool = False

    def __post_init__(self) -> None:
        f = self.offered_features
        if not self.legacy and not _has(f, VIRTIO_F_VERSION_1):
            raise ValueError("DeviceConfig.offered_features: a virtio 1.x device must offer "
                             "VERSION_1 (bit 32); a legacy device needs legacy=True")
        if _has(f, VIRTIO_F_UNUSED_30):
            raise ValueError("DeviceConfig.offered_features: bit 30 must never be offered")
        if f < 0 or f > U64_MASK:
            raise ValueError(f"DeviceConfig.offered_features {f:#x} is not a 64-bit value")
        if len(self.queue_sizes) != 5:
            raise ValueError("DeviceConfig.queue_sizes needs 5 sizes (inflate, deflate, stats, "
                             "free_page, reporting)")
        for q, n in zip(BalloonQueue, self.queue_sizes, strict=True):
            if n <= 0 or n > VIRTQ_MAX_SIZE or n & (n - 1):
                raise ValueError(f"DeviceConfig.queue_sizes[{q.name}] = {n} is not a power of "
                                 "two <= 32768")
        if self.ram_pages is not None and self.ram_pages <= 0:
            raise ValueError(f"DeviceConfig.ram_pages = {self.ram_pages} must be positive")


@dataclass(slots=True)
class _QueueSlot:
    logical: BalloonQueue
    max_size: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    configured: bool = False
    vq: _Vq | None = None


@dataclass(slots=True)
class DeviceState:
    """The device's mutable, guest-visible state apart from queues and the hint session."""

    status: int = 0
    driver_features: int = 0
    num_pages: int = 0
    actual: int = 0
    poison_val: int = 0
    poison_written: bool = False
    config_generation: int = 0
    stats_head: int | None = None
    stats_tags: frozenset[int] | None = None
    #: Legacy: a stats buffer has arrived since initialisation (D-7: the first one's values are
    #: ignored).
    stats_first_seen: bool = False
    #: Legacy: ``actual`` as the driver has written it so far, byte by byte (what config reads
    #: show); ``actual`` is the value acted on, taken from here when the most significant byte
    #: is written (D-5).
    actual_written: int = 0
    last_started_id: int | None = None
    driver_stopped: bool = True  # no hint round opened by the driver yet
    deferred_kicks: set[int] = field(default_factory=set)


class _Ballooned:
    """Which pfns are in the balloon: a packed bitmap when RAM size is known, else a set."""

    def __init__(self, ram_pages: int | None) -> None:
        self.ram_pages = ram_pages
        self._bits: np.ndarray | None = None  # allocated on first use
        self._set: set[int] = set()

    def _bitmap(self) -> np.ndarray:
        if self._bits is None:
            assert self.ram_pages is not None
            self._bits = np.zeros((self.ram_pages + 7) // 8, dtype=np.uint8)
        return self._bits

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        if self.ram_pages is None:
            return np.fromiter((int(p) in self._set for p in pfns.tolist()), dtype=np.bool_,
                               count=pfns.size)
        bits = self._bitmap()
        return (bits[pfns >> 3] >> (pfns & 7).astype(np.uint8) & 1).astype(np.bool_)

    def set(self, pfns: np.ndarray, value: bool) -> None:
        if self.ram_pages is None:
            if value:
                self._set.update(pfns.tolist())
            else:
                self._set.difference_update(pfns.tolist())
            return
        bits = self._bitmap()
        u = np.unique(pfns)
        masks = (np.uint8(1) << (u & 7).astype(np.uint8)).astype(np.uint8)
        # np.unique keeps one entry per pfn, but several pfns share a byte: accumulate per byte.
        if value:
            np.bitwise_or.at(bits, u >> 3, masks)
        else:
            np.bitwise_and.at(bits, u >> 3, ~masks)

    def clear(self) -> None:
        self._bits = None
        self._set.clear()


class BalloonDevice:
    def __init__(self, mem: GuestMemory, cfg: DeviceConfig | None = None) -> None:
        self.mem = mem
        self.cfg = cfg if cfg is not None else DeviceConfig()
        self._offered = self.cfg.offered_features
        self._legacy = self.cfg.legacy
        #: What the driver is shown: the legacy interface has one 32-bit feature word.
        self._visible = self._offered & U32_MAX if self._legacy else self._offered
        self._config_size = config_size(self._offered)
        self._layout = queue_layout(self._offered, fixed=self.cfg.fixed_queue_numbering)
        self._num_queues = max(self._layout.values()) + 1
        self._slots: dict[int, _QueueSlot] = {
            tq: _QueueSlot(lq, self.cfg.queue_sizes[int(lq)]) for lq, tq in self._layout.items()}
        self.state = DeviceState()
        self.hint = HintSession(qemu_cmd_id_read=self.cfg.qemu_cmd_id_read)
        self._ballooned = _Ballooned(self.cfg.ram_pages)
        self._counters: dict[str, int] = {}
        self.dr_violations: dict[str, int] = {}
        #: If set, the host effects of a kick are handed to this callable *before* the used
        #: elements are written to guest memory, and not returned. For transports whose guest
        #: runs concurrently with the device (vfio-user): otherwise the guest could see a
        #: buffer used (by polling) before the host discarded its pages. The sink must not
        #: call back into the device. Unset (in-process, where the guest runs only between
        #: device calls): host effects are returned in order, before the NotifyQueue.
        self.host_sink: Callable[[list[Effect]], None] | None = None

    # == bookkeeping ==========================================================================
    def _count(self, name: str, fmt: str, *args: object, level: int = logging.WARNING,
               n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n
        log.log(level, "guest error %s: " + fmt, name, *args)

    def _dr(self, dr_id: str, fmt: str, *args: object, n: int = 1) -> None:
        """A driver requirement (protocol.md 4.6 DR-n) the driver broke (``n`` times)."""
        self.dr_violations[dr_id] = self.dr_violations.get(dr_id, 0) + n
        self._counters[dr_id] = self._counters.get(dr_id, 0) + n
        log.warning("driver broke %s: " + fmt, dr_id, *args)

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

    def _negotiated(self, bit: int) -> bool:
        if self._legacy:
            # Legacy features hold from the moment they are written (no FEATURES_OK step).
            return _has(self.state.driver_features, bit)
        return bool(self.state.status & FEATURES_OK) and _has(self.state.driver_features, bit)

    @property
    def legacy(self) -> bool:
        """True when the device presents the legacy (virtio 0.9.5) interface."""
        return self._legacy

    def _config_changed(self, effects: list[Effect], notify: bool = True) -> None:
        """A device-side config change: always a new generation; an interrupt if DRIVER_OK
        (QEMU's virtio_notify_config() is a no-op before DRIVER_OK, protocol.md 2.4)."""
        self.state.config_generation += 1
        if notify and self.state.status & DRIVER_OK:
            effects.append(ConfigChanged())

    def _needs_reset(self, reason: str) -> list[Effect]:
        effects: list[Effect] = []
        if self.state.status & NEEDS_RESET:
            return effects
        self._count("needs_reset", "%s", reason)
        self.state.status |= NEEDS_RESET
        effects.append(NeedsReset(reason))
        # protocol.md 2.2: setting NEEDS_RESET while DRIVER_OK requires a config notification.
        # A legacy driver has no such bit to read (the device only goes quiet, as QEMU's
        # broken legacy devices do), so there is nothing to notify it of.
        self._config_changed(effects, notify=not self._legacy)
        return effects

    # == features and status ==================================================================
    @property
    def device_features(self) -> int:
        return self._visible

    @property
    def driver_features(self) -> int:
        return self.state.driver_features

    def write_driver_features(self, value: int) -> None:
        if self._legacy:
            self._write_legacy_features(value)
            return
        if self.state.status & FEATURES_OK:
            # virtio 1.x 3.1.1: features are fixed once FEATURES_OK is set.
            self._count("features_write_after_features_ok", "driver features %#x written after "
                        "FEATURES_OK (kept %#x)", value, self.state.driver_features)
            return
        if value < 0 or value > U64_MASK:
            self._count("features_write_out_of_range", "driver features %#x", value)
            value &= U64_MASK
        self.state.driver_features = value

    def _write_legacy_features(self, value: int) -> None:
        """Legacy: one 32-bit word, taken as written; nothing can be refused (D-2)."""
        if self.state.status & DRIVER_OK or any(s.vq is not None for s in self._slots.values()):
            # The rings were built for the features written before them (event idx, indirect).
            self._count("features_write_after_queue_setup", "legacy driver features %#x written "
                        "after queue set-up or DRIVER_OK (kept %#x)", value,
                        self.state.driver_features)
            return
        if value < 0 or value > U32_MAX:
            self._count("features_write_out_of_range", "legacy driver features %#x: only bits "
                        "0-31 exist", value)
            value &= U32_MAX
        if value & ~self._visible:
            # No FEATURES_OK to refuse with: keep the offered part, as QEMU does.
            self._count("features_not_offered", "legacy driver accepted %#x, offered %#x "
                        "(extra %#x dropped)", value, self._visible, value & ~self._visible)
            value &= self._visible
        self.state.driver_features = value

    def _check_legacy_features(self) -> None:
        """At DRIVER_OK, a legacy driver's final features: note what a modern device would
        have refused, refuse nothing (D-2: the legacy interface cannot report a refusal)."""
        f = self.state.driver_features
        if _has(self._visible, VIRTIO_BALLOON_F_MUST_TELL_HOST) and not _has(
                f, VIRTIO_BALLOON_F_MUST_TELL_HOST):
            # D-2: a legacy driver without MUST_TELL_HOST is served (refuse_without_must_tell_host
            # is a modern-interface choice); the driver still broke a "should".
            self._dr("DR-1", "MUST_TELL_HOST offered and not accepted (legacy features %#x)", f)
        if self._layout_differs(f):
            self._count("features_queue_layout_mismatch", "legacy driver features %#x decline "
                        "an offered queue before an accepted one: its queue numbering differs "
                        "from ours (offered %#x)", f, self._visible)

    def _validate_features(self) -> bool:
        f = self.state.driver_features
        if f & ~self._offered:
            self._count("features_not_offered", "driver accepted %#x, offered %#x (extra %#x)",
                        f, self._offered, f & ~self._offered)
            return False
        if not _has(f, VIRTIO_F_VERSION_1):
            self._count("features_no_version_1", "driver features %#x lack VERSION_1; no legacy "
                        "interface is implemented", f)
            return False
        if _has(self._offered, VIRTIO_BALLOON_F_MUST_TELL_HOST) and not _has(
                f, VIRTIO_BALLOON_F_MUST_TELL_HOST):
            self._dr("DR-1", "MUST_TELL_HOST offered and not accepted (features %#x)", f)
            if self.cfg.refuse_without_must_tell_host:
                # D-1: the device may refuse FEATURES_OK here.
                self._count("features_refused_must_tell_host", "refusing FEATURES_OK (D-1)")
                return False
        if self._layout_differs(f):
            self._count("features_queue_layout_mismatch", "driver features %#x decline an "
                        "offered queue before an accepted one: queue numbering would differ "
                        "(offered %#x)", f, self._offered)
            return False
        return True

    def _layout_differs(self, f: int) -> bool:
        """Would a driver counting only the queues of features ``f`` number them differently
        from our compacted layout (protocol.md 3.3)? Never with fixed numbering."""
        if self.cfg.fixed_queue_numbering:
            return False
        theirs = queue_layout(f)
        return any(self._layout[q] != i for q, i in theirs.items())

    @property
    def status(self) -> int:
        if self._legacy:
            return self.state.status & ~NEEDS_RESET  # no such bit in the legacy interface
        return self.state.status

    def write_status(self, v: int) -> list[Effect]:
        v &= 0xFF
        if v == 0:
            return self.reset()
        old = self.state.status
        verdict = judge_status_write(
            old, v, suspend_negotiated=self._negotiated(VIRTIO_F_SUSPEND),
            validate_features=self._validate_features, legacy=self._legacy)
        for name in verdict.ignored:
            self._count(name, "status write %#04x (status %#04x): bit ignored", v, old)
        self.state.status = verdict.status
        if verdict.features_refused:
            log.info("FEATURES_OK refused for driver features %#x", self.state.driver_features)
        if verdict.broken is not None:
            self._count("status_bad_sequence", "%s (status was %#04x)", verdict.broken, old)
            return self._needs_reset(verdict.broken)
        effects: list[Effect] = []
        if verdict.newly_set & DRIVER_OK:
            effects += self._on_driver_ok()
        return effects

    def _on_driver_ok(self) -> list[Effect]:
        effects: list[Effect] = []
        if self._legacy:
            self._check_legacy_features()
        if self._negotiated(VIRTIO_BALLOON_F_PAGE_POISON) and not self.state.poison_written:
            self._dr("DR-12", "PAGE_POISON negotiated but poison_val not written before DRIVER_OK")
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

    def _config_bytes(self) -> bytes:
        s = self.state
        # Little-endian even on the legacy interface (protocol.md 3.2). Legacy reads show
        # ``actual`` as written so far, including a half-written value (D-5).
        actual = s.actual_written if self._legacy else s.actual
        raw = struct.pack("<IIII", s.num_pages, actual, self.hint.config_value(), s.poison_val)
        return raw[:self._config_size]

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"read_config(offset={offset}, size={size}): negative")
        if offset + size > self._config_size:
            # QEMU answers reads past the window with all ones.
            self._count("config_read_out_of_range", "read [%#x, +%#x) past config size %#x",
                        offset, size, self._config_size)
            return b"\xff" * size
        return self._config_bytes()[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> list[Effect]:
        if offset < 0:
            raise ValueError(f"write_config(offset={offset}): negative")
        data = bytes(data)
        effects: list[Effect] = []
        end = offset + len(data)
        if end > self._config_size:
            self._count("config_write_out_of_range", "write [%#x, +%#x) past config size %#x "
                        "(ignored past the end)", offset, len(data), self._config_size)
            data = data[:max(self._config_size - offset, 0)]
            end = offset + len(data)
        if not data:
            return effects
        if not self._legacy and not self.state.status & FEATURES_OK:
            # protocol.md 2.3 step 4: config may be read, not written, before FEATURES_OK.
            # (The legacy interface has no such step: its config is writable at any time.)
            self._count("config_write_before_features_ok", "write [%#x, +%#x) = %s ignored",
                        offset, len(data), data.hex())
            return effects
        cur = bytearray(self._config_bytes())
        new = bytearray(cur)
        new[offset:end] = data
        for foff, name in _CONFIG_FIELDS:
            if foff >= self._config_size or not (offset < foff + 4 and foff < end):
                continue
            old_v = int.from_bytes(cur[foff:foff + 4], "little")
            new_v = int.from_bytes(new[foff:foff + 4], "little")
            if name in ("num_pages", "free_page_hint_cmd_id"):
                self._count("config_write_readonly", "driver wrote read-only %s at %#x "
                            "(%#x -> %#x ignored)", name, foff, old_v, new_v)
            elif name == "actual":
                if self._legacy:
                    effects += self._write_legacy_actual(offset, end, new_v)
                elif new_v != old_v:
                    self.state.actual = new_v
                    effects.append(ActualChanged(new_v))
            elif name == "poison_val":
                effects += self._write_poison(old_v, new_v)
        return effects

    def _write_legacy_actual(self, offset: int, end: int, new_v: int) -> list[Effect]:
        """A legacy write touching ``actual`` (``new_v``: the field with it applied)."""
        self.state.actual_written = new_v
        if not (offset <= CFG_ACTUAL and end >= CFG_ACTUAL + 4):
            # DR-7 (legacy): all 4 bytes in one write. Old Linux wrote them one by one.
            self._dr("DR-7", "legacy write of `actual` bytes [%#x, %#x) is not one 4-byte write",
                     max(offset, CFG_ACTUAL), min(end, CFG_ACTUAL + 4))
        if end < CFG_ACTUAL + 4:
            # D-5: until its most significant byte is written the value is half-written; the
            # device must not act on it (e.g. report a bogus balloon size to the host).
            return []
        if new_v == self.state.actual:
            return []
        self.state.actual = new_v
        return [ActualChanged(new_v)]

    def _write_poison(self, old_v: int, new_v: int) -> list[Effect]:
        if not self._negotiated(VIRTIO_BALLOON_F_PAGE_POISON):
            self._count("config_write_poison_not_negotiated", "poison_val write %#x ignored: "
                        "PAGE_POISON not negotiated", new_v)
            return []
        if self.state.status & DRIVER_OK:
            # DR-12: poison_val is written before DRIVER_OK and never changed afterwards.
            if new_v != old_v:
                self._dr("DR-12", "poison_val changed after DRIVER_OK (%#x -> %#x, ignored)",
                         old_v, new_v)
            return []
        self.state.poison_val = new_v
        self.state.poison_written = True
        return []

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

    def _slot(self, q: int, what: str) -> _QueueSlot | None:
        slot = self._slots.get(q) if isinstance(q, int) else None
        if slot is None:
            self._count("queue_bad_index", "%s on queue %r: no such queue (%d queues)", what, q,
                        self._num_queues)
        return slot

    def set_queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        slot = self._slot(q, "set_queue")
        if slot is None:
            return
        if slot.vq is not None:
            self._count("queue_setup_while_enabled", "queue %d: set_queue while enabled ignored", q)
            return
        if self.state.status & DRIVER_OK:
            self._count("queue_setup_after_driver_ok", "queue %d: set_queue after DRIVER_OK "
                        "ignored", q)
            return
        # Packed queue sizes need not be powers of two (protocol.md 1.8); split ones must.
        pow2 = not self._negotiated(VIRTIO_F_RING_PACKED)
        if size <= 0 or size > slot.max_size or (pow2 and size & (size - 1)):
            self._count("queue_bad_size", "queue %d: size %d not a power of two <= %d", q, size,
                        slot.max_size)
            slot.configured = False
            return
        for name, addr, align in (("desc", desc, 16), ("driver", driver, 2),
                                  ("device", device, 4)):
            if addr < 0 or addr > U64_MASK or addr % align:
                self._count("queue_misaligned", "queue %d: %s area %#x not %d-aligned", q, name,
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
            self._count("queue_enable_unconfigured", "queue %d enabled without a valid set-up", q)
            return []
        if not self._legacy and not self.state.status & FEATURES_OK:
            # (Legacy has no FEATURES_OK: its features hold from when they were written.)
            self._count("queue_enable_before_features_ok", "queue %d enabled before FEATURES_OK",
                        q)
            return []
        f = self.state.driver_features
        # RING_PACKED negotiated: every queue is packed (virtio 1.3 2.8); only offered when
        # DeviceConfig.offered_features asks for it (default off, as QEMU's packed=off).
        ring = PackedDeviceVirtqueue if _has(f, VIRTIO_F_RING_PACKED) else DeviceVirtqueue
        slot.vq = ring(
            self.mem, slot.size, slot.desc, slot.driver, slot.device,
            event_idx=_has(f, VIRTIO_F_RING_EVENT_IDX),
            indirect=_has(f, VIRTIO_F_RING_INDIRECT_DESC),
            name=slot.logical.name.lower(), ram=self._ram_ranges_for_vq())
        return []

    def _ram_ranges_for_vq(self) -> list[tuple[int, int]] | None:
        """Where buffers may lie (V-8): guest RAM [0, ram_pages * 4 KiB), whose content may be
        modelled rather than byte-backed (hint and report ranges are only arithmetic), plus
        every byte-backed region. None (no ram_pages): the byte-backed regions only."""
        if self.cfg.ram_pages is None:
            return None
        return [(0, self.cfg.ram_pages << 12)] + [(r.gpa, r.size) for r in self.mem.regions]

    def set_queue_legacy(self, q: int, pfn: int, align: int = LEGACY_VRING_ALIGN) -> list[Effect]:
        """Legacy queue set-up: the driver gives one page frame number; the ring is one block
        there (protocol.md 1.7), of the queue's fixed size (a legacy driver cannot choose it).
        A non-zero pfn sets the queue up and enables it; 0 (Linux writes it when tearing a
        queue down, after a reset) sets nothing up."""
        if not self._legacy:
            raise ValueError(f"set_queue_legacy(queue {q}): the device presents the modern "
                             "interface (DeviceConfig.legacy is False)")
        slot = self._slot(q, "set_queue_legacy")
        if slot is None or pfn == 0:
            return []
        if pfn < 0 or pfn << 12 > U64_MASK:
            self._count("queue_bad_pfn", "queue %d: legacy pfn %#x out of range", q, pfn)
            return []
        desc, driver, device = legacy_ring_layout(pfn << 12, slot.max_size, align)
        self.set_queue(q, slot.max_size, desc, driver, device)
        return self.enable_queue(q)

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
            self._count("notify_queue_not_enabled", "kick on queue %d that is not enabled", q)
            return []
        st = self.state.status
        if st & NEEDS_RESET:
            self._count("notify_while_needs_reset", "kick on queue %d ignored (needs reset)", q)
            return []
        if st & FAILED:
            self._count("notify_after_failed", "kick on queue %d ignored (driver FAILED)", q)
            return []
        if not st & DRIVER_OK:
            # D-16 / V-10: no buffer is used before DRIVER_OK; remember the kick for then.
            self._count("notify_before_driver_ok", "kick on queue %d before DRIVER_OK deferred", q)
            if slot.logical == BalloonQueue.REPORTING:
                self._dr("DR-13", "free page reporting kicked before DRIVER_OK")
            self.state.deferred_kicks.add(q)
            return []
        try:
            return self._process(q, slot, slot.vq)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not crash the VMM either
            log.exception("internal error while processing queue %d", q)
            self._counters["internal_error"] = self._counters.get("internal_error", 0) + 1
            return self._needs_reset(f"internal error on queue {q}: {type(e).__name__}: {e}")

    def _process(self, q: int, slot: _QueueSlot, vq: _Vq) -> list[Effect]:
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
                chains = vq.pop_many()
                if not chains:
                    # With EVENT_IDX, ask for a kick on the next buffer the driver adds.
                    vq.enable_notifications()
                    if vq.pending() == 0:
                        break
                    continue
                notify |= self._handle_chains(slot, vq, chains, effects)
            else:
                # The driver keeps adding as fast as we drain: leave the rest for the next kick,
                # which the driver will send because notifications stay enabled.
                self._count("kick_pass_limit", "queue %d: still busy after %d passes", q,
                            _MAX_PASSES_PER_KICK)
        except RingBroken as e:
            broken = self._needs_reset(f"queue {q} ({slot.logical.name.lower()}): {e}")
        else:
            broken = []
        if notify:
            effects.append(NotifyQueue(q))
        return effects + broken

    def _handle_chains(self, slot: _QueueSlot, vq: _Vq, chains: list[Chain],
                       effects: list[Effect]) -> bool:
        """Act on popped chains: host effects go to ``host_sink`` or are appended to
        ``effects`` (before the used elements are written, so they survive a used ring that
        turns out broken); returns whether the driver wants a used-buffer notification."""
        host: list[Effect] = []
        used: list[tuple[int, int]] = []
        lq = slot.logical
        if lq == BalloonQueue.INFLATE or lq == BalloonQueue.DEFLATE:
            self._do_pfns(lq, vq, chains, host, used)
        elif lq == BalloonQueue.STATS:
            self._do_stats(vq, chains, host, used)
        elif lq == BalloonQueue.FREE_PAGE:
            self._do_free_page(vq, chains, host, used)
        else:
            self._do_reporting(chains, host, used)
        if self.host_sink is not None:
            # QEMU order: act on the buffers (discard, hint) before using them (D-3, D-4, D-15).
            if host:
                self.host_sink(host)
        else:
            effects += host
        if not used:
            return False
        vq.push_many(used)  # D-17: len 0 on every balloon used element
        return vq.should_notify()

    def _malformed(self, lq: BalloonQueue, ch: Chain) -> None:
        self._count("malformed_chain", "%s head %d: %s (used with len 0)", lq.name.lower(),
                    ch.head, ch.error)

    # -- inflate / deflate (protocol.md 3.4) --------------------------------------------------
    def _do_pfns(self, lq: BalloonQueue, vq: _Vq, chains: list[Chain],
                 effects: list[Effect], used: list[tuple[int, int]]) -> None:
        name = lq.name.lower()
        parts: list[np.ndarray] = []
        for ch in chains:
            used.append((ch.head, 0))
            if ch.error is not None:
                self._malformed(lq, ch)
                continue
            if ch.in_:
                self._count(f"{name}_writable_desc", "%s head %d: %d writable descriptors ignored",
                            name, ch.head, len(ch.in_))
            n = ch.out_len
            if n % 4:
                self._count(f"{name}_len_not_multiple_of_4", "%s head %d: %d bytes, trailing %d "
                            "ignored", name, ch.head, n, n % 4)
            if n > MAX_PFN_BUFFER:
                self._count(f"{name}_buffer_too_large", "%s head %d: %#x bytes, only the first "
                            "%#x read", name, ch.head, n, MAX_PFN_BUFFER)
                n = MAX_PFN_BUFFER
            data = vq.read_out(ch, n - n % 4)
            data = data[:len(data) - len(data) % 4]
            if data:
                parts.append(np.frombuffer(data, dtype="<u4").astype(np.int64))
        if not parts:
            return
        pfns = np.concatenate(parts)
        ram = self.cfg.ram_pages
        if ram is not None:
            bad = pfns >= ram
            if bad.any():
                self._count(f"{name}_pfn_not_ram", "%s: %d pfns beyond RAM (%#x pages) skipped, "
                            "first %#x", name, int(bad.sum()), ram, int(pfns[bad][0]))
                pfns = pfns[~bad]
        if pfns.size == 0:
            return
        inb = self._ballooned.contains(pfns)
        if lq == BalloonQueue.INFLATE:
            if inb.any():
                self._count("inflate_pfn_already_inflated", "%d pfns inflated twice, first %#x",
                            int(inb.sum()), int(pfns[inb][0]))
            self._ballooned.set(pfns, True)
            # D-3: the host may change these pages now, before the buffer is used.
            effects.append(Inflated(tuple(pfns.tolist())))
        else:
            if not inb.all():
                self._dr("DR-6", "deflate of %d pfns not in the balloon, first %#x (skipped)",
                         int((~inb).sum()), int(pfns[~inb][0]))
                pfns = pfns[inb]
            if pfns.size:
                self._ballooned.set(pfns, False)
                # D-4: with MUST_TELL_HOST the deflate is acknowledged by using the buffer,
                # which happens after the host has seen this effect.
                effects.append(Deflated(tuple(pfns.tolist())))

    # -- statistics (protocol.md 3.5) ---------------------------------------------------------
    def _do_stats(self, vq: _Vq, chains: list[Chain], effects: list[Effect],
                  used: list[tuple[int, int]]) -> None:
        for ch in chains:
            if ch.error is not None:
                self._malformed(BalloonQueue.STATS, ch)
                used.append((ch.head, 0))
                continue
            if self.state.stats_head is not None:
                # DR-8: one buffer outstanding at most. QEMU returns the old one and keeps the new.
                self._dr("DR-8", "second stats buffer (head %d) while holding head %d; the old "
                         "one is returned", ch.head, self.state.stats_head)
                used.append((self.state.stats_head, 0))
            self.state.stats_head = ch.head
            if self._legacy and not self.state.stats_first_seen:
                # D-7 (legacy): the first buffer after initialisation is kept (it is the one a
                # request for stats gives back) but its values are not read: old drivers posted
                # it uninitialised, so its tags say nothing about the driver either (DR-8).
                self.state.stats_first_seen = True
                self._count("stats_first_buffer_ignored", "stats head %d: first buffer since "
                            "initialisation, values ignored (legacy)", ch.head,
                            level=logging.INFO)
                continue
            if ch.in_:
                self._count("stats_writable_desc", "stats head %d: %d writable descriptors ignored",
                            ch.head, len(ch.in_))
            n = ch.out_len
            if n % STAT_ENTRY_SIZE:
                self._count("stats_len_not_multiple_of_10", "stats head %d: %d bytes", ch.head, n)
            if n > MAX_STATS_BUFFER:
                self._count("stats_buffer_too_large", "stats head %d: %d bytes, first %d read",
                            ch.head, n, MAX_STATS_BUFFER)
                n = MAX_STATS_BUFFER
            data = vq.read_out(ch, n - n % STAT_ENTRY_SIZE)
            k = len(data) // STAT_ENTRY_SIZE
            entries = np.frombuffer(data[:k * STAT_ENTRY_SIZE], dtype=_STAT_DTYPE)
            tags = entries["tag"].tolist()
            vals = entries["val"].tolist()
            if len(set(tags)) != len(tags):
                self._dr("DR-8", "stats head %d: duplicate tags %s", ch.head, tags)
            tagset = frozenset(tags)
            if self.state.stats_tags is not None and tagset != self.state.stats_tags:
                self._dr("DR-8", "stats head %d: tag set %s differs from the previous %s",
                         ch.head, sorted(tagset), sorted(self.state.stats_tags))
            self.state.stats_tags = tagset
            stats: dict[str, int] = {}
            for tag, val in zip(tags, vals, strict=True):
                try:
                    stats[StatTag(tag).name] = int(val)
                except ValueError:
                    # D-6: unknown tags are ignored (newer drivers send more); not an error.
                    self._counters["stats_unknown_tag"] = \
                        self._counters.get("stats_unknown_tag", 0) + 1
            effects.append(StatsReceived(stats))

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
                return [NotifyQueue(self._layout[BalloonQueue.STATS])]
        except RingBroken as e:
            return self._needs_reset(f"stats queue: {e}")
        return []

    # -- free page hinting (protocol.md 4) ----------------------------------------------------
    def _fire(self, event: HintEvent, effects: list[Effect]) -> Act:
        before_val = self.hint.config_value()
        before_id = self.hint.cmd_id
        _, _, act = self.hint.fire(event)
        if act & Act.END_ROUND:
            effects.append(HintRoundStopped(before_id))
        changed = self.hint.config_value() != before_val
        if act & Act.PUBLISH:
            self._config_changed(effects)
        elif changed:
            # e.g. the driver's STOP ends START: the field now reads 0, with no interrupt (QEMU
            # sends none), but the generation must still move (protocol.md 2.4).
            self.state.config_generation += 1
        return act

    def _do_free_page(self, vq: _Vq, chains: list[Chain], effects: list[Effect],
                      used: list[tuple[int, int]]) -> None:
        # Every element is used with len 0 (protocol.md 4.2), in order.
        used.extend((ch.head, 0) for ch in chains)
        hints: list[Range] = []

        def flush() -> None:
            if hints:
                effects.append(PagesHinted(self.hint.cmd_id, tuple(hints)))
                hints.clear()

        i, n = 0, len(chains)
        while i < n:
            ch = chains[i]
            if ch.error is not None:
                self._malformed(BalloonQueue.FREE_PAGE, ch)
                i += 1
                continue
            if ch.out:
                flush()  # hints before a command belong to the state before it
                self._free_page_cmd(vq, ch, effects)
                i += 1
                continue
            # A run of hint chains: HINT never changes the state, so the run is judged once
            # (a full ring of 1024 hints is one table look-up, not 1024).
            j = i + 1
            while j < n and chains[j].error is None and not chains[j].out:
                j += 1
            run = chains[i:j]
            _, _, act = self.hint.fire(HintEvent.HINT)
            if act & Act.APPLY_HINT:
                hints.extend(self._ram_ranges(tuple(r for c in run for r in c.in_)))
            elif self.state.driver_stopped:
                # protocol.md 4.4 rule 4 / D-10: not a hint outside START; just used.
                self._dr("DR-10", "%d hints from head %d (%s) after the driver's STOP / before "
                         "its start (cmd_id state %s)", len(run), ch.head, _ranges_hex(ch.in_),
                         self.hint.status.name, n=len(run))
            else:
                self._count("hint_outside_round", "%d hints from head %d (%s) while %s: dropped",
                            len(run), ch.head, _ranges_hex(ch.in_), self.hint.status.name,
                            level=logging.INFO, n=len(run))
            i = j
        flush()

    def _ram_ranges(self, ranges: tuple[Range, ...]) -> list[Range]:
        ram = self.cfg.ram_pages
        if ram is None:
            return list(ranges)
        limit = ram << 12
        ok = [(a, n) for a, n in ranges if a + n <= limit]
        if len(ok) != len(ranges):
            self._count("hint_range_not_ram", "%d hint ranges beyond RAM %#x dropped",
                        len(ranges) - len(ok), limit)
        return ok

    def _free_page_cmd(self, vq: _Vq, ch: Chain, effects: list[Effect]) -> None:
        if ch.in_:
            self._count("free_page_mixed_chain", "free_page head %d: command buffer with %d "
                        "writable descriptors (ignored)", ch.head, len(ch.in_))
        n = ch.out_len
        if n != 4:
            # protocol.md 4.4 rule 2 / DR-9: exactly 4 bytes. Our choice: used, no state change.
            self._dr("DR-9", "free_page head %d: out buffer of %d bytes, not 4 (ignored)",
                     ch.head, n)
            return
        data = vq.read_out(ch, 4)
        if len(data) != 4:
            return  # the buffer vanished since pop; read_out counted it
        value = int.from_bytes(data, "little")
        if value == VIRTIO_BALLOON_CMD_ID_DONE:
            self._count("free_page_cmd_done_from_driver", "free_page head %d: driver sent "
                        "DONE (1), which only the device publishes", ch.head)
        if value >= 2 and value == self.state.last_started_id:
            self._dr("DR-9", "free_page head %d: second start for cmd id %#x", ch.head, value)
        event = self.hint.classify_cmd(value)
        was = self.hint.status
        act = self._fire(event, effects)
        if was != HINT_START and self.hint.status == HINT_START:
            self.state.last_started_id = value
            self.state.driver_stopped = False
        elif value == VIRTIO_BALLOON_CMD_ID_STOP or act & Act.END_ROUND:
            self.state.driver_stopped = True
        if act & Act.STALE_CMD and value not in (VIRTIO_BALLOON_CMD_ID_STOP,
                                                VIRTIO_BALLOON_CMD_ID_DONE):
            # A start for an id the host already replaced: a race, not necessarily an error.
            self._count("free_page_cmd_stale", "free_page head %d: cmd id %#x while %s (current "
                        "%#x) ignored", ch.head, value, self.hint.status.name, self.hint.cmd_id,
                        level=logging.INFO)

    def _require_hinting(self, what: str) -> bool:
        if not _has(self._offered, VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            raise ValueError(f"{what}: the device does not offer FREE_PAGE_HINT")
        if not self._negotiated(VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            log.info("%s: FREE_PAGE_HINT not negotiated; nothing to do", what)
            return False
        return True

    def _host_hint(self, event: HintEvent, what: str) -> list[Effect]:
        effects: list[Effect] = []
        if self._require_hinting(what):
            self._fire(event, effects)
        return effects

    def free_page_start(self) -> list[Effect]:
        """Start a hint round: a new command id, published with a config interrupt."""
        return self._host_hint(HintEvent.HOST_START, "free_page_start")

    def free_page_stop(self) -> list[Effect]:
        """Stop hinting (D-8: whenever hints cannot be used, e.g. before a bitmap sync)."""
        return self._host_hint(HintEvent.HOST_STOP, "free_page_stop")

    def free_page_done(self) -> list[Effect]:
        """The host no longer needs the hinted pages (D-13); the driver may free them."""
        return self._host_hint(HintEvent.HOST_DONE, "free_page_done")

    def precopy_notify(self, event: PrecopyEvent, vm_running: bool) -> list[Effect]:
        """QEMU's precopy notifier (protocol.md 5.4)."""
        if not self._negotiated(VIRTIO_BALLOON_F_FREE_PAGE_HINT):  # (negotiated => offered)
            return []
        if event is PrecopyEvent.BEFORE_BITMAP_SYNC:
            return self.free_page_stop()
        if event is PrecopyEvent.AFTER_BITMAP_SYNC:
            return self.free_page_start() if vm_running else self.free_page_done()
        if event is PrecopyEvent.CLEANUP:
            return self.free_page_done()
        return []  # SETUP, COMPLETE: nothing (since QEMU's 2020 change)

    # -- free page reporting (protocol.md 3.7) ------------------------------------------------
    def _do_reporting(self, chains: list[Chain], effects: list[Effect],
                      used: list[tuple[int, int]]) -> None:
        for ch in chains:
            used.append((ch.head, 0))
            if ch.error is not None:
                self._malformed(BalloonQueue.REPORTING, ch)
                continue
            if ch.out:
                self._count("reporting_readable_desc", "reporting head %d: %d readable "
                            "descriptors ignored", ch.head, len(ch.out))
            ranges = self._ram_ranges(ch.in_)
            if ranges:
                # D-15: the host may act on these before the buffer is used (right after this).
                effects.append(PagesReported(tuple(ranges)))

    # == host requests ========================================================================
    def set_target(self, num_pages: int) -> list[Effect]:
        """Ask the driver to hold ``num_pages`` 4 KiB pages in the balloon."""
        if not 0 <= num_pages <= U32_MAX:
            raise ValueError(f"set_target({num_pages}): num_pages is a le32 (0..{U32_MAX:#x})")
        effects: list[Effect] = []
        if num_pages != self.state.num_pages:
            self.state.num_pages = num_pages
            self._config_changed(effects)
        return effects

    # == reset ================================================================================
    def reset(self) -> list[Effect]:
        """Back to power-on (see the module docstring for the three things kept)."""
        effects: list[Effect] = []
        self._fire(HintEvent.RESET, effects)
        if self.state.actual:
            effects.append(ActualChanged(0))
        gen = self.state.config_generation
        num_pages = self.state.num_pages
        self.state = DeviceState(num_pages=num_pages, config_generation=gen + 1)
        for slot in self._slots.values():
            # Keep the queue's guest-error counts: counters cover the device's whole life.
            _fold_queue_counters(slot, self._counters)
            slot.vq = None
            slot.configured = False
            slot.size = slot.desc = slot.driver = slot.device = 0
        self._ballooned.clear()
        return effects


def _fold_queue_counters(slot: _QueueSlot, into: dict[str, int]) -> None:
    """Add the slot's live queue counters to ``into`` as "<queue>.<name>"."""
    if slot.vq is None:
        return
    prefix = slot.logical.name.lower()
    for k, v in slot.vq.counters.items():
        key = f"{prefix}.{k}"
        into[key] = into.get(key, 0) + v


def legacy_ring_layout(base: int, size: int, align: int = LEGACY_VRING_ALIGN
                       ) -> tuple[int, int, int]:
    """(desc, driver, device) areas of a legacy ring of ``size`` entries at ``base``
    (protocol.md 1.7): the descriptor table, the available ring right after it, the used ring
    at the next ``align`` boundary (a real round-up, not the spec's printed macro)."""
    driver = base + desc_table_size(size)
    device = (driver + avail_ring_size(size) + align - 1) & ~(align - 1)
    return base, driver, device


def _ranges_hex(ranges: tuple[Range, ...], limit: int = 4) -> str:
    s = ", ".join(f"[{a:#x}, +{n:#x})" for a, n in ranges[:limit])
    return s + (f", ... ({len(ranges)})" if len(ranges) > limit else "")
