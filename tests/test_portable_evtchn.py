"""One event-channel suite for every backend of the portable API (xengrant.evtchn.Evtchn).

The tests take an ``evtchn_pair`` fixture: two handles, ``a`` and ``b``, of
domains ``a_dom`` and ``b_dom`` (the same domain on real Xen's dom0, two
domains elsewhere).  Here it runs on EmbeddedXen (in-process) and on the
service; tests_xen/test_portable_xen.py imports these tests and runs them on
/dev/xen/evtchn in a real dom0 with its own fixture.

No test sleeps to synchronise: every wait has a deadline and ends on the
event it waits for; a "nothing came" check is a TimeoutError of a short wait.
"""

from __future__ import annotations

import asyncio
import errno
import select
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xengrant import EventPort
from xengrant.evtchn import Evtchn

#: long enough for anything that must come, under load
TIMEOUT = 30.0
#: how long "nothing comes" is looked for
QUIET = 0.05


@dataclass
class EvtchnPair:
    """Two handles to test with."""

    backend: str
    a: Any
    a_dom: int
    b: Any
    b_dom: int


def _embedded() -> Iterator[EvtchnPair]:
    import xengrant

    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        da, db = xen.create_domain(), xen.create_domain()
        yield EvtchnPair("embedded", da.evtchn, da.domid, db.evtchn, db.domid)


@pytest.fixture(scope="module")
def _service() -> Iterator[str]:
    from service_helpers import Service

    svc = Service()
    try:
        yield svc.path
    finally:
        svc.stop()


@pytest.fixture(params=["embedded", "service"])
def evtchn_pair(request: pytest.FixtureRequest) -> Iterator[EvtchnPair]:
    """Two handles of two domains, on each backend."""
    if request.param == "embedded":
        yield from _embedded()
        return
    from xengrant.service import connect

    path = request.getfixturevalue("_service")
    with connect(path) as da, connect(path) as db:
        yield EvtchnPair("service", da.evtchn, da.domid, db.evtchn, db.domid)


def connect_pair(p: EvtchnPair) -> tuple[int, int]:
    """a offers a port, b binds it; b's bind event is taken.  ``(pa, pb)``."""
    pa = p.a.bind_unbound_port(p.b_dom)
    pb = p.b.bind_interdomain(p.a_dom, pa)
    assert p.b.wait(pb, TIMEOUT) == pb  # Xen sets the binder's port pending
    return pa, pb


def nothing(h: Any, port: int | None = None) -> None:
    """Assert that no event is queued on ``h`` (for ``port``, or any)."""
    with pytest.raises(TimeoutError):
        h.wait(port, QUIET) if port is not None else h.pending(QUIET)


# ------------------------------------------------------------------ tests
def test_handles_are_the_protocol(evtchn_pair: EvtchnPair) -> None:
    assert isinstance(evtchn_pair.a, Evtchn) and isinstance(evtchn_pair.b, Evtchn)


def test_bind_gives_the_binder_one_event(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa = p.a.bind_unbound_port(p.b_dom)
    pb = p.b.bind_interdomain(p.a_dom, pa)
    assert p.b.pending(TIMEOUT) == pb  # evtchn_bind_interdomain: set pending
    p.b.unmask(pb)
    nothing(p.b)
    nothing(p.a)  # the offerer is not told
    p.b.unbind(pb)
    p.a.unbind(pa)


def test_notify_reaches_the_peer_both_ways(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa, pb = connect_pair(p)
    p.a.notify(pa)
    assert p.b.wait(pb, TIMEOUT) == pb
    p.b.notify(pb)
    assert p.a.wait(pa, TIMEOUT) == pa
    nothing(p.a)
    nothing(p.b)
    p.a.unbind(pa)
    p.b.unbind(pb)


def test_a_fired_port_stays_masked_until_unmasked(evtchn_pair: EvtchnPair) -> None:
    """pending() leaves the port masked: notifies meanwhile only set it
    pending, delivered once at the unmask (evtchn_interrupt / evtchn_write)."""
    p = evtchn_pair
    pa, pb = connect_pair(p)
    p.a.notify(pa)
    assert p.b.pending(TIMEOUT) == pb
    p.a.notify(pa)
    p.a.notify(pa)
    nothing(p.b)  # masked: nothing queued
    p.b.unmask(pb)
    assert p.b.pending(TIMEOUT) == pb  # the pending bit, delivered once
    p.b.unmask(pb)
    nothing(p.b)
    p.a.unbind(pa)
    p.b.unbind(pb)


def test_wait_keeps_other_ports_events(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa1, pb1 = connect_pair(p)
    pa2, pb2 = connect_pair(p)
    p.a.notify(pa1)
    p.a.notify(pa2)
    assert p.b.wait(pb2, TIMEOUT) == pb2  # pb1's event is read past and kept
    assert p.b.wait(pb1, TIMEOUT) == pb1
    nothing(p.b)
    for port in (pa1, pa2):
        p.a.unbind(port)
    for port in (pb1, pb2):
        p.b.unbind(port)


def test_waits_time_out_with_timeout_error(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa, pb = connect_pair(p)
    for call in (lambda: p.b.pending(0), lambda: p.b.pending(QUIET),
                 lambda: p.b.wait(pb, 0), lambda: p.b.wait(None, QUIET)):
        with pytest.raises(TimeoutError):
            call()
    with pytest.raises(TimeoutError):
        asyncio.run(p.b.pending_async(QUIET))
    with pytest.raises(TimeoutError):
        asyncio.run(p.b.wait_async(pb, QUIET))
    with EventPort(p.b, pb) as port, pytest.raises(TimeoutError):
        port.wait(QUIET)
    p.a.unbind(pa)


def test_fileno_is_readable_when_an_event_came(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa, pb = connect_pair(p)
    p.a.notify(pa)
    r, _, _ = select.select([p.b.fileno()], [], [], TIMEOUT)
    assert r == [p.b.fileno()]
    assert p.b.pending(0) == pb  # what select saw is there without waiting
    p.b.unmask(pb)
    p.a.unbind(pa)
    p.b.unbind(pb)


def test_async_twins(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa, pb = connect_pair(p)

    async def main() -> list[int]:
        waiter = asyncio.ensure_future(p.b.wait_async(pb, TIMEOUT))
        await asyncio.sleep(0)  # let it wait first (an ordering, not a timing)
        p.a.notify(pa)
        got = [await waiter]
        p.b.notify(pb)
        got.append(await p.a.pending_async(TIMEOUT))
        p.a.unmask(pa)
        return got

    assert asyncio.run(main()) == [pb, pa]
    p.a.unbind(pa)
    p.b.unbind(pb)


def test_errors_name_the_errno(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    pa = p.a.bind_unbound_port(p.b_dom)
    stranger = pa + 1  # in range, never bound by this handle
    for call in (lambda: p.a.notify(stranger), lambda: p.a.unbind(stranger)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.ENOTCONN  # evtchn_ioctl: find_evtchn failed
    with pytest.raises(OSError) as ei:
        p.a.unbind(1 << 20)  # past every port (>= xen_evtchn_nr_channels)
    assert ei.value.errno == errno.EINVAL
    p.a.unmask(stranger)  # evtchn_write ignores it
    with pytest.raises(OSError) as ei:
        p.b.bind_interdomain(p.a_dom, pa + 1)  # not offered
    assert ei.value.errno == errno.EINVAL
    p.a.unbind(pa)
    with pytest.raises(OSError) as ei:
        p.b.bind_interdomain(p.a_dom, pa)  # closed now
    assert ei.value.errno == errno.EINVAL


def test_unbind_leaves_the_peer_unbound(evtchn_pair: EvtchnPair) -> None:
    """evtchn_close: the peer's port goes back to unbound, offered to the
    closer; a notify on it is dropped; the closer may bind it again."""
    p = evtchn_pair
    pa, pb = connect_pair(p)
    p.b.unbind(pb)
    p.a.notify(pa)  # unbound: dropped silently
    nothing(p.b)
    pb2 = p.b.bind_interdomain(p.a_dom, pa)
    assert p.b.wait(pb2, TIMEOUT) == pb2
    p.a.notify(pa)
    assert p.b.wait(pb2, TIMEOUT) == pb2
    p.a.unbind(pa)
    p.b.unbind(pb2)


def test_event_port_context_manager(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    with EventPort.offer(p.a, p.b_dom) as ea:
        with EventPort.bind(p.b, p.a_dom, ea.port) as eb:
            eb.wait(TIMEOUT)  # the bind's own event
            ea.notify()
            eb.wait(TIMEOUT)
            eb.notify()
            ea.wait(TIMEOUT)
            assert asyncio.run(_notify_then_wait(ea, eb)) is None
        assert eb.closed
        with pytest.raises(OSError):
            p.b.unbind(eb.port)  # gone with the block
    with pytest.raises(OSError):
        p.a.notify(ea.port)


async def _notify_then_wait(ea: EventPort, eb: EventPort) -> None:
    ea.notify()
    await eb.wait_async(TIMEOUT)


def test_bind_virq(evtchn_pair: EvtchnPair) -> None:
    p = evtchn_pair
    if p.backend == "linux":
        try:
            port = p.a.bind_virq(12)  # VIRQ_ENOMEM (xen.h): global, dom0's to bind
        except OSError as e:
            assert e.errno == errno.EEXIST  # bound already (evtchn_bind_virq)
        else:
            p.a.unbind(port)
        return
    with pytest.raises(OSError) as ei:
        p.a.bind_virq(1)
    assert ei.value.errno == errno.ENOSYS
