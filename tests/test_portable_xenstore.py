"""One xenstore suite for every backend of the portable API (xengrant.xsapi.XenStore).

The tests take an ``xs_pair`` fixture: a privileged connection ``dom0``, and
the connections ``a`` and ``b`` of two unprivileged domains ``a_dom`` and
``b_dom``.  Here it runs on EmbeddedXen (in-process) and on the service;
tests_xen/test_portable_xen.py runs the tests that need no domU on real Xen.
Every "nothing comes" check is a TimeoutError of a short wait; no sleeps.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from xengrant.errors import XenStoreError
from xengrant.xsapi import TransactionConflict, XenStore, run_transaction

TIMEOUT = 30.0
QUIET = 0.05


@dataclass
class XsPair:
    """Connections to test with."""

    backend: str
    dom0: Any
    a: Any
    a_dom: int
    b: Any
    b_dom: int


def _embedded() -> Iterator[XsPair]:
    import xengrant

    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        d0 = xen.create_domain(0)
        da, db = xen.create_domain(), xen.create_domain()
        yield XsPair("embedded", d0.xs, da.xs, da.domid, db.xs, db.domid)


@pytest.fixture(scope="module")
def _service() -> Iterator[Any]:
    from service_helpers import Service
    from xengrant.service import connect

    svc = Service()
    try:
        with connect(svc.path, 0) as dom0:
            yield svc.path, dom0
    finally:
        svc.stop()


def _linux(tmp: str) -> Iterator[XsPair]:
    """real Xen's client (xs_wire over a socket) against xengrant.xenstore's sessions."""
    from xengrant.linux import LinuxXenStore
    from xs_socket_server import XsSocketServer

    server = XsSocketServer(f"{tmp}/xenstored.sock", [0, 1, 2])
    try:
        with LinuxXenStore(server.path) as d0, LinuxXenStore(server.path) as a, \
                LinuxXenStore(server.path) as b:
            yield XsPair("linux", d0, a, 1, b, 2)
    finally:
        server.close()


@pytest.fixture(params=["embedded", "service", "linux-socket"])
def xs_pair(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[XsPair]:
    """A dom0 connection and two domains' connections, on each backend."""
    if request.param == "embedded":
        yield from _embedded()
        return
    if request.param == "linux-socket":
        yield from _linux(str(tmp_path))
        return
    from xengrant.service import connect

    path, dom0 = request.getfixturevalue("_service")
    with connect(path) as da, connect(path) as db:
        yield XsPair("service", dom0.xs, da.xs, da.domid, db.xs, db.domid)


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(XenStoreError) as ei:
        fn(*args)
    return int(ei.value.errno)


def needs_transactions(p: XsPair) -> None:
    if not hasattr(p.a, "transaction"):
        pytest.skip(f"{p.backend}: no transactions on this backend yet")


# ------------------------------------------------------------------ nodes
def test_connections_are_the_protocol(xs_pair: XsPair) -> None:
    if xs_pair.backend == "service" and not hasattr(xs_pair.a, "transaction"):
        pytest.skip("the service's client has no transactions yet")
    assert isinstance(xs_pair.a, XenStore)


def test_read_write_mkdir_rm_directory(xs_pair: XsPair) -> None:
    a = xs_pair.a
    home = a.get_domain_path(xs_pair.a_dom)
    assert home == f"/local/domain/{xs_pair.a_dom}"
    a.write("data/x/y", "hello")  # relative to the home; parents made
    assert a.read(f"{home}/data/x/y") == b"hello"
    a.write("data/x/y", b"\x00bin\xff")
    assert a.read("data/x/y") == b"\x00bin\xff"
    a.mkdir("data/x/z")
    assert a.read("data/x/z") == b""
    assert sorted(a.directory("data/x")) == ["y", "z"]
    a.rm("data/x")
    assert errno_of(a.read, "data/x/y") == errno.ENOENT
    a.rm("data/x")  # absent, parent there: fine (do_rm)
    assert errno_of(a.read, "data/nothing/here") == errno.ENOENT


def test_permissions(xs_pair: XsPair) -> None:
    p = xs_pair
    p.a.write("data/secret", "s")
    assert p.a.get_perms("data/secret") == [f"n{p.a_dom}"]
    path = f"/local/domain/{p.a_dom}/data/secret"
    assert errno_of(p.b.read, path) == errno.EACCES
    assert errno_of(p.b.write, path, "x") == errno.EACCES
    p.a.set_perms("data/secret", [f"n{p.a_dom}", f"r{p.b_dom}"])
    assert p.b.read(path) == b"s"
    assert errno_of(p.b.write, path, "x") == errno.EACCES
    assert errno_of(p.b.set_perms, path, [f"n{p.b_dom}"]) == errno.EACCES
    assert p.dom0.read(path) == b"s"  # dom0 reads anything
    p.a.rm("data/secret")


def test_node_size_quota_at_the_boundary(xs_pair: XsPair) -> None:
    """xenstored's write_node_raw: an unprivileged domain's node record (24-byte
    header, 8 bytes a permission, the value, the children's names) must stay
    under 2048 bytes: 2015 bytes of value with one permission pass, 2016 do not
    (tests/test_xenstore_quota.py has the rest)."""
    p = xs_pair
    if p.a_dom == 0:
        pytest.skip("dom0 has no quota")
    p.a.write("data/q", b"x" * 2015)
    assert errno_of(p.a.write, "data/q", b"x" * 2016) == errno.ENOSPC
    assert errno_of(p.a.write, "data/q2", b"x" * 2016) == errno.ENOSPC
    assert p.a.read("data/q") == b"x" * 2015
    assert errno_of(p.a.read, "data/q2") == errno.ENOENT
    p.dom0.write(f"/local/domain/{p.a_dom}/data/q", b"x" * 2016)  # dom0: no quota
    p.a.rm("data/q")


def test_bad_input(xs_pair: XsPair) -> None:
    a = xs_pair.a
    assert errno_of(a.read, "data/bad path") == errno.EINVAL
    assert errno_of(a.write, "data/big", b"x" * 5000) in (errno.E2BIG, errno.ENOSPC)
    assert errno_of(a.set_perms, "data", []) == errno.EINVAL
    a.write("data/ok", "still usable")
    assert a.read("data/ok") == b"still usable"
    a.rm("data/ok")


# ---------------------------------------------------------------- watches
def test_watch_fires_at_once_then_on_changes(xs_pair: XsPair) -> None:
    p = xs_pair
    path = f"/local/domain/{p.a_dom}/data/w"
    p.a.write("data/w", "0")
    p.a.set_perms("data/w", [f"n{p.a_dom}", f"r{p.b_dom}"])
    p.b.watch(path, "tok")
    assert p.b.read_watch_token("tok", TIMEOUT) == (path, "tok")  # at once
    p.a.write("data/w/child", "1")
    assert p.b.read_watch(TIMEOUT) == (f"{path}/child", "tok")
    p.b.unwatch(path, "tok")
    p.a.write("data/w", "2")
    with pytest.raises(TimeoutError):
        p.b.read_watch(QUIET)
    assert errno_of(p.b.unwatch, path, "tok") == errno.ENOENT
    p.a.rm("data/w")


def test_relative_watch_and_context_manager(xs_pair: XsPair) -> None:
    a = xs_pair.a
    with a.watching("data/rel", "r") as w:
        assert w.read(TIMEOUT) == ("data/rel", "r")  # relative as set
        a.write("data/rel", "v")
        assert w.read(TIMEOUT) == ("data/rel", "r")
        a.write("data/rel", "again")  # queued: dropped when the block ends
    with pytest.raises(TimeoutError):
        a.read_watch_token("r", QUIET)
    a.write("data/rel", "after")
    with pytest.raises(TimeoutError):
        a.read_watch(QUIET)
    a.rm("data/rel")


def test_watch_errors(xs_pair: XsPair) -> None:
    a = xs_pair.a
    a.watch("data/e", "t")
    assert errno_of(a.watch, "data/e", "t") == errno.EEXIST
    a.unwatch("data/e", "t")
    a.drop_watch_events("t")


def test_read_watch_async(xs_pair: XsPair) -> None:
    a = xs_pair.a

    async def main() -> tuple[str, str]:
        a.watch("data/aw", "async")
        first = await a.read_watch_async(TIMEOUT)
        a.unwatch("data/aw", "async")
        return first

    assert asyncio.run(main()) == ("data/aw", "async")
    with pytest.raises(TimeoutError):
        asyncio.run(a.read_watch_async(QUIET))


def test_wait_for_value_helper(xs_pair: XsPair) -> None:
    from xengrant.xenstore.client import wait_for_value

    p = xs_pair
    p.a.write("data/ready", "no")
    with pytest.raises(TimeoutError):
        wait_for_value(p.a, "data/ready", [b"yes"], QUIET)
    p.a.write("data/ready", "yes")
    assert wait_for_value(p.a, "data/ready", [b"yes"], TIMEOUT) == b"yes"
    p.a.rm("data/ready")


def test_wait_until_async_lets_the_loop_run_while_it_waits(xs_pair: XsPair) -> None:
    """The asyncio twin of wait_until: dom0's write comes from another task of
    the same loop while it waits (a wait that blocked the loop would never see
    it and time out); the watch goes at the end, and its queued events too."""
    from xengrant.xenstore.client import wait_for_value_async, wait_until_async

    p = xs_pair
    node = f"/local/domain/{p.a_dom}/data/async-ready"
    seen: list[bytes | None] = []

    def check() -> bytes | None:
        try:
            value = p.a.read(node)
        except XenStoreError:
            value = None
        seen.append(value)
        return value if value == b"go" else None

    async def main() -> bytes:
        waiter = asyncio.ensure_future(wait_until_async(p.a, node, check, TIMEOUT))
        while not seen:  # it checked once: it watches (an ordering, not a timing)
            await asyncio.sleep(0)
        p.dom0.write(node, "not yet")
        p.dom0.write(node, "go")
        return await waiter

    assert asyncio.run(main()) == b"go"
    assert seen[0] is None and seen[-1] == b"go" and len(seen) >= 2
    p.dom0.write(node, "later")  # unwatched: nothing is queued for it
    with pytest.raises(TimeoutError):
        p.a.read_watch(QUIET)

    with pytest.raises(TimeoutError) as ei:
        asyncio.run(wait_until_async(p.a, node, lambda: None, QUIET, lambda: "named at the end"))
    assert str(ei.value) == "named at the end"
    with pytest.raises(TimeoutError):
        asyncio.run(wait_for_value_async(p.a, node, [b"never"], QUIET))
    assert asyncio.run(wait_for_value_async(p.a, node, None, TIMEOUT)) == b"later"
    if hasattr(p.a, "wait_for_value_async"):  # the service's and Linux's method
        assert asyncio.run(p.a.wait_for_value_async(node, [b"later"], TIMEOUT)) == b"later"
    p.dom0.write(node, "x")
    with pytest.raises(TimeoutError):
        p.a.read_watch(QUIET)
    p.dom0.rm(node)


def test_xenbus_wait_state_async_times_out_naming_the_state(xs_pair: XsPair) -> None:
    from xengrant import xenbus

    p = xs_pair
    dev = f"/local/domain/{p.a_dom}/data/vdev"
    xenbus.switch_state(p.a, dev, xenbus.XenbusStateInitWait)
    with pytest.raises(TimeoutError) as ei:
        asyncio.run(xenbus.wait_state_async(p.a, dev, [xenbus.XenbusStateConnected], QUIET))
    assert str(ei.value) == f"{dev}/state is InitWait"
    assert asyncio.run(xenbus.wait_state_async(
        p.a, dev, [xenbus.XenbusStateInitWait], TIMEOUT)) == xenbus.XenbusStateInitWait
    xenbus.switch_state(p.a, dev, xenbus.XenbusStateClosed)
    with pytest.raises(TimeoutError):  # both waits took their watches away
        p.a.read_watch(QUIET)
    p.a.rm(dev)


# ----------------------------------------------------------- transactions
def test_transaction_is_seen_at_commit_only(xs_pair: XsPair) -> None:
    p = xs_pair
    needs_transactions(p)
    p.a.mkdir("data")  # there already, but for dom0 on a real host
    p.a.set_perms("data", [f"n{p.a_dom}", f"r{p.b_dom}"])
    path = f"/local/domain/{p.a_dom}/data"
    with p.a.transaction() as t:
        t.write("data/ring-ref", "8")
        t.write("data/event-channel", "3")
        assert t.read("data/ring-ref") == b"8"  # its own writes
        assert errno_of(p.b.read, f"{path}/ring-ref") == errno.ENOENT  # nobody else's
    assert p.b.read(f"{path}/ring-ref") == b"8"
    assert p.b.read(f"{path}/event-channel") == b"3"
    t2 = p.a.transaction()
    t2.write("data/ring-ref", "9")
    t2.abort()
    assert p.a.read("data/ring-ref") == b"8"
    for k in ("ring-ref", "event-channel"):
        p.a.rm(f"data/{k}")


def test_conflict_is_eagain_and_applies_nothing(xs_pair: XsPair) -> None:
    p = xs_pair
    needs_transactions(p)
    p.a.write("data/c", "0")
    t = p.a.transaction()
    assert t.read("data/c") == b"0"
    t.write("data/d", "from the transaction")
    p.a.write("data/c", "changed meanwhile")  # outside the transaction
    with pytest.raises(TransactionConflict) as ei:
        t.commit()
    assert ei.value.errno == errno.EAGAIN
    assert errno_of(p.a.read, "data/d") == errno.ENOENT  # nothing applied
    p.a.rm("data/c")


def test_run_transaction_retries(xs_pair: XsPair) -> None:
    p = xs_pair
    needs_transactions(p)
    p.a.write("data/n", "0")
    runs = []

    def bump(t: Any) -> int:
        n = int(t.read("data/n"))
        if not runs:  # the first run meets a change made meanwhile
            p.a.write("data/n", str(n + 100))
        runs.append(n)
        t.write("data/n", str(n + 1))
        return n + 1

    assert run_transaction(p.a, bump) == 101
    assert runs == [0, 100] and p.a.read("data/n") == b"101"

    def always(t: Any) -> None:
        t.read("data/n")
        p.a.write("data/n", "x")

    with pytest.raises(TransactionConflict):
        run_transaction(p.a, always, retries=3)
    p.a.rm("data/n")


def test_watch_fires_at_commit(xs_pair: XsPair) -> None:
    p = xs_pair
    needs_transactions(p)
    with p.a.watching("data/tw", "tw") as w:
        w.read(TIMEOUT)
        t = p.a.transaction()
        t.write("data/tw", "1")
        with pytest.raises(TimeoutError):
            w.read(QUIET)  # not yet
        t.commit()
        assert w.read(TIMEOUT) == ("data/tw", "tw")
    p.a.rm("data/tw")


def test_introduce_and_release_are_dom0s(xs_pair: XsPair) -> None:
    p = xs_pair
    if not hasattr(p.dom0, "introduce"):
        pytest.skip(f"{p.backend}: no introduce/release on this backend yet")
    with p.dom0.watching("@releaseDomain", "rel") as w:
        w.read(TIMEOUT)
        assert errno_of(p.a.release, p.b_dom) == errno.EACCES
        p.dom0.release(p.b_dom)
        assert w.read(TIMEOUT) == ("@releaseDomain", "rel")
    with p.dom0.watching("@introduceDomain", "intro") as w:
        w.read(TIMEOUT)
        p.dom0.introduce(p.b_dom, 0, 1)
        assert w.read(TIMEOUT) == ("@introduceDomain", "intro")


def test_set_target_gives_the_stub_the_targets_rights(xs_pair: XsPair) -> None:
    """XS_SET_TARGET (dom0's): domain a (a stub) gets b's rights over b's nodes,
    and b gains nothing over a's (tests/test_xenstore_target.py has the rest)."""
    p = xs_pair
    if p.a_dom == p.b_dom:
        pytest.skip("dom0 alone: no stub domain")
    p.b.write("data/for-dm", "1")
    path = f"/local/domain/{p.b_dom}/data/for-dm"
    assert errno_of(p.a.read, path) == errno.EACCES
    assert errno_of(p.a.set_target, p.a_dom, p.b_dom) == errno.EACCES  # dom0's request
    assert errno_of(p.dom0.set_target, p.a_dom, 0x7FEF) == errno.ENOENT  # not introduced
    p.dom0.set_target(p.a_dom, p.b_dom)
    assert p.a.read(path) == b"1"
    p.a.write(path, "2")
    assert p.b.read("data/for-dm") == b"2"
    assert errno_of(p.a.write, f"/local/domain/{p.b_dom}/name", "x") == errno.EACCES  # dom0's
    assert errno_of(p.b.read, f"/local/domain/{p.a_dom}/data") == errno.EACCES
    p.b.rm("data/for-dm")


# ------------------------------------------------------------------ xenbus
def test_xenbus_handshake_publish_and_async_wait(xs_pair: XsPair) -> None:
    """publish writes the keys and the state together (one transaction where
    the backend has them); wait_state_async sees the state change."""
    from xengrant import xenbus

    p = xs_pair
    if p.a_dom == p.b_dom:
        pytest.skip("dom0 alone: no frontend domain to add a device for")
    fe, be = xenbus.add_device(p.dom0, "vtest", 0, p.a_dom, p.b_dom)
    assert xenbus.read_state(p.b, fe) == xenbus.XenbusStateInitialising

    async def backend_waits() -> int:
        waiter = asyncio.ensure_future(
            xenbus.wait_state_async(p.b, fe, [xenbus.XenbusStateInitialised], TIMEOUT))
        await asyncio.sleep(0)  # let it watch first (an ordering, not a timing)
        xenbus.publish(p.a, fe, {"ring-ref": 8, "event-channel": 3},
                       state=xenbus.XenbusStateInitialised)
        return await waiter

    assert asyncio.run(backend_waits()) == xenbus.XenbusStateInitialised
    assert p.b.read(f"{fe}/ring-ref") == b"8" and p.b.read(f"{fe}/event-channel") == b"3"
    xenbus.switch_state(p.b, be, xenbus.XenbusStateConnected)
    assert xenbus.wait_state(p.a, be, [xenbus.XenbusStateConnected], TIMEOUT) == 4
    p.dom0.rm(fe)
    p.dom0.rm(be)


def test_linux_client_waits_for_room_in_xenstoreds_listen_queue(tmp_path: Any) -> None:
    """C xenstored listens with a backlog of 1: a connect meeting a full queue
    waits for room (until the connection's timeout) instead of failing with EAGAIN."""
    import socket
    import threading

    from xengrant.linux import LinuxXenStore

    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:  # fill the queue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        queued.append(s)
    try:
        with pytest.raises(TimeoutError):
            LinuxXenStore(path, timeout=QUIET)
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(LinuxXenStore(path, timeout=TIMEOUT)))
        t.start()
        accepted = [listener.accept()[0] for _ in queued]  # room: the waiting connect goes in
        accepted.append(listener.accept()[0])
        t.join(TIMEOUT)
        assert len(got) == 1
        got[0].close()
        for a in accepted:
            a.close()
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_an_embedded_connection_dropped_unclosed_loses_its_watches() -> None:
    """Its watches go at the next request (xenstored's destroy_conn), so they
    stop counting against the domain's watch quota."""
    import gc

    import xengrant

    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        d = xen.create_domain()
        conn = xen.xs_open(d.domid)
        conn.watch("data", "t")
        assert xen.xs_hub.store.watch_count(d.domid) == 1
        del conn
        gc.collect()
        d.xs.read("domid")  # any request
        assert xen.xs_hub.store.watch_count(d.domid) == 0
