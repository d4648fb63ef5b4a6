"""The virtio-pci modern common configuration, driven from QEMU's side, for our clients that
reach a virtio-pci function: ``vmsim.vfio_user_client.VfioUserClient`` (over vfio-user
messages) and ``vmsim.qtest.virtio_pci.QtestVirtioPci`` (over qtest, QEMU's own device).

Theory of operation: both clients find the common configuration structure through the PCI
capabilities and then read and write its registers; only how a register access travels differs.
``VirtioPciClient`` holds the register protocol once (features in two 32-bit halves, the status
byte and the config MSI-X vector Linux's ``vp_find_vqs`` sets after FEATURES_OK, queue select,
reset read back to 0, protocol.md 2.2 and 2.4). A subclass supplies ``common_read`` /
``common_write`` and ``fault``, the error it raises for a device that does not behave; queue set
up, notify and device config stay with the subclass (their access paths differ: qtest batches
register writes into one round trip). It is a mixin so that a transport without a socket (a
test calling the PCI function in-process) can use it too.
"""
from __future__ import annotations

from protocol import virtio_pci as vp
from protocol.virtio import DeviceStatus
from vmsim.client_base import DeviceFault

#: How often ``reset`` re-reads the status before giving up (a device answers within one read).
RESET_READS = 1000


class VirtioPciClient:
    """Drives a virtio-pci function's common configuration (module docstring). A mixin: a
    client puts it before its ``QemuRoleClient`` base (or uses it alone, as a test transport
    that calls the PCI function in-process may)."""

    #: The exception raised for a device that does not behave (a subclass may name its own).
    fault: type[Exception] = DeviceFault
    #: The MSI-X vector for config changes (``QemuRoleClient`` sets it).
    config_vector: int

    def common_read(self, off: int, size: int) -> int:
        raise NotImplementedError

    def common_write(self, off: int, size: int, value: int) -> None:
        raise NotImplementedError

    def get_device_features(self) -> int:
        out = 0
        for half in (0, 1):
            self.common_write(vp.COMMON_DFSELECT, 4, half)
            out |= self.common_read(vp.COMMON_DF, 4) << (32 * half)
        return out

    def get_status(self) -> int:
        return self.common_read(vp.COMMON_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common_write(vp.COMMON_STATUS, 1, status & 0xFF)
        if status & DeviceStatus.FEATURES_OK and not status & DeviceStatus.DRIVER_OK:
            # The config vector is set once features are negotiated, as Linux's vp_find_vqs
            # does before the queues.
            self.common_write(vp.COMMON_MSIX, 2, self.config_vector)
            if self.common_read(vp.COMMON_MSIX, 2) != self.config_vector:
                raise self.fault(f"config_msix_vector {self.config_vector} not taken "
                                 "(reads back NO_VECTOR)")

    def config_generation(self) -> int:
        return self.common_read(vp.COMMON_CFGGENERATION, 1)

    def num_queues(self) -> int:
        return self.common_read(vp.COMMON_NUMQ, 2)

    def queue_max_size(self, q: int) -> int:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        return self.common_read(vp.COMMON_Q_SIZE, 2)

    def queue_enabled(self, q: int) -> bool:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        return bool(self.common_read(vp.COMMON_Q_ENABLE, 2))

    def queue_notify_off(self, q: int) -> int:
        """The queue's ``queue_notify_off`` register (selects the queue)."""
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        return self.common_read(vp.COMMON_Q_NOFF, 2)

    def reset_status(self) -> None:
        """virtio reset: write status 0 and wait until it reads back 0 (protocol.md 2.2). A
        subclass's ``reset`` calls this, then forgets its queue and interrupt state."""
        self.common_write(vp.COMMON_STATUS, 1, 0)
        for _ in range(RESET_READS):
            if self.get_status() == 0:
                return
        raise self.fault("device status does not read back 0 after reset")
