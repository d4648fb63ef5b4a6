"""protocol/vhost_user.py: golden bytes, round trips, "parse or raise our error" on any input."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import vhost_user as vu
from protocol.errors import FramingLost, PeerFault

R = vu.VhostUserRequest


def test_header_golden_bytes() -> None:
    # vhost-user headers are host-endian (protocol.md 8.1).
    assert vu.build_request(R.GET_FEATURES) == struct.pack("=III", 1, 1, 0)
    assert vu.build_request(R.SET_VRING_ENABLE, b"x" * 8, need_reply=True) == (
        struct.pack("=III", 18, 0x9, 8) + b"x" * 8)
    # Replies carry exactly VERSION|REPLY: QEMU rejects any other flags value.
    assert vu.build_reply(R.GET_FEATURES, vu.build_u64(5))[:12] == struct.pack("=III", 1, 5, 8)


def test_payload_layout_sizes() -> None:
    assert vu.VRING_STATE_SIZE == 8
    assert vu.VRING_ADDR_SIZE == 40
    assert vu.MEMORY_REGION_SIZE == 32
    assert vu.VhostUserMemRegMsg.sizeof() == 40


def test_vring_addr_golden_and_round_trip() -> None:
    a = vu.VringAddr(3, 0, 0x1000, 0x2000, 0x3000, 0)
    raw = vu.build_vring_addr(a)
    # Field order is index, flags, desc, used, avail, log (struct vhost_vring_addr).
    assert raw == struct.pack("=IIQQQQ", 3, 0, 0x1000, 0x2000, 0x3000, 0)
    assert vu.decode_payload(R.SET_VRING_ADDR, raw) == a


def test_memory_table_round_trip_and_size_rules() -> None:
    regs = (vu.MemoryRegion(0, 0x80000000, 0x7F0000000000, 0),
            vu.MemoryRegion(0x100000000, 0x40000000, 0x7F0080000000, 0x80000000))
    raw = vu.build_memory_table(regs)
    assert len(raw) == 8 + 2 * 32
    assert raw[:8] == struct.pack("=II", 2, 0)
    assert vu.decode_payload(R.SET_MEM_TABLE, raw) == vu.MemoryTable(regs)
    # The whole 8-entry array (as some front-ends send it) is accepted too.
    padded = raw + bytes(6 * 32)
    assert vu.decode_payload(R.SET_MEM_TABLE, padded) == vu.MemoryTable(regs)
    with pytest.raises(PeerFault, match="2 regions"):
        vu.decode_payload(R.SET_MEM_TABLE, raw[:-1])
    with pytest.raises(PeerFault, match="at most 8"):
        vu.decode_payload(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(9 * 32))


def test_mem_reg_payload() -> None:
    r = vu.MemoryRegion(0x100000000, 0x40000000, 0x7F0080000000, 0x80000000)
    raw = vu.build_mem_reg(r)
    assert raw == struct.pack("=QQQQQ", 0, 0x100000000, 0x40000000, 0x7F0080000000, 0x80000000)
    assert vu.decode_payload(R.ADD_MEM_REG, raw) == r
    assert vu.decode_payload(R.REM_MEM_REG, raw) == r
    with pytest.raises(PeerFault, match="expected 40"):
        vu.decode_payload(R.ADD_MEM_REG, raw[:32])


def test_config_payload() -> None:
    raw = vu.build_config(4, b"\x01\x02\x03\x04")
    assert raw == struct.pack("=III", 4, 4, 0) + b"\x01\x02\x03\x04"
    assert vu.decode_payload(R.GET_CONFIG, raw) == vu.ConfigAccess(4, 4, 0, b"\x01\x02\x03\x04")
    with pytest.raises(PeerFault, match="exceeds 256"):
        vu.decode_payload(R.SET_CONFIG, struct.pack("=III", 0, 257, 0) + bytes(257))
    with pytest.raises(PeerFault, match="expected 16"):
        vu.decode_payload(R.SET_CONFIG, struct.pack("=III", 0, 4, 0) + bytes(3))


def test_vring_file_index_and_nofd() -> None:
    assert vu.decode_payload(R.SET_VRING_KICK, vu.build_vring_file(2)) == vu.VringFile(2, False)
    assert vu.decode_payload(R.SET_VRING_CALL, vu.build_vring_file(1, nofd=True)) == vu.VringFile(
        1, True)
    with pytest.raises(PeerFault, match="reserved bits"):
        vu.decode_payload(R.SET_VRING_KICK, vu.build_u64(1 << 9))


def test_parse_header_framing_errors() -> None:
    assert vu.parse_header(struct.pack("=III", 1, 1, 0)) == vu.Header(1, 1, 0)
    with pytest.raises(FramingLost, match="version 2"):
        vu.parse_header(struct.pack("=III", 1, 2, 0))
    with pytest.raises(FramingLost, match="exceeds"):
        vu.parse_header(struct.pack("=III", 5, 1, vu.VHOST_USER_MAX_PAYLOAD + 1))
    with pytest.raises(FramingLost, match="11 bytes"):
        vu.parse_header(b"\0" * 11)


@given(st.integers(0, 60), st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_decode_any_payload_parses_or_raises_payload_error(request: int, payload: bytes) -> None:
    # h11's fuzz rule: parse, or raise the peer's error, never anything else.
    try:
        vu.decode_payload(request, payload)
    except PeerFault:
        pass


@given(st.binary(min_size=12, max_size=12))
def test_parse_any_header_parses_or_raises_framing_error(data: bytes) -> None:
    try:
        h = vu.parse_header(data)
    except FramingLost:
        return
    assert h.size <= vu.VHOST_USER_MAX_PAYLOAD
