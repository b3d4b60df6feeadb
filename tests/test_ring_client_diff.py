"""The request ring's client side: the C I/O (``_ring_client.c``) held to the Python
(``service/ringio.py``), and what the responses mean (``frontring.decide``).

- each I/O call, C and Python, on a page in this process: the slots it
  writes, the raw response slots it hands back, a bogus ``rsp_prod``
  (nothing read), a hang-up, a timeout, a full ring, a value that does not
  fit -- the same results and the same page from both;
- :func:`frontring.decide` on its own: each response the service sends, and
  each it never sends (EBADMSG);
- a differential test (hypothesis): the same sequence of one-page maps,
  posted unmaps and drains driven through :class:`RingFront` twice, once
  with ``frontring.C_PATHS`` on and once off (the one switch), against a
  service that answers each request as drawn -- correctly, on the socket,
  or hostile (a failed status, a stranger's id, a bad kind, garbage, a map
  without a frame, an unmap of another gfn, ``rsp_prod`` pushed past the
  requests, a hang-up).  The page's bytes, every result or error (type,
  errno, text), and the client's state (posted requests, p2m mirror, holes,
  the connection's error) must be identical.  The service is played by a
  thread that answers only once the client sleeps (``rsp_event`` set), so
  both runs see the same page at the same points; nothing sleeps or times.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compat
from ring_page import RingPage
from xengrant import _cext, abi
from xengrant.guest.ops import MAP_OP, UNMAP_OP
from xengrant.service import frontring, ringio
from xengrant.service import ring as r
from xengrant.service.calls import Call, Calls
from xengrant.service.errors import ServiceError
from xengrant.service.frontring import RingFront, decide

GFN, REF, DOM, HANDLE, MFN = 0x10_0005, 7, 3, 9, 42
RW = abi.GNTMAP_host_map
MAP, UNMAP = abi.GNTTABOP_map_grant_ref, abi.GNTTABOP_unmap_grant_ref
IOS = [pytest.param(_cext, id="C"), pytest.param(ringio, id="python")]


class Page(RingPage):
    """:class:`ring_page.RingPage` with what the differential test reads and writes."""

    def idx(self, i: int) -> int:
        v: int = struct.unpack_from("<I", self.mem, 4 * i)[0]
        return v

    def put_slot(self, idx: int, data: bytes) -> None:
        """The whole slot: ``data`` padded with zeros (cut at the slot's size)."""
        super().put_slot(idx, data.ljust(r.RING_SLOT, b"\0")[: r.RING_SLOT])

    def set_rsp_prod(self, v: int) -> None:
        struct.pack_into("<I", self.mem, 8, v & 0xFFFFFFFF)


@pytest.fixture
def page() -> Iterator[Page]:
    pg = Page()
    try:
        yield pg
    finally:
        pg.close()


def rsp(seq: int, cmd: int, kind: int = r.RSP_DONE, op: bytes = b"", mfn: int = -1,
        p2mt: int = 0) -> bytes:
    """A response slot as the service writes it."""
    return (r.SLOT_HEAD.pack(seq, cmd, kind) + op.ljust(32, b"\0") + r.SLOT_P2M.pack(mfn, p2mt)
            + bytes(8))


def map_done(seq: int, gfn: int, handle: int = HANDLE, mfn: int = MFN, status: int = 0) -> bytes:
    return rsp(seq, MAP, op=MAP_OP.pack(gfn << 12, RW, REF, DOM, status, handle, max(mfn, 0) << 12),
               mfn=mfn, p2mt=1)


def unmap_done(seq: int, gfn: int, status: int = 0) -> bytes:
    return rsp(seq, UNMAP, op=UNMAP_OP.pack(gfn << 12, 0, HANDLE, status))


# ------------------------------------------------------------ the I/O calls
@pytest.mark.parametrize("io", IOS)
def test_posts_write_the_same_slots(page: Page, io: Any) -> None:
    assert io.ring_post_map(page.mem, page.front, threading.Lock(), page.svc_kick, 5, GFN, RW,
                            REF, DOM) == 1
    assert page.slot(0) == struct.pack("<IHH", 5, MAP, 0) + MAP_OP.pack(
        GFN << 12, RW, REF, DOM, 0, 0, 0) + bytes(24)
    assert io.ring_post_unmap(page.mem, page.front, None, page.svc_kick, 6, GFN, HANDLE) == 1
    assert page.slot(1) == struct.pack("<IHH", 6, UNMAP, 0x4) + UNMAP_OP.pack(
        GFN << 12, 0, HANDLE, 0) + bytes(32)
    assert compat.eventfd_read(page.svc_kick) == 1  # req_event was 1: one kick
    assert io.ring_post_map(page.mem, page.front, None, -1, 7, 1 << 52, RW, REF, DOM) == 0
    assert io.ring_post_unmap(page.mem, page.front, None, -1, 7, GFN, 1 << 32) == 0
    assert io.ring_post_unmap(page.mem, page.front, None, -1, "7", GFN, 1) == 0
    for seq in range(r.RING_SIZE - 2):
        assert io.ring_post_unmap(page.mem, page.front, None, -1, 100 + seq, GFN, 1) == 1
    assert io.ring_post_map(page.mem, page.front, None, -1, 99, GFN, RW, REF, DOM) == -1
    assert struct.unpack_from("<II", page.front) == (r.RING_SIZE, 0)


@pytest.mark.parametrize("io", IOS)
def test_collect_hands_back_the_raw_slots(page: Page, io: Any) -> None:
    """Whatever the slots hold, as written, in order, each consumed once."""
    for seq in range(3):
        io.ring_post_unmap(page.mem, page.front, None, -1, seq, GFN, HANDLE)
    slots = [unmap_done(0, GFN), rsp(1, UNMAP, kind=r.RSP_SOCKET), bytes(range(64))]
    for i, s in enumerate(slots):
        page.put_slot(i, s)
    page.set_rsp_prod(2)
    assert io.ring_collect(page.mem, page.front) == slots[0] + slots[1]
    assert io.ring_collect(page.mem, page.front) == b""
    page.set_rsp_prod(3)
    assert io.ring_collect(page.mem, page.front) == slots[2]
    assert struct.unpack_from("<II", page.front) == (3, 3)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("prod", [4, 3 + r.RING_SIZE, 1 << 31, 0xFFFFFFFF, 2])
def test_a_bogus_rsp_prod_reads_nothing(page: Page, io: Any, prod: int) -> None:
    """More responses than requests made (or rsp_prod behind rsp_cons): None, and
    rsp_cons does not move (RING_RESPONSE_PROD_OVERFLOW, stricter)."""
    for seq in range(3):
        io.ring_post_unmap(page.mem, page.front, None, -1, seq, GFN, HANDLE)
    page.set_rsp_prod(3)
    assert len(io.ring_collect(page.mem, page.front)) == 3 * 64
    page.set_rsp_prod(prod)
    assert io.ring_collect(page.mem, page.front) is None
    assert struct.unpack_from("<II", page.front) == (3, 3)
    if prod == 4:  # once the map is posted, a fourth response is possible
        return
    a, b = socket.socketpair()
    with a, b:
        got = io.ring_map_one(page.mem, page.front, None, -1, 9, GFN, RW, REF, DOM, 0, 10_000,
                              page.cli_kick, a.fileno())
    assert got == (-4, b"", None)


@pytest.mark.parametrize("io", IOS)
def test_map_one_hangup_timeout_not_sent_full(page: Page, io: Any) -> None:
    a, b = socket.socketpair()
    with a, b:
        def map_one(seq: int, gfn: int = GFN, timeout_ms: int = 10_000) -> Any:
            return io.ring_map_one(page.mem, page.front, None, -1, seq, gfn, RW, REF, DOM, 0,
                                   timeout_ms, page.cli_kick, a.fileno())

        assert map_one(1, timeout_ms=0) == (-3, b"", None)
        assert page.idx(3) == 1  # rsp_event: it asked to be woken
        b.close()
        assert map_one(2) == (-2, b"", None)  # the peer hung up
        assert map_one(3, gfn=1 << 52) == (5, b"", None)  # does not fit: nothing sent
        assert page.idx(0) == 2
        for seq in range(4, 4 + r.RING_SIZE - 2):
            io.ring_post_unmap(page.mem, page.front, None, -1, seq, GFN, HANDLE)
        assert map_one(99) == (5, b"", None)  # full, nothing to collect
        page.put_slot(0, unmap_done(77, GFN))
        page.set_rsp_prod(1)
        assert map_one(100) == (-2, unmap_done(77, GFN), None)  # collected, posted, hung up
        assert page.idx(0) == r.RING_SIZE + 1


# ------------------------------------------------------------------ decide
def test_decide_what_the_service_sends() -> None:
    posted: dict[int, Any] = {1: (0x100, None), 2: (0x101, None), 4: (0x102, None)}
    rsps = (unmap_done(1, 0x100) + rsp(2, UNMAP, kind=r.RSP_SOCKET)
            + rsp(3, UNMAP, kind=r.RSP_SOCKET) + map_done(9, GFN))
    assert decide(rsps, 9, posted) == ((HANDLE, MFN, 1), [(1, 0x100)], [2])
    assert len(posted) == 3  # decide changes nothing
    assert decide(rsp(9, MAP, kind=r.RSP_SOCKET), 9, posted)[0] == r.RSP_SOCKET
    assert decide(b"", -1, posted) == (None, [], [])


@pytest.mark.parametrize("bad", [
    unmap_done(1, 0x100, status=abi.GNTST_bad_handle),  # a failure done on the ring
    unmap_done(1, 0x999),  # another gfn
    unmap_done(5, 0x100),  # nobody posted 5
    unmap_done(1, 0x100) + unmap_done(1, 0x100),  # twice
    rsp(1, MAP, op=bytes(32), mfn=3),  # a map done for a posted unmap
    rsp(1, UNMAP, kind=7),  # no such kind
    map_done(9, GFN, status=abi.GNTST_bad_gntref),  # a failed map done on the ring
    map_done(9, GFN, mfn=-1),  # a map without a frame
    rsp(9, UNMAP, op=bytes(32), mfn=3),  # the map answered as an unmap
    rsp(9, MAP, kind=-1),
], ids=["status", "gfn", "stranger", "twice", "cmd", "kind", "map-status", "no-frame",
        "map-cmd", "map-kind"])
def test_decide_refuses_what_the_service_never_sends(bad: bytes) -> None:
    posted: dict[int, Any] = {1: (0x100, None)}
    with pytest.raises(ServiceError) as e:
        decide(bad, 9, posted)
    assert e.value.errno == errno.EBADMSG and "does not send" in str(e.value)
    assert posted == {1: (0x100, None)}


# ------------------------------------------------------- the front end, twice
class Front(RingFront):
    """A RingFront on a Page, with what a Channel gives it played here: a reply
    that comes on the socket is taken as answered (recorded in ``waited``)."""

    def __init__(self, pg: Page, sock: socket.socket) -> None:
        self.ring = _Ring(pg)  # type: ignore[assignment]
        self.p2m: dict[int, Any] = {}
        self.holes: list[int] = []
        self.ring_p2m = self.p2m
        self.ring_holes = self.holes.extend
        self.calls = Calls()
        self.timeout = 30.0
        self.spin = 0.0
        self._spin_ns = 0
        self._timeout_ms = 30_000
        self.sent = 0
        self._mu = threading.Lock()
        self._ring_rx = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock_posted: set[int] = set()
        self._fileno = sock.fileno()
        self.waited: list[int] = []

    def raise_deferred(self) -> None:
        if self.calls.deferred:
            raise self.calls.deferred.popleft()

    def wait_posted(self, seqs: list[int]) -> None:
        for s in seqs:
            self.calls.posted.pop(s, None)
            self.waited.append(s)

    def _wait_call(self, c: Call) -> bytes:
        self.calls.waiting.pop(c.seq, None)
        self.waited.append(c.seq)
        return b"on the socket"

    def _signalled(self, got: BaseException | None) -> None:
        if got is not None:
            raise got

    def _fail(self, err: ServiceError) -> ServiceError:
        self.calls.fail(err)
        return self.calls.error or err


class _Ring:
    def __init__(self, pg: Page) -> None:
        self.mem, self.state, self.kick, self.wait = pg.mem, pg.front, pg.svc_kick, pg.cli_kick


#: how the service answers one request (per request, as drawn)
HOW = st.sampled_from(["ok"] * 6 + ["socket"] * 2 + ["status", "stranger", "kind", "garbage",
                                                     "noframe", "gfn"])
#: one step: map (with how the service answers each request then, and what it
#: does to the indices), post an unmap of the n-th mapping, or drain
STEP = st.one_of(
    st.tuples(st.just("map"), st.lists(HOW, min_size=1, max_size=40),
              st.sampled_from(["", "", "", "overflow", "hangup"]), st.integers(1, 40)),
    st.tuples(st.just("unmap"), st.integers(0, 50)),
    st.tuples(st.just("answer+drain"), st.lists(HOW, max_size=40),
              st.sampled_from(["", "", "overflow"]), st.integers(1, 40)),
)


def answer(pg: Page, hows: list[str], index: str, k: int, svc_sock: socket.socket) -> bool:
    """The service's turn: answer every request not answered yet, each as drawn
    (the last drawn repeats), then push rsp_prod (or past the requests).

    Returns:
        Whether the last response carries its request's id.
    """
    cons, prod = struct.unpack_from("<II", pg.back)
    req_prod = pg.idx(0)
    i = 0
    own = True
    while cons != req_prod:
        req = pg.slot(cons)
        seq, cmd, _flags = struct.unpack_from("<IHH", req)
        host = struct.unpack_from("<Q", req, 8)[0]
        how = hows[min(i, len(hows) - 1)] if hows else "ok"
        gfn = host >> 12
        if how == "ok":
            out = map_done(seq, gfn, 100 + seq, 200 + seq) if cmd == MAP else unmap_done(seq, gfn)
        elif how == "socket":
            out = rsp(seq, cmd, kind=r.RSP_SOCKET)
        elif how == "status":
            out = map_done(seq, gfn, status=-1) if cmd == MAP else unmap_done(seq, gfn, -1)
        elif how == "stranger":
            out = unmap_done(seq + 1000, gfn)
        elif how == "kind":
            out = rsp(seq, cmd, kind=5)
        elif how == "garbage":
            out = bytes((seq * 7 + j) & 0xFF for j in range(64))
        elif how == "noframe":
            out = map_done(seq, gfn, mfn=-1) if cmd == MAP else unmap_done(seq, gfn)
        else:  # "gfn"
            out = map_done(seq, gfn + 1) if cmd == MAP else unmap_done(seq, gfn + 1)
        pg.put_slot(prod, out)
        own = out[:4] == req[:4]
        cons, prod, i = (cons + 1) & 0xFFFFFFFF, (prod + 1) & 0xFFFFFFFF, i + 1
    struct.pack_into("<II", pg.back, 0, cons, prod)
    struct.pack_into("<I", pg.mem, 4, cons + 1)  # req_event
    if index == "hangup":
        svc_sock.shutdown(socket.SHUT_RDWR)
        return own
    pg.set_rsp_prod(prod + k if index == "overflow" else prod)
    _cext.mb()
    if pg.idx(3) <= prod + (k if index == "overflow" else 0):
        compat.eventfd_write(pg.cli_kick, 1)
    return own


class Service(threading.Thread):
    """Answers once the client sleeps in map_one (rsp_event one past rsp_prod,
    a request not answered yet), so both runs see the same page."""

    def __init__(self, pg: Page, hows: list[str], index: str, k: int,
                 svc_sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.pg, self.hows, self.index, self.k, self.sock = pg, hows, index, k, svc_sock
        self.stop = threading.Event()

    def run(self) -> None:
        pg = self.pg
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            prod = struct.unpack_from("<I", pg.back, 4)[0]
            if pg.idx(3) == (prod + 1) & 0xFFFFFFFF and pg.idx(0) != struct.unpack_from(
                    "<I", pg.back)[0]:
                if not answer(pg, self.hows, self.index, self.k, self.sock):
                    # the map's response went astray: the client would wait for
                    # its timeout; the service goes instead (a hang-up)
                    self.sock.shutdown(socket.SHUT_RDWR)
                return
            os.sched_yield()


def _nothing(body: bytes) -> None:
    return None


def outcome(f: Any) -> Any:
    try:
        return ("ok", f())
    except ServiceError as e:
        return ("ServiceError", e.errno, str(e))
    except Exception as e:
        return (type(e).__name__, str(e))


def drive(steps: list[Any], use_c: bool) -> Any:
    old = frontring.C_PATHS
    frontring.C_PATHS = use_c
    pg = Page()
    cli, svc = socket.socketpair()
    try:
        front = Front(pg, cli)
        mapped: list[tuple[int, int]] = []
        results = []
        next_gfn = 0x1000
        for step in steps:
            if step[0] == "map":
                _, hows, index, k = step
                gfn, next_gfn = next_gfn, next_gfn + 1
                t = Service(pg, hows, index, k, svc)
                t.start()
                got = outcome(partial(front.map_one, DOM, REF, gfn, RW, front.p2m))
                t.stop.set()
                t.join(60)
                assert not t.is_alive()
                if got[0] == "ok" and got[1] is not None and got[1][3] is None:
                    mapped.append((gfn, got[1][0]))
                results.append(got)
            elif step[0] == "unmap":
                if not mapped:
                    continue
                gfn, handle = mapped.pop(step[1] % len(mapped))
                results.append(outcome(partial(front.post_unmap_one, gfn, handle, _nothing)))
            else:
                _, hows, index, k = step
                answer(pg, hows, index, k, svc)
                results.append(outcome(lambda: front.drain_ring(wait=False)))
        err = front.calls.error
        return (results, bytes(pg.mem), bytes(pg.front), front.p2m, front.holes,
                sorted(front.calls.posted), sorted(front.calls.waiting), front.waited, front.sent,
                None if err is None else (err.errno, str(err)))
    finally:
        frontring.C_PATHS = old
        cli.close()
        svc.close()
        pg.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=12))
def test_c_and_python_front_ends_agree(steps: list[Any]) -> None:
    c = drive(steps, True)
    py = drive(steps, False)
    assert c == py


def test_a_well_behaved_service_maps_and_unmaps_on_both_paths() -> None:
    """Not only errors: maps done on the ring, posted unmaps done on the way (holes
    back, p2m entries gone), a reply on the socket waited for."""
    steps = [("map", ["ok"], "", 1), ("map", ["ok"], "", 1), ("unmap", 0), ("unmap", 0),
             ("map", ["ok", "socket", "ok"], "", 1), ("answer+drain", [], "", 1)]
    for use_c in (True, False):
        results, _page, _front, p2m, holes, posted, waiting, waited, sent, err = drive(
            steps, use_c)
        assert err is None and posted == [] and waiting == []
        assert results[0] == ("ok", (101, 201, 1, None))
        assert results[1] == ("ok", (102, 202, 1, None))
        assert results[2:4] == [("ok", True), ("ok", True)]
        assert results[4] == ("ok", (105, 205, 1, None))
        assert holes == [0x1000] and waited == [4]  # 3 done on the ring, 4 on the socket
        assert p2m == {0x1001: (202, 1), 0x1002: (205, 1)} and sent == 5


# ------------------------------------------------ a signal handler that raises
class Interrupted(Exception):
    """What a signal handler raises (as Ctrl-C raises KeyboardInterrupt)."""


def _front_with_service(pg: Page, cli: socket.socket, svc: socket.socket) -> tuple[Front, Any]:
    front = Front(pg, cli)
    t = Service(pg, ["ok"], "", 1, svc)
    t.start()
    return front, t


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_a_signal_while_responses_are_decided_is_raised_after(
        monkeypatch: pytest.MonkeyPatch, use_c: bool) -> None:
    """What the ring's I/O read is decided and applied in Python, and both can run
    again: a signal handler's exception in the middle is held, the map completes
    (its p2m entry set), and the exception is raised once it is done."""
    monkeypatch.setattr(frontring, "C_PATHS", use_c)
    real = frontring.decide
    calls: list[int] = []

    def decide_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            real(*args)
            raise Interrupted()
        return real(*args)

    monkeypatch.setattr(frontring, "decide", decide_once)
    pg = Page()
    cli, svc = socket.socketpair()
    try:
        front, t = _front_with_service(pg, cli, svc)
        with pytest.raises(Interrupted):
            front.map_one(DOM, REF, GFN, RW, front.p2m)
        t.join(60)
        assert len(calls) == 2 and front.calls.error is None
        assert front.p2m == {GFN: (201, 1)} and not front.calls.waiting
    finally:
        cli.close()
        svc.close()
        pg.close()


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_a_map_whose_result_is_lost_fails_the_connection(
        monkeypatch: pytest.MonkeyPatch, use_c: bool) -> None:
    """A signal handler's exception after the request went out and before the I/O
    handed its responses back (in Python anywhere in it; in C only as the call
    returns) loses its outcome: the connection fails (ECANCELED) and the exception
    is raised; nothing more goes on the ring."""
    monkeypatch.setattr(frontring, "C_PATHS", use_c)
    if use_c:
        class Hook:
            def __getattr__(self, name: str) -> Any:
                return getattr(_cext, name)

            def ring_map_one(self, *args: Any) -> Any:
                _cext.ring_map_one(*args)
                raise Interrupted()

        monkeypatch.setattr(frontring, "_cext", Hook())
    else:
        real = ringio._consume

        def consume(*args: Any) -> int:
            got = real(*args)
            if got == 1:
                raise Interrupted()
            return got

        monkeypatch.setattr(ringio, "_consume", consume)
    pg = Page()
    cli, svc = socket.socketpair()
    try:
        front, t = _front_with_service(pg, cli, svc)
        with pytest.raises(Interrupted):
            front.map_one(DOM, REF, GFN, RW, front.p2m)
        t.join(60)
        err = front.calls.error
        assert err is not None and err.errno == errno.ECANCELED
        assert "interrupted" in str(err) and not front.calls.waiting
        with pytest.raises(ServiceError):
            front.map_one(DOM, REF, GFN + 1, RW, front.p2m)
        assert pg.idx(0) == 1
    finally:
        cli.close()
        svc.close()
        pg.close()
