"""GNTTABOP_copy: copy bytes between frames named by grant ref or by gfn.

Mirrors ``gnttab_copy``, ``gnttab_copy_one``, ``gnttab_copy_lock_domain``,
``gnttab_copy_claim_buf``, ``gnttab_copy_buf`` and
``acquire_grant_for_copy``/``release_grant_for_copy`` of Xen 4.17:

1. both sides' domains, source then destination: an unknown domain is
   ``GNTST_bad_domain``;
2. source, then destination: a gfn side must say DOMID_SELF ("Only
   DOMID_SELF may reference via frame", ``GNTST_permission_denied``, even for
   one's own numeric id), then the side is claimed: bad ref ``GNTST_bad_gntref``; wrong type,
   domid or a read-only grant as destination ``GNTST_general_error``; a bad
   gfn ``GNTST_bad_page``;
3. ``offset + len > 4096`` on either side: ``GNTST_bad_copy_arg``;
4. outside a sub-page grant's window: ``GNTST_general_error``.

Transitive grants (v2 ``GTF_transitive``, ``opt_transitive_grants`` on): the
entry is pinned for the copier, then the grant ``trans_gref`` of
``trans_domid`` is pinned for the intermediate domain, one level deep
(XSA-226); its frame and sub-page window are the ones copied.  A
self-referential entry, an unknown ``trans_domid`` or a transitive inner grant
is ``GNTST_general_error``; the inner grant's own failure status is returned
as is (``GNTST_bad_gntref``, ``GNTST_general_error`` ...).  Mapping one stays
``GNTST_general_error`` (``_set_status_v2`` with mapflag).  The C fast path
handles v1 tables only, so transitive ops always run here.  One deviation:
where Xen answers ``ERESTART`` (the pinned transitive entry changed between
pins), the op gets ``GNTST_general_error``.

Xen 4.17 has no zero-length shortcut: a ``len == 0`` op is validated like any
other (master's a4a790f432, after XSA-448, returns okay for it untouched).
Each op pins its grants only for the copy, as Xen's do.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Optional

from .._cext import copy_run
from ..abi.grant_table import (
    DOMID_SELF,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_reading,
    GTF_sub_page,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
)
from .batch import FASTPATH_DEFAULT, efault, run_batch
from .domain import DomainState
from .entry import clear_flags, get_paged_frame, set_status
from .gnttab_map import _undo_pin
from .grant_table import (
    GNTPIN_WRITE_MASK,
    ActiveGrant,
    GNTPIN_hstr_inc,
    GNTPIN_hstw_inc,
    GNTPIN_incr2oflow_mask,
    GrantTableState,
)
from .machine import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: struct gnttab_copy: source {u, domid, offset}, dest {...}, len, flags, status
COPY_OP = struct.Struct("<QHH4xQHH4xHHh2x")
_STATUS_OFF = 36
_STATUS = struct.Struct("<h")

#: Run the common success case of consecutive ops in C (``_cext.copy_run``);
#: any op it does not take (every error, v2 tables, pinned or dying grants,
#: frames not in the p2m) runs through :func:`copy_one`.  Tests switch it off;
#: ``XENGRANT_FASTPATH=0`` starts it off (:data:`.batch.FASTPATH_DEFAULT`).
FASTPATH = FASTPATH_DEFAULT


#: The grant a transitive entry's copy pin holds underneath: ``(td, trans_gref)``
#: (``act->trans_domain``, ``act->trans_gref``); None for an ordinary grant.
Trans = Optional[tuple[DomainState, int]]


def _clear_unneeded(mem: memoryview, g: GrantTableState, ref: int, pin: int, wbit: bool) -> None:
    """``unlock_out_clear`` / ``fixup_status_for_copy_pin``: drop flags no pin needs."""
    # mutation: equivalent — and->or differs only when ``pin`` holds a write pin; the
    # callers pass a transitive entry's pin from before this op's pin, and such an entry
    # is pinned only by copies, one op at a time, its source (a read pin) first.
    if wbit and not pin & GNTPIN_WRITE_MASK:
        clear_flags(mem, g, ref, GTF_writing)
    if not pin:
        clear_flags(mem, g, ref, GTF_reading)


def _refused(status: int, why: str) -> tuple[int, int, int, int, str, Trans]:
    """:func:`acquire_grant_for_copy` failed: ``(status, -1, 0, 0, why, None)``."""
    # mutation: equivalent — a caller reads only the status and reason of a failure
    return status, -1, 0, 0, why, None


def acquire_grant_for_copy(
    hv: Hypervisor,
    rd: DomainState,
    ref: int,
    ldomid: int,
    readonly: bool,
    allow_transitive: bool = True,
) -> tuple[int, int, int, int, str, Trans]:
    """Pin ``ref`` of ``rd`` for a copy by ``ldomid`` (``acquire_grant_for_copy``).

    A v2 ``GTF_transitive`` entry (copy only) pins itself and then, one level
    deep (``allow_transitive`` is False for the inner call, XSA-226), the grant
    ``trans_gref`` of ``trans_domid``, which must be granted to ``rd``; the
    inner grant's window (sub-page limits included) is the one used.  The
    transitive entry's active entry is marked sub-page, so it cannot be
    mapped while a copy holds it.

    Args:
        hv: the hypervisor.
        rd: the granting domain.
        ref: its grant ref.
        ldomid: the domain copying (the grant must be for it).
        readonly: a copy source (else a destination, write-pinned).
        allow_transitive: ``opt_transitive_grants`` for the outer call; False
            for the inner one, so a transitive grant of a transitive grant
            gives ``GNTST_general_error``.

    Returns:
        ``(status, mfn, start, length, detail, trans)``: ``trans`` is what
        :func:`release_grant_for_copy` must drop underneath (None unless
        transitive).  Statuses: ``GNTST_bad_gntref`` (ref out of range, or
        the inner one), ``GNTST_general_error`` (type, domid, read-only,
        self-referential or unknown ``trans_domid``, nested transitive),
        ``GNTST_bad_page``, ``GNTST_bad_domain`` (pinned grant of a dying
        domain).
    """
    g = rd.gt
    if ref >= g.nr_grant_entries:
        return _refused(GNTST_bad_gntref, f"Bad grant reference {ref:#x}")
    act = g.active.get(ref)
    pinned = act is not None and act.pin != 0
    # acquire_grant_for_copy: only the counter this copy increments (hstr
    # for a source, hstw for a destination) may not be full (Xen 4.17,
    # GNTPIN_incr2oflow_mask).
    pin_incr = GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    if (
        act is not None
        and pinned
        and (act.domid != ldomid or act.pin & GNTPIN_incr2oflow_mask(pin_incr))
    ):
        return _refused(
            GNTST_general_error,
            f"Bad domain ({act.domid} != {ldomid}), or risk of counter overflow {act.pin:08x}",
        )
    mem = hv.mem
    if g.version == 2:
        off = g.entry_offset(ref)
        if mem[off] & GTF_type_mask == GTF_transitive:
            return _acquire_transitive(hv, rd, ref, ldomid, readonly, allow_transitive)
    if act is not None and pinned and rd.is_dying:
        return _refused(GNTST_bad_domain, f"d{rd.domid} is dying")
    faults = hv.faults
    if act is None or not pinned or (not readonly and not act.pin & GNTPIN_WRITE_MASK):
        if faults and faults.fire("unstable", "copy", ldomid):
            # _set_status_v1 lost its 5 cmpxchg tries to a guest rewriting the entry
            return _refused(GNTST_general_error, "Shared grant entry is unstable (injected)")
        rc, why = set_status(mem, g, ref, pinned, readonly, False, ldomid)
        if rc != GNTST_okay:
            return _refused(rc, why)
        if act is None or not pinned:
            off = g.entry_offset(ref)
            # mutation: equivalent — `sub` True would only refuse a map while this
            # copy's pin lasts, and nothing maps in the middle of a copy op.
            start, length, sub = 0, PAGE_SIZE, False
            if g.version == 1:
                frame = int.from_bytes(mem[off + 4 : off + 8], "little")
            else:
                flags = int.from_bytes(mem[off : off + 2], "little")
                frame = int.from_bytes(mem[off + 8 : off + 16], "little")
                if flags & GTF_sub_page:
                    start = int.from_bytes(mem[off + 4 : off + 6], "little")
                    length = int.from_bytes(mem[off + 6 : off + 8], "little")
                    sub = True
            rc, mfn = get_paged_frame(rd, frame)
            if rc == GNTST_okay and faults and faults.fire("eagain", "copy", ldomid):
                rc, mfn = GNTST_eagain, -1  # get_paged_frame: paged out (injected)
            act = ActiveGrant(ldomid, mfn, start, length, sub)
            g.active[ref] = act
            if rc != GNTST_okay:
                _undo_pin(mem, g, ref, act, readonly)
                return _refused(rc, f"source frame {frame:#x} invalid")
    assert act is not None
    act.pin += GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    return GNTST_okay, act.mfn, act.start, act.length, "", None


def _acquire_transitive(
    hv: Hypervisor,
    rd: DomainState,
    ref: int,
    ldomid: int,
    readonly: bool,
    allow_transitive: bool,
) -> tuple[int, int, int, int, str, Trans]:
    """acquire_grant_for_copy's ``GTF_transitive`` branch (Xen 4.17)."""
    g = rd.gt
    mem = hv.mem
    act = g.active.get(ref)
    old_pin = act.pin if act is not None else 0
    # mutation: equivalent — and->or in the second clause also re-marks a read pin of
    # an already pinned entry; that entry was pinned earlier in the same op, by its
    # source side (copies pin a transitive entry one op at a time), so a read pin
    # never comes second.
    if not old_pin or (not readonly and not old_pin & GNTPIN_WRITE_MASK):
        rc, why = set_status(mem, g, ref, old_pin != 0, readonly, False, ldomid)
        if rc != GNTST_okay:
            return _refused(rc, why)
    why = ""
    off = g.entry_offset(ref)
    # trans_domid and gref are read once (Xen's barrier()), then used.
    trans_domid = int.from_bytes(mem[off + 4 : off + 6], "little")
    trans_gref = int.from_bytes(mem[off + 8 : off + 12], "little")
    td = hv.lookup(trans_domid)
    if not allow_transitive:
        why = "transitive grant when transitivity not allowed"
    elif trans_domid == rd.domid:
        why = "transitive grants cannot be self-referential"
    elif td is None:
        why = f"transitive grant referenced bad domain {trans_domid}"
    if why or td is None:  # unlock_out_clear
        _clear_unneeded(mem, g, ref, old_pin, not readonly)
        return _refused(GNTST_general_error, why)
    rc, mfn, start, length, why, _ = acquire_grant_for_copy(
        hv, td, trans_gref, rd.domid, readonly, False
    )
    if rc != GNTST_okay:  # fixup_status_for_copy_pin
        _clear_unneeded(mem, g, ref, old_pin, True)
        return _refused(rc, why)
    if act is None or not old_pin:
        # Always sub-page: "that blocks mappings of transitive grants".
        act = ActiveGrant(ldomid, mfn, start, length, True)
        g.active[ref] = act
    # mutation: equivalent — the branch below is unreachable here: an entry pinned
    # already was pinned by this op's source side, through the same underlying grant.
    elif (act.mfn, act.start, act.length, act.is_sub_page) != (mfn, start, length, True):
        # Xen answers ERESTART (a hypercall continuation) when the pinned entry
        # changed under it; a serialised emulator would retry forever.
        release_grant_for_copy(hv, td, trans_gref, readonly)  # mutation: equivalent — above
        _clear_unneeded(mem, g, ref, old_pin, True)  # mutation: equivalent — above
        # mutation: equivalent — unreachable, as above
        return _refused(GNTST_general_error, "transitive grant changed while pinned")
    act.pin += GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    return GNTST_okay, act.mfn, act.start, act.length, "", (td, trans_gref)


def release_grant_for_copy(
    hv: Hypervisor, rd: DomainState, ref: int, readonly: bool, trans: Trans = None
) -> None:
    """Drop the copy's pin and any in-use flag no pin needs any more.

    Args:
        trans: the underlying grant of a transitive entry, released after it
            (``release_grant_for_copy``'s bounded recursion).
    """
    g = rd.gt
    act = g.active[ref]
    act.pin -= GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    _undo_pin(hv.mem, g, ref, act, readonly)
    if rd.is_dying:
        hv.maybe_complete_destroy(rd)
    if trans is not None:
        release_grant_for_copy(hv, trans[0], trans[1], readonly)


def copy_one(hv: Hypervisor, ld: DomainState, fields: tuple[int, ...]) -> tuple[int, str]:
    """One ``struct gnttab_copy``.

    Returns:
        ``(status, detail)``.
    """
    s_u, s_dom, s_off, d_u, d_dom, d_off, length, flags, _st = fields
    sides = (
        (s_u, s_dom, s_off, bool(flags & GNTCOPY_source_gref), True),
        (d_u, d_dom, d_off, bool(flags & GNTCOPY_dest_gref), False),
    )
    doms: list[DomainState] = []
    for _u, domid, _off, _is_gref, _ro in sides:
        # Both domains first, source then destination: bad_domain.  Then each
        # side in turn, source first: a gfn side not naming DOMID_SELF is
        # permission_denied, else it is claimed.  This is the order the real
        # Xen 4.17 answers in (the generated privcmd oracle, tests_xen/: a bad
        # source claim wins over the destination's permission_denied, an
        # unknown destination domain over the source's), not the order of
        # gnttab_copy_lock_domain as upstream's 4.17.7 source reads.
        dom = ld if domid == DOMID_SELF else hv.domains.get(domid)
        if dom is None:
            return GNTST_bad_domain, f"Could not find domain {domid}"
        doms.append(dom)
    claimed: list[tuple[DomainState, int, bool, Trans]] = []
    bufs: list[tuple[int, int, int]] = []
    try:
        for (u, domid, _off, is_gref, ro), dom in zip(sides, doms):
            if domid != DOMID_SELF and not is_gref:
                return GNTST_permission_denied, "Only DOMID_SELF may reference via frame"
            if is_gref:
                ref = u & 0xFFFFFFFF
                rc, mfn, start, blen, why, trans = acquire_grant_for_copy(
                    hv, dom, ref, ld.domid, ro
                )
                if rc != GNTST_okay:
                    return rc, why
                claimed.append((dom, ref, ro, trans))
            else:
                rc, mfn = get_paged_frame(dom, u)
                if rc == GNTST_okay and hv.faults and hv.faults.fire("eagain", "copy", ld.domid):
                    rc = GNTST_eagain  # get_paged_frame: paged out (injected)
                if rc != GNTST_okay:
                    return rc, f"{'source' if ro else 'dest'} frame {u:#x} invalid"
                start, blen = 0, PAGE_SIZE
            bufs.append((mfn, start, blen))
        if s_off + length > PAGE_SIZE or d_off + length > PAGE_SIZE:
            return GNTST_bad_copy_arg, "copy beyond page area"
        (s_mfn, s_start, s_len), (d_mfn, d_start, d_len) = bufs
        if s_off < s_start or s_off + length > s_start + s_len:
            return GNTST_general_error, (
                f"copy source out of bounds: {s_off} < {s_start} || "
                f"{s_off + length} > {s_start + s_len}"
            )
        if d_off < d_start or d_off + length > d_start + d_len:
            return GNTST_general_error, (
                f"copy dest out of bounds: {d_off} < {d_start} || "
                f"{d_off + length} > {d_start + d_len}"
            )
        if length:
            mem = hv.mem
            src = (s_mfn << PAGE_SHIFT) + s_off
            dst = (d_mfn << PAGE_SHIFT) + d_off
            mem[dst : dst + length] = mem[src : src + length]
        return GNTST_okay, ""
    finally:
        for dom, ref, ro, trans in reversed(claimed):
            release_grant_for_copy(hv, dom, ref, ro, trans)


def copy_batch(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_copy over ``count`` ops; each op's status written in place."""
    size = COPY_OP.size
    log = hv.log

    def one(i: int) -> None:
        st, why = copy_one(hv, ld, COPY_OP.unpack_from(uop, i * size))
        if st != GNTST_okay and log is not None:
            log(ld.domid, "copy", st, why)
        _STATUS.pack_into(uop, i * size + _STATUS_OFF, st)

    mem, domains = hv.mem, hv.domains
    return run_batch(
        count,
        one,
        (lambda i: copy_run(mem, uop, i, count, ld, domains)) if FASTPATH else None,
        efault(hv, "copy", ld.domid),
    )
