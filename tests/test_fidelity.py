"""Fidelity to Xen 4.17.7 where the emulator used to differ (issue #18), and
fault injection (``xen.faults``).

Each test cites the Xen (or Linux) function whose answer it asserts:
xen/common/grant_table.c (``do_grant_table_op``, ``_cache_flush``,
``map_grant_ref``), xen/arch/x86/mm.c (``steal_page``),
xen/arch/x86/pv/grant_table.c (``create_grant_pv_mapping``,
``replace_grant_pv_mapping``), Linux drivers/xen/grant-table.c
(``gnttab_retry_eagain_gop``).
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

import pytest

import xengrant
from grant_helpers import (
    HOST,
    Dom,
    MakeDomain,
    Xen,
    errno_of,
    flags_of,
    grant,
    map1,
    map_grants,
    ram,
    read,
    unmap1,
    write,
)
from xengrant import abi
from xengrant.errors import GrantError
from xengrant.guest import eagain

RO = abi.GNTMAP_readonly
PERMIT = abi.GTF_permit_access
CLEAN, INVAL = abi.GNTTAB_CACHE_CLEAN, abi.GNTTAB_CACHE_INVAL


def _pins(xen: Xen, domid: int) -> dict[int, int]:
    return {ref: act.pin for ref, act in xen.domain_state(domid).gt.active.items()}


def _mfn(xen: Xen, dom: Dom, gfn: int) -> int:
    return int(xen.domain_state(dom.domid).p2m[gfn][0])


# ============================================================ do_grant_table_op
def _raw(dom: Dom, cmd: int, ops: Any, count: int = 1) -> int:
    """The hypercall's return as the guest sees it (no exception)."""
    return int(dom.hypercalls.grant_table_op(cmd, memoryview(ops).cast("B"), count))


def test_stray_command_bits_are_einval_and_nothing_runs(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """do_grant_table_op: ``(cmd &= GNTTABOP_CMD_MASK) != GNTTABOP_cache_flush &&
    opaque_in`` -> -EINVAL, before the command is even looked up."""
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr, ops[0].flags = b.get_pages(1)[0] << 12, HOST
    ops[0].ref, ops[0].dom = ref, a.domid
    for stray in (1 << 12, 1 << 20, 1 << 31):
        assert _raw(b, abi.GNTTABOP_map_grant_ref | stray, ops) == -errno.EINVAL
        assert _raw(b, 13 | stray, ops) == -errno.EINVAL  # unknown *and* stray: EINVAL
    assert _pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    # the low 12 bits alone: unknown commands are -ENOSYS
    assert _raw(b, 13, ops) == -errno.ENOSYS
    assert _raw(b, 0xFFF, ops) == -errno.ENOSYS
    # a negative count is checked first: -EINVAL whatever the command
    assert _raw(b, 0xFFF, ops, -1) == -errno.EINVAL
    # cmd is an unsigned int: bits above 31 are not part of it
    assert _raw(b, (1 << 32) | abi.GNTTABOP_map_grant_ref, ops) == 0
    assert ops[0].status == abi.GNTST_okay
    assert unmap1(b, ops[0]) == abi.GNTST_okay


# ================================================================ cache_flush
def _flush(dom: Dom, *specs: tuple[int, int, int, int], cmd_arg: int = 0) -> int:
    ops = (abi.gnttab_cache_flush * len(specs))()
    for op, (dba, off, length, what) in zip(ops, specs):
        op.a.dev_bus_addr, op.offset, op.length, op.op = dba, off, length, what
    return _raw(dom, abi.GNTTABOP_cache_flush | cmd_arg, ops, len(specs))


def test_cache_flush_of_own_page_x86(xen: Xen, make_domain: MakeDomain) -> None:
    """_cache_flush on x86: clean (with or without invalidate) is 0,
    invalidate alone is -EOPNOTSUPP (x86 invalidate_dcache_va_range)."""
    a = make_domain()
    (gfn,) = ram(a)
    write(a, gfn, b"unchanged")
    dba = _mfn(xen, a, gfn) << 12
    assert _flush(a, (dba, 0, 4096, CLEAN)) == 0
    assert _flush(a, (dba, 100, 10, CLEAN | INVAL)) == 0
    assert _flush(a, (dba, 0, 4096, INVAL)) == -errno.EOPNOTSUPP
    assert read(a, gfn, 9) == b"unchanged"


@pytest.mark.parametrize(
    ("offset", "length", "what"),
    [
        (4096, 0, CLEAN),  # offset >= PAGE_SIZE
        (0, 4097, CLEAN),  # length > PAGE_SIZE
        (4000, 97, CLEAN),  # offset + length > PAGE_SIZE
        (0, 8, 4),  # an op bit other than CLEAN|INVAL
        (0, 8, abi.GNTTAB_CACHE_SOURCE_GREF | CLEAN),  # SOURCE_GREF: -EINVAL first
    ],
)
def test_cache_flush_bad_arguments_are_einval(
    xen: Xen, make_domain: MakeDomain, offset: int, length: int, what: int
) -> None:
    a = make_domain()
    (gfn,) = ram(a)
    assert _flush(a, (_mfn(xen, a, gfn) << 12, offset, length, what)) == -errno.EINVAL


def test_cache_flush_nothing_to_do_and_the_continuation(xen: Xen, make_domain: MakeDomain) -> None:
    """``length == 0 || op == 0``: 0, or -EILSEQ when cur_ref (the command
    word's continuation bits) is set."""
    a = make_domain()
    assert _flush(a, (1 << 60, 0, 0, CLEAN)) == 0  # not even the frame is looked at
    assert _flush(a, (1 << 60, 0, 8, 0)) == 0
    assert _flush(a, (0, 0, 0, CLEAN), cmd_arg=1 << 12) == -errno.EILSEQ


def test_cache_flush_frames_not_owned_or_not_mapped(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """!mfn_valid -> -EINVAL; no owner -> -EPERM; another domain's frame the
    caller does not map by grant (grant_map_exists) -> -EINVAL."""
    a, b = pair
    assert _flush(b, (xen.nr_frames << 12, 0, 8, CLEAN)) == -errno.EINVAL
    free = next(m for m in range(1, xen.nr_frames) if xen.hv.machine.owner[m] < 0)
    assert _flush(b, (free << 12, 0, 8, CLEAN)) == -errno.EPERM
    ref, gfn = grant(a, b.domid)
    dba = _mfn(xen, a, gfn) << 12
    assert _flush(b, (dba, 0, 8, CLEAN)) == -errno.EINVAL  # granted, not mapped
    op = map1(b, a.domid, ref, HOST | RO)
    assert op.status == abi.GNTST_okay and op.dev_bus_addr == dba
    assert _flush(b, (op.dev_bus_addr, 0, 8, CLEAN)) == 0
    # the search starts at cur_ref (ref < 4096): from 4096 on it finds nothing
    assert _flush(b, (op.dev_bus_addr, 0, 8, CLEAN), cmd_arg=1 << 12) == -errno.EINVAL
    # a batch stops at its first failing op, with that op's errno
    assert _flush(b, (dba, 0, 8, CLEAN), (dba, 0, 8, INVAL), (0, 4096, 8, CLEAN)) == (
        -errno.EOPNOTSUPP
    )
    assert unmap1(b, op) == abi.GNTST_okay
    assert _flush(b, (dba, 0, 8, CLEAN)) == -errno.EINVAL
    # a bystander's frame: never reachable
    c = xen.create_domain()
    assert _flush(c, (dba, 0, 8, CLEAN)) == -errno.EINVAL


# ================================================================== steal_page
def _offer(recv: Dom, giver: Dom) -> int:
    return int(recv.grant_table.grant_transfer(giver.domid, ram(recv)[0] + 0x1000))


def test_transfer_of_a_page_the_pv_giver_still_maps_is_bad_page(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """x86 steal_page wants exactly the allocation's reference: the giver's own
    mapping (a PV page-table entry: here a view) holds one more, so
    gnttab_transfer answers GNTST_bad_page and the page is kept."""
    giver, recv = make_domain(pv=True), make_domain()
    ref = _offer(recv, giver)
    (mfn,) = ram(giver)
    view = giver.view([mfn], True)
    mem = memoryview(view)
    mem[:4] = b"mine"
    with pytest.raises(GrantError) as ei:
        giver.grant_table.transfer(mfn, recv.domid, ref)
    assert ei.value.status == abi.GNTST_bad_page
    assert flags_of(xen, recv.domid, ref) == abi.GTF_accept_transfer  # not committed
    assert xen.domain_state(giver.domid).p2m[mfn][0] == mfn
    mem[4:8] = b"!!!!"  # still the giver's page
    assert bytes(mem[:8]) == b"mine!!!!"
    mem.release()
    view.close()  # put_page_from_l1e: now only the allocation holds it
    giver.grant_table.transfer(mfn, recv.domid, ref)
    dest = recv.grant_table.end_transfer(ref)
    assert read(recv, dest, 8) == b"mine!!!!"


def test_a_pv_page_freed_while_viewed_goes_when_the_view_closes(
    xen: Xen, make_domain: MakeDomain
) -> None:
    a = make_domain(pv=True)
    (mfn,) = ram(a)
    view = a.view([mfn], True)
    free = xen.free_frames
    assert a.hypercalls.decrease_reservation([mfn]) == 1
    assert xen.free_frames == free  # the mapping still holds it
    view.close()
    assert xen.free_frames == free + 1


# ============================================================== contains_pte
@pytest.mark.parametrize("misaligned", [False, True])
def test_contains_pte_on_a_frame_that_is_no_page_table(
    xen: Xen, make_domain: MakeDomain, misaligned: bool
) -> None:
    """x86 create_grant_pv_mapping: host_addr names an L1 entry; a misaligned
    one, or a frame that is no L1 page table, is GNTST_general_error -- after
    the pin, which undo_out drops again."""
    a, b = make_domain(), make_domain(pv=True)
    ref, _gfn = grant(a, b.domid)
    (page,) = ram(b)
    addr = (page << 12) + (3 if misaligned else 8)
    op = map1(b, a.domid, ref, HOST | abi.GNTMAP_contains_pte, page)
    op2 = map_grants(b, [(a.domid, ref, HOST | abi.GNTMAP_contains_pte)])[0]
    for o in (op, op2):
        assert o.status == abi.GNTST_general_error
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr, ops[0].flags = addr, HOST | abi.GNTMAP_contains_pte
    ops[0].ref, ops[0].dom = ref, a.domid
    assert b.grant_table_op(abi.GNTTABOP_map_grant_ref, ops) == 0
    assert ops[0].status == abi.GNTST_general_error
    want = "Misaligned PTE address" if misaligned else "is not an L1 page table"
    assert want in xen.debug_log[-1][3]
    assert _pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert xen.domain_state(b.domid).maptrack.in_use == 0
    # the checks before the pin still come first
    bad = map1(b, a.domid, 1 << 20, HOST | abi.GNTMAP_contains_pte)
    assert bad.status == abi.GNTST_bad_gntref


# ======================================================= unmap_and_replace (PV)
def _replace(dom: Dom, host_addr: int, new_addr: int, handle: int) -> int:
    ops = (abi.gnttab_unmap_and_replace * 1)()
    ops[0].host_addr, ops[0].new_addr, ops[0].handle = host_addr, new_addr, handle
    assert dom.grant_table_op(abi.GNTTABOP_unmap_and_replace, ops) == 0
    return int(ops[0].status)


def test_unmap_and_replace_moves_the_new_addr_mapping_for_pv(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """x86 replace_grant_pv_mapping: the entry at new_addr is stolen
    (steal_linear_address) and put where the grant was; the grant is unmapped."""
    a, b = make_domain(), make_domain(pv=True)
    rx, _ = grant(a, b.domid, data=b"X page")
    ry, _ = grant(a, b.domid, data=b"Y page")
    x, y = map1(b, a.domid, rx), map1(b, a.domid, ry)
    assert (x.status, y.status) == (abi.GNTST_okay, abi.GNTST_okay)
    assert _replace(b, x.host_addr, y.host_addr, x.handle) == abi.GNTST_okay
    p2m = xen.domain_state(b.domid).p2m
    assert y.host_addr >> 12 not in p2m
    assert read(b, x.host_addr >> 12, 6) == b"Y page"
    assert flags_of(xen, a.domid, rx) == PERMIT  # X unpinned
    assert rx not in _pins(xen, a.domid)
    # Y's handle now names the entry at X's address: unmapped there
    assert unmap1(b, y) == abi.GNTST_general_error  # nothing of Y at y.host_addr
    y.host_addr = x.host_addr
    assert unmap1(b, y) == abi.GNTST_okay
    assert _pins(xen, a.domid) == {}
    assert xen.domain_state(b.domid).maptrack.in_use == 0


def test_unmap_and_replace_with_an_empty_new_addr_unmaps(xen: Xen, make_domain: MakeDomain) -> None:
    a, b = make_domain(), make_domain(pv=True)
    rx, _ = grant(a, b.domid)
    x = map1(b, a.domid, rx)
    hole = b.get_pages(1)[0]
    assert _replace(b, x.host_addr, hole << 12, x.handle) == abi.GNTST_okay
    assert x.host_addr >> 12 not in xen.domain_state(b.domid).p2m
    assert _pins(xen, a.domid) == {}


def test_unmap_and_replace_refusals(xen: Xen, make_domain: MakeDomain) -> None:
    """A translated mapper cannot replace (replace_grant_p2m_mapping); a PV
    mapper's RAM is its physmap, not a linear mapping the emulator can move."""
    a, b, h = make_domain(), make_domain(pv=True), make_domain()
    rx, _ = grant(a, b.domid)
    rh, _ = grant(a, h.domid)
    x, hx = map1(b, a.domid, rx), map1(h, a.domid, rh)
    (page,) = ram(b)
    assert _replace(b, x.host_addr, page << 12, x.handle) == abi.GNTST_general_error
    assert _replace(h, hx.host_addr, h.get_pages(1)[0] << 12, hx.handle) == (
        abi.GNTST_general_error
    )
    assert unmap1(b, x) == abi.GNTST_okay
    assert unmap1(h, hx) == abi.GNTST_okay
    assert _pins(xen, a.domid) == {}


# ============================================================ fault injection
def test_injected_eagain_on_a_raw_map_changes_nothing(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """get_paged_frame answers GNTST_eagain for a paged-out frame: the pin and
    the handle are undone (unlock_out_clear)."""
    a, b = pair
    ref, _ = grant(a, b.domid)
    with xen.faults.inject("eagain", op="map_grant_ref") as fault:
        op = map1(b, a.domid, ref)
        assert op.status == abi.GNTST_eagain
        assert _pins(xen, a.domid) == {}
        assert flags_of(xen, a.domid, ref) == PERMIT
        assert xen.domain_state(b.domid).maptrack.in_use == 0
        again = map1(b, a.domid, ref)  # count=1: fired once
        assert again.status == abi.GNTST_okay
    assert fault.fired == 1 and not xen.faults
    assert unmap1(b, again) == abi.GNTST_okay


class _FakeTime:
    def __init__(self, waits: list[float]) -> None:
        self.sleep = waits.append


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits gnttab_retry_eagain_gop asks for (none really taken)."""
    waits: list[float] = []
    monkeypatch.setattr(eagain, "time", _FakeTime(waits))
    return waits


def test_map_refs_retries_eagain_as_linux(
    xen: Xen, pair: tuple[Dom, Dom], sleeps: list[float]
) -> None:
    """Linux gnttab_map_refs -> gnttab_retry_eagain_gop: the op alone again,
    msleep(1), msleep(2), ... while eagain."""
    a, b = pair
    refs = [grant(a, b.domid, data=bytes([i]) * 4)[0] for i in range(3)]
    ops = (abi.gnttab_map_grant_ref * 3)()
    for op, ref in zip(ops, refs):
        op.host_addr, op.flags, op.ref, op.dom = b.get_pages(1)[0] << 12, HOST, ref, a.domid
    with xen.faults.inject("eagain", op="map_grant_ref", count=3, after=1):
        assert b.grant_table.map_refs(ops) == 0
    assert [op.status for op in ops] == [abi.GNTST_okay] * 3
    # ops 1 and 2 answered eagain in the batch (2 fires); op 1's first retry
    # too (the third), then it mapped after msleep(1); op 2's first retry mapped
    assert sleeps == [0.001]
    for i, op in enumerate(ops):
        assert read(b, op.host_addr >> 12, 4) == bytes([i]) * 4
        assert unmap1(b, op) == abi.GNTST_okay


def test_map_refs_gives_up_with_bad_page_after_255_waits(
    xen: Xen, pair: tuple[Dom, Dom], sleeps: list[float]
) -> None:
    """``delay < MAX_DELAY`` (256): 1 + 2 + ... + 255 ms, then GNTST_bad_page."""
    a, b = pair
    ref, _ = grant(a, b.domid)
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr, ops[0].flags, ops[0].ref, ops[0].dom = (
        b.get_pages(1)[0] << 12, HOST, ref, a.domid,
    )
    with xen.faults.inject("eagain", count=None) as fault:
        b.grant_table.map_refs(ops)
    assert ops[0].status == abi.GNTST_bad_page
    assert sleeps == [d / 1000 for d in range(1, 256)]
    assert fault.fired == 256
    assert _pins(xen, a.domid) == {}


def test_copy_and_portable_layer_retry_eagain(
    xen: Xen, pair: tuple[Dom, Dom], sleeps: list[float]
) -> None:
    """gnttab_batch_copy and gntdev's map (gnttab_map_refs) retry eagain too."""
    a, b = pair
    share = a.grant_table.share_pages(b.domid, 1)
    share.mem[:5] = b"hello"
    with (
        xen.faults.inject("eagain", op="map_grant_ref", count=2),
        b.gnttab.map_grant_ref(a.domid, share.refs[0]) as m,
    ):
        assert bytes(m.mem[:5]) == b"hello"
    assert sleeps == [0.001]  # eagain in the batch, then in the first retry
    dest = bytearray(5)
    with xen.faults.inject("eagain", op="copy", count=3):
        seg = xengrant.CopySegment(xengrant.GrantRef(a.domid, share.refs[0], 0), dest, 5)
        assert b.gnttab.grant_copy([seg]) == [abi.GNTST_okay]
    assert dest == b"hello"
    assert sleeps == [0.001, 0.001, 0.002]
    share.unshare()


def test_injected_no_maptrack_and_unstable(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """get_maptrack_handle failing: GNTST_no_space; _set_status_v1 losing its
    5 cmpxchg tries: GNTST_general_error "Shared grant entry is unstable"."""
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    (mine,) = ram(b)
    with xen.faults.inject("no_maptrack", domid=b.domid):
        assert map1(b, a.domid, ref).status == abi.GNTST_no_space
    with xen.faults.inject("unstable", count=2):
        assert map1(b, a.domid, ref).status == abi.GNTST_general_error
        assert "unstable" in xen.debug_log[-1][3]
        copies = ((gfn_ref(ref, a), (mine, abi.DOMID_SELF, 0), 8, abi.GNTCOPY_source_gref),)
        ops = _copy_ops(copies)
        assert b.grant_table_op(abi.GNTTABOP_copy, ops) == 0
        assert ops[0].status == abi.GNTST_general_error
    assert _pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert xen.domain_state(b.domid).maptrack.in_use == 0


def gfn_ref(ref: int, dom: Dom) -> tuple[int, int, int]:
    return (ref, dom.domid, 0)


def _copy_ops(specs: Any) -> Any:
    from grant_helpers import copy_ops

    return copy_ops(specs)


def test_injected_efault_stops_the_batch_at_that_op(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """gnttab_map_grant_ref: __copy_from_guest_offset failing at op i returns
    -EFAULT; ops before i are done, i and later untouched."""
    a, b = pair
    refs = [grant(a, b.domid)[0] for _ in range(3)]
    ops = (abi.gnttab_map_grant_ref * 3)()
    for op, ref in zip(ops, refs):
        op.host_addr, op.flags, op.ref, op.dom = b.get_pages(1)[0] << 12, HOST, ref, a.domid
        op.status = 77
    with xen.faults.inject("efault", op="map_grant_ref", after=1):
        assert errno_of(lambda: b.grant_table_op(abi.GNTTABOP_map_grant_ref, ops)) == (
            errno.EFAULT
        )
    assert [op.status for op in ops] == [abi.GNTST_okay, 77, 77]
    assert set(_pins(xen, a.domid)) == {refs[0]}
    assert unmap1(b, ops[0]) == abi.GNTST_okay
    with xen.faults.inject("efault", op="query_size"):
        with pytest.raises(xengrant.HypercallError) as ei:
            b.grant_table.query_size()
        assert ei.value.errno == errno.EFAULT
    assert b.grant_table.query_size()[1] == 64


def _statuses_with_seed(seed: int) -> list[int]:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        a, b = xen.create_domain(), xen.create_domain()
        ref, _ = grant(a, b.domid)
        (mine,) = ram(b)
        xen.faults.inject("eagain", op="copy", count=None, probability=0.5, seed=seed)
        ops = _copy_ops([((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, 1)] * 24)
        assert b.grant_table_op(abi.GNTTABOP_copy, ops) == 0
        return [int(op.status) for op in ops]


def test_probability_faults_are_deterministic_for_a_seed() -> None:
    first = _statuses_with_seed(7)
    assert first == _statuses_with_seed(7)
    assert set(first) == {abi.GNTST_okay, abi.GNTST_eagain}
    assert first != _statuses_with_seed(8)


def test_inject_validates_its_arguments(xen: Xen) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        xen.faults.inject("gremlins")
    with pytest.raises(ValueError, match="cannot hit"):
        xen.faults.inject("no_maptrack", op="copy")
    with pytest.raises(ValueError, match="probability"):
        xen.faults.inject("eagain", probability=1.5)
    with pytest.raises(ValueError, match="count"):
        xen.faults.inject("eagain", count=-1)
    assert not xen.faults


def test_faults_stand_the_c_fast_path_aside(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """A batch big enough for the C run still meets the planned fault in order."""
    a, b = pair
    specs = [(a.domid, grant(a, b.domid)[0], HOST) for _ in range(40)]
    with xen.faults.inject("eagain", op="map_grant_ref", after=30):
        ops = map_grants(b, specs)
    st = [op.status for op in ops]
    assert st[:30] == [abi.GNTST_okay] * 30 and st[30] == abi.GNTST_eagain
    assert st[31:] == [abi.GNTST_okay] * 9
    for op in ops:
        if op.status == abi.GNTST_okay:
            assert unmap1(b, op) == abi.GNTST_okay
    assert _pins(xen, a.domid) == {}


def test_size_of_cache_flush_struct() -> None:
    assert ctypes.sizeof(abi.gnttab_cache_flush) == 16
