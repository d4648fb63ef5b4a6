"""Real QEMU as a peer without booting a guest: its qtest accelerator, driven from here.

* ``vmsim.qtest.wire`` - the qtest line protocol (``QtestConnection``);
* ``vmsim.qtest.qemu`` - which QEMU (``find_qemu``: the lab's or a given binary) and whether it
  can run under qtest (``QtestUnavailable`` names the missing feature);
* ``vmsim.qtest.machine`` - ``QtestMachine``: q35, RAM in a shared tmpfs file mapped into a
  ``GuestMemory``, QMP, and the qtest write path migration needs (``WriteThrough``);
* ``vmsim.qtest.pci`` - config space through 0xcf8/0xcfc, enumeration, BAR assignment;
* ``vmsim.qtest.virtio_pci`` - ``QtestVirtioPci``, a virtio-pci modern ``VirtioTransport``
  for our guest driver, MSI-X routed to guest memory and polled;
* ``vmsim.qtest.balloon`` - ``QemuBalloon``: QEMU's virtio-balloon-pci with that transport and
  QEMU's host side (target, stats, hint rounds through migration).

docs/interfaces.md ("QEMU under qtest") has the API; docs/qemu-deviations.md what QEMU does
differently from shared/docs/protocol.md.
"""
from vmsim.qtest.balloon import BalloonDeviceOptions, HostUnsupported, QemuBalloon
from vmsim.qtest.machine import QtestMachine, WriteThrough
from vmsim.qtest.qemu import QemuBinary, QtestUnavailable, find_qemu
from vmsim.qtest.virtio_pci import QtestVirtioPci
from vmsim.qtest.wire import QtestCommandFailed, QtestConnection, QtestError

__all__ = ["BalloonDeviceOptions", "HostUnsupported", "QemuBalloon", "QemuBinary",
           "QtestCommandFailed", "QtestConnection", "QtestError", "QtestMachine",
           "QtestUnavailable", "QtestVirtioPci", "WriteThrough", "find_qemu"]
