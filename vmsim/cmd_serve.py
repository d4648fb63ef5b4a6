"""``balloon-hint serve``: run the balloon device for a real QEMU over vfio-user.

Builds a ``BalloonDevice`` over an initially empty ``GuestMemory`` (QEMU's DMA_MAP messages map
guest RAM into it), wraps it in the virtio-pci function and serves it on the vfio-user socket
the user names, with the JSON host-control socket beside it (``balloon-hint ctl``). Prints the
QEMU options that connect to it, then serves until SIGINT or SIGTERM, which end it with one line,
both sockets removed and the status 128 + the signal's number (130, 143). With ``--vhost-user
PATH`` the same device is served to QEMU's generic vhost-user front-end instead (guest RAM
arrives with SET_MEM_TABLE; ``balloon_dev/transport/vhost_user_server.py``).

Refused before anything is created (usage errors, exit 2): an empty socket path, and a control
socket on the device socket's path. A socket path where a server already listens is refused
with exit 1 (``unixsock.SocketInUse``): taking it over would leave that server unreachable.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol.errors import UsageError
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    feature_mask,
)

# The device, the transports and trio are imported where they are used: `serve --help` needs
# none of them (vmsim.cli).
if TYPE_CHECKING:
    from balloon_dev.control import HostControl
    from balloon_dev.device import BalloonDevice
    from balloon_dev.effects import Effect
    from balloon_dev.transport.core import DeviceCore
    from balloon_dev.transport.vfio_user_server import VfioUserServer
    from balloon_dev.transport.vhost_user_server import VhostUserServer
    from guestmem import GuestMemory

    #: A device server of either transport.
    Server = VfioUserServer | VhostUserServer

HELP = ("serve the balloon device to QEMU over vfio-user or vhost-user (prints the QEMU options "
        "to use)")

log = logging.getLogger(__name__)

_GENERIC = {"VERSION_1": VIRTIO_F_VERSION_1, "RING_EVENT_IDX": VIRTIO_F_RING_EVENT_IDX,
            "RING_INDIRECT_DESC": VIRTIO_F_RING_INDIRECT_DESC,
            # Not in the default set (QEMU's packed=off default); offered only when listed.
            "RING_PACKED": VIRTIO_F_RING_PACKED}


def parse_features(text: str | None) -> int:
    """``STATS_VQ,FREE_PAGE_HINT,...`` -> offered feature mask (VERSION_1 always added).
    Raises ``UsageError`` for a name it does not know."""
    from balloon_dev.device import DEFAULT_OFFERED_FEATURES
    from protocol.balloon import BALLOON_FEATURE_NAMES

    if text is None:
        return DEFAULT_OFFERED_FEATURES
    by_name = {v.split("(")[0]: k for k, v in BALLOON_FEATURE_NAMES.items()}
    by_name.update(_GENERIC)
    mask = feature_mask(VIRTIO_F_VERSION_1)
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name.removeprefix("VIRTIO_BALLOON_F_").removeprefix("VIRTIO_F_")
        if name not in by_name:
            raise UsageError(f"--features: unknown feature {name!r} (known: "
                             f"{', '.join(sorted(by_name))})")
        mask |= 1 << by_name[name]
    return mask


def qemu_options(path: str, ram: str = "1G") -> list[str]:
    dev = json.dumps({"driver": "vfio-user-pci", "id": "vfu0",
                      "socket": {"type": "unix", "path": path}}, separators=(",", ":"))
    return ["-object", f"memory-backend-memfd,id=mem,size={ram},share=on",
            "-machine", "q35,memory-backend=mem", "-device", dev]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    transport = parser.add_mutually_exclusive_group(required=True)
    transport.add_argument("--vfio-user", metavar="PATH",
                           help="unix socket to create (mode 0600) for QEMU's vfio-user-pci")
    # vhost-user (balloon_dev/transport/vhost_user_server.py): for QEMU's generic
    # vhost-user-test-device-pci front-end (protocol.md 8.5).
    transport.add_argument("--vhost-user", metavar="PATH",
                           help="unix socket to create (mode 0600) for QEMU's "
                           "vhost-user-test-device-pci (virtio-id=5)")
    parser.add_argument("--features", metavar="LIST", default=None,
                        help="comma-separated features to offer, e.g. "
                        "STATS_VQ,FREE_PAGE_HINT,PAGE_POISON (default: the device's default set)")
    parser.add_argument("--control", metavar="PATH", default=None,
                        help="host-control socket (default: PATH.ctl)")
    parser.add_argument("--msix-vectors", type=int, default=2,
                        help="MSI-X table size (default: %(default)s, as QEMU's virtio-balloon)")


def check_paths(args: argparse.Namespace) -> None:
    """Usage errors in the socket paths: an empty one, or the control socket on the device's."""
    for opt, value in (("--vfio-user", args.vfio_user), ("--vhost-user", args.vhost_user),
                       ("--control", args.control)):
        if value is not None and not value.strip():
            raise UsageError(f"{opt}: the socket path is empty")
    device = args.vfio_user if args.vfio_user is not None else args.vhost_user
    if args.control is not None and os.path.abspath(args.control) == os.path.abspath(device):
        raise UsageError(f"--control {args.control}: the same path as the device socket; the "
                         "control socket needs its own (default: PATH.ctl)")


def build(args: argparse.Namespace) -> tuple[Server, HostControl, str]:
    check_paths(args)
    if args.vhost_user is not None:
        return build_vhost_user(args)
    from balloon_dev.device import BalloonDevice, DeviceConfig
    from balloon_dev.transport.vfio_user_server import VfioUserServer
    from balloon_dev.transport.virtio_pci import VirtioPciFunction
    from guestmem import GuestMemory

    mem = GuestMemory()
    dev = BalloonDevice(mem, DeviceConfig(offered_features=parse_features(args.features)))
    pci = VirtioPciFunction(dev, msix_vectors=args.msix_vectors)
    server, control = _with_control(
        dev, mem, lambda on_effects: VfioUserServer(args.vfio_user, pci, mem,
                                                    on_effects=on_effects))
    return server, control, args.control or f"{args.vfio_user}.ctl"


def _with_control(dev: BalloonDevice, mem: GuestMemory,
                  make_server: Callable[[Callable[[list[Effect]], None]], Server]
                  ) -> tuple[Server, HostControl]:
    """The server ``make_server(on_effects)`` builds, and the host control over it. The server
    needs the control's effect handler and the control needs the server's ``host_call``, so
    the handler looks the control up when effects arrive (after both exist)."""
    from balloon_dev.control import HostControl
    from balloon_dev.transport.control_server import wall_clock

    holder: list[HostControl] = []

    def on_effects(effects: list[Effect]) -> None:
        holder[0].on_effects(effects)

    server = make_server(on_effects)
    holder.append(HostControl(dev, server.host_call, wall_clock, in_guest_ram=mem.contains,
                              extra_stats=server.stats,
                              guest_ram_pages=lambda: mem_pages(mem)))
    return server, holder[0]


def mem_pages(mem: GuestMemory) -> int:
    """Pages of guest RAM the peer has mapped for the device (0 before it has)."""
    from guestmem.units import PAGE_SIZE

    return sum(r.size for r in mem.regions) // PAGE_SIZE


#: QEMU's generic vhost-user front-end gives every ring one size (`vq_size`), so the device's
#: queues are all this size in vhost-user mode (the reporting queue too: Linux needs >= 32).
VHOST_USER_VQ_SIZE = 128


def vhost_user_qemu_options(path: str, dev: DeviceCore, ram: str = "1G") -> list[str]:
    """QEMU 11.1's generic front-end: num_vqs must equal the device's compacted queue count and
    config_size its config window (protocol.md 3.3, 8.5)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={ram},share=on",
            "-machine", "q35,memory-backend=mem", "-chardev", f"socket,id=vb,path={path}",
            "-device", f"vhost-user-test-device-pci,chardev=vb,virtio-id=5,"
            f"num_vqs={dev.num_queues},vq_size={VHOST_USER_VQ_SIZE},config_size={dev.config_size}"]


def build_vhost_user(args: argparse.Namespace) -> tuple[Server, HostControl, str]:
    from balloon_dev.device import BalloonDevice, DeviceConfig
    from balloon_dev.transport.vhost_user_server import VhostUserServer
    from guestmem import GuestMemory

    features = parse_features(args.features)
    if features & feature_mask(VIRTIO_F_RING_PACKED):
        # The vhost-user ring base (GET/SET_VRING_BASE) of a packed ring carries wrap counters
        # our vhost-user transport does not handle yet.
        raise UsageError("--features RING_PACKED: served over --vfio-user only")
    mem = GuestMemory()
    dev = BalloonDevice(mem, DeviceConfig(offered_features=features,
                                          queue_sizes=(VHOST_USER_VQ_SIZE,) * 5))
    server, control = _with_control(
        dev, mem, lambda on_effects: VhostUserServer(dev, mem, args.vhost_user,
                                                     on_effects=on_effects))
    return server, control, args.control or f"{args.vhost_user}.ctl"


#: The signals that end ``serve``: the exit status is 128 + the signal's number (130, 143).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _main(server: Server, control: HostControl, ctl_path: str) -> int | None:
    """Serve until a stop signal; returns its number. Both sockets are removed on the way out
    (the servers' own ``finally``)."""
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, server, control, ctl_path)
            async for signum in signals:
                nursery.cancel_scope.cancel()
                return int(signum)
    return None


async def _serve(server: Server, control: HostControl, ctl_path: str) -> None:
    import trio

    from balloon_dev.transport.control_server import serve_control
    from balloon_dev.transport.vhost_user_server import VhostUserServer

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, ctl_path, control)
        await nursery.start(server.run)
        if isinstance(server, VhostUserServer):
            name, opts = "vhost-user", vhost_user_qemu_options(str(server.path), server.dev)
        else:
            name, opts = "vfio-user", qemu_options(str(server.path))
        print(f"balloon-hint: serving virtio-balloon over {name}", flush=True)
        print(f"  {name} socket: {server.path}", flush=True)
        print(f"  control socket:   {ctl_path}  (balloon-hint ctl {ctl_path} stats)", flush=True)
        print("  QEMU options:", " ".join(
            f"'{o}'" if o.startswith("{") else o for o in opts), flush=True)
        # The lab's machine defines the memory backend itself (docs/qemu-lab.md).
        print(f"  in the QEMU lab:  scripts/qemu-lab shell --device {name}:{server.path}",
              flush=True)


def _startup_error(e: BaseException) -> OSError | None:
    """The first OSError in ``e`` (trio wraps errors of nursery tasks in exception groups):
    what both servers raise for a socket path they cannot create (``FileExistsError`` for a
    file in the way, ``FileNotFoundError`` for a missing folder; balloon_dev.transport.unixsock)."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            if (found := _startup_error(sub)) is not None:
                return found
    return None


def run(args: argparse.Namespace) -> int:
    import trio

    try:
        server, control, ctl_path = build(args)
    except ValueError as e:  # the device refuses its configuration: a bad option value
        raise UsageError(str(e)) from None
    try:
        signum = trio.run(_main, server, control, ctl_path)
    except KeyboardInterrupt:  # before the signal receiver was installed
        signum = signal.SIGINT
    except (OSError, BaseExceptionGroup) as e:
        # A socket path that cannot be created (missing folder, a file in the way, ...): say
        # which sockets, not a traceback. Anything else is a bug and keeps its traceback.
        err = _startup_error(e)
        if err is None:
            raise
        print(f"serve: cannot serve on {server.path} (control {ctl_path}): "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if signum is None:
        return 0
    print(f"balloon-hint serve: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + int(signum)
