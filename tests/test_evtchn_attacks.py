"""Event channels across the service, tried as a hostile domain would, with bystanders.

A bystander pair (A, B) ping-pongs on an interdomain channel; the attacker M
writes raw frames on its own connection (no client-side checks): sends,
unmasks and closes of every port number A and B use (and out of range,
short, long, flagged), binds to their ports, alloc_unbound and status on
their behalf.  Each is refused with event_channel.c's errno or is a no-op
on M's own table; the bystanders' ports keep their state (a port held
masked stays held: M's unmask of that number does not release it), their
events arrive exactly as counted, and M reads no EVENT frame at all.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from xengrant.service import connect
from xengrant.service import protocol as p
from xengrant.service.server import Server

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    tmp = tempfile.mkdtemp(prefix="xg-evatk-")
    srv = Server(os.path.join(tmp, "s.sock"), 32 << 20, log=lambda s: None)
    t = threading.Thread(target=srv.serve_forever, kwargs={"close": False}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.close()
        t.join(30)


def _settle(*doms: Any) -> None:
    for _ in range(2):
        for d in doms:
            d.channel.request(p.MSG_PING)


def _raw(m: Any, mtype: int, payload: bytes, flags: int = 0) -> tuple[int, bytes]:
    """A request from M as raw bytes: (status, body); one-way types get none."""
    if mtype == p.MSG_EVTCHN_UNMASK:
        m.channel.send(mtype, payload)
        return 0, b""
    if flags:
        m.channel._write(p.HEADER.pack(len(payload), mtype, flags, 0), payload, b"")
        return 0, b""
    status, body = m.channel.call(mtype, payload)
    return status, body


def test_a_hostile_domain_cannot_raise_or_read_the_bystanders_events(server: Server) -> None:
    path = server.path
    with connect(path) as a, connect(path) as b, connect(path) as m:
        pa = a.evtchn.bind_unbound_port(b.domid)
        pb = b.evtchn.bind_interdomain(a.domid, pa)
        assert b.evtchn.wait(pb, TIMEOUT) == pb
        frames: list[int] = []
        orig = m.channel.calls._frame

        def count(fr: p.Frame) -> None:
            if fr.type == p.MSG_EVENT:
                frames.append(fr.type)
            orig(fr)

        m.channel.calls._frame = count  # type: ignore[method-assign]
        # A's port held: one event taken (masked), one more held pending
        b.evtchn.notify(pb)
        assert a.evtchn.pending(TIMEOUT) == pa  # masked, not unmasked
        b.evtchn.notify(pb)
        _settle(a, b)
        with server.lock:
            held = server.ev.domains[a.domid].ports[pa]
            assert held.pending and held.masked
            before = dict(server.ev.counters)
            tables = server.ev.snapshot()
        # --- the attack: every port number the bystanders use, and more
        numbers = sorted({0, 1, pa, pb, pa + 1, 4095, 4096, 0xFFFF, 0xFFFFFFFF})
        for port in numbers:
            status, _ = _raw(m, p.MSG_EVTCHN_SEND, p.U32.pack(port))
            assert status == -errno.EINVAL  # M has no such port: not the bystanders'
            _raw(m, p.MSG_EVTCHN_UNMASK, p.U32.pack(port))
            status, _ = _raw(m, p.MSG_EVTCHN_CLOSE, p.U32.pack(port))
            assert status == -errno.EINVAL
            for dom in (a.domid, b.domid):
                status, _ = _raw(m, p.MSG_EVTCHN_BIND_INTERDOMAIN, p.TWO_U32.pack(dom, port))
                assert status == -errno.EINVAL  # interdomain already / not offered to M
                status, _ = _raw(m, p.MSG_EVTCHN_STATUS, p.TWO_U32.pack(dom, port))
                assert status == -errno.EPERM  # another domain's table
        for dom in (a.domid, b.domid):
            status, _ = _raw(m, p.MSG_EVTCHN_ALLOC_UNBOUND, p.TWO_U32.pack(dom, m.domid))
            assert status == -errno.EPERM  # a port of A's, offered to M: dom0's right only
        # malformed: short and long payloads, a posted send of A's port number
        for payload in (b"", b"\1", p.U32.pack(pa) + b"\0"):
            status, _ = _raw(m, p.MSG_EVTCHN_SEND, payload)
            assert status < 0
        _raw(m, p.MSG_EVTCHN_UNMASK, b"\1\2")  # one-way, malformed: ignored
        _raw(m, p.MSG_EVTCHN_SEND, p.U32.pack(pa), flags=p.F_POSTED)
        m.channel.calls.posted[0] = lambda body: None  # its reply (seq 0) is expected
        _settle(a, b, m)
        # --- nothing moved: A's port is still held, nobody was woken, M read nothing
        with server.lock:
            held = server.ev.domains[a.domid].ports[pa]
            assert held.pending and held.masked
            assert dict(server.ev.counters) == before
            assert server.ev.snapshot() == tables
        assert frames == []
        assert list(a.channel.events) == [] and list(b.channel.events) == []
        # --- and the bystanders go on: the held event comes at A's unmask, once
        a.evtchn.unmask(pa)
        assert a.evtchn.wait(pa, TIMEOUT) == pa
        for _ in range(10):
            a.evtchn.notify(pa)
            assert b.evtchn.wait(pb, TIMEOUT) == pb
            b.evtchn.notify(pb)
            assert a.evtchn.wait(pa, TIMEOUT) == pa
        _settle(a, b, m)
        assert frames == [] and list(a.channel.events) == [] and list(b.channel.events) == []
