"""The service's C hot path (``_cext.serve_gnttab``) answers as the Python path does.

Two services are built the same way: a mapper connection (HVM, bound like a
client that sent CREATE) and a granter that shares writable and read-only
pages with it, one page with another domain, and a page whose ref is then
ended.  The same byte stream -- one-op map and unmap requests (good and bad
refs, domids, flags, gfns and handles; posted or not), two-op maps, pings,
malformed GNTTAB_OP messages, unmap notifies set on handles -- cut at the same
random places, is fed to both connections' ``_on_data``, with
:data:`server.dispatch.SERVE_FASTPATH` on for one and off for the other.  The bytes each
service sends back after each cut, and the whole hypervisor state (machine
memory, refcounts, owners, every domain's p2m, active entries, maptrack and
free-handle order), must agree.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from grant_helpers import hv_state
from xengrant import _cext, abi
from xengrant.emu import gnttab_map
from xengrant.service import protocol as p
from xengrant.service.server import Connection, Server, dispatch

MAP_OP = struct.Struct("<QIIHhIQ")
UNMAP_OP = struct.Struct("<QQIh2x")
HOLE = 0x60000  # above every gfn the mapper has
RAM_GFN = 0x500  # populated: a map onto it fails
BAD_DOMID = 999


class World:
    """One service with a bound mapper connection and a granter's shares."""

    def __init__(self, path: Path, fast: bool) -> None:
        self.fast = fast
        self.srv = Server(str(path), 4 << 20, log=lambda s: None)
        self.mine, theirs = socket.socketpair()
        self.mine.setblocking(False)
        self.conn = Connection(theirs, 1)
        self.srv._create(self.conn, p.CREATE_REQ.pack(p.PROTOCOL_VERSION, -1, 0, -1, -1, -1))
        assert self.conn.domid is not None
        self.domid = self.conn.domid
        self.srv.hv.populate_physmap(self.domid, [RAM_GFN])
        xen = self.srv.xen
        self.granter = xen.create_domain()
        self.other = xen.create_domain()
        gt = self.granter.grant_table
        self.shares = [
            gt.share_pages(self.domid, 3),
            gt.share_pages(self.domid, 2, writable=False),
            gt.share_pages(self.other.domid, 1),
        ]
        for i, sh in enumerate(self.shares):
            sh.mem[:] = bytes([i + 1]) * len(sh.mem)
        ended = gt.share_pages(self.domid, 1)
        self.ended_ref = ended.refs[0]
        ended.unshare(release_refs=False)
        self.refs = [r for sh in self.shares for r in sh.refs] + [self.ended_ref, 4000, 1 << 20]
        # one map and unmap first: the maptrack has its frame (growing it is Python's)
        hv = self.srv.hv
        op = bytearray(MAP_OP.pack(HOLE << 12, abi.GNTMAP_host_map, self.refs[0],
                                   self.granter.domid, 0, 0, 0))
        assert hv.grant_table_op(self.domid, abi.GNTTABOP_map_grant_ref, memoryview(op), 1) == 0
        handle = MAP_OP.unpack(op)[5]
        op = bytearray(UNMAP_OP.pack(HOLE << 12, 0, handle, 0))
        assert hv.grant_table_op(self.domid, abi.GNTTABOP_unmap_grant_ref, memoryview(op), 1) == 0
        assert UNMAP_OP.unpack(op)[3] == abi.GNTST_okay
        self.buf = memoryview(bytearray(1 << 16))

    def push(self, chunk: bytes) -> None:
        """``_on_data`` of ``chunk`` (the C path on or off, as this world's)."""
        old, old_map = dispatch.SERVE_FASTPATH, gnttab_map.FASTPATH
        dispatch.SERVE_FASTPATH = self.fast
        # the service's C serving needs the map fast path (off under XENGRANT_FASTPATH=0)
        gnttab_map.FASTPATH = old_map or self.fast
        try:
            self.buf[: len(chunk)] = chunk
            with self.srv.lock:
                self.srv._on_data(self.conn, self.buf, len(chunk))
        finally:
            dispatch.SERVE_FASTPATH, gnttab_map.FASTPATH = old, old_map

    def feed(self, chunk: bytes) -> bytes:
        """``_on_data`` of ``chunk``; the bytes the service sent back."""
        self.push(chunk)
        out = b""
        while True:
            try:
                data = self.mine.recv(1 << 20)
            except BlockingIOError:
                return out
            out += data

    def state(self) -> tuple[Any, ...]:
        notes = {d: sorted(n) for d, n in self.srv.notifies.items()}
        return (hv_state(self.srv.hv), notes)

    def close(self) -> None:
        """Hang up (the mapper domain goes, with its mappings), unshare, close."""
        with self.srv.lock:
            self.srv._schedule_close(self.conn)
            self.srv._reap()
        for sh in self.shares:
            sh.unshare()
        self.mine.close()
        self.srv.close()


def _frame(mtype: int, flags: int, seq: int, payload: bytes) -> bytes:
    return p.HEADER.pack(len(payload), mtype, flags, seq) + payload


def _gnttab(cmd: int, count: int, ops: bytes) -> bytes:
    return p.GNTTAB_REQ.pack(cmd, count) + ops


# mostly the common case (the C path's), with every kind of failure mixed in
refs_i = st.one_of(st.integers(0, 2), st.integers(0, 8))
gfns_i = st.integers(0, 7)  # 7: a RAM gfn, the rest holes
picks = st.integers(0, 7)  # < 5: a live mapping's handle, if there is one; else this handle
map_flags = st.sampled_from([abi.GNTMAP_host_map] * 4 + [
    abi.GNTMAP_host_map | abi.GNTMAP_readonly,
    abi.GNTMAP_host_map | abi.GNTMAP_device_map,
    0,
])
one_map = st.tuples(st.just("map"), refs_i, gfns_i, map_flags, st.integers(0, 9), st.booleans())
one_unmap = st.tuples(st.just("unmap"), picks, st.integers(0, 9), st.booleans())
_kinds = [one_map] * 4 + [one_unmap] * 4 + [
    st.tuples(st.just("map2"), refs_i, refs_i, gfns_i),
    st.tuples(st.just("mapn"), st.lists(st.tuples(refs_i, gfns_i), min_size=2, max_size=5)),
    st.tuples(st.just("unmapn"), st.lists(picks, min_size=2, max_size=5)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("short")),
    st.tuples(st.just("long_unmap"), picks),
    st.tuples(st.just("notify"), picks),
]
messages = st.integers(0, len(_kinds) - 1).flatmap(lambda k: _kinds[k])
#: steps: a few messages sent at once, cut in two at a random place
steps = st.lists(st.tuples(st.lists(messages, min_size=1, max_size=3), st.integers(0, 400)),
                 min_size=1, max_size=30)


class Stream:
    """Encodes requests; learns the live mappings' handles and gfns from the replies."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.seq = 0
        self.sent: dict[int, tuple[str, int]] = {}  # seq -> (map/unmap, gfn or handle)
        self.live: dict[int, int] = {}  # handle -> gfn

    def _handle(self, pick: int) -> tuple[int, int]:
        if pick < 5 and self.live:
            h = sorted(self.live)[pick % len(self.live)]
            return h, self.live[h]
        return pick, HOLE

    def encode(self, msgs: list[Any]) -> bytes:
        out = []
        granter = self.w.granter.domid
        refs = self.w.refs
        for m in msgs:
            self.seq += 1
            seq = self.seq
            kind = m[0]
            if kind == "map":
                _, ri, gi, flags, dom, posted = m
                gfn = RAM_GFN if gi == 7 else HOLE + gi
                dom = BAD_DOMID if dom == 0 else granter
                op = MAP_OP.pack(gfn << 12, flags, refs[ri], dom, 0, 0, 0)
                self.sent[seq] = ("map", gfn)
                out.append(_frame(p.MSG_GNTTAB_OP, p.F_POSTED if posted else 0, seq,
                                  _gnttab(abi.GNTTABOP_map_grant_ref, 1, op)))
            elif kind == "unmap":
                _, pick, addr, posted = m
                h, gfn = self._handle(pick)
                # 0..7: the mapping's own address; 8: another; 9: none
                gfn = gfn if addr < 8 else gfn + 1 if addr == 8 else 0
                op = UNMAP_OP.pack(gfn << 12, 0, h, 0)
                self.sent[seq] = ("unmap", h)
                out.append(_frame(p.MSG_GNTTAB_OP, p.F_POSTED if posted else 0, seq,
                                  _gnttab(abi.GNTTABOP_unmap_grant_ref, 1, op)))
            elif kind == "map2":
                _, r1, r2, gi = m
                ops = b"".join(
                    MAP_OP.pack(gfn << 12, abi.GNTMAP_host_map, refs[r], granter, 0, 0, 0)
                    for gfn, r in ((HOLE + gi, r1), (HOLE + 8 + gi, r2))
                )
                out.append(_frame(p.MSG_GNTTAB_OP, 0, seq,
                                  _gnttab(abi.GNTTABOP_map_grant_ref, 2, ops)))
            elif kind == "mapn":  # several ops: C runs them up to the first it does not take
                ops = b"".join(
                    MAP_OP.pack((HOLE + 16 + gi) << 12, abi.GNTMAP_host_map, refs[r], granter,
                                0, 0, 0)
                    for r, gi in m[1]
                )
                self.sent[seq] = ("mapn", len(m[1]))
                out.append(_frame(p.MSG_GNTTAB_OP, 0, seq,
                                  _gnttab(abi.GNTTABOP_map_grant_ref, len(m[1]), ops)))
            elif kind == "unmapn":
                pairs = [self._handle(pick) for pick in m[1]]
                ops = b"".join(UNMAP_OP.pack(gfn << 12, 0, h, 0) for h, gfn in pairs)
                self.sent[seq] = ("unmapn", len(pairs))
                out.append(_frame(p.MSG_GNTTAB_OP, 0, seq,
                                  _gnttab(abi.GNTTABOP_unmap_grant_ref, len(pairs), ops)))
            elif kind == "ping":
                out.append(_frame(p.MSG_PING, 0, seq, b"hello"))
            elif kind == "short":  # the op is cut short: EFAULT from Python
                out.append(_frame(p.MSG_GNTTAB_OP, 0, seq,
                                  _gnttab(abi.GNTTABOP_map_grant_ref, 1, b"\0" * 8)))
            elif kind == "long_unmap":  # bytes after the op: Python's path echoes them
                h, gfn = self._handle(m[1])
                op = UNMAP_OP.pack(gfn << 12, 0, h, 0) + b"\xaa" * 8
                self.sent[seq] = ("unmap", h)
                out.append(_frame(p.MSG_GNTTAB_OP, 0, seq,
                                  _gnttab(abi.GNTTABOP_unmap_grant_ref, 1, op)))
            else:  # an unmap notify (clear byte 0) on a handle
                h, _gfn = self._handle(m[1])
                req = p.NOTIFY_SET_REQ.pack(p.NOTIFY_GNTDEV, h, 0, 1, 0)
                out.append(_frame(p.MSG_UNMAP_NOTIFY_SET, 0, seq, req))
        return b"".join(out)

    def learn(self, replies: bytes) -> None:
        """Note the mappings the replies to one-op maps and unmaps made and ended."""
        pos = 0
        while pos < len(replies):
            length, mtype, _flags, seq = p.HEADER.unpack_from(replies, pos)
            sent = self.sent.pop(seq, None)
            if mtype == p.MSG_GNTTAB_OP and sent and struct.unpack_from("<i", replies,
                                                                          pos + 12)[0] == 0:
                kind, what = sent
                op = pos + 24
                if kind == "map" and struct.unpack_from("<h", replies, op + 18)[0] == 0:
                    self.live[struct.unpack_from("<I", replies, op + 20)[0]] = what
                elif kind == "unmap" and struct.unpack_from("<h", replies, op + 20)[0] == 0:
                    self.live.pop(what, None)
                elif kind == "mapn":
                    for i in range(what):
                        addr, _f, _r, _d, st_, h, _b = MAP_OP.unpack_from(replies, op + 32 * i)
                        if st_ == 0:
                            self.live[h] = addr >> 12
                elif kind == "unmapn":
                    for i in range(what):
                        _a, _b, h, st_ = UNMAP_OP.unpack_from(replies, op + 24 * i)
                        if st_ == 0:
                            self.live.pop(h, None)
            pos += p.HEADER_SIZE + length


@contextlib.contextmanager
def _worlds() -> Iterator[tuple[World, World]]:
    """Two services built the same way: C hot path on, and off."""
    with tempfile.TemporaryDirectory(prefix="xg-fast-") as tmp:
        fast = World(Path(tmp) / "fast.sock", True)
        try:
            slow = World(Path(tmp) / "slow.sock", False)
            try:
                yield fast, slow
            finally:
                slow.close()
        finally:
            fast.close()


@settings(max_examples=100, deadline=None)
@given(script=steps)
# C answers a map and Python the posted failure after it: one send for both
@example(script=[([("map", 0, 0, 2, 1, False), ("map", 0, 0, 2, 0, True)], 0)])
def test_fast_path_replies_and_state_match_python(script: list[Any]) -> None:
    with _worlds() as (fast, slow):
        stream = Stream(slow)
        for msgs, cut in script:
            data = stream.encode(msgs)
            cut %= len(data) + 1
            for chunk in (data[:cut], data[cut:]):
                replies = fast.feed(chunk)
                assert replies == slow.feed(chunk)
                assert fast.state() == slow.state()
                stream.learn(replies)


class _CountingCext:
    """``dispatch._cext`` with serve_gnttab counting the messages it took."""

    def __init__(self) -> None:
        self.taken = 0
        self.partial = 0
        self.short_sends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(_cext, name)

    def serve_gnttab(self, *args: Any) -> Any:
        pos, replies, answered, partial, sent = _cext.serve_gnttab(*args)
        at = 0
        while at < len(replies):
            self.taken += 1
            at += p.HEADER_SIZE + p.HEADER.unpack_from(replies, at)[0]
        self.partial += partial
        fd, held = args[8], args[9]
        if fd >= 0 and answered and pos == args[3] and 0 <= sent < len(held) + len(replies):
            self.short_sends += 1
        return pos, replies, answered, partial, sent


def test_fast_path_answers_a_map_and_a_posted_unmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot pair (a posted unmap, then a map) is answered in C, in order, in one send,
    with the bytes the Python path sends."""
    counting = _CountingCext()
    monkeypatch.setattr(dispatch, "_cext", counting)
    with _worlds() as (fast, slow):
        ref = fast.refs[0]
        granter = fast.granter.domid
        map_op = MAP_OP.pack(HOLE << 12, abi.GNTMAP_host_map, ref, granter, 0, 0, 0)
        first = _frame(p.MSG_GNTTAB_OP, 0, 1, _gnttab(abi.GNTTABOP_map_grant_ref, 1, map_op))
        reply = fast.feed(first)
        assert reply == slow.feed(first)
        assert counting.taken == 1
        length, mtype, flags, seq = p.HEADER.unpack_from(reply)
        assert (mtype, flags, seq, len(reply)) == (p.MSG_GNTTAB_OP, p.F_REPLY, 1, 12 + length)
        assert struct.unpack_from("<iiI", reply, 12) == (0, 0, MAP_OP.size)
        addr, _fl, r, dom, st_, handle, dba = MAP_OP.unpack_from(reply, 24)
        assert (addr, r, dom, st_) == (HOLE << 12, ref, granter, abi.GNTST_okay)
        n, gfn, mfn, _typ = struct.unpack_from("<Iqqq", reply, 24 + MAP_OP.size)
        assert (n, gfn, mfn << 12) == (1, HOLE, dba)
        assert reply[-2:] == b"\0\0"  # no debug reasons
        # mapped: the granter's bytes at that machine frame
        assert bytes(fast.srv.hv.mem[mfn << 12 : (mfn << 12) + 4]) == b"\x01" * 4
        for round_ in range(3):
            # a posted unmap and the next map in one read: both replies in one send
            gfn = HOLE + 1 + round_
            stream = _frame(p.MSG_GNTTAB_OP, p.F_POSTED, 2 * round_ + 2, _gnttab(
                abi.GNTTABOP_unmap_grant_ref, 1,
                UNMAP_OP.pack((gfn - 1) << 12, 0, handle, 0)))
            stream += _frame(p.MSG_GNTTAB_OP, 0, 2 * round_ + 3, _gnttab(
                abi.GNTTABOP_map_grant_ref, 1,
                MAP_OP.pack(gfn << 12, abi.GNTMAP_host_map, ref, granter, 0, 0, 0)))
            both = fast.feed(stream)
            assert both == slow.feed(stream)
            assert fast.state() == slow.state()
            seqs = []
            pos = 0
            while pos < len(both):
                length, _t, _f, seq = p.HEADER.unpack_from(both, pos)
                seqs.append((seq, struct.unpack_from("<i", both, pos + 12)[0]))
                pos += 12 + length
            assert seqs == [(2 * round_ + 2, 0), (2 * round_ + 3, 0)]
            handle = struct.unpack_from("<I", both, len(both) - 2 - 28 - 12)[0]
        assert counting.taken == 7
        # a batch of two maps (refs with no pin yet), then their two unmaps: a message each
        refs = fast.refs[1:3]
        gfns = [HOLE + 32 + i for i in range(2)]
        mapn = _frame(p.MSG_GNTTAB_OP, 0, 20, _gnttab(abi.GNTTABOP_map_grant_ref, 2, b"".join(
            MAP_OP.pack(g << 12, abi.GNTMAP_host_map, r, granter, 0, 0, 0)
            for g, r in zip(gfns, refs))))
        reply = fast.feed(mapn)
        assert reply == slow.feed(mapn)
        assert fast.state() == slow.state()
        ops = [MAP_OP.unpack_from(reply, 24 + 32 * i) for i in range(2)]
        assert [op[4] for op in ops] == [abi.GNTST_okay] * 2
        n, *cols = struct.unpack_from("<I6q", reply, 24 + 64)
        assert (n, cols[:2], cols[4:]) == (2, gfns, [1, 1])  # gfns, then grant_map_rw
        assert [c << 12 for c in cols[2:4]] == [op[6] for op in ops]  # mfns = dev_bus_addr
        unmapn = _frame(p.MSG_GNTTAB_OP, 0, 21, _gnttab(
            abi.GNTTABOP_unmap_grant_ref, 2,
            b"".join(UNMAP_OP.pack(g << 12, 0, op[5], 0) for g, op in zip(gfns, ops))))
        reply = fast.feed(unmapn)
        assert reply == slow.feed(unmapn)
        assert fast.state() == slow.state()
        assert [UNMAP_OP.unpack_from(reply, 24 + 24 * i)[3] for i in range(2)] == [0, 0]
        assert counting.taken == 9 and counting.partial == 0


def test_fast_path_send_that_does_not_fit_is_queued_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply C could not send (the client's socket is full) is queued, and sent
    before later replies once there is room: the client reads the same bytes, in the
    same order, as from the Python path."""
    counting = _CountingCext()
    monkeypatch.setattr(dispatch, "_cext", counting)
    with _worlds() as (fast, slow):
        streams = []
        for w in (fast, slow):
            w.srv.ep.register(w.conn.fd, 0)  # _flush watches for room through it
            junk = 0  # fill the socket: the client reads nothing meanwhile
            with contextlib.suppress(BlockingIOError):
                while True:
                    junk += w.conn.sock.send(b"j" * 4096, socket.MSG_DONTWAIT)
            maps = [
                _frame(p.MSG_GNTTAB_OP, 0, 1 + i, _gnttab(
                    abi.GNTTABOP_map_grant_ref, 1,
                    MAP_OP.pack((HOLE + i) << 12, abi.GNTMAP_host_map, w.refs[i],
                                w.granter.domid, 0, 0, 0)))
                for i in range(3)
            ]
            for m in maps:
                w.push(m)
            assert w.conn.want_write and w.conn.out
            got = b""
            while w.conn.out or len(got) < junk:  # the main thread's part, once there is room
                got += w.feed(b"")
                with w.srv.lock:
                    w.srv._flush(w.conn)
            got += w.feed(b"")
            assert got[:junk] == b"j" * junk
            streams.append(got[junk:])
        assert counting.short_sends == 1  # C's send found the socket full
        assert streams[0] == streams[1]
        assert fast.state() == slow.state()
        seqs = []
        pos = 0
        while pos < len(streams[0]):
            length, _t, _f, seq = p.HEADER.unpack_from(streams[0], pos)
            assert struct.unpack_from("<iiI", streams[0], pos + 12) == (0, 0, MAP_OP.size)
            assert MAP_OP.unpack_from(streams[0], pos + 24)[4] == abi.GNTST_okay
            seqs.append(seq)
            pos += 12 + length
        assert seqs == [1, 2, 3]
