"""vmsim.vhost_user_client's back-end channel against a peer that misbehaves on it: config
changes still count, a reset channel is a closed channel, not an exception out of
``poll_interrupts``."""
from __future__ import annotations

import socket

from protocol import vhost_user as vu
from vmsim.vhost_user_client import VhostUserClient

CHANGE = vu.build_request(vu.VhostUserBackendRequest.CONFIG_CHANGE_MSG, b"", need_reply=True)


def test_back_end_resetting_its_channel_is_a_closed_channel() -> None:
    c = VhostUserClient("unused")  # never connected: only the channel is exercised
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    c.channel = ours
    with theirs:
        theirs.sendall(CHANGE)
        assert c.poll_interrupts() == 1 and c.irq_counts == [1]
        theirs.sendall(CHANGE)  # then it closes with our first reply unread: a reset
    assert c.poll_interrupts() in (0, 1)
    assert c.channel is None
    assert c.poll_interrupts() == 0  # and stays quiet
    c.close()
