"""Event channels (sans-IO): event_channel.c's errnos, Linux evtchn delivery."""

from __future__ import annotations

import errno

import pytest

from xengrant.abi import DOMID_SELF
from xengrant.service.evtchn import (
    EventChannels,
    EvtchnError,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)


@pytest.fixture
def ev() -> EventChannels:
    e = EventChannels()
    for d in (0, 1, 2, 3):
        e.add_domain(d)
    return e


def err(fn: object, *args: object) -> int:
    with pytest.raises(EvtchnError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.errno


def test_alloc_bind_notify(ev: EventChannels) -> None:
    p1 = ev.alloc_unbound(1, DOMID_SELF, 2)
    assert p1 == 1  # port 0 is reserved
    assert ev.status(1, DOMID_SELF, p1) == (EVTCHNSTAT_unbound, 2, 0)
    p2, deliveries = ev.bind_interdomain(2, 1, p1)
    assert deliveries == [(2, p2)]  # Xen sets the binder's new port pending
    assert ev.status(1, DOMID_SELF, p1) == (EVTCHNSTAT_interdomain, 2, p2)
    assert ev.status(2, DOMID_SELF, p2) == (EVTCHNSTAT_interdomain, 1, p1)
    assert ev.send(1, p1) == []  # d2's port is still masked from the bind upcall
    assert ev.unmask(2, p2) == [(2, p2)]  # pending while masked: delivered on unmask
    assert ev.unmask(2, p2) == []
    assert ev.send(1, p1) == [(2, p2)]
    assert ev.send(1, p1) == []  # masked until unmasked
    assert ev.unmask(2, p2) == [(2, p2)]
    assert ev.send(2, p2) == [(1, p1)]


def test_bind_checks(ev: EventChannels) -> None:
    p1 = ev.alloc_unbound(1, DOMID_SELF, 2)
    assert err(ev.bind_interdomain, 3, 1, p1) == errno.EINVAL  # offered to d2, not d3
    assert err(ev.bind_interdomain, 2, 1, p1 + 1) == errno.EINVAL
    assert err(ev.bind_interdomain, 2, 1, 99999) == errno.EINVAL
    assert err(ev.bind_interdomain, 2, 7, 1) == errno.ESRCH
    p2, _ = ev.bind_interdomain(2, 1, p1)
    assert err(ev.bind_interdomain, 2, 1, p1) == errno.EINVAL  # not unbound any more
    assert ev.domains[2].in_use() == [p2]  # the failed binds kept no port


def test_self_loop(ev: EventChannels) -> None:
    a = ev.alloc_unbound(1, DOMID_SELF, DOMID_SELF)
    b, _ = ev.bind_interdomain(1, DOMID_SELF, a)
    ev.unmask(1, b)
    assert ev.send(1, b) == [(1, a)]


def test_send_and_close_errors(ev: EventChannels) -> None:
    p1 = ev.alloc_unbound(1, DOMID_SELF, 2)
    assert ev.send(1, p1) == []  # unbound: dropped silently
    assert err(ev.send, 1, p1 + 1) == errno.EINVAL
    assert err(ev.send, 1, 0) == errno.EINVAL
    assert err(ev.send, 1, -1) == errno.EINVAL
    assert err(ev.close, 1, 0) == errno.EINVAL
    assert err(ev.close, 1, 5000) == errno.EINVAL
    assert err(ev.send, 9, 1) == errno.ESRCH
    ev.close(1, p1)
    assert err(ev.close, 1, p1) == errno.EINVAL
    assert ev.status(1, DOMID_SELF, p1) == (EVTCHNSTAT_closed, 0, 0)


def test_close_unbinds_peer(ev: EventChannels) -> None:
    p1 = ev.alloc_unbound(1, DOMID_SELF, 2)
    p2, _ = ev.bind_interdomain(2, 1, p1)
    ev.close(2, p2)
    assert ev.status(1, DOMID_SELF, p1) == (EVTCHNSTAT_unbound, 2, 0)
    p2b, _ = ev.bind_interdomain(2, 1, p1)  # the peer may bind again
    assert ev.destroy_domain(2) == []
    assert ev.status(1, DOMID_SELF, p1) == (EVTCHNSTAT_unbound, 2, 0)
    assert p2b == p2


def test_privilege(ev: EventChannels) -> None:
    assert err(ev.alloc_unbound, 1, 2, 3) == errno.EPERM
    assert err(ev.status, 1, 2, 1) == errno.EPERM
    port = ev.alloc_unbound(0, 2, 3)  # dom0 may make a port for d2
    assert ev.status(0, 2, port) == (EVTCHNSTAT_unbound, 3, 0)
    assert err(ev.alloc_unbound, 0, 9, 1) == errno.ESRCH


def test_enospc() -> None:
    ev = EventChannels(nr_ports=4)
    ev.add_domain(1)
    assert [ev.alloc_unbound(1, DOMID_SELF, 1) for _ in range(3)] == [1, 2, 3]
    assert err(ev.alloc_unbound, 1, DOMID_SELF, 1) == errno.ENOSPC
    ev.close(1, 2)
    assert ev.alloc_unbound(1, DOMID_SELF, 1) == 2


def test_unmask_unknown_is_ignored(ev: EventChannels) -> None:
    assert ev.unmask(1, 77) == [] and ev.unmask(42, 1) == []


def test_redeliver(ev: EventChannels) -> None:
    p1 = ev.alloc_unbound(1, DOMID_SELF, 2)
    p2, _ = ev.bind_interdomain(2, 1, p1)
    ev.domains[2].ports[p2].masked = False
    ev.domains[2].ports[p2].pending = True
    assert ev.redeliver(2) == [(2, p2)]
    assert ev.redeliver(2) == []
    assert ev.snapshot()[1] == [(p1, 3, 2, p2)]
