"""vmsim.vhost_user_client against our vhost-user server (a subprocess) and a broken peer: the
front-end's transport emulation, the start at DRIVER_OK, config changes as interrupts."""
from __future__ import annotations

import os
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest

from guest_model.transport import VirtioTransport
from protocol import vhost_user as vu
from protocol.balloon import CFG_NUM_PAGES
from protocol.errors import UsageError
from protocol.virtio import DeviceStatus
from vmsim.client_base import DeviceFault
from vmsim.cmd_ctl import call as ctl_call
from vmsim.conformance.harness import Target, connect, start_server, stop_server, wait_for
from vmsim.vhost_user_client import VhostUserClient

ACK, DRV, FOK, DOK = (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER, DeviceStatus.FEATURES_OK,
                      DeviceStatus.DRIVER_OK)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="bh-vclient-") as tmp:
        sock, ctl = os.path.join(tmp, "dev.sock"), os.path.join(tmp, "dev.ctl")
        proc = start_server([sys.executable, "-m", "vmsim", "serve", "--vhost-user", sock,
                             "--control", ctl], sock, ctl)
        try:
            yield sock, ctl
        finally:
            stop_server(proc)


@pytest.fixture
def client(server) -> Iterator[VhostUserClient]:
    # The socket file exists from bind() on; until listen() a connect is refused: retry.
    c = connect(Target("vhost-user", server[0]))
    yield c
    c.close()


def test_connect_negotiates_and_emulates_the_transport(client: VhostUserClient):
    assert isinstance(client, VirtioTransport)
    assert client.offered >> 32 & 1 and not client.offered >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert client.protocol_features >> vu.VhostUserProtocolFeature.CONFIG & 1
    assert client.channel is not None
    assert isinstance(client, VhostUserClient)
    assert client.num_queues() == 4 and client.queue_max_size(3) == 128
    assert client.queue_max_size(4) == 0
    client.reset()
    assert client.get_status() == 0


def test_start_at_driver_ok_and_config_change_interrupt(client: VhostUserClient, server):
    c = client
    c.reset()
    c.set_status(ACK)
    c.set_status(ACK | DRV)
    c.set_driver_features(c.get_device_features())
    c.set_status(ACK | DRV | FOK)
    assert c.get_status() & FOK
    base = 0x100000
    for q in range(c.num_queues()):
        c.setup_queue(q, 128, base, base + 0x800, base + 0x1000)
        c.enable_queue(q)
        base += 0x2000
    c.notify(0)  # before DRIVER_OK: remembered, nothing sent
    assert not c.running and not c.kick_fds
    seen: list[object] = []
    c.set_interrupt_handlers(seen.append, lambda: seen.append("config"))
    c.set_status(ACK | DRV | FOK | DOK)
    assert c.running and sorted(c.kick_fds) == [0, 1, 2, 3]
    gen = c.config_generation()
    assert ctl_call(server[1], "set-target", {"pages": 5}) == {"return": {}}
    assert wait_for(lambda: c.poll_interrupts() > 0 and "config" in seen)
    assert c.config_generation() == (gen + 1) & 0xFF
    assert struct.unpack("<I", c.read_config(CFG_NUM_PAGES, 4))[0] == 5
    ctl_call(server[1], "set-target", {"pages": 0})
    c.reset()
    assert not c.running and not c.kick_fds


def test_bad_arguments_and_missing_socket(tmp_path):
    with pytest.raises(UsageError, match="vq_size"):
        VhostUserClient("x", vq_size=100)
    with pytest.raises(UsageError, match="ram_bytes"):
        VhostUserClient("x", ram_bytes=-4096)
    with pytest.raises(DeviceFault, match="cannot connect"):
        VhostUserClient(str(tmp_path / "none")).connect()


def test_peer_closing_is_a_clear_error(tmp_path):
    path = str(tmp_path / "peer")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(vu.HEADER_SIZE)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    c = VhostUserClient(path, timeout=2.0)
    with pytest.raises(DeviceFault, match="closed the connection"):
        c.connect()
    t.join(2)
    assert c.sock is None and c.mem.regions == ()
