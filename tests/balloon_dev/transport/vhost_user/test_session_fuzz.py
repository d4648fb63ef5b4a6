"""Property: no front-end message sequence makes the vhost-user session raise or leak an fd.

Hypothesis draws sequences of well-framed messages (any request id, flags with the right version
bits, payloads that are either random bytes or a valid encoding with random field values) and
feeds them to a session over a live device. Each message may carry an eventfd. After every
message the session must have answered as the rules say (a reply exactly when one is due) and,
at the end, ``close()`` must leave no fd of ours open.
"""
from __future__ import annotations

import gc
import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balloon_dev.device import BalloonDevice
from balloon_dev.transport.vhost_user import VhostUserSession
from guestmem import GuestMemory
from protocol import vhost_user as vu
from tests.fdutil import open_fds

R = vu.VhostUserRequest

u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 300)
RAM = 1 << 16
UADDR = 0x7F00_0000_0000
#: Ring addresses: mostly inside the mapped RAM (so rings can go live over garbage), some not.
addrs = st.one_of(st.integers(0, RAM // 16 - 1).map(lambda i: UADDR + 16 * i), u64)

payloads = st.one_of(
    st.binary(max_size=80),
    u64.map(vu.build_u64),
    st.tuples(st.integers(0, 8), small).map(lambda t: vu.build_vring_state(*t)),
    st.tuples(st.integers(0, 8), st.booleans()).map(lambda t: vu.build_vring_file(*t)),
    st.tuples(st.integers(0, 8), st.integers(0, 1), addrs, addrs, addrs, u64).map(
        lambda t: vu.build_vring_addr(vu.VringAddr(*t))),
    st.tuples(st.integers(0, 300), st.binary(max_size=32)).map(
        lambda t: vu.build_config(t[0], t[1])),
)
#: Hand over all four rings at random in-RAM addresses (as QEMU's start sequence would).
ring_setups = st.tuples(st.just("setup"), st.lists(
    st.tuples(st.sampled_from([2, 8, 64]), st.integers(0, RAM // 16 - 64),
              st.integers(0, RAM // 16 - 64), st.integers(0, RAM // 16 - 64)),
    min_size=4, max_size=4))
#: The guest scribbles on its RAM (ring contents are garbage to the device).
pokes = st.tuples(st.just("poke"), st.integers(0, RAM - 64), st.binary(min_size=1, max_size=64))
messages = st.tuples(
    st.one_of(st.sampled_from(list(R)), st.integers(0, 60)),
    st.sampled_from([vu.VHOST_USER_VERSION, vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK,
                     vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK]),
    payloads,
    st.booleans(),  # attach an eventfd
)


def assert_no_fd_leak(baseline: int) -> None:
    # A mapping the device still viewed is closed when that view is garbage; collect only when
    # needed (it is slow). Garbage from earlier examples may go too, hence <=.
    if open_fds() > baseline:
        gc.collect()
    assert open_fds() <= baseline


@given(st.lists(st.one_of(messages, ring_setups, pokes), max_size=25))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_message_sequence_is_survived_without_fd_leaks(seq: list) -> None:
    baseline = open_fds()
    mem = GuestMemory()
    session = VhostUserSession(BalloonDevice(mem), mem)
    # Negotiate REPLY_ACK so NEED_REPLY gets an answer, and map a small RAM (a memfd of zeros:
    # rings placed there hold garbage the device must survive).
    session.handle(vu.Message(vu.Header(R.SET_PROTOCOL_FEATURES, 1, 8),
                              vu.build_u64(1 << vu.VhostUserProtocolFeature.REPLY_ACK)))
    memfd = os.memfd_create("fuzz-ram")
    os.ftruncate(memfd, RAM)
    table = vu.build_memory_table([vu.MemoryRegion(0, RAM, UADDR, 0)])
    session.handle(vu.Message(vu.Header(R.SET_MEM_TABLE, 1, len(table)), table, (os.dup(memfd),)))
    feats = vu.build_u64(session.dev.device_features)
    session.handle(vu.Message(vu.Header(R.SET_FEATURES, 1, 8), feats))
    for item in seq:
        if item[0] == "setup":
            _hand_over_rings(session, item[1])
            continue
        if item[0] == "poke":
            os.pwrite(memfd, item[2], item[1])
            for q in range(4):
                session.kick(q)
            continue
        request, flags, payload, with_fd = item
        fds = (os.eventfd(0, os.EFD_NONBLOCK),) if with_fd else ()
        res = session.handle(vu.Message(vu.Header(request, flags, len(payload)), payload, fds))
        due = request in vu.REPLY_REQUESTS or (
            flags & vu.VHOST_USER_NEED_REPLY_MASK and session.has_protocol_feature(
                vu.VhostUserProtocolFeature.REPLY_ACK))
        assert (res.reply is not None) == bool(due), (request, flags)
        if res.reply is not None:
            h = vu.parse_header(res.reply[:12])
            assert h.request == request and h.flags == 5
        for q in range(4):
            session.kick(q)
    event(f"went live: {session.live}")
    session.close()
    os.close(memfd)
    assert_no_fd_leak(baseline)


def _hand_over_rings(session: VhostUserSession, rings: list[tuple[int, int, int, int]]) -> None:
    def send(req: int, payload: bytes, fds: tuple[int, ...] = ()) -> None:
        session.handle(vu.Message(vu.Header(req, 1, len(payload)), payload, fds))

    for q, (num, d, a, u) in enumerate(rings):
        send(R.SET_VRING_NUM, vu.build_vring_state(q, num))
        send(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
            q, 0, UADDR + 16 * d, UADDR + 16 * u, UADDR + 16 * a, 0)))
        send(R.SET_VRING_KICK, vu.build_vring_file(q), (os.eventfd(0, os.EFD_NONBLOCK),))
        send(R.SET_VRING_CALL, vu.build_vring_file(q), (os.eventfd(0, os.EFD_NONBLOCK),))
    for q in range(4):
        send(R.SET_VRING_ENABLE, vu.build_vring_state(q, 1))
