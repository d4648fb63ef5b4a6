"""vmsim.vfio_user_client against our vfio-user server (a subprocess) and against broken peers:
set-up, capability walk, register access, interrupts, and the errors a bad peer earns."""
from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest

from guest_model.transport import VirtioTransport
from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from protocol.errors import UsageError
from protocol.virtio import DeviceStatus
from vmsim.client_base import DeviceFault
from vmsim.conformance.harness import start_server, stop_server
from vmsim.vfio_user_client import VfioUserClient


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bh-client-") as tmp:
        sock, ctl = os.path.join(tmp, "dev.sock"), os.path.join(tmp, "dev.ctl")
        proc = start_server([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock,
                             "--control", ctl], sock, ctl)
        try:
            yield sock
        finally:
            stop_server(proc)


@pytest.fixture
def client(server: str) -> Iterator[VfioUserClient]:
    c = VfioUserClient(server, ram_bytes=8 << 20)
    for _ in range(100):  # the server may still be dropping the previous test's client
        try:
            c.connect()
            break
        except DeviceFault:
            c = VfioUserClient(server, ram_bytes=8 << 20)
    yield c
    c.close()


def test_setup_finds_the_virtio_pci_layout(client: VfioUserClient):
    assert isinstance(client, VirtioTransport)
    lay = client.pci
    assert (lay.vendor_id, lay.device_id) == (0x1AF4, 0x1045)
    for t in (vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
              vp.VIRTIO_PCI_CAP_ISR_CFG, vp.VIRTIO_PCI_CAP_DEVICE_CFG):
        assert t in lay.caps
    assert lay.notify_off_multiplier == vp.NOTIFY_OFF_MULTIPLIER
    assert lay.msix_table_size == 2 and len(client.eventfds) == 2
    assert client.region_sizes[vu.VFIO_PCI_CONFIG_REGION_INDEX] == 256
    # Guest RAM is shared: the client's GuestMemory is the memfd the device mapped.
    assert client.mem.contains(0, 8 << 20) and not client.mem.contains(8 << 20, 1)


def test_registers_round_trip(client: VfioUserClient):
    client.reset()
    assert client.get_status() == 0
    client.set_status(DeviceStatus.ACKNOWLEDGE)
    assert client.get_status() == DeviceStatus.ACKNOWLEDGE
    feats = client.get_device_features()
    assert feats >> 32 & 1  # VERSION_1
    assert client.num_queues() == 4 and client.queue_max_size(3) == 1024
    assert client.queue_max_size(9) == 0
    assert len(client.read_config(0, 16)) == 16
    client.reset()


def test_error_reply_carries_errno(client: VfioUserClient):
    with pytest.raises(DeviceFault) as e:
        client.region_read(vu.VFIO_PCI_VGA_REGION_INDEX, 0, 4)
    assert e.value.errno == errno.EINVAL
    # The connection survives a refused request.
    assert client.get_status() in range(256)


def test_interrupts_are_delivered_only_when_polled(client: VfioUserClient):
    seen: list[object] = []
    client.set_interrupt_handlers(lambda q: seen.append(q), lambda: seen.append("config"))
    client.queue_vectors = {0: 1, 1: 1, 2: 1}
    client.signal_test(0)
    client.signal_test(1)
    assert seen == []  # never from inside another call
    assert client.wait_interrupt(1.0)
    assert client.poll_interrupts() == 2
    assert seen == ["config", 0, 1, 2]
    assert client.irq_counts == [1, 1]
    assert client.poll_interrupts() == 0 and not client.wait_interrupt(0.0)


def test_bad_arguments_and_missing_socket(tmp_path):
    with pytest.raises(UsageError, match="ram_bytes"):
        VfioUserClient("x", ram_bytes=1000)
    with pytest.raises(ValueError, match="ram_bytes"):  # for callers that catch ValueError
        VfioUserClient("x", ram_bytes=0)
    with pytest.raises(DeviceFault, match="cannot connect"):
        VfioUserClient(str(tmp_path / "none")).connect()


def fake_peer(path: str, answer) -> threading.Thread:
    """A one-shot peer: read one message, send ``answer(header)`` (bytes) or close."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            raw = conn.recv(vu.HEADER_SIZE)
            h = vu.decode_header(raw)
            conn.recv(h.payload_size)
            data = answer(h)
            if data:
                conn.sendall(data)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("answer,match", [
    (lambda h: b"", "closed the connection"),
    (lambda h: vu.encode_header(h.msg_id + 1, h.command, vu.HEADER_SIZE,
                                vu.VFIO_USER_F_TYPE_REPLY), "does not match"),
    (lambda h: vu.encode_header(h.msg_id, h.command, 3, vu.VFIO_USER_F_TYPE_REPLY),
     "header unusable"),
    (lambda h: vu.encode_header(h.msg_id, h.command, vu.HEADER_SIZE, vu.VFIO_USER_F_TYPE_REPLY
                                | vu.VFIO_USER_F_ERROR, errno.ENOTSUP), "EOPNOTSUPP|ENOTSUP"),
    (lambda h: vu.encode_reply(h, struct.pack("<HH", 1, 0)), "device speaks 1.0"),
])
def test_bad_peer_is_a_clear_error(tmp_path, answer, match):
    path = str(tmp_path / "peer")
    t = fake_peer(path, answer)
    c = VfioUserClient(path, timeout=2.0)
    with pytest.raises(DeviceFault, match=match):
        c.connect()
    t.join(2)
    assert c.sock is None and c.mem.regions == ()  # connect cleaned up after itself
