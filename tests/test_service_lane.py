"""The service client's one-page lane: ``_cext.map_one``, ``_cext.send_unmap_one``
and ``Channel.map_one`` / ``Channel.post_unmap_one``.

The C calls are run against a socket pair answered by hand: the reply is
written before the call (the request then waits, unread, in the peer's
buffer), so no thread and no timing is involved.  The bytes they send are
compared with the struct packers' (``guest/ops.py``, ``service/protocol.py``).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xengrant import _cext, abi
from xengrant.guest.ops import MAP_OP, UNMAP_OP
from xengrant.service import protocol as p
from xengrant.service.client import Channel

HEAD = struct.Struct("<iiI")  # a GNTTAB_OP reply: status, rc, ops length
DELTA = struct.Struct("<Iqqq")  # one p2m entry: count 1, gfn, mfn, type
GFN, REF, DOM, MFN, HANDLE = 0x10_0005, 7, 3, 42, 9
RW = abi.GNTMAP_host_map


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with closing(a), closing(b):
        yield a, b


def map_reply(seq: int, gfn: int = GFN, status: int = 0, mfn: int = MFN, p2mt: int = 1,
              handle: int = HANDLE, nreasons: int = 0) -> bytes:
    op = MAP_OP.pack(gfn << 12, RW, REF, DOM, status, handle, 0)
    body = HEAD.pack(0, 0, MAP_OP.size) + op + DELTA.pack(1, gfn, mfn, p2mt)
    return p.encode(p.MSG_GNTTAB_OP, p.F_REPLY, seq, body + struct.pack("<H", nreasons))


def unmap_reply(seq: int, gfn: int, status: int = 0) -> bytes:
    op = UNMAP_OP.pack(gfn << 12, 0, HANDLE, status)
    body = HEAD.pack(0, 0, UNMAP_OP.size) + op + DELTA.pack(1, gfn, -1, 0) + b"\0\0"
    return p.encode(p.MSG_GNTTAB_OP, p.F_REPLY | p.F_POSTED, seq, body)


def event(port: int) -> bytes:
    return p.encode(p.MSG_EVENT, p.F_ASYNC, 0, p.U32.pack(port))


def map_one(a: socket.socket, seq: int, posted: dict[int, Any], p2m: dict[int, Any],
            freed: list[int], gfn: int = GFN, ref: int = REF, dom: int = DOM,
            lock: Any = None, buf: bytearray | None = None, timeout_ms: int = -1) -> Any:
    buf = bytearray(4096) if buf is None else buf
    return _cext.map_one(a.fileno(), lock, buf, seq, gfn, RW, ref, dom, 0, timeout_ms,
                         posted, p2m, freed)


def request_sent(b: socket.socket) -> bytes:
    return b.recv(4096, socket.MSG_DONTWAIT)


# ------------------------------------------------------------------ map_one
def test_map_one_sends_the_packed_op_and_takes_a_success(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(map_reply(5))
    p2m: dict[int, Any] = {}
    lock = threading.Lock()
    got = map_one(a, 5, {}, p2m, [], lock=lock)
    reply_len = len(map_reply(5))
    assert got == (HANDLE, MFN, 1, reply_len, p.HEADER_SIZE, reply_len - p.HEADER_SIZE, 0)
    assert p2m == {GFN: (MFN, 1)}
    assert request_sent(b) == p.encode(
        p.MSG_GNTTAB_OP, 0, 5,
        p.GNTTAB_REQ.pack(abi.GNTTABOP_map_grant_ref, 1)
        + MAP_OP.pack(GFN << 12, RW, REF, DOM, 0, 0, 0))
    assert not lock.locked()


def test_map_one_does_posted_unmaps_before_the_reply(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    calls: list[bytes] = []
    posted: dict[int, Any] = {3: (100, calls.append), 4: (101, calls.append)}
    p2m: dict[int, Any] = {100: (7, 1), 101: (8, 1), 55: (9, 0)}
    freed: list[int] = []
    first = unmap_reply(3, 100) + unmap_reply(4, 101)
    b.sendall(first + map_reply(5) + event(6))
    handle, _mfn, _t, end, start, length, skip = map_one(a, 5, posted, p2m, freed)
    assert handle == HANDLE and skip == len(first) == start - p.HEADER_SIZE
    assert end == start + length + len(event(6))  # the event is the caller's
    assert posted == {} and freed == [100, 101] and calls == []
    assert p2m == {55: (9, 0), GFN: (MFN, 1)}


@pytest.mark.parametrize("first", ["failed", "callable", "gfn", "event", "unknown"])
def test_map_one_stops_at_what_it_does_not_do(
        pair: tuple[socket.socket, socket.socket], first: str) -> None:
    a, b = pair
    calls: list[bytes] = []
    posted: dict[int, Any] = {3: (100, calls.append)}
    msg = unmap_reply(3, 100)
    if first == "failed":
        msg = unmap_reply(3, 100, abi.GNTST_bad_handle)
    elif first == "callable":
        posted = {3: calls.append}
    elif first == "gfn":  # the reply is for another gfn than the entry's
        msg = unmap_reply(3, 101)
    elif first == "event":
        msg = event(2) + msg
    else:  # a reply nobody posted
        posted = {}
    p2m: dict[int, Any] = {100: (7, 1)}
    freed: list[int] = []
    b.sendall(msg + map_reply(5))
    handle, mfn, _t, end, start, length, skip = map_one(a, 5, dict(posted), p2m, freed)
    # nothing done past the first message it does not do; the map reply left too
    assert skip == 0 and handle == -1 and mfn == -1
    assert (start, length, end) == (len(msg) + p.HEADER_SIZE, end - start, len(msg + map_reply(5)))
    assert p2m == {100: (7, 1)} and freed == [] and calls == []


@pytest.mark.parametrize("bad", [
    dict(status=abi.GNTST_bad_gntref), dict(gfn=GFN + 1), dict(mfn=-1), dict(nreasons=1),
])
def test_map_one_leaves_a_reply_that_is_not_a_success(
        pair: tuple[socket.socket, socket.socket], bad: dict[str, int]) -> None:
    a, b = pair
    msg = map_reply(5, **bad)
    if bad.get("nreasons"):
        msg = p.encode(p.MSG_GNTTAB_OP, p.F_REPLY, 5, msg[p.HEADER_SIZE:] + b"\0")
    b.sendall(msg)
    p2m: dict[int, Any] = {}
    handle, _m, _t, end, start, length, skip = map_one(a, 5, {}, p2m, [])
    assert handle == -1 and p2m == {} and skip == 0
    assert (end, start, length) == (len(msg), p.HEADER_SIZE, len(msg) - p.HEADER_SIZE)


@pytest.mark.parametrize("field", ["gfn", "ref", "dom"])
def test_map_one_sends_nothing_when_a_field_does_not_fit(
        pair: tuple[socket.socket, socket.socket], field: str) -> None:
    a, b = pair
    big = {"gfn": 1 << 52, "ref": 1 << 32, "dom": 1 << 16}[field]
    kw = {field: big}
    assert map_one(a, 5, {}, {}, [], **kw) is None
    with pytest.raises(BlockingIOError):
        request_sent(b)
    assert map_one(a, 5, {}, {}, [], **{field: -1}) is None
    assert map_one(a, 5, {}, {}, [], **{field: 1.0}) is None  # not an int: the struct path says
    with pytest.raises(BlockingIOError):
        request_sent(b)


def test_map_one_reports_a_close_and_a_timeout(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert map_one(a, 5, {}, {}, [], timeout_ms=0)[3:] == (0, -3, 0, 0)
    b.sendall(unmap_reply(3, 100)[:20])
    b.shutdown(socket.SHUT_WR)
    assert map_one(a, 6, {}, {}, [])[3:] == (20, -2, 0, 0)


def test_map_one_raises_oserror_when_it_cannot_send() -> None:
    a, b = socket.socketpair()
    b.close()
    lock = threading.Lock()
    with closing(a), pytest.raises(OSError) as e:
        map_one(a, 5, {}, {}, [], lock=lock)
    assert e.value.errno == errno.EPIPE
    assert not lock.locked()


def test_map_one_checks_its_arguments(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    with pytest.raises(TypeError):
        map_one(a, 5, [], {}, [])  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        _cext.map_one(a.fileno(), None, b"ro", 5, GFN, RW, REF, DOM, 0, 0, {}, {}, [])


# hypothesis: any mix of messages before the reply; C does the longest run of
# posted one-op unmap successes, exactly as the Python model says
KINDS = st.sampled_from(["ok", "failed", "event", "stray"])


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(KINDS, max_size=6), map_ok=st.booleans())
def test_map_one_does_the_leading_unmap_successes(kinds: list[str], map_ok: bool) -> None:
    a, b = socket.socketpair()
    with closing(a), closing(b):
        posted: dict[int, Any] = {}
        p2m: dict[int, Any] = {}
        data = b""
        offsets = []
        for i, kind in enumerate(kinds):
            seq, gfn = 100 + i, 200 + i
            offsets.append(len(data))
            if kind == "event":
                data += event(i)
                continue
            if kind != "stray":
                posted[seq] = (gfn, print)
            p2m[gfn] = (i, 1)
            data += unmap_reply(seq, gfn, 0 if kind in ("ok", "stray") else -1)
        data += map_reply(5, status=0 if map_ok else -1)
        b.sendall(data)
        freed: list[int] = []
        before_posted, before_p2m = dict(posted), dict(p2m)
        got = map_one(a, 5, posted, p2m, freed)
        lead = 0
        while lead < len(kinds) and kinds[lead] == "ok":
            lead += 1
        done = [200 + i for i in range(lead)]
        assert freed == done
        assert posted == {s: e for s, e in before_posted.items() if e[0] not in done}
        expect_p2m = {g: v for g, v in before_p2m.items() if g not in done}
        all_done = lead == len(kinds)
        if all_done and map_ok:
            expect_p2m[GFN] = (MFN, 1)
        assert p2m == expect_p2m
        assert got[0] == (HANDLE if all_done and map_ok else -1)
        assert got[6] == (offsets[lead] if lead < len(kinds) else len(data) - len(map_reply(5)))


# ------------------------------------------------------------ send_unmap_one
def test_send_unmap_one_sends_the_packed_posted_op(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    lock = threading.Lock()
    assert _cext.send_unmap_one(a.fileno(), lock, 77, GFN, HANDLE) is True
    assert request_sent(b) == p.encode(
        p.MSG_GNTTAB_OP, p.F_POSTED, 77,
        p.GNTTAB_REQ.pack(abi.GNTTABOP_unmap_grant_ref, 1) + UNMAP_OP.pack(GFN << 12, 0, HANDLE, 0))
    assert not lock.locked()


@pytest.mark.parametrize("gfn, handle", [(1 << 52, 1), (1, 1 << 32), (-1, 1), (1, -1)])
def test_send_unmap_one_sends_nothing_when_a_field_does_not_fit(
        pair: tuple[socket.socket, socket.socket], gfn: int, handle: int) -> None:
    a, b = pair
    assert _cext.send_unmap_one(a.fileno(), None, 1, gfn, handle) is False
    with pytest.raises(BlockingIOError):
        request_sent(b)


# ------------------------------------------------- the Channel's lane (a fake)
def next_seq(ch: Channel) -> int:
    """The sequence number the channel's next request takes (peeked, not taken)."""
    seq = next(ch._seq)
    ch._seq = iter(range(seq, 1 << 40))  # type: ignore[assignment]
    return seq


def test_channel_lane_maps_and_posts(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    failures: list[bytes] = []
    assert ch.post_unmap_one(100, HANDLE, failures.append)
    unmap_seq = next_seq(ch) - 1
    assert ch._posted == {unmap_seq: (100, failures.append)}
    p2m: dict[int, Any] = {100: (1, 1)}
    seq = next_seq(ch)
    srv.sendall(unmap_reply(unmap_seq, 100) + map_reply(seq) + event(4))
    assert ch.map_one(DOM, REF, GFN, RW, p2m) == (HANDLE, MFN, 1, None, [100])
    assert p2m == {GFN: (MFN, 1)} and not ch._posted and not failures
    assert list(ch.events) == [4] and not ch._leader and ch._decoder.idle
    assert ch.sent == 2


def test_channel_lane_leaves_a_failure_to_python(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    failures: list[bytes] = []
    assert ch.post_unmap_one(100, HANDLE, lambda body: failures.append(body) or None)
    unmap_seq = next_seq(ch) - 1
    seq = next_seq(ch)
    bad = unmap_reply(unmap_seq, 100, abi.GNTST_bad_handle)
    srv.sendall(bad + map_reply(seq))
    p2m: dict[int, Any] = {}
    handle, _m, _t, body, freed = ch.map_one(DOM, REF, GFN, RW, p2m)
    # the posted reply went to its on_reply first; the map reply is the caller's
    assert failures == [bad[p.HEADER_SIZE:]] and handle == -1 and freed == []
    assert body == map_reply(seq)[p.HEADER_SIZE:] and p2m == {}


def test_channel_lane_is_closed_while_another_thread_reads(
        fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    ch._leader = True
    try:
        assert ch.map_one(DOM, REF, GFN, RW, {}) is None
    finally:
        ch._leader = False
    with pytest.raises(BlockingIOError):
        request_sent(srv)  # nothing was sent
    assert ch.sent == 0


def test_channel_lane_leaves_what_follows_the_reply_to_python(
        fake: tuple[Channel, socket.socket]) -> None:
    """A posted unmap's reply that comes after the map's (the service answers in
    request order, so only one posted after the map was sent) is read with it and
    goes to its on_reply, success or not."""
    ch, srv = fake
    seq = next_seq(ch)
    got: list[bytes] = []
    ch._posted[seq + 1] = (100, got.append)  # as post_unmap_one would, after the map
    after = unmap_reply(seq + 1, 100)
    srv.sendall(map_reply(seq) + after)
    p2m: dict[int, Any] = {100: (1, 1)}
    assert ch.map_one(DOM, REF, GFN, RW, p2m) == (HANDLE, MFN, 1, None, [])
    assert got == [after[p.HEADER_SIZE:]] and not ch._posted
    assert p2m == {100: (1, 1), GFN: (MFN, 1)}  # on_reply (here a stand-in) owns gfn 100
