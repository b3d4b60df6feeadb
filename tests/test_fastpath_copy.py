"""GNTTABOP_copy's C fast path (``_cext.copy_run``) leaves what the Python rules leave.

Two emulators are built the same way; every batch of copy ops (valid and
invalid mixed: bad refs and domids, read-only destinations, grants to another
domain, gfns named by a numeric domid, offsets crossing the page, zero length,
v1 and v2 tables, grants already mapped, self-grants, the same entry on both
sides) runs once with ``gnttab_copy.FASTPATH`` on and once with it off.  The
statuses, the debug reasons, the whole machine memory (so every page's bytes
and every grant entry's GTF_reading/GTF_writing flags), the active entries,
the maptrack and the free frames must agree.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xengrant
from xengrant import abi
from xengrant.emu import gnttab_copy

BAD_DOMID = 999
HOLE_GFN = 0xFFFFF


class World:
    """One emulator: a copies; b (v1) and c (v2) grant to it; a grants to itself."""

    def __init__(self) -> None:
        self.xen = xengrant.EmbeddedXen(memory=8 << 20)
        a, b, c = (self.xen.create_domain() for _ in range(3))
        self.a, self.b, self.c = a, b, c
        c.grant_table.set_version(2)
        self.shares = [
            b.grant_table.share_pages(a.domid, 4, writable=True),
            b.grant_table.share_pages(a.domid, 2, writable=False),
            b.grant_table.share_pages(c.domid, 2, writable=True),
            c.grant_table.share_pages(a.domid, 2, writable=True),
            a.grant_table.share_pages(a.domid, 2, writable=True),
        ]
        self.own = a.alloc_pages(4)
        self.b_own = b.alloc_pages(1)
        rng = random.Random(7)
        for sh in self.shares:
            sh.mem[:] = rng.randbytes(len(sh.mem))
        self.own.mem[:] = rng.randbytes(len(self.own.mem))
        # a grant a already maps (pinned): the fast path must leave it to Python
        self.mapping = a.grant_table.map_grants([(b.domid, self.shares[0].refs[0])])
        self.refs = sorted({r for sh in self.shares for r in sh.refs})

    def state(self) -> tuple[Any, ...]:
        xen = self.xen
        per_dom = []
        for d in (self.a, self.b, self.c):
            ds = xen.domain_state(d.domid)
            active = {
                ref: (act.pin, act.domid, act.mfn, act.start, act.length, act.is_sub_page)
                for ref, act in ds.gt.active.items()
            }
            per_dom.append((active, ds.maptrack.in_use, d.grant_table.num_free_grants()))
        return bytes(xen.hv.mem), tuple(per_dom), xen.free_frames

    def run(self, specs: list[tuple[Any, ...]]) -> tuple[list[int], list[str]]:
        ops = (abi.gnttab_copy * len(specs))()
        for op, (src, dst, length) in zip(ops, specs):
            flags = 0
            for side, (kind, dom, idx, off), bit in (
                (op.source, src, abi.GNTCOPY_source_gref),
                (op.dest, dst, abi.GNTCOPY_dest_gref),
            ):
                side.domid = self.domid(dom)
                side.offset = off
                if kind == "gref":
                    flags |= bit
                    side.u.ref = self.refs[idx] if idx < len(self.refs) else idx
                else:
                    side.u.gmfn = self.gfn(idx)
            op.len, op.flags = length, flags
        statuses = self.a.grant_table.copy(ops)
        return statuses, list(self.a.hypercalls.last_reasons)

    def domid(self, name: str) -> int:
        return {
            "self": abi.DOMID_SELF,
            "a": self.a.domid,
            "b": self.b.domid,
            "c": self.c.domid,
            "bad": BAD_DOMID,
        }[name]

    def gfn(self, idx: int) -> int:
        gfns = list(self.own.gfns) + list(self.b_own.gfns)
        return gfns[idx] if idx < len(gfns) else HOLE_GFN


@pytest.fixture(scope="module")
def worlds() -> Iterator[tuple[World, World]]:
    pair = (World(), World())
    assert pair[0].state() == pair[1].state()
    yield pair
    for w in pair:
        w.mapping.unmap()


# weighted towards ops that succeed, so most batches have runs the C path takes
_DOMS = st.sampled_from(["b", "b", "b", "b", "self", "a", "c", "bad"])
_OFFS = st.sampled_from([0, 0, 0, 0, 0, 1, 100, 2048, 4095, 4096])
_GREF = st.tuples(st.just("gref"), _DOMS, st.sampled_from([*range(12), 5000, 0xFFFFFFFF]), _OFFS)
_GMFN = st.tuples(
    st.just("gmfn"), st.sampled_from(["self", "self", "self", "a", "b"]), st.integers(0, 5), _OFFS
)
_SIDE = st.one_of(_GREF, _GMFN)
_ANY_OP = st.tuples(_SIDE, _SIDE, st.sampled_from([0, 1, 8, 8, 2048, 4095, 4096, 4096, 4096, 4097]))
# the common case: a grant of b (or a's self-grant) to or from a page of a
_GOOD_GREF = st.tuples(st.just("gref"), st.sampled_from(["b", "self"]), st.integers(0, 7), _OFFS)
_GOOD_GMFN = st.tuples(st.just("gmfn"), st.just("self"), st.integers(0, 3), _OFFS)
_GOOD_OP = st.one_of(
    st.tuples(_GOOD_GREF, _GOOD_GMFN, st.integers(0, 4096)),
    st.tuples(_GOOD_GMFN, _GOOD_GREF, st.integers(0, 4096)),
    st.tuples(_GOOD_GREF, _GOOD_GREF, st.integers(0, 4096)),
)
_OP = st.one_of(_ANY_OP, _GOOD_OP, _GOOD_OP)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(_OP, min_size=1, max_size=12))
def test_fast_path_matches_python(worlds: tuple[World, World], batch: list[Any]) -> None:
    fast, slow = worlds
    old = gnttab_copy.FASTPATH  # off under XENGRANT_FASTPATH=0
    try:
        gnttab_copy.FASTPATH = True
        got_fast = fast.run(batch)
        gnttab_copy.FASTPATH = False
        got_slow = slow.run(batch)
    finally:
        gnttab_copy.FASTPATH = old
    assert got_fast == got_slow
    assert fast.state() == slow.state()


def test_fast_path_copies_a_full_batch() -> None:
    """The common case is all okay, the bytes arrive and no pin or flag is left."""
    w = World()
    share = w.shares[0]
    n = len(share.refs)
    ops = (abi.gnttab_copy * n)()
    dst = w.a.alloc_pages(n)
    for op, ref, gfn in zip(ops, share.refs, dst.gfns):
        op.source.u.ref, op.source.domid = ref, w.b.domid
        op.dest.u.gmfn, op.dest.domid = gfn, abi.DOMID_SELF
        op.len, op.flags = 4096, abi.GNTCOPY_source_gref
    before = w.state()[1]
    flags_before = [w.b.grant_table.entry(r).flags for r in share.refs]
    assert w.a.grant_table.copy(ops) == [abi.GNTST_okay] * n
    assert bytes(dst.mem) == bytes(share.mem)
    assert w.state()[1] == before
    assert [w.b.grant_table.entry(r).flags for r in share.refs] == flags_before
    w.mapping.unmap()
