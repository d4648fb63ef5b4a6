"""Host control of a served balloon device: a small QMP-style JSON command set, sans-I/O.

Theory of operation: a ``HostControl`` sits beside a running device. The socket server
(``balloon_dev.transport.control_server``, for either transport) greets
each control client with ``welcome()`` and passes every JSON object it reads to
``execute(obj)``; the returned object is written back. The wire form is one JSON object per
line::

    <- {"QMP": {"version": {"package": "balloon-hint"}, "capabilities": []}}
    -> {"execute": "hint-start"}
    <- {"return": {"cmd-id": 2147483649}}
    -> {"execute": "set-target", "arguments": {"pages": 4096}}
    <- {"return": {}}
    -> {"execute": "nonsense"}
    <- {"error": {"class": "CommandNotFound", "desc": "..."}}

Commands: ``hint-start``, ``hint-stop``, ``hint-done`` (protocol.md 4.1: a new command id, STOP,
DONE), ``set-target`` (``arguments.pages`` -> ``num_pages``; the answer carries a ``warning`` when
the target exceeds the guest's RAM, which the server reports through ``guest_ram_pages``),
``request-stats`` (give the held statistics buffer back to the driver), ``stats`` (device, transport
and session counters, the driver checker's violations, the guest's last statistics and the
hint-round log), ``qmp_capabilities`` (accepted, for QMP clients). A request's ``id`` is echoed in
its answer.

Device calls go through ``host_call(fn)``, which the server provides: it runs ``fn(dev)``,
delivers the interrupts and returns the host effects, which come back here through
``on_effects`` (also called for effects caused by the guest). Every hint round is logged: command
id, hints received, hinted bytes, ranges outside guest RAM (must be none) and ranges that are not
4 MiB-aligned 4 MiB blocks, and the time from the request to the round's STOP. Time is read from
the ``clock`` callable the server passes (wall clock is fine in a transport; this module never
reads one itself).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from balloon_dev.device import BalloonDevice
from balloon_dev.effects import (
    ActualChanged,
    Deflated,
    Effect,
    HintRoundStopped,
    Inflated,
    NeedsReset,
    PagesHinted,
    PagesReported,
    StatsReceived,
)
from guestmem.units import PAGE_SIZE
from protocol.balloon import (
    CFG_ACTUAL,
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    HINT_BLOCK_BYTES,
)
from protocol.errors import PeerFault, UsageError

log = logging.getLogger(__name__)

#: A device request run by the server between two messages: ``fn(dev)`` -> host effects.
DeviceCall = Callable[[BalloonDevice], list[Effect]]
HostCall = Callable[[DeviceCall], list[Effect]]


@dataclass(slots=True)
class HintRound:
    cmd_id: int
    requested_at: float
    hints: int = 0
    hinted_bytes: int = 0
    outside_ram: int = 0
    not_block_aligned: int = 0
    stopped_after_s: float | None = None


class ControlRefused(PeerFault):
    """A control client's request is refused: answered with ``{"error": {"class": qmp_class,
    "desc": ...}}`` (QMP's error classes), counted under ``control_errors``."""

    def __init__(self, qmp_class: str, desc: str) -> None:
        super().__init__(desc, counter="control_errors")
        self.qmp_class = qmp_class
        self.desc = desc


class HostControl:
    def __init__(self, dev: BalloonDevice, host_call: HostCall, clock: Callable[[], float], *,
                 in_guest_ram: Callable[[int, int], bool],
                 extra_stats: Callable[[], dict[str, Any]] | None = None,
                 guest_ram_pages: Callable[[], int] | None = None) -> None:
        self.dev = dev
        self.host_call = host_call
        self.clock = clock
        self.in_guest_ram = in_guest_ram
        self.extra_stats = extra_stats
        self.guest_ram_pages = guest_ram_pages
        self.rounds: list[HintRound] = []
        self._by_id: dict[int, HintRound] = {}
        self.totals = {"inflated_pages": 0, "deflated_pages": 0, "reported_ranges": 0,
                       "reported_bytes": 0, "reported_outside_ram": 0,
                       "stats_buffers": 0, "needs_reset": 0, "hints_outside_rounds": 0}
        self.last_guest_stats: dict[str, int] = {}
        self.last_actual: int | None = None
        #: The control socket's own counters (refusals, accept errors), set by its server.
        self.socket_counters: dict[str, int] | None = None

    # -- wire ------------------------------------------------------------------------------
    @staticmethod
    def welcome() -> dict[str, Any]:
        return {"QMP": {"version": {"package": "balloon-hint"}, "capabilities": []}}

    def execute(self, obj: Any) -> dict[str, Any]:
        rid = obj.get("id") if isinstance(obj, dict) else None
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
                raise ControlRefused("GenericError", 'expected {"execute": NAME, ...}')
            args = obj.get("arguments", {})
            if not isinstance(args, dict):
                raise ControlRefused("GenericError", "arguments must be an object")
            fn = self._commands.get(obj["execute"])
            if fn is None:
                raise ControlRefused("CommandNotFound", f"unknown command {obj['execute']!r}")
            ret: dict[str, Any] = {"return": fn(self, args)}
        except ControlRefused as e:
            log.warning("control command %r failed: %s", obj, e.desc)
            ret = {"error": {"class": e.qmp_class, "desc": e.desc}}
        if rid is not None:
            ret["id"] = rid
        return ret

    # -- effects ---------------------------------------------------------------------------
    def on_effects(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, PagesHinted):
                r = self._by_id.get(e.cmd_id)
                if r is None:
                    self.totals["hints_outside_rounds"] += len(e.ranges)
                    log.warning("hints for cmd_id %#x, which no hint-start asked for", e.cmd_id)
                    continue
                for gpa, length in e.ranges:
                    r.hints += 1
                    r.hinted_bytes += length
                    if not self.in_guest_ram(gpa, length):
                        r.outside_ram += 1
                        log.warning("hint [%#x, +%#x) of round %#x lies outside guest RAM",
                                    gpa, length, e.cmd_id)
                    if length != HINT_BLOCK_BYTES or gpa % HINT_BLOCK_BYTES:
                        r.not_block_aligned += 1
            elif isinstance(e, HintRoundStopped):
                r = self._by_id.get(e.cmd_id)
                if r is not None and r.stopped_after_s is None:
                    r.stopped_after_s = self.clock() - r.requested_at
                    log.info("hint round %#x: %d hints, %d bytes, %d outside RAM, "
                             "%d not 4 MiB blocks, stopped after %.3f s; driver checker: %s",
                             r.cmd_id, r.hints, r.hinted_bytes, r.outside_ram,
                             r.not_block_aligned, r.stopped_after_s,
                             getattr(self.dev, "dr_violations", None) or "no violation")
            elif isinstance(e, Inflated):
                self.totals["inflated_pages"] += len(e.pfns)
            elif isinstance(e, Deflated):
                self.totals["deflated_pages"] += len(e.pfns)
            elif isinstance(e, PagesReported):
                self.totals["reported_ranges"] += len(e.ranges)
                for gpa, length in e.ranges:
                    self.totals["reported_bytes"] += length
                    if not self.in_guest_ram(gpa, length):
                        self.totals["reported_outside_ram"] += 1
                        log.warning("reported range [%#x, +%#x) lies outside guest RAM", gpa,
                                    length)
            elif isinstance(e, StatsReceived):
                self.totals["stats_buffers"] += 1
                self.last_guest_stats = dict(e.stats)
            elif isinstance(e, ActualChanged):
                self.last_actual = e.actual
            elif isinstance(e, NeedsReset):
                self.totals["needs_reset"] += 1
                log.warning("device needs reset: %s", e.reason)

    def _call(self, fn: DeviceCall) -> None:
        try:
            effects = self.host_call(fn)
        except (ValueError, UsageError) as e:  # the device refuses a request it cannot serve
            raise ControlRefused("GenericError", str(e)) from None
        self.on_effects(effects)

    # -- commands --------------------------------------------------------------------------
    def _cfg_u32(self, off: int) -> int | None:
        if self.dev.config_size < off + 4:
            return None
        return int.from_bytes(self.dev.read_config(off, 4), "little")

    def _hint_start(self, args: dict[str, Any]) -> dict[str, Any]:
        t = self.clock()
        self._call(lambda d: d.free_page_start())
        cmd_id = self._cfg_u32(CFG_FREE_PAGE_HINT_CMD_ID)
        if cmd_id is None or cmd_id < 2:
            raise ControlRefused("GenericError", "the device did not publish a command id "
                               "(is FREE_PAGE_HINT offered and the driver ready?)")
        r = HintRound(cmd_id=cmd_id, requested_at=t)
        self.rounds.append(r)
        self._by_id[cmd_id] = r
        return {"cmd-id": cmd_id}

    def _hint_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self._call(lambda d: d.free_page_stop())
        return {}

    def _hint_done(self, args: dict[str, Any]) -> dict[str, Any]:
        self._call(lambda d: d.free_page_done())
        return {}

    def _set_target(self, args: dict[str, Any]) -> dict[str, Any]:
        pages = args.get("pages")
        if not isinstance(pages, int) or isinstance(pages, bool) or not 0 <= pages < 1 << 32:
            raise ControlRefused("GenericError", "set-target needs arguments.pages, 0..2^32-1")
        self._call(lambda d: d.set_target(pages))
        have = self.guest_ram_pages() if self.guest_ram_pages is not None else 0
        if have and pages > have:
            # Accepted (the device takes any 32-bit count), but no driver can inflate more
            # pages than the guest has: say so rather than let the user wait for it.
            return {"warning": f"target {pages} pages ({pages * PAGE_SIZE >> 20} MiB) exceeds "
                               f"the guest's RAM ({have} pages, {have * PAGE_SIZE >> 20} MiB); "
                               "the balloon cannot reach it"}
        return {}

    def _request_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        self._call(lambda d: d.request_stats())
        return {}

    def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self.dev
        out: dict[str, Any] = {
            "status": d.status,
            "device_features": d.device_features,
            "driver_features": d.driver_features,
            "num_pages": self._cfg_u32(CFG_NUM_PAGES),
            "actual": self._cfg_u32(CFG_ACTUAL),
            "device_counters": dict(getattr(d, "counters", {}) or {}),
            "dr_violations": _jsonable(getattr(d, "dr_violations", None)),
            "totals": dict(self.totals),
            "guest_stats": dict(self.last_guest_stats),
            "rounds": [asdict(r) for r in self.rounds],
            # The clock rounds' requested_at are read from (monotonic): ages come from it.
            "clock": self.clock(),
        }
        if self.socket_counters is not None:
            out["control_counters"] = dict(self.socket_counters)
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    _commands: dict[str, Callable[[HostControl, dict[str, Any]], dict[str, Any]]] = {
        "hint-start": _hint_start,
        "hint-stop": _hint_stop,
        "hint-done": _hint_done,
        "set-target": _set_target,
        "request-stats": _request_stats,
        "stats": _stats,
        "qmp_capabilities": _qmp_capabilities,
    }


def _jsonable(x: Any) -> Any:
    """Counters, lists of records, dataclasses: something ``json.dumps`` takes."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    return str(x)
