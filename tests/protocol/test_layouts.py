"""Golden bytes for the virtio, virtqueue and balloon layouts (protocol.md 1.2, 1.8, 3.2, 3.5)."""
from __future__ import annotations

import numpy as np
import pytest

from protocol import balloon as b
from protocol import virtqueue as vq
from protocol.virtio import VIRTIO_F_VERSION_1, DeviceStatus, feature_mask, feature_names


def test_virtq_desc_golden():
    raw = bytes.fromhex("8877665544332211" "44332211" "0300" "0500")
    d = vq.VirtqDesc.parse(raw)
    assert (d.addr, d.len, d.flags, d.next) == (0x1122334455667788, 0x11223344, 3, 5)
    assert vq.VirtqDesc.build(d) == raw
    arr = np.frombuffer(raw, dtype=vq.DESC_DTYPE)
    assert (int(arr["addr"][0]), int(arr["len"][0]), int(arr["flags"][0]), int(arr["next"][0])) == \
        (0x1122334455667788, 0x11223344, 3, 5)


def test_avail_and_used_rings_golden():
    avail = vq.VirtqAvail(2)
    raw = bytes.fromhex("0100" "0700" "0300" "0400" "0900")
    p = avail.parse(raw)
    assert (p.flags, p.idx, list(p.ring), p.used_event) == (1, 7, [3, 4], 9)
    assert avail.build(p) == raw and len(raw) == vq.avail_ring_size(2)
    used = vq.VirtqUsed(1)
    raw = bytes.fromhex("0000" "0100" "05000000" "00100000" "0200")
    p = used.parse(raw)
    assert (p.idx, p.ring[0].id, p.ring[0].len, p.avail_event) == (1, 5, 0x1000, 2)
    assert used.build(p) == raw and len(raw) == vq.used_ring_size(1)
    assert vq.USED_ELEM_DTYPE.itemsize == 8


def test_packed_desc_golden():
    raw = bytes.fromhex("0010000000000000" "00020000" "0700" "8080")
    p = vq.VirtqPackedDesc.parse(raw)
    assert (p.addr, p.len, p.id, p.flags) == (0x1000, 0x200, 7, 0x8080)
    assert p.flags & vq.VIRTQ_PACKED_DESC_F_AVAIL and p.flags & vq.VIRTQ_PACKED_DESC_F_USED
    assert vq.VirtqPackedDesc.build(p) == raw


@pytest.mark.parametrize("event,new,old,want", [(11, 13, 10, True), (13, 13, 10, False),
                                                (9, 13, 10, False), (0xFFFF, 1, 0xFFFE, True)])
def test_need_event(event, new, old, want):
    assert vq.vring_need_event(event, new, old) is want


def test_legacy_size_rounds_up():
    assert vq.legacy_vring_size(256) == 4096 * 2 + 4096  # 16*256+518 -> 8192; 6+2048 -> 4096


def test_balloon_config_golden():
    raw = bytes.fromhex("00010000" "80000000" "01000080" "aaaaaaaa")
    c = b.VirtioBalloonConfig.parse(raw)
    assert (c.num_pages, c.actual, c.free_page_hint_cmd_id, c.poison_val) == \
        (256, 128, 0x80000001, 0xAAAAAAAA)
    assert b.VirtioBalloonConfig.build(c) == raw
    assert b.FreePageHintCmd.build(dict(cmd_id=0)) == b"\0\0\0\0"


def test_stat_entry_is_10_bytes():
    raw = bytes.fromhex("0400" "0010000000000000")
    s = b.VirtioBalloonStat.parse(raw)
    assert (s.tag, s.val) == (b.StatTag.MEMFREE, 0x1000)
    assert b.VirtioBalloonStat.build(s) == raw and b.STAT_ENTRY_SIZE == 10


def test_constants():
    assert (b.VIRTIO_BALLOON_CMD_ID_STOP, b.VIRTIO_BALLOON_CMD_ID_DONE) == (0, 1)
    assert b.QEMU_FIRST_CMD_ID == 0x80000001 and b.HINT_BLOCK_BYTES == 4 << 20
    assert b.VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL == 6
    assert int(DeviceStatus.DEVICE_NEEDS_RESET) == 64 and int(DeviceStatus.FAILED) == 128
    assert feature_mask(VIRTIO_F_VERSION_1, 3) == (1 << 32) | 8
    assert feature_names(feature_mask(3, 32), b.BALLOON_FEATURE_NAMES) == ["FREE_PAGE_HINT", "VERSION_1"]


@pytest.mark.parametrize("features,size", [(0, 8), (1 << 3, 12), (1 << 4, 16), ((1 << 3) | (1 << 4), 16)])
def test_config_size_by_offered_features(features, size):
    assert b.config_size(features) == size


def test_queue_layout_compacted_and_fixed():
    f = (1 << b.VIRTIO_BALLOON_F_FREE_PAGE_HINT) | (1 << b.VIRTIO_BALLOON_F_REPORTING)
    assert b.queue_layout(f) == {b.BalloonQueue.INFLATE: 0, b.BalloonQueue.DEFLATE: 1,
                                 b.BalloonQueue.FREE_PAGE: 2, b.BalloonQueue.REPORTING: 3}
    assert b.queue_layout(f, fixed=True)[b.BalloonQueue.REPORTING] == 4
