"""Golden bytes for every layout in protocol/virtio.py, protocol/virtqueue.py and
protocol/balloon.py (protocol.md 1.2, 1.4, 1.7, 1.8, 2.1, 2.2, 3.1-3.5, 4.1): hand-written byte
vectors parsed and rebuilt, the numpy dtypes checked against the construct structs, and the
constants checked against the tables of protocol.md."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import balloon as b
from protocol import virtio as v
from protocol import virtqueue as vq
from protocol.virtio import VIRTIO_F_VERSION_1, DeviceStatus, feature_mask, feature_names

u16, u32, u64 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


# -- split ring (protocol.md 1.2) ---------------------------------------------------------
def test_virtq_desc_golden() -> None:
    raw = bytes.fromhex("8877665544332211" "44332211" "0300" "0500")
    d = vq.VirtqDesc.parse(raw)
    assert (d.addr, d.len, d.flags, d.next) == (0x1122334455667788, 0x11223344, 3, 5)
    assert vq.VirtqDesc.build(d) == raw and vq.DESC_SIZE == len(raw) == 16
    arr = np.frombuffer(raw, dtype=vq.DESC_DTYPE)
    assert (int(arr["addr"][0]), int(arr["len"][0]), int(arr["flags"][0]), int(arr["next"][0])) == \
        (0x1122334455667788, 0x11223344, 3, 5)


def test_desc_flag_values() -> None:
    assert (vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE, vq.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert vq.VIRTQ_AVAIL_F_NO_INTERRUPT == 1 and vq.VIRTQ_USED_F_NO_NOTIFY == 1
    assert vq.VIRTQ_MAX_SIZE == 32768


def test_avail_and_used_rings_golden() -> None:
    avail = vq.VirtqAvail(2)
    raw = bytes.fromhex("0100" "0700" "0300" "0400" "0900")
    p = avail.parse(raw)
    assert (p.flags, p.idx, list(p.ring), p.used_event) == (1, 7, [3, 4], 9)
    assert avail.build(p) == raw and len(raw) == vq.avail_ring_size(2)
    used = vq.VirtqUsed(2)
    raw = bytes.fromhex("0100" "0200" "05000000" "00100000" "ffff0000" "ffffffff" "0200")
    p = used.parse(raw)
    assert (p.flags, p.idx, p.avail_event) == (1, 2, 2)
    assert [(e.id, e.len) for e in p.ring] == [(5, 0x1000), (0xFFFF, 0xFFFFFFFF)]
    assert used.build(p) == raw and len(raw) == vq.used_ring_size(2)
    e = vq.VirtqUsedElem.parse(bytes.fromhex("0700000010000000"))
    assert (e.id, e.len) == (7, 16) and vq.USED_ELEM_SIZE == vq.USED_ELEM_DTYPE.itemsize == 8


@pytest.mark.parametrize("n", [1, 2, 128, 1024, 32768])
def test_area_sizes(n: int) -> None:
    # protocol.md 1.1: 16N, 6 + 2N, 6 + 8N (the trailing event words included).
    assert vq.desc_table_size(n) == 16 * n
    assert vq.avail_ring_size(n) == 6 + 2 * n == vq.VirtqAvail(n).sizeof()
    assert vq.used_ring_size(n) == 6 + 8 * n == vq.VirtqUsed(n).sizeof()


@given(u64, u32, u16, u16)
def test_desc_dtype_matches_struct(addr: int, length: int, flags: int, nxt: int) -> None:
    raw = vq.VirtqDesc.build(dict(addr=addr, len=length, flags=flags, next=nxt))
    row = np.frombuffer(raw, dtype=vq.DESC_DTYPE)[0]
    assert row.tolist() == (addr, length, flags, nxt)
    assert np.array([(addr, length, flags, nxt)], dtype=vq.DESC_DTYPE).tobytes() == raw


@given(u32, u32)
def test_used_elem_dtype_matches_struct(ident: int, length: int) -> None:
    raw = vq.VirtqUsedElem.build(dict(id=ident, len=length))
    assert np.frombuffer(raw, dtype=vq.USED_ELEM_DTYPE)[0].tolist() == (ident, length)


# -- event index (protocol.md 1.4) ----------------------------------------------------------
@pytest.mark.parametrize("event,new,old,want", [(11, 13, 10, True), (13, 13, 10, False),
                                                (9, 13, 10, False), (10, 13, 10, True),
                                                (12, 13, 10, True), (0xFFFF, 1, 0xFFFE, True),
                                                (0, 1, 0xFFFE, True), (1, 1, 0xFFFE, False),
                                                (5, 5, 5, False)])
def test_need_event(event: int, new: int, old: int, want: bool) -> None:
    assert vq.vring_need_event(event, new, old) is want


@given(u16, u16, st.integers(0, 0x8000))
def test_need_event_means_event_in_old_new(event: int, old: int, moved: int) -> None:
    new = (old + moved) & 0xFFFF
    window = {(old + k) & 0xFFFF for k in range(moved)}
    assert vq.vring_need_event(event, new, old) is (event in window)


# -- legacy layout (protocol.md 1.7) -------------------------------------------------------
@pytest.mark.parametrize("n,size", [(128, 8192), (256, 12288), (1024, 32768)])
def test_legacy_size_rounds_up(n: int, size: int) -> None:
    # e.g. 256: 16*256 + 2*(3+256) = 4614 -> 8192, then 6 + 8*256 = 2054 -> 4096.
    assert vq.legacy_vring_size(n) == size


# -- packed ring (protocol.md 1.8) -------------------------------------------------------
def test_packed_desc_golden() -> None:
    raw = bytes.fromhex("0010000000000000" "00020000" "0700" "8080")
    p = vq.VirtqPackedDesc.parse(raw)
    assert (p.addr, p.len, p.id, p.flags) == (0x1000, 0x200, 7, 0x8080)
    assert p.flags & vq.VIRTQ_PACKED_DESC_F_AVAIL and p.flags & vq.VIRTQ_PACKED_DESC_F_USED
    assert vq.VirtqPackedDesc.build(p) == raw
    assert np.frombuffer(raw, dtype=vq.PACKED_DESC_DTYPE)[0].tolist() == (0x1000, 0x200, 7, 0x8080)
    assert (vq.VIRTQ_PACKED_DESC_F_AVAIL, vq.VIRTQ_PACKED_DESC_F_USED) == (0x80, 0x8000)


def test_packed_event_suppression_golden() -> None:
    # Offset 5, wrap counter 1, flags DESC: 0x8005 then 0x0002, little-endian.
    raw = bytes.fromhex("0580" "0200")
    p = vq.VirtqPackedEventSuppress.parse(raw)
    assert (p.off_wrap, p.flags) == (0x8005, vq.RING_EVENT_FLAGS_DESC)
    assert vq.unpack_off_wrap(p.off_wrap) == (5, 1)
    assert vq.VirtqPackedEventSuppress.build(
        dict(off_wrap=vq.pack_off_wrap(5, 1), flags=vq.RING_EVENT_FLAGS_DESC)) == raw
    assert vq.PACKED_EVENT_SUPPRESS_SIZE == len(raw)
    assert (vq.RING_EVENT_FLAGS_ENABLE, vq.RING_EVENT_FLAGS_DISABLE) == (0, 1)


@given(st.integers(0, 0x7FFF), st.integers(0, 1))
def test_off_wrap_round_trip(off: int, wrap: int) -> None:
    assert vq.unpack_off_wrap(vq.pack_off_wrap(off, wrap)) == (off, wrap)


@pytest.mark.parametrize("off,wrap", [(0x8000, 0), (-1, 0), (0, 2)])
def test_off_wrap_rejects_out_of_range(off: int, wrap: int) -> None:
    with pytest.raises(ValueError):
        vq.pack_off_wrap(off, wrap)


# -- device-independent constants (protocol.md 2.1, 2.2) -------------------------------------
def test_feature_bit_numbers() -> None:
    assert (v.VIRTIO_F_NOTIFY_ON_EMPTY, v.VIRTIO_F_ANY_LAYOUT) == (24, 27)
    assert (v.VIRTIO_F_RING_INDIRECT_DESC, v.VIRTIO_F_RING_EVENT_IDX, v.VIRTIO_F_UNUSED_30) == \
        (28, 29, 30)
    assert [v.VIRTIO_F_VERSION_1, v.VIRTIO_F_ACCESS_PLATFORM, v.VIRTIO_F_RING_PACKED,
            v.VIRTIO_F_IN_ORDER, v.VIRTIO_F_ORDER_PLATFORM, v.VIRTIO_F_SR_IOV,
            v.VIRTIO_F_NOTIFICATION_DATA, v.VIRTIO_F_NOTIF_CONFIG_DATA, v.VIRTIO_F_RING_RESET,
            v.VIRTIO_F_ADMIN_VQ] == list(range(32, 42))
    assert v.VIRTIO_F_SUSPEND == 43 and v.VIRTIO_ID_BALLOON == 5


def test_device_type_feature_mask() -> None:
    m = v.DEVICE_TYPE_FEATURE_MASK
    assert [bit for bit in range(64) if m >> bit & 1] == list(range(24)) + list(range(50, 64))


def test_status_bits() -> None:
    assert {s.name: int(s) for s in DeviceStatus} == {
        "ACKNOWLEDGE": 1, "DRIVER": 2, "DRIVER_OK": 4, "FEATURES_OK": 8, "SUSPEND": 16,
        "DEVICE_NEEDS_RESET": 64, "FAILED": 128}


def test_feature_helpers() -> None:
    assert feature_mask(VIRTIO_F_VERSION_1, 3) == (1 << 32) | 8 and feature_mask() == 0
    assert feature_names(feature_mask(3, 32), b.BALLOON_FEATURE_NAMES) == \
        ["FREE_PAGE_HINT", "VERSION_1"]
    assert feature_names(feature_mask(29, 100)) == ["RING_EVENT_IDX", "bit100"]


# -- balloon (protocol.md 3, 4.1) ----------------------------------------------------------
def test_balloon_feature_bits() -> None:
    assert [b.VIRTIO_BALLOON_F_MUST_TELL_HOST, b.VIRTIO_BALLOON_F_STATS_VQ,
            b.VIRTIO_BALLOON_F_DEFLATE_ON_OOM, b.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
            b.VIRTIO_BALLOON_F_PAGE_POISON, b.VIRTIO_BALLOON_F_REPORTING] == list(range(6))
    assert b.VIRTIO_BALLOON_F_PAGE_REPORTING == b.VIRTIO_BALLOON_F_REPORTING
    assert b.VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL == 6


def test_balloon_config_golden() -> None:
    raw = bytes.fromhex("00010000" "80000000" "01000080" "aaaaaaaa")
    c = b.VirtioBalloonConfig.parse(raw)
    assert (c.num_pages, c.actual, c.free_page_hint_cmd_id, c.poison_val) == \
        (256, 128, 0x80000001, 0xAAAAAAAA)
    assert b.VirtioBalloonConfig.build(c) == raw and b.VirtioBalloonConfig.sizeof() == 16
    assert (b.CFG_NUM_PAGES, b.CFG_ACTUAL, b.CFG_FREE_PAGE_HINT_CMD_ID, b.CFG_POISON_VAL) == \
        (0, 4, 8, 12)
    offsets = {}
    for name in ("num_pages", "actual", "free_page_hint_cmd_id", "poison_val"):
        probe = {**dict(num_pages=0, actual=0, free_page_hint_cmd_id=0, poison_val=0), name: 1}
        offsets[name] = b.VirtioBalloonConfig.build(probe).index(1)
    assert offsets == {"num_pages": 0, "actual": 4, "free_page_hint_cmd_id": 8, "poison_val": 12}


def test_free_page_hint_cmd_golden() -> None:
    assert b.FreePageHintCmd.build(dict(cmd_id=0)) == b"\0\0\0\0"
    assert b.FreePageHintCmd.parse(bytes.fromhex("01000080")).cmd_id == b.QEMU_FIRST_CMD_ID
    assert (b.VIRTIO_BALLOON_CMD_ID_STOP, b.VIRTIO_BALLOON_CMD_ID_DONE) == (0, 1)
    assert (b.QEMU_CMD_ID_MIN, b.QEMU_FIRST_CMD_ID) == (0x80000000, 0x80000001)


def test_stat_entry_is_10_bytes() -> None:
    raw = bytes.fromhex("0400" "0010000000000000")
    s = b.VirtioBalloonStat.parse(raw)
    assert (s.tag, s.val) == (b.StatTag.MEMFREE, 0x1000)
    assert b.VirtioBalloonStat.build(s) == raw and b.STAT_ENTRY_SIZE == 10 == len(raw)
    raw = bytes.fromhex("0f00" "ffffffffffffffff")
    s = b.VirtioBalloonStat.parse(raw)
    assert (s.tag, s.val) == (b.StatTag.DIRECT_RECLAIM, 2**64 - 1)


def test_stat_tags() -> None:
    assert [t.name for t in sorted(b.StatTag)] == [
        "SWAP_IN", "SWAP_OUT", "MAJFLT", "MINFLT", "MEMFREE", "MEMTOT", "AVAIL", "CACHES",
        "HTLB_PGALLOC", "HTLB_PGFAIL", "OOM_KILL", "ALLOC_STALL", "ASYNC_SCAN", "DIRECT_SCAN",
        "ASYNC_RECLAIM", "DIRECT_RECLAIM"]
    assert [int(t) for t in sorted(b.StatTag)] == list(range(16))


def test_balloon_constants() -> None:
    assert b.VIRTIO_BALLOON_PFN_SHIFT == 12 and b.VIRTIO_BALLOON_ARRAY_PFNS_MAX == 256
    assert b.VIRTIO_BALLOON_HINT_BLOCK_ORDER == 10 and b.HINT_BLOCK_BYTES == 4 << 20
    assert (b.QEMU_QUEUE_SIZE, b.QEMU_FREE_PAGE_QUEUE_SIZE, b.QEMU_REPORTING_QUEUE_SIZE) == \
        (128, 1024, 32)
    assert [int(q) for q in b.BalloonQueue] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("features,size", [(0, 8), (1 << 3, 12), (1 << 4, 16),
                                           ((1 << 3) | (1 << 4), 16), (0b100111, 8)])
def test_config_size_by_offered_features(features: int, size: int) -> None:
    assert b.config_size(features) == size


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("hint", [False, True])
@pytest.mark.parametrize("report", [False, True])
def test_queue_layout_compacted_and_fixed(stats: bool, hint: bool, report: bool) -> None:
    f = (stats << b.VIRTIO_BALLOON_F_STATS_VQ | hint << b.VIRTIO_BALLOON_F_FREE_PAGE_HINT
         | report << b.VIRTIO_BALLOON_F_REPORTING)
    Q = b.BalloonQueue
    present = [Q.INFLATE, Q.DEFLATE] + [q for q, on in ((Q.STATS, stats), (Q.FREE_PAGE, hint),
                                                        (Q.REPORTING, report)) if on]
    # protocol.md 3.3: compacted numbering in spec order; fixed = the spec's literal indices.
    assert b.queue_layout(f) == {q: i for i, q in enumerate(present)}
    assert b.queue_layout(f, fixed=True) == {q: int(q) for q in present}
