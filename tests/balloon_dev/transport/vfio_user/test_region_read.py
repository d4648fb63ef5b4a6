"""VFIO_USER_REGION_READ (protocol.md 7.4, 7.6): config space and BARs."""
from __future__ import annotations

import errno
import struct

from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.balloon_dev.transport.vfio_user.client import BAR4, CFG, Client

C = vu.Command.REGION_READ


def caps(client: Client) -> dict[int, bytes]:
    """Walk the capability list the way a PCI driver does: {offset: raw bytes}."""
    cfg = client.read(CFG, 0, 256)
    assert struct.unpack_from("<H", cfg, vp.PCI_STATUS)[0] & vp.PCI_STATUS_CAP_LIST
    out, pos, seen = {}, cfg[vp.PCI_CAPABILITY_LIST], 0
    while pos:
        assert pos >= 0x40 and pos % 4 == 0 and seen < 48
        length = 12 if cfg[pos] == vp.PCI_CAP_ID_MSIX else cfg[pos + 2]
        out[pos] = cfg[pos:pos + length]
        pos, seen = cfg[pos + 1], seen + 1
    return out


def test_header_identifies_a_modern_virtio_balloon(client: Client) -> None:
    cfg = client.read(CFG, 0, 64)
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (0x1AF4, 0x1045)
    assert cfg[vp.PCI_REVISION_ID] >= 1
    assert struct.unpack_from("<H", cfg, vp.PCI_CLASS_DEVICE)[0] == 0x00FF
    assert struct.unpack_from("<H", cfg, vp.PCI_SUBSYSTEM_ID)[0] >= 0x40
    assert cfg[vp.PCI_INTERRUPT_PIN] == 1
    # BAR4 is a 64-bit prefetchable memory BAR, BAR1 a 32-bit memory BAR.
    bar4 = struct.unpack_from("<I", cfg, 0x20)[0]
    assert bar4 & 0xF == vp.PCI_BASE_ADDRESS_MEM_TYPE_64 | vp.PCI_BASE_ADDRESS_MEM_PREFETCH
    assert struct.unpack_from("<I", cfg, 0x14)[0] & 0x1 == 0


def test_capability_list_has_every_virtio_structure(client: Client) -> None:
    found = caps(client)
    msix = [v for v in found.values() if v[0] == vp.PCI_CAP_ID_MSIX]
    assert len(msix) == 1
    _, _, ctrl, table, pba = struct.unpack("<BBHII", msix[0])
    assert ctrl & vp.PCI_MSIX_FLAGS_QSIZE == 1  # 2 vectors
    assert table == vp.MSIX_BAR and pba == vp.MSIX_PBA_OFFSET | vp.MSIX_BAR
    virtio = {v[3]: v for v in found.values() if v[0] == vp.PCI_CAP_ID_VNDR}
    want = {vp.VIRTIO_PCI_CAP_COMMON_CFG: (4, 0x0000, 0x40),
            vp.VIRTIO_PCI_CAP_NOTIFY_CFG: (4, 0x3000, 0x1000),
            vp.VIRTIO_PCI_CAP_ISR_CFG: (4, 0x1000, 0x1000),
            vp.VIRTIO_PCI_CAP_DEVICE_CFG: (4, 0x2000, 0x1000),
            vp.VIRTIO_PCI_CAP_PCI_CFG: (0, 0, 0)}
    assert set(virtio) == set(want)
    for t, (bar, off, length) in want.items():
        cap = vp.VirtioPciCap.parse(virtio[t])
        assert (cap.bar, cap.offset, cap.length) == (bar, off, length), t
    notify = virtio[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert len(notify) == 20 and struct.unpack_from("<I", notify, 16)[0] == 4


def test_common_config_reads(client: Client) -> None:
    assert client.rd(BAR4, vp.COMMON_NUMQ, 2) == client.dev.num_queues == 4
    client.wr(BAR4, vp.COMMON_DFSELECT, 1, 4)
    assert client.rd(BAR4, vp.COMMON_DF, 4) == client.dev.device_features >> 32
    client.wr(BAR4, vp.COMMON_Q_SELECT, 3, 2)
    assert client.rd(BAR4, vp.COMMON_Q_SIZE, 2) == 1024  # free_page_vq, QEMU's size
    assert client.rd(BAR4, vp.COMMON_Q_NOFF, 2) == 3
    assert client.rd(BAR4, vp.COMMON_Q_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
    client.wr(BAR4, vp.COMMON_Q_SELECT, 9, 2)
    assert client.rd(BAR4, vp.COMMON_Q_SIZE, 2) == 0  # absent queue reads size 0


def test_device_config_window(client: Client) -> None:
    client.session.host(lambda d: d.set_target(0x1234))
    assert client.rd(BAR4, vp.DEVICE_CFG_OFFSET, 4) == 0x1234
    # The window is config_size (16) bytes; past it reads zeros and is counted.
    assert client.read(BAR4, vp.DEVICE_CFG_OFFSET + 16, 4) == b"\0" * 4
    assert client.pci.counters["unmapped_bar_access"] == 1


def test_big_reads_are_split_into_register_accesses(client: Client) -> None:
    whole = client.read(BAR4, 0, 64)
    assert len(whole) == 64 and whole[0x12:0x14] == struct.pack("<H", 4)
    assert client.read(CFG, 0, 256)[:2] == b"\xf4\x1a"


def test_pba_reads_zero(client: Client) -> None:
    assert client.read(vp.MSIX_BAR, vp.MSIX_PBA_OFFSET, 8) == b"\0" * 8


def test_out_of_range_reads_are_einval(client: Client) -> None:
    for payload in (
        vu.build_region_access(250, CFG, 8),        # past config space
        vu.build_region_access(0, 0, 4),            # BAR0 has no size
        vu.build_region_access(0x4000, BAR4, 1),    # past BAR4
        vu.build_region_access(0, 9, 4),            # no such region
        vu.build_region_access(0, BAR4, 0),         # empty
        vu.build_region_access(0, CFG, 2 << 20),    # beyond max_data_xfer_size
        vu.build_region_access(0, CFG, 4) + b"x",   # read with data
        b"\0" * 8,                                  # short
    ):
        assert client.error(C, payload) == errno.EINVAL, payload
