"""The free page hint session: QEMU's four hint states and one transition table.

(protocol.md 4.4 and 5.2.)

Theory of operation
-------------------
The host runs hint *rounds*. ``HOST_START`` draws a new command id and publishes it in the
config field ``free_page_hint_cmd_id`` (state REQUESTED). The driver answers with a 4-byte
*start* buffer carrying that id (-> START); from then on its writable buffers are hints for the
round. The round ends with the driver's 4-byte STOP buffer (any out buffer while START), or
with the host's ``HOST_STOP`` (before each dirty-bitmap sync), ``HOST_DONE`` (migration over)
or a new ``HOST_START``, or a device reset.

``HintSession.fire(event)`` looks the (state, event) pair up in ``TRANSITIONS`` and returns the
new state and the ``Act`` flags the device must carry out (publish the config change, apply or
drop hints, report the end of the round...). The session itself does no I/O and knows nothing
about rings; the device classifies each free_page_vq buffer into an event and acts on the flags.

Decisions (documented here because the spec leaves them open)
-------------------------------------------------------------
- Command ids follow QEMU: the counter starts at 0x80000000 and is pre-incremented, so the
  first id is 0x80000001; after 0xFFFFFFFF comes 0x80000000 (protocol.md 4.1).
- D-9 "must not reuse an id before the driver's STOP": when the host asks for a new round while
  the driver has not stopped the current one, we do what QEMU does and draw a new id anyway.
  That is not a *reuse*: ids only increase, so an id comes back only after 2^31 rounds, long
  after any driver STOP. The superseded round is reported with ``HintRoundStopped``.
- The counter is kept across device reset (as QEMU does, where it is migrated state): ids stay
  unique over the device's whole life, so a hint buffer a driver queued before a reset can
  never be mistaken for one of a later round with a recycled id.
- Config reads while START return the current id (spec-faithful, protocol.md 5.2 [ANALYSIS]);
  ``qemu_cmd_id_read=True`` gives QEMU's 0.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from guestmem.units import CmdId
from protocol.balloon import (
    QEMU_CMD_ID_MIN,
    QEMU_FIRST_CMD_ID,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
)

CMD_ID_MAX = 0xFFFFFFFF


class FreePageHintStatus(enum.IntEnum):
    """QEMU's ``free_page_hint_status`` values (protocol.md 5.2)."""

    FREE_PAGE_HINT_S_STOP = 0
    FREE_PAGE_HINT_S_REQUESTED = 1
    FREE_PAGE_HINT_S_START = 2
    FREE_PAGE_HINT_S_DONE = 3


STOP = FreePageHintStatus.FREE_PAGE_HINT_S_STOP
REQUESTED = FreePageHintStatus.FREE_PAGE_HINT_S_REQUESTED
START = FreePageHintStatus.FREE_PAGE_HINT_S_START
DONE = FreePageHintStatus.FREE_PAGE_HINT_S_DONE


class HintEvent(enum.Enum):
    HOST_START = "host asks for a new round"
    HOST_STOP = "host stops hinting (before a bitmap sync)"
    HOST_DONE = "host no longer needs hints (migration over)"
    CMD_CURRENT = "4-byte out buffer equal to the current id"
    CMD_OTHER = "4-byte out buffer with any other value (STOP or a stale id)"
    HINT = "writable hint buffer"
    RESET = "device reset"


class Act(enum.Flag):
    NONE = 0
    NEW_ID = enum.auto()       # draw the next command id (before publishing it)
    PUBLISH = enum.auto()      # config interrupt (the device bumps config_generation whenever
    #                            the field's value changes, with or without this flag: a driver
    #                            STOP ends START silently, as in QEMU)
    END_ROUND = enum.auto()    # the round that was REQUESTED/START is over: HintRoundStopped
    APPLY_HINT = enum.auto()   # the hint belongs to the current round: PagesHinted
    #                            (without it, the hint arrived outside START: used and dropped)
    STALE_CMD = enum.auto()    # an out buffer that changes nothing


_PUB_END = Act.PUBLISH | Act.END_ROUND
_NEW = Act.NEW_ID | Act.PUBLISH

#: The one transition table: (state, event) -> (next state, actions). Every pair is listed.
TRANSITIONS: dict[tuple[FreePageHintStatus, HintEvent], tuple[FreePageHintStatus, Act]] = {
    # The host starts a round from any state; an unfinished round is superseded (D-9 note above).
    (STOP, HintEvent.HOST_START): (REQUESTED, _NEW),
    (REQUESTED, HintEvent.HOST_START): (REQUESTED, _NEW | Act.END_ROUND),
    (START, HintEvent.HOST_START): (REQUESTED, _NEW | Act.END_ROUND),
    (DONE, HintEvent.HOST_START): (REQUESTED, _NEW),
    # QEMU free_page_stop(): anything but STOP -> STOP with a config interrupt (D-8).
    (STOP, HintEvent.HOST_STOP): (STOP, Act.NONE),
    (REQUESTED, HintEvent.HOST_STOP): (STOP, _PUB_END),
    (START, HintEvent.HOST_STOP): (STOP, _PUB_END),
    (DONE, HintEvent.HOST_STOP): (STOP, Act.PUBLISH),
    # QEMU free_page_done(): anything but DONE -> DONE with a config interrupt (D-13).
    (STOP, HintEvent.HOST_DONE): (DONE, Act.PUBLISH),
    (REQUESTED, HintEvent.HOST_DONE): (DONE, _PUB_END),
    (START, HintEvent.HOST_DONE): (DONE, _PUB_END),
    (DONE, HintEvent.HOST_DONE): (DONE, Act.NONE),
    # protocol.md 4.4 rule 3: the matching start opens the round; any out while START ends it.
    (STOP, HintEvent.CMD_CURRENT): (STOP, Act.STALE_CMD),
    (REQUESTED, HintEvent.CMD_CURRENT): (START, Act.NONE),
    (START, HintEvent.CMD_CURRENT): (STOP, Act.END_ROUND),
    (DONE, HintEvent.CMD_CURRENT): (DONE, Act.STALE_CMD),
    (STOP, HintEvent.CMD_OTHER): (STOP, Act.STALE_CMD),
    (REQUESTED, HintEvent.CMD_OTHER): (REQUESTED, Act.STALE_CMD),
    (START, HintEvent.CMD_OTHER): (STOP, Act.END_ROUND),
    (DONE, HintEvent.CMD_OTHER): (DONE, Act.STALE_CMD),
    # Rule 4 / D-10: writable buffers are hints only while START.
    (STOP, HintEvent.HINT): (STOP, Act.NONE),
    (REQUESTED, HintEvent.HINT): (REQUESTED, Act.NONE),
    (START, HintEvent.HINT): (START, Act.APPLY_HINT),
    (DONE, HintEvent.HINT): (DONE, Act.NONE),
    # QEMU device reset: STOP, counter kept, no interrupt (the driver is gone).
    (STOP, HintEvent.RESET): (STOP, Act.NONE),
    (REQUESTED, HintEvent.RESET): (STOP, Act.END_ROUND),
    (START, HintEvent.RESET): (STOP, Act.END_ROUND),
    (DONE, HintEvent.RESET): (STOP, Act.NONE),
}


def next_cmd_id(cmd_id: int) -> CmdId:
    """QEMU's pre-increment with wrap from 0xFFFFFFFF to 0x80000000 (protocol.md 4.1)."""
    return CmdId(QEMU_CMD_ID_MIN if cmd_id >= CMD_ID_MAX else cmd_id + 1)


@dataclass(slots=True)
class HintSessionState:
    """Everything a hint session holds (snapshot/restore by copying this dataclass)."""

    status: FreePageHintStatus = STOP
    cmd_id: CmdId = CmdId(QEMU_FIRST_CMD_ID - 1)  # last id drawn; pre-incremented by NEW_ID
    rounds: int = 0  # ids drawn so far


class HintSession:
    def __init__(self, *, qemu_cmd_id_read: bool = False) -> None:
        self.state = HintSessionState()
        self.qemu_cmd_id_read = qemu_cmd_id_read

    @property
    def status(self) -> FreePageHintStatus:
        return self.state.status

    @property
    def cmd_id(self) -> CmdId:
        return self.state.cmd_id

    def fire(self, event: HintEvent) -> tuple[FreePageHintStatus, FreePageHintStatus, Act]:
        """Apply ``event``; returns (old state, new state, actions). NEW_ID is done here."""
        old = self.state.status
        new, act = TRANSITIONS[(old, event)]
        if act & Act.NEW_ID:
            self.state.cmd_id = next_cmd_id(self.state.cmd_id)
            self.state.rounds += 1
        self.state.status = new
        return old, new, act

    def classify_cmd(self, value: int) -> HintEvent:
        """The event a 4-byte out buffer holding ``value`` is."""
        return HintEvent.CMD_CURRENT if value == self.state.cmd_id else HintEvent.CMD_OTHER

    def config_value(self) -> int:
        """What ``free_page_hint_cmd_id`` reads as now (protocol.md 5.2)."""
        st = self.state.status
        if st == REQUESTED:
            return self.state.cmd_id
        if st == START:
            return VIRTIO_BALLOON_CMD_ID_STOP if self.qemu_cmd_id_read else self.state.cmd_id
        if st == DONE:
            return VIRTIO_BALLOON_CMD_ID_DONE
        return VIRTIO_BALLOON_CMD_ID_STOP
