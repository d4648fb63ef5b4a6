"""vhost-user back-end session for the balloon device (sans-I/O; protocol.md 8).

Theory of operation
-------------------
QEMU's generic front-end (``vhost-user-test-device-pci``, virtio-id 5) owns the guest-visible
virtio transport: it negotiates features with the guest, keeps the status byte, and only when the
guest sets DRIVER_OK does it hand the rings to us (``vhost_dev_start``): SET_FEATURES with the
guest's accepted features, SET_MEM_TABLE (one memfd per RAM region), per ring SET_VRING_NUM /
BASE / ADDR / KICK / CALL, SET_VRING_ENABLE and, with the STATUS protocol feature, SET_STATUS.
Config-space accesses are forwarded at any time (GET_CONFIG on every guest read, SET_CONFIG with
the whole window on every write).

A ``VhostUserSession`` turns those messages into calls on a sans-I/O ``BalloonDevice`` (a virtio
device with its own status byte): ``handle(msg)`` returns a ``core.Outcome``: the reply bytes (if
any), the call eventfds to signal (the device's ``NotifyQueue``), the back-end channel messages
(CONFIG_CHANGE_MSG for ``ConfigChanged``), the host effects, and whether the connection must
close. Its server is ``vhost_user_server`` on ``connection.DeviceServer``. The session drives
the device's status from the front-end's view (when FEATURES_OK and DRIVER_OK happen, stop and
resume): ``vhost_user_status.FrontendStatus``, which the session inherits, says how.

Memory: every SET_MEM_TABLE / ADD_MEM_REG region fd is mapped by ``guest_ram.GuestRamMapper``
(sealed against shrinking first; that module explains why) and added to the ``GuestMemory`` the
device reads, at its ``guest_phys_addr``.
SET_VRING_ADDR gives *front-end virtual* addresses; they are translated through the regions'
``userspace_addr`` into guest-physical ones, which is what the device core takes. Descriptor
addresses inside the rings are guest-physical already.

Driver-writable config fields (``actual``, ``poison_val``) written by the guest before the device
has seen FEATURES_OK are kept and applied right after FEATURES_OK: Linux writes ``poison_val``
before DRIVER_OK, but this back-end only learns the features at DRIVER_OK time. SET_CONFIG always
carries QEMU's cached copy of the whole window, so only driver-writable fields whose value
changed are forwarded; the device-written ones (``num_pages``, ``free_page_hint_cmd_id``) in it are
stale copies and ignored.

File descriptors: a message's fds belong to the session once the message is handled; fds a
handler does not keep are closed at once (also when the message is rejected). ``close()``
releases everything (fds, mappings) and resets the device, ready for the next front-end.

Errors name the culprit: a bad header raises ``protocol.errors.FramingLost`` out of the reader
(the server closes the connection); a bad payload or a request we do not implement is a peer
error (``core.PeerError``, a ``PeerFault``): logged, counted, answered with a failure (a
REPLY_ACK of 1 when NEED_REPLY was set, an empty reply for requests that always reply), and the
session carries on.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balloon_dev.effects import ConfigChanged, Effect, NotifyQueue
from balloon_dev.status import DRIVER_OK, FEATURES_OK
from balloon_dev.transport.core import DeviceCore, Outcome, PeerError, Signal, count_peer_fault
from balloon_dev.transport.fdstream import close_quietly
from balloon_dev.transport.guest_ram import GuestRamMapper, RamMapping
from balloon_dev.transport.vhost_user_status import FrontendStatus, Vring
from guestmem import GuestMemory
from protocol.balloon import CFG_ACTUAL, CFG_POISON_VAL
from protocol.errors import PeerFault
from protocol.vhost_user import (
    REPLY_REQUESTS,
    VHOST_SET_CONFIG_TYPE_FRONTEND,
    VHOST_SET_CONFIG_TYPE_MIGRATION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    ConfigAccess,
    MemoryRegion,
    MemoryTable,
    Message,
    VhostUserBackendRequest,
    VhostUserProtocolFeature,
    VhostUserRequest,
    VringAddr,
    VringFile,
    VringState,
    build_config,
    build_reply,
    build_request,
    build_u64,
    build_vring_state,
    decode_payload,
    request_name,
)
from protocol.virtqueue import avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger(__name__)


PF = VhostUserProtocolFeature
#: Protocol features offered by default (protocol.md 8.4/8.5): REPLY_ACK for NEED_REPLY acks,
#: CONFIG (the front-end has a config window), BACKEND_REQ for CONFIG_CHANGE_MSG, RESET_DEVICE and
#: STATUS so the front-end's status byte drives the device, CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG:
#: more than 8 regions, memory hot-plug). Not offered: MQ (one device, fixed queues), LOG_SHMFD
#: (the generic front-end is unmigratable anyway).
DEFAULT_PROTOCOL_FEATURES = (
    (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG) | (1 << PF.RESET_DEVICE)
    | (1 << PF.STATUS) | (1 << PF.CONFIGURE_MEM_SLOTS)
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS): more than the 8 of a
#: SET_MEM_TABLE, so DIMM hot-plug has room; each slot is one mmap.
MAX_MEM_SLOTS = 32
#: Driver-writable 32-bit config fields of the balloon (protocol.md 3.2).
DRIVER_CONFIG_FIELDS = (CFG_ACTUAL, CFG_POISON_VAL)


@dataclass(slots=True)
class _Mapping:
    """A mapped memory region and the front-end virtual address it has in QEMU."""

    ram: RamMapping
    uaddr: int

    @property
    def gpa(self) -> int:
        return self.ram.gpa

    @property
    def size(self) -> int:
        return self.ram.size


@dataclass(slots=True)
class _Handled:
    """What one handler did: the reply payload, the device's effects, the fds it keeps."""

    payload: bytes | None = None  # reply payload for REPLY_REQUESTS
    effects: list[Effect] = field(default_factory=list)
    kept_fds: tuple[int, ...] = ()


class VhostUserSession(FrontendStatus):
    """One front-end connection's state. ``dev`` must read guest memory through ``mem``."""

    def __init__(self, dev: DeviceCore, mem: GuestMemory, *,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        self.dev = dev
        self.mem = mem
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.features_acked: int | None = None  # last SET_FEATURES value (bit 30 included)
        self.owner = False
        self.live = False  # the device has been given DRIVER_OK by this session
        self.stopped = False  # every ring was stopped while live; the device kept its state
        self._handed: dict[int, tuple[int, int, int, int]] = {}  # q -> (num, desc, avail, used)
        self._reported_base: dict[int, int] = {}  # GET_VRING_BASE answers since going live
        self.backend_fd: int | None = None
        self.rings: list[Vring] = []
        self.counters: Counter[str] = Counter()
        self._maps: list[_Mapping] = []
        self.ram = GuestRamMapper(mem, self.counters)
        self._pending_config: dict[int, bytes] = {}
        self._reset_rings()

    # -- queries the server uses ----------------------------------------------------------
    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def kick_fds(self) -> dict[int, int]:
        """Kick eventfds to watch: rings that are started (the server reads them)."""
        return {q: r.kick_fd for q, r in enumerate(self.rings)
                if r.started and r.kick_fd is not None}

    def call_fd(self, q: int) -> int | None:
        return self.rings[q].call_fd if 0 <= q < len(self.rings) else None

    def config_change_message(self) -> bytes | None:
        """The back-end channel message announcing a config change, or None if there is no
        channel (then the guest only sees the change on its next config read)."""
        if self.backend_fd is None or not self.has_protocol_feature(PF.CONFIG):
            return None
        return build_request(VhostUserBackendRequest.CONFIG_CHANGE_MSG)

    # -- entry points -------------------------------------------------------------------------
    def handle(self, msg: Message) -> Outcome:
        """Handle one framed front-end message (its fds are owned by the session from now on)."""
        self.counters["messages"] += 1
        req = msg.request
        log.debug("vhost-user <- %s flags %#x, %d payload bytes %s, %d fds", request_name(req),
                  msg.header.flags, len(msg.payload), msg.payload[:48].hex(), len(msg.fds))
        handled = _Handled()
        ok = True
        try:
            if msg.header.is_reply:
                raise PeerError("unexpected_replies",
                                "a reply arrived where a request was expected")
            handler = _HANDLERS.get(req)
            if handler is None:
                raise PeerError("unsupported_requests", "request not supported by this back-end")
            payload = decode_payload(req, msg.payload)
            handled = handler(self, payload, msg.fds)
        except PeerFault as e:
            ok = False
            self._peer_error(e, req)
        except Exception:  # noqa: BLE001 - a bug of ours must not take the VM's device down
            ok = False
            handled = _Handled()
            self.counters["internal_errors"] += 1
            log.exception("vhost-user: internal error handling %s", request_name(req))
        self._close_unkept(msg.fds, handled.kept_fds if ok else ())
        return self._outcome(handled.effects, self._reply(msg, ok, handled))

    def refuse(self, msg: Message, fault: PeerFault) -> Outcome:
        """Refuse ``msg`` unread (the server found it unacceptable): close its fds, answer."""
        self.counters["messages"] += 1
        self._peer_error(fault, msg.request)
        self._close_unkept(msg.fds, ())
        return Outcome(reply=self._reply(msg, False, _Handled()))

    def host(self, call: Callable[[Any], list[Effect]]) -> Outcome:
        """Run a host request ``call(dev)`` (e.g. ``lambda d: d.free_page_start()``)."""
        return self._outcome(call(self.dev))

    def _outcome(self, effects: list[Effect], reply: bytes | None = None) -> Outcome:
        """Guest-facing effects become call-eventfd signals and back-end channel messages."""
        signals: list[Signal] = []
        backend: list[bytes] = []
        host: list[Effect] = []
        for eff in effects:
            if isinstance(eff, NotifyQueue):
                fd = self.call_fd(eff.queue)
                if fd is None:
                    self.counters["notify_without_call_fd"] += 1
                else:
                    signals.append(Signal(fd, f"call fd of ring {eff.queue}"))
            elif isinstance(eff, ConfigChanged):
                m = self.config_change_message()
                if m is None:
                    self.counters["config_change_without_channel"] += 1
                else:
                    backend.append(m)
            else:
                host.append(eff)
        return Outcome(reply, tuple(signals), tuple(host), tuple(backend))

    def kick(self, q: int) -> Outcome:
        """The kick eventfd of ring ``q`` fired (the server has drained it)."""
        return self._outcome(self._kick(q))

    def _kick(self, q: int) -> list[Effect]:
        if not 0 <= q < len(self.rings):
            return []
        ring = self.rings[q]
        self.counters["kicks"] += 1
        if not self._runnable(ring):
            # vhost-user.rst: a stopped or disabled ring does not process buffers. Nothing is
            # lost: going live (or re-enabling) notifies every runnable ring once.
            self.counters["kicks_ignored"] += 1
            return []
        if self.live:
            return self.dev.notify(q)
        # Fallback trigger: a front-end that set up fewer rings than the device has and never
        # sends DRIVER_OK. Only once every ring it gave an address to can run; going live then
        # notifies every runnable ring, this one included.
        effects = self._go_live() if self._set_up_rings_runnable() else []
        if not self.live:
            self.counters["kicks_before_live"] += 1
        return effects

    def close(self) -> tuple[Effect, ...]:
        """The front-end left: reset the device (before the mappings go, so nothing touches
        unmapped memory), release every fd and mapping. Returns the reset's host effects
        (nobody is left to interrupt)."""
        effects = self._device_reset()
        for ring in self.rings:
            self._close_ring_fds(ring)
        self._reset_rings()
        if self.backend_fd is not None:
            close_quietly(self.backend_fd)
            self.backend_fd = None
        self._unmap_all()
        self._pending_config.clear()
        self.protocol_features = 0
        self.features_acked = None
        self.owner = False
        return tuple(e for e in effects if not isinstance(e, (NotifyQueue, ConfigChanged)))

    # -- replies and errors -------------------------------------------------------------------
    def _reply(self, msg: Message, ok: bool, outcome: _Handled) -> bytes | None:
        req = msg.request
        if req in REPLY_REQUESTS:
            # A failed request that always replies gets an empty payload: QEMU checks the
            # payload size of these replies, so an empty one fails its call cleanly.
            return build_reply(req, outcome.payload if ok and outcome.payload is not None else b"")
        if msg.header.need_reply and self.has_protocol_feature(PF.REPLY_ACK):
            # REPLY_ACK: u64 0 = success, non-zero = failure.
            return build_reply(req, build_u64(0 if ok else 1))
        return None

    def _peer_error(self, fault: PeerFault, req: int) -> None:
        count_peer_fault(self.counters, fault, log,
                         f"vhost-user {request_name(req)} ({req:#x})")

    def _close_unkept(self, fds: tuple[int, ...], kept: tuple[int, ...]) -> None:
        for fd in fds:
            if fd not in kept:
                close_quietly(fd)
                self.counters["fds_closed"] += 1

    # -- helpers ------------------------------------------------------------------------------
    def _reset_rings(self) -> None:
        n = self.dev.num_queues
        self.rings = [Vring() for _ in range(n)]

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise PeerError("bad_ring_index",
                          f"ring {index} does not exist (device has {len(self.rings)} queues; "
                          f"the front-end's num_vqs must be {len(self.rings)})")
        return self.rings[index]

    @staticmethod
    def _close_ring_fds(ring: Vring) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(ring, name)
            if fd is not None:
                close_quietly(fd)
                setattr(ring, name, None)

    def _uaddr_to_gpa(self, uaddr: int, length: int, what: str) -> int:
        for m in self._maps:
            if m.uaddr <= uaddr and uaddr + length <= m.uaddr + m.size:
                return m.gpa + (uaddr - m.uaddr)
        raise PeerError("bad_vring_addr",
                      f"{what} at front-end address {uaddr:#x} (+{length:#x}) is in no memory "
                      f"region ({len(self._maps)} mapped)")

    def _unmap_all(self) -> None:
        maps, self._maps = self._maps, []
        for m in maps:
            self.ram.unmap(m.ram)

    # -- handlers (payload already decoded; raise PeerError on meaning errors) ------------------
    def _get_features(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        # Bit 30 tells the front-end we speak protocol features; the front-end hides it from the
        # guest (vub_get_features).
        feats = self.dev.device_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        return _Handled(payload=build_u64(feats))

    def _set_features(self, value: int, _fds: tuple[int, ...]) -> _Handled:
        allowed = self.dev.device_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if value & ~allowed:
            raise PeerError("bad_features",
                          f"features {value:#x} include {value & ~allowed:#x} never offered")
        guest = value & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        effects: list[Effect] = []
        if self.stopped and guest != self.guest_features:
            # Restart after a stop with other features: a guest reset, not a resume.
            effects += self._device_reset()
        if self.dev.status & FEATURES_OK and guest != self.guest_features:
            raise PeerError("features_after_features_ok",
                          f"features {guest:#x} after FEATURES_OK with {self.guest_features:#x}")
        self.features_acked = value
        if not self.has_protocol_feature(PF.STATUS) and not self.dev.status & FEATURES_OK:
            # Without STATUS the front-end never says FEATURES_OK: SET_FEATURES is the moment.
            effects += self._features_ok()
        return _Handled(effects=effects)

    def _set_owner(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        self.owner = True
        return _Handled()

    def _reset_device(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        # RESET_DEVICE (and the deprecated RESET_OWNER): back to the just-connected state, but
        # the memory table and the negotiated protocol features stay.
        effects = self._device_reset()
        for ring in self.rings:
            self._close_ring_fds(ring)
        self._reset_rings()
        self.features_acked = None
        self._pending_config.clear()
        return _Handled(effects=effects)

    def _get_protocol_features(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        return _Handled(payload=build_u64(self.offered_protocol_features))

    def _set_protocol_features(self, value: int, _fds: tuple[int, ...]) -> _Handled:
        if value & ~self.offered_protocol_features:
            raise PeerError("bad_protocol_features",
                          f"protocol features {value:#x} include "
                          f"{value & ~self.offered_protocol_features:#x} never offered")
        self.protocol_features = value
        return _Handled()

    def _get_queue_num(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        return _Handled(payload=build_u64(self.dev.num_queues))

    def _get_max_mem_slots(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        return _Handled(payload=build_u64(MAX_MEM_SLOTS))

    def _map_region(self, i: int, r: MemoryRegion, fd: int, others: list[_Mapping],
                    counter: str) -> _Mapping:
        """Map one region's fd (``guest_ram``: sealed, checked, mapped shared); ``others`` are
        the regions it must not overlap. Not yet in guest memory."""
        for m in others:
            if r.guest_phys_addr < m.gpa + m.size and m.gpa < r.guest_phys_addr + r.memory_size:
                raise PeerError(counter, f"region {i} at {r.guest_phys_addr:#x} overlaps the "
                                f"region at {m.gpa:#x}")
        ram = self.ram.map(fd, gpa=r.guest_phys_addr, size=r.memory_size, offset=r.mmap_offset,
                           writable=True, counter=counter, what=f"region {i}")
        return _Mapping(ram, r.userspace_addr)

    def _set_mem_table(self, table: MemoryTable, fds: tuple[int, ...]) -> _Handled:
        if len(fds) != len(table.regions):
            raise PeerError("bad_mem_table",
                            f"{len(table.regions)} regions but {len(fds)} fds attached")
        maps: list[_Mapping] = []
        try:
            for i, (r, fd) in enumerate(zip(table.regions, fds, strict=True)):
                maps.append(self._map_region(i, r, fd, maps, "bad_mem_table"))
        except PeerFault:
            for m in maps:
                self.ram.discard(m.ram)
            raise
        # The new table replaces the old one as a whole (vhost-user.rst).
        self._unmap_all()
        self._maps = maps
        for i, m in enumerate(maps):
            self.ram.add(m.ram, name=f"vhost-user region {i}", counter="bad_mem_table",
                         what=f"SET_MEM_TABLE region {i} [{m.gpa:#x}, +{m.size:#x})")
        self.counters["mem_tables"] += 1
        # The fds are not needed once mapped (closed as not kept): a mapping keeps the memory.
        return _Handled()

    def _add_mem_reg(self, r: MemoryRegion, fds: tuple[int, ...]) -> _Handled:
        # CONFIGURE_MEM_SLOTS: one region at a time, each with its fd.
        if len(fds) != 1:
            raise PeerError("bad_mem_reg", f"ADD_MEM_REG needs 1 fd, got {len(fds)}")
        if len(self._maps) >= MAX_MEM_SLOTS:
            raise PeerError("bad_mem_reg", f"all {MAX_MEM_SLOTS} memory slots are in use")
        m = self._map_region(len(self._maps), r, fds[0], self._maps, "bad_mem_reg")
        self.ram.add(m.ram, name=f"vhost-user region {m.gpa:#x}", counter="bad_mem_reg",
                     what=f"ADD_MEM_REG [{m.gpa:#x}, +{m.size:#x})")
        self._maps.append(m)
        self.counters["mem_regions_added"] += 1
        return _Handled()

    def _rem_mem_reg(self, r: MemoryRegion, _fds: tuple[int, ...]) -> _Handled:
        # Matched on guest address and size (an fd sent along is closed as unused).
        i = next((i for i, m in enumerate(self._maps)
                  if m.gpa == r.guest_phys_addr and m.size == r.memory_size), None)
        if i is None:
            raise PeerError("bad_mem_reg", f"no region {r.guest_phys_addr:#x}+{r.memory_size:#x} "
                          "to remove")
        m = self._maps.pop(i)
        self.ram.unmap(m.ram)
        self.counters["mem_regions_removed"] += 1
        return _Handled()

    def _set_vring_num(self, s: VringState, _fds: tuple[int, ...]) -> _Handled:
        ring = self._ring(s.index)
        if self.live:
            raise PeerError("ring_change_while_live", f"ring {s.index} size change while running")
        limit = self.dev.queue_max_size(s.index)
        if s.num == 0 or s.num & (s.num - 1) or s.num > limit:
            raise PeerError("bad_vring_num", f"ring {s.index} size {s.num}: must be a power of two "
                          f"<= {limit}")
        ring.num = s.num
        return _Handled()

    def _set_vring_addr(self, a: VringAddr, _fds: tuple[int, ...]) -> _Handled:
        ring = self._ring(a.index)
        if self.live:
            raise PeerError("ring_change_while_live",
                            f"ring {a.index} address change while running")
        if a.flags & 1:
            raise PeerError("vring_log_unsupported", f"ring {a.index} asks for used-ring logging")
        n = ring.num or self.dev.queue_max_size(a.index)
        ring.desc_gpa = self._uaddr_to_gpa(a.desc_user_addr, desc_table_size(n),
                                           "descriptor table")
        ring.avail_gpa = self._uaddr_to_gpa(a.avail_user_addr, avail_ring_size(n),
                                            "available ring")
        ring.used_gpa = self._uaddr_to_gpa(a.used_user_addr, used_ring_size(n), "used ring")
        ring.addr = a
        return _Handled(effects=self._maybe_go_live())

    def _set_vring_base(self, s: VringState, _fds: tuple[int, ...]) -> _Handled:
        ring = self._ring(s.index)
        if s.num > 0xFFFF:
            raise PeerError("bad_vring_base", f"ring {s.index} base {s.num:#x} exceeds 16 bits")
        ring.base = s.num
        return _Handled()

    def _get_vring_base(self, s: VringState, _fds: tuple[int, ...]) -> _Handled:
        ring = self._ring(s.index)
        # vhost-user.rst: GET_VRING_BASE stops the ring; the reply is where to resume.
        base = self._resume_index(s.index)
        ring.started = False
        # A restart hands the ring back enabled again (SET_VRING_ENABLE 1) when it is ready.
        ring.enabled = False
        ring.base = base
        self._reported_base[s.index] = base
        if ring.kick_fd is not None:
            close_quietly(ring.kick_fd)
            ring.kick_fd = None
        self._note_stopped()
        return _Handled(payload=build_vring_state(s.index, base))

    def _set_vring_kick(self, f: VringFile, fds: tuple[int, ...]) -> _Handled:
        return self._set_vring_file(f, fds, "kick_fd")

    def _set_vring_call(self, f: VringFile, fds: tuple[int, ...]) -> _Handled:
        return self._set_vring_file(f, fds, "call_fd")

    def _set_vring_err(self, f: VringFile, fds: tuple[int, ...]) -> _Handled:
        return self._set_vring_file(f, fds, "err_fd")

    def _set_vring_file(self, f: VringFile, fds: tuple[int, ...], attr: str) -> _Handled:
        ring = self._ring(f.index)
        if f.nofd and fds:
            raise PeerError("bad_vring_fd",
                            f"ring {f.index}: NOFD flag set but {len(fds)} fds sent")
        if not f.nofd and len(fds) != 1:
            raise PeerError("bad_vring_fd", f"ring {f.index}: expected 1 fd, got {len(fds)}")
        old = getattr(ring, attr)
        if old is not None:
            close_quietly(old)
        new = None if f.nofd else fds[0]
        setattr(ring, attr, new)
        effects: list[Effect] = []
        if attr == "kick_fd":
            if f.nofd:
                # Polling mode (no kick fd) is not implemented: the ring would never run.
                self.counters["kick_polling_unsupported"] += 1
                log.warning("vhost-user: ring %d has no kick fd (polling mode unsupported)",
                            f.index)
            # vhost-user.rst: a ring starts when its kick fd arrives.
            ring.started = True
            if self.live and self._runnable(ring):
                effects += self.dev.notify(f.index)
            effects += self._maybe_go_live()
        return _Handled(effects=effects, kept_fds=() if new is None else (new,))

    def _set_vring_enable(self, s: VringState, _fds: tuple[int, ...]) -> _Handled:
        ring = self._ring(s.index)
        if s.num not in (0, 1):
            raise PeerError("bad_vring_enable", f"ring {s.index} enable value {s.num}")
        was = ring.enabled
        ring.enabled = bool(s.num)
        effects: list[Effect] = []
        if ring.enabled and not was and self._runnable(ring) and self.live:
            # Buffers may have been queued while the ring was disabled.
            effects += self.dev.notify(s.index)
        effects += self._maybe_go_live()
        return _Handled(effects=effects)

    def _set_backend_req_fd(self, _p: object, fds: tuple[int, ...]) -> _Handled:
        if not self.has_protocol_feature(PF.BACKEND_REQ):
            raise PeerError("backend_req_not_negotiated", "BACKEND_REQ was not negotiated")
        if len(fds) != 1:
            raise PeerError("bad_backend_fd", f"expected 1 fd, got {len(fds)}")
        if self.backend_fd is not None:
            close_quietly(self.backend_fd)
        self.backend_fd = fds[0]
        return _Handled(kept_fds=(fds[0],))

    def _get_config(self, c: ConfigAccess, _fds: tuple[int, ...]) -> _Handled:
        if c.offset + c.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise PeerError("bad_config_access",
                          f"config read {c.offset:#x}+{c.size:#x} "
                          f"beyond {VHOST_USER_MAX_CONFIG_SIZE}")
        have = max(0, min(c.size, self.dev.config_size - c.offset))
        data = self.dev.read_config(c.offset, have) if have else b""
        # Bytes past the device's window read as zero (as a PCI config window would).
        data = bytes(data) + bytes(c.size - have)
        return _Handled(payload=build_config(c.offset, data, c.flags))

    def _set_config(self, c: ConfigAccess, _fds: tuple[int, ...]) -> _Handled:
        if c.flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise PeerError("bad_config_access", f"SET_CONFIG flags {c.flags:#x}")
        if c.offset + c.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise PeerError("bad_config_access",
                          f"config write {c.offset:#x}+{c.size:#x} "
                          f"beyond {VHOST_USER_MAX_CONFIG_SIZE}")
        effects: list[Effect] = []
        for off in DRIVER_CONFIG_FIELDS:
            if not (c.offset <= off and off + 4 <= c.offset + c.size):
                continue
            data = c.data[off - c.offset:off - c.offset + 4]
            if self.dev.status & FEATURES_OK:
                effects += self._write_config_field(off, data)
            else:
                self._pending_config[off] = data
        return _Handled(effects=effects)

    def _set_status(self, value: int, _fds: tuple[int, ...]) -> _Handled:
        if value > 0xFF:
            raise PeerError("bad_status", f"status {value:#x} exceeds 8 bits")
        return _Handled(effects=self._drive_status(value))

    def _get_status(self, _p: object, _fds: tuple[int, ...]) -> _Handled:
        # While stopped the device keeps its DRIVER_OK (it may resume), but the front-end must
        # not read it as running: its add_status() would echo DRIVER_OK back before the rings.
        st = self.dev.status if self.live else self.dev.status & ~DRIVER_OK
        return _Handled(payload=build_u64(st))



_R = VhostUserRequest
_HANDLERS: dict[int, Callable[..., _Handled]] = {
    _R.GET_FEATURES: VhostUserSession._get_features,
    _R.SET_FEATURES: VhostUserSession._set_features,
    _R.SET_OWNER: VhostUserSession._set_owner,
    _R.RESET_OWNER: VhostUserSession._reset_device,
    _R.SET_MEM_TABLE: VhostUserSession._set_mem_table,
    _R.SET_VRING_NUM: VhostUserSession._set_vring_num,
    _R.SET_VRING_ADDR: VhostUserSession._set_vring_addr,
    _R.SET_VRING_BASE: VhostUserSession._set_vring_base,
    _R.GET_VRING_BASE: VhostUserSession._get_vring_base,
    _R.SET_VRING_KICK: VhostUserSession._set_vring_kick,
    _R.SET_VRING_CALL: VhostUserSession._set_vring_call,
    _R.SET_VRING_ERR: VhostUserSession._set_vring_err,
    _R.GET_PROTOCOL_FEATURES: VhostUserSession._get_protocol_features,
    _R.SET_PROTOCOL_FEATURES: VhostUserSession._set_protocol_features,
    _R.GET_QUEUE_NUM: VhostUserSession._get_queue_num,
    _R.SET_VRING_ENABLE: VhostUserSession._set_vring_enable,
    _R.SET_BACKEND_REQ_FD: VhostUserSession._set_backend_req_fd,
    _R.GET_CONFIG: VhostUserSession._get_config,
    _R.SET_CONFIG: VhostUserSession._set_config,
    _R.RESET_DEVICE: VhostUserSession._reset_device,
    _R.GET_MAX_MEM_SLOTS: VhostUserSession._get_max_mem_slots,
    _R.ADD_MEM_REG: VhostUserSession._add_mem_reg,
    _R.REM_MEM_REG: VhostUserSession._rem_mem_reg,
    _R.SET_STATUS: VhostUserSession._set_status,
    _R.GET_STATUS: VhostUserSession._get_status,
}
