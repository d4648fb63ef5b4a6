"""virtio-pci (modern) layouts and constants: PCI header fields, the virtio vendor capability, the
common configuration structure, MSI-X, and QEMU's BAR template (protocol.md 7.6).

PCI type-0 header (first 64 bytes, little-endian), fields we use::

    0x00 vendor_id u16 | 0x02 device_id u16 | 0x04 command u16 | 0x06 status u16
    0x08 revision u8   | 0x09 prog_if u8 | 0x0A subclass u8 | 0x0B class u8 | 0x0E header_type u8
    0x10..0x27 BAR0..BAR5 u32 | 0x2C subsys_vendor u16 | 0x2E subsys_id u16 | 0x34 cap_ptr u8
    0x3C interrupt_line u8 | 0x3D interrupt_pin u8

virtio capability (ID 0x09), 16 bytes, +4 for NOTIFY (multiplier) and PCI_CFG (data)::

    | cap_vndr u8 | cap_next u8 | cap_len u8 | cfg_type u8 | bar u8 | id u8 | pad u16 |
    | offset le32 | length le32 | [notify_off_multiplier le32 | pci_cfg_data u8[4]] |

MSI-X capability (ID 0x11), 12 bytes::

    | id u8 | next u8 | message_control le16 |
    | table: bir:3 offset:29 le32 | pba: bir:3 offset:29 le32 |

Common configuration (64 bytes) offsets are the ``COMMON_*`` constants below.
"""
from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Modern (non-transitional) device id = 0x1040 + virtio device id; balloon = 0x1045.
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
#: QEMU's modern-only subsystem id (>= 0x40 as the spec asks of non-transitional devices).
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100
#: QEMU gives the balloon class 0x00FF ("unclassified").
PCI_CLASS_OTHERS = 0x00FF

# PCI header offsets.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CONFIG_SPACE_SIZE = 256

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09

# MSI-X.
PCI_MSIX_FLAGS = 2  # message control, relative to the capability
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1
PCI_MSIX_CAP_SIZE = 12
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# virtio capability types.
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9
VIRTIO_PCI_CAP_LEN = 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20
VIRTIO_PCI_CFG_CAP_LEN = 20
# Field offsets inside a virtio capability.
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_CAP_EXTRA = 16  # notify_off_multiplier, or pci_cfg_data

VirtioPciCap = Struct(
    "cap_vndr" / Int8ul,
    "cap_next" / Int8ul,
    "cap_len" / Int8ul,
    "cfg_type" / Int8ul,
    "bar" / Int8ul,
    "id" / Int8ul,
    "padding" / Bytes(2),
    "offset" / Int32ul,
    "length" / Int32ul,
)
MsixCap = Struct(
    "cap_id" / Int8ul,
    "cap_next" / Int8ul,
    "message_control" / Int16ul,
    "table" / Int32ul,
    "pba" / Int32ul,
)

# Common configuration structure (protocol.md 7.6).
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34
COMMON_Q_NDATA = 0x38
COMMON_Q_RESET = 0x3A
COMMON_ADM_Q_IDX = 0x3C
COMMON_ADM_Q_NUM = 0x3E
COMMON_CFG_SIZE = 0x40

#: (offset, size, name) of every common-config field, in order.
COMMON_FIELDS: tuple[tuple[int, int, str], ...] = (
    (COMMON_DFSELECT, 4, "device_feature_select"),
    (COMMON_DF, 4, "device_feature"),
    (COMMON_GFSELECT, 4, "driver_feature_select"),
    (COMMON_GF, 4, "driver_feature"),
    (COMMON_MSIX, 2, "config_msix_vector"),
    (COMMON_NUMQ, 2, "num_queues"),
    (COMMON_STATUS, 1, "device_status"),
    (COMMON_CFGGENERATION, 1, "config_generation"),
    (COMMON_Q_SELECT, 2, "queue_select"),
    (COMMON_Q_SIZE, 2, "queue_size"),
    (COMMON_Q_MSIX, 2, "queue_msix_vector"),
    (COMMON_Q_ENABLE, 2, "queue_enable"),
    (COMMON_Q_NOFF, 2, "queue_notify_off"),
    (COMMON_Q_DESCLO, 4, "queue_desc_lo"),
    (COMMON_Q_DESCHI, 4, "queue_desc_hi"),
    (COMMON_Q_AVAILLO, 4, "queue_driver_lo"),
    (COMMON_Q_AVAILHI, 4, "queue_driver_hi"),
    (COMMON_Q_USEDLO, 4, "queue_device_lo"),
    (COMMON_Q_USEDHI, 4, "queue_device_hi"),
    (COMMON_Q_NDATA, 2, "queue_notif_config_data"),
    (COMMON_Q_RESET, 2, "queue_reset"),
    (COMMON_ADM_Q_IDX, 2, "admin_queue_index"),
    (COMMON_ADM_Q_NUM, 2, "admin_queue_num"),
)

# ISR bits.
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# QEMU's layout (protocol.md 7.6): BAR1 MSI-X, BAR4 64-bit memory with four 4 KiB pages.
MSIX_BAR = 1
MSIX_TABLE_OFFSET = 0x0
MSIX_PBA_OFFSET = 0x800
MSIX_BAR_SIZE = 0x1000
MODERN_BAR = 4
MODERN_BAR_SIZE = 0x4000
COMMON_CFG_OFFSET = 0x0000
ISR_CFG_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_CFG_OFFSET = 0x3000
REGION_PAGE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
