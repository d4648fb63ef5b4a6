"""The balloon's own queues: inflate, deflate, statistics and free page reporting buffers.

(protocol.md 3.4, 3.5, 3.7.)

Theory of operation
-------------------
``BalloonQueues`` belongs to one ``BalloonDevice``, which hands it the chains a kick popped
from one of these queues. Each handler appends every chain's used element (len 0, D-17) to
``used`` in order and the host's effects to ``effects``; the device writes the used elements
after the host has had the effects (D-3, D-4, D-15).

- Inflate / deflate: each chain's readable bytes are le32 pfns (4 KiB units), read with one
  numpy view per chain and judged as one array: pfns beyond RAM are skipped and counted, an
  inflate of a pfn already in the balloon is counted, a deflate of one not in it is DR-6
  (skipped). ``Ballooned`` remembers which pfns are in the balloon (a packed bitmap when the
  RAM size is known, else a set).
- Statistics: the device holds one buffer at a time (``DeviceState.stats_head``) and gives it
  back when the host asks for stats; each buffer's tag/value entries become one
  ``StatsReceived`` (unknown tags ignored, D-6); the driver checker judges the tag sets (DR-8).
- Reporting: each chain's writable descriptors are one ``PagesReported`` (within RAM).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from balloon_dev.device_config import Vq
from balloon_dev.effects import Deflated, Effect, Inflated, PagesReported, StatsReceived
from balloon_dev.virtqueue import Chain
from protocol.balloon import STAT_ENTRY_SIZE, BalloonQueue, StatTag

if TYPE_CHECKING:
    from balloon_dev.device import BalloonDevice

#: Largest inflate/deflate buffer we read (Linux sends <= 1 KiB; 1 MiB = 256 Ki pfns = 1 GiB).
MAX_PFN_BUFFER = 1 << 20
#: Largest stats buffer we read: 64 entries (Linux sends <= 16).
MAX_STATS_BUFFER = 64 * STAT_ENTRY_SIZE
#: The packed stats entry (protocol.md 3.5) as a numpy record.
STAT_DTYPE = np.dtype([("tag", "<u2"), ("val", "<u8")])  # itemsize 10, no padding


class Ballooned:
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


class BalloonQueues:
    def __init__(self, dev: BalloonDevice) -> None:
        self._dev = dev
        self._count = dev.count
        self._checker = dev.checker
        self.ballooned = Ballooned(dev.cfg.ram_pages)

    def reset(self) -> None:
        self.ballooned.clear()

    def pfns(self, lq: BalloonQueue, vq: Vq, chains: list[Chain],
             effects: list[Effect], used: list[tuple[int, int]]) -> None:
        name = lq.name.lower()
        parts: list[np.ndarray] = []
        for ch in chains:
            used.append((ch.head, 0))
            if ch.error is not None:
                self._dev.malformed(lq, ch)
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
        ram = self._dev.cfg.ram_pages
        if ram is not None:
            bad = pfns >= ram
            if bad.any():
                self._count(f"{name}_pfn_not_ram", "%s: %d pfns beyond RAM (%#x pages) skipped, "
                            "first %#x", name, int(bad.sum()), ram, int(pfns[bad][0]))
                pfns = pfns[~bad]
        if pfns.size == 0:
            return
        inb = self.ballooned.contains(pfns)
        if lq == BalloonQueue.INFLATE:
            if inb.any():
                self._count("inflate_pfn_already_inflated", "%d pfns inflated twice, first %#x",
                            int(inb.sum()), int(pfns[inb][0]))
            self.ballooned.set(pfns, True)
            # D-3: the host may change these pages now, before the buffer is used.
            effects.append(Inflated(tuple(pfns.tolist())))
        else:
            if not inb.all():
                self._checker.deflate_not_in_balloon(int((~inb).sum()), int(pfns[~inb][0]))
                pfns = pfns[inb]
            if pfns.size:
                self.ballooned.set(pfns, False)
                # D-4: with MUST_TELL_HOST the deflate is acknowledged by using the buffer,
                # which happens after the host has seen this effect.
                effects.append(Deflated(tuple(pfns.tolist())))

    # -- statistics (protocol.md 3.5) ---------------------------------------------------------
    def stats(self, vq: Vq, chains: list[Chain], effects: list[Effect],
              used: list[tuple[int, int]]) -> None:
        for ch in chains:
            if ch.error is not None:
                self._dev.malformed(BalloonQueue.STATS, ch)
                used.append((ch.head, 0))
                continue
            if self._dev.state.stats_head is not None:
                # DR-8: one buffer outstanding at most. QEMU returns the old one and keeps the new.
                self._checker.second_stats_buffer(ch.head, self._dev.state.stats_head)
                used.append((self._dev.state.stats_head, 0))
            self._dev.state.stats_head = ch.head
            legacy = self._dev.legacy_interface
            if legacy is not None and legacy.first_stats_buffer(ch.head):
                continue  # D-7: held, values not read
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
            entries = np.frombuffer(data[:k * STAT_ENTRY_SIZE], dtype=STAT_DTYPE)
            tags = entries["tag"].tolist()
            vals = entries["val"].tolist()
            self._checker.stats_tags(ch.head, tags)
            stats: dict[str, int] = {}
            unknown = 0
            for tag, val in zip(tags, vals, strict=True):
                try:
                    stats[StatTag(tag).name] = int(val)
                except ValueError:
                    # D-6: unknown tags are ignored (newer drivers send more); not an error.
                    unknown += 1
            if unknown:
                self._count("stats_unknown_tag", "stats head %d: %d unknown tags ignored",
                            ch.head, unknown, level=logging.DEBUG, n=unknown)
            effects.append(StatsReceived(stats))

    # -- free page reporting (protocol.md 3.7) ------------------------------------------------
    def reporting(self, chains: list[Chain], effects: list[Effect],
                  used: list[tuple[int, int]]) -> None:
        for ch in chains:
            used.append((ch.head, 0))
            if ch.error is not None:
                self._dev.malformed(BalloonQueue.REPORTING, ch)
                continue
            if ch.out:
                self._count("reporting_readable_desc", "reporting head %d: %d readable "
                            "descriptors ignored", ch.head, len(ch.out))
            ranges = self._dev.ram_ranges(ch.in_)
            if ranges:
                # D-15: the host may act on these before the buffer is used (right after this).
                effects.append(PagesReported(tuple(ranges)))
