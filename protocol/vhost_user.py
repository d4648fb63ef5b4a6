"""vhost-user wire format: header, payload layouts, request and protocol-feature ids.

(shared/docs/protocol.md section 8.)

Everything on a vhost-user socket is **host-endian** (these layouts use native-endian integers)::

    header (12 B)      | request u32 | flags u32 | size u32 |          size = payload bytes only
                         flags: bits 0-1 version (= 1), 0x4 REPLY, 0x8 NEED_REPLY
    u64                | value u64 |
    vring state        | index u32 | num u32 |
    vring addr (40 B)  | index u32 | flags u32 | desc u64 | used u64 | avail u64 | log u64 |
    memory table       | nregions u32 | padding u32 | region[nregions] ... |
    memory region      | guest_phys_addr u64 | memory_size u64 | userspace_addr u64 |
                         mmap_offset u64 |
    add/rem mem reg    | padding u64 | memory region |
    config             | offset u32 | size u32 | flags u32 | data[size] |

File descriptors travel as ``SCM_RIGHTS`` with the message (at most 8). Both directions use the
same header: the front-end's requests on the main socket and the back-end's requests
(``VhostUserBackendRequest``) on the channel passed with ``SET_BACKEND_REQ_FD``.

Theory of operation: ``parse_header`` checks only framing (version bits, payload size bound), so a
failure there means the byte stream can no longer be trusted and the connection must be closed.
``decode_payload`` checks a payload's size and shape for its request and returns a frozen
dataclass; its failure is an ordinary peer error that gets an error reply. ``construct`` errors
never leave this module: they become ``protocol.errors`` faults (``FramingLost``,
``PeerFault``). Encoders build the replies and back-end requests.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from construct import Array, Bytes, ConstructError, Int32un, Int64un, Struct, this

from protocol.errors import FramingLost, PeerFault

# Header flags (protocol.md 8.1).
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x4
VHOST_USER_NEED_REPLY_MASK = 0x8
#: Flags a sender may set: version bits, REPLY and NEED_REPLY. Others are reserved.
VHOST_USER_KNOWN_FLAGS = (VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK
                          | VHOST_USER_NEED_REPLY_MASK)

HEADER_SIZE = 12
#: Most fds one message may carry (protocol.md 8.1).
VHOST_USER_MAX_FDS = 8
#: Memory table regions in one SET_MEM_TABLE (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: Largest config window carried by GET/SET_CONFIG (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
VHOST_USER_MAX_CONFIG_SIZE = 256
CONFIG_HEADER_SIZE = 12
#: Upper bound on a payload we accept. QEMU's own bound is the size of its payload union (a few
#: KiB, dominated by crypto sessions); anything beyond this is not a balloon message and means
#: framing is lost.
VHOST_USER_MAX_PAYLOAD = 4096

#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 ring index, bit 8 "no fd attached" (polling mode).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
#: vring addr flags bit 0: log used-ring writes (migration dirty logging).
VHOST_VRING_F_LOG = 0

#: Feature bit 30 in GET/SET_FEATURES: "protocol features supported" (never shown to a guest).
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: Feature bit 26: the front-end asks the back-end to log all writes (migration).
VHOST_F_LOG_ALL = 26

#: SET_CONFIG flags.
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


class VhostUserRequest(enum.IntEnum):
    """Front-end -> back-end requests (protocol.md 8.2)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class VhostUserBackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the back-end channel (protocol.md 8.4)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class VhostUserProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (protocol.md 8.3)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20


# -- construct layouts (native endian: vhost-user is host-endian) ------------------------------
VhostUserHeader = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)
VhostUserU64 = Struct("value" / Int64un)
VhostVringState = Struct("index" / Int32un, "num" / Int32un)
VhostVringAddr = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "desc_user_addr" / Int64un,
    "used_user_addr" / Int64un,
    "avail_user_addr" / Int64un,
    "log_guest_addr" / Int64un,
)
VhostUserMemoryRegion = Struct(
    "guest_phys_addr" / Int64un,
    "memory_size" / Int64un,
    "userspace_addr" / Int64un,
    "mmap_offset" / Int64un,
)
VhostUserMemory = Struct(
    "nregions" / Int32un,
    "padding" / Int32un,
    "regions" / Array(this.nregions, VhostUserMemoryRegion),
)
VhostUserConfig = Struct(
    "offset" / Int32un,
    "size" / Int32un,
    "flags" / Int32un,
    "data" / Bytes(this.size),
)
VhostUserMemRegMsg = Struct("padding" / Int64un, "region" / VhostUserMemoryRegion)

VRING_STATE_SIZE = VhostVringState.sizeof()
VRING_ADDR_SIZE = VhostVringAddr.sizeof()
MEMORY_REGION_SIZE = VhostUserMemoryRegion.sizeof()
MEMORY_HEADER_SIZE = 8
MEM_REG_MSG_SIZE = VhostUserMemRegMsg.sizeof()
U64_SIZE = 8


# -- errors --------------------------------------------------------------------------------------
def bad_payload(request: int, why: str) -> PeerFault:
    """A well-framed message whose payload is wrong for its request (``PeerFault``, counted as
    ``bad_payloads``): answered with a failure, the connection stays. A bad header is
    ``protocol.errors.FramingLost``: the connection must close."""
    return PeerFault(f"{request_name(request)}: {why}", counter="bad_payloads")


def request_name(request: int) -> str:
    try:
        return VhostUserRequest(request).name
    except ValueError:
        return f"request {request}"


# -- decoded forms ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message as received: header, raw payload and the fds that came with it."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def request(self) -> int:
        return self.header.request


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: a ring index and whether an fd is attached."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigAccess:
    offset: int
    size: int
    flags: int
    data: bytes


Payload = (int | VringState | VringAddr | VringFile | MemoryTable | MemoryRegion | ConfigAccess
           | None)

# Payload shape per request. Requests not listed are not decoded (the session rejects them).
_U64_REQUESTS = frozenset({
    VhostUserRequest.SET_FEATURES,
    VhostUserRequest.SET_PROTOCOL_FEATURES,
    VhostUserRequest.SET_STATUS,
    VhostUserRequest.SET_LOG_BASE,
})
_VRING_STATE_REQUESTS = frozenset({
    VhostUserRequest.SET_VRING_NUM,
    VhostUserRequest.SET_VRING_BASE,
    VhostUserRequest.GET_VRING_BASE,
    VhostUserRequest.SET_VRING_ENABLE,
})
_VRING_FILE_REQUESTS = frozenset({
    VhostUserRequest.SET_VRING_KICK,
    VhostUserRequest.SET_VRING_CALL,
    VhostUserRequest.SET_VRING_ERR,
})
_NO_PAYLOAD_REQUESTS = frozenset({
    VhostUserRequest.GET_FEATURES,
    VhostUserRequest.SET_OWNER,
    VhostUserRequest.RESET_OWNER,
    VhostUserRequest.GET_PROTOCOL_FEATURES,
    VhostUserRequest.GET_QUEUE_NUM,
    VhostUserRequest.SET_BACKEND_REQ_FD,
    VhostUserRequest.RESET_DEVICE,
    VhostUserRequest.GET_MAX_MEM_SLOTS,
    VhostUserRequest.GET_STATUS,
})
#: Requests whose definition includes a reply payload: always answered, NEED_REPLY or not.
REPLY_REQUESTS = frozenset({
    VhostUserRequest.GET_FEATURES,
    VhostUserRequest.GET_PROTOCOL_FEATURES,
    VhostUserRequest.GET_VRING_BASE,
    VhostUserRequest.GET_QUEUE_NUM,
    VhostUserRequest.GET_CONFIG,
    VhostUserRequest.GET_MAX_MEM_SLOTS,
    VhostUserRequest.GET_STATUS,
    VhostUserRequest.GET_INFLIGHT_FD,
    VhostUserRequest.POSTCOPY_ADVISE,
    VhostUserRequest.CREATE_CRYPTO_SESSION,
    VhostUserRequest.GET_SHARED_OBJECT,
    VhostUserRequest.SET_DEVICE_STATE_FD,
    VhostUserRequest.CHECK_DEVICE_STATE,
    VhostUserRequest.GET_SHMEM_CONFIG,
})


def parse_header(data: bytes) -> Header:
    """Decode and check a 12-byte header. Raises ``FramingLost`` (close the link)."""
    if len(data) != HEADER_SIZE:
        raise FramingLost(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    try:
        h = VhostUserHeader.parse(data)
    except ConstructError as e:  # cannot happen for 12 bytes; kept so construct never leaks
        raise FramingLost(f"undecodable header: {e}") from None
    if h.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise FramingLost(
            f"request {h.request}: version {h.flags & VHOST_USER_VERSION_MASK} in flags "
            f"{h.flags:#x}, expected {VHOST_USER_VERSION}")
    if h.size > VHOST_USER_MAX_PAYLOAD:
        raise FramingLost(
            f"{request_name(h.request)}: payload size {h.size:#x} exceeds "
            f"{VHOST_USER_MAX_PAYLOAD:#x}")
    return Header(int(h.request), int(h.flags), int(h.size))


def _need_size(request: int, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise bad_payload(request, f"payload is {len(payload)} bytes, expected {size}")


def decode_payload(request: int, payload: bytes) -> Payload:
    """The typed payload of ``request``. Raises ``PeerFault`` (``bad_payload``) on a bad
    size or shape."""
    try:
        return _decode(request, payload)
    except ConstructError as e:
        raise bad_payload(request, f"undecodable payload: {e}") from None


def _decode(request: int, payload: bytes) -> Payload:
    if request in _NO_PAYLOAD_REQUESTS:
        # QEMU sends these with size 0; tolerate a u64 some front-ends attach (ignored).
        if len(payload) not in (0, U64_SIZE):
            raise bad_payload(request, f"unexpected {len(payload)}-byte payload")
        return None
    if request in _U64_REQUESTS:
        # SET_LOG_BASE carries {mmap_size, mmap_offset}; we only need to know it is well-sized.
        if request == VhostUserRequest.SET_LOG_BASE:
            _need_size(request, payload, 16)
            return int(VhostUserU64.parse(payload[:8]).value)
        _need_size(request, payload, U64_SIZE)
        return int(VhostUserU64.parse(payload).value)
    if request in _VRING_STATE_REQUESTS:
        _need_size(request, payload, VRING_STATE_SIZE)
        s = VhostVringState.parse(payload)
        return VringState(int(s.index), int(s.num))
    if request in _VRING_FILE_REQUESTS:
        _need_size(request, payload, U64_SIZE)
        v = int(VhostUserU64.parse(payload).value)
        if v & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise bad_payload(request, f"reserved bits set in {v:#x}")
        return VringFile(v & VHOST_USER_VRING_IDX_MASK, bool(v & VHOST_USER_VRING_NOFD_MASK))
    if request == VhostUserRequest.SET_VRING_ADDR:
        _need_size(request, payload, VRING_ADDR_SIZE)
        a = VhostVringAddr.parse(payload)
        return VringAddr(int(a.index), int(a.flags), int(a.desc_user_addr), int(a.used_user_addr),
                         int(a.avail_user_addr), int(a.log_guest_addr))
    if request == VhostUserRequest.SET_MEM_TABLE:
        if len(payload) < MEMORY_HEADER_SIZE:
            raise bad_payload(request, f"payload is {len(payload)} bytes, too short")
        n = int(Int32un.parse(payload[:4]))
        if n > VHOST_MEMORY_BASELINE_NREGIONS:
            raise bad_payload(
                request, f"{n} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS}")
        need = MEMORY_HEADER_SIZE + n * MEMORY_REGION_SIZE
        # QEMU sends exactly the used regions; some front-ends send the whole 8-entry array.
        full = MEMORY_HEADER_SIZE + VHOST_MEMORY_BASELINE_NREGIONS * MEMORY_REGION_SIZE
        if len(payload) not in (need, full):
            raise bad_payload(
                request, f"payload is {len(payload)} bytes for {n} regions, expected {need}")
        m = VhostUserMemory.parse(payload[:need])
        return MemoryTable(tuple(
            MemoryRegion(int(r.guest_phys_addr), int(r.memory_size), int(r.userspace_addr),
                         int(r.mmap_offset)) for r in m.regions))
    if request in (VhostUserRequest.ADD_MEM_REG, VhostUserRequest.REM_MEM_REG):
        _need_size(request, payload, MEM_REG_MSG_SIZE)
        r = VhostUserMemRegMsg.parse(payload).region
        return MemoryRegion(int(r.guest_phys_addr), int(r.memory_size), int(r.userspace_addr),
                            int(r.mmap_offset))
    if request in (VhostUserRequest.GET_CONFIG, VhostUserRequest.SET_CONFIG):
        if len(payload) < CONFIG_HEADER_SIZE:
            raise bad_payload(request, f"payload is {len(payload)} bytes, too short")
        size = int(Int32un.parse(payload[4:8]))
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise bad_payload(
                request, f"config size {size} exceeds {VHOST_USER_MAX_CONFIG_SIZE}")
        _need_size(request, payload, CONFIG_HEADER_SIZE + size)
        c = VhostUserConfig.parse(payload)
        return ConfigAccess(int(c.offset), int(c.size), int(c.flags), bytes(c.data))
    raise bad_payload(request, "request not supported by this back-end")


# -- encoders ---------------------------------------------------------------------------------
def build_header(request: int, flags: int, size: int) -> bytes:
    return bytes(VhostUserHeader.build({"request": request, "flags": flags, "size": size}))


def build_reply(request: int, payload: bytes = b"") -> bytes:
    """A reply: the request echoed, flags exactly VERSION|REPLY (QEMU checks this value)."""
    return build_header(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, len(payload)) + payload


def build_u64(value: int) -> bytes:
    return bytes(VhostUserU64.build({"value": value}))


def build_vring_state(index: int, num: int) -> bytes:
    return bytes(VhostVringState.build({"index": index, "num": num}))


def build_vring_addr(a: VringAddr) -> bytes:
    return bytes(VhostVringAddr.build({
        "index": a.index, "flags": a.flags, "desc_user_addr": a.desc_user_addr,
        "used_user_addr": a.used_user_addr, "avail_user_addr": a.avail_user_addr,
        "log_guest_addr": a.log_guest_addr}))


def build_memory_table(regions: tuple[MemoryRegion, ...] | list[MemoryRegion]) -> bytes:
    return bytes(VhostUserMemory.build({
        "nregions": len(regions), "padding": 0,
        "regions": [{"guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                     "userspace_addr": r.userspace_addr, "mmap_offset": r.mmap_offset}
                    for r in regions]}))


def build_mem_reg(r: MemoryRegion) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding, then one region."""
    return bytes(VhostUserMemRegMsg.build({"padding": 0, "region": {
        "guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
        "userspace_addr": r.userspace_addr, "mmap_offset": r.mmap_offset}}))


def build_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return bytes(VhostUserConfig.build(
        {"offset": offset, "size": len(data), "flags": flags, "data": data}))


def build_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A request as a front-end (or the back-end channel) sends it."""
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return build_header(request, flags, len(payload)) + payload


def build_vring_file(index: int, nofd: bool = False) -> bytes:
    return build_u64(index | (VHOST_USER_VRING_NOFD_MASK if nofd else 0))
