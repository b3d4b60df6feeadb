"""Grants and event channels between real domains: dom0 and two PV domUs (A, B).

Each domU runs the agent (domu_agent.py: xengrant.linux over its own
gntalloc, gntdev and evtchn, driven through xenstore); dom0 runs this file with
xengrant.linux too.  Every path is tested in each direction: dom0 -> domU,
domU -> dom0 and domU -> domU.  Data is checked byte for byte where dom0 sees
it and by SHA-256 where only a domU does.  After each test neither domU holds
a share, a mapping or a port (``agents_clean``) and dom0 has nothing mapped
(``xen``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import struct
import threading
import time
from typing import Any

import domu
import pytest
from domu import DomU

from xengrant import BatchError, GrantError, abi
from xengrant.linux import Backend, EventChannels
from xengrant.pgdir import PgdirBackend, PgdirFrontend
from xengrant.portable import CopySegment, GrantRef

P = 4096
#: a domid no domain has (not 0x7FF0: that is DOMID_SELF)
NO_DOMAIN = 100
Pair = tuple[DomU, DomU]


def stamp(text: str, count: int, offset: int = 0) -> bytes:
    """What the agent's ``fill`` (and :func:`fill`) leave in ``count`` zeroed pages."""
    buf = bytearray(count * P)
    fill(buf, text, offset)
    return bytes(buf)


def fill(mem: memoryview | bytearray, text: str, offset: int = 0) -> None:
    for i in range(len(mem) // P):
        data = text.replace("{page}", f"{i:05d}").encode()
        mem[i * P + offset : i * P + offset + len(data)] = data


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def test_a_domu_learns_its_domid_from_xenstore(agents_clean: Pair) -> None:
    for d in agents_clean:
        assert d.ready["domid"] == d.domid > 0
        state = d.call("state")
        assert state["domid"] == d.domid  # Backend.domid in the domU, read via /dev/xen/xenbus
        print(f"{d}: xengrant imported in {d.ready['import_s']} s")
    assert agents_clean[0].domid != agents_clean[1].domid


# ------------------------------------------------------- share / map / unmap
@pytest.mark.parametrize("count", [1, 16, 1024])
def test_dom0_shares_a_domu_maps(xen: Backend, agents_clean: Pair, count: int) -> None:
    a, _ = agents_clean
    share = xen.gntshr.share_pages(a.domid, count)
    fill(share.mem, "dom0 page {page}")
    h = a.call("map", grants=[[0, r] for r in share.refs])["h"]
    assert a.call("digest", h=h) == sha(share.mem)
    a.call("fill", h=h, text="back from A {page}", offset=2000)
    want = bytearray(stamp("dom0 page {page}", count))
    fill(want, "back from A {page}", 2000)
    assert bytes(share.mem) == want
    a.call("unmap", h=h)
    xen.gntshr.unshare(share)


@pytest.mark.parametrize("count", [1, 16, 1024])
def test_a_domu_shares_dom0_maps(xen: Backend, agents_clean: Pair, count: int) -> None:
    a, _ = agents_clean
    r = a.call("share", to=0, count=count)
    a.call("fill", h=r["h"], text="A page {page}")
    with xen.gnttab.map_domain_grant_refs(a.domid, r["refs"]) as m:
        assert bytes(m.mem) == stamp("A page {page}", count)
        fill(m.mem, "dom0 was here {page}", 3000)
        assert a.call("digest", h=r["h"]) == sha(m.mem)
    # one by one, in reverse (a sample of the 1024)
    for i in list(range(count))[::-1][:16]:
        with xen.gnttab.map_grant_ref(a.domid, r["refs"][i], writable=False) as m1:
            assert bytes(m1.mem[:12]) == b"A page %05d" % i
    a.call("unshare", h=r["h"])


@pytest.mark.parametrize("count", [1, 16, 1024])
def test_a_domu_shares_another_domu_maps(agents_clean: Pair, count: int) -> None:
    a, b = agents_clean
    r = a.call("share", to=b.domid, count=count)
    a.call("fill", h=r["h"], text="A to B {page}")
    hb = b.call("map", grants=[[a.domid, ref] for ref in r["refs"]])["h"]
    assert b.call("digest", h=hb) == sha(stamp("A to B {page}", count))
    b.call("fill", h=hb, text="B wrote {page}", offset=1024)
    assert a.call("digest", h=r["h"]) == b.call("digest", h=hb)
    assert bytes.fromhex(a.call("read", h=r["h"], offset=(count - 1) * P + 1024, length=13)) == (
        b"B wrote %05d" % (count - 1)
    )
    b.call("unmap", h=hb)
    a.call("unshare", h=r["h"])


# ------------------------------------------------------------- read-only
def _kernel_write_faults(address: int) -> bool:
    """Whether the kernel faults writing one byte at ``address`` of this process.

    ``readv`` from a pipe into that byte: ``copy_to_user`` into a page mapped
    without write access is ``EFAULT``, where a write from Python would kill the
    process.  (A forked child cannot test it: gntdev's mappings are
    ``VM_DONTCOPY``.)
    """
    r, w = os.pipe()
    try:
        os.write(w, b"Z")
        try:
            os.readv(r, [(ctypes.c_char * 1).from_address(address)])
        except OSError as e:
            if e.errno == errno.EFAULT:
                return True
            raise
        return False
    finally:
        os.close(r)
        os.close(w)


def test_read_only_grants_across_domains(xen: Backend, agents_clean: Pair) -> None:
    a, b = agents_clean
    # domU -> dom0, read-only: a writable map fails, a read-only one maps and a write faults
    r = a.call("share", to=0, count=1, writable=False)
    a.call("fill", h=r["h"], text="read me")
    with pytest.raises(GrantError) as ei:
        xen.gnttab.map_grant_ref(a.domid, r["refs"][0], writable=True)
    assert ei.value.status == abi.GNTST_general_error
    with xen.gnttab.map_grant_ref(a.domid, r["refs"][0], writable=False) as m:
        assert bytes(m.mem[:7]) == b"read me"
        with pytest.raises(TypeError):
            m.mem[0:1] = b"x"
        assert _kernel_write_faults(m._view.address)
        assert bytes(m.mem[:7]) == b"read me"
    rw = a.call("share", to=0, count=1)
    with xen.gnttab.map_grant_ref(a.domid, rw["refs"][0]) as m:  # the control: writable
        assert not _kernel_write_faults(m._view.address) and bytes(m.mem[:1]) == b"Z"
    a.call("unshare", h=rw["h"])
    a.call("unshare", h=r["h"])
    # dom0 -> domU, read-only
    share = xen.gntshr.share_pages(a.domid, 1, writable=False)
    share.mem[:4] = b"ro!!"
    with pytest.raises(GrantError) as ei:
        a.call("map", grants=[[0, share.refs[0]]], writable=True)
    assert ei.value.status == abi.GNTST_general_error
    h = a.call("map", grants=[[0, share.refs[0]]], writable=False)["h"]
    assert bytes.fromhex(a.call("read", h=h, offset=0, length=4)) == b"ro!!"
    with pytest.raises(TypeError):
        a.call("writes", h=h, items=[[0, b"x".hex()]])
    a.call("unmap", h=h)
    xen.gntshr.unshare(share)
    # domU -> domU, read-only
    r = a.call("share", to=b.domid, count=1, writable=False)
    with pytest.raises(GrantError) as ei:
        b.call("map", grants=[[a.domid, r["refs"][0]]], writable=True)
    assert ei.value.status == abi.GNTST_general_error
    h = b.call("map", grants=[[a.domid, r["refs"][0]]], writable=False)["h"]
    b.call("unmap", h=h)
    a.call("unshare", h=r["h"])


# ---------------------------------------------- two granters in one mapping
def test_one_contiguous_mapping_of_two_domains_grants(xen: Backend, agents_clean: Pair) -> None:
    a, b = agents_clean
    ra = a.call("share", to=0, count=2)
    rb = b.call("share", to=0, count=1)
    a.call("fill", h=ra["h"], text="from A {page}")
    b.call("fill", h=rb["h"], text="from B {page}")
    grants = [(a.domid, ra["refs"][0]), (b.domid, rb["refs"][0]), (a.domid, ra["refs"][1])]
    with xen.gnttab.map_grant_refs(grants) as m:
        assert bytes(m.mem[:12]) == b"from A 00000"
        assert bytes(m.mem[P : P + 12]) == b"from B 00000"
        assert bytes(m.mem[2 * P : 2 * P + 12]) == b"from A 00001"
    # the same from a domU: B maps A's grant and its own... own grants come via A's share to B
    rab = a.call("share", to=b.domid, count=1)
    rdom0 = xen.gntshr.share_pages(b.domid, 1)
    rdom0.mem[:9] = b"from dom0"
    a.call("fill", h=rab["h"], text="A for B")
    hb = b.call("map", grants=[[0, rdom0.refs[0]], [a.domid, rab["refs"][0]]])["h"]
    assert bytes.fromhex(b.call("read", h=hb, offset=0, length=9)) == b"from dom0"
    assert bytes.fromhex(b.call("read", h=hb, offset=P, length=7)) == b"A for B"
    b.call("unmap", h=hb)
    xen.gntshr.unshare(rdom0)
    for d, r in ((a, ra), (b, rb), (a, rab)):
        d.call("unshare", h=r["h"])


# ------------------------------------------------------------------- copy
def test_grant_copy_between_domains(xen: Backend, agents_clean: Pair) -> None:
    a, b = agents_clean
    r = a.call("share", to=0, count=2)
    a.call("fill", h=r["h"], text="A copy source {page}")
    out = bytearray(18)
    segs = [
        CopySegment(GrantRef(a.domid, r["refs"][0], 0), out, 18),  # domU page -> dom0 memory
        CopySegment(b"written by dom0", GrantRef(a.domid, r["refs"][1], 100), 15),
        CopySegment(GrantRef(a.domid, r["refs"][0], 0), GrantRef(a.domid, r["refs"][1], 200), 18),
        CopySegment(GrantRef(a.domid, 1_000_000), bytearray(4), 4),
        CopySegment(GrantRef(NO_DOMAIN, r["refs"][0]), bytearray(4), 4),
    ]
    assert xen.gnttab.grant_copy(segs) == [
        abi.GNTST_okay, abi.GNTST_okay, abi.GNTST_okay, abi.GNTST_bad_gntref, abi.GNTST_bad_domain,
    ]
    assert out == b"A copy source 0000"
    assert bytes.fromhex(a.call("read", h=r["h"], offset=P + 100, length=15)) == b"written by dom0"
    assert bytes.fromhex(a.call("read", h=r["h"], offset=P + 200, length=18)) == out
    # domU -> domU: B copies from and into A's grants
    rb = a.call("share", to=b.domid, count=1)
    a.call("fill", h=rb["h"], text="for B's copy")
    got = b.call("copy", segments=[
        {"src": [a.domid, rb["refs"][0], 0], "dst": "local", "len": 12},
        {"src": b"B's copy".hex(), "dst": [a.domid, rb["refs"][0], 64], "len": 8},
        {"src": [a.domid, r["refs"][0], 0], "dst": "local", "len": 4},  # granted to dom0
    ])
    assert got["statuses"] == [abi.GNTST_okay, abi.GNTST_okay, abi.GNTST_general_error]
    assert bytes.fromhex(got["local"][0]) == b"for B's copy"
    assert bytes.fromhex(a.call("read", h=rb["h"], offset=64, length=8)) == b"B's copy"
    a.call("unshare", h=rb["h"])
    a.call("unshare", h=r["h"])


# ------------------------------------------------------------ event channels
def _connect(ev: EventChannels, d: DomU, dom0_listens: bool) -> tuple[int, int]:
    """An interdomain channel dom0 <-> d: (dom0's port, d's port)."""
    if dom0_listens:
        p0 = ev.bind_unbound_port(d.domid)
        pd = d.call("evtchn_bind", remote=0, port=p0)
    else:
        pd = d.call("evtchn_unbound", remote=0)
        p0 = ev.bind_interdomain(d.domid, pd)
    ev.drain()
    d.call("drain")
    return p0, pd


@pytest.mark.parametrize("dom0_listens", [True, False], ids=["dom0-unbound", "domU-unbound"])
def test_event_channels_between_dom0_and_a_domu(
    evtchn: EventChannels, agents_clean: Pair, dom0_listens: bool
) -> None:
    a, _ = agents_clean
    p0, pa = _connect(evtchn, a, dom0_listens)
    for _ in range(3):
        evtchn.notify(p0)
        assert a.call("wait", port=pa, timeout=10.0) is True
        a.call("notify", port=pa)
        evtchn.wait_for(p0, timeout=10.0)
    assert a.call("wait", port=pa, timeout=0.2) is False  # nothing pending now
    a.call("unbind", port=pa)
    evtchn.unbind(p0)


def test_event_channel_between_two_domus(agents_clean: Pair) -> None:
    a, b = agents_clean
    pa = a.call("evtchn_unbound", remote=b.domid)
    pb = b.call("evtchn_bind", remote=a.domid, port=pa)
    a.call("drain")
    b.call("drain")
    b.call("notify", port=pb)
    assert a.call("wait", port=pa, timeout=10.0) is True
    a.call("notify", port=pa)
    assert b.call("wait", port=pb, timeout=10.0) is True
    # a bound port cannot be bound again (Xen: ECS_INTERDOMAIN, not ECS_UNBOUND)
    with pytest.raises(GrantError) as ei:
        a.call("evtchn_bind", remote=b.domid, port=pb)
    assert getattr(ei.value, "errno", None) == errno.EINVAL, ei.value
    a.call("unbind", port=pa)
    b.call("unbind", port=pb)


def test_event_ping_pong_200_with_a_domu(
    xen: Backend, evtchn: EventChannels, agents_clean: Pair
) -> None:
    """200 round trips: dom0 writes seq into a shared page and notifies; the domU acks."""
    a, _ = agents_clean
    share = xen.gntshr.share_pages(a.domid, 1)
    h = a.call("map", grants=[[0, share.refs[0]]])["h"]
    p0, pa = _connect(evtchn, a, True)
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.update(r=a.call("pong", h=h, port=pa, count=200, timeout=120.0))
    )
    t.start()
    for seq in range(1, 201):
        struct.pack_into("=I", share.mem, 3072, seq)
        evtchn.notify(p0)
        deadline = time.monotonic() + 30.0
        while struct.unpack_from("=I", share.mem, 3076)[0] != seq:
            assert time.monotonic() < deadline, f"no ack of {seq}"
            evtchn.pending(1.0)
    t.join(60)
    assert not t.is_alive() and "r" in result, result
    a.call("unbind", port=pa)
    evtchn.unbind(p0)
    a.call("unmap", h=h)
    xen.gntshr.unshare(share)


# ------------------------------------------------------------- unmap notify
def test_unmap_notify_of_a_domu_mapper(
    xen: Backend, evtchn: EventChannels, agents_clean: Pair
) -> None:
    """A maps dom0's pages with notify: its unmap clears dom0's byte and signals dom0."""
    a, _ = agents_clean
    p0, pa = _connect(evtchn, a, True)
    share = xen.gntshr.share_pages(a.domid, 2)
    share.mem[P + 10] = 0x55
    grants = [[0, r] for r in share.refs]
    h = a.call("map", grants=grants, notify_offset=P + 10, notify_port=pa)["h"]
    assert share.mem[P + 10] == 0x55
    a.call("unmap", h=h)
    assert share.mem[P + 10] == 0
    evtchn.wait_for(p0, timeout=10.0)
    xen.gntshr.unshare(share)
    a.call("unbind", port=pa)
    evtchn.unbind(p0)


def test_unmap_notify_of_a_domu_sharer(
    xen: Backend, evtchn: EventChannels, agents_clean: Pair
) -> None:
    """A shares with notify, unshares while dom0 maps: dom0 sees the byte cleared, the event."""
    a, _ = agents_clean
    p0, pa = _connect(evtchn, a, False)
    r = a.call("share", to=0, count=1, notify_offset=20, notify_port=pa)
    m = xen.gnttab.map_grant_ref(a.domid, r["refs"][0])
    m.mem[20] = 7
    a.call("unshare", h=r["h"])  # deferred in A's kernel: dom0 still maps the page
    assert m.mem[20] == 0
    evtchn.wait_for(p0, timeout=10.0)
    m.unmap()
    a.call("unbind", port=pa)
    evtchn.unbind(p0)


def test_unmap_notify_between_domus(agents_clean: Pair) -> None:
    a, b = agents_clean
    pa = a.call("evtchn_unbound", remote=b.domid)
    pb = b.call("evtchn_bind", remote=a.domid, port=pa)
    a.call("drain")
    r = a.call("share", to=b.domid, count=1)
    a.call("writes", h=r["h"], items=[[99, "ff"]])
    hb = b.call("map", grants=[[a.domid, r["refs"][0]]], notify_offset=99, notify_port=pb)["h"]
    b.call("unmap", h=hb)
    assert a.call("read", h=r["h"], offset=99, length=1) == "00"
    assert a.call("wait", port=pa, timeout=10.0) is True
    a.call("unshare", h=r["h"])
    a.call("unbind", port=pa)
    b.call("unbind", port=pb)


# ------------------------------------------------------- deferred end of access
def test_a_domu_unshares_while_dom0_maps(xen: Backend, agents_clean: Pair) -> None:
    """Linux in the domU defers the end of access; dom0 keeps the page until it unmaps."""
    a, _ = agents_clean
    r = a.call("share", to=0, count=1)
    a.call("writes", h=r["h"], items=[[0, b"alive".hex()]])
    m = xen.gnttab.map_grant_ref(a.domid, r["refs"][0])
    a.call("unshare", h=r["h"])
    assert bytes(m.mem[:5]) == b"alive"
    m.mem[:5] = b"still"
    assert bytes(m.mem[:5]) == b"still"
    m.unmap()
    # the ref stops being granted once A's kernel ends the access it deferred (its timer
    # retries about once a second): poll, bounded, and say what a map meanwhile did
    remapped = 0
    with pytest.raises(GrantError) as ei:
        for _ in range(50):
            xen.gnttab.map_grant_ref(a.domid, r["refs"][0]).unmap()
            remapped += 1
            time.sleep(0.2)
    print(f"maps of the unshared ref that still worked after the unmap: {remapped}")
    assert ei.value.status == abi.GNTST_general_error


def test_dom0_unshares_while_a_domu_maps(xen: Backend, agents_clean: Pair) -> None:
    a, _ = agents_clean
    share = xen.gntshr.share_pages(a.domid, 1)
    share.mem[:5] = b"alive"
    h = a.call("map", grants=[[0, share.refs[0]]])["h"]
    xen.gntshr.unshare(share)
    assert bytes.fromhex(a.call("read", h=h, offset=0, length=5)) == b"alive"
    a.call("writes", h=h, items=[[0, b"still".hex()]])
    assert bytes.fromhex(a.call("read", h=h, offset=0, length=5)) == b"still"
    a.call("unmap", h=h)


# ------------------------------------------------------------ bad inputs
def test_bad_cross_domain_inputs_and_their_status(xen: Backend, agents_clean: Pair) -> None:
    a, b = agents_clean
    to_b = a.call("share", to=b.domid, count=1)
    good = a.call("share", to=0, count=1)
    # revoked last: Linux hands a freed ref out again to the next share
    revoked = a.call("share", to=0, count=1)
    a.call("unshare", h=revoked["h"])  # nobody mapped it: access ends at once
    cases = {
        "wrong domid": ((NO_DOMAIN, good["refs"][0]), abi.GNTST_bad_domain),
        "ref granted to a third domain": ((a.domid, to_b["refs"][0]), abi.GNTST_general_error),
        "revoked ref": ((a.domid, revoked["refs"][0]), abi.GNTST_general_error),
        "ref beyond the table": ((a.domid, 1_000_000), abi.GNTST_bad_gntref),
    }
    seen = {}
    for name, ((dom, ref), _) in cases.items():
        with pytest.raises(GrantError) as ei:
            xen.gnttab.map_grant_ref(dom, ref)
        seen[name] = ei.value.status
    assert seen == {k: v[1] for k, v in cases.items()}
    # in a batch, only the bad entries fail, each with its code
    with pytest.raises(BatchError) as bi:
        xen.gnttab.map_grant_refs([(a.domid, good["refs"][0]), (a.domid, to_b["refs"][0]),
                                   (NO_DOMAIN, 1)])
    assert bi.value.statuses == [abi.GNTST_okay, abi.GNTST_general_error, abi.GNTST_bad_domain]
    # the same from a domU: B maps A's ref granted to dom0, a revoked one, a wrong domid
    for (dom, ref), want in (((a.domid, good["refs"][0]), abi.GNTST_general_error),
                             ((a.domid, revoked["refs"][0]), abi.GNTST_general_error),
                             ((NO_DOMAIN, 1), abi.GNTST_bad_domain),
                             ((a.domid, 1_000_000), abi.GNTST_bad_gntref)):
        with pytest.raises(GrantError) as ei:
            b.call("map", grants=[[dom, ref]])
        assert ei.value.status == want, (dom, ref)
    a.call("unshare", h=to_b["h"])
    a.call("unshare", h=good["h"])


def test_errno_of_a_domus_failed_bind(agents_clean: Pair) -> None:
    a, _ = agents_clean
    with pytest.raises(GrantError) as ei:  # no such port to bind to in dom0
        a.call("evtchn_bind", remote=0, port=4000)
    assert getattr(ei.value, "errno", None) == errno.EINVAL, ei.value  # evtchn_bind_interdomain


# ------------------------------------------------------ page-directory buffers
PGDIR_PAGES = 300


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe-alloc", "be-alloc"])
def test_page_directory_buffer_domu_frontend_dom0_backend(
    xen: Backend, agents_clean: Pair, be_alloc: bool
) -> None:
    a, _ = agents_clean
    n = PGDIR_PAGES
    r = a.call("pgdir_fe", backend=0, pages=n, be_alloc=be_alloc)
    be = PgdirBackend(xen, a.domid, r["dir"], n * P, be_alloc=be_alloc)
    if be_alloc:
        fill(be.mem, "dom0 backend {page}")
        got = a.call("pgdir_map", h=r["h"])
        assert got["refs"] == be.buffer_refs
    else:
        a.call("fill", h=r["h"], text="domU frontend {page}")
        assert be.buffer_refs == r["refs"]
        assert bytes(be.mem[(n - 1) * P : (n - 1) * P + 19]) == b"domU frontend %05d" % (n - 1)
    a.call("fill", h=r["h"], text="both see {page}", offset=2048)
    assert a.call("digest", h=r["h"]) == sha(be.mem)
    if be_alloc:
        a.call("free", h=r["h"])
        be.free()
    else:
        be.free()
        a.call("free", h=r["h"])


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe-alloc", "be-alloc"])
def test_page_directory_buffer_dom0_frontend_domu_backend(
    xen: Backend, agents_clean: Pair, be_alloc: bool
) -> None:
    a, _ = agents_clean
    n = PGDIR_PAGES
    fe = PgdirFrontend(xen, a.domid, n, be_alloc=be_alloc)
    r = a.call("pgdir_be", frontend=0, gref=fe.get_dir_start(), buffer_sz=fe.buffer_sz,
               be_alloc=be_alloc)
    if be_alloc:
        fe.map()
        assert fe.buffer_refs == r["refs"]
    else:
        assert r["refs"] == fe.buffer_refs
    fill(fe.mem, "dom0 frontend {page}")
    assert a.call("digest", h=r["h"]) == sha(fe.mem)
    if be_alloc:
        fe.free()
        a.call("free", h=r["h"])
    else:
        a.call("free", h=r["h"])
        fe.free()


@pytest.mark.parametrize("be_alloc", [False, True], ids=["fe-alloc", "be-alloc"])
def test_page_directory_buffer_between_domus(agents_clean: Pair, be_alloc: bool) -> None:
    a, b = agents_clean
    n = PGDIR_PAGES
    r = a.call("pgdir_fe", backend=b.domid, pages=n, be_alloc=be_alloc)
    rb = b.call("pgdir_be", frontend=a.domid, gref=r["dir"], buffer_sz=n * P, be_alloc=be_alloc)
    if be_alloc:
        assert a.call("pgdir_map", h=r["h"])["refs"] == rb["refs"]
    b.call("fill", h=rb["h"], text="B, backend {page}")
    assert a.call("digest", h=r["h"]) == b.call("digest", h=rb["h"])
    # the mapper frees first: the end of access of the granter's pages then succeeds at once
    order = ((a, r), (b, rb)) if be_alloc else ((b, rb), (a, r))
    for d, x in order:
        d.call("free", h=x["h"])


# ------------------------------------------------------- the xenbus handshake
def test_xenbus_handshake_dom0_backend_domu_frontend(
    xen: Backend, evtchn: EventChannels, dom0_xs: Any, agents_clean: Pair
) -> None:
    """xenbus.h's state machine over real xenstore: the toolstack's device dirs, a ring page
    and an event channel published by the frontend (the domU), Connected both ways, a request,
    then Closing/Closed."""
    from xengrant.service import xenbus as xb

    a, _ = agents_clean
    fe, be = xb.add_device(dom0_xs, "vxg", 0, a.domid, 0)
    xb.switch_state(dom0_xs, be, xb.XenbusStateInitWait)
    # the frontend sees InitWait, shares its ring, allocates a port, publishes them
    assert a.call("xs_wait", path=f"{be}/state", want=["2"], timeout=30.0) == "2"
    ring = a.call("share", to=0, count=1)
    a.call("fill", h=ring["h"], text="ring of the frontend")
    pa = a.call("evtchn_unbound", remote=0)
    a.call("xs_write", path=f"{fe}/ring-ref", value=str(ring["refs"][0]))
    a.call("xs_write", path=f"{fe}/event-channel", value=str(pa))
    a.call("xs_write", path=f"{fe}/state", value=str(xb.XenbusStateInitialised))
    # the backend reads them, maps the ring, binds the port, Connected
    assert xb.wait_state(dom0_xs, fe, [xb.XenbusStateInitialised], timeout=30.0) == 3
    ref = int(dom0_xs.read(f"{fe}/ring-ref"))
    port = int(dom0_xs.read(f"{fe}/event-channel"))
    m = xen.gnttab.map_grant_ref(a.domid, ref)
    assert bytes(m.mem[:20]) == b"ring of the frontend"
    p0 = evtchn.bind_interdomain(a.domid, port)
    evtchn.drain()
    a.call("drain")
    xb.switch_state(dom0_xs, be, xb.XenbusStateConnected)
    assert a.call("xs_wait", path=f"{be}/state", want=["4"], timeout=30.0) == "4"
    a.call("xs_write", path=f"{fe}/state", value=str(xb.XenbusStateConnected))
    assert xb.wait_state(dom0_xs, fe, [xb.XenbusStateConnected], timeout=30.0) == 4
    # one request through the ring page and the channel, one response back
    m.mem[100:105] = b"req 1"
    evtchn.notify(p0)
    assert a.call("wait", port=pa, timeout=10.0) is True
    assert bytes.fromhex(a.call("read", h=ring["h"], offset=100, length=5)) == b"req 1"
    a.call("writes", h=ring["h"], items=[[200, b"rsp 1".hex()]])
    a.call("notify", port=pa)
    evtchn.wait_for(p0, timeout=10.0)
    assert bytes(m.mem[200:205]) == b"rsp 1"
    # close: the frontend is Closing, the backend unmaps and is Closed, the frontend Closed
    a.call("xs_write", path=f"{fe}/state", value=str(xb.XenbusStateClosing))
    assert xb.wait_state(dom0_xs, fe, [xb.XenbusStateClosing], timeout=30.0) == 5
    m.unmap()
    evtchn.unbind(p0)
    xb.switch_state(dom0_xs, be, xb.XenbusStateClosed)
    assert a.call("xs_wait", path=f"{be}/state", want=["6"], timeout=30.0) == "6"
    a.call("unshare", h=ring["h"])
    a.call("unbind", port=pa)
    a.call("xs_write", path=f"{fe}/state", value=str(xb.XenbusStateClosed))
    assert xb.wait_state(dom0_xs, fe, [xb.XenbusStateClosed], timeout=30.0) == 6
    dom0_xs.rm(fe)
    dom0_xs.rm(be)


# ---------------------------------------------------- a peer that is destroyed
def test_a_domu_destroyed_while_grants_go_both_ways(
    xen: Backend, evtchn: EventChannels, make_domu: Any
) -> None:
    """``xl destroy`` of a domU that maps dom0's pages and whose pages dom0 maps.

    What each side sees: dom0, waiting for an answer from the domU, gets
    DomUGone at once (not a hang); Xen tears down the domU's own mappings, so
    dom0's shared pages are intact and unshare normally; dom0's mapping of the
    domU's pages stays valid (same data, still writable) and keeps the dying
    domain listed until dom0 unmaps; then the domain is gone entirely (nothing
    leaked: ``test_zz_end`` also compares Xen's free memory) and its id is
    ``GNTST_bad_domain`` to a new map.  (One domU for all of it: a boot costs
    tens of seconds under TCG.)
    """
    c = make_domu("xg-c")
    # dom0 -> C, mapped by C
    share = xen.gntshr.share_pages(c.domid, 4)
    fill(share.mem, "dom0 for C {page}")
    h = c.call("map", grants=[[0, r] for r in share.refs])["h"]
    c.call("fill", h=h, text="C wrote {page}", offset=1000)
    # C -> dom0, mapped by dom0
    r = c.call("share", to=0, count=4)
    c.call("fill", h=r["h"], text="C page {page}")
    m = xen.gnttab.map_domain_grant_refs(c.domid, r["refs"])
    # dom0 waits for C, which is destroyed meanwhile
    port = c.call("evtchn_unbound", remote=0)
    box: dict[str, BaseException] = {}

    def waiter() -> None:
        try:
            c.call("wait", port=port, timeout=100.0)
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=waiter)
    t.start()
    domu.xl("destroy", c.name)
    t.join(150)
    c.destroyed = True
    assert not t.is_alive()
    assert isinstance(box.get("e"), domu.DomUGone), box  # not a TimeoutError after 100 s
    # C's mappings of dom0's pages were torn down by Xen; the pages are dom0's, intact
    want = bytearray(stamp("dom0 for C {page}", 4))
    fill(want, "C wrote {page}", 1000)
    assert bytes(share.mem) == want
    share.mem[:4] = b"mine"
    xen.gntshr.unshare(share)
    # dom0's mapping of C's pages holds the dying domain and its pages
    assert c.domid in domu.listed_domids(), domu.xl("list")
    assert bytes(m.mem) == stamp("C page {page}", 4)
    m.mem[:5] = b"write"
    assert bytes(m.mem[:5]) == b"write"
    try:  # what a new map of a dying domain's grant gives (printed, for docs/real-xen.md)
        xen.gnttab.map_grant_ref(c.domid, r["refs"][1]).unmap()
        print("a new map of the dying domain's grant: mapped")
    except GrantError as e:
        print(f"a new map of the dying domain's grant: {e}")
    m.unmap()
    assert domu.wait_gone(c.domid, 60.0), f"d{c.domid} is still listed: {domu.xl('list')}"
    with pytest.raises(GrantError) as ei:
        xen.gnttab.map_grant_ref(c.domid, r["refs"][0])
    assert ei.value.status == abi.GNTST_bad_domain
