"""Fast paths give what the plain paths give.

The guest packs and unpacks batches of map/unmap ops with strided memoryview
casts (:mod:`xengrant.guest.ops`, from ``VECTOR_MIN`` ops) and reads copy statuses
with one strided read; here each batch runs once that way and once through the
per-op struct/ctypes path, and the statuses, handles, bytes and counts agree.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

import xengrant
from xengrant import abi
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
