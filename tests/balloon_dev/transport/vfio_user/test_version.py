"""VFIO_USER_VERSION (protocol.md 7.3)."""
from __future__ import annotations

import errno
import json
import struct

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client

V = vu.Command.VERSION


def test_answers_0_0_with_our_capabilities(fresh: Client) -> None:
    caps = fresh.version({"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
                          "max_dma_maps": 65535, "write_multiple": True,
                          "migration": {"pgsize": 4096}})
    c = caps["capabilities"]
    # QEMU checks: max_msg_fds <= 16, max_dma_maps <= 65535, pgsizes a multiple of 4096.
    assert 1 <= c["max_msg_fds"] <= 16
    assert c["max_dma_maps"] <= 65535
    assert c["pgsizes"] % 4096 == 0
    assert c["max_data_xfer_size"] == 1 << 20
    # We never offer write_multiple or migration: QEMU then sends neither.
    assert "write_multiple" not in c and "migration" not in c
    assert fresh.session.client_caps["max_msg_fds"] == 16


def test_reply_fits_in_qemus_request_buffer(fresh: Client) -> None:
    # QEMU reads the reply into its request's buffer: the reply must not be longer.
    qemu_caps = {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16,
                 "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535,
                 "write_multiple": True}
    req = vu.build_version(0, 0, qemu_caps)
    h, p, _ = fresh.request(V, req)
    assert h.size <= vu.HEADER_SIZE + len(req)
    assert p[-1:] == b"\0" and json.loads(p[4:-1])


def test_higher_minor_is_answered_with_ours(fresh: Client) -> None:
    p = fresh.ok(V, vu.build_version(0, 7, {}))
    assert struct.unpack_from("=HH", p) == (0, 0)


def test_version_without_json_is_accepted(fresh: Client) -> None:
    p = fresh.ok(V, struct.pack("=HH", 0, 0))
    assert struct.unpack_from("=HH", p) == (0, 0)


def test_other_major_is_refused(fresh: Client) -> None:
    assert fresh.error(V, vu.build_version(1, 0, {})) == errno.ENOTSUP
    assert not fresh.session.version_done


def test_malformed_json_is_einval(fresh: Client) -> None:
    assert fresh.error(V, struct.pack("=HH", 0, 0) + b"{not json\0") == errno.EINVAL
    assert fresh.error(V, struct.pack("=HH", 0, 0) + b'{"capabilities":{}}') == errno.EINVAL
    assert fresh.error(V, struct.pack("=HH", 0, 0) + b"[1,2]\0") == errno.EINVAL
    assert fresh.error(V, struct.pack("=HH", 0, 0) + b'{"capabilities":3}\0') == errno.EINVAL
    assert fresh.error(V, b"\0\0") == errno.EINVAL  # shorter than major+minor
    # The session survives and still negotiates.
    fresh.version()


def test_commands_before_version_are_refused(fresh: Client) -> None:
    info = vu.build_device_info(vu.DEVICE_INFO_SIZE, 0, 0, 0)
    assert fresh.error(vu.Command.DEVICE_GET_INFO, info) == errno.EINVAL
    fresh.version()
    fresh.ok(vu.Command.DEVICE_GET_INFO, info)
