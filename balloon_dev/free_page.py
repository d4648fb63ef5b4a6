"""The device's free page hinting: the free_page_vq's buffers and the host's hint requests.

(protocol.md 4 and 5.4.)

Theory of operation
-------------------
``FreePageHinting`` belongs to one ``BalloonDevice`` and drives its ``HintSession``
(``balloon_dev.hint``: QEMU's four states in one table). Two kinds of input reach it:

- the free_page_vq's chains (``handle``): a chain with a readable descriptor is a command (a
  4-byte command id: the driver's start, or its STOP), judged by the session; a chain of
  writable descriptors only is a hint. Every chain is used with len 0 (protocol.md 4.2), in
  order. Hints are judged as runs: HINT never changes the state, so a run of hint chains needs
  one look-up, and the hints of a run that falls in START go out as one ``PagesHinted`` (cut at
  each command, so hints before a command belong to the state before it). ``handle_batch``
  takes the ring's ``ChainBatch``: a run of plain one-descriptor hints is two array slices and
  its whole pages one vectorised conversion, so a kick costs a few numpy calls whatever its
  size; ``handle`` does the same one ``Chain`` at a time and is the reference the batched path
  is tested against. Hints outside START
  are used and dropped: counted as DR-10 when the driver itself had stopped, else as
  ``hint_outside_round`` (the host closed the round and the driver may not know yet).
- the host's requests (``start``, ``stop``, ``done``, and ``precopy_notify``, QEMU's precopy
  notifier): each is one session event.

``fire`` turns a session transition into effects: ``HintRoundStopped`` when a round ends,
``ConfigChanged`` when the session asks to publish, and a new config generation whenever the
``free_page_hint_cmd_id`` field's value changes, interrupt or not.
"""
from __future__ import annotations

import logging
from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np

from balloon_dev.device_config import DeviceUsageError, Vq, has
from balloon_dev.effects import Effect, HintRoundStopped, PagesHinted, PrecopyEvent, Range
from balloon_dev.hint import START as HINT_START
from balloon_dev.hint import Act, HintEvent, HintSession
from balloon_dev.virtqueue import Chain, ChainBatch
from guestmem.units import whole_pages_in_arrays
from protocol.balloon import (
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    BalloonQueue,
)

if TYPE_CHECKING:
    from balloon_dev.device import BalloonDevice

log = logging.getLogger("balloon_dev.device")


class FreePageHinting:
    def __init__(self, dev: BalloonDevice, session: HintSession) -> None:
        self._dev = dev
        self._count = dev.count
        self._checker = dev.checker
        self.session = session

    def fire(self, event: HintEvent, effects: list[Effect]) -> Act:
        before_val = self.session.config_value()
        before_id = self.session.cmd_id
        _, _, act = self.session.fire(event)
        if act & Act.END_ROUND:
            effects.append(HintRoundStopped(before_id))
        changed = self.session.config_value() != before_val
        if act & Act.PUBLISH:
            self._dev.config_changed(effects)
        elif changed:
            # e.g. the driver's STOP ends START: the field now reads 0, with no interrupt (QEMU
            # sends none), but the generation must still move (protocol.md 2.4).
            self._dev.state.config_generation += 1
        return act

    def handle(self, vq: Vq, chains: list[Chain], effects: list[Effect],
               used: list[tuple[int, int]]) -> None:
        """The chains one at a time (the reference ``handle_batch`` is held to)."""
        # Every element is used with len 0 (protocol.md 4.2), in order.
        used.extend((ch.head, 0) for ch in chains)
        hints: list[Range] = []

        def flush() -> None:
            if hints:
                effects.append(PagesHinted.from_ranges(self.session.cmd_id, hints))
                hints.clear()

        i, n = 0, len(chains)
        while i < n:
            ch = chains[i]
            if ch.error is not None:
                self._dev.malformed(BalloonQueue.FREE_PAGE, ch)
                i += 1
                continue
            if ch.out:
                flush()  # hints before a command belong to the state before it
                self._command(vq, ch, effects)
                i += 1
                continue
            # A run of hint chains: HINT never changes the state, so the run is judged once
            # (a full ring of 1024 hints is one table look-up, not 1024).
            j = i + 1
            while j < n and chains[j].error is None and not chains[j].out:
                j += 1
            run = chains[i:j]
            _, _, act = self.session.fire(HintEvent.HINT)
            if act & Act.APPLY_HINT:
                hints.extend(self._dev.ram_ranges(tuple(r for c in run for r in c.in_)))
            elif not self._checker.hints_outside_round(len(run), ch.head, ranges_hex(ch.in_),
                                                       self.session.status.name):
                # The host closed the round; the driver may not have seen that yet.
                self._count("hint_outside_round", "%d hints from head %d (%s) while %s: dropped",
                            len(run), ch.head, ranges_hex(ch.in_), self.session.status.name,
                            level=logging.INFO, n=len(run))
            i = j
        flush()

    def handle_batch(self, vq: Vq, batch: ChainBatch, effects: list[Effect]) -> None:
        """``handle`` over a ``ChainBatch``: the same decisions, counters, log lines and
        effects, with each run of hints taken as arrays. The caller uses every chain with len
        0, in order (``batch.heads``)."""
        n = len(batch)
        # Runs of hints end at commands (a readable descriptor) and at malformed chains.
        breaks = []
        if batch.walked or not batch.writable.all():  # else: one run of plain hints
            for k in np.flatnonzero(~(batch.plain & batch.writable)).tolist():
                ch = batch.walked.get(k)
                if ch is None or ch.error is not None or ch.out:
                    breaks.append(k)
        walked = sorted(batch.walked)
        pend: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            if pend:
                if len(pend) == 1:
                    a, ln = pend[0]
                else:
                    a = np.concatenate([p[0] for p in pend])
                    ln = np.concatenate([p[1] for p in pend])
                first, count = whole_pages_in_arrays(a, ln)
                effects.append(PagesHinted(self.session.cmd_id, first, count))
                pend.clear()

        i = 0
        for b in [*breaks, n]:
            if i < b:
                self._hint_run(batch, i, b, walked, pend)
            if b == n:
                break
            ch = batch.chain(b)
            if ch.error is not None:
                self._dev.malformed(BalloonQueue.FREE_PAGE, ch)
            else:
                flush()  # hints before a command belong to the state before it
                self._command(vq, ch, effects)
            i = b + 1
        flush()

    def _hint_run(self, batch: ChainBatch, i: int, j: int, walked: list[int],
                  pend: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Chains [i, j) of ``batch``, all hints: judged once (HINT never changes the state)."""
        _, _, act = self.session.fire(HintEvent.HINT)
        if act & Act.APPLY_HINT:
            if bisect_left(walked, i) == bisect_left(walked, j):
                a, ln = batch.addrs[i:j], batch.lens[i:j]
            else:  # a walked chain may hold several buffers: take them in order
                rs = [r for k in range(i, j) for r in batch.chain(k).in_]
                a = np.fromiter((r[0] for r in rs), np.uint64, len(rs))
                ln = np.fromiter((r[1] for r in rs), np.uint64, len(rs))
            keep = self._dev.ram_mask(a, ln)
            if keep is not None:
                a, ln = a[keep], ln[keep]
            if a.size:
                pend.append((a, ln))
            return
        first = batch.chain(i)
        if not self._checker.hints_outside_round(j - i, first.head, ranges_hex(first.in_),
                                                 self.session.status.name):
            # The host closed the round; the driver may not have seen that yet.
            self._count("hint_outside_round", "%d hints from head %d (%s) while %s: dropped",
                        j - i, first.head, ranges_hex(first.in_), self.session.status.name,
                        level=logging.INFO, n=j - i)

    def _command(self, vq: Vq, ch: Chain, effects: list[Effect]) -> None:
        if ch.in_:
            self._count("free_page_mixed_chain", "free_page head %d: command buffer with %d "
                        "writable descriptors (ignored)", ch.head, len(ch.in_))
        if not self._checker.command_length(ch.head, ch.out_len):
            # protocol.md 4.4 rule 2 / DR-9: exactly 4 bytes. Our choice: used, no state change.
            return
        data = vq.read_out(ch, 4)
        if len(data) != 4:
            return  # the buffer vanished since pop; read_out counted it
        value = int.from_bytes(data, "little")
        if value == VIRTIO_BALLOON_CMD_ID_DONE:
            self._count("free_page_cmd_done_from_driver", "free_page head %d: driver sent "
                        "DONE (1), which only the device publishes", ch.head)
        event = self.session.classify_cmd(value)
        was = self.session.status
        act = self.fire(event, effects)
        self._checker.command(
            ch.head, value, opened=was != HINT_START and self.session.status == HINT_START,
            ended=value == VIRTIO_BALLOON_CMD_ID_STOP or bool(act & Act.END_ROUND))
        if act & Act.STALE_CMD and value not in (VIRTIO_BALLOON_CMD_ID_STOP,
                                                 VIRTIO_BALLOON_CMD_ID_DONE):
            # A start for an id the host already replaced: a race, not necessarily an error.
            self._count("free_page_cmd_stale", "free_page head %d: cmd id %#x while %s (current "
                        "%#x) ignored", ch.head, value, self.session.status.name,
                        self.session.cmd_id, level=logging.INFO)

    def _require(self, what: str) -> bool:
        if not has(self._dev.cfg.offered_features, VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            raise DeviceUsageError(f"{what}: the device does not offer FREE_PAGE_HINT")
        if not self._dev.negotiated(VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            log.info("%s: FREE_PAGE_HINT not negotiated; nothing to do", what)
            return False
        return True

    def _host(self, event: HintEvent, what: str) -> list[Effect]:
        effects: list[Effect] = []
        if self._require(what):
            self.fire(event, effects)
        return effects

    def start(self) -> list[Effect]:
        """Start a hint round: a new command id, published with a config interrupt."""
        return self._host(HintEvent.HOST_START, "free_page_start")

    def stop(self) -> list[Effect]:
        """Stop hinting (D-8: whenever hints cannot be used, e.g. before a bitmap sync)."""
        return self._host(HintEvent.HOST_STOP, "free_page_stop")

    def done(self) -> list[Effect]:
        """The host no longer needs the hinted pages (D-13); the driver may free them."""
        return self._host(HintEvent.HOST_DONE, "free_page_done")

    def precopy_notify(self, event: PrecopyEvent, vm_running: bool) -> list[Effect]:
        """QEMU's precopy notifier (protocol.md 5.4)."""
        if not self._dev.negotiated(VIRTIO_BALLOON_F_FREE_PAGE_HINT):  # (negotiated => offered)
            return []
        if event is PrecopyEvent.BEFORE_BITMAP_SYNC:
            return self.stop()
        if event is PrecopyEvent.AFTER_BITMAP_SYNC:
            return self.start() if vm_running else self.done()
        if event is PrecopyEvent.CLEANUP:
            return self.done()
        return []  # SETUP, COMPLETE: nothing (since QEMU's 2020 change)


def ranges_hex(ranges: tuple[Range, ...], limit: int = 4) -> str:
    """The first ``limit`` ranges in hex, for a log line."""
    s = ", ".join(f"[{a:#x}, +{n:#x})" for a, n in ranges[:limit])
    return s + (f", ... ({len(ranges)})" if len(ranges) > limit else "")
