"""Fuzz the service's socket: random, malformed, oversized, out-of-order messages.

Bounded in count (ROUNDS x CONNS x MESSAGES) and in time (DEADLINE).  Each round
runs CONNS fuzzers at once (threads), among them floods of connections and
clients that never read their replies.  Nobody holds dom0 while they run: it
is the fuzzers' to try for (they never get it).  Between rounds a well-formed
pair of domain processes shares, maps, copies, signals and uses xenstore, and
must get exactly the right answers; at the end dom0 is still to be had by the
token's holder, every domain the fuzzers created is gone and the tables are
as before.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from service_helpers import Actor, Service, event_channel
from xengrant import abi
from xengrant.service import ping, stats
from xengrant.service import protocol as p

SEED = int(os.environ.get("XENGRANT_FUZZ_SEED", "0x5EED"), 0)
ROUNDS = 8
CONNS = 4
MESSAGES = 120
DEADLINE = 45.0

_TYPES = sorted(t for t in p.MSG_NAMES if t not in (p.MSG_EVENT, p.MSG_WATCH_EVENT))


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Service, Actor, Actor]]:
    svc = Service()
    a, b = Actor(svc), Actor(svc)  # no dom0: the fuzzers may try to become it
    a("reap")
    b("reap")
    try:
        yield svc, a, b
    finally:
        a.close()
        b.close()
        assert svc.stop() == 0


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _payload(rng: random.Random, mtype: int) -> bytes:
    """A payload that is often nearly right for ``mtype``."""
    if rng.random() < 0.25:
        return _rand_bytes(rng, rng.choice([0, 1, 3, 7, 8, 12, 33, 100]))
    r32 = lambda: rng.choice([0, 1, 7, 8, 0x7FF0, 0xFFFF, 2**31, 2**32 - 1, rng.getrandbits(32)])  # noqa: E731
    V = p.PROTOCOL_VERSION
    if mtype == p.MSG_CREATE:
        return p.CREATE_REQ.pack(
            rng.choice([V, V, V, 0, V + 1]), rng.choice([-1, -1, 0, 5, 300, 0x7FF0, -7]),
            rng.choice([0, 0, 1, 2]), rng.choice([-1, 0, 1, 4, 10**6]),
            rng.choice([-1, 0, 1, 2**20]), rng.choice([-1, 0, 3, 2**40]),
        ) + _rand_bytes(rng, rng.choice([0, 0, 32]))  # a dom0 token guessed
    if mtype == p.MSG_ATTACH:  # a secret guessed, short or missing
        return p.ATTACH_REQ.pack(rng.choice([V, 0]), rng.getrandbits(16)) + _rand_bytes(
            rng, rng.choice([0, 31, 32, 32, 33]))
    if mtype == p.MSG_STATS:  # a token guessed
        return _rand_bytes(rng, rng.choice([0, 32]))
    if mtype == p.MSG_GNTTAB_OP:
        cmd = rng.choice([*range(14), 99, 2**31])
        count = rng.choice([-1, 0, 1, 2, 3, 64, 2000, 2**31, 2**40])
        size = {0: 32, 1: 24, 2: 24, 4: 24, 5: 40, 6: 16, 7: 24, 8: 4, 9: 16, 10: 8, 11: 12}
        n = max(0, min(count, 64)) * size.get(cmd, 8) + rng.choice([0, 0, -1, 5])
        ops = bytearray(_rand_bytes(rng, max(n, 0)))
        if cmd == 0 and ops:  # map ops that name real domains and refs
            for i in range(len(ops) // 32):
                struct.pack_into("<QIIH", ops, i * 32, rng.choice([0, 0x1000000 << 12]),
                                 rng.choice([2, 6, 1, 0xFFFF]), rng.choice([8, 9, 0, 10**6]),
                                 rng.choice([0, 1, 2, 3, 0x7FF0]))
        return p.GNTTAB_REQ.pack(cmd & 0xFFFFFFFF, count) + bytes(ops)
    if mtype in (p.MSG_POPULATE, p.MSG_DECREASE):
        return p.pack_i64s([rng.choice([-1, 0, 0x100 + i, 2**62, 0xF0000]) for i in
                            range(rng.choice([0, 1, 5, 64]))])
    if mtype == p.MSG_TRANSLATE:
        return p.U32.pack(rng.getrandbits(1)) + p.pack_i64s([rng.choice([0x100, 0xF0000, -5])])
    if mtype == p.MSG_ADD_TO_PHYSMAP:
        return p.ADD_TO_PHYSMAP_REQ.pack(rng.choice([0, 1, 2]), rng.choice([0, 1, 63, 64, 2**31,
                                         2**64 - 1]), rng.choice([-1, 0, 0xF0000, 2**62]))
    if mtype in (p.MSG_EVTCHN_ALLOC_UNBOUND, p.MSG_EVTCHN_BIND_INTERDOMAIN, p.MSG_EVTCHN_STATUS,
                 p.MSG_UNMAP_NOTIFY_FIRE):
        return p.TWO_U32.pack(r32(), r32())
    if mtype in (p.MSG_EVTCHN_SEND, p.MSG_EVTCHN_CLOSE, p.MSG_EVTCHN_UNMASK):
        return p.U32.pack(r32())
    if mtype == p.MSG_UNMAP_NOTIFY_SET:
        return p.NOTIFY_SET_REQ.pack(*(r32() for _ in range(5)))
    if mtype in (p.MSG_DOMCTL_DESTROY,):
        return p.DOMID.pack(rng.getrandbits(16))
    if p.MSG_XS_READ <= mtype <= p.MSG_XS_GET_DOMAIN_PATH:
        parts = [rng.choice(["data/x", "/local/domain/1/data", "//", "/", "@releaseDomain", "",
                             "data/" + "y" * 3000, "\u00e9", "a b", "/tool/xenstored"])
                 for _ in range(rng.choice([0, 1, 2, 3]))]
        blob = b"\0".join(x.encode() for x in parts)
        return blob + (b"\0" if rng.random() < 0.8 else b"") + _rand_bytes(rng, rng.choice(
            [0, 0, 5]))
    if mtype == p.MSG_DEBUG_KEY:
        return rng.choice([b"g", b"G", b"e", b"x", b"q", b"", b"gg"]) + _rand_bytes(
            rng, rng.choice([0, 32]))
    return _rand_bytes(rng, rng.choice([0, 4, 16]))


def _structured(path: str, rng: random.Random) -> set[int]:
    """Well-framed random requests: each gets exactly one reply, in order."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    created: set[int] = set()
    dec = p.Decoder(max_payload=1 << 26)
    expect: list[tuple[int, int]] = []
    frames: list[p.Frame] = []
    if rng.random() < 0.8:
        create = p.CREATE_REQ.pack(p.PROTOCOL_VERSION, -1, 0, -1, -1, -1)
        s.sendall(p.encode(p.MSG_CREATE, 0, 1, create))
        expect.append((1, p.MSG_CREATE))
    for i in range(MESSAGES):
        mtype = rng.choice(_TYPES + [p.MSG_GNTTAB_OP] * 6 + [999])
        if mtype == p.MSG_CLOSE and rng.random() < 0.9:
            mtype = p.MSG_PING  # leaving early would make the rest EPROTO
        seq = 2 + i
        s.sendall(p.encode(mtype, 0, seq, _payload(rng, mtype)))
        if mtype not in p.ONE_WAY:
            expect.append((seq, mtype))
    s.shutdown(socket.SHUT_WR)
    while True:
        data = s.recv(1 << 16)
        if not data:
            break
        frames += dec.feed(data)
    s.close()
    replies = [f for f in frames if not f.flags & p.F_ASYNC]
    assert [(f.seq, f.type) for f in replies] == expect
    for f in replies:
        assert f.flags == p.F_REPLY and f.payload is not None
        status, body = p.split_status(f.payload)
        assert status <= 0
        if f.type in (p.MSG_CREATE, p.MSG_ATTACH) and status == 0:
            created.add(p.DOMAIN_REPLY.unpack_from(body)[1])
        if f.type in (p.MSG_ATTACH, p.MSG_STATS, p.MSG_DEBUG_KEY, p.MSG_DOMCTL_CREATE,
                      p.MSG_DOMCTL_DESTROY):
            assert status < 0  # nobody's secret, nobody's token, nobody's dom0
        if f.type == 999:
            assert status == -errno.ENOSYS
    return created


def _chaos(path: str, rng: random.Random) -> None:
    """Bytes that are not messages: junk, bad flags, oversized, truncated, early close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    for _ in range(MESSAGES // 4):
        kind = rng.randrange(5)
        if kind == 0:
            s.sendall(_rand_bytes(rng, rng.randrange(1, 200)))
        elif kind == 1:
            mtype = rng.choice([*_TYPES, p.MSG_EVENT, 0, 65535])
            s.sendall(p.HEADER.pack(rng.randrange(0, 64), mtype, rng.getrandbits(16),
                                    rng.getrandbits(32)) + _rand_bytes(rng, 64))
        elif kind == 2:
            s.sendall(p.HEADER.pack(p.MAX_PAYLOAD + rng.randrange(1, 1 << 30), p.MSG_PING, 0, 1)
                      + _rand_bytes(rng, 100))
        elif kind == 3:
            s.sendall(p.encode(p.MSG_PING, p.F_REPLY, 5, b"not a request"))
        else:
            s.sendall(p.encode(p.MSG_PING, 0, 6, b"x" * 50)[: rng.randrange(1, 40)])
            break
    if rng.random() < 0.5:
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(1 << 16):
                pass
        except OSError:
            pass
    s.close()


def _flood(path: str, rng: random.Random) -> None:
    """Many connections at once, idle or with a header cut short, all dropped together."""
    socks = []
    try:
        for _ in range(rng.randrange(20, 80)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(path)
            if rng.random() < 0.3:
                s.sendall(p.HEADER.pack(100, p.MSG_PING, 0, 1)[: rng.randrange(1, 12)])
    finally:
        for s in socks:
            s.close()


def _never_reads(path: str, rng: random.Random) -> None:
    """Requests with big replies, never read, until the service stops reading them."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    msg = p.encode(p.MSG_PING, 0, 9, _rand_bytes(rng, 1) * rng.choice([4096, 65536, 500_000]))
    left = memoryview(msg)
    sent = 0
    try:
        while sent < 16 << 20:  # bounded: the service throttles it well before
            try:
                n = s.send(left)
            except BlockingIOError:
                break
            sent += n
            left = left[n:] if n < len(left) else memoryview(msg)
    finally:
        s.close()


_FUZZERS: list[Callable[[str, random.Random], object]] = [
    _structured, _structured, _structured, _chaos, _chaos, _flood, _never_reads,
]


def _well_formed_round(a: Actor, b: Actor, n: int) -> None:
    key, refs = a("share", b.domid, 2)
    data = bytes((n * 7 + i) & 0xFF for i in range(64))
    n = abs(n)
    a("write", key, 4096 + 10, data)
    m, handles = b("map", a.domid, refs)
    assert len(handles) == 2
    assert b("read", m, 4096 + 10, 64) == (data, 0)
    statuses, copied = b("copy_from", a.domid, refs[1], 10, 64)
    assert statuses == [abi.GNTST_okay] and copied == data
    b("unmap", m)
    a("try_unshare", key)
    with event_channel(a, b) as (pa, pb):
        a("ev", "notify", pa)
        assert b("ev", "wait", pb, 30) == pb
    a("xs", "write", "data/round", str(n))
    assert a("xs", "read", "data/round") == str(n).encode()
    a("xs", "rm", "data/round")


def _round(path: str, rng: random.Random) -> set[int]:
    """CONNS fuzzers at once, each in a thread with a random of its own; the domains
    the structured ones created (a failed fuzzer fails the test)."""
    created: set[int] = set()
    failures: list[BaseException] = []

    def run(fuzzer: Callable[[str, random.Random], object], seed: int) -> None:
        try:
            got = fuzzer(path, random.Random(seed))
            if isinstance(got, set):
                created.update(got)
        except BaseException as e:  # reported by the test's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(rng.choice(_FUZZERS), rng.getrandbits(64)))
               for _ in range(CONNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]
    return created


def test_fuzz_keeps_serving(world: tuple[Service, Actor, Actor]) -> None:
    svc, a, b = world
    rng = random.Random(SEED)
    _well_formed_round(a, b, -1)  # warm up: b keeps its grant-copy bounce pages
    before = stats(svc.path)
    start = time.monotonic()
    created: set[int] = set()
    rounds = 0
    for n in range(ROUNDS):
        if time.monotonic() - start > DEADLINE:
            break
        created |= _round(svc.path, rng)
        assert ping(svc.path)
        _well_formed_round(a, b, n)
        rounds += 1
    assert rounds >= 1
    assert 0 not in created
    # dom0 is still the token holder's: claimed now, it waits for the fuzzers' domains
    dom0 = Actor(svc, domid=0)
    try:
        for domid in sorted(created):
            dom0("wait_gone", domid)
    finally:
        dom0.close()
    after = stats(svc.path)
    before["domains"].pop("0", None)
    after["domains"].pop("0", None)
    for key in ("free_frames", "domains", "evtchn", "xenstore", "xenstore_watches", "notifies"):
        assert after[key] == before[key], key
    assert after["connections"] == before["connections"]
