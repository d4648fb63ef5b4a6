"""Random ring contents against the device side of the split ring (balloon_dev/virtqueue.py).

Random descriptor tables, indirect tables, avail rings and indices. The properties:

* ``pop``/``pop_many`` raise nothing but ``RingBroken``, and raise it exactly when V-1 (pending
  > N) or V-2 (a head >= N among the pending entries) says so;
* no access is ever attempted outside guest memory (every ``view`` the queue asks for is inside
  a region: bounds are checked before reading, not discovered by an exception);
* the only bytes that change are in the used ring (V-9), and every write asks for a view there;
* ``pop_many`` returns exactly what repeated ``pop`` returns, with the same counters;
* every chain agrees with an oracle written apart from the device's walk (follow the links,
  then judge the buffers): malformed exactly when the oracle says so, else the same buffers;
* a chain without error has only in-memory, non-empty buffers and a total length < 2^32, and
  every chain with an error bumped exactly one chain-error counter.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloon_dev.virtqueue import CHAIN_ERROR_COUNTERS, DeviceVirtqueue, RingBroken
from guestmem import GuestMemory
from protocol.virtqueue import DESC_DTYPE
from vmsim.conformance.rings import TrackingMemory, pack_desc

SIZE = 8
MEM = 0x10000
EXTRA = 0x20000  # a second, small region: buffers may not straddle the gap
EXTRA_SIZE = 0x1000
DESC, DRIVER, DEVICE, TABLES = 0x1000, 0x2000, 0x3000, 0x4000
USED_LO, USED_HI = DEVICE, DEVICE + 6 + 8 * SIZE


near = st.sampled_from([0, 8, DESC, TABLES, TABLES + 0x10, MEM - 0x10, MEM - 1, MEM,
                        EXTRA - 8, EXTRA, EXTRA + EXTRA_SIZE - 8, 2**64 - 0x10, 2**64 - 1])
# Mostly plausible buffers (so valid chains and deep walks happen), some edges, some garbage.
addr_st = st.one_of(st.integers(0x8000, 0x9000), st.integers(0x8000, 0x9000),
                    st.integers(0x8000, 0x9000), near,
                    st.integers(0, MEM + 0x100), st.integers(0, 2**64 - 1))
len_st = st.one_of(st.integers(1, 0x200), st.integers(1, 0x200),
                   st.sampled_from([0, 1, 8, 16, 32, 48, 17, 0x10000, 0x80000000, 0xFFFFFFFF]))
flags_st = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 7),
                     st.integers(0, 0xFFFF))
# A descriptor pointing at (part of) the indirect tables area with a table-sized length.
indirect_st = st.builds(lambda a, n, f: (a, 16 * n, f | 4, 0),
                        st.one_of(st.builds(lambda k: TABLES + 16 * k, st.integers(0, 20)), near),
                        st.integers(0, 6), st.sampled_from([0, 2, 1]))
desc_st = st.one_of(st.tuples(addr_st, len_st, flags_st, st.integers(0, SIZE + 3)),
                    st.tuples(addr_st, len_st, st.sampled_from([1, 3]), st.integers(0, SIZE - 1)),
                    indirect_st)
table_desc_st = st.tuples(addr_st, len_st, flags_st, st.integers(0, 6))
valid_head = st.integers(0, SIZE - 1)


def _with_bad_head(heads: list[int], bad: tuple[int, int] | None) -> list[int]:
    if bad is not None:
        heads[bad[0]] = bad[1]
    return heads


# Valid heads, sometimes one bad head (V-2) somewhere.
heads_st = st.builds(_with_bad_head, st.lists(valid_head, min_size=SIZE, max_size=SIZE),
                     st.one_of(st.none(), st.none(), st.tuples(st.integers(0, SIZE - 1),
                                                               st.integers(SIZE, 0xFFFF))))

@st.composite
def well_formed_st(draw: st.DrawFn) -> dict[str, Any]:
    """Descriptors cut into well-formed chains (readable then writable, linked through a random
    permutation), maybe one ending in a valid indirect table, then maybe one field of one
    descriptor overwritten: deep valid walks and near-miss faults, which random tables rarely
    produce. Heads name the chains' heads."""
    perm = draw(st.permutations(range(SIZE)))
    descs: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * SIZE
    chains: list[list[int]] = []
    pos = 0
    while pos < SIZE:
        n = draw(st.integers(1, SIZE - pos))
        idxs = list(perm[pos:pos + n])
        pos += n
        nw = draw(st.integers(0, n))
        for j, i in enumerate(idxs):
            last = j == n - 1
            flags = (2 if j >= n - nw else 0) | (0 if last else 1)
            descs[i] = (draw(st.integers(0x8000, 0x8F00)), draw(st.integers(1, 0x100)), flags,
                        0 if last else idxs[j + 1])
        chains.append(idxs)
    tables: list[tuple[int, int, int, int]] = []
    if draw(st.booleans()):
        t = draw(st.integers(1, 6))
        nw = draw(st.integers(0, t))
        tables = [(draw(st.integers(0x8000, 0x8F00)), draw(st.integers(1, 0x100)),
                   (2 if j >= t - nw else 0) | (1 if j < t - 1 else 0), j + 1 if j < t - 1 else 0)
                  for j in range(t)]
        last = draw(st.sampled_from(chains))[-1]
        descs[last] = (TABLES, 16 * t, 4, 0)
    if draw(st.booleans()):
        # Corrupt one field of one descriptor, in the main table or in the indirect table.
        target = tables if tables and draw(st.booleans()) else descs
        i, field = draw(st.integers(0, len(target) - 1)), draw(st.integers(0, 3))
        value = draw([addr_st, len_st, flags_st, st.integers(0, SIZE + 3)][field])
        d = list(target[i])
        d[field] = value
        target[i] = (d[0], d[1], d[2], d[3])
    heads = [draw(st.sampled_from(chains))[0] for _ in range(SIZE)]
    return {"descs": descs, "tables": tables, "heads": heads}


random_parts_st = st.fixed_dictionaries({
    "descs": st.lists(desc_st, min_size=SIZE, max_size=SIZE),
    "tables": st.lists(table_desc_st, min_size=0, max_size=24),
    "heads": heads_st,
})

ring_st = st.builds(lambda parts, rest: {**parts, **rest},
                    st.one_of(random_parts_st, well_formed_st()),
                    st.fixed_dictionaries({
    "start": st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    "ahead": st.one_of(st.integers(0, SIZE), st.integers(0, SIZE), st.integers(0, SIZE),
                       st.integers(0, 0xFFFF)),
    "event_idx": st.booleans(),
    "indirect": st.booleans(),
    "reject_zero_len": st.booleans(),
    "used_event": st.integers(0, 0xFFFF),
    "avail_flags": st.integers(0, 3),
    "indirect_batch_min": st.sampled_from([1, 2, 8]),  # batched table check on or off
}))


def build(p: dict[str, Any]) -> tuple[TrackingMemory, DeviceVirtqueue, bytearray]:
    mem = TrackingMemory()
    backing = bytearray(MEM)
    mem.add_region(0, backing, "ram")
    mem.add_region(EXTRA, bytearray(EXTRA_SIZE), "extra")
    for i, d in enumerate(p["descs"]):
        backing[DESC + 16 * i:DESC + 16 * i + 16] = pack_desc(*d)
    raw = b"".join(pack_desc(*d) for d in p["tables"])
    backing[TABLES:TABLES + len(raw)] = raw
    ring = np.frombuffer(backing, dtype="<u2", count=SIZE, offset=DRIVER + 4)
    start = p["start"]
    for k, h in enumerate(p["heads"]):
        ring[(start + k) % SIZE] = h
    avail = np.frombuffer(backing, dtype="<u2", count=2, offset=DRIVER)
    avail[0] = p["avail_flags"]
    avail[1] = (start + p["ahead"]) & 0xFFFF
    np.frombuffer(backing, dtype="<u2", count=1, offset=DRIVER + 4 + 2 * SIZE)[0] = p["used_event"]
    q = DeviceVirtqueue(mem, SIZE, DESC, DRIVER, DEVICE, event_idx=p["event_idx"],
                        indirect=p["indirect"], reject_zero_len=p["reject_zero_len"])
    q.indirect_batch_min = p["indirect_batch_min"]
    q.last_avail_idx = start
    q.used_idx = start
    return mem, q, backing


def _descs(mem: GuestMemory, gpa: int, count: int) -> list[tuple[int, int, int, int]]:
    return np.frombuffer(mem.read(gpa, 16 * count), dtype=DESC_DTYPE).tolist()


def _in_regions(addr: int, length: int) -> bool:
    # As GuestMemory: wholly inside one region (a zero-length buffer may sit at its very end).
    return any(lo <= addr and addr + length <= lo + size
               for lo, size in ((0, MEM), (EXTRA, EXTRA_SIZE)))


def oracle(p: dict[str, Any], mem: GuestMemory, head: int) -> tuple[list, list] | None:
    """The chain at ``head`` by the book, written apart from the device's one-pass walk: first
    follow the links (bounded), then judge the collected buffers. None if malformed."""
    def follow(table: list[tuple[int, int, int, int]], start: int,
               nested: bool) -> list[tuple[int, int, int]] | None:
        seq, i = [], start
        for _ in range(len(table)):  # more steps than entries can only be a loop (V-4)
            addr, length, flags, nxt = table[i]
            if flags & 4:  # INDIRECT (V-6): last of the chain, once, well-formed, negotiated
                if nested or flags & 1 or not p["indirect"] or length == 0 or length % 16 \
                        or length // 16 > 32768 or not _in_regions(addr, length):
                    return None
                inner = follow(_descs(mem, addr, length // 16), 0, True)
                return None if inner is None else seq + inner
            seq.append((addr, length, flags & 2))
            if not flags & 1:
                return seq
            if nxt >= len(table):  # V-3
                return None
            i = nxt
        return None

    seq = follow(_descs(mem, DESC, SIZE), head, False)
    if seq is None:
        return None
    writable = [w for _, _, w in seq]
    if writable != sorted(writable):  # V-5: no readable after writable
        return None
    if sum(n for _, n, _ in seq) >= 2**32:
        return None
    for addr, length, _ in seq:
        if (length == 0 and p["reject_zero_len"]) or not _in_regions(addr, length):  # V-7, V-8
            return None
    return ([(a, n) for a, n, w in seq if not w], [(a, n) for a, n, w in seq if w])


def expected_break(p: dict[str, Any]) -> int | None:
    """How many chains come out one at a time before RingBroken, or None if it never breaks."""
    n = p["ahead"] & 0xFFFF
    if n > SIZE:
        return 0  # V-1
    for k in range(n):
        if p["heads"][k] >= SIZE:
            return k  # V-2
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=ring_st, max_n=st.one_of(st.none(), st.integers(1, SIZE)))
def test_random_rings(p: dict[str, Any], max_n: int | None) -> None:
    outcomes = []
    for batched in (False, True):
        mem, q, backing = build(p)
        before = bytes(backing)
        chains = []
        broken = False
        try:
            if batched:
                while True:
                    got = q.pop_many(max_n)
                    if not got:
                        break
                    chains += got
            else:
                while (c := q.pop()) is not None:
                    chains.append(c)
        except RingBroken:
            broken = True
        popped = len(chains)
        nerr = 0
        for c in chains:
            assert 0 <= c.head < SIZE
            want_chain = oracle(p, mem, c.head)
            if want_chain is None:
                assert c.error is not None, f"malformed chain at head {c.head} accepted"
            else:
                assert c.error is None, c.error
                assert (list(c.out), list(c.in_)) == want_chain
            bufs = c.out + c.in_
            if c.error is None:
                assert bufs and all(mem.contains(a, n) for a, n in bufs)
                assert sum(n for _, n in bufs) < 2**32
                if p["reject_zero_len"]:
                    assert all(n > 0 for _, n in bufs)
            else:
                nerr += 1
                assert c.error.split(":")[0] in CHAIN_ERROR_COUNTERS
            q.read_out(c, 64)
        assert sum(q.counters[k] for k in CHAIN_ERROR_COUNTERS) == nerr
        try:
            q.push_many([(c.head, 0) for c in chains[: popped // 2]])
            for c in chains[popped // 2:]:
                q.push(c.head, 1)
            q.should_notify()
            q.disable_notifications()
            q.enable_notifications()
            q.should_notify()
        except RingBroken:
            broken = True  # only the avail-side reads can break here, and they did above
        assert not mem.refused, f"accesses outside guest memory: {mem.refused}"
        assert all(USED_LO <= g and g + n <= USED_HI for g, n in mem.writes), mem.writes
        diff = np.flatnonzero(np.frombuffer(backing, np.uint8) != np.frombuffer(before, np.uint8))
        assert diff.size == 0 or (diff.min() >= USED_LO and diff.max() < USED_HI)
        if popped:
            assert mem.read_u16(DEVICE + 2) == (p["start"] + popped) & 0xFFFF
        outcomes.append((chains, broken, dict(q.counters)))

    (one, broke_one, counters_one), (many, broke_many, counters_many) = outcomes
    want = expected_break(p)
    assert broke_one == broke_many == (want is not None)
    if want is not None:
        assert len(one) == want  # one at a time: the good chains before the bad head
        if max_n is None:
            assert many == []  # batched: a bad head in the batch consumes nothing
        assert many == one[: len(many)]
        assert counters_one["avail_idx_jump"] + counters_one["head_out_of_range"] == 1
    else:
        assert one == many and counters_one == counters_many
