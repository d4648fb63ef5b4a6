"""Record a QEMU migration stream on its way to the destination and list which guest pages it
carried in which iteration (for ``migrate-check --stream``: where did a lost page's last copy
come from?).

Theory of operation
-------------------
``StreamTap`` listens on a unix socket for the source, connects to the destination's incoming
socket, and copies bytes both ways; what the source sends is also written to a file.

``ram_records`` reads the RAM parts of that file. QEMU's stream is a sequence of sections; the
RAM device's are ``START`` (0x01: section id, "ram", instance, version), then one ``PART``
(0x02) per iteration and one ``END`` (0x03), each followed by a footer (0x7e + section id). A RAM
section's body is records of ``be64 (offset | flags)``: ``MEM_SIZE`` (0x04, the block list),
``ZERO`` (0x02, one fill byte), ``PAGE`` (0x08, 4096 bytes), ``EOS`` (0x10, end of the section),
``CONTINUE`` (0x20, same block as before; otherwise a length byte and the block name follow) and
``MULTIFD_FLUSH`` (0x200, nothing follows). Device states after the RAM ``END`` are not parsed.
Iteration 0 is the set-up section, 1.. the iterations, the last one the stop-and-copy pass.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass

from protocol.errors import EnvironmentFailure

PAGE = 4096
QEMU_VM_FILE_MAGIC = 0x5145564D
SECTION_START, SECTION_PART, SECTION_END, SECTION_FOOTER = 0x01, 0x02, 0x03, 0x7E
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_XBZRLE, F_COMPRESS, F_MULTIFD_FLUSH = 0x40, 0x100, 0x200
_MAX_RECORDS = 1 << 26   # bounds the parse of a hostile or corrupt file


class StreamFormatError(EnvironmentFailure):
    """The recorded stream is not a RAM stream this parser understands."""


@dataclass(frozen=True, slots=True)
class RamRecord:
    iteration: int
    block: str
    offset: int       # byte offset inside the RAM block (guest physical for "mem" below 2.75G)
    zero: bool
    pos: int          # file offset of the page data (PAGE) or the fill byte (ZERO)


def _find_ram_start(data: bytes) -> tuple[int, int]:
    """(offset just after the RAM START header, section id)."""
    needle = b"\x03ram"
    i = data.find(needle)
    while i >= 0:
        hdr = i - 5
        if hdr >= 0 and data[hdr] == SECTION_START:
            sid = struct.unpack_from(">I", data, hdr + 1)[0]
            return i + len(needle) + 8, sid   # skip instance and version
        i = data.find(needle, i + 1)
    raise StreamFormatError("no RAM section in the recorded stream")


def ram_records(path: str) -> list[RamRecord]:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or struct.unpack_from(">I", data, 0)[0] != QEMU_VM_FILE_MAGIC:
        raise StreamFormatError(f"{path} is not a QEMU migration stream")
    pos, sid = _find_ram_start(data)
    out: list[RamRecord] = []
    iteration = 0
    block = ""
    for _ in range(_MAX_RECORDS):
        if pos + 8 > len(data):
            raise StreamFormatError(f"stream ends inside iteration {iteration}")
        hdr = struct.unpack_from(">Q", data, pos)[0]
        pos += 8
        flags, offset = hdr & 0xFFF, hdr & ~0xFFF
        if flags & F_MEM_SIZE:
            left = offset
            while left > 0:
                n = data[pos]
                pos += 1 + n
                left -= struct.unpack_from(">Q", data, pos)[0]
                pos += 8
            continue
        if flags & F_EOS:
            # footer, then the next RAM section (PART or END) or something else: stop there
            if data[pos] == SECTION_FOOTER:
                pos += 5
            if pos < len(data) and data[pos] in (SECTION_PART, SECTION_END) and \
                    struct.unpack_from(">I", data, pos + 1)[0] == sid:
                pos += 5
                iteration += 1
                continue
            return out
        if flags & F_MULTIFD_FLUSH:
            continue
        if flags & (F_XBZRLE | F_COMPRESS):
            raise StreamFormatError(f"record flags {flags:#x}: compression is not parsed")
        if not flags & F_CONTINUE:
            n = data[pos]
            block = data[pos + 1:pos + 1 + n].decode(errors="replace")
            pos += 1 + n
        if flags & F_ZERO:
            out.append(RamRecord(iteration, block, offset, True, pos))
            pos += 1
        elif flags & F_PAGE:
            out.append(RamRecord(iteration, block, offset, False, pos))
            pos += PAGE
        else:
            raise StreamFormatError(f"unknown RAM record flags {flags:#x} at {pos - 8}")
    raise StreamFormatError("too many records")


class StreamTap:
    """A unix-socket proxy between source and destination that records the source's bytes."""

    def __init__(self, listen_path: str, dst_path: str, record_path: str) -> None:
        self.listen_path, self.dst_path, self.record_path = listen_path, dst_path, record_path
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(listen_path)
        self._srv.listen(1)
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        t = threading.Thread(target=self._accept, daemon=True, name="stream-tap")
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        try:
            src, _ = self._srv.accept()
            dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dst.connect(self.dst_path)
        except OSError as e:
            self.error = e
            return
        back = threading.Thread(target=self._pump, args=(dst, src, None), daemon=True)
        back.start()
        self._threads.append(back)
        with open(self.record_path, "wb") as rec:
            self._pump(src, dst, rec)

    def _pump(self, a: socket.socket, b: socket.socket, rec: object) -> None:
        try:
            while chunk := a.recv(1 << 20):
                if rec is not None:
                    rec.write(chunk)  # type: ignore[attr-defined]
                b.sendall(chunk)
        except OSError as e:
            if rec is not None:
                self.error = e
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, timeout: float = 30) -> None:
        for t in self._threads:
            t.join(timeout)
        self._srv.close()
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass
