"""Random ring contents against the device side of the packed ring
(balloon_dev/packed_virtqueue.py).

Random descriptors (flags with random AVAIL/USED bits, so availability, wrap and chain ends vary),
indirect tables, starting positions and wrap counters, and slots already held by chains in
flight. The properties:

* ``pop``/``pop_many`` raise nothing but ``RingBroken``, exactly when a chain starting at an
  available slot runs past the free slots (the oracle says so);
* no access is ever attempted outside guest memory;
* popping writes nothing but the device event area; pushing writes only the len/id/flags of the
  used slots (V-9: never a buffer, never another descriptor);
* ``pop_many`` returns exactly what repeated ``pop`` returns, with the same counters;
* every chain agrees with an oracle written apart from the device (find the available run and
  the chains' extents, then judge the buffers): malformed exactly when the oracle says so, else
  the same buffers and buffer id; every error bumped exactly one chain-error counter.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloon_dev.packed_virtqueue import (
    CHAIN_ERROR_COUNTERS,
    PackedDeviceVirtqueue,
    PackedVirtqueueState,
    RingBroken,
)
from guestmem import GuestMemory
from protocol.virtqueue import PACKED_DESC_DTYPE
from tests.packedringbuilder import pack_pdesc
from vmsim.conformance.rings import TrackingMemory

SIZE = 6  # packed sizes need not be powers of two
MEM = 0x10000
EXTRA = 0x20000
EXTRA_SIZE = 0x1000
DESC, DRIVER, DEVICE, TABLES = 0x1000, 0x2000, 0x2010, 0x4000


near = st.sampled_from([0, 8, DESC, TABLES, MEM - 0x10, MEM - 1, MEM, EXTRA - 8, EXTRA,
                        EXTRA + EXTRA_SIZE - 8, 2**64 - 0x10, 2**64 - 1])
addr_st = st.one_of(st.integers(0x8000, 0x9000), st.integers(0x8000, 0x9000), near,
                    st.integers(0, 2**64 - 1))
len_st = st.one_of(st.integers(1, 0x200), st.integers(1, 0x200),
                   st.sampled_from([0, 16, 32, 48, 17, 0x80000000, 0xFFFFFFFF]))
# Low flags: NEXT/WRITE mostly, INDIRECT sometimes; high bits: AVAIL/USED in all four ways.
low_st = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 7))
avail_bits_st = st.sampled_from([0x80, 0x8000, 0x80, 0x8000, 0, 0x8080])
flags_st = st.builds(lambda lo, hi: lo | hi, low_st, avail_bits_st)
desc_st = st.tuples(addr_st, len_st, st.integers(0, 0xFFFF), flags_st)
indirect_desc_st = st.builds(lambda k, n, hi: (TABLES + 16 * k, 16 * n, 7, 4 | hi),
                             st.integers(0, 8), st.integers(0, 6), avail_bits_st)
table_desc_st = st.tuples(addr_st, len_st, st.integers(0, 0xFFFF),
                          st.one_of(st.integers(0, 3), st.integers(0, 7)))

ring_st = st.fixed_dictionaries({
    "descs": st.lists(st.one_of(desc_st, desc_st, indirect_desc_st), min_size=SIZE,
                      max_size=SIZE),
    "tables": st.lists(table_desc_st, min_size=0, max_size=16),
    "start": st.integers(0, SIZE - 1),
    "wrap": st.integers(0, 1),
    "held": st.integers(0, SIZE),   # slots held by a chain in flight, just behind start
    "event_idx": st.booleans(),
    "indirect": st.booleans(),
    "reject_zero_len": st.booleans(),
    "indirect_batch_min": st.sampled_from([1, 2, 64]),  # batched table check on or off
})


def build(p: dict[str, Any]) -> tuple[TrackingMemory, PackedDeviceVirtqueue, bytearray]:
    mem = TrackingMemory()
    backing = bytearray(MEM)
    mem.add_region(0, backing, "ram")
    mem.add_region(EXTRA, bytearray(EXTRA_SIZE), "extra")
    for i, d in enumerate(p["descs"]):
        backing[DESC + 16 * i:DESC + 16 * i + 16] = pack_pdesc(*d)
    raw = b"".join(pack_pdesc(*d) for d in p["tables"])
    backing[TABLES:TABLES + len(raw)] = raw
    q = PackedDeviceVirtqueue(mem, SIZE, DESC, DRIVER, DEVICE, event_idx=p["event_idx"],
                              indirect=p["indirect"], reject_zero_len=p["reject_zero_len"])
    q.indirect_batch_min = p["indirect_batch_min"]
    held, start, wrap = p["held"], p["start"], p["wrap"]
    used = start - held
    q.restore(PackedVirtqueueState(
        start, wrap, used % SIZE, wrap ^ (used < 0), True, used % SIZE, wrap ^ (used < 0), True,
        ((0xFFFF, (held,)),) if held else ()))
    return mem, q, backing


def _in_regions(addr: int, length: int) -> bool:
    return any(lo <= addr and addr + length <= lo + size
               for lo, size in ((0, MEM), (EXTRA, EXTRA_SIZE)))


def judge(p: dict[str, Any], mem: GuestMemory, rows: list[tuple[int, int, int, int]]
          ) -> tuple[list, list] | None:
    """The buffers of one chain by the book, or None if malformed."""
    seq: list[tuple[int, int, int]] = []
    for addr, length, _, flags in rows:
        if flags & 4:
            if not p["indirect"] or len(rows) > 1 or length == 0 or length % 16 \
                    or not _in_regions(addr, length):
                return None
            table = np.frombuffer(mem.read(addr, length), dtype=PACKED_DESC_DTYPE).tolist()
            if any(f & 4 for _, _, _, f in table):
                return None
            seq += [(a, n, f & 2) for a, n, _, f in table]
            break
        seq.append((addr, length, flags & 2))
    writable = [w for _, _, w in seq]
    if writable != sorted(writable) or sum(n for _, n, _ in seq) >= 2**32:
        return None
    for addr, length, _ in seq:
        if (length == 0 and p["reject_zero_len"]) or not _in_regions(addr, length):
            return None
    return ([(a, n) for a, n, w in seq if not w], [(a, n) for a, n, w in seq if w])


def oracle(p: dict[str, Any], mem: GuestMemory) -> tuple[list[tuple[int, int]], bool]:
    """(buffer id, slots) of each chain one-at-a-time popping yields, and whether it then
    finds the ring broken."""
    room = SIZE - p["held"]
    descs = p["descs"]
    out: list[tuple[int, int]] = []
    k = 0
    while k < room:
        pos = p["start"] + k
        wrap = p["wrap"] ^ (pos >= SIZE)
        f = descs[pos % SIZE][3]
        if not (f >> 7 & 1 == wrap and f >> 15 & 1 != wrap):
            return out, False
        j = k
        while descs[(p["start"] + j) % SIZE][3] & 1:
            j += 1
            if j >= room:
                return out, True
        out.append((descs[(p["start"] + j) % SIZE][2], j + 1 - k))
        k = j + 1
    return out, False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=ring_st, max_n=st.one_of(st.none(), st.integers(1, SIZE)))
def test_random_packed_rings(p: dict[str, Any], max_n: int | None) -> None:
    outcomes = []
    for batched in (False, True):
        mem, q, backing = build(p)
        before = bytes(backing)
        want, want_broken = oracle(p, mem)
        chains = []
        broken = False
        try:
            if batched:
                while got := q.pop_many(max_n):
                    chains += got
            else:
                while (c := q.pop()) is not None:
                    chains.append(c)
        except RingBroken as e:
            assert "chain_unterminated" in str(e)
            broken = True
        assert [c.head for c in chains] == [bid for bid, _ in want[:len(chains)]]
        pos = p["start"]
        nerr = 0
        for c, (_, nslots) in zip(chains, want, strict=False):
            rows = [tuple(p["descs"][(pos + j) % SIZE]) for j in range(nslots)]
            pos += nslots
            by_book = judge(p, mem, rows)
            if by_book is None:
                assert c.error is not None, f"malformed chain {rows} accepted"
                nerr += 1
                assert c.error.split(":")[0] in CHAIN_ERROR_COUNTERS
            else:
                assert c.error is None, c.error
                assert (list(c.out), list(c.in_)) == by_book
        assert sum(q.counters[k] for k in CHAIN_ERROR_COUNTERS) == nerr
        assert not mem.refused, f"accesses outside guest memory: {mem.refused}"
        # Popping writes only the device event area.
        assert all(DEVICE <= g and g + n <= DEVICE + 4 for g, n in mem.writes), mem.writes
        mem.writes.clear()
        used_at = q.used_idx
        q.push_many([(c.head, 0) for c in chains[: len(chains) // 2]])
        for c in chains[len(chains) // 2:]:
            q.push(c.head, 1)
        q.should_notify()
        assert not mem.refused
        # Pushing rewrites only len/id/flags (bytes 8..15) of the used slots. Each push returns
        # the oldest chain in flight with its id, so a popped chain reusing the held chain's id
        # (0xFFFF) returns the held one (and its slot count) first.
        fifo: dict[int, list[int]] = {0xFFFF: [p["held"]]} if p["held"] else {}
        for c, (_, nslots) in zip(chains, want, strict=False):
            fifo.setdefault(c.head, []).append(nslots)
        slots, at = set(), used_at
        for c in chains:  # the push order above
            slots.add(at % SIZE)
            at += fifo[c.head].pop(0)
        diff = np.flatnonzero(np.frombuffer(backing, np.uint8) != np.frombuffer(before, np.uint8))
        for b in diff.tolist():
            if DEVICE <= b < DEVICE + 4:
                continue
            assert DESC <= b < DESC + 16 * SIZE and (b - DESC) % 16 >= 8, hex(b)
            assert (b - DESC) // 16 in slots, hex(b)
        assert q.in_flight == (1 if p["held"] else 0)
        outcomes.append((chains, broken, dict(q.counters)))
        assert broken == want_broken
    (one, broke_one, counters_one), (many, broke_many, counters_many) = outcomes
    assert broke_one == broke_many
    if broke_one:
        assert many == one[:len(many)]
    else:
        assert one == many and counters_one == counters_many
