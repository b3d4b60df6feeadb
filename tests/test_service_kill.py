"""SIGKILL a domain process holding grants, mappings, ports, watches and notifies.

The service sees the socket close and destroys the domain as Xen's
``domain_kill`` would; once the survivor lets go of what it held of the dead
domain, every table and the free-frame count are exactly as before the victim
was born.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from service_helpers import Actor, Service
from xengrant import abi
from xengrant.service import stats
from xengrant.service.evtchn import EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound

TABLES = ("free_frames", "domains", "evtchn", "xenstore", "xenstore_watches", "notifies")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Service, Actor, Actor]]:
    svc = Service()
    dom0 = Actor(svc, domid=0)
    survivor = Actor(svc)
    survivor("reap")  # its grant table is set up lazily: do it before any snapshot
    try:
        yield svc, dom0, survivor
    finally:
        survivor.close()
        dom0.close()
        assert svc.stop() == 0


def same_tables(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in TABLES:
        was_, now_ = before[key], after[key]
        if key == "domains":  # a domain's ring indices move with its work: not a table
            was_, now_ = _without_ring(was_), _without_ring(now_)
            assert sorted(now_) == sorted(was_)
            for domid, was in was_.items():
                now = now_[domid]
                assert {k: (was[k], now[k]) for k in was if was[k] != now[k]} == {}, domid
        assert now_ == was_, key


def _without_ring(domains: dict[str, Any]) -> dict[str, Any]:
    return {d: {k: v for k, v in e.items() if k != "ring"} for d, e in domains.items()}


@pytest.mark.parametrize("round_", [1, 2])
def test_sigkill_releases_everything(world: tuple[Service, Actor, Actor], round_: int) -> None:
    svc, dom0, a = world
    before = stats(svc.path)
    v = Actor(svc)
    try:
        # a grants v three writable pages and one read-only page; v maps them
        ka, refs = a("share", v.domid, 3)
        kro, (ro_ref,) = a("share", v.domid, 1, False)
        a("write", ka, 0, b"\x55" * 32)
        a("write", ka, 2 * 4096, b"\xaa" * 16)
        mv, _ = v("map", a.domid, refs)
        mro, _ = v("map", a.domid, [ro_ref], False)
        # v grants a two pages; a maps them and v writes through its share
        kv, vrefs = v("share", a.domid, 2)
        v("write", kv, 4096, b"written before the kill")
        ma, _ = a("map", v.domid, vrefs)
        # an event channel between them, and a gntdev notify on v's mapping
        pa = a("ev", "bind_unbound_port", v.domid)
        pv = v("ev", "bind_interdomain", a.domid, pa)
        mn = v("map_notify", a.domid, refs[2], 7, pv)
        # xenstore: v writes its own nodes and watches a's
        v("xs", "write", "data/state", "4")
        v("xs", "watch", f"/local/domain/{a.domid}/data", "w")
        # a copy through the grant works before the kill
        assert v("copy_from", a.domid, refs[0], 0, 4)[0] == [abi.GNTST_okay]

        during = stats(svc.path)
        pins = during["domains"][str(a.domid)]["active"]
        assert sorted(int(r) for r in pins) == sorted([*refs, ro_ref])
        assert pins[str(refs[2])] == 2  # the plain mapping and the notify mapping
        assert during["domains"][str(v.domid)]["maptrack_in_use"] == 5
        assert during["notifies"] == before["notifies"] + 1

        v.kill()
        dom0("wait_gone", v.domid)

        after = stats(svc.path)
        # v's mappings of a's grants are gone: no pin left on a's table
        assert after["domains"][str(a.domid)]["active"] == {}
        # v lingers as a zombie while a maps its pages, which stay valid
        assert after["domains"][str(v.domid)]["dying"] is True
        assert a("read", ma, 4096, 23) == (b"written before the kill", 0)
        # its notify fired: byte 7 of a's page cleared, event on a's port
        assert a("ev", "wait", pa, 30) == pa
        assert a("read", ka, 2 * 4096, 16) == (b"\xaa" * 7 + b"\x00" + b"\xaa" * 8, 0)
        assert a("read", ka, 0, 8) == (b"\x55" * 8, 0)
        # a's end of the channel is unbound again, offered to the dead domain
        assert a("ev", "status", pa) == (EVTCHNSTAT_unbound, v.domid, 0)
        assert after["xenstore_watches"] == before["xenstore_watches"]  # v's watch went
        assert f"/local/domain/{v.domid}" not in after["xenstore"]
        assert after["notifies"] == before["notifies"]

        # a lets go of what it held: nothing of v or of this test is left
        a("try_unshare", ka)  # not Busy: the dead mapper's pins went with it
        a("try_unshare", kro)
        a("unmap", ma)  # the zombie's last page: it is gone now
        assert str(v.domid) not in stats(svc.path)["domains"]
        a("ev", "unbind", pa)
        same_tables(before, stats(svc.path))
    finally:
        if v.proc.is_alive():
            v.kill()
    del mv, mro, mn, kv, pv


def test_sigkill_granter_while_mapped_with_notify(world: tuple[Service, Actor, Actor]) -> None:
    """The granter dies: its gntalloc notify fires, the mapper keeps valid pages."""
    svc, dom0, a = world
    before = stats(svc.path)
    v = Actor(svc)
    try:
        pv = v("ev", "bind_unbound_port", a.domid)
        pa = a("ev", "bind_interdomain", v.domid, pv)
        assert a("ev", "status", pa) == (EVTCHNSTAT_interdomain, v.domid, pv)
        assert a("ev", "wait", pa, 30) == pa  # the bind event
        key, ref = v("share_notify", a.domid, 0, pv)
        v("write", key, 0, b"\x09alive")
        m, _ = a("map", v.domid, [ref])
        v.kill()
        dom0("wait_gone", v.domid)
        assert a("ev", "wait", pa, 30) == pa  # sent by the dying domain's notify
        assert a("read", m, 0, 6) == (b"\x00alive", 0)  # byte 0 cleared, page still there
        a("unmap", m)
        a("ev", "unbind", pa)
        same_tables(before, stats(svc.path))
    finally:
        if v.proc.is_alive():
            v.kill()


def test_sigkill_toolstack_destroys_unattached_domains() -> None:
    """Domains a privileged process made and nobody attached go with it.

    No watcher is left to wait on here, so this relies on the service's order:
    the killed process's socket hung up before ``stats`` connected, and the
    service finishes a hang-up before it accepts a later connection.
    """
    svc = Service()
    try:
        before = stats(svc.path)
        dom0 = Actor(svc, domid=0)
        made = [dom0("dom", "create_domain", d) for d in (77, None)]
        assert all(str(d) in stats(svc.path)["domains"] for d in made)
        dom0.kill()
        same_tables(before, stats(svc.path))
    finally:
        assert svc.stop() == 0
