"""Event-channel delivery and coalescing against a tiny model of Xen's 2-level ABI.

The model (:class:`Xen2L`) is written from the C it follows, one function each,
with Xen's two bits per port kept apart from the Linux driver's state:

- xen/common/event_2l.c ``evtchn_2l_set_pending``: test-and-set the pending
  bit; already set -> nothing (no wake); masked -> nothing more; else upcall;
- ``evtchn_2l_unmask``: clear the mask bit; pending -> upcall;
- the upcall as Linux takes it for /dev/xen/evtchn: ``lateeoi_ack_dynirq``
  masks the port and clears its pending bit, ``evtchn_interrupt`` sets
  ``enabled = false`` and queues the port; ``evtchn_write`` (the process's
  unmask) re-enables a port that is not enabled, else does nothing;
- xen/common/event_channel.c for alloc_unbound / bind_interdomain (the new
  local port set pending) / send / close (the peer back to unbound).

Three tests hold the implementations to it:

- a Hypothesis state machine runs random ops on the sans-IO core
  (:class:`~xengrant.evtchn.EventChannels`) and the model, comparing every
  answer, errno, queue and counter;
- a lockstep machine runs the same ops through the portable handles of
  EmbeddedXen domains (in-process) and of service domains (each a connection
  to a :class:`~xengrant.service.Server`), and the model, comparing what each
  handle has queued after every step (a PING per connection makes the
  service's EVENT messages arrive first: no sleeps, no timing);
- counts: N sends to a port that waits for its process wake it once, and once
  more at its unmask, on both backends (counted on the wire for the service).
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import xengrant
from xengrant.evtchn import EventChannels, EvtchnError
from xengrant.service import connect
from xengrant.service import protocol as p
from xengrant.service.server import Server

DOMS = (1, 2, 3)
PORTS = st.integers(min_value=0, max_value=5)
NR = 8  # ports per domain in the model and the core: ENOSPC is reachable


class Xen2L:
    """Xen's 2-level event channels plus Linux's /dev/xen/evtchn, per port.

    ``chan[(d, port)] = (kind, remote_dom, remote_port)``, kind "u" (unbound,
    offered to remote_dom) or "i" (interdomain); ``P``/``M``: Xen's pending and
    mask bits; ``enabled``: the driver's flag; ``ring[d]``: ports queued for d.
    """

    def __init__(self, doms: tuple[int, ...], nr: int = NR) -> None:
        self.nr = nr
        self.doms = set(doms)
        self.chan: dict[tuple[int, int], tuple[str, int, int]] = {}
        self.P: set[tuple[int, int]] = set()
        self.M: set[tuple[int, int]] = set()
        self.disabled: set[tuple[int, int]] = set()  # enabled == False
        self.ring: dict[int, list[int]] = {d: [] for d in doms}
        self.counters = Counter(delivered=0, coalesced=0, held=0)

    # --- event_2l.c
    def set_pending(self, d: int, port: int) -> None:
        key = (d, port)
        if key in self.P:
            self.counters["coalesced"] += 1
            return
        self.P.add(key)
        if key in self.M:
            self.counters["held"] += 1
            return
        self.upcall(d, port)

    def upcall(self, d: int, port: int) -> None:
        # lateeoi_ack_dynirq: mask_evtchn + clear_evtchn; evtchn_interrupt
        self.M.add((d, port))
        self.P.discard((d, port))
        self.disabled.add((d, port))
        self.ring[d].append(port)
        self.counters["delivered"] += 1

    def unmask(self, d: int, port: int) -> None:
        key = (d, port)
        if key not in self.chan or key not in self.disabled:  # evtchn_write
            return
        self.disabled.discard(key)
        self.M.discard(key)  # evtchn_2l_unmask
        if key in self.P:
            self.upcall(d, port)

    # --- event_channel.c
    def _free(self, d: int) -> int:
        for port in range(1, self.nr):
            if (d, port) not in self.chan:
                return port
        raise EvtchnError(errno.ENOSPC, "no free port")

    def alloc_unbound(self, d: int, remote: int) -> int:
        port = self._free(d)
        self.chan[(d, port)] = ("u", remote, 0)
        return port

    def bind_interdomain(self, d: int, rd: int, rp: int) -> int:
        if rd not in self.doms:
            raise EvtchnError(errno.ESRCH, "no domain")
        lport = self._free(d)
        if self.chan.get((rd, rp), ("", -1, 0))[:2] != ("u", d):
            raise EvtchnError(errno.EINVAL, "not unbound for us")
        self.chan[(d, lport)] = ("i", rd, rp)
        self.chan[(rd, rp)] = ("i", d, lport)
        self.set_pending(d, lport)
        return lport

    def send(self, d: int, port: int) -> None:
        c = self.chan.get((d, port))
        if c is None or not 0 < port < self.nr:
            raise EvtchnError(errno.EINVAL, "not bound")
        if c[0] == "i":
            self.set_pending(c[1], c[2])

    def close(self, d: int, port: int) -> None:
        c = self.chan.pop((d, port), None)
        if c is None:
            raise EvtchnError(errno.EINVAL, "not in use")
        if c[0] == "i" and self.chan.get((c[1], c[2]), ("",))[0] == "i":
            self.chan[(c[1], c[2])] = ("u", d, 0)
        for bits in (self.P, self.M, self.disabled):
            bits.discard((d, port))
        self.ring[d] = [x for x in self.ring[d] if x != port]  # unbind drops its events

    def take(self, d: int) -> int | None:
        return self.ring[d].pop(0) if self.ring[d] else None


def _offers(model: Xen2L, d: int) -> list[tuple[int, int]]:
    """``(remote domain, port)`` of the ports offered to ``d`` (bindable)."""
    return sorted((rd, rp) for (rd, rp), c in model.chan.items() if c[:2] == ("u", d))


def _ports(model: Xen2L, d: int) -> list[int]:
    return sorted(port for (dd, port) in model.chan if dd == d)


def _draw_port(data: st.DataObject, model: Xen2L, d: int) -> int:
    """Mostly a port of ``d`` in use, sometimes any."""
    used = _ports(model, d)
    pick: int = data.draw(st.integers(0, 4))
    if used and pick:
        return int(data.draw(st.sampled_from(used)))
    return int(data.draw(PORTS))


def _errno(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except EvtchnError as e:
        return "err", e.errno


# ------------------------------------------------------------ the core alone
class CoreMachine(RuleBasedStateMachine):
    """The sans-IO core and the model, op by op."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Xen2L(DOMS)
        self.core = EventChannels(nr_ports=NR)
        for d in DOMS:
            self.core.add_domain(d)
        self.queues: dict[int, list[int]] = {d: [] for d in DOMS}

    def _deliver(self, deliveries: list[tuple[int, int]]) -> None:
        for d, port in deliveries:
            self.queues[d].append(port)

    @rule(d=st.sampled_from(DOMS), remote=st.sampled_from(DOMS))
    def alloc(self, d: int, remote: int) -> None:
        assert _errno(self.core.alloc_unbound, d, d, remote) == _errno(
            self.model.alloc_unbound, d, remote)

    @rule(d=st.sampled_from(DOMS), data=st.data())
    def bind(self, d: int, data: st.DataObject) -> None:
        offers = _offers(self.model, d)
        pick: int = data.draw(st.integers(0, 4))
        if offers and pick:
            rd, rp = data.draw(st.sampled_from(offers))
        else:
            rd, rp = data.draw(st.sampled_from((*DOMS, 9))), data.draw(PORTS)
        got = _errno(self.core.bind_interdomain, d, rd, rp)
        if got[0] == "ok":
            port, deliveries = got[1]
            self._deliver(deliveries)
            got = ("ok", port)
        assert got == _errno(self.model.bind_interdomain, d, rd, rp)

    @rule(d=st.sampled_from(DOMS), data=st.data(), times=st.integers(1, 3))
    def send(self, d: int, data: st.DataObject, times: int) -> None:
        port = _draw_port(data, self.model, d)
        for _ in range(times):
            got = _errno(self.core.send, d, port)
            if got[0] == "ok":
                self._deliver(got[1])
                got = ("ok", None)
            assert got == _errno(self.model.send, d, port)

    @rule(d=st.sampled_from(DOMS), data=st.data())
    def unmask(self, d: int, data: st.DataObject) -> None:
        port = _draw_port(data, self.model, d)
        self._deliver(self.core.unmask(d, port))
        self.model.unmask(d, port)

    @rule(d=st.sampled_from(DOMS), data=st.data())
    def close(self, d: int, data: st.DataObject) -> None:
        port = _draw_port(data, self.model, d)
        got = _errno(self.core.close, d, port)
        if got[0] == "ok":
            self.queues[d] = [x for x in self.queues[d] if x != port]
        assert got == _errno(self.model.close, d, port)

    @rule(d=st.sampled_from(DOMS))
    def take(self, d: int) -> None:
        want = self.model.take(d)
        got = self.queues[d].pop(0) if self.queues[d] else None
        assert got == want

    @invariant()
    def same(self) -> None:
        assert self.queues == self.model.ring
        assert self.core.counters == self.model.counters
        for (d, port), (kind, rd, rp) in self.model.chan.items():
            state, rdom, rport = self.core.status(d, d, port)
            assert (state, rdom, rport) == ((1, rd, 0) if kind == "u" else (2, rd, rp))


TestCoreAgainstModel = CoreMachine.TestCase
TestCoreAgainstModel.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)


# ------------------------------------------- lockstep: in-process vs service
_SERVERS: dict[str, Server] = {}


def srv_counters(path: str) -> Counter[str]:
    """The service's event-channel counters (its core's), read under its lock."""
    srv = _SERVERS[path]
    with srv.lock:
        return Counter(srv.ev.counters)


@pytest.fixture(scope="module")
def server_path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="xg-evcoal-")
    path = os.path.join(tmp, "s.sock")
    srv = _SERVERS[path] = Server(path, 32 << 20, log=lambda s: None)
    t = threading.Thread(target=srv.serve_forever, kwargs={"close": False}, daemon=True)
    t.start()
    try:
        yield path
    finally:
        srv.stop()
        srv.close()
        t.join(30)


_PATH: list[str] = []


class Lockstep(RuleBasedStateMachine):
    """The same ops through EmbeddedXen's handles, the service's, and the model."""

    def __init__(self) -> None:
        super().__init__()
        self.xen = xengrant.EmbeddedXen(memory=16 << 20)
        self.emb = [self.xen.create_domain() for _ in range(3)]
        self.svc = [connect(_PATH[0]) for _ in range(3)]
        self.model = Xen2L(tuple(range(3)), nr=4096)
        self.bound: dict[int, set[int]] = {i: set() for i in range(3)}

    def teardown(self) -> None:
        for d in self.svc:
            d.close()
        self.xen.close()

    def _both(self, i: int, op: str, *args: Any) -> Any:
        """Run ``op`` on domain i's handle on both backends; the same answer."""
        a = _errno(getattr(self.emb[i].evtchn, op), *args)
        b = _errno(getattr(self.svc[i].evtchn, op), *(self._svc_args(op, args)))
        assert a == b, (op, args, a, b)
        return a

    def _svc_args(self, op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # domain ids are the same here (both start at 1), but say so if not
        if op in ("bind_unbound_port", "bind_interdomain"):
            idx = [d.domid for d in self.emb].index(args[0])
            return (self.svc[idx].domid, *args[1:])
        return args

    @rule(i=st.integers(0, 2), j=st.integers(0, 2))
    def alloc(self, i: int, j: int) -> None:
        got = self._both(i, "bind_unbound_port", self.emb[j].domid)
        assert got == ("ok", self.model.alloc_unbound(i, j))
        self.bound[i].add(got[1])

    @rule(i=st.integers(0, 2), data=st.data())
    def bind(self, i: int, data: st.DataObject) -> None:
        offers = _offers(self.model, i)
        pick: int = data.draw(st.integers(0, 4))
        if offers and pick:
            j, rp = data.draw(st.sampled_from(offers))
        else:
            j, rp = data.draw(st.integers(0, 2)), data.draw(PORTS)
        got = self._both(i, "bind_interdomain", self.emb[j].domid, rp)
        assert got == _errno(self.model.bind_interdomain, i, j, rp)
        if got[0] == "ok":
            self.bound[i].add(got[1])

    @rule(i=st.integers(0, 2), data=st.data(), times=st.integers(1, 3))
    def notify(self, i: int, data: st.DataObject, times: int) -> None:
        port = _draw_port(data, self.model, i)
        for _ in range(times):
            got = self._both(i, "notify", port)
            if port in self.bound[i]:
                assert got == ("ok", None)
                self.model.send(i, port)
            else:
                assert got == ("err", errno.ENOTCONN)

    @rule(i=st.integers(0, 2), data=st.data())
    def unmask(self, i: int, data: st.DataObject) -> None:
        port = _draw_port(data, self.model, i)
        self._both(i, "unmask", port)
        if port in self.bound[i]:
            self.model.unmask(i, port)

    @rule(i=st.integers(0, 2), data=st.data())
    def unbind(self, i: int, data: st.DataObject) -> None:
        port = _draw_port(data, self.model, i)
        got = self._both(i, "unbind", port)
        if port in self.bound[i]:
            assert got == ("ok", None)
            self.model.close(i, port)
            self.bound[i].discard(port)
        else:
            assert got == ("err", errno.ENOTCONN)

    @rule(i=st.integers(0, 2))
    def take(self, i: int) -> None:
        self._settle()
        want = self.model.take(i)
        if want is None:
            return
        assert self.emb[i].evtchn.pending(0) == want
        assert self.svc[i].evtchn.pending(0) == want

    def _settle(self) -> None:
        _settle(*self.svc)

    @invariant()
    def same_queues(self) -> None:
        self._settle()
        for i in range(3):
            assert list(self.emb[i].evtchn._queue) == self.model.ring[i]
            assert list(self.svc[i].channel.events) == self.model.ring[i]


@pytest.mark.usefixtures("server_path")
def test_in_process_and_service_in_lockstep(server_path: str) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    _PATH[:] = [server_path]
    run_state_machine_as_test(Lockstep, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


# ------------------------------------------------------------------ counts
def test_a_waiting_port_is_woken_once_however_many_sends(server_path: str) -> None:
    """100 sends while the peer does not look: one wake (the first send), one
    more at its unmask; the core counts 98 coalesced and 1 held; on the service,
    two EVENT messages on the wire, whatever the timing."""
    # in-process
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        a, b = xen.create_domain(), xen.create_domain()
        pa = a.evtchn.bind_unbound_port(b.domid)
        pb = b.evtchn.bind_interdomain(a.domid, pa)
        assert b.evtchn.wait(pb, 5) == pb  # the bind's event, unmasked
        core = xen.evtchn_hub.core
        before = Counter(core.counters)
        for _ in range(100):
            a.evtchn.notify(pa)
        assert list(b.evtchn._queue) == [pb]
        assert core.counters - before == Counter(delivered=1, coalesced=98, held=1)
        assert b.evtchn.wait(pb, 5) == pb  # take it and unmask: the held one comes
        assert list(b.evtchn._queue) == [pb]
        assert core.counters - before == Counter(delivered=2, coalesced=98, held=1)
    # across the service: count the EVENT frames b's connection reads
    with connect(server_path) as sa, connect(server_path) as sb:
        pa = sa.evtchn.bind_unbound_port(sb.domid)
        pb = sb.evtchn.bind_interdomain(sa.domid, pa)
        assert sb.evtchn.wait(pb, 5) == pb
        _settle(sa, sb)  # its unmask (one-way) is in before a sends
        before = Counter(srv_counters(server_path))
        frames: list[int] = []
        orig = sb.channel.calls._frame

        def count(fr: p.Frame) -> None:
            if fr.type == p.MSG_EVENT:
                frames.append(fr.type)
            orig(fr)

        sb.channel.calls._frame = count  # type: ignore[method-assign]
        for _ in range(100):
            sa.evtchn.notify(pa)
        _settle(sa, sb)
        assert len(frames) == 1 and list(sb.channel.events) == [pb]
        assert srv_counters(server_path) - before == Counter(delivered=1, coalesced=98, held=1)
        assert sb.evtchn.wait(pb, 5) == pb  # unmask: the one held while masked
        _settle(sa, sb)
        assert len(frames) == 2 and list(sb.channel.events) == [pb]
        assert srv_counters(server_path) - before == Counter(delivered=2, coalesced=98, held=1)


def _settle(*doms: Any) -> None:
    """Every EVENT the service sent these connections is read: a PING per
    connection, twice.  Replies come in stream order, but an event raised by
    a message is sent after the replies of the read it came in (the service
    flushes replies before it dispatches events): the second round's
    replies come after it."""
    for _ in range(2):
        for d in doms:
            d.channel.request(p.MSG_PING)
