"""The service client's unmask rides the next message (EventChannelClient.unmask).

What is checked, by counting and by bytes, never by timing (a TimeoutError of
a generous wait is how a lost wake-up would show):

- after ``wait``, the unmask and the notify that answers go out in one write;
- nothing is lost while it is owed: the port is held pending by the service
  and delivered once the unmask is in;
- another thread waiting for events, or a ``fileno()`` asked for, makes it go
  at once (a sleeper must not depend on a message nobody sends);
- an unmask owed for a port being unbound is dropped, and no stale event for
  that port is left queued.
"""

from __future__ import annotations

import os
import select
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from xengrant.service import connect
from xengrant.service import protocol as p
from xengrant.service.server import Server

TIMEOUT = 30.0


_SERVERS: dict[str, Server] = {}


@pytest.fixture(scope="module")
def path() -> Iterator[str]:
    """A service in a thread of this process (its core's counters can be read)."""
    tmp = tempfile.mkdtemp(prefix="xg-unmask-")
    sock = os.path.join(tmp, "s.sock")
    srv = _SERVERS[sock] = Server(sock, 32 << 20, log=lambda s: None)
    t = threading.Thread(target=srv.serve_forever, kwargs={"close": False}, daemon=True)
    t.start()
    try:
        yield sock
    finally:
        srv.stop()
        srv.close()
        t.join(30)


def delivered(path: str) -> int:
    srv = _SERVERS[path]
    with srv.lock:
        return int(srv.ev.counters["delivered"])


def _pair(path: str) -> tuple[Any, Any, int, int]:
    a, b = connect(path), connect(path)
    pa = a.evtchn.bind_unbound_port(b.domid)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    assert b.evtchn.wait(pb, TIMEOUT) == pb  # the bind's event
    return a, b, pa, pb


def _settle(*doms: Any) -> None:
    for _ in range(2):
        for d in doms:
            d.channel.request(p.MSG_PING)


def test_the_unmask_rides_the_notify(path: str) -> None:
    a, b, pa, pb = _pair(path)
    with a, b:
        for _ in range(20):
            a.evtchn.notify(pa)
            assert b.evtchn.wait(pb, TIMEOUT) == pb
            sent = b.channel.sent
            b.evtchn.notify(pb)  # the unmask goes in front of it
            assert b.channel.sent == sent + 1
            assert not b.channel._owed
            assert a.evtchn.wait(pa, TIMEOUT) == pa


def test_an_event_that_comes_while_the_unmask_is_owed_is_held_then_delivered(
    path: str,
) -> None:
    a, b, pa, pb = _pair(path)
    with a, b:
        a.evtchn.notify(pa)
        assert b.evtchn.wait(pb, TIMEOUT) == pb  # unmask owed
        assert b.channel._owed
        for _ in range(5):
            a.evtchn.notify(pa)
        a.channel.request(p.MSG_PING)  # a's sends are in: b's port is held pending
        assert list(b.channel.events) == []
        # the next wait sends what is owed first; the held event comes, once
        assert b.evtchn.wait(pb, TIMEOUT) == pb
        _settle(a, b)
        assert list(b.channel.events) == []


def test_another_thread_waiting_gets_the_unmask_at_once(path: str) -> None:
    """Two threads wait on one port; each event wakes one of them.  The thread
    that took the first must send its unmask at once, or the second sleeps
    while the second event is held pending for an unmask nobody sends."""
    a, b, pa, pb = _pair(path)
    with a, b:
        got: list[int] = []
        errors: list[BaseException] = []
        first = threading.Event()

        def waiter() -> None:
            try:
                got.append(b.evtchn.wait(pb, 10.0))
                first.set()
            except BaseException as e:
                errors.append(e)
                first.set()

        threads = [threading.Thread(target=waiter) for _ in range(2)]
        for t in threads:
            t.start()
        a.evtchn.notify(pa)
        assert first.wait(TIMEOUT)  # one thread has the first event
        # the second may come before or after that thread's unmask: either way
        # it is delivered once the unmask is in, and the unmask must go
        a.evtchn.notify(pa)
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        assert got == [pb, pb]


def test_fileno_sends_what_is_owed_and_then_unmasks_at_once(path: str) -> None:
    a, b, pa, pb = _pair(path)
    with a, b:
        a.evtchn.notify(pa)
        assert b.evtchn.wait(pb, TIMEOUT) == pb
        assert b.channel._owed
        fd = b.evtchn.fileno()
        assert not b.channel._owed  # gone out: a select below can be woken
        a.evtchn.notify(pa)
        r, _, _ = select.select([fd], [], [], TIMEOUT)
        assert r == [fd]
        assert b.evtchn.pending(TIMEOUT) == pb
        b.evtchn.unmask(pb)
        assert not b.channel._owed  # at once from now on


def test_unbind_drops_an_owed_unmask_and_leaves_no_stale_event(path: str) -> None:
    a, b, pa, pb = _pair(path)
    with a, b:
        a.evtchn.notify(pa)
        assert b.evtchn.wait(pb, TIMEOUT) == pb
        a.evtchn.notify(pa)  # held pending: the unmask would deliver it
        a.channel.request(p.MSG_PING)
        before = delivered(path)
        b.evtchn.unbind(pb)
        assert not b.channel._owed
        _settle(a, b)
        assert list(b.channel.events) == []
        assert delivered(path) == before  # the unmask never went: nothing delivered
