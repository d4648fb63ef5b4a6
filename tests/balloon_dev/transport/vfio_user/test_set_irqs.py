"""VFIO_USER_DEVICE_SET_IRQS (protocol.md 7.4): MSI-X eventfds, INTx with automask, errors."""
from __future__ import annotations

import errno

import pytest

from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.balloon_dev.transport.vfio_user.client import BAR4, CFG, Client, perform, signalled
from tests.fdutil import eventfd, eventfd_count, fd_is_open

C = vu.Command.DEVICE_SET_IRQS
EVT = vu.VFIO_IRQ_SET_DATA_EVENTFD | vu.VFIO_IRQ_SET_ACTION_TRIGGER
MSIX, INTX = vu.VFIO_PCI_MSIX_IRQ_INDEX, vu.VFIO_PCI_INTX_IRQ_INDEX


def test_msix_vectors_fire_their_eventfds(ram: Client) -> None:
    fds = ram.driver_init(msix=True)
    perform(ram.session.host(lambda d: d.set_target(100)))  # config change -> config vector 0
    acts = perform(ram.session.host(lambda d: d.set_target(200)))
    assert signalled(acts) == ["irq index 2 vector 0"]
    assert eventfd_count(fds[0]) == 2
    assert eventfd_count(fds[1]) == 0


def test_vectors_can_be_set_one_at_a_time_and_deassigned(client: Client) -> None:
    a, b = eventfd(), eventfd()
    client.set_irqs(MSIX, 1, [b])
    client.set_irqs(MSIX, 0, [a])
    st = client.session.irqs[MSIX]
    assert st.enabled and st.fds == [a, b]
    # No fds with DATA_EVENTFD: de-assign (QEMU sends none for "fd -1").
    client.ok(C, vu.build_irq_set(EVT, MSIX, 1, 1))
    assert st.fds == [a, None] and not fd_is_open(b)
    # count 0, DATA_NONE: the whole index off; fds closed.
    client.ok(C, vu.build_irq_set(vu.VFIO_IRQ_SET_DATA_NONE | vu.VFIO_IRQ_SET_ACTION_TRIGGER,
                                  MSIX, 0, 0))
    assert not st.enabled and st.fds == [None, None] and not fd_is_open(a)


def test_replacing_a_vector_closes_the_old_fd(client: Client) -> None:
    a, b = eventfd(), eventfd()
    client.set_irqs(MSIX, 0, [a])
    client.set_irqs(MSIX, 0, [b])
    assert not fd_is_open(a) and client.session.irqs[MSIX].fds[0] == b


def test_loopback_trigger_fires(client: Client) -> None:
    a = eventfd()
    client.set_irqs(MSIX, 0, [a])
    h, _, acts = client.request(C, vu.build_irq_set(
        vu.VFIO_IRQ_SET_DATA_NONE | vu.VFIO_IRQ_SET_ACTION_TRIGGER, MSIX, 0, 1))
    assert eventfd_count(a) == 1
    h, _, acts = client.request(C, vu.build_irq_set(
        vu.VFIO_IRQ_SET_DATA_BOOL | vu.VFIO_IRQ_SET_ACTION_TRIGGER, MSIX, 0, 2) + b"\1\0")
    assert not h.flags & vu.VFIO_USER_F_ERROR
    assert eventfd_count(a) == 1


def test_intx_is_automasked_until_unmask(ram: Client) -> None:
    trig = eventfd()
    ram.set_irqs(INTX, 0, [trig])
    ram.driver_init(msix=False)
    perform(ram.session.host(lambda d: d.set_target(10)))  # ISR |= 2, line up -> one signal
    assert eventfd_count(trig) == 1
    perform(ram.session.host(lambda d: d.set_target(20)))  # still high and masked: no new signal
    assert eventfd_count(trig) == 0
    # The guest's handler reads ISR (clears it, line drops); the client then unmasks.
    assert ram.rd(BAR4, vp.ISR_CFG_OFFSET, 1) == vp.VIRTIO_PCI_ISR_CONFIG
    none_ = vu.VFIO_IRQ_SET_DATA_NONE
    ram.ok(C, vu.build_irq_set(none_ | vu.VFIO_IRQ_SET_ACTION_UNMASK, INTX, 0, 1))
    assert eventfd_count(trig) == 0
    # Line high again while unmasked -> signal; unmask while still high -> signal again.
    perform(ram.session.host(lambda d: d.set_target(30)))
    assert eventfd_count(trig) == 1
    ram.ok(C, vu.build_irq_set(none_ | vu.VFIO_IRQ_SET_ACTION_UNMASK, INTX, 0, 1))
    assert eventfd_count(trig) == 1
    # PCI status bit 3 shows the pending interrupt.
    assert ram.rd(CFG, vp.PCI_STATUS, 2) & vp.PCI_STATUS_INTERRUPT
    ram.ok(C, vu.build_irq_set(none_ | vu.VFIO_IRQ_SET_ACTION_MASK, INTX, 0, 1))
    assert ram.session.irqs[INTX].masked


@pytest.mark.parametrize("payload", [
    vu.build_irq_set(EVT, 5, 0, 1),                                      # bad index
    vu.build_irq_set(EVT, MSIX, 2, 1),                                   # start beyond
    vu.build_irq_set(EVT, MSIX, 1, 2),                                   # range beyond
    vu.build_irq_set(EVT | vu.VFIO_IRQ_SET_DATA_BOOL, MSIX, 0, 1),       # two data types
    vu.build_irq_set(vu.VFIO_IRQ_SET_DATA_EVENTFD, MSIX, 0, 1),          # no action
    vu.build_irq_set(EVT | 0x100, MSIX, 0, 1),                           # unknown flag
    vu.build_irq_set(EVT, MSIX, 0, 1, argsz=8),                          # argsz
    vu.build_irq_set(EVT, MSIX, 0, 1)[:12],                              # short
    vu.build_irq_set(EVT, MSIX, 0, 1) + b"\0\0\0\0",                     # inline data
])
def test_malformed_set_irqs_is_einval_and_fds_closed(client: Client, payload: bytes) -> None:
    fd = eventfd()
    assert client.error(C, payload, [fd]) == errno.EINVAL
    assert not fd_is_open(fd)
    assert client.session.irqs[MSIX].fds == [None, None]


def test_fd_count_must_match(client: Client) -> None:
    a, b, c = eventfd(), eventfd(), eventfd()
    assert client.error(C, vu.build_irq_set(EVT, MSIX, 0, 2), [a, b, c]) == errno.EINVAL
    assert not any(fd_is_open(x) for x in (a, b, c))


def test_msix_cannot_be_masked_through_set_irqs(client: Client) -> None:
    flags = vu.VFIO_IRQ_SET_DATA_NONE | vu.VFIO_IRQ_SET_ACTION_MASK
    assert client.error(C, vu.build_irq_set(flags, MSIX, 0, 1)) == errno.EINVAL


def test_session_close_closes_every_eventfd(client: Client) -> None:
    fds = [eventfd(), eventfd()]
    client.set_irqs(MSIX, 0, fds)
    t = eventfd()
    client.set_irqs(INTX, 0, [t])
    client.session.close()
    assert not any(fd_is_open(x) for x in [*fds, t])
