"""The map/unmap C fast paths (``_cext.map_run``/``unmap_run``) leave what the Python rules leave.

Two emulators are built the same way; every batch of GNTTABOP_map_grant_ref or
GNTTABOP_unmap_grant_ref ops (valid and invalid mixed: bad refs and domids,
read-only grants mapped writable, grants to another domain, device and zero
flags, host gfns that are not holes, repeated maps of a pinned ref, stale and
wrong handles, wrong host_addr, dev_bus_addr set, v1 and v2 granters, an HVM
mapper with one maptrack frame and a PV mapper, a granter that frees a granted
page while it is mapped, a granter destroyed while mapped) runs once with
``gnttab_map.FASTPATH`` on and once with it off.  Statuses, handles,
dev_bus_addr, debug reasons, the whole machine memory (every page's bytes and
every grant entry's flags), machine refcounts, owners and free frames, each
domain's p2m, active entries, maptrack entries and free-handle order must agree.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xengrant
from grant_helpers import hv_state
from xengrant import abi
from xengrant.emu import gnttab_map
from xengrant.emu.maptrack import MAPTRACK_PER_PAGE

BAD_DOMID = 999
HOLE_GFN = 0x70000  # far above any populated gfn of an 8 MiB machine
N_HOLES = 48


class World:
    """a (HVM, 1 maptrack frame) and p (PV) map grants of b (v1), c (v2), e (v1)."""

    def __init__(self) -> None:
        xen = self.xen = xengrant.EmbeddedXen(memory=8 << 20)
        self.a = xen.create_domain(max_maptrack_frames=1)
        self.p = xen.create_domain(pv=True)
        self.b, self.c, self.e = (xen.create_domain() for _ in range(3))
        self.c.grant_table.set_version(2)
        self.shares: list[Any] = []
        self.refs: dict[str, list[int]] = {}
        for name in ("b", "c", "e", "a"):
            g = getattr(self, name)
            refs: list[int] = []
            mappers = (self.a,) if name == "a" else (self.a, self.p)
            for mapper in mappers:
                for writable in (True, False):
                    n = 4 if name == "b" and mapper is self.a else 2
                    sh = g.grant_table.share_pages(mapper.domid, n, writable=writable)
                    sh.mem[:] = bytes([len(self.shares) + 1]) * len(sh.mem)
                    self.shares.append(sh)
                    refs.extend(sh.refs)
            if name == "b":  # granted to c: nobody here may map it
                sh = g.grant_table.share_pages(self.c.domid, 1)
                self.shares.append(sh)
                refs.extend(sh.refs)
            self.refs[name] = refs
        ds = xen.domain_state(self.b.domid)
        self.b_gfns = [ds.gt.read_entry(xen.hv.mem, r)[2] for r in self.refs["b"]]
        self.ram_gfn = {
            "a": next(iter(xen.domain_state(self.a.domid).p2m)),
            "p": next(iter(xen.domain_state(self.p.domid).p2m)),
        }
        self.e_alive = True
        # (host_addr, dev_bus_addr, handle) of each successful map, per caller
        self.history: dict[str, list[tuple[int, int, int]]] = {"a": [], "p": []}

    def domid(self, name: str) -> int:
        if name == "bad":
            return BAD_DOMID
        return int(getattr(self, name).domid)

    def state(self) -> tuple[Any, ...]:
        return hv_state(self.xen.hv)

    def run(self, batch: tuple[Any, ...]) -> Any:
        kind = batch[0]
        if kind == "release":
            gfn = self.b_gfns[batch[1] % len(self.b_gfns)]
            return self.xen.hv.decrease_reservation(self.b.domid, [gfn])
        if kind == "destroy":
            if self.e_alive:
                self.e_alive = False
                self.xen.destroy_domain(self.e.domid)
            return None
        caller_name, specs = batch[1], batch[2]
        caller = getattr(self, caller_name)
        hist = self.history[caller_name]
        before = self.xen.log_count
        if kind == "map":
            ops = (abi.gnttab_map_grant_ref * len(specs))()
            for op, (gname, refidx, flags, gfnidx) in zip(ops, specs):
                refs = self.refs.get(gname, self.refs["b"])
                op.ref = refs[refidx] if refidx < len(refs) else refidx * 1000
                op.dom = self.domid(gname)
                op.flags = flags
                gfn = HOLE_GFN + gfnidx if gfnidx < N_HOLES else self.ram_gfn[caller_name]
                op.host_addr = gfn << 12
                op.handle, op.dev_bus_addr = 0xDEAD, 0xBEEF  # kept on failure
            caller.grant_table_op(abi.GNTTABOP_map_grant_ref, ops)
            out = [(op.status, op.handle, op.dev_bus_addr) for op in ops]
            for op in ops:
                if op.status == abi.GNTST_okay:
                    hist.append((op.host_addr, op.dev_bus_addr, op.handle))
        else:
            uops = (abi.gnttab_unmap_grant_ref * len(specs))()
            used: set[int] = set()
            for uop, (hidx, addr, dba) in zip(uops, specs):
                live = [h for h in reversed(hist) if h[2] not in used]
                if live and hidx < 1000:  # a live mapping, the latest ones first
                    host_addr, bus, handle = live[hidx % len(live)]
                    used.add(handle)
                else:  # a raw handle: stale, live, never used or out of range
                    host_addr, bus, handle = (HOLE_GFN << 12), 0, hidx % 1000
                uop.handle = handle
                uop.host_addr = {"right": host_addr, "wrong": host_addr + 4096, "zero": 0}[addr]
                uop.dev_bus_addr = {"zero": 0, "right": bus, "one": 0x1000}[dba]
            caller.grant_table_op(abi.GNTTABOP_unmap_grant_ref, uops)
            out = [uop.status for uop in uops]
            for uop in uops:
                if uop.status == abi.GNTST_okay:
                    hist[:] = [h for h in hist if h[2] != uop.handle]
        reasons = (
            self.xen.debug_log[-(self.xen.log_count - before) :]
            if (self.xen.log_count > before)
            else []
        )
        return out, reasons


_H = abi.GNTMAP_host_map
_FLAGS = st.sampled_from(
    [
        _H,
        _H,
        _H,
        _H | abi.GNTMAP_readonly,
        _H | abi.GNTMAP_readonly,
        _H | abi.GNTMAP_device_map,
        abi.GNTMAP_device_map,
        0,
        _H | abi.GNTMAP_application_map,
    ]
)
_GRANTER = st.sampled_from(["b", "b", "b", "b", "c", "e", "a", "bad"])
_MAP = st.tuples(_GRANTER, st.integers(0, 14), _FLAGS, st.integers(0, N_HOLES))
_UNMAP = st.tuples(
    st.one_of(
        st.integers(0, 40),
        st.integers(1000, 1040),
        st.just(1000 + MAPTRACK_PER_PAGE + 5),
        st.just(1 << 20),
    ),
    st.sampled_from(["right", "right", "right", "right", "wrong", "zero"]),
    st.sampled_from(["zero", "zero", "zero", "zero", "right", "one"]),
)
_CALLER = st.sampled_from(["a", "a", "a", "p"])
# the common case: a's first pin of b's grants (writable or read-only) at a hole
_GOOD_MAP = st.tuples(
    st.just("b"),
    st.integers(0, 7),
    st.sampled_from([_H, _H | abi.GNTMAP_readonly]),
    st.integers(0, N_HOLES - 1),
)
_GOOD_UNMAP = st.tuples(st.integers(0, 3), st.just("right"), st.just("zero"))
_GOOD_MAPS = st.tuples(st.just("map"), st.just("a"), st.lists(_GOOD_MAP, min_size=1, max_size=10))
_GOOD_UNMAPS = st.tuples(
    st.just("unmap"), st.just("a"), st.lists(_GOOD_UNMAP, min_size=1, max_size=10)
)
_BATCH = st.one_of(
    _GOOD_MAPS,
    _GOOD_MAPS,
    _GOOD_MAPS,
    _GOOD_UNMAPS,
    _GOOD_UNMAPS,
    st.tuples(st.just("map"), _CALLER, st.lists(_MAP, min_size=1, max_size=10)),
    st.tuples(st.just("map"), _CALLER, st.lists(_MAP, min_size=1, max_size=10)),
    st.tuples(st.just("unmap"), _CALLER, st.lists(_UNMAP, min_size=1, max_size=10)),
    st.tuples(st.just("unmap"), _CALLER, st.lists(_UNMAP, min_size=1, max_size=10)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("destroy")),
)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(_BATCH, min_size=1, max_size=12))
def test_fast_path_matches_python(batches: list[Any]) -> None:
    fast, slow = World(), World()
    assert fast.state() == slow.state()
    old = gnttab_map.FASTPATH  # off under XENGRANT_FASTPATH=0
    try:
        for batch in batches:
            gnttab_map.FASTPATH = True
            got_fast = fast.run(batch)
            gnttab_map.FASTPATH = False
            got_slow = slow.run(batch)
            assert got_fast == got_slow
            assert fast.state() == slow.state()
    finally:
        gnttab_map.FASTPATH = old


def test_fast_path_maps_and_unmaps_a_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case: all okay through C, bytes visible, nothing left behind."""
    monkeypatch.setattr(gnttab_map, "FASTPATH", True)
    w = World()
    xen = w.xen
    free0 = xen.free_frames
    refs = w.refs["b"][:2] + w.refs["b"][4:6]  # b's grants to a: two writable, two r/o
    ops = (abi.gnttab_map_grant_ref * 4)()
    for i, op in enumerate(ops):
        op.ref, op.dom = refs[i], w.b.domid
        op.flags = _H if i < 2 else _H | abi.GNTMAP_readonly
        op.host_addr = (HOLE_GFN + i) << 12
    w.a.grant_table_op(abi.GNTTABOP_map_grant_ref, ops)
    assert [op.status for op in ops] == [abi.GNTST_okay] * 4
    assert len({op.handle for op in ops}) == 4
    ds = xen.domain_state(w.a.domid)
    bs = xen.domain_state(w.b.domid)
    assert ds.maptrack.in_use == 4
    assert sorted(bs.gt.active) == sorted(refs)
    for i, op in enumerate(ops):
        mfn, typ = ds.p2m[HOLE_GFN + i]
        assert op.dev_bus_addr == mfn << 12
        assert bytes(xen.hv.mem[mfn << 12 : (mfn << 12) + 4]) == bytes([1 + i // 2]) * 4
        assert ds.maptrack.entries[op.handle] is not None
        flags = bs.gt.read_entry(xen.hv.mem, refs[i])[0]
        want = abi.GTF_reading | (abi.GTF_writing if i < 2 else 0)
        assert flags & (abi.GTF_reading | abi.GTF_writing) == want
        assert typ == (1 if i < 2 else 2)  # P2M_GRANT_MAP_RW / _RO
    uops = (abi.gnttab_unmap_grant_ref * 4)()
    for uop, op in zip(uops, ops):
        uop.host_addr, uop.handle = op.host_addr, op.handle
    w.a.grant_table_op(abi.GNTTABOP_unmap_grant_ref, uops)
    assert [u.status for u in uops] == [abi.GNTST_okay] * 4
    assert ds.maptrack.in_use == 0
    assert not bs.gt.active
    assert all(HOLE_GFN + i not in ds.p2m for i in range(4))
    for r in refs:
        assert bs.gt.read_entry(xen.hv.mem, r)[0] & (abi.GTF_reading | abi.GTF_writing) == 0
    assert xen.free_frames == free0
    for sh in w.shares[:2]:
        sh.try_unshare()  # no pin left: the granter can end access
