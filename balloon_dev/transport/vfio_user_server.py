"""The vfio-user server: ``VfioUserSession`` on a unix socket, one client at a time.

Theory of operation: ``connection.DeviceServer`` does the serving (listen mode 0600, accept,
the one-client policy, the message loop, performing outcomes; read its docstring for the
policies). This module adds what is vfio-user's own: a message is a 16-byte header whose size
field (checked by ``protocol.vfio_user.decode_header``) says how much payload follows, and up to
``SERVER_MAX_MSG_FDS`` fds may come with it; each connection gets a fresh ``VfioUserSession``
over the one ``VirtioPciFunction``; a host request while no client is connected changes the
device without interrupting anyone.

The JSON host-control socket is ``balloon_dev.transport.control_server``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from balloon_dev.effects import Effect
from balloon_dev.transport.connection import BUSY_WAIT_S, DeviceServer
from balloon_dev.transport.core import Outcome
from balloon_dev.transport.fdstream import FdStream
from balloon_dev.transport.vfio_user import SERVER_MAX_MSG_FDS, VfioUserSession
from balloon_dev.transport.virtio_pci import IntxLevel, MsixFire, VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu

log = logging.getLogger(__name__)


class VfioUserServer(DeviceServer[VfioUserSession]):
    name = "vfio-user"
    max_fds = SERVER_MAX_MSG_FDS

    def __init__(self, path: str, pci: VirtioPciFunction, mem: GuestMemory, *,
                 on_effects: Callable[[list[Effect]], None] | None = None,
                 busy_wait: float = BUSY_WAIT_S) -> None:
        super().__init__(path, on_effects=on_effects, busy_wait=busy_wait)
        self.path: str = path
        self.pci = pci
        self.mem = mem

    def new_session(self) -> VfioUserSession:
        return VfioUserSession(self.pci, self.mem)

    async def read_message(self, stream: FdStream, fds: list[int]) -> vu.Message:
        header = vu.decode_header(await stream.recv_exact(vu.HEADER_SIZE, fds, first=True))
        payload = await stream.recv_exact(header.payload_size, fds)
        return vu.Message(header, payload, tuple(fds))

    def idle_host(self, call: Callable[[Any], list[Effect]]) -> Outcome:
        # No client: nothing to interrupt; the device still changes state.
        return Outcome(effects=tuple(a for a in self.pci.host(call)
                                     if not isinstance(a, (MsixFire, IntxLevel))))

    def stats(self) -> dict[str, Any]:
        return {
            "server_counters": dict(self.counters),
            "connections": self.connections,
            "pci_counters": dict(self.pci.counters),
            "dma_regions": [[r.gpa, r.size] for r in self.mem.regions],
            "session_counters": self.session_counters(),
            "fds": self.fd_stats(),
        }
