"""VhostUserSession, message by message, over a real socketpair with a real memfd and eventfds.

The front-end (tests/balloon_dev/transport/vhost_user/frontend.py) plays QEMU's generic vhost-user
front-end; the guest side of the rings is guest_model's driver vring writing into the same memfd the
back-end maps.
"""
from __future__ import annotations

import gc
import os
import struct

import numpy as np
import pytest

from balloon_dev.effects import (
    ActualChanged,
    ConfigChanged,
    Inflated,
    PagesHinted,
)
from protocol import vhost_user as vu
from protocol.balloon import VIRTIO_BALLOON_F_FREE_PAGE_HINT
from protocol.virtio import DeviceStatus
from tests import fdutil
from tests.balloon_dev.transport.vhost_user.frontend import (
    AREA_GPA,
    RAM_SIZE,
    RAM_UADDR,
    STATUS_ALL,
    Frontend,
)
from tests.fdutil import eventfd, eventfd_count, fd_is_open

R = vu.VhostUserRequest
PF = vu.VhostUserProtocolFeature
DRIVER_OK = int(DeviceStatus.DRIVER_OK)
FEATURES_OK = int(DeviceStatus.FEATURES_OK)


def open_fds() -> int:
    # Collect first: a mapping the device still viewed is closed when that view is garbage.
    gc.collect()
    return fdutil.open_fds()


@pytest.fixture
def fe():
    f = Frontend()
    yield f
    f.close()


@pytest.fixture
def live(fe: Frontend) -> Frontend:
    fe.init()
    fe.start()
    return fe


def guest_features(fe: Frontend) -> int:
    return fe.offered & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)


# -- negotiation ---------------------------------------------------------------------------------
def test_get_features_offers_device_features_plus_protocol_bit(fe: Frontend) -> None:
    r = fe.request(R.GET_FEATURES)
    assert r is not None and r.request == R.GET_FEATURES
    assert r.flags == vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK
    assert r.u64 == fe.dev.device_features | 1 << 30


def test_protocol_features_offer_and_ack(fe: Frontend) -> None:
    r = fe.request(R.GET_PROTOCOL_FEATURES)
    assert r is not None
    offered = r.u64
    for bit in (PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.STATUS, PF.RESET_DEVICE,
                PF.CONFIGURE_MEM_SLOTS):
        assert offered >> bit & 1, bit.name
    # Not offered: MQ (fixed queue count), LOG_SHMFD (the front-end is unmigratable anyway).
    for bit in (PF.MQ, PF.LOG_SHMFD):
        assert not offered >> bit & 1, bit.name
    assert fe.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(offered)) is None
    assert fe.session.protocol_features == offered


def test_set_protocol_features_beyond_offer_is_rejected(fe: Frontend) -> None:
    fe.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(1 << PF.REPLY_ACK))
    r = fe.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(1 << PF.MQ | 1 << PF.REPLY_ACK),
                   need_reply=True)
    assert r is not None and r.u64 != 0  # REPLY_ACK failure
    assert fe.session.protocol_features == 1 << PF.REPLY_ACK
    assert fe.session.counters["bad_protocol_features"] == 1


def test_get_queue_num_matches_compacted_layout(fe: Frontend) -> None:
    # Default offer: STATS_VQ + FREE_PAGE_HINT -> inflate, deflate, stats, free_page (3.3).
    r = fe.request(R.GET_QUEUE_NUM)
    assert r is not None and r.u64 == 4


def test_set_features_with_unoffered_bits_is_rejected(fe: Frontend) -> None:
    fe.init()
    r = fe.request(R.SET_FEATURES, vu.build_u64(fe.offered | 1 << 33), need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.features_acked is None
    assert fe.session.counters["bad_features"] == 1


def test_backend_channel_needs_negotiation_and_one_fd(fe: Frontend) -> None:
    fe.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(1 << PF.REPLY_ACK))
    a = eventfd()
    before = open_fds()
    r = fe.request(R.SET_BACKEND_REQ_FD, fds=[a], need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.backend_fd is None
    # The fd that came with the rejected message was closed on the back-end side.
    assert open_fds() == before
    os.close(a)


# -- memory and rings ----------------------------------------------------------------------------
def test_set_mem_table_maps_regions_and_closes_fds(fe: Frontend) -> None:
    fe.init()
    before = open_fds()
    fe.request(R.SET_MEM_TABLE, fe.mem_table(), fds=[fe.memfd])
    # The received fd was closed after mmap; Python's mmap object keeps its own dup of the fd
    # for the mapping's life, so one fd per region remains until the table is replaced.
    assert open_fds() == before + 1
    assert [(r.gpa, r.size) for r in fe.be_mem.regions] == [(0, RAM_SIZE)]
    # Shared memory: a guest write is visible to the back-end and back.
    fe.mem.write(0x5000, b"hello")
    assert fe.be_mem.read(0x5000, 5) == b"hello"
    fe.be_mem.write(0x6000, b"dev")
    assert fe.mem.read(0x6000, 3) == b"dev"


def test_set_mem_table_fd_count_mismatch_rejected_and_fds_closed(fe: Frontend) -> None:
    fe.init()
    extra = eventfd()
    before = open_fds()
    r = fe.request(R.SET_MEM_TABLE, fe.mem_table(), fds=[fe.memfd, extra], need_reply=True)
    assert r is not None and r.u64 == 1
    assert open_fds() == before
    assert fe.be_mem.regions == ()
    assert fe.session.counters["bad_mem_table"] == 1
    os.close(extra)


def test_set_mem_table_region_past_end_of_file_rejected(fe: Frontend) -> None:
    fe.init()
    # Mapping past the end of the memfd would SIGBUS on first touch: refuse the table.
    regs = [vu.MemoryRegion(0, RAM_SIZE, RAM_UADDR, 0x1000)]
    r = fe.request(R.SET_MEM_TABLE, vu.build_memory_table(regs), fds=[fe.memfd],
                   need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.be_mem.regions == ()
    assert fe.session.counters["bad_mem_table"] == 1


def test_set_mem_table_overlapping_regions_rejected(fe: Frontend) -> None:
    fe.init()
    regs = [vu.MemoryRegion(0, RAM_SIZE, RAM_UADDR, 0),
            vu.MemoryRegion(0x1000, 0x1000, RAM_UADDR + RAM_SIZE, 0)]
    r = fe.request(R.SET_MEM_TABLE, vu.build_memory_table(regs), fds=[fe.memfd, fe.memfd],
                   need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.counters["bad_mem_table"] == 1


def test_add_and_remove_memory_regions(fe: Frontend) -> None:
    # CONFIGURE_MEM_SLOTS: QEMU 11.1 sends ADD_MEM_REG per region instead of SET_MEM_TABLE.
    fe.init()
    r = fe.request(R.GET_MAX_MEM_SLOTS)
    assert r is not None and r.u64 >= 8
    half = RAM_SIZE // 2
    low = vu.MemoryRegion(0, half, RAM_UADDR, 0)
    high = vu.MemoryRegion(1 << 32, half, RAM_UADDR + half, half)
    for reg in (low, high):
        r = fe.request(R.ADD_MEM_REG, vu.build_mem_reg(reg), fds=[fe.memfd], need_reply=True)
        assert r is not None and r.u64 == 0
    assert [(x.gpa, x.size) for x in fe.be_mem.regions] == [(0, half), (1 << 32, half)]
    fe.mem.write(half + 8, b"hi")
    assert fe.be_mem.read((1 << 32) + 8, 2) == b"hi"
    # Overlap, missing fd, unknown region: peer errors; the table is unchanged.
    r = fe.request(R.ADD_MEM_REG, vu.build_mem_reg(low), fds=[fe.memfd], need_reply=True)
    assert r is not None and r.u64 == 1
    r = fe.request(R.ADD_MEM_REG, vu.build_mem_reg(vu.MemoryRegion(1 << 40, 4096, 0, 0)),
                   need_reply=True)
    assert r is not None and r.u64 == 1
    r = fe.request(R.REM_MEM_REG, vu.build_mem_reg(vu.MemoryRegion(1 << 40, 4096, 0, 0)),
                   need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.counters["bad_mem_reg"] == 3
    r = fe.request(R.REM_MEM_REG, vu.build_mem_reg(high), need_reply=True)
    assert r is not None and r.u64 == 0
    assert [(x.gpa, x.size) for x in fe.be_mem.regions] == [(0, half)]


def test_vring_addr_is_translated_from_frontend_virtual_addresses(fe: Frontend) -> None:
    fe.init()
    fe.request(R.SET_MEM_TABLE, fe.mem_table(), fds=[fe.memfd])
    vr = fe.setup_ring(0, 64)
    fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, 64))
    fe.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
        0, 0, fe.uaddr(vr.desc_gpa), fe.uaddr(vr.used_gpa), fe.uaddr(vr.avail_gpa), 0)))
    ring = fe.session.rings[0]
    assert (ring.desc_gpa, ring.avail_gpa, ring.used_gpa) == (vr.desc_gpa, vr.avail_gpa,
                                                              vr.used_gpa)


def test_two_regions_of_one_memfd_as_qemu_splits_ram(fe: Frontend) -> None:
    # q35 splits RAM around the PCI hole: low RAM at gpa 0 and the rest above 4 GiB, both from
    # one memfd at different offsets and front-end addresses.
    fe.init()
    half = RAM_SIZE // 2
    hi_gpa, hi_uaddr = 1 << 32, RAM_UADDR + (1 << 30)
    regs = [vu.MemoryRegion(0, half, RAM_UADDR, 0),
            vu.MemoryRegion(hi_gpa, half, hi_uaddr, half)]
    fe.request(R.SET_MEM_TABLE, vu.build_memory_table(regs), fds=[fe.memfd, fe.memfd])
    assert [(r.gpa, r.size) for r in fe.be_mem.regions] == [(0, half), (hi_gpa, half)]
    # Bytes at memfd offset half + 0x10 are guest-physical 4 GiB + 0x10.
    fe.mem.write(half + 0x10, b"high")
    assert fe.be_mem.read(hi_gpa + 0x10, 4) == b"high"
    fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, 16))
    fe.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
        0, 0, hi_uaddr + 0x1000, hi_uaddr + 0x3000, hi_uaddr + 0x2000, 0)))
    ring = fe.session.rings[0]
    assert (ring.desc_gpa, ring.avail_gpa, ring.used_gpa) == (
        hi_gpa + 0x1000, hi_gpa + 0x2000, hi_gpa + 0x3000)


def test_vring_addr_outside_every_region_rejected(fe: Frontend) -> None:
    fe.init()
    fe.request(R.SET_MEM_TABLE, fe.mem_table(), fds=[fe.memfd])
    fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, 64))
    # A guest-physical address where a front-end virtual one is expected: not translatable.
    r = fe.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
        0, 0, AREA_GPA, AREA_GPA + 0x1000, AREA_GPA + 0x2000, 0)), need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.counters["bad_vring_addr"] == 1


@pytest.mark.parametrize("num", [0, 3, 100, 2048])
def test_set_vring_num_must_be_power_of_two_within_max(fe: Frontend, num: int) -> None:
    fe.init()
    r = fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, num), need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.counters["bad_vring_num"] == 1


def test_ring_index_beyond_device_queues_rejected(fe: Frontend) -> None:
    fe.init()
    r = fe.request(R.SET_VRING_NUM, vu.build_vring_state(4, 128), need_reply=True)
    assert r is not None and r.u64 == 1
    assert fe.session.counters["bad_ring_index"] == 1
    # A request that always replies answers a failure with an empty payload.
    r = fe.request(R.GET_VRING_BASE, vu.build_vring_state(7, 0))
    assert r is not None and r.request == R.GET_VRING_BASE and r.payload == b""


def test_kick_fd_replaced_closes_old_one(fe: Frontend) -> None:
    fe.init()
    a, b = eventfd(), eventfd()
    fe.request(R.SET_VRING_KICK, vu.build_vring_file(1), fds=[a])
    first = fe.session.rings[1].kick_fd
    assert first is not None and fd_is_open(first)
    fe.request(R.SET_VRING_KICK, vu.build_vring_file(1), fds=[b])
    # The new fd was received while the old one was still open, so its number differs; the
    # old one is closed now.
    assert fe.session.rings[1].kick_fd != first and not fd_is_open(first)
    assert fe.session.kick_fds().keys() == {1}
    os.close(a)
    os.close(b)


def test_vring_file_nofd_with_fd_attached_rejected(fe: Frontend) -> None:
    fe.init()
    a = eventfd()
    before = open_fds()
    r = fe.request(R.SET_VRING_CALL, vu.build_vring_file(0, nofd=True), fds=[a], need_reply=True)
    assert r is not None and r.u64 == 1
    assert open_fds() == before
    assert fe.session.rings[0].call_fd is None
    os.close(a)


# -- start, status, data path --------------------------------------------------------------------
def test_start_sequence_brings_device_to_driver_ok(live: Frontend) -> None:
    dev = live.dev
    assert dev.status & STATUS_ALL == STATUS_ALL
    assert dev.driver_features == guest_features(live)
    assert all(dev.queue_enabled(q) for q in range(4))
    assert live.session.live
    r = live.request(R.GET_STATUS)
    assert r is not None and r.u64 == dev.status


@pytest.mark.spec("D-16")
def test_no_buffer_used_before_the_rings_are_handed_over(fe: Frontend) -> None:
    # Over vhost-user the device sees the guest's DRIVER_OK only as "the front-end handed every
    # ring over" (QEMU starts the back-end when the guest sets DRIVER_OK). Until the last ring
    # is enabled the device must not use a buffer, even when kicked.
    fe.init()
    fe.start(enable=(0, 1, 2), driver_ok=False)
    assert not fe.session.live and not fe.dev.status & DRIVER_OK
    vr = fe.vrings[0]
    fe.add_u32(vr, 0x300)
    assert fe.kick_ring(0) == []
    assert not vr.more_used()
    assert fe.session.counters["kicks_before_live"] == 1
    # The last ring is enabled: the device goes live and the pending buffer is used.
    fe.request(R.SET_VRING_ENABLE, vu.build_vring_state(3, 1))
    assert fe.session.live and fe.dev.status & DRIVER_OK
    assert Inflated((0x300,)) in fe.backend.effects
    assert vr.more_used()


def test_qemu_11_sequence_goes_live_without_driver_ok_status(fe: Frontend) -> None:
    fe.init()
    fe.start(driver_ok=False)
    assert fe.session.live
    assert fe.dev.status & STATUS_ALL == STATUS_ALL


def test_stop_then_guest_reset_restart_gets_a_fresh_device(live: Frontend) -> None:
    vr = live.vrings[0]
    live.add_u32(vr, 0x321)
    assert Inflated((0x321,)) in live.kick_ring(0)
    live.request(R.SET_CONFIG, vu.build_config(4, struct.pack("<I", 1)))
    assert live.dev.actual == 1
    bases = live.stop()
    # Ring 0 resumes after its one used buffer; the others saw nothing.
    assert bases == [1, 0, 0, 0]
    assert not live.session.live and live.session.stopped
    assert live.session.counters["device_stops"] == 1
    # A guest reset follows: QEMU starts again with fresh rings at base 0: not a resume.
    live.start()
    assert live.session.live and live.dev.status & DRIVER_OK
    assert live.dev.actual == 0  # the device was reset
    assert live.session.counters["device_resumes"] == 0
    vr = live.vrings[0]
    live.add_u32(vr, 0x322)
    assert Inflated((0x322,)) in live.kick_ring(0)


def test_vm_stop_cont_resumes_where_the_rings_stopped(live: Frontend) -> None:
    vr = live.vrings[0]
    live.add_u32(vr, 0x321)
    assert Inflated((0x321,)) in live.kick_ring(0)
    assert vr.get_buf() is not None
    live.request(R.SET_CONFIG, vu.build_config(4, struct.pack("<I", 1)))
    # VM stop: every ring stopped; VM cont: the same rings come back at the reported bases.
    bases = live.stop()
    live.backend.effects.clear()
    live.start(bases=bases)
    assert live.session.live
    assert live.session.counters["device_resumes"] == 1
    assert live.dev.actual == 1  # not reset
    # Only the new buffer is processed: the old one is not replayed.
    live.add_u32(vr, 0x322)
    effects = live.kick_ring(0)
    inflated = [e for e in live.backend.effects + effects if isinstance(e, Inflated)]
    assert inflated == [Inflated((0x322,))]
    assert vr.get_buf() is not None


def test_inflate_through_the_ring(live: Frontend) -> None:
    vr = live.vrings[0]
    buf = live.area.alloc(4 * 3)
    live.mem.write(buf, struct.pack("<3I", 0x200, 0x201, 0x202))
    vr.add_buf(out=[(buf, 12)])
    effects = live.kick_ring(0)
    assert effects == [Inflated((0x200, 0x201, 0x202))]
    assert eventfd_count(live.call[0]) == 1  # NotifyQueue(0) became a write to its call fd
    assert vr.get_buf() is not None
    # GET_VRING_BASE stops the ring and reports where to resume.
    r = live.request(R.GET_VRING_BASE, vu.build_vring_state(0, 0))
    assert r is not None
    assert vu.decode_payload(R.SET_VRING_BASE, r.payload) == vu.VringState(0, 1)
    assert 0 not in live.session.kick_fds()
    vr.add_buf(out=[(buf, 4)])
    assert live.kick_ring(0) == []  # stopped ring: kick ignored
    assert live.session.counters["kicks_ignored"] == 1


def test_disabled_ring_ignores_kicks(live: Frontend) -> None:
    live.request(R.SET_VRING_ENABLE, vu.build_vring_state(1, 0))
    vr = live.vrings[1]
    live.add_u32(vr, 0x200)
    assert live.kick_ring(1) == []
    assert not vr.more_used()
    # Re-enabling processes what was queued meanwhile.
    live.request(R.SET_VRING_ENABLE, vu.build_vring_state(1, 1))
    assert vr.more_used()


def test_set_status_zero_resets_device(live: Frontend) -> None:
    live.request(R.SET_STATUS, vu.build_u64(0))
    assert live.dev.status == 0
    assert not any(live.dev.queue_enabled(q) for q in range(4))
    assert not live.session.live


def test_reset_device_stops_rings_and_closes_their_fds(live: Frontend) -> None:
    kick0 = live.session.rings[0].kick_fd
    assert kick0 is not None
    live.request(R.RESET_DEVICE)
    assert live.dev.status == 0
    assert live.session.kick_fds() == {}
    assert live.session.features_acked is None


def test_without_status_feature_features_then_first_kick_go_live() -> None:
    pf = 1 << PF.REPLY_ACK | 1 << PF.BACKEND_REQ | 1 << PF.CONFIG
    fe = Frontend(protocol_features=pf)
    try:
        fe.init()
        fe.request(R.SET_FEATURES, vu.build_u64(fe.offered))
        assert fe.dev.status & FEATURES_OK
        fe.request(R.SET_MEM_TABLE, fe.mem_table(), fds=[fe.memfd])
        vr = fe.setup_ring(0, 128)
        fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, 128))
        fe.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
            0, 0, fe.uaddr(vr.desc_gpa), fe.uaddr(vr.used_gpa), fe.uaddr(vr.avail_gpa), 0)))
        fe.kick[0], fe.call[0] = eventfd(), eventfd()
        fe.request(R.SET_VRING_KICK, vu.build_vring_file(0), fds=[fe.kick[0]])
        fe.request(R.SET_VRING_CALL, vu.build_vring_file(0), fds=[fe.call[0]])
        fe.request(R.SET_VRING_ENABLE, vu.build_vring_state(0, 1))
        fe.add_u32(vr, 0x222)
        effects = fe.kick_ring(0)
        assert fe.dev.status & DRIVER_OK
        assert Inflated((0x222,)) in effects
    finally:
        fe.close()


# -- config space --------------------------------------------------------------------------------
def test_get_config_returns_device_config(live: Frontend) -> None:
    live.dev.set_target(1234)
    data = live.get_config(0, 16)
    assert struct.unpack("<4I", data)[0] == 1234
    assert live.get_config(4, 4) == live.dev.read_config(4, 4)


def test_get_config_past_window_reads_zero_and_beyond_256_fails(live: Frontend) -> None:
    assert live.get_config(12, 8)[4:] == bytes(4)
    r = live.request(R.GET_CONFIG, vu.build_config(250, bytes(8)))
    assert r is not None and r.payload == b""  # empty reply = error (protocol.md 8.2)


def test_poison_written_before_features_is_applied_at_features_ok(fe: Frontend) -> None:
    fe.init()
    # Linux writes poison_val before DRIVER_OK; QEMU forwards the whole cached window.
    cfg = struct.pack("<4I", 0, 0, 0, 0xAAAAAAAA)
    fe.request(R.SET_CONFIG, vu.build_config(0, cfg))
    assert fe.dev.poison_val == 0  # the device has no features yet
    fe.start()
    assert fe.dev.poison_val == 0xAAAAAAAA
    assert "config_write_before_features_ok" not in fe.dev.counters


def test_set_config_forwards_changed_driver_fields_only(live: Frontend) -> None:
    live.dev.set_target(100)
    stale = struct.pack("<4I", 7, 50, 9, 0)  # num_pages and cmd_id are stale copies
    live.request(R.SET_CONFIG, vu.build_config(0, stale))
    assert ActualChanged(50) in live.backend.effects
    assert live.dev.num_pages == 100
    assert "config_write_readonly" not in live.dev.counters


def test_set_config_bad_flags_rejected(live: Frontend) -> None:
    r = live.request(R.SET_CONFIG, vu.build_config(0, bytes(16), flags=7), need_reply=True)
    assert r is not None and r.u64 == 1


def test_config_change_goes_to_backend_channel(live: Frontend) -> None:
    effects = live.dev.set_target(4096)
    assert ConfigChanged() in effects
    msg = live.session.config_change_message()
    assert msg == vu.build_request(vu.VhostUserBackendRequest.CONFIG_CHANGE_MSG)


# -- free page hinting end to end ---------------------------------------------------------------
@pytest.mark.spec("D-17")
def test_hint_round_over_vhost_user(live: Frontend) -> None:
    assert live.dev.driver_features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1
    effects = live.dev.free_page_start()
    assert ConfigChanged() in effects
    cmd_id = struct.unpack("<I", live.get_config(8, 4))[0]
    assert cmd_id >= 0x80000000
    fpq = live.vrings[3]  # compacted index of free_page_vq (protocol.md 3.3)
    live.add_u32(fpq, cmd_id)
    blocks = np.array([0x200000, 0x300000], dtype=np.uint64)
    fpq.add_single_bufs(blocks, np.full(2, 0x1000), writable=True)
    effects = live.kick_ring(3)
    hinted = [e for e in effects if isinstance(e, PagesHinted)]
    assert hinted and hinted[0].cmd_id == cmd_id
    ranges = [r for e in hinted for r in e.ranges]
    assert ranges == [(0x200000, 0x1000), (0x300000, 0x1000)]
    assert all(live.be_mem.contains(a, n) for a, n in ranges)


# -- malformed input -----------------------------------------------------------------------------
def test_unknown_request_with_fds_is_refused_and_fds_closed(live: Frontend) -> None:
    a = eventfd()
    before = open_fds()
    r = live.request(99, b"", fds=[a], need_reply=True)
    assert r is not None and r.request == 99 and r.u64 == 1
    assert open_fds() == before
    assert live.session.counters["unsupported_requests"] == 1
    os.close(a)
    # The session carries on.
    assert live.request(R.GET_QUEUE_NUM) is not None


@pytest.mark.parametrize("req, payload, with_fd", [
    (R.SET_LOG_BASE, struct.pack("=QQ", 4096, 0), True),  # LOG_SHMFD not offered
    (R.SET_LOG_FD, b"", True),
    (R.SET_VRING_ENDIAN, vu.build_vring_state(0, 1), False),
    (R.SEND_RARP, bytes(8), False),
    (R.POSTCOPY_LISTEN, b"", False),
])
def test_known_but_unimplemented_requests_are_refused(live: Frontend, req: int, payload: bytes,
                                                      with_fd: bool) -> None:
    fds = [eventfd()] if with_fd else []
    before = open_fds()
    r = live.request(req, payload, fds=fds, need_reply=True)
    assert r is not None and r.request == req and r.u64 == 1
    assert open_fds() == before
    for fd in fds:
        os.close(fd)
    assert live.session.live  # nothing else changed


def test_unimplemented_request_that_always_replies_gets_an_empty_reply(live: Frontend) -> None:
    # GET_INFLIGHT_FD is defined with a reply payload: QEMU reads a reply whatever happens.
    r = live.request(R.GET_INFLIGHT_FD, struct.pack("=QQHH", 0, 0, 4, 128) + bytes(4))
    assert r is not None and r.request == R.GET_INFLIGHT_FD and r.payload == b""


def test_bad_payload_size_is_a_peer_error(live: Frontend) -> None:
    r = live.request(R.SET_VRING_NUM, b"\0" * 4, need_reply=True)
    assert r is not None and r.u64 == 1
    assert live.session.counters["bad_payloads"] == 1


def test_without_need_reply_a_rejected_request_sends_nothing(fe: Frontend) -> None:
    fe.init()
    assert fe.request(R.SET_VRING_NUM, vu.build_vring_state(0, 3)) is None
    assert fe.session.counters["bad_vring_num"] == 1


def test_ring_change_while_live_rejected(live: Frontend) -> None:
    r = live.request(R.SET_VRING_NUM, vu.build_vring_state(0, 64), need_reply=True)
    assert r is not None and r.u64 == 1


def test_reply_flag_on_a_request_is_rejected(live: Frontend) -> None:
    live.send_raw(vu.build_header(R.SET_OWNER, vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK
                                  | vu.VHOST_USER_NEED_REPLY_MASK, 0))
    live.backend.pump()
    r = live.recv_reply()
    assert r.u64 == 1
    assert live.session.counters["unexpected_replies"] == 1


def test_internal_error_is_answered_and_survived(live: Frontend, monkeypatch) -> None:
    def broken(_off: int, _size: int) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(live.dev, "read_config", broken)
    r = live.request(R.GET_CONFIG, vu.build_config(0, bytes(4)))
    assert r is not None and r.payload == b""  # a failure the front-end can see
    assert live.session.counters["internal_errors"] == 1
    monkeypatch.undo()
    assert len(live.get_config(0, 4)) == 4


def test_close_releases_every_fd_and_mapping(fe: Frontend) -> None:
    baseline = open_fds()
    fe.init()
    fe.start()
    assert open_fds() > baseline
    fe.session.close()
    # Front-end-side fds (kick/call/channel) are ours; the back-end's copies are all closed.
    ours = len(fe.kick) + len(fe.call) + 1
    assert open_fds() == baseline + ours
    assert fe.be_mem.regions == ()
    assert fe.dev.status == 0
