"""protocol.vfio_user layouts: golden bytes, build/decode round trips, and decode never lets
anything but the peer's error (VfioUserError) out."""
from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from protocol.errors import PeerFault

pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="golden vectors are for little-endian hosts")


def test_header_golden() -> None:
    raw = vu.encode_header(0x1234, vu.Command.REGION_READ, 0x20, vu.VFIO_USER_F_NO_REPLY, 22)
    assert raw == bytes.fromhex("3412" "0900" "20000000" "10000000" "16000000")
    h = vu.decode_header(raw)
    assert (h.msg_id, h.command, h.size, h.no_reply, h.is_reply, h.payload_size) == \
        (0x1234, 9, 0x20, True, False, 0x10)


def test_error_reply_golden() -> None:
    h = vu.Header(7, vu.Command.DMA_MAP, 48, 0)
    assert vu.encode_error(h, 17) == bytes.fromhex("0700" "0200" "10000000" "21000000" "11000000")


def test_payload_golden() -> None:
    assert vu.build_dma_map(3, 0x1000, 0x100000, 0x200000) == bytes.fromhex(
        "20000000" "03000000" "0010000000000000" "0000100000000000" "0000200000000000")
    assert vu.build_region_info(32, 3, 4, 0x4000) == bytes.fromhex(
        "20000000" "03000000" "04000000" "00000000" "0040000000000000" "0000000000000000")
    assert vu.build_irq_set(0x24, 2, 0, 2) == bytes.fromhex(
        "14000000" "24000000" "02000000" "00000000" "02000000")
    assert vu.build_region_access(0x3000, 4, 2, b"\3\0") == bytes.fromhex(
        "0030000000000000" "04000000" "02000000" "0300")
    assert vu.build_version(0, 0, {}) == bytes.fromhex("0000" "0000") + b'{"capabilities":{}}\0'


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1))
def test_struct_twins_pack_like_the_layouts(i: int, c: int, size: int, flags: int, err: int,
                                            off: int) -> None:
    assert vu.HEADER_STRUCT.pack(i, c, size, flags, err) == vu.VfioUserHeader.build(
        dict(msg_id=i, command=c, size=size, flags=flags, error=err))
    assert vu.REGION_ACCESS_STRUCT.pack(off, flags, size) == vu.RegionAccessHeader.build(
        dict(offset=off, region=flags, count=size))


def test_layout_sizes() -> None:
    assert (vu.DMA_MAP_SIZE, vu.DMA_UNMAP_SIZE, vu.DEVICE_INFO_SIZE, vu.REGION_INFO_SIZE,
            vu.IRQ_INFO_SIZE, vu.IRQ_SET_SIZE, vu.REGION_ACCESS_SIZE) == (32, 24, 16, 32, 16, 20,
                                                                          16)
    assert vp.VirtioPciCap.sizeof() == 16 and vp.MsixCap.sizeof() == 12
    assert sum(size for _, size, _ in vp.COMMON_FIELDS) == vp.COMMON_CFG_SIZE


u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


@given(u32, u64, u64, u64)
def test_dma_map_round_trip(flags: int, offset: int, addr: int, size: int) -> None:
    payload = vu.build_dma_map(flags, offset, addr, size)
    h = vu.Header(1, vu.Command.DMA_MAP, 16 + len(payload), 0)
    assert vu.decode_request(h, payload) == vu.DmaMap(32, flags, offset, addr, size)


@given(u64, st.integers(0, 8), st.binary(max_size=64))
def test_region_write_round_trip(offset: int, region: int, data: bytes) -> None:
    payload = vu.build_region_access(offset, region, len(data), data)
    h = vu.Header(1, vu.Command.REGION_WRITE, 16 + len(payload), 0)
    assert vu.decode_request(h, payload) == vu.RegionWrite(offset, region, len(data), data)


@settings(max_examples=400)
@given(st.integers(0, 0xFFFF), st.integers(0, 0x3F), st.binary(max_size=80))
def test_decode_raises_only_the_peers_error(cmd: int, flags: int, payload: bytes) -> None:
    h = vu.Header(1, cmd, 16 + len(payload), flags)
    try:
        vu.decode_request(h, payload)
    except PeerFault as e:
        assert e.errno > 0
