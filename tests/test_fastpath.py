"""Fast paths give what the plain paths give.

The guest packs batches of map/unmap ops with one C loop and reads them back
with strided memoryview casts (:mod:`xengrant.guest.ops`, from ``VECTOR_MIN``
ops) and reads copy statuses
with one strided read; here each batch runs once that way and once through the
per-op struct/ctypes path, and the statuses, handles, bytes and counts agree.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xengrant
from xengrant import _cext, abi
from xengrant.errors import BatchError
from xengrant.guest import ops as guest_ops


def _counts(xen: xengrant.EmbeddedXen, *doms: xengrant.Domain) -> tuple[Any, ...]:
    return (
        xen.free_frames,
        tuple(xen.domain_state(d.domid).maptrack.in_use for d in doms),
        tuple(len(xen.domain_state(d.domid).gt.active) for d in doms),
    )


@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("n", [1, 15, 16, 40])
def test_map_grants_both_paths(
    xen: xengrant.EmbeddedXen,
    pair: tuple[xengrant.Domain, xengrant.Domain],
    monkeypatch: pytest.MonkeyPatch,
    vector: bool,
    n: int,
) -> None:
    a, b = pair
    if not vector:
        monkeypatch.setattr(guest_ops, "VECTOR_MIN", 1 << 30)
    share = a.grant_table.share_pages(b.domid, n)
    share.mem[:] = bytes(random.Random(n).randbytes(4096 * n))
    before = _counts(xen, a, b)
    m = b.grant_table.map_grants([(a.domid, r) for r in share.refs])
    assert m.mem.tobytes() == share.mem.tobytes()
    assert len(set(m.handles or [])) == n
    m.unmap()
    assert _counts(xen, a, b) == before
    # one bad ref in the batch: every status as Xen answers, nothing left behind
    grants = [(a.domid, r) for r in share.refs]
    grants[n // 2] = (a.domid, 0xFFFFF)
    if n == 1:
        with pytest.raises(xengrant.GrantError) as e1:
            b.grant_table.map_grants(grants)
        assert e1.value.status == abi.GNTST_bad_gntref
    else:
        with pytest.raises(BatchError) as e:
            b.grant_table.map_grants(grants)
        want = [abi.GNTST_okay] * n
        want[n // 2] = abi.GNTST_bad_gntref
        assert list(e.value.statuses) == want
    assert _counts(xen, a, b) == before
    share.unshare()


@pytest.mark.parametrize("vector", [True, False])
def test_map_grants_bad_domid_raises_the_same(
    pair: tuple[xengrant.Domain, xengrant.Domain],
    monkeypatch: pytest.MonkeyPatch,
    vector: bool,
) -> None:
    """An out-of-range field takes the struct path and raises a ValueError naming the op."""

    _a, b = pair
    if not vector:
        monkeypatch.setattr(guest_ops, "VECTOR_MIN", 1 << 30)
    with pytest.raises(ValueError, match="does not fit"):
        b.grant_table.map_grants([(1 << 16, 8)] * 20)


@pytest.mark.parametrize("count", [None, 3, 0])
def test_copy_statuses_strided(
    pair: tuple[xengrant.Domain, xengrant.Domain], count: int | None
) -> None:
    a, b = pair
    share = a.grant_table.share_pages(b.domid, 1)
    share.mem[:8] = b"abcdefgh"
    pages = b.alloc_pages(1)
    ops = (abi.gnttab_copy * 5)()
    for i, op in enumerate(ops):
        op.source.u.ref = share.refs[0] if i % 2 == 0 else 0xFFFFF
        op.source.domid = a.domid
        op.dest.u.gmfn = pages.gfns[0]
        op.dest.domid = abi.DOMID_SELF
        op.len, op.flags = 8, abi.GNTCOPY_source_gref
        op.status = 99
    got = b.grant_table.copy(ops, count)
    n = 5 if count is None else count
    assert got == [int(ops[i].status) for i in range(n)]
    assert got == [abi.GNTST_okay, abi.GNTST_bad_gntref, abi.GNTST_okay, abi.GNTST_bad_gntref,
                   abi.GNTST_okay][:n]
    assert bytes(pages.mem[:8]) == (b"abcdefgh" if n else bytes(8))
    pages.free()
    share.unshare()


_field = st.one_of(
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(-5, -1),
    st.integers(1 << 32, 1 << 40), st.sampled_from([0, 0xFFFF, 0x10000, 0xFFFFFFFF]),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, (1 << 52) - 1), _field, _field),
                     min_size=guest_ops.VECTOR_MIN, max_size=40),
       flags=st.integers(0, 0xFFFFFFFF))
def test_c_packers_match_struct(rows: list[tuple[int, int, int]], flags: int) -> None:
    """``_cext.pack_map_ops``/``pack_unmap_ops`` give the struct packer's bytes, or None
    exactly when a field does not fit (the struct path then names the grant)."""
    gfns = [r[0] for r in rows]
    refs = [r[1] for r in rows]
    domids = [r[2] for r in rows]
    try:
        want: bytes | None = b"".join(
            guest_ops.MAP_OP.pack(g << 12, flags, r, d, 0, 0, 0) for g, r, d in rows)
    except struct.error:
        want = None
    got = _cext.pack_map_ops(gfns, flags, refs, domids)
    assert (None if got is None else bytes(got)) == want
    if want is None:
        with pytest.raises(ValueError, match="does not fit"):
            guest_ops.pack_map_ops(gfns, flags, refs, domids)
    else:
        assert guest_ops.pack_map_ops(gfns, flags, refs, domids) == want
    try:
        want = b"".join(guest_ops.UNMAP_OP.pack(g << 12, 0, h, 0) for g, h in zip(gfns, refs))
    except struct.error:
        want = None
    got = _cext.pack_unmap_ops(gfns, refs)
    assert (None if got is None else bytes(got)) == want


def test_c_packers_refuse_what_is_not_a_batch() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        _cext.pack_map_ops([1, 2], 0, [1, 2], [1])
    with pytest.raises(TypeError):
        _cext.pack_unmap_ops(5, [1])
    with pytest.raises(ValueError, match="flags"):
        _cext.pack_map_ops([1], 1 << 32, [1], [1])
    assert _cext.pack_map_ops([1], 0, [1.0], [1]) is None  # not an int: the struct path's
    assert _cext.pack_map_ops([], 0, [], []) == bytearray()
