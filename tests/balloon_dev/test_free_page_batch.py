"""The batched free page path (``ChainBatch`` + ``FreePageHinting.handle_batch``) against the
one-``Chain``-at-a-time reference (``handle``), on the same adversarial rings.

Two devices over two identical guest memories get the same driver actions: descriptors of every
shape (hints in and out of RAM, zero and odd lengths, commands of every value and length, NEXT
and INDIRECT links, loops), heads beyond the queue, avail index jumps, host start / stop / done.
After every action the two must agree on everything observable: the effects (hinted pages
included), the used ring's bytes, every counter and DR-n count, and the status (NEEDS_RESET).
"""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloon_dev.device import DeviceConfig
from balloon_dev.effects import PagesHinted
from protocol.balloon import BalloonQueue
from tests.balloon_dev.devharness import DATA_BASE, Harness
from vmsim.conformance.rings import INDIRECT, NEXT, WRITE

Q = BalloonQueue.FREE_PAGE
QSIZE = 16
MiB = 1 << 20
CMD_AREA = DATA_BASE
#: Values a command buffer may hold: STOP, DONE, the first ids the host draws, junk.
CMD_VALUES = (0, 1, 0x80000001, 0x80000002, 0x80000003, 7)

hint_addr = st.sampled_from([0, 4 * MiB, 8 * MiB, 12 * MiB, 0x1234, 0x3000, 16 * MiB,
                             1 << 40, (1 << 64) - 4096])
hint_len = st.sampled_from([4 * MiB, 2 * MiB, 4096, 100, 0, 8 * MiB, 4 * MiB + 1])
cmd_desc = st.tuples(st.just("cmd"), st.integers(0, QSIZE - 1),
                     st.integers(0, len(CMD_VALUES) - 1), st.sampled_from([4, 4, 4, 8, 3]),
                     st.sampled_from([0, 0, NEXT, WRITE]), st.integers(0, QSIZE))
hint_desc = st.tuples(st.just("hint"), st.integers(0, QSIZE - 1), hint_addr, hint_len,
                      st.sampled_from([WRITE, WRITE, WRITE, WRITE | NEXT, 0, WRITE | INDIRECT]),
                      st.integers(0, QSIZE))
publish = st.tuples(st.just("publish"),
                    st.lists(st.integers(0, QSIZE - 1) | st.just(QSIZE + 3), min_size=1,
                             max_size=QSIZE))
# A driver's burst: good hints around commands (so runs are cut), published and kicked at once.
burst = st.tuples(st.just("burst"),
                  st.lists(st.tuples(st.integers(0, 3), st.sampled_from([4 * MiB, 2 * MiB])) |
                           st.integers(0, len(CMD_VALUES) - 1), min_size=1, max_size=QSIZE))
action = st.one_of(
    hint_desc, hint_desc, cmd_desc, publish, publish, burst, burst,
    st.tuples(st.just("host"), st.sampled_from(["start", "stop", "done"])),
    st.tuples(st.just("kick")),
    st.tuples(st.just("jump"), st.integers(1, 40)),
)


def _pair(ram_pages: int | None) -> tuple[Harness, Harness]:
    cfg = DeviceConfig(queue_sizes=(128, 128, 128, QSIZE, 32), ram_pages=ram_pages)
    pair = (Harness(cfg), Harness(cfg))
    pair[1].dev.batched_free_page = False  # the reference
    for h in pair:
        h.init()
        for k, v in enumerate(CMD_VALUES):
            h.mem.write(CMD_AREA + 8 * k, struct.pack("<II", v, v))
    return pair


def _do(h: Harness, act: tuple) -> list:
    ring = h.rings[Q]
    kind = act[0]
    if kind == "hint":
        _, i, addr, length, flags, nxt = act
        ring.set_desc(i, addr, length, flags, nxt)
    elif kind == "cmd":
        _, i, v, length, flags, nxt = act
        ring.set_desc(i, CMD_AREA + 8 * v, length, flags, nxt)
    elif kind == "publish":
        ring.publish(*act[1])
    elif kind == "burst":
        heads = []
        for k, item in enumerate(act[1]):
            if isinstance(item, tuple):
                block, length = item
                ring.set_desc(k, block * 4 * MiB, length, WRITE)
            else:
                ring.set_desc(k, CMD_AREA + 8 * item, 4, 0)
            heads.append(k)
        ring.publish(*heads)
        return h.kick(Q)
    elif kind == "jump":
        ring.set_avail_idx(ring.avail_idx + act[1])
    elif kind == "host":
        return {"start": h.dev.free_page_start, "stop": h.dev.free_page_stop,
                "done": h.dev.free_page_done}[act[1]]()
    else:
        return h.kick(Q)
    return []


def _observable(h: Harness, effects: list) -> tuple:
    ring = h.rings[Q]
    gpa, n = ring.used_area
    return (effects, h.mem.read(gpa, n), h.dev.counters, h.dev.dr_violations, h.dev.status,
            h.dev.hint.status, h.dev.config_generation)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=1, max_size=40), st.sampled_from([2048, 4096, None]),
       st.booleans())
def test_batched_free_page_path_matches_the_reference(actions, ram_pages, opened):
    """``ram_pages`` 2048: RAM is half the byte-backed area, so buffers in its upper half pass
    the ring's checks and are cut by the device's RAM filter."""
    batched, ref = _pair(ram_pages)
    if opened:
        for h in (batched, ref):
            h.open_hint_round()
    for act in actions:
        a = _observable(batched, _do(batched, act))
        b = _observable(ref, _do(ref, act))
        assert a == b, act


def test_a_run_of_hints_is_one_effect_with_whole_pages():
    """The batched path's output shape: one PagesHinted per run, pages rounded inwards."""
    batched, ref = _pair(4096)
    for h in (batched, ref):
        h.open_hint_round()
        h.post_in(Q, [(0x1800, 0x3000)])      # pages 2..3 wholly inside
        h.post_in(Q, [(4 * MiB, 4 * MiB)])
        h.post_in(Q, [(0x100, 0x200)])        # no whole page
    eff = [e for e in batched.kick(Q) if isinstance(e, PagesHinted)]
    assert eff == [e for e in ref.kick(Q) if isinstance(e, PagesHinted)]
    assert len(eff) == 1
    assert eff[0].first_pfn.tolist() == [2, 1024, 1] and eff[0].count.tolist() == [2, 1024, 0]
