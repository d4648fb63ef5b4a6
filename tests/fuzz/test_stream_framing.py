"""vfio-user and vhost-user messages byte by byte (issue 15 item 9): the real servers, over a unix
socket, answer a message sent one byte per write exactly as they answer it sent whole.

A server reads a stream: a message may arrive in any number of pieces (QEMU writes header and
payload separately; a busy socket splits anything). Hypothesis draws a sequence of well-framed
messages (any command or request, random or valid payloads); one connection sends each whole,
the next one byte at a time with a short pause between bytes, so the server's reader sees every
partial header and payload. Each connection starts on a reset device (the server resets it when
a peer leaves), so the two reply streams must be byte for byte the same, and the server, still
serving, answers a third connection.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from balloon_dev.device import BalloonDevice
from balloon_dev.transport.vfio_user_server import VfioUserServer
from balloon_dev.transport.vhost_user_server import VhostUserServer
from balloon_dev.transport.virtio_pci import VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vfu
from protocol import vhost_user as vhu
from tests.serverthread import trio_server_in_thread

PAUSE_S = 0.0002  # between two bytes: long enough for the server to read a partial message


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _send(s: socket.socket, data: bytes, byte_by_byte: bool) -> None:
    if not byte_by_byte:
        s.sendall(data)
        return
    for i in range(len(data)):
        s.sendall(data[i:i + 1])
        time.sleep(PAUSE_S)


def _exchange(path: str, msgs: list[bytes], reply_len: Callable[[socket.socket, bytes], bytes],
              byte_by_byte: bool) -> list[bytes]:
    """Send each message and read its reply (``reply_len`` reads it, b"" if none is due)."""
    deadline = time.monotonic() + 10
    while True:
        # The server serves one peer at a time and refuses (closes) one that comes while it
        # still cleans up after the last: nothing was served then, so try again.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        replies: list[bytes] = []
        try:
            s.connect(path)
            for i, m in enumerate(msgs):
                try:
                    _send(s, m, byte_by_byte)
                    replies.append(reply_len(s, m))
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    if i:
                        raise
                    raise ConnectionRefusedError from None
            return replies
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "server did not take a new peer"
            time.sleep(0.05)
        finally:
            s.close()


@contextmanager
def _server(make: Callable[[str], Any]) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="bh-frame-")
    path = os.path.join(d, "dev.sock")
    with trio_server_in_thread(make(path).run):
        yield path
    os.rmdir(d)


def _same_both_ways(make: Callable[[str], Any], msgs: list[bytes],
                    reply: Callable[[socket.socket, bytes], bytes], probe: bytes) -> None:
    with _server(make) as path:
        whole = _exchange(path, msgs, reply, byte_by_byte=False)
        pieces = _exchange(path, msgs, reply, byte_by_byte=True)
        assert pieces == whole
        assert _exchange(path, [probe], reply, False)[0]  # and the server still serves


# -- vfio-user --------------------------------------------------------------------------------
def _vfio_reply(s: socket.socket, msg: bytes) -> bytes:
    h = vfu.decode_header(msg[:vfu.HEADER_SIZE])
    if h.no_reply or h.is_reply:
        return b""
    head = _recv_exact(s, vfu.HEADER_SIZE)
    rh = vfu.decode_header(head)
    return head + _recv_exact(s, rh.size - vfu.HEADER_SIZE)


def _vfio_server(path: str) -> VfioUserServer:
    mem = GuestMemory()
    return VfioUserServer(path, VirtioPciFunction(BalloonDevice(mem)), mem,
                          on_effects=lambda _e: None, busy_wait=0.5)


vfio_payloads = st.one_of(
    st.binary(max_size=48),
    st.builds(vfu.build_region_access, st.integers(0, 0x4100), st.integers(0, 9),
              st.sampled_from([1, 2, 4, 8])),
    st.builds(vfu.build_region_access, st.integers(0, 0x40), st.just(
        vfu.VFIO_PCI_CONFIG_REGION_INDEX), st.just(4), st.binary(min_size=4, max_size=4)),
    st.builds(vfu.build_region_info, st.just(32), st.just(0), st.integers(0, 10),
              st.just(0)),
    st.builds(vfu.build_irq_info, st.just(16), st.just(0), st.integers(0, 5), st.just(0)),
    st.builds(vfu.build_device_info, st.just(16), st.just(0), st.just(0), st.just(0)),
)
vfio_msgs = st.lists(st.tuples(st.sampled_from([int(c) for c in vfu.Command if c != 2] + [0, 99]),
                               vfio_payloads,
                               st.sampled_from([0, 0, 0, vfu.VFIO_USER_F_NO_REPLY])),
                     min_size=1, max_size=8)
VFIO_START = vfu.encode_request(0, vfu.Command.VERSION, vfu.build_version(0, 0, {}))


# Each example opens three connections and sends slowly: no shrinking (a failure prints its
# example as drawn), so a failing run stays within the suite's time budget.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(vfio_msgs)
def test_vfio_user_byte_by_byte(seq: list[tuple[int, bytes, int]]) -> None:
    # DMA_MAP (2) is left out: it needs an fd, which rides on the first byte of a message.
    msgs = [VFIO_START] + [vfu.encode_request(i + 1, cmd, payload, flags=flags)
                           for i, (cmd, payload, flags) in enumerate(seq)]
    probe = vfu.encode_request(7, vfu.Command.DEVICE_GET_INFO,
                               vfu.build_device_info(16, 0, 0, 0))
    _same_both_ways(_vfio_server, msgs, _vfio_reply, probe)


# -- vhost-user -------------------------------------------------------------------------------
R = vhu.VhostUserRequest


def _vhost_reply(s: socket.socket, msg: bytes) -> bytes:
    # Every exchange starts with SET_PROTOCOL_FEATURES(REPLY_ACK): NEED_REPLY is answered.
    req, flags, _size = struct.unpack_from("<III", msg)
    if req not in vhu.REPLY_REQUESTS and not flags & vhu.VHOST_USER_NEED_REPLY_MASK:
        return b""
    head = _recv_exact(s, vhu.HEADER_SIZE)
    size = struct.unpack_from("<I", head, 8)[0]
    return head + _recv_exact(s, size)


def _vhost_server(path: str) -> VhostUserServer:
    mem = GuestMemory()
    return VhostUserServer(BalloonDevice(mem), mem, path, on_effects=lambda _e: None)


# Requests that need no fd (fds ride on the first byte). SET_PROTOCOL_FEATURES is sent once,
# first: it decides whether NEED_REPLY is answered.
_NO_FD = [R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
          R.GET_CONFIG, R.SET_CONFIG, R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE,
          R.SET_VRING_ENABLE, R.GET_MAX_MEM_SLOTS, R.RESET_OWNER]
vhost_payloads = st.one_of(
    st.binary(max_size=40),
    st.integers(0, 2**64 - 1).map(vhu.build_u64),
    st.tuples(st.integers(0, 6), st.integers(0, 300)).map(lambda t: vhu.build_vring_state(*t)),
    st.tuples(st.integers(0, 40), st.binary(max_size=16)).map(
        lambda t: vhu.build_config(t[0], t[1])),
)
vhost_msgs = st.lists(st.tuples(st.sampled_from([int(r) for r in _NO_FD]), vhost_payloads,
                                st.booleans()), min_size=1, max_size=8)


# Each example opens three connections and sends slowly: no shrinking (a failure prints its
# example as drawn), so a failing run stays within the suite's time budget.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(vhost_msgs)
def test_vhost_user_byte_by_byte(seq: list[tuple[int, bytes, bool]]) -> None:
    start = vhu.build_request(R.SET_PROTOCOL_FEATURES,
                              vhu.build_u64(1 << vhu.VhostUserProtocolFeature.REPLY_ACK))
    msgs = [start] + [vhu.build_header(req, vhu.VHOST_USER_VERSION
                                       | (vhu.VHOST_USER_NEED_REPLY_MASK if need else 0),
                                       len(p)) + p for req, p, need in seq]
    _same_both_ways(_vhost_server, msgs, _vhost_reply, vhu.build_request(R.GET_FEATURES))
