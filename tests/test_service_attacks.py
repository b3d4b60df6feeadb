"""The service attacked by hostile domain processes, while a bystander keeps working.

Each attack of issue 14 that concerns the service's identity, socket and limits
is tried by a raw client speaking the protocol (:mod:`xengrant.service.protocol`)
or a domain process: claiming dom0, attaching without the secret, re-creating a
dead frontend's domid, reading the toolstack's view, floods of idle connections,
EMFILE, asking for limits over the caps, filling xenstore, never reading,
unknown commands, huge batches and teardowns under the lock.  Each must fail
with a clear error, the bystander pair's answers must stay the same, and the
service's counters and tables must say nothing leaked.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import closing, suppress
from typing import Any

import pytest

from service_helpers import TIMEOUT, Actor, ActorError, start_hypervisor
from xengrant import abi
from xengrant.errors import HypercallError
from xengrant.portable import CopySegment, GrantRef
from xengrant.service import Channel, Server, connect, stats
from xengrant.service import protocol as p
from xengrant.service.limits import Limits, RateLimitedLog
from xengrant.service.paths import check_server, peer_cred, read_token, token_path
from xengrant.service.server import Connection

V = p.PROTOCOL_VERSION
ANY = p.CREATE_REQ.pack(V, -1, 0, -1, -1, -1)
TABLES = ("free_frames", "domains", "evtchn", "xenstore", "xenstore_watches", "notifies")
#: the limits of the module's service (small, so that attacks reach them fast)
ARGS = ("--memory", "64", "--max-pages", "1024", "--max-maptrack-frames", "4",
        "--max-connections", "64", "--max-connections-per-uid", "48",
        "--xs-entries", "40", "--xs-watches", "8", "--max-unread", "256", "--quiet")


class CliService:
    """``xengrant hypervisor`` with :data:`ARGS` (or others) in a child process."""

    def __init__(self, *args: str, nofile: int | None = None, mode: int = 0o700) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg-attack-")
        os.chmod(self.dir, mode)
        self.path = os.path.join(self.dir, "xengrant.sock")
        self.proc = start_hypervisor(self.path, *(args or ARGS), nofile=nofile,
                                     stderr=subprocess.DEVNULL)

    def stop(self) -> int | None:
        self.proc.terminate()
        rc = self.proc.wait(TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[CliService, Actor, Actor, Actor]]:
    svc = CliService()
    dom0 = Actor(svc, domid=0)
    a, b = Actor(svc), Actor(svc)
    a("reap")
    b("reap")
    _bystander(a, b)  # warm up: b keeps its grant-copy bounce pages
    try:
        yield svc, dom0, a, b
    finally:
        for actor in (a, b, dom0):
            actor.close()
        assert svc.stop() == 0


def _bystander(a: Actor, b: Actor) -> tuple[bytes, list[int]]:
    """The bystanders' work: share, write, map, read, copy; the same answers every time."""
    key, refs = a("share", b.domid, 2)
    data = bytes(range(64))
    a("write", key, 4096 + 10, data)
    m, _handles = b("map", a.domid, refs)
    seen, sent = b("read", m, 4096 + 10, 64)
    statuses, copied = b("copy_from", a.domid, refs[1], 10, 64)
    b("unmap", m)
    a("try_unshare", key)
    assert sent == 0
    return seen + copied, statuses


def _settled(path: str, connections: int, tries: int = 200) -> dict[str, Any]:
    """STATS once the service has handled the hang-ups of connections closed just
    before (it may refuse or count them until then): each try is a round trip."""
    st: dict[str, Any] = {}
    for _ in range(tries):
        try:
            st = stats(path)
        except (ConnectionError, OSError):
            continue
        if st["connections"] <= connections and not st["unread_bytes_max"]:
            return st
    return st


def _raw(svc: Any) -> Channel:
    return Channel(svc.path, timeout=30)


def _bound(svc: Any) -> tuple[Channel, int]:
    """A raw connection bound to a new domain (its memfd closed)."""
    ch = _raw(svc)
    st, body = ch.call(p.MSG_CREATE, ANY)
    assert st == 0, body
    for fd in ch.take_fds():
        os.close(fd)
    return ch, p.DOMAIN_REPLY.unpack_from(body)[1]


@pytest.fixture
def bystander(world: tuple[CliService, Actor, Actor, Actor]) -> Iterator[dict[str, Any]]:
    """The bystanders' answers and the service's tables before the attack; both
    checked again after it."""
    svc, _dom0, a, b = world
    want = _bystander(a, b)
    before = stats(svc.path)
    yield before
    assert _bystander(a, b) == want
    after = _settled(svc.path, before["connections"])
    for key in TABLES:
        assert after[key] == before[key], key
    assert after["connections"] == before["connections"]
    assert after["unread_bytes_max"] == 0 and after["pending_requests"] == 0


# ----------------------------------------------------------------- identity
def test_dom0_is_not_for_the_asking(world: Any, bystander: dict[str, Any]) -> None:
    svc = world[0]
    token = read_token(token_path(svc.path))
    with closing(_raw(svc)) as raw:
        for extra in (b"", bytes(p.SECRET_SIZE), token[:-1] + bytes([token[-1] ^ 1])):
            st, body = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(V, 0, 0, -1, -1, -1) + extra)
            assert st in (-errno.EPERM, -errno.EBADMSG), body
        # the right token: dom0 was claimed once already (the fixture's), never again
        st, body = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(V, 0, 0, -1, -1, -1) + token)
        assert st == -errno.EPERM and b"claimed already" in body
        # nor does the token make an unbound connection's STATS a domain's
        st, _ = raw.call(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(abi.GNTTABOP_query_size, 1))
        assert st == -errno.EPROTO


def test_dom0_cannot_be_claimed_again_after_it_left() -> None:
    svc = CliService()
    try:
        dom0 = Actor(svc, domid=0)
        dom0.close()
        with pytest.raises(HypercallError) as ei:
            connect(svc.path, 0, timeout=30)  # the same uid, the right token
        assert ei.value.errno == errno.EPERM and "claimed already" in str(ei.value)
        assert "0" not in stats(svc.path)["domains"]
    finally:
        assert svc.stop() == 0


def test_attach_takes_the_secret(world: Any, bystander: dict[str, Any]) -> None:
    svc, dom0, _a, _b = world
    domid = dom0("dom", "create_domain", None)
    secret = dom0("dom", "domain_secret", domid)
    assert len(secret) == p.SECRET_SIZE
    with closing(_raw(svc)) as raw:
        wrong = bytes(b ^ 0xFF for b in secret)
        st, body = raw.call(p.MSG_ATTACH, p.ATTACH_REQ.pack(V, domid) + wrong)
        assert st == -errno.EACCES and b"not its secret" in body
        st, _ = raw.call(p.MSG_ATTACH, p.ATTACH_REQ.pack(V, domid))  # no secret at all
        assert st == -errno.EBADMSG
    with Actor(svc, domid=domid, secret=secret) as guest:
        assert guest.domid == domid
        with closing(_raw(svc)) as raw:  # the secret opened it once: not again
            st, _ = raw.call(p.MSG_ATTACH, p.ATTACH_REQ.pack(V, domid) + secret)
            assert st == -errno.EACCES
    with pytest.raises(ValueError, match="secret"):
        connect(svc.path, domid)


def test_a_dead_frontends_domid_is_not_to_be_had(world: Any, bystander: dict[str, Any]) -> None:
    svc, dom0, a, _b = world
    front = Actor(svc)
    dead = front.domid
    _key, (ref,) = front("share", a.domid, 1)  # a grant meant for a, the backend
    front.kill()
    dom0("wait_gone", dead)
    with closing(_raw(svc)) as raw:
        # an unprivileged CREATE picks no domid: not the dead one, not any other
        for want in (dead, dead + 1, 0x7FEF):
            st, body = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(V, want, 0, -1, -1, -1))
            assert st == -errno.EPERM and b"may not choose a domid" in body
    # the next domains get fresh ids (do_domctl's rover), not the dead one's
    with Actor(svc) as x, Actor(svc) as y:
        assert dead < x.domid < y.domid
        with pytest.raises(ActorError):
            x("map", dead, [ref])  # the grant died with its granter


def test_toolstack_view_is_dom0s(world: Any, bystander: dict[str, Any]) -> None:
    svc, dom0, a, _b = world
    ch, _domid = _bound(svc)
    with closing(ch):
        for mtype, payload in ((p.MSG_STATS, b""), (p.MSG_DEBUG_KEY, b"x"),
                               (p.MSG_DEBUG_KEY, b"G")):
            st, body = ch.call(mtype, payload)
            assert st == -errno.EPERM and b"not privileged" in body
        # a domU presenting the token is still a domU
        st, _ = ch.call(p.MSG_STATS, read_token(token_path(svc.path)))
        assert st == -errno.EPERM
    with closing(_raw(svc)) as raw:  # unbound: the token, or nothing
        for payload in (b"", bytes(p.SECRET_SIZE)):
            st, body = raw.call(p.MSG_STATS, payload)
            assert st == -errno.EPERM and b"token" in body
        st, _ = raw.call(p.MSG_DEBUG_KEY, b"e" + bytes(p.SECRET_SIZE))
        assert st == -errno.EPERM
    with pytest.raises(ActorError) as ei:
        a("dom", "destroy_domain", dom0.domid)
    assert ei.value.errno == errno.EPERM


def test_a_domain_dom0_destroyed_hears_it(world: Any, bystander: dict[str, Any]) -> None:
    svc, dom0, _a, _b = world
    with Actor(svc) as victim:
        dom0("dom", "destroy_domain", victim.domid)
        with pytest.raises(ActorError) as ei:
            victim("share", dom0.domid, 1)
        assert ei.value.errno == errno.ESRCH and "destroyed" in str(ei.value)
        with pytest.raises(ActorError) as ei:
            victim("xs", "read", "domid")
        assert ei.value.errno == errno.ESRCH and "destroyed" in str(ei.value)


#: an interpreter other uids may run (this one may live in root's home)
OTHER_PYTHON = "/usr/bin/python3"
_AS_OTHERS = pytest.mark.skipif(
    os.getuid() != 0 or not os.access(OTHER_PYTHON, os.X_OK),
    reason="needs root and a system python3 to run as other uids",
)


def _as_uid(uid: int, code: str) -> str:
    """Run ``code`` in a child of uid ``uid`` (this test runs as root); its stdout."""
    out = subprocess.run([OTHER_PYTHON, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT, preexec_fn=lambda: os.setuid(uid), check=True)
    return out.stdout.strip()


_RAW_CREATE = """
import socket, struct
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({path!r})
except OSError as e:
    print("connect", e.errno); raise SystemExit
try:
    s.sendall(struct.pack("<IHHI", 28 + len({extra!r}), 2, 0, 1)
              + struct.pack("<IiIiiq", {v}, {domid}, 0, -1, -1, -1) + {extra!r})
    data = s.recv(4096)
except OSError:
    data = b""
print("eof" if not data else "status %d" % struct.unpack_from("<i", data, 12)[0])
"""


@_AS_OTHERS
def test_other_uids() -> None:
    """The private directory keeps other uids out; admitted ones get a domain, never dom0."""
    svc = CliService()
    try:
        code = _RAW_CREATE.format(path=svc.path, v=V, domid=-1, extra=b"")
        assert _as_uid(65534, code) == f"connect {errno.EACCES}"  # the 0700 directory
    finally:
        svc.stop()
    svc = CliService("--allow-uid", "65533", "--quiet", mode=0o711)
    try:
        token = read_token(token_path(svc.path))
        assert _as_uid(65534, _RAW_CREATE.format(path=svc.path, v=V, domid=-1, extra=b"")) \
            == "eof"  # not admitted: SO_PEERCRED
        assert _as_uid(65533, _RAW_CREATE.format(path=svc.path, v=V, domid=-1, extra=b"")) \
            == "status 0"
        # even with the token, dom0 takes the service's uid
        claim = _RAW_CREATE.format(path=svc.path, v=V, domid=0, extra=token)
        assert _as_uid(65533, claim) == f"status {-errno.EPERM}"
        counters = stats(svc.path)["counters"]
        assert counters["refused_uid"] == 1
    finally:
        svc.stop()


@_AS_OTHERS
def test_client_refuses_a_strangers_service() -> None:
    d = tempfile.mkdtemp(prefix="xg-stranger-")
    os.chmod(d, 0o777)
    path = os.path.join(d, "squat.sock")
    code = (
        "import socket, sys, os\n"
        f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); os.chmod({path!r}, 0o666)\n"
        "s.listen(2); print('up', flush=True)\n"
        "for _ in range(2): c, _ = s.accept(); c.recv(1)\n"
    )
    squatter = subprocess.Popen([OTHER_PYTHON, "-c", code], stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.setuid(65534))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "up"
        with pytest.raises(PermissionError, match="served by uid 65534"):
            connect(path)
        sock = socket.socket(socket.AF_UNIX)
        with closing(sock):
            sock.connect(path)
            assert check_server(sock, path, frozenset({65534})).uid == 65534  # if trusted
    finally:
        squatter.kill()
        squatter.wait()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------- limits
def test_limits_over_the_caps_are_refused(world: Any, bystander: dict[str, Any]) -> None:
    svc, _dom0, a, _b = world
    with closing(_raw(svc)) as raw:
        for mgf, mmf, pages in ((-1, 2**31 - 1, -1), (-1, 5, -1), (65, -1, -1),
                                (-1, -1, 1025), (-1, -1, 2**62)):
            st, body = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(V, -1, 0, mgf, mmf, pages))
            assert st == -errno.EINVAL and b"over the service's" in body
    with Actor(svc) as hog:
        with pytest.raises(ActorError) as ei:
            hog("alloc", 1025)  # the default is the cap: 1024 frames
        assert ei.value.kind == "MemoryError"
        assert stats(svc.path)["domains"][str(hog.domid)]["tot_pages"] <= 1024
        # maptrack: 4 frames of 256 handles; a batch of 1,150 maps fails, all of it
        key, refs = a("share", hog.domid, 5)
        with pytest.raises(ActorError):
            hog("map", a.domid, refs * 230)
        dom = stats(svc.path)["domains"][str(hog.domid)]
        assert dom["maptrack_in_use"] == 0
        a("try_unshare", key)


def test_xenstore_quotas(world: Any, bystander: dict[str, Any]) -> None:
    svc, _dom0, _a, _b = world
    with Actor(svc) as x:
        with pytest.raises(ActorError) as ei:
            for i in range(41):
                x("xs", "write", f"data/n{i}", "v")
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(ActorError) as ei:
            for i in range(10):
                x("xs", "watch", f"data/n{i}", f"t{i}")
        assert ei.value.errno == errno.E2BIG


def test_unknown_commands_answer_enosys_and_nothing_else(
    world: Any, bystander: dict[str, Any]
) -> None:
    svc = world[0]
    ch, _domid = _bound(svc)
    with closing(ch):
        for cmd in (999, 0x7FFFFFFF, abi.GNTTABOP_cache_flush + 1000):
            st, body = ch.call(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(cmd, 1) + bytes(4096))
            assert st == 0
            rc, n = p.I32.unpack_from(body)[0], p.U32.unpack_from(body, 4)[0]
            # do_grant_table_op: bits above GNTTABOP_CMD_MASK (0xfff) are -EINVAL
            # (only cache_flush carries a continuation there), unknown commands -ENOSYS
            want = -errno.EINVAL if cmd & ~0xFFF else -errno.ENOSYS
            assert rc == want and n == 0
            assert body[8:] == p.U32.pack(0) + p.pack_reasons([])  # no p2m, no reasons
        st, _ = ch.call(999, b"x" * 100)
        assert st == -errno.ENOSYS


def test_idle_connection_flood(world: Any, bystander: dict[str, Any]) -> None:
    """1,100 idle connections: those over the caps are closed at once, nothing else changes."""
    svc, _dom0, a, b = world
    before = stats(svc.path)["counters"]["refused_conns"]
    socks: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX)
            socks.append(s)
            s.connect(svc.path)  # blocking: waits while the backlog is full
            s.settimeout(30)
        _bystander(a, b)  # served all along
        for s in socks:  # the refused ones were closed: a ping gets no answer
            with suppress(OSError):
                s.sendall(p.encode(p.MSG_PING, 0, 1, b"hi"))
            try:
                refused += s.recv(64) == b""
            except OSError:
                refused += 1
    finally:
        for s in socks:
            s.close()
    # 48 per uid (the bystanders and stats hold some of them)
    assert 1100 - 48 <= refused < 1100
    after = _settled(svc.path, 3)
    assert after["counters"]["refused_conns"] - before == refused


def test_accept_failing_with_emfile_backs_off() -> None:
    svc = CliService("--max-connections", "1000", "--max-connections-per-uid", "1000",
                     "--quiet", nofile=64)
    socks: list[socket.socket] = []
    try:
        a, b = Actor(svc), Actor(svc)
        want = _bystander(a, b)
        key, refs = a("share", b.domid, 1)  # what they keep using during the flood
        m, _ = b("map", a.domid, refs)
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(svc.path)
            except (BlockingIOError, InterruptedError):
                pass  # the backlog is full: the service is not accepting
            socks.append(s)
        # the service holds all the descriptors it may (it polls for its backlog again
        # now and then): observed in /proc, waiting for that state, not for a time
        fds = f"/proc/{svc.proc.pid}/fd"
        for _ in range(6000):
            if len(os.listdir(fds)) >= 63:
                break
            select.select([], [], [], 0.005)
        assert len(os.listdir(fds)) >= 63
        # the service lives, and serves them (what needs no new descriptor: a new
        # page of memory does, and waits for the flood to end)
        for i in range(3):
            a("write", key, 0, b"flood %d" % i)
            assert b("read", m, 0, 7) == (b"flood %d" % i, 0)
            a("xs", "write", "data/flood", str(i))
            assert a("xs", "read", "data/flood") == str(i).encode()
        for s in socks:
            s.close()
        socks.clear()
        b("unmap", m)
        a("try_unshare", key)
        assert _bystander(a, b) == want
        with Actor(svc) as c:
            assert c("xs", "read", "domid") == str(c.domid).encode()
        counters = stats(svc.path)["counters"]
        assert counters["accept_errors"] >= 1, str(counters)
        a.close()
        b.close()
    finally:
        for s in socks:
            s.close()
        assert svc.stop() == 0


def test_a_client_that_never_reads_is_throttled(world: Any, bystander: dict[str, Any]) -> None:
    svc, _dom0, a, b = world
    ch, _domid = _bound(svc)
    sock = ch.sock
    sock.setblocking(False)
    ping = p.encode(p.MSG_PING, 0, 7, b"z" * 65536)
    sent = 0
    left = memoryview(ping)
    try:
        while True:  # until the service stops reading it: it throttled it
            try:
                n = sock.send(left)
                sent += n
                left = left[n:] if n < len(left) else memoryview(ping)  # whole messages
                continue
            except BlockingIOError:
                pass
            st = stats(svc.path)
            # throttled: its thread reads none of its requests now, whether or not some it
            # read already wait (pending_requests); asking for both waited TIMEOUT per turn
            # when the thread had stopped with none pending (its replies over the high mark)
            if st["counters"]["throttled"] >= 1:
                break
            select.select([], [sock], [], TIMEOUT)  # merely busy: it will read again
        assert sent > 256 << 10
        # queued for it: within the bound (256 KiB, one read's replies over it)
        assert 0 < st["unread_bytes_max"] <= (256 << 10) + (1 << 20)
        _bystander(a, b)
        for _ in range(3):  # reading lets it go on: more of its requests are read
            with suppress(BlockingIOError):
                while sock.recv(1 << 20):
                    pass
    finally:
        ch.close()


# ------------------------------------------------------------- preemption
class InProcess:
    """A Server with small preemption chunks in a thread of this process."""

    def __init__(self, limits: Limits) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg-preempt-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        self.server = Server(self.path, 64 << 20, log=lambda s: None, limits=limits)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"close": False}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(30)
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Bystander:
    """At the first preemption point of ``kind`` (the service lock held), ``c`` maps
    one page of ``granter`` in a thread of its own; the point waits until that
    request waits for the lock, then hands the lock over as any point does.  Every
    point records ``c``'s mappings in the service and ``progress()``, so the map is
    placed between two chunk boundaries, with no clock involved."""

    def __init__(self, srv: Server, kind: str, c: Any, granter: int, ref: int,
                 progress: Any) -> None:
        self.srv, self.kind, self.c, self.granter, self.ref = srv, kind, c, granter, ref
        self.progress = progress
        #: (c's mappings, progress) at each preemption point, before it hands over
        self.points: list[tuple[int, int]] = []
        #: threads waiting for the lock at the point the map was sent from
        self.waiting = 0
        self.mapping: Any = None
        self.read = b""
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _map(self) -> None:
        try:
            self.mapping = self.c.gnttab.map_grant_ref(self.granter, self.ref)
            self.read = bytes(self.mapping.mem[:5])
        except BaseException as e:  # pragma: no cover - reported by the test
            self.error = e

    def __call__(self, kind: str) -> None:
        if kind != self.kind:
            return
        cid = self.c.domid
        self.points.append((self.srv.hv.domains[cid].maptrack.in_use, self.progress()))
        if self.thread is None:
            self.thread = threading.Thread(target=self._map)
            self.thread.start()
            # deterministic, not a time: the bystander's request now waits for the lock
            assert self.srv.lock.wait_for_waiters(1, 60)
            self.waiting = self.srv.lock.waiting

    def answered_at(self) -> int:
        """The first preemption point at which the bystander's map was in."""
        return next(i for i, (maps, _left) in enumerate(self.points) if maps)

    def finish(self) -> None:
        assert self.thread is not None
        self.thread.join(60)
        assert self.error is None, self.error
        self.mapping.unmap()
        self.c.sync()


def test_a_huge_batch_hands_the_lock_to_a_bystander() -> None:
    """A 64-op copy batch runs 8 ops at a time (7 preemption points).  A bystander's
    one-page map that waits for the lock at the first point is answered there: the
    batch hands the lock over, with no sleep, and goes on once the map is in, so the
    next point sees it mapped while the batch still has 48 ops to go."""
    svc = InProcess(Limits(preempt_ops=8))
    try:
        with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b, \
                connect(svc.path, timeout=30) as c:
            srv = svc.server
            big = a.grant_table.share_pages(b.domid, 8)
            small = a.grant_table.share_pages(c.domid, 1)
            small.mem[:5] = b"small"

            def yields() -> int:
                return srv.counters["batch_yields"]

            by = _Bystander(srv, "batch", c, a.domid, small.refs[0], yields)
            srv.on_preempt = by
            bufs = [bytearray(16) for _ in range(64)]
            segs = [CopySegment(GrantRef(a.domid, big.refs[i % 8], 16 * (i // 8)), bufs[i], 16)
                    for i in range(64)]
            assert b.gnttab.grant_copy(segs) == [abi.GNTST_okay] * 64
            srv.on_preempt = None
            by.finish()
            assert by.read == b"small"
            assert len(by.points) == 7 and srv.counters["batch_yields"] == 7
            assert srv.counters["preempted_batches"] == 1
            # not mapped at the first point; mapped at the next one (or, if other
            # threads waited too, within as many more): chunk boundaries, not time
            assert by.points[0][0] == 0
            assert 1 <= by.answered_at() <= by.waiting < 7
            assert srv.counters["preempt_handoffs"] >= 1
            b.sync()
            big.unshare()
            small.unshare()
    finally:
        svc.close()


def test_a_big_teardown_hands_the_lock_to_a_bystander() -> None:
    """A domain holding 200 mappings is torn down 16 handles at a time.  A bystander's
    one-page map that waits for the lock at the first preemption point is answered
    at that point: at the next one it is mapped while the dying domain still holds
    mappings, so it was answered before the teardown finished."""
    svc = InProcess(Limits(preempt_teardown=16))
    try:
        with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as c:
            srv = svc.server
            b = connect(svc.path, timeout=30)
            share = a.grant_table.share_pages(b.domid, 200)
            small = a.grant_table.share_pages(c.domid, 1)
            small.mem[:5] = b"still"
            mapping = b.gnttab.map_domain_grant_refs(a.domid, list(share.refs))
            assert len(mapping.handles) == 200
            bid = b.domid

            refs = set(share.refs)

            def left() -> int:  # a's grants the dying b still maps (pinned)
                return len(refs & set(srv.hv.domains[a.domid].gt.active))

            by = _Bystander(srv, "teardown", c, a.domid, small.refs[0], left)
            srv.on_preempt = by
            with warnings.catch_warnings():  # b leaves holding them: the service tears down
                warnings.simplefilter("ignore")
                b.close()  # returns once the teardown is done
                del mapping
                gc.collect()
            srv.on_preempt = None
            by.finish()
            assert by.read == b"still"
            at = by.answered_at()
            assert by.points[0] == (0, 200)  # the walk starts at the top of the maptrack
            assert 1 <= at <= by.waiting
            assert by.points[at][1] > 0  # the dying domain still held mappings then
            assert len(by.points) >= 200 // 16 and srv.counters["teardown_yields"] >= 200 // 16
            assert srv.counters["preempt_handoffs"] >= 1
            assert bid not in srv.hv.domains or srv.hv.domains[bid].is_dying
            share.try_unshare()
            small.unshare()
    finally:
        svc.close()


# ------------------------------------------------------------------- units
def test_stats_and_debug_keys_are_bounded(tmp_path: Any) -> None:
    srv = Server(str(tmp_path / "s.sock"), 16 << 20, log=lambda s: None, token_file=False)
    try:
        srv.xs.mkdir(0, "/big")
        for i in range(700):  # dom0 may: no quota; 1.4 MiB of values
            srv.xs.write(0, f"/big/n{i}", b"v" * 2000)
        a, b = socket.socketpair()
        with closing(a), closing(b):
            conn = Connection(a, 1, peer_cred(a))
            body = srv._stats(conn, srv.token)
            assert len(body) <= p.MAX_PAYLOAD
            snap = json.loads(body[4:])
            assert "xenstore" in snap["truncated"] and snap["xenstore"] == {}
            assert snap["xenstore_nodes"] > 700
            text = srv._debug_key(conn, b"x" + srv.token)
            assert len(text) <= p.MAX_PAYLOAD and b"\n[truncated: " in text
            with pytest.raises(Exception) as ei:
                srv._stats(conn, bytes(p.SECRET_SIZE))
            assert getattr(ei.value, "errno", None) == errno.EPERM
    finally:
        srv.close()


def test_rate_limited_log() -> None:
    lines: list[str] = []
    now = [0.0]
    log = RateLimitedLog(lines.append, burst=3, interval=5.0, clock=lambda: now[0])
    said = [log("d7", f"bad {i}") for i in range(10)]
    assert said == [True] * 3 + [False] * 7 and log.suppressed == 7
    assert log("d8", "other") is True  # per key
    now[0] = 5.0
    assert log("d7", "again") is True
    assert lines == ["bad 0", "bad 1", "bad 2", "other",
                     "(7 more lines about d7 suppressed)", "again"]
