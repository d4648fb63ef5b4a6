"""vfio-user wire messages (protocol.md section 7): header, payloads, constants, and a decoder
that turns bytes into frozen message objects or raises the peer's error.

Every message is a 16-byte header followed by a command payload; the header is **host-endian**
(native byte order, as the reference implementations lay it out)::

    0      2         4             8              12            16
    | msg_id u16 | command u16 | size u32 (hdr+payload) | flags u32 | error u32 | payload ...

    flags: bits 0-3 type (0 command, 1 reply), 0x10 NO_REPLY, 0x20 ERROR

Payloads used by a device server (offsets after the header)::

    VERSION           | major u16 | minor u16 | JSON capabilities, NUL-terminated (optional) |
    DMA_MAP           | argsz u32 | flags u32 | offset u64 | addr u64 | size u64 |        + 0/1 fd
    DMA_UNMAP         | argsz u32 | flags u32 | addr u64 | size u64 |
    DEVICE_GET_INFO   | argsz u32 | flags u32 | num_regions u32 | num_irqs u32 |
    GET_REGION_INFO   | argsz u32 | flags u32 | index u32 | cap_offset u32 | size u64 | offset u64 |
    GET_IRQ_INFO      | argsz u32 | flags u32 | index u32 | count u32 |
    SET_IRQS          | argsz u32 | flags u32 | index u32 | start u32 | count u32 |  + count fds
    REGION_READ/WRITE | offset u64 | region u32 | count u32 | data[count] (write; read reply) |

Theory of operation: ``decode_header`` checks framing only (a size below 16 or above the
largest message we accept means the stream can no longer be trusted:
``protocol.errors.FramingLost``, the connection must close). ``decode_request`` checks one
message's syntax and raises a ``protocol.errors.PeerFault`` carrying the errno (``refused``) for
a malformed one: the caller answers with an error reply and keeps the connection. ``construct``
errors never leave this module. Encoders build replies.
"""
from __future__ import annotations

import enum
import errno
import json
import struct
from dataclasses import dataclass
from typing import Any

from construct import Bytes, ConstructError, GreedyBytes, Int16un, Int32un, Int64un, Struct

from protocol.errors import FramingLost, PeerFault

# -- constants ------------------------------------------------------------------------------------

HEADER_SIZE = 16


class Command(enum.IntEnum):
    """vfio-user command numbers (protocol.md 7.2)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # unused since the migration v2 rework
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags.
VFIO_USER_F_TYPE_MASK = 0xF
VFIO_USER_F_TYPE_COMMAND = 0
VFIO_USER_F_TYPE_REPLY = 1
VFIO_USER_F_NO_REPLY = 0x10
VFIO_USER_F_ERROR = 0x20

# Protocol version we speak: QEMU proposes 0.0 and refuses a higher minor (protocol.md 7.3).
VFIO_USER_MAJOR = 0
VFIO_USER_MINOR = 0

# Limits (protocol.md 7.3 defaults; QEMU's maxima).
DEFAULT_MAX_MSG_FDS = 1
MAX_MAX_MSG_FDS = 16
DEFAULT_MAX_DATA_XFER = 1 << 20
#: Largest VERSION message we read (its JSON is short in practice).
MAX_VERSION_JSON = 64 * 1024
#: Largest message accepted at all: a region write of max_data_xfer_size plus its 16-byte
#: access header, or a VERSION with its JSON. Anything larger loses framing.
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + DEFAULT_MAX_DATA_XFER

# DEVICE_GET_INFO flags (linux/vfio.h).
VFIO_DEVICE_FLAGS_RESET = 1
VFIO_DEVICE_FLAGS_PCI = 2

# Region indices of a vfio-pci device (protocol.md 7.5).
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

# Region info flags.
VFIO_REGION_INFO_FLAG_READ = 1
VFIO_REGION_INFO_FLAG_WRITE = 2
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_REGION_INFO_FLAG_CAPS = 8

# IRQ indices (protocol.md 7.5).
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# IRQ info flags.
VFIO_IRQ_INFO_EVENTFD = 1
VFIO_IRQ_INFO_MASKABLE = 2
VFIO_IRQ_INFO_AUTOMASKED = 4
VFIO_IRQ_INFO_NORESIZE = 8

# SET_IRQS flags: one data type, one action.
VFIO_IRQ_SET_DATA_NONE = 1
VFIO_IRQ_SET_DATA_BOOL = 2
VFIO_IRQ_SET_DATA_EVENTFD = 4
VFIO_IRQ_SET_DATA_TYPE_MASK = 7
VFIO_IRQ_SET_ACTION_MASK = 8
VFIO_IRQ_SET_ACTION_UNMASK = 16
VFIO_IRQ_SET_ACTION_TRIGGER = 32
VFIO_IRQ_SET_ACTION_TYPE_MASK = 56

# DMA flags.
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1
VFIO_DMA_UNMAP_FLAG_ALL = 2

# -- layouts --------------------------------------------------------------------------------------

VfioUserHeader = Struct(
    "msg_id" / Int16un,
    "command" / Int16un,
    "size" / Int32un,
    "flags" / Int32un,
    "error" / Int32un,
)
VersionPayload = Struct("major" / Int16un, "minor" / Int16un, "json" / GreedyBytes)
DmaMapPayload = Struct(
    "argsz" / Int32un, "flags" / Int32un, "offset" / Int64un, "addr" / Int64un, "size" / Int64un
)
DmaUnmapPayload = Struct("argsz" / Int32un, "flags" / Int32un, "addr" / Int64un, "size" / Int64un)
DeviceInfoPayload = Struct(
    "argsz" / Int32un, "flags" / Int32un, "num_regions" / Int32un, "num_irqs" / Int32un
)
RegionInfoPayload = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "cap_offset" / Int32un,
    "size" / Int64un,
    "offset" / Int64un,
)
IrqInfoPayload = Struct("argsz" / Int32un, "flags" / Int32un, "index" / Int32un, "count" / Int32un)
IrqSetPayload = Struct(
    "argsz" / Int32un, "flags" / Int32un, "index" / Int32un, "start" / Int32un, "count" / Int32un
)
RegionAccessHeader = Struct("offset" / Int64un, "region" / Int32un, "count" / Int32un)
RegionAccess = Struct(
    "offset" / Int64un, "region" / Int32un, "count" / Int32un, "data" / Bytes(lambda c: c.count)
)

# Hot paths (every message has a header; region accesses are most of the traffic) use these
# precompiled ``struct`` twins of the construct layouts above: construct costs ~40 us a message.
# tests/balloon_dev/transport/vfio_user/test_protocol.py checks that each twin packs exactly
# like its layout.
HEADER_STRUCT = struct.Struct("=HHIII")
REGION_ACCESS_STRUCT = struct.Struct("=QII")

DMA_MAP_SIZE = DmaMapPayload.sizeof()  # 32
DMA_UNMAP_SIZE = DmaUnmapPayload.sizeof()  # 24
DEVICE_INFO_SIZE = DeviceInfoPayload.sizeof()  # 16
REGION_INFO_SIZE = RegionInfoPayload.sizeof()  # 32
IRQ_INFO_SIZE = IrqInfoPayload.sizeof()  # 16
IRQ_SET_SIZE = IrqSetPayload.sizeof()  # 20
REGION_ACCESS_SIZE = RegionAccessHeader.sizeof()  # 16


# -- errors ---------------------------------------------------------------------------------------


def refused(err: int, why: str) -> PeerFault:
    """A malformed or unacceptable message from the peer (``protocol.errors.PeerFault``):
    answered with an error reply carrying ``err``, counted as ``peer_error_<ERRNO>``; the
    connection stays up. Framing errors are ``protocol.errors.FramingLost``."""
    name = errno.errorcode.get(err, str(err))
    return PeerFault(f"{name}: {why}", errno=err, counter=f"peer_error_{name}")


# -- decoded messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & VFIO_USER_F_TYPE_MASK == VFIO_USER_F_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & VFIO_USER_F_NO_REPLY)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message as read from the socket: its header, payload and fds."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    capabilities: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DmaMap:
    argsz: int
    flags: int
    offset: int
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    argsz: int
    flags: int
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class DeviceGetInfo:
    argsz: int


@dataclass(frozen=True, slots=True)
class GetRegionInfo:
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class GetRegionIoFds:
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class GetIrqInfo:
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class SetIrqs:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL only: one byte per vector

    @property
    def data_type(self) -> int:
        return self.flags & VFIO_IRQ_SET_DATA_TYPE_MASK

    @property
    def action(self) -> int:
        return self.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK


@dataclass(frozen=True, slots=True)
class RegionRead:
    offset: int
    region: int
    count: int


@dataclass(frozen=True, slots=True)
class RegionWrite:
    offset: int
    region: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeviceReset:
    pass


Request = (
    Version | DmaMap | DmaUnmap | DeviceGetInfo | GetRegionInfo | GetRegionIoFds | GetIrqInfo
    | SetIrqs | RegionRead | RegionWrite | DeviceReset
)


# -- decoding -------------------------------------------------------------------------------------


def decode_header(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Header:
    """Decode the 16-byte header. Raises ``FramingLost`` if the size field cannot be trusted."""
    if len(data) != HEADER_SIZE:
        raise FramingLost(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    msg_id, command, size, flags, error = HEADER_STRUCT.unpack(data)
    if size < HEADER_SIZE:
        raise FramingLost(f"message size {size} is smaller than the header")
    if size > max_size:
        raise FramingLost(f"message size {size} exceeds the limit {max_size}")
    return Header(msg_id, command, size, flags, error)


def _parse(layout: Any, payload: bytes, what: str) -> Any:
    try:
        return layout.parse(payload)
    except ConstructError as e:  # never leak construct errors (conventions 5)
        raise refused(errno.EINVAL, f"{what}: {e}") from None


def _need(payload: bytes, size: int, what: str, *, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise refused(errno.EINVAL, f"{what} payload is {len(payload)} bytes, expected {size}")


def decode_request(header: Header, payload: bytes) -> Request:
    """Decode one command's payload. Raises ``PeerFault`` (answer with an error reply)."""
    if header.is_reply:
        raise refused(errno.EINVAL, "a reply where a command was expected")
    if header.flags & VFIO_USER_F_TYPE_MASK != VFIO_USER_F_TYPE_COMMAND:
        raise refused(errno.EINVAL, f"unknown message type {header.flags & 0xF}")
    if len(payload) != header.payload_size:
        raise refused(errno.EINVAL, "payload length disagrees with the header size")
    cmd = header.command
    if cmd == Command.VERSION:
        _need(payload, 4, "VERSION")
        p = _parse(VersionPayload, payload, "VERSION")
        return Version(p.major, p.minor, _decode_caps(p.json))
    if cmd == Command.DMA_MAP:
        _need(payload, DMA_MAP_SIZE, "DMA_MAP", exact=True)
        p = _parse(DmaMapPayload, payload, "DMA_MAP")
        if p.argsz < DMA_MAP_SIZE:
            raise refused(errno.EINVAL, f"DMA_MAP argsz {p.argsz} < {DMA_MAP_SIZE}")
        return DmaMap(p.argsz, p.flags, p.offset, p.addr, p.size)
    if cmd == Command.DMA_UNMAP:
        # A dirty bitmap may follow in the GET_DIRTY_BITMAP form; we refuse that form later.
        _need(payload, DMA_UNMAP_SIZE, "DMA_UNMAP")
        p = _parse(DmaUnmapPayload, payload[:DMA_UNMAP_SIZE], "DMA_UNMAP")
        if p.argsz < DMA_UNMAP_SIZE:
            raise refused(errno.EINVAL, f"DMA_UNMAP argsz {p.argsz} < {DMA_UNMAP_SIZE}")
        return DmaUnmap(p.argsz, p.flags, p.addr, p.size)
    if cmd == Command.DEVICE_GET_INFO:
        _need(payload, 4, "DEVICE_GET_INFO")
        p = _parse(DeviceInfoPayload, payload.ljust(DEVICE_INFO_SIZE, b"\0"), "DEVICE_GET_INFO")
        if p.argsz < DEVICE_INFO_SIZE:
            raise refused(errno.EINVAL, f"DEVICE_GET_INFO argsz {p.argsz} too small")
        return DeviceGetInfo(p.argsz)
    if cmd in (Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS):
        _need(payload, 12, Command(cmd).name)
        p = _parse(
            RegionInfoPayload, payload[:REGION_INFO_SIZE].ljust(REGION_INFO_SIZE, b"\0"),
            Command(cmd).name,
        )
        if cmd == Command.DEVICE_GET_REGION_IO_FDS:
            return GetRegionIoFds(p.argsz, p.index)
        if p.argsz < REGION_INFO_SIZE:
            raise refused(errno.EINVAL, f"GET_REGION_INFO argsz {p.argsz} too small")
        return GetRegionInfo(p.argsz, p.index)
    if cmd == Command.DEVICE_GET_IRQ_INFO:
        _need(payload, IRQ_INFO_SIZE, "GET_IRQ_INFO", exact=True)
        p = _parse(IrqInfoPayload, payload, "GET_IRQ_INFO")
        if p.argsz < IRQ_INFO_SIZE:
            raise refused(errno.EINVAL, f"GET_IRQ_INFO argsz {p.argsz} too small")
        return GetIrqInfo(p.argsz, p.index)
    if cmd == Command.DEVICE_SET_IRQS:
        # vfio-user carries eventfds as SCM_RIGHTS, never inline; only DATA_BOOL has data after
        # the 20 fixed bytes (one byte per vector).
        _need(payload, IRQ_SET_SIZE, "SET_IRQS")
        p = _parse(IrqSetPayload, payload[:IRQ_SET_SIZE], "SET_IRQS")
        if p.argsz < IRQ_SET_SIZE:
            raise refused(errno.EINVAL, f"SET_IRQS argsz {p.argsz} too small")
        data = bytes(payload[IRQ_SET_SIZE:])
        is_bool = p.flags & VFIO_IRQ_SET_DATA_TYPE_MASK == VFIO_IRQ_SET_DATA_BOOL
        if (is_bool and len(data) != p.count) or (not is_bool and data):
            raise refused(errno.EINVAL, f"SET_IRQS carries {len(data)} data bytes "
                                f"for count {p.count} flags {p.flags:#x}")
        return SetIrqs(p.argsz, p.flags, p.index, p.start, p.count, data)
    if cmd == Command.REGION_READ:
        _need(payload, REGION_ACCESS_SIZE, "REGION_READ", exact=True)
        return RegionRead(*REGION_ACCESS_STRUCT.unpack(payload))
    if cmd == Command.REGION_WRITE:
        _need(payload, REGION_ACCESS_SIZE, "REGION_WRITE")
        offset, region, count = REGION_ACCESS_STRUCT.unpack_from(payload)
        if count != len(payload) - REGION_ACCESS_SIZE:
            raise refused(errno.EINVAL, f"REGION_WRITE count {count} but "
                          f"{len(payload) - REGION_ACCESS_SIZE} data bytes")
        return RegionWrite(offset, region, count, bytes(payload[REGION_ACCESS_SIZE:]))
    if cmd == Command.DEVICE_RESET:
        return DeviceReset()
    try:
        name = Command(cmd).name
    except ValueError:
        name = f"command {cmd}"
    raise refused(errno.ENOSYS, f"{name} is not supported")


def _decode_caps(raw: bytes) -> dict[str, Any]:
    """The VERSION JSON: optional, NUL-terminated, an object with a "capabilities" object."""
    if not raw:
        return {}
    if len(raw) > MAX_VERSION_JSON:
        raise refused(errno.E2BIG, f"VERSION JSON of {len(raw)} bytes")
    nul = raw.find(b"\0")
    if nul < 0:
        raise refused(errno.EINVAL, "VERSION JSON is not NUL-terminated")
    text = raw[:nul]
    if not text:
        return {}
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: JSON nested deeper than the parser's stack (a peer error like any
        # other malformed JSON, not a bug of ours).
        raise refused(errno.EINVAL, f"VERSION JSON does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise refused(errno.EINVAL, "VERSION JSON is not an object")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise refused(errno.EINVAL, "VERSION capabilities is not an object")
    return caps


# -- encoding -------------------------------------------------------------------------------------


def encode_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER_STRUCT.pack(msg_id, command, size, flags, error)


def encode_request(msg_id: int, command: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """A command message (used by tests and by a client)."""
    return encode_header(msg_id, command, HEADER_SIZE + len(payload), flags) + payload


def encode_reply(header: Header, payload: bytes = b"") -> bytes:
    """A success reply to ``header``: same id and command, type REPLY."""
    return (
        encode_header(header.msg_id, header.command, HEADER_SIZE + len(payload),
                      VFIO_USER_F_TYPE_REPLY)
        + payload
    )


def encode_error(header: Header, err: int) -> bytes:
    """An error reply: the bare header with ERROR set and the errno (protocol.md 7.1)."""
    return encode_header(
        header.msg_id, header.command, HEADER_SIZE, VFIO_USER_F_TYPE_REPLY | VFIO_USER_F_ERROR, err
    )


def build_version(major: int, minor: int, capabilities: dict[str, Any] | None) -> bytes:
    js = b""
    if capabilities is not None:
        js = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode() + b"\0"
    return bytes(VersionPayload.build(dict(major=major, minor=minor, json=js)))


def build_dma_map(flags: int, offset: int, addr: int, size: int) -> bytes:
    return bytes(DmaMapPayload.build(
        dict(argsz=DMA_MAP_SIZE, flags=flags, offset=offset, addr=addr, size=size)))


def build_dma_unmap(flags: int, addr: int, size: int, argsz: int = DMA_UNMAP_SIZE) -> bytes:
    return bytes(DmaUnmapPayload.build(dict(argsz=argsz, flags=flags, addr=addr, size=size)))


def build_device_info(argsz: int, flags: int, num_regions: int, num_irqs: int) -> bytes:
    return bytes(DeviceInfoPayload.build(
        dict(argsz=argsz, flags=flags, num_regions=num_regions, num_irqs=num_irqs)))


def build_region_info(argsz: int, flags: int, index: int, size: int, offset: int = 0,
                      cap_offset: int = 0) -> bytes:
    return bytes(RegionInfoPayload.build(dict(argsz=argsz, flags=flags, index=index,
                                              cap_offset=cap_offset, size=size, offset=offset)))


def build_irq_info(argsz: int, flags: int, index: int, count: int) -> bytes:
    return bytes(IrqInfoPayload.build(dict(argsz=argsz, flags=flags, index=index, count=count)))


def build_irq_set(flags: int, index: int, start: int, count: int,
                  argsz: int = IRQ_SET_SIZE) -> bytes:
    return bytes(IrqSetPayload.build(
        dict(argsz=argsz, flags=flags, index=index, start=start, count=count)))


def build_region_access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return REGION_ACCESS_STRUCT.pack(offset, region, count) + data


def parse_reply_payload(layout_name: str, payload: bytes) -> dict[str, Any]:
    """Parse a reply payload by layout name (for tests and clients); raises ``PeerFault``."""
    layouts = {
        "version": VersionPayload, "dma_unmap": DmaUnmapPayload, "device_info": DeviceInfoPayload,
        "region_info": RegionInfoPayload, "irq_info": IrqInfoPayload,
        "region_access": RegionAccess,
    }
    c = _parse(layouts[layout_name], payload, layout_name)
    return {k: v for k, v in c.items() if not k.startswith("_")}
