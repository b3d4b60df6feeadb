"""The hypervisor as a service: several domain processes share, map and copy.

A ``xengrant hypervisor`` runs in one process, each domain in its own
(:mod:`service_helpers`); the test process only drives them and reads the
service's tables (``stats``).  Memory is a memfd shared by all, so a write in
one process is read in another with no message at all.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from service_helpers import Actor, ActorError, Service, actors, event_channel
from xengrant import abi
from xengrant.errors import BatchError
from xengrant.service import Channel, connect, stats
from xengrant.service import protocol as p
from xengrant.service.evtchn import (
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    svc = Service()
    dom0 = Actor(svc, domid=0)  # the toolstack (the service's uid, with its token)
    svc.dom0 = dom0  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        dom0.close()
        assert svc.stop() == 0


@pytest.fixture
def baseline(service: Service) -> Iterator[dict[str, Any]]:
    """The service's tables before the test; checked again after it."""
    before = stats(service.path)
    yield before
    after = stats(service.path)
    for key in ("free_frames", "domains", "evtchn", "xenstore", "xenstore_watches", "notifies"):
        assert after[key] == before[key], key


def test_write_in_one_process_is_seen_in_another_without_copy(
    service: Service, baseline: dict[str, Any]
) -> None:
    with actors(service, 2) as (a, b):
        key, refs = a("share", b.domid, 4)
        a("write", key, 0, b"written by the granter")
        m, handles = b("map", a.domid, refs)
        assert handles == [0, 1, 2, 3]
        assert b("read", m, 0, 22) == (b"written by the granter", 0)
        # after the map, each side only touches memory: no message is sent
        a("write", key, 4096 * 3 + 100, b"later")
        assert b("read", m, 4096 * 3 + 100, 5) == (b"later", 0)
        b("write", m, 8192, b"reply from the mapper")
        assert a("read", key, 8192, 21) == (b"reply from the mapper", 0)
        st = stats(service.path)["domains"][str(a.domid)]
        assert sorted(int(r) for r in st["active"]) == sorted(refs)
        assert all(pin == 1 for pin in st["active"].values())  # one host-writable pin each
        with pytest.raises(ActorError) as ei:
            a("try_unshare", key)  # mapped: Busy, as mirage's try_end_access
        assert ei.value.kind == "Busy"
        b("unmap", m)
        a("try_unshare", key)


def test_three_domains_copy_between_grants(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 3) as (a, b, c):
        ka, (ra,) = a("share", c.domid, 1)
        kb, (rb,) = b("share", c.domid, 1)
        a("write", ka, 0, b"from a to b, copied by c")
        statuses, data = c("copy_from", a.domid, ra, 0, 24)
        assert statuses == [abi.GNTST_okay] and data == b"from a to b, copied by c"
        assert c("copy_to", b.domid, rb, 100, data) == [abi.GNTST_okay]
        assert b("read", kb, 100, 24) == (b"from a to b, copied by c", 0)
        # an entry not granted (general_error), a ref past the table (bad_gntref),
        # a copy crossing the page end (bad_copy_arg): gnttab_copy's statuses
        assert c("copy_from", a.domid, ra + 1, 0, 4)[0] == [abi.GNTST_general_error]
        assert c("copy_from", a.domid, 5000, 0, 4)[0] == [abi.GNTST_bad_gntref]
        assert c("copy_from", a.domid, ra, 4090, 10)[0] == [abi.GNTST_bad_copy_arg]
        a("unshare", ka)
        b("unshare", kb)


def test_readonly_grant_is_mapped_prot_read(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 2) as (a, b):
        key, (ref,) = a("share", b.domid, 1, False)
        a("write", key, 0, b"ro")
        with pytest.raises(ActorError) as ei:
            b("map", a.domid, [ref], True)  # writable map of a read-only grant
        assert ei.value.status == abi.GNTST_general_error
        m, _ = b("map", a.domid, [ref], False)
        assert b("read", m, 0, 2) == (b"ro", 0)
        with pytest.raises(ActorError) as ei:
            b("write", m, 0, b"x")
        assert ei.value.kind == "TypeError"
        # past Python's checks the page itself is PROT_READ: the store faults
        b.send_only("poke", m, 0)
        assert b.wait_exit() == -signal.SIGSEGV
        # the service saw the socket close and destroyed the domain
        service.dom0("wait_gone", b.domid)  # type: ignore[attr-defined]
        a("try_unshare", key)
        assert str(b.domid) not in stats(service.path)["domains"]


def test_xenstore_rendezvous_and_permissions(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 3) as (a, b, c):
        home = f"/local/domain/{a.domid}"
        assert a("xs", "get_domain_path", a.domid) == home
        a("xs", "write", "data/ring-ref", "8")
        with pytest.raises(ActorError) as ei:
            b("xs", "read", f"{home}/data/ring-ref")
        assert ei.value.errno == errno.EACCES
        a("xs", "set_perms", "data/ring-ref", [f"n{a.domid}", f"r{b.domid}"])
        assert b("xs", "read", f"{home}/data/ring-ref") == b"8"
        with pytest.raises(ActorError) as ei:
            c("xs", "read", f"{home}/data/ring-ref")
        assert ei.value.errno == errno.EACCES
        with pytest.raises(ActorError) as ei:
            b("xs", "write", f"{home}/data/ring-ref", "9")
        assert ei.value.errno == errno.EACCES
        with pytest.raises(ActorError) as ei:
            b("xs", "write", f"{home}/data/other", "9")
        assert ei.value.errno == errno.EACCES
        # a watch in another process fires at once, then on the change
        b("xs", "watch", f"{home}/data/ring-ref", "tok")
        assert b("xs", "read_watch", 30) == (f"{home}/data/ring-ref", "tok")
        a("xs", "write", "data/ring-ref", "9")
        got = b("xs", "read_watch", 30)
        assert got == (f"{home}/data/ring-ref", "tok")
        assert b("xs", "read", f"{home}/data/ring-ref") == b"9"
        with pytest.raises(ActorError) as nothing:  # no event: a TimeoutError
            b("xs", "read_watch", 0.05)
        assert nothing.value.kind == "TimeoutError"
        b.send_only("ev_async", "read_watch_async", 30)  # the asyncio twin, blocked...
        a("xs", "write", "data/ring-ref", "10")  # ...until a writes
        assert b.result() == (f"{home}/data/ring-ref", "tok")
        # relative paths live under the caller's home
        b("xs", "write", "data/x", "y")
        assert b("xs", "read", f"/local/domain/{b.domid}/data/x") == b"y"
        assert "data" in b("xs", "directory", f"/local/domain/{b.domid}")
        with pytest.raises(ActorError) as ei:
            b("xs", "directory", "")  # canonicalised to ".../N/": trailing slash
        assert ei.value.errno == errno.EINVAL
        b("xs", "unwatch", f"{home}/data/ring-ref", "tok")


def test_event_channels_across_processes(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 2) as (a, b):
        pa = a("ev", "bind_unbound_port", b.domid)
        assert a("ev", "status", pa) == (EVTCHNSTAT_unbound, b.domid, 0)
        pb = b("ev", "bind_interdomain", a.domid, pa)
        assert a("ev", "status", pa) == (EVTCHNSTAT_interdomain, b.domid, pb)
        assert b("ev", "wait", pb, 30) == pb  # Xen sets the new local port pending
        b.send_only("ev", "wait", pb, 30)  # b blocks in its process...
        a("ev", "notify", pa)  # ...until a notifies
        assert b.result() == pb
        b.send_only("ev_async", "wait_async", pb, 30)  # the asyncio twin
        a("ev", "notify", pa)
        assert b.result() == pb
        b("ev", "notify", pb)
        assert a("ev", "wait", None, 30) == pa
        with pytest.raises(ActorError) as nothing:  # no event: a TimeoutError
            a("ev", "pending", 0.05)
        assert nothing.value.kind == "TimeoutError"
        with pytest.raises(ActorError) as ei:
            a("ev", "notify", pa + 7)  # not bound through a's client: evtchn_ioctl's answer
        assert ei.value.errno == errno.ENOTCONN
        with pytest.raises(ActorError) as ei:
            a("ev", "bind_interdomain", b.domid, pb)  # not unbound, not offered to a
        assert ei.value.errno == errno.EINVAL
        b("ev", "unbind", pb)
        assert a("ev", "status", pa) == (EVTCHNSTAT_unbound, b.domid, 0)
        a("ev", "unbind", pa)


def test_unmap_notify_gntdev(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 2) as (a, b):
        key, (ref,) = a("share", b.domid, 1)
        a("write", key, 0, b"\x01" * 16)
        with event_channel(a, b) as (pa, pb):
            m = b("map_notify", a.domid, ref, 10, pb)
            b("unmap", m)  # gntdev: clear byte 10 while mapped, then notify
            assert a("ev", "wait", pa, 30) == pa
            assert a("read", key, 8, 4) == (b"\x01\x01\x00\x01", 0)
            with pytest.raises(ActorError) as ei:
                b("map_notify", a.domid, ref, 5000, pb)  # offset past the page
            assert ei.value.errno == errno.EINVAL
        a("unshare", key)


def test_unmap_notify_gntalloc(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 2) as (a, b):
        with event_channel(b, a) as (pb, pa):
            key, ref = a("share_notify", b.domid, 3, pa)
            a("write", key, 0, b"\x07" * 8)
            m, _ = b("map", a.domid, [ref])
            a("unshare", key)  # gntalloc: clear the byte and notify, even while mapped
            assert b("ev", "wait", pb, 30) == pb
            assert b("read", m, 0, 8) == (b"\x07\x07\x07\x00\x07\x07\x07\x07", 0)
            b("unmap", m)  # the deferred end of access completes now
        assert a("reap")[0] == 0  # the deferred end of access is done


def test_acting_only_as_own_domain(service: Service, baseline: dict[str, Any]) -> None:
    with Actor(service) as a, closing(Channel(service.path, timeout=30)) as raw:
        st, body = raw.call(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(abi.GNTTABOP_query_size, 1))
        assert st == -errno.EPROTO  # no domain yet
        no_secret = bytes(p.SECRET_SIZE)
        for domid in (a.domid, 0, 999):  # without the secret: the same answer for each
            st, _ = raw.call(
                p.MSG_ATTACH, p.ATTACH_REQ.pack(p.PROTOCOL_VERSION, domid) + no_secret
            )
            assert st == -errno.EACCES
        st, body = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(p.PROTOCOL_VERSION, -1, 0, -1, -1, -1))
        assert st == 0
        mine = p.DOMAIN_REPLY.unpack_from(body)[1]
        for fd in raw.take_fds():
            os.close(fd)
        st, _ = raw.call(p.MSG_CREATE, p.CREATE_REQ.pack(p.PROTOCOL_VERSION, -1, 0, -1, -1, -1))
        assert st == -errno.EISCONN
        # no domid field exists in a hypercall: event channels of others are EPERM
        st, _ = raw.call(p.MSG_EVTCHN_ALLOC_UNBOUND, p.TWO_U32.pack(a.domid, mine))
        assert st == -errno.EPERM
        st, _ = raw.call(p.MSG_DOMCTL_DESTROY, p.DOMID.pack(a.domid))
        assert st == -errno.EPERM
        st, _ = raw.call(p.MSG_XS_WRITE, f"/local/domain/{a.domid}/data/x\0v".encode())
        assert st == -errno.EACCES
        assert a("reap")[0] == 0  # a is untouched


def test_toolstack_creates_domain_another_process_attaches(
    service: Service, baseline: dict[str, Any]
) -> None:
    dom0 = service.dom0  # type: ignore[attr-defined]
    domid = dom0("dom", "create_domain", 42)
    assert stats(service.path)["domains"]["42"]["attached"] is False
    secret = dom0("dom", "domain_secret", 42)
    with Actor(service, domid=42, secret=secret) as guest:
        assert guest.domid == 42
        assert guest("xs", "read", "domid") == b"42"
        assert stats(service.path)["domains"]["42"]["attached"] is True
    assert "42" not in stats(service.path)["domains"]
    # dom0 may destroy what it made; an unknown domain is ESRCH
    domid = dom0("dom", "create_domain", None)
    dom0("dom", "destroy_domain", domid)
    with pytest.raises(ActorError) as ei:
        dom0("dom", "destroy_domain", domid)
    assert ei.value.errno == errno.ESRCH


def test_pv_domain_over_the_service(service: Service, baseline: dict[str, Any]) -> None:
    with Actor(service, pv=True) as a, Actor(service) as b:
        key, refs = a("share", b.domid, 2)
        a("write", key, 4096, b"pv page")
        m, _ = b("map", a.domid, refs)
        assert b("read", m, 4096, 7) == (b"pv page", 0)
        b("unmap", m)
        a("unshare", key)


def test_large_batches_are_split(service: Service, baseline: dict[str, Any]) -> None:
    with actors(service, 2) as (a, b):
        key, refs = a("share", b.domid, 1024)
        a("write", key, 1023 * 4096, b"last")
        m, handles = b("map", a.domid, refs)  # one 32 KiB message
        assert len(handles) == 1024
        assert b("read", m, 1023 * 4096, 4) == (b"last", 0)
        b("unmap", m)
        a("unshare", key)


def test_threads_share_one_connection(service: Service, baseline: dict[str, Any]) -> None:
    """One thread blocks waiting for an event while another makes hypercalls."""
    with actors(service, 2) as (a, b):
        key, (ref,) = a("share", b.domid, 1)
        a("write", key, 0, b"\x02")
        with event_channel(a, b) as (pa, pb):
            assert b("threaded_start", pb, a.domid, ref) == 100  # 50 maps read the 2
            a("ev", "notify", pa)
            assert b("threaded_join") == pb
        a("unshare", key)


def test_transfer_across_processes(service: Service, baseline: dict[str, Any]) -> None:
    """GNTTABOP_transfer: the receiver learns of its new page from its grant entry."""
    with Actor(service, pv=True) as giver, Actor(service) as recv:
        dest = 0x80000
        ref = recv("transfer_offer", giver.domid, dest)
        payload = b"page given by a PV domain"
        giver("transfer_give", recv.domid, ref, payload)
        frame, data, sent = recv("transfer_take", ref, len(payload))
        assert (frame, data) == (dest, payload)
        # the page arrived by another domain's hypercall: the receiver's p2m
        # mirror had not heard of it, so its view asked the service (TRANSLATE),
        # then for the page's file, a fresh one of the receiver's (REACH)
        assert sent == 2


def test_introduce_domain_watch(service: Service, baseline: dict[str, Any]) -> None:
    dom0 = service.dom0  # type: ignore[attr-defined]
    dom0("xs", "watch", "@introduceDomain", "intro")
    try:
        assert dom0("xs", "read_watch", 30) == ("@introduceDomain", "intro")
        with Actor(service) as a:
            assert dom0("xs", "read_watch", 30) == ("@introduceDomain", "intro")
            with pytest.raises(ActorError) as ei:  # unprivileged: EACCES on the special node
                a("xs", "set_perms", "@introduceDomain", ["n0", f"r{a.domid}"])
            assert ei.value.errno == errno.EACCES
            assert a("xs", "get_perms", "@introduceDomain") == ["n0"]
    finally:
        dom0("xs", "unwatch", "@introduceDomain", "intro")


def test_concurrent_domain_processes(service: Service, baseline: dict[str, Any]) -> None:
    """Three mappers map, write and unmap at the same time, each from its own process."""
    with Actor(service) as a, actors(service, 3) as mappers:
        shares = []
        for m in mappers:
            key, refs = a("share", m.domid, 4)
            a("write", key, 0, f"for d{m.domid}".encode())
            shares.append((key, refs))
        for m, (_key, refs) in zip(mappers, shares):
            m.send_only("loop_map", a.domid, refs, 40, f"for d{m.domid}".encode())
        assert [m.result() for m in mappers] == [40, 40, 40]
        for key, _refs in shares:
            # each mapper's last write (i = 39) landed in page 39 % 4 = 3 of its share
            assert a("read", key, 4096 * 3 + 100, 1) == (bytes([39]), 0)
            a("try_unshare", key)
        assert stats(service.path)["domains"][str(a.domid)]["active"] == {}


@pytest.mark.parametrize("pv", [False, True])
def test_p2m_mirror_matches_the_service(
    service: Service, baseline: dict[str, Any], pv: bool
) -> None:
    """Every reply's p2m entries keep the process's mirror equal to the service's p2m."""
    def check() -> None:
        n, ok = a("mirror")
        assert ok and n == stats(service.path)["domains"][str(a.domid)]["p2m"]

    with Actor(service, pv=pv) as a, Actor(service) as b:
        check()
        key, refs = b("share", a.domid, 3)
        m, _ = a("map", b.domid, refs)
        check()
        ram = a("alloc", 5)
        check()
        a("unmap", m)
        a("free", ram)
        check()
        assert a("set_version", 2) == 2  # status frames come and go: a whole-p2m reply
        check()
        assert a("set_version", 1) == 1
        check()
        b("unshare", key)


def _sabotage_unmap(d: Any, m: Any, i: int = 0) -> None:
    """Unmap ``m``'s page ``i`` behind its back (a raw GNTTABOP_unmap_grant_ref), so
    that ``m.unmap()`` then names a handle the service no longer knows."""
    op = (abi.gnttab_unmap_grant_ref * 1)()
    op[0].host_addr = m.resource[i] << 12
    op[0].handle = m.handles[i]
    d.grant_table.unmap_refs(op)
    assert op[0].status == abi.GNTST_okay


def test_map_that_does_not_fit_gives_holes_back(
    service: Service, baseline: dict[str, Any]
) -> None:
    """A ref or domid that does not fit the op: ValueError, nothing sent, the holes back."""
    with connect(service.path, timeout=30) as b:
        before = b.get_pages(2)
        b.put_pages(before)
        sent = b.channel.sent
        for bad in ([(1, 1 << 40)], [(1, 8), (1 << 20, 9)]):
            with pytest.raises(ValueError, match="does not fit"):
                b.gnttab.map_grant_refs(bad)
        with pytest.raises(ValueError, match="no grants"):
            b.gnttab.map_grant_refs([])
        assert b.channel.sent == sent
        assert b.get_pages(2) == before


@pytest.fixture(params=[True, False], ids=["ring", "socket"])
def lane(request: pytest.FixtureRequest) -> bool:
    """The mapper's one-op maps and unmaps on its request ring, or on the socket."""
    flag: bool = request.param
    return flag


def assert_nothing_mapped(service: Service, granter: Any, mapper: Any) -> None:
    """The service's tables: no pin left on the granter's side, no maptrack entry
    in use on the mapper's."""
    st = stats(service.path)["domains"]
    assert st[str(granter.domid)]["active"] == {}
    assert st[str(mapper.domid)]["maptrack_in_use"] == 0


def test_batch_map_with_a_bad_ref_maps_nothing(service: Service, baseline: dict[str, Any]) -> None:
    """All or nothing, as gntdev: the ops that mapped are unmapped again, the holes go
    back, and the error carries each entry's GNTST code (GNTST_bad_gntref: Xen's
    map_grant_ref checks ``op->ref >= nr_grant_entries``)."""
    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30) as b:
        share = a.grant_table.share_pages(b.domid, 2)
        before = b.get_pages(3)
        b.put_pages(before)
        refs = [share.refs[0], 1 << 20, share.refs[1]]
        with pytest.raises(BatchError) as ei:
            b.gnttab.map_domain_grant_refs(a.domid, refs)
        assert ei.value.op == "map_grant_refs"
        assert ei.value.statuses == [abi.GNTST_okay, abi.GNTST_bad_gntref, abi.GNTST_okay]
        assert b.get_pages(3) == before
        b.put_pages(before)
        assert_nothing_mapped(service, a, b)
        share.try_unshare()  # nothing in use: ends at once


def test_one_page_map_that_fails_through_the_lane(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """A one-page map the service refuses leaves the lane for the Python path: the
    GrantError carries Xen's code and debug reason, the hole goes back, nothing stays
    mapped; the next map takes the lane again."""
    from xengrant.errors import GrantError

    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 1)
        hole = b.get_pages(1)
        b.put_pages(hole)
        with pytest.raises(GrantError) as ei:
            b.gnttab.map_grant_ref(a.domid, 1 << 20)
        assert ei.value.op == "map_grant_ref" and ei.value.status == abi.GNTST_bad_gntref
        assert f"d{a.domid} ref {1 << 20}" in str(ei.value)
        with pytest.raises(GrantError) as ei:
            b.gnttab.map_grant_ref(b.domid + 100, share.refs[0])  # no such domain
        assert ei.value.status == abi.GNTST_bad_domain
        assert b.get_pages(1) == hole  # the hole is free again
        b.put_pages(hole)
        assert hole[0] not in b.hypercalls.p2m and not b.channel.calls.posted
        with b.gnttab.map_grant_ref(a.domid, share.refs[0]) as m:
            assert m.resource == hole
        b.sync()  # the unmap is posted: done by the service before this returns
        assert_nothing_mapped(service, a, b)
        share.unshare(timeout=30)


def test_posted_unmap_is_done_before_later_requests(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """gnttab's unmap is posted: it returns at once, the service does it before
    anything this domain sends next, and the reply comes with the next reply."""
    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 1)
        share.mem[:4] = b"page"
        m = b.gnttab.map_grant_ref(a.domid, share.refs[0])
        gfn = m.resource[0]
        assert bytes(m.mem[:4]) == b"page" and b.hypercalls.p2m[gfn][0] >= 0
        sent = b.channel.sent
        m.unmap()
        assert m.released and b.channel.sent == sent + 1
        assert len(b.channel.calls.posted) == 1  # its reply waits in the service
        assert b.evtchn.status(0, b.domid)[0] == EVTCHNSTAT_closed  # any later request...
        assert not b.channel.calls.posted  # ... brought the posted reply first
        assert gfn not in b.hypercalls.p2m  # the mirror took its p2m change
        assert b.get_pages(1) == [gfn]  # and the hole is free again
        b.put_pages([gfn])
        share.unshare(timeout=30)  # the service ran the unmap before the status call


def test_one_page_lane_does_the_posted_unmap_with_the_next_map(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """The next one-page map reads a posted unmap's reply and finishes it (on the
    ring, its consumer in C): the hole comes back and leaves the p2m mirror; a failed
    one is raised by the call after the map, which itself succeeds."""
    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 2)
        share.mem[:2] = b"p0"
        share.mem[4096:4098] = b"p1"
        gnt = b.gnttab
        m1 = gnt.map_grant_ref(a.domid, share.refs[0])
        gfn1 = m1.resource[0]
        m1.unmap()
        assert len(b.channel.calls.posted) == 1
        m2 = gnt.map_grant_ref(a.domid, share.refs[1])
        assert bytes(m2.mem[:2]) == b"p1"
        assert not b.channel.calls.posted and gfn1 not in b.hypercalls.p2m
        assert b.hypercalls.p2m[m2.resource[0]][0] >= 0
        assert b.get_pages(1) == [gfn1]  # a hole again
        b.put_pages([gfn1])
        _sabotage_unmap(b, m2)
        m2.unmap()  # posted; fails in the service
        m3 = gnt.map_grant_ref(a.domid, share.refs[0])  # its reply came first
        assert bytes(m3.mem[:2]) == b"p0"
        with pytest.raises(BatchError) as ei:
            m3.unmap()  # raised before anything is sent
        assert ei.value.statuses == [abi.GNTST_bad_handle]
        m3.unmap()
        b.sync()
        assert b.hypercalls.p2m.get(m3.resource[0]) is None
        share.unshare(timeout=30)


def test_threads_map_and_unmap_on_one_connection(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """Threads sharing a connection: one reads (the lane, or a raw hypercall) while
    the others follow it or post; every mapping sees its page, and afterwards no
    hole, p2m entry, posted request or maptrack entry is left over."""
    import threading

    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 4)
        for i in range(4):
            share.mem[i * 4096 : i * 4096 + 4] = b"pg%02d" % i
        gnt = b.gnttab
        before = set(b.hypercalls.p2m)
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def worker(i: int) -> None:
            try:
                start.wait()
                for n in range(150):
                    if n % 10 == 9:  # a batch: grant_table_op, not the lane
                        with gnt.map_domain_grant_refs(a.domid, share.refs) as m:
                            assert bytes(m.mem[8192:8196]) == b"pg02"
                        continue
                    m = gnt.map_grant_ref(a.domid, share.refs[i])
                    assert bytes(m.mem[:4]) == b"pg%02d" % i
                    m.unmap()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        b.sync()
        assert not b.channel.calls.posted and not b.channel.calls.waiting and not b.channel._reading
        assert set(b.hypercalls.p2m) == before  # every grant mapping gone from the mirror
        holes = b.get_pages(8)
        assert len(set(holes)) == 8 and not set(holes) & set(b.hypercalls.p2m)
        b.put_pages(holes)
        assert_nothing_mapped(service, a, b)
        share.unshare(timeout=30)


def test_asyncio_wait_while_a_thread_maps_on_the_same_connection(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """An event loop waits for an event on a connection whose socket a thread
    keeps reading through the one-page lane: the event the lane reads before a
    reply is sorted and wakes the loop; every mapping sees its page."""
    import asyncio
    import threading

    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 1)
        share.mem[:4] = b"page"
        po = a.evtchn.bind_unbound_port(b.domid)
        pb = b.evtchn.bind_interdomain(a.domid, po)
        assert b.evtchn.wait(pb, 30) == pb  # the bind's own event
        half = threading.Event()
        errors: list[BaseException] = []

        def mapper() -> None:
            try:
                for n in range(300):
                    with b.gnttab.map_grant_ref(a.domid, share.refs[0]) as m:
                        assert bytes(m.mem[:4]) == b"page"
                    if n == 150:
                        half.set()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        async def main() -> int | None:
            waiter = asyncio.ensure_future(b.evtchn.wait_async(pb, 30))
            t = threading.Thread(target=mapper)
            t.start()
            await asyncio.get_running_loop().run_in_executor(None, half.wait, 30)
            a.evtchn.notify(po)
            got = await waiter
            await asyncio.get_running_loop().run_in_executor(None, t.join)
            return got

        assert asyncio.run(main()) == pb
        assert errors == []
        b.sync()
        assert not b.channel.calls.posted and not b.channel._reading
        b.evtchn.unbind(pb)
        a.evtchn.unbind(po)
        share.unshare(timeout=30)


def test_posted_unmap_failure_is_reported(
    service: Service, baseline: dict[str, Any], lane: bool
) -> None:
    """A posted unmap that fails is raised by the next call, by sync and by close,
    with its op name and GNTST code -- never lost."""
    with connect(service.path, timeout=30) as a, connect(service.path, timeout=30, ring=lane) as b:
        share = a.grant_table.share_pages(b.domid, 3)
        gnt = b.gnttab
        # 1: the next call raises it, before sending anything
        m = gnt.map_grant_ref(a.domid, share.refs[0])
        _sabotage_unmap(b, m)
        m.unmap()  # posted: no error yet
        assert b.evtchn.status(0, b.domid)[0] == EVTCHNSTAT_closed  # its reply came with this
        sent = b.channel.sent
        with pytest.raises(BatchError) as ei:
            b.xs.read("domid")
        assert ei.value.op == "unmap_grant_ref" and ei.value.status == abi.GNTST_bad_handle
        assert ei.value.statuses == [abi.GNTST_bad_handle]
        assert f"(domid, ref) [({a.domid}, {share.refs[0]})]" in str(ei.value)
        assert b.channel.sent == sent  # the read was not sent
        assert b.xs.read("domid") == str(b.domid).encode()  # raised once, then gone
        # the failed op's hole is not handed out again (it may still hold the page)
        assert m.resource[0] not in b.get_pages(1)
        # 2: sync waits for the reply and raises it
        m = gnt.map_grant_ref(a.domid, share.refs[1])
        _sabotage_unmap(b, m)
        m.unmap()
        with pytest.raises(BatchError) as ei:
            b.sync()
        assert ei.value.status == abi.GNTST_bad_handle
        b.sync()  # nothing left
        # 3: an unmap of several pages: each entry's status
        m = gnt.map_domain_grant_refs(a.domid, share.refs[:3])
        _sabotage_unmap(b, m, 1)
        m.unmap()
        b.evtchn.status(0, b.domid)
        with pytest.raises(BatchError) as ei:
            gnt.map_grant_ref(a.domid, share.refs[0])  # raised before it maps anything
        assert ei.value.statuses == [abi.GNTST_okay, abi.GNTST_bad_handle, abi.GNTST_okay]
        # 4: close raises what nothing raised yet (and the domain is gone all the same)
        m = gnt.map_grant_ref(a.domid, share.refs[2])
        _sabotage_unmap(b, m)
        m.unmap()
        with pytest.raises(BatchError) as ei:
            b.close()
        assert ei.value.status == abi.GNTST_bad_handle
        share.unshare(timeout=30)


def _service_fds(service: Service) -> dict[str, str]:
    """The service's descriptors: fd -> what it is (fds closed meanwhile left out)."""
    out = {}
    for fd in os.listdir(f"/proc/{service.proc.pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{service.proc.pid}/fd/{fd}")
        except OSError:
            pass
    return out


def test_a_connection_holds_what_fds_per_conn_budgets(
    service: Service, baseline: dict[str, Any]
) -> None:
    """The default connection limit divides the descriptor limit by FDS_PER_CONN: a
    domain's connection with its ring holds exactly that in the service (its memory
    files aside: they are budgeted apart, and an allocation that finds no descriptor
    fails as out of memory): its socket, the service's end of its memory socket, the
    ring page's mapping and two eventfds, the generation page's mapping -- not the
    client's end of the memory socket nor the ring's memfd, closed once sent."""
    from xengrant.service.limits import FDS_PER_CONN

    before = _service_fds(service)
    with connect(service.path, timeout=30) as d:
        assert d.channel.ring is not None
        # a round trip after the ring's: the service closed what it sent before it
        # read this (sync() need not send anything)
        assert d.xs.read("domid") == str(d.domid).encode()
        new = {fd: what for fd, what in _service_fds(service).items() if before.get(fd) != what}
        files = [w for w in new.values() if w.startswith(f"/memfd:xengrant-d{d.domid} ")]
        assert files  # its RAM
        assert len(new) - len(files) == FDS_PER_CONN, sorted(new.values())
        kinds = sorted(
            "socket" if w.startswith("socket:") else
            "eventfd" if w == "anon_inode:[eventfd]" else
            w.split(" ")[0] for w in new.values() if w not in files
        )
        assert kinds == [f"/memfd:xengrant-gen-d{d.domid}", "/memfd:xengrant-ring",
                         "eventfd", "eventfd", "socket", "socket"], kinds
