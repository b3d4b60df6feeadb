"""The request ring of a service connection (``service/ring.py``, ``_ring.c``).

- its layout against ``xen/io/ring.h`` (``DEFINE_RING_TYPES``), compiled;
- the C calls of both ends on a page in this process: the slots they write,
  the indices, when they notify (an eventfd to read), bogus indices;
- (the client's I/O, C and Python, and what its responses mean:
  ``tests/test_ring_client_diff.py``);
- end to end through a service in this process: a sleeping service and a
  sleeping client are kicked, a full ring falls back to the socket, a
  posted socket request keeps one-op maps off the ring until it is
  answered, a failed op is answered on the socket, ``MSG_RING_SETUP``'s
  errors, and a client that scribbles on its ring (dropped, nobody else
  disturbed, nothing leaked).
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compat
from ring_page import RingPage
from xengrant import _cext, abi
from xengrant.emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW
from xengrant.errors import GrantError
from xengrant.guest.ops import MAP_OP, UNMAP_OP
from xengrant.service import connect, stats
from xengrant.service import protocol as p
from xengrant.service import ring as r
from xengrant.service.client import RemoteDomain, ServiceError
from xengrant.service.server import Server

RING_H = Path("/usr/include/xen/io/ring.h")
GFN, REF, DOM, HANDLE, MFN = 0x10_0005, 7, 3, 9, 42
RW = abi.GNTMAP_host_map
GRANT_TYPES = (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)


# ------------------------------------------------------------------ layout
C_LAYOUT = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/io/ring.h>
struct xg_request { uint32_t id; uint16_t cmd; uint16_t flags; uint8_t op[56]; };
struct xg_response { uint32_t id; uint16_t cmd; int16_t kind; uint8_t op[32];
                     int64_t mfn; int64_t p2mt; uint8_t pad[8]; };
DEFINE_RING_TYPES(xg, struct xg_request, struct xg_response);
int main(void)
{
    printf("%zu %zu %zu %zu %zu %zu %u\n", offsetof(struct xg_sring, req_prod),
           offsetof(struct xg_sring, req_event), offsetof(struct xg_sring, rsp_prod),
           offsetof(struct xg_sring, rsp_event), offsetof(struct xg_sring, ring),
           sizeof(union xg_sring_entry), (unsigned)__CONST_RING_SIZE(xg, 4096));
    return 0;
}
"""


def test_layout_is_io_ring_h() -> None:
    """The indices, the slots' start and size, and ``__CONST_RING_SIZE`` over one
    page, as the C compiler sees ``DEFINE_RING_TYPES`` in ``xen/io/ring.h``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not RING_H.exists() or cc is None:
        if os.environ.get("CI"):
            pytest.fail("xen/io/ring.h (libxen-dev) or a C compiler is missing")
        pytest.skip("xen/io/ring.h (libxen-dev) or a C compiler is missing")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "ring.c"), os.path.join(d, "ring")
        Path(src).write_text(C_LAYOUT)
        subprocess.run([cc, "-std=c11", "-o", exe, src], check=True)
        got = [int(v) for v in subprocess.run([exe], check=True, capture_output=True,
                                               text=True).stdout.split()]
    assert got == [0, 4, 8, 12, r.RING_HDR, r.RING_SLOT, r.RING_SIZE]
    assert r.RING_HDR + r.RING_SIZE * r.RING_SLOT <= r.RING_PAGE


# ------------------------------------------------------------------ pieces
class Page(RingPage):
    """:class:`ring_page.RingPage` with the client's posts and the service's answers."""

    def indices(self) -> tuple[int, int, int, int]:
        got: tuple[int, int, int, int] = r.INDICES.unpack_from(self.mem)
        return got

    @staticmethod
    def kicked(fd: int) -> int:
        """How many kicks the eventfd holds (and clears them)."""
        try:
            return compat.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def post_map(self, seq: int, gfn: int = GFN, lock: Any = None) -> int:
        got: int = _cext.ring_post_map(self.mem, self.front, lock, self.svc_kick, seq, gfn, RW,
                                       REF, DOM)
        return got

    def post_unmap(self, seq: int, gfn: int = GFN) -> int:
        got: int = _cext.ring_post_unmap(self.mem, self.front, None, self.svc_kick, seq, gfn,
                                         HANDLE)
        return got

    def respond(self, idx: int, seq: int, cmd: int, kind: int = r.RSP_DONE, op: bytes = b"",
                mfn: int = -1, p2mt: int = 0) -> None:
        """Write a response at slot idx and push rsp_prod to idx + 1 (as the service)."""
        body = r.SLOT_HEAD.pack(seq, cmd, kind) + op.ljust(32, b"\0") + r.SLOT_P2M.pack(mfn, p2mt)
        self.put_slot(idx, body)
        struct.pack_into("<I", self.mem, 8, idx + 1)


@pytest.fixture
def page() -> Iterator[Page]:
    pg = Page()
    try:
        yield pg
    finally:
        pg.close()


def test_post_writes_the_slot_and_notifies_once(page: Page) -> None:
    """A request is the op as grant_table.h lays it out after (id, cmd, flags);
    req_prod moves; only the push that crosses req_event kicks the service."""
    lock = threading.Lock()
    assert page.post_map(5, lock=lock) == 1 and not lock.locked()
    assert page.slot(0) == struct.pack("<IHH", 5, abi.GNTTABOP_map_grant_ref, 0) + MAP_OP.pack(
        GFN << 12, RW, REF, DOM, 0, 0, 0) + bytes(24)
    assert page.indices()[0] == 1 and page.kicked(page.svc_kick) == 1  # req_event was 1
    assert page.post_unmap(6) == 1
    assert page.slot(1) == struct.pack("<IHH", 6, abi.GNTTABOP_unmap_grant_ref, p.F_POSTED) + (
        UNMAP_OP.pack(GFN << 12, 0, HANDLE, 0) + bytes(32))
    assert page.indices()[0] == 2 and page.kicked(page.svc_kick) == 0  # nobody asked
    struct.pack_into("<I", page.mem, 4, 3)  # the service sleeps: req_event = req_cons + 1
    assert page.post_map(7) == 1 and page.kicked(page.svc_kick) == 1
    assert struct.unpack_from("<II", page.front) == (3, 0)


def test_post_refuses_what_does_not_fit_and_a_full_ring(page: Page) -> None:
    assert page.post_map(1, gfn=1 << 52) == 0  # host_addr would not fit
    assert _cext.ring_post_unmap(page.mem, page.front, None, -1, 1, GFN, 1 << 32) == 0
    assert page.indices()[0] == 0
    for seq in range(r.RING_SIZE):
        assert page.post_unmap(seq) == 1
    assert page.post_map(99) == -1  # RING_FULL: no response consumed yet
    assert page.indices()[0] == r.RING_SIZE
    with pytest.raises(ValueError):
        _cext.ring_post_map(bytearray(100), page.front, None, -1, 1, GFN, RW, REF, DOM)


def test_take_and_redirect(page: Page) -> None:
    """The service's side: ring_take copies the next slot out; a redirect is
    an RSP_SOCKET response, pushed, kicking a client that sleeps."""
    assert _cext.ring_take(page.mem, page.back) is None
    page.post_map(11)
    slot = _cext.ring_take(page.mem, page.back)
    assert slot == page.slot(0) and struct.unpack_from("<I", page.back) == (1,)
    seq, cmd, flags, payload = r.request(slot)
    assert (seq, cmd, flags) == (11, abi.GNTTABOP_map_grant_ref, 0)
    assert payload == p.GNTTAB_REQ.pack(cmd, 1) + MAP_OP.pack(GFN << 12, RW, REF, DOM, 0, 0, 0)
    _cext.ring_redirect(page.mem, page.back, 11, cmd, page.cli_kick)
    assert page.slot(0)[:8] == r.SLOT_HEAD.pack(11, cmd, r.RSP_SOCKET)
    assert page.indices()[2] == 1 and page.kicked(page.cli_kick) == 1  # rsp_event was 1
    seq, cmd, flags, payload = r.request(struct.pack("<IHH", 3, 77, 0) + bytes(56))
    assert payload == p.GNTTAB_REQ.pack(77, 1) + bytes(56)  # for the handler to refuse


@pytest.mark.parametrize("ahead", [r.RING_SIZE + 1, 1 << 31, 0xFFFFFFFF])
def test_bogus_req_prod_is_an_error_not_a_read(page: Page, ahead: int) -> None:
    """A front end more than a ring ahead (RING_REQUEST_PROD_OVERFLOW): every
    service call refuses it, and req_cons does not move."""
    struct.pack_into("<I", page.mem, 0, ahead)
    with pytest.raises(ValueError, match="past req_cons"):
        _cext.ring_take(page.mem, page.back)
    with pytest.raises(ValueError, match="past req_cons"):
        _cext.ring_serve_wait(-1, bytearray(16), 0, page.mem, page.back, -1, -1, None, None, [],
                              None, None, None, None, False)
    assert bytes(page.back) == bytes(8)


# ------------------------------------------------------------ end to end
class InProcess:
    """A Server in a thread of this process (its log kept)."""

    def __init__(self, spin: float = 100e-6) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg-ring-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        self.log: list[str] = []
        self.server = Server(self.path, 64 << 20, log=self.log.append, spin=spin)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"close": False}, daemon=True)
        self.thread.start()

    def free_frames(self) -> int:
        with self.server.lock:
            n: int = self.server.hv.machine.free_frames
            return n

    def close(self) -> None:
        self.server.stop()
        self.thread.join(30)
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=[100e-6, 0.0], ids=["polls", "sleeps"])
def svc(request: pytest.FixtureRequest) -> Iterator[InProcess]:
    s = InProcess(spin=request.param)
    try:
        yield s
    finally:
        s.close()


def map_cycles(a: RemoteDomain, b: RemoteDomain, n: int) -> None:
    share = a.grant_table.share_pages(b.domid, 2)
    try:
        for i in range(n):
            share.mem[i % 2 * 4096] = i & 0xFF
            with b.gnttab.map_grant_ref(a.domid, share.refs[i % 2]) as m:
                assert m.mem[0] == i & 0xFF
                m.mem[1] = 0xA5
            assert share.mem[i % 2 * 4096 + 1] == 0xA5
        b.sync()
    finally:
        share.unshare(timeout=30)


@pytest.mark.parametrize("client_spin", [200e-6, 0.0], ids=["client-polls", "client-sleeps"])
def test_maps_on_the_ring_whoever_sleeps(svc: InProcess, client_spin: float) -> None:
    """Each side sleeps or polls: a sleeping one is kicked (else the map times
    out); the bytes cross both ways; the maps went on the ring, nothing leaks."""
    free = svc.free_frames()
    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30, spin=client_spin) as b:
        assert b.channel.ring is not None
        sent = b.channel.sent
        map_cycles(a, b, 60)
        front = b.channel.ring
        assert struct.unpack_from("<I", front.mem)[0] == 120  # 60 maps, 60 unmaps
        assert b.channel.sent - sent >= 120
        assert not b.channel.calls.posted
        grant_maps = [g for g, (_m, t) in b.hypercalls.p2m.items() if t in GRANT_TYPES]
        assert grant_maps == []
    assert svc.free_frames() == free and not svc.log


def test_a_full_ring_falls_back_to_the_socket(svc: InProcess) -> None:
    """More posted unmaps than the ring holds while nobody consumes its
    responses: the rest go on the socket; all are done, every hole comes back."""
    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b:
        share = a.grant_table.share_pages(b.domid, 1)
        maps = [b.gnttab.map_grant_ref(a.domid, share.refs[0]) for _ in range(2 * r.RING_SIZE)]
        gfns = [m.resource[0] for m in maps]
        with b.channel._ring_rx:  # as if another thread consumed them: nobody does
            for m in maps:
                m.unmap()
            assert len(b.channel._sock_posted) == r.RING_SIZE
        ring = b.channel.ring
        assert ring is not None
        before = struct.unpack_from("<I", ring.mem)[0]
        # the next one-op map goes on the socket, and reads those unmaps' replies first
        m = b.gnttab.map_grant_ref(a.domid, share.refs[0])
        assert struct.unpack_from("<I", ring.mem)[0] == before
        assert not b.channel._socket_posted()  # answered: the ring is free again
        m.unmap()
        assert struct.unpack_from("<I", ring.mem)[0] == before + 1
        b.sync()
        assert not b.channel.calls.posted and not b.channel._socket_posted()
        assert not set(gfns) & set(b.hypercalls.p2m)
        got = b.get_pages(len(gfns))
        assert set(got) == set(gfns)  # every hole back (the allocator had no others free)
        b.put_pages(got)
        share.unshare(timeout=30)


def test_a_posted_socket_request_keeps_one_op_maps_off_the_ring(svc: InProcess) -> None:
    """A posted batch unmap went on the socket: until its reply is read, a one-op
    map goes on the socket too (on the ring it could run first)."""
    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b:
        share = a.grant_table.share_pages(b.domid, 2)
        ring = b.channel.ring
        assert ring is not None
        b.gnttab.map_domain_grant_refs(a.domid, share.refs).unmap()  # posted, socket
        assert b.channel._sock_posted
        before = struct.unpack_from("<I", ring.mem)[0]
        m = b.gnttab.map_grant_ref(a.domid, share.refs[0])  # on the socket: reads the reply
        assert struct.unpack_from("<I", ring.mem)[0] == before
        assert not b.channel._socket_posted()
        m.unmap()  # on the ring again
        assert struct.unpack_from("<I", ring.mem)[0] == before + 1
        b.sync()
        share.unshare(timeout=30)


def test_a_refused_map_is_answered_on_the_socket(svc: InProcess) -> None:
    """A map the service refuses is answered on the socket (Xen's GNTST code and
    reason), the ring response says so; the hole goes back."""
    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b:
        hole = b.get_pages(1)
        b.put_pages(hole)
        with pytest.raises(GrantError) as ei:
            b.gnttab.map_grant_ref(a.domid, 5000)
        assert ei.value.status == abi.GNTST_bad_gntref and "ref 5000" in str(ei.value)
        ring = b.channel.ring
        assert ring is not None and struct.unpack_from("<I", ring.mem)[0] == 1
        slot = bytes(ring.mem[r.RING_HDR : r.RING_HDR + 8])
        assert r.SLOT_HEAD.unpack(slot)[2] == r.RSP_SOCKET
        assert b.get_pages(1) == hole


def test_ring_setup_errors(svc: InProcess) -> None:
    with connect(svc.path, timeout=30) as b:
        status, body = b.channel.call(p.MSG_RING_SETUP)
        assert status == -errno.EEXIST and b"has its ring" in body
        assert b.channel.take_fds() == []
        status, _ = b.channel.call(p.MSG_RING_SETUP, b"x")
        assert status == -errno.EBADMSG
    with connect(svc.path, timeout=30, ring=False) as c:
        assert c.channel.ring is None
        c.channel.want_fds = True
        status, _ = c.channel.call(p.MSG_RING_SETUP)
        fds = c.channel.take_fds()
        assert status == 0 and len(fds) == 3
        for fd in fds:
            os.close(fd)


def test_ring_setup_needs_a_domain(svc: InProcess) -> None:
    from xengrant.service.client import Channel

    ch = Channel(svc.path, timeout=30)
    try:
        status, body = ch.call(p.MSG_RING_SETUP)
        assert status == -errno.EPROTO and b"CREATE or ATTACH" in body
    finally:
        ch.close()


def test_the_ring_page_is_sealed(svc: InProcess) -> None:
    """The client cannot shrink the page under the service's mapping."""
    with connect(svc.path, timeout=30, ring=False) as c:
        c.channel.want_fds = True
        assert c.channel.call(p.MSG_RING_SETUP)[0] == 0
        memfd, kick, wait = c.channel.take_fds()
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(memfd, 0)
            assert os.fstat(memfd).st_size == r.RING_PAGE
        finally:
            for fd in (memfd, kick, wait):
                os.close(fd)


SCRIBBLE = st.lists(
    st.tuples(st.integers(0, r.RING_PAGE - 1), st.binary(min_size=1, max_size=64)),
    min_size=1, max_size=8,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=SCRIBBLE, kick=st.booleans())
def test_a_client_scribbling_on_its_ring_harms_nobody_else(
    writes: list[tuple[int, bytes]], kick: bool, shared_svc: InProcess
) -> None:
    """Random bytes anywhere in a client's ring page (indices included), then a
    kick or a socket request: the service answers or drops that client, and
    another one maps, reads and unmaps as before; nothing leaks."""
    svc = shared_svc
    free = svc.free_frames()
    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b:
        evil = connect(svc.path, timeout=30)
        bad = f" d{evil.domid}>"  # how the service's log names its connection
        try:
            ring = evil.channel.ring
            assert ring is not None
            for off, data in writes:
                ring.mem[off : off + len(data)] = data[: r.RING_PAGE - off]
            if kick:
                compat.eventfd_write(ring.kick, 1)
            try:
                evil.channel.call(p.MSG_PING)
            except ServiceError:
                pass  # dropped: its ring's indices were bogus
        finally:
            evil.close()
        map_cycles(a, b, 4)
    assert svc.free_frames() == free
    assert all(bad in line for line in svc.log), svc.log  # only the scribbler is reported
    svc.log.clear()


@pytest.fixture(scope="module")
def shared_svc() -> Iterator[InProcess]:
    s = InProcess()
    try:
        yield s
    finally:
        s.close()


def test_stats_show_each_domains_ring(svc: InProcess) -> None:
    """``xengrant`` stats: a domain's ring indices (every request consumed and
    answered after a sync), None for a domain without a ring."""
    from xengrant.service import stats

    with connect(svc.path, timeout=30) as a, connect(svc.path, timeout=30) as b, \
            connect(svc.path, timeout=30, ring=False) as c:
        map_cycles(a, b, 3)
        doms = stats(svc.path)["domains"]
        assert doms[str(b.domid)]["ring"] == {
            "req_prod": 6, "req_cons": 6, "rsp_prod": 6, "rsp_prod_pvt": 6,
            "req_event": doms[str(b.domid)]["ring"]["req_event"],
            "rsp_event": doms[str(b.domid)]["ring"]["rsp_event"],
        }
        assert doms[str(a.domid)]["ring"]["req_prod"] == 0
        assert doms[str(c.domid)]["ring"] is None


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_a_service_that_does_not_answer_in_time_is_dead(ring: bool) -> None:
    """A one-page map the service cannot answer within the connection's timeout
    (it is held up under its lock): ETIMEDOUT, and the connection is closed, so
    every later call fails at once and the domain goes, as when its process
    dies: once the service runs again it tears the domain down (the granter's
    unshare ends: nothing maps the page); a bystander's map is unchanged and
    every frame comes back."""
    svc = InProcess()
    try:
        free = svc.free_frames()
        with connect(svc.path, timeout=30) as a, \
                connect(svc.path, timeout=30, ring=ring) as b, \
                connect(svc.path, timeout=30) as c:
            share = a.grant_table.share_pages(b.domid, 1)
            bystander = a.grant_table.share_pages(c.domid, 1)
            bystander.mem[:2] = b"by"
            b.gnttab.map_grant_ref(a.domid, share.refs[0]).unmap()  # tables set up
            b.sync()
            mapped = b.gnttab.map_grant_ref(a.domid, share.refs[0])
            b.channel.timeout = 0.2
            with svc.server.lock, pytest.raises(ServiceError) as ei:  # it cannot answer
                b.gnttab.map_grant_ref(a.domid, share.refs[0])
            assert ei.value.errno == errno.ETIMEDOUT
            with pytest.raises(ServiceError) as ei:  # dead: nothing is sent any more
                b.evtchn.status(0)
            assert ei.value.errno == errno.ETIMEDOUT
            share.unshare(timeout=30)  # ends: the service destroyed b, both maps gone
            with c.gnttab.map_grant_ref(a.domid, bystander.refs[0]) as m:
                assert bytes(m.mem[:2]) == b"by"
            del mapped  # (its unmap fails quietly: the connection is gone)
            b.close()  # nothing to raise
            c.sync()
            bystander.unshare(timeout=30)
        assert svc.free_frames() == free
    finally:
        svc.close()


POLL_SYSCALLS = {"7", "271"}  # x86-64 poll, ppoll


class Interrupted(Exception):
    """What the test's SIGUSR1 handler raises (as Ctrl-C raises KeyboardInterrupt)."""


def _in_poll(native: int) -> bool:
    with open(f"/proc/self/task/{native}/syscall") as f:
        return f.read().split(" ", 1)[0] in POLL_SYSCALLS


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_a_signal_during_a_map_is_raised_once_the_map_is_in(ring: bool) -> None:
    """A signal handler raises while a one-page map waits for the service (held
    up under its lock): the map is not given up; once the service answers, the
    mapping nobody will get is unmapped (posted) and the handler's exception
    raised.  Nothing stays mapped or pinned, the hole comes back, the next map
    works."""
    import signal

    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/<pid>/task/<tid>/syscall")
    ran = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        ran.set()
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)
    svc = InProcess()
    try:
        with connect(svc.path, timeout=30) as a, \
                connect(svc.path, timeout=30, ring=ring, spin=0) as b:
            share = a.grant_table.share_pages(b.domid, 1)
            share.mem[:2] = b"ok"
            b.gnttab.map_grant_ref(a.domid, share.refs[0]).unmap()  # tables set up
            b.sync()
            hole = b.get_pages(1)
            b.put_pages(hole)
            me, native = threading.get_ident(), threading.get_native_id()
            held = threading.Event()

            def service() -> None:
                with svc.server.lock:  # the service cannot answer meanwhile
                    held.set()
                    while not _in_poll(native):
                        pass
                    signal.pthread_kill(me, signal.SIGUSR1)
                    ran.wait(30)  # the handler raised ...
                    while not _in_poll(native):  # ... and the map waits on
                        pass

            t = threading.Thread(target=service, daemon=True)
            t.start()
            held.wait(30)
            with pytest.raises(Interrupted):
                b.gnttab.map_grant_ref(a.domid, share.refs[0])
            t.join(30)
            b.sync()
            assert not b.channel.calls.posted and not b.channel.calls.waiting
            assert stats(svc.path)["domains"][str(a.domid)]["active"] == {}
            assert hole[0] not in b.hypercalls.p2m
            assert b.get_pages(1) == hole  # a hole again
            b.put_pages(hole)
            with b.gnttab.map_grant_ref(a.domid, share.refs[0]) as m:
                assert bytes(m.mem[:2]) == b"ok"
            b.sync()
            share.unshare(timeout=30)
        assert not svc.log
    finally:
        svc.close()
        signal.signal(signal.SIGUSR1, old)
