"""Pinning a shared grant entry: the hypervisor's half of the update protocol.

The guest writes its entries in place; Xen marks them in use with an atomic
cmpxchg on the 32-bit {flags, domid} word (v1) or by setting the separate
status word and re-checking the header (v2).  A guest ending access does the
mirror cmpxchg, so exactly one side wins a race.  Functions here mirror
grant_table.c: ``_set_status_v1``, ``_set_status_v2``, ``gnttab_clear_flags``,
``get_paged_frame``.
"""

from __future__ import annotations

from .._cext import cmpxchg32, fetch_and16, fetch_or16, load32, mb
from ..abi.grant_table import (
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
)
from .domain import P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS, P2M_RAM_RW, DomainState
from .grant_table import GrantTableState

#: _set_status_v1: "We bound the number of times we retry CMPXCHG on memory
#: locations that we share with a guest OS" -- 5 tries, then general_error.
CMPXCHG_TRIES = 5


def set_status(
    mem: memoryview,
    g: GrantTableState,
    ref: int,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldomid: int,
) -> tuple[int, str]:
    """Mark entry ``ref`` in use for ``ldomid`` (``_set_status``).

    Args:
        mem: machine memory.
        g: the granter's table.
        ref: a ref below ``g.nr_grant_entries``.
        pinned: the active entry already has pins (type/domid not re-checked).
        readonly: set only GTF_reading, else GTF_reading|GTF_writing.
        mapflag: a map (sub-page and transitive grants refused) rather than a
            copy.  Under v2 a copy also accepts a GTF_transitive entry
            (``_set_status_v2``'s ``mapflag ||`` clause, XSA-226).
        ldomid: the domain pinning the grant.

    Returns:
        ``(GNTST_okay, "")`` or ``(GNTST_general_error, reason)``.
    """
    # mutation: equivalent — 0->1: bit 0 is in GTF_type_mask already
    mask = GTF_type_mask | (GTF_sub_page if mapflag else 0)
    off = g.entry_offset(ref)
    if g.version == 1:
        scombo = load32(mem, off)
        for _ in range(CMPXCHG_TRIES):
            flags, domid = scombo & 0xFFFF, scombo >> 16
            if not pinned and ((flags & mask) != GTF_permit_access or domid != ldomid):
                return GNTST_general_error, (
                    f"Bad flags ({flags:#x}) or dom ({domid}); expected d{ldomid}"
                )
            new = scombo | GTF_reading
            if not readonly:
                new |= GTF_writing
                if flags & GTF_readonly:
                    return GNTST_general_error, "Attempt to write-pin a r/o grant entry"
            prev = cmpxchg32(mem, off, scombo, new)
            if prev == scombo:
                return GNTST_okay, ""
            scombo = prev
        return GNTST_general_error, "Shared grant entry is unstable"

    # _set_status_v2: status word first, barrier, then re-check the header.
    soff = g.status_offset(ref)
    scombo = load32(mem, off)
    flags, domid = scombo & 0xFFFF, scombo >> 16
    if not pinned and (not _v2_type_ok(flags & mask, mapflag) or domid != ldomid):
        return GNTST_general_error, f"Bad flags ({flags:#x}) or dom ({domid}); expected d{ldomid}"
    if readonly:
        fetch_or16(mem, soff, GTF_reading)
    else:
        if flags & GTF_readonly:
            return GNTST_general_error, "Attempt to write-pin a r/o grant entry"
        fetch_or16(mem, soff, GTF_reading | GTF_writing)
    mb()
    scombo = load32(mem, off)
    flags, domid = scombo & 0xFFFF, scombo >> 16
    if not pinned:
        if (
            not _v2_type_ok(flags & mask, mapflag)
            or domid != ldomid
            or (not readonly and flags & GTF_readonly)
        ):
            fetch_and16(mem, soff, 0xFFFF & ~(GTF_reading | GTF_writing))
            return GNTST_general_error, (
                f"Unstable flags ({flags:#x}) or dom ({domid}); expected d{ldomid}"
            )
    elif flags & GTF_readonly:
        fetch_and16(mem, soff, 0xFFFF & ~GTF_writing)
        return GNTST_general_error, "Unstable grant readonly flag"
    return GNTST_okay, ""


def _v2_type_ok(kind: int, mapflag: bool) -> bool:
    """``_set_status_v2``'s type test: permit_access, or transitive for a copy."""
    return kind == GTF_permit_access or (not mapflag and kind == GTF_transitive)


def clear_flags(mem: memoryview, g: GrantTableState, ref: int, bits: int) -> None:
    """``gnttab_clear_flags``: atomically clear GTF_reading/GTF_writing bits."""
    if g.version == 1:
        fetch_and16(mem, g.entry_offset(ref), 0xFFFF & ~bits)
    else:
        fetch_and16(mem, g.status_offset(ref), 0xFFFF & ~bits)


def get_paged_frame(rd: DomainState, gfn: int) -> tuple[int, int]:
    """``get_paged_frame``: the machine frame behind the granter's gfn.

    Only frames the granter owns can be granted: RAM or its own grant-table
    frames.  A foreign (grant-mapped) gfn or a hole gives ``GNTST_bad_page``.

    Returns:
        ``(GNTST_okay, mfn)`` or ``(GNTST_bad_page, -1)``.
    """
    ent = rd.p2m.get(gfn)
    if ent is None or ent[1] not in (P2M_RAM_RW, P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS):
        return GNTST_bad_page, -1  # mutation: equivalent — no caller reads a failure's mfn
    return GNTST_okay, ent[0]
