"""A guest that rewrites its ring memory while the device core works on it (conventions 6).

``RacingMemory`` is guest memory whose "guest" runs between any two accesses of the device: on
every ``view`` the device asks for (every read and write of guest memory goes through one), it
may first scribble on driver-owned memory: descriptors of posted chains (address, length, flags,
next), avail ring entries, the pfn arrays, hint and stats buffers the descriptors point at, and
now and then the avail index itself. A check the device made on an earlier read is therefore
stale by the time of any later read; only values it copied and then used are safe.

The driver half of each step is correct (tests/balloon_dev/devharness.py writes the chains:
inflate and deflate pfn arrays, stats, free page hints in a round, reports); the host half
starts and stops hint rounds, changes the target and asks for stats. Properties, checked after
every step (seeded, so a failure replays):

* the device raises nothing; a ring it can no longer trust ends in DEVICE_NEEDS_RESET (then the
  driver resets and starts again) and nothing else;
* every view the device asks for lies inside guest memory (bounds checked before access);
* every byte the device writes lies in a used ring (V-9: never a driver buffer or table);
* every pfn in Inflated/Deflated and every hinted or reported range lies in guest RAM (the
  values used are the values checked, whatever the guest wrote in between);
* the used index only moves forward, by at most what was made available.
"""
from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import Deflated, Inflated, PagesHinted, PagesReported
from guestmem import GuestMemory
from protocol.balloon import VIRTIO_BALLOON_F_REPORTING, BalloonQueue
from protocol.virtio import VIRTIO_F_RING_PACKED
from tests.balloon_dev.devharness import (
    DATA_BASE,
    NEEDS_RESET,
    RAM_BYTES,
    RING_BASE,
    Harness,
    cmd,
    pfn_bytes,
    stats_bytes,
)
from tests.packedringbuilder import RawPackedRing
from vmsim.conformance.rings import WRITE

RAM_PAGES = RAM_BYTES >> 12
BLOCK = 4 << 20


class RacingMemory(GuestMemory):
    """Guest memory with a guest that writes between the device's accesses."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.racing = False
        self.targets: list[tuple[int, int]] = []  # (gpa, length) the guest may scribble on
        self.refused: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.scribbles = 0

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        if not self.contains(gpa, length):
            self.refused.append((gpa, length))
        elif writable:
            self.writes.append((gpa, length))
        if self.racing and self.targets and self.rng.random() < 0.15:
            self._scribble()
        return super().view(gpa, length, writable=writable)

    def _scribble(self) -> None:
        gpa, n = self.rng.choice(self.targets)
        off = self.rng.randrange(n)
        k = min(n - off, self.rng.choice([1, 2, 4, 8, 16]))
        kind = self.rng.random()
        if kind < 0.4:
            data = self.rng.randbytes(k)
        elif kind < 0.7:  # plausible-but-wrong: a big address or length, a pfn past RAM
            data = self.rng.choice([b"\xff" * 8, struct.pack("<Q", RAM_BYTES - 4),
                                    struct.pack("<I", RAM_PAGES + 1), b"\0" * 8])[:k]
        else:
            data = bytes(k)
        super().view(gpa + off, len(data), writable=True)[:] = data
        self.scribbles += 1


class RacingHarness(Harness):
    def __init__(self, rng: random.Random, features: int | None = None) -> None:  # noqa: D107
        self.mem = RacingMemory(rng)
        self.ram = bytearray(RAM_BYTES)
        self.mem.add_region(0, self.ram, "ram")
        if features is None:
            features = DeviceConfig().offered_features | 1 << VIRTIO_BALLOON_F_REPORTING
        self.dev = BalloonDevice(self.mem, DeviceConfig(ram_pages=RAM_PAGES,
                                                        offered_features=features))
        self.rings = {}
        self._next_desc = {}
        self._data = DATA_BASE


def _check_effects(effects: list[Any]) -> None:
    for e in effects:
        if isinstance(e, (Inflated, Deflated)):
            assert all(0 <= p < RAM_PAGES for p in e.pfns), e
        elif isinstance(e, (PagesHinted, PagesReported)):
            for gpa, n in e.ranges:
                assert n > 0 and 0 <= gpa and gpa + n <= RAM_BYTES, e


def _used_areas(h: Harness) -> list[tuple[int, int]]:
    return [r.used_area for r in h.rings.values()]


@pytest.mark.parametrize("seed", range(6))
def test_device_survives_a_guest_racing_on_its_rings(seed: int) -> None:
    rng = random.Random(seed)
    h = RacingHarness(rng)
    mem = h.mem
    assert isinstance(mem, RacingMemory)
    resets = 0
    h.init()
    queues = set(h.dev.queue_layout())
    inflated: list[int] = []
    seen: dict[str, int] = {}
    for _step in range(300):
        if h.dev.status & NEEDS_RESET or h._data > DATA_BASE + 0x1C0000:
            resets += bool(h.dev.status & NEEDS_RESET)
            # The driver starts over with fresh (zeroed) rings and buffers.
            h.ram[RING_BASE:DATA_BASE] = bytes(DATA_BASE - RING_BASE)
            h._data = DATA_BASE
            mem.racing = False
            h.init()
            inflated.clear()
        mem.targets.clear()
        lq = rng.choice(sorted(queues))
        ring = h.rings[lq]
        before_used = ring.used_idx()
        posted = 0
        # -- the driver posts a correct buffer ------------------------------------------
        if lq == BalloonQueue.INFLATE:
            pfns = [rng.randrange(RAM_PAGES) for _ in range(rng.randint(1, 64))]
            inflated += pfns
            data = pfn_bytes(*pfns)
        elif lq == BalloonQueue.DEFLATE:
            take = inflated[:rng.randint(1, 64)] or [1]
            del inflated[:len(take)]
            data = pfn_bytes(*take)
        elif lq == BalloonQueue.STATS:
            data = stats_bytes(*[(rng.randrange(12), rng.randrange(1 << 40))
                                 for _ in range(rng.randint(1, 10))])
        elif lq == BalloonQueue.FREE_PAGE:
            if rng.random() < 0.3:
                h.dev.free_page_start()
                data = cmd(h.read_cmd_id())
            else:
                blk = rng.randrange(RAM_BYTES // BLOCK) * BLOCK
                gpa = h.post_in(lq, [(blk, BLOCK)])
                data = b""
                mem.targets.append((ring.desc + 16 * gpa, 16))
                posted += 1
        else:  # REPORTING: in-buffers naming free RAM
            blk = rng.randrange(RAM_BYTES // BLOCK) * BLOCK
            head = h.post_in(lq, [(blk, BLOCK // 2), (blk + BLOCK // 2, BLOCK // 2)])
            data = b""
            mem.targets.append((ring.desc + 16 * head, 32))
            posted += 1
        if data:
            head = h.post_out(lq, data)
            buf = h._data - ((len(data) + 15) & ~15 or 16)
            mem.targets += [(ring.desc + 16 * head, 16), (buf, len(data))]
            posted += 1
        slot = (ring.avail_idx - 1) % ring.size
        mem.targets.append((ring.driver + 4 + 2 * slot, 2))  # the avail entry
        if rng.random() < 0.03:
            mem.targets.append((ring.driver + 2, 2))  # the avail index itself
        # -- the host acts now and then --------------------------------------------------
        effects: list[Any] = []
        r = rng.random()
        if r < 0.05:
            effects += h.dev.free_page_stop()
        elif r < 0.08:
            effects += h.dev.set_target(rng.randrange(RAM_PAGES))
        elif r < 0.1:
            effects += h.dev.request_stats()
        # -- the device works while the guest races -------------------------------------
        mem.racing = True
        mem.writes.clear()
        effects += h.kick(lq)
        mem.racing = False
        _check_effects(effects)
        for e in effects:
            seen[type(e).__name__] = seen.get(type(e).__name__, 0) + 1
        assert not mem.refused, mem.refused[:4]
        areas = _used_areas(h)
        for gpa, n in mem.writes:
            assert any(a <= gpa and gpa + n <= a + m for a, m in areas), (hex(gpa), n)
        if not h.dev.status & NEEDS_RESET:
            moved = (ring.used_idx() - before_used) & 0xFFFF
            assert moved <= posted + ring.size, moved  # bounded by what was made available
    assert mem.scribbles > 100  # the guest really raced
    # ... and the device still did its work in between (the test is not all NEEDS_RESET)
    assert seen.get("Inflated", 0) >= 5 and seen.get("PagesHinted", 0) + seen.get(
        "PagesReported", 0) >= 5, seen
    # Survived: the device still works for a driver that stops scribbling.
    h.ram[RING_BASE:DATA_BASE] = bytes(DATA_BASE - RING_BASE)
    h._data = DATA_BASE
    h.init()
    h.post_out(BalloonQueue.INFLATE, pfn_bytes(5, 6, 7))
    effects = h.kick(BalloonQueue.INFLATE)
    assert Inflated((5, 6, 7)) in effects, effects
    assert h.used(BalloonQueue.INFLATE)[-1][1] == 0


def _packed_init(h: RacingHarness) -> dict[BalloonQueue, RawPackedRing]:
    """Negotiate every offered feature (RING_PACKED among them) and lay out packed rings."""
    h.ram[RING_BASE:DATA_BASE] = bytes(DATA_BASE - RING_BASE)
    h._data = DATA_BASE
    assert h.negotiate()
    assert h.dev.driver_features >> VIRTIO_F_RING_PACKED & 1
    rings = {}
    for lq, tq in h.dev.queue_layout().items():
        size = h.dev.queue_max_size(tq)
        r = RawPackedRing.layout(h.mem, RING_BASE + 0x10000 * int(lq), size)
        h.dev.set_queue(tq, size, r.desc, r.driver, r.device)
        h.dev.enable_queue(tq)
        rings[lq] = r
    h.dev.write_status(0xF)
    return rings


@pytest.mark.parametrize("seed", range(4))
def test_device_survives_a_guest_racing_on_packed_rings(seed: int) -> None:
    """The same race on packed rings: the guest rewrites the descriptor it just made available
    (address, length, id, flags: the avail/used bits included), the buffer it points at and the
    driver event area while the device reads them. The device may write only descriptors of its
    ring (used ones) and its device event area."""
    rng = random.Random(seed)
    h = RacingHarness(rng, features=DeviceConfig().offered_features | 1 << VIRTIO_F_RING_PACKED
                      | 1 << VIRTIO_BALLOON_F_REPORTING)
    mem = h.mem
    assert isinstance(mem, RacingMemory)
    rings = _packed_init(h)
    seen: dict[str, int] = {}
    for _step in range(300):
        if h.dev.status & NEEDS_RESET or h._data > DATA_BASE + 0x1C0000:
            mem.racing = False
            rings = _packed_init(h)
        lq = rng.choice(sorted(rings))
        r = rings[lq]
        mem.targets.clear()
        if lq in (BalloonQueue.FREE_PAGE, BalloonQueue.REPORTING) and rng.random() < 0.7:
            blk = rng.randrange(RAM_BYTES // BLOCK) * BLOCK
            bufs = [(blk, BLOCK, WRITE)]
        else:
            data = pfn_bytes(*[rng.randrange(RAM_PAGES) for _ in range(rng.randint(1, 32))])
            if lq == BalloonQueue.FREE_PAGE:
                data = cmd(h.read_cmd_id())
            gpa = h.alloc(data)
            bufs = [(gpa, len(data), 0)]
            mem.targets.append((gpa, len(data)))
        if lq == BalloonQueue.FREE_PAGE and rng.random() < 0.2:
            h.dev.free_page_start()
        head = r.add(bufs, bid=r.next_avail)
        mem.targets += [(r.desc + 16 * head, 16), (r.driver, 4)]
        mem.racing = True
        mem.writes.clear()
        effects = h.kick(lq)
        mem.racing = False
        _check_effects(effects)
        for e in effects:
            seen[type(e).__name__] = seen.get(type(e).__name__, 0) + 1
        assert not mem.refused, mem.refused[:4]
        allowed = [(q.desc, 16 * q.size) for q in rings.values()] + [
            (q.device, 4) for q in rings.values()]
        for gpa, n in mem.writes:
            assert any(a <= gpa and gpa + n <= a + m for a, m in allowed), (hex(gpa), n)
    assert mem.scribbles > 50
    assert seen.get("Inflated", 0) >= 5, seen
