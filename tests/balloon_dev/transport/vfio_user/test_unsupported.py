"""Commands a device server does not serve, unknown commands, replies, NO_REPLY."""
from __future__ import annotations

import errno

import pytest

from protocol import vfio_user as vu
from protocol.errors import FramingLost
from tests.balloon_dev.transport.vfio_user.client import Client
from tests.fdutil import eventfd, fd_is_open


@pytest.mark.parametrize("cmd", [
    vu.Command.DMA_READ, vu.Command.DMA_WRITE, vu.Command.DIRTY_PAGES,
    vu.Command.REGION_WRITE_MULTI, vu.Command.DEVICE_FEATURE, vu.Command.MIG_DATA_READ,
    vu.Command.MIG_DATA_WRITE, 0, 77, 0xFFFF,
])
def test_unsupported_commands_are_enosys(client: Client, cmd: int) -> None:
    fd = eventfd()
    assert client.error(cmd, b"\0" * 16, [fd]) == errno.ENOSYS
    assert not fd_is_open(fd)


def test_region_io_fds_is_not_supported(client: Client) -> None:
    err = client.error(vu.Command.DEVICE_GET_REGION_IO_FDS, vu.build_region_info(32, 0, 4, 0))
    assert err == errno.ENOTSUP


def test_a_reply_from_the_client_is_not_answered(client: Client) -> None:
    data = vu.encode_header(9, vu.Command.DEVICE_GET_INFO, 16, vu.VFIO_USER_F_TYPE_REPLY)
    h, _, _ = client.raw(data)
    assert h is None
    assert client.session.counters["peer_errors"] == 1


def test_unknown_message_type_is_einval(client: Client) -> None:
    data = vu.encode_header(9, vu.Command.DEVICE_GET_INFO, 32, 0x7) + b"\0" * 16
    h, _, _ = client.raw(data)
    assert h.flags & vu.VFIO_USER_F_ERROR and h.error == errno.EINVAL


def test_no_reply_command_is_served_silently(client: Client) -> None:
    h, _, _ = client.request(vu.Command.DEVICE_GET_INFO,
                             vu.build_device_info(16, 0, 0, 0), flags=vu.VFIO_USER_F_NO_REPLY)
    assert h is None
    assert client.session.counters["messages"] == 2  # VERSION + this one


def test_framing_errors_are_raised_by_header_decode() -> None:
    with pytest.raises(FramingLost):
        vu.decode_header(vu.encode_header(1, 1, 8, 0))
    with pytest.raises(FramingLost):
        vu.decode_header(vu.encode_header(1, 1, vu.MAX_MESSAGE_SIZE + 1, 0))
    with pytest.raises(FramingLost):
        vu.decode_header(b"\0" * 15)
    assert vu.decode_header(vu.encode_header(1, 1, 16, 0)).payload_size == 0


def test_an_internal_error_is_answered_with_eio_and_survived(client: Client) -> None:
    def broken(*a: object) -> None:
        raise RuntimeError("bug")

    client.pci.bar_read = broken  # type: ignore[method-assign]
    fd = eventfd()
    err = client.error(vu.Command.REGION_READ, vu.build_region_access(0, 4, 4))
    assert err == errno.EIO
    h, _, _ = client.request(vu.Command.REGION_WRITE, vu.build_region_access(0, 4, 1, b"\0"),
                             [fd])
    assert h.flags & vu.VFIO_USER_F_ERROR and not fd_is_open(fd)
    assert client.session.counters["internal_errors"] >= 1
    client.ok(vu.Command.DEVICE_GET_INFO, vu.build_device_info(16, 0, 0, 0))
