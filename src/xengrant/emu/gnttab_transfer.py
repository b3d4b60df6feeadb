"""GNTTABOP_transfer: give a page to a domain that offered GTF_accept_transfer.

Mirrors ``gnttab_transfer`` and ``gnttab_prepare_for_transfer`` of Xen 4.17:

- The whole hypercall is ``-EOPNOTSUPP`` when transfers are disabled
  (``opt_grant_transfer``, ``gnttab=transfer=0``; always on Arm).
- A translated (HVM/PVH) caller cannot give pages away: x86 ``steal_page``
  refuses them, and the op answers ``GNTST_general_error``; the page is kept.
- A frame the caller does not own as plain RAM, or one with other
  references (granted and mapped), cannot be stolen: ``GNTST_bad_page``, the
  page is kept.
- Once stolen, any later failure frees the page: the caller loses it
  (``GNTST_bad_domain`` for an unknown receiver, ``GNTST_general_error`` for
  a dying or full receiver, a ref out of range, or an entry that is not
  exactly ``GTF_accept_transfer`` for the caller).
- Success: ``GTF_transfer_committed`` is set by cmpxchg, the frame is written
  (the machine frame for a PV receiver; a translated receiver gets the page at
  the gfn its entry names), a write barrier, then ``GTF_transfer_completed``.

One deviation: if a translated receiver's gfn is already in use, Xen would
leave the page assigned but unmapped; the emulator frees it and answers
``GNTST_general_error`` so no frame is lost.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from .._cext import cmpxchg32, fetch_or16, load32, wmb
from ..abi.grant_table import (
    GNTST_bad_domain,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GTF_accept_transfer,
    GTF_transfer_committed,
    GTF_transfer_completed,
)
from .batch import efault
from .domain import P2M_RAM_RW, DomainState
from .entry import CMPXCHG_TRIES

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: struct gnttab_transfer: mfn, domid, ref, status
TRANSFER_OP = struct.Struct("<QH2xIh6x")
_STATUS_OFF = 16


def prepare_for_transfer(hv: Hypervisor, e: DomainState, giver: int, ref: int) -> str:
    """``gnttab_prepare_for_transfer``: commit ``ref`` of ``e`` to a transfer.

    Returns:
        "" on success, else the reason it failed.
    """
    g = e.gt
    if ref >= g.nr_grant_entries:
        return f"Bad grant reference {ref:#x} for transfer to d{e.domid}"
    off = g.entry_offset(ref)
    scombo = load32(hv.mem, off)
    # mutation: equivalent — the bound: the word is checked whole (flags and domid
    # exactly), so a failed cmpxchg always leads to "Bad flags" on the next try;
    # Xen's "Shared grant entry is unstable" below is unreachable here as there.
    for _ in range(CMPXCHG_TRIES):
        flags, domid = scombo & 0xFFFF, scombo >> 16
        if flags != GTF_accept_transfer or domid != giver:
            return f"Bad flags ({flags:#x}) or dom ({domid}); expected d{giver}"
        new = scombo | GTF_transfer_committed
        prev = cmpxchg32(hv.mem, off, scombo, new)
        if prev == scombo:
            return ""
        scombo = prev
    return "Shared grant entry is unstable"  # mutation: equivalent — unreachable, above


def transfer_one(
    hv: Hypervisor, d: DomainState, frame: int, domid: int, ref: int
) -> tuple[int, str]:
    """One ``struct gnttab_transfer``.

    Returns:
        ``(status, detail)``.
    """
    machine = hv.machine
    ent = d.p2m.get(frame)
    if not d.pv:
        # gnttab_transfer looks the gfn up first (get_gfn_unshare: nothing
        # there is GNTST_bad_page), then x86 steal_page refuses any page of a
        # translated domain (-EOPNOTSUPP -> GNTST_general_error, page kept).
        if ent is None:
            return GNTST_bad_page, f"gnttab_transfer: out-of-range {frame:#x}"
        return GNTST_general_error, "steal_page: a translated domain cannot give pages away"
    if ent is None or ent[1] != P2M_RAM_RW:
        return GNTST_bad_page, f"gnttab_transfer: out-of-range or unowned frame {frame:#x}"
    mfn = ent[0]
    # x86 steal_page: exactly the allocation's reference may be left.  Another
    # domain's mapping holds one, and so does the giver's own mapping of it
    # (a PV guest's page-table entry, get_page_from_l1e: here a view from
    # map_gfns): -EINVAL, which gnttab_transfer answers GNTST_bad_page.
    if machine.owner[mfn] != d.domid or machine.refcount[mfn] != 1:
        return GNTST_bad_page, (
            f"Bad steal mfn {mfn:#x} from d{d.domid}: "
            f"{machine.refcount[mfn] - 1} other reference(s) (mapped)"
        )
    # steal_page + guest_physmap_remove_page: the caller no longer has it.
    del d.p2m[frame]
    d.tot_pages -= 1
    e = hv.domains.get(domid)
    if e is None:
        machine.disown(mfn)
        return GNTST_bad_domain, f"gnttab_transfer: can't find domain {domid}"
    if e.is_dying or e.tot_pages >= e.max_pages:
        machine.disown(mfn)
        return GNTST_general_error, f"gnttab_transfer: d{domid} dying or has no headroom"
    if hv.faults and hv.faults.fire("unstable", "transfer", d.domid):
        # gnttab_prepare_for_transfer lost its cmpxchg tries (injected)
        why = "Shared grant entry is unstable (injected)"
    else:
        why = prepare_for_transfer(hv, e, d.domid, ref)
    if why:
        machine.disown(mfn)
        return GNTST_general_error, why
    g = e.gt
    off = g.entry_offset(ref)
    mem = hv.mem
    if e.pv:
        e.p2m[mfn] = (mfn, P2M_RAM_RW)
        if g.version == 1:
            mem[off + 4 : off + 8] = mfn.to_bytes(4, "little")
        else:
            mem[off + 8 : off + 16] = mfn.to_bytes(8, "little")
    else:
        if g.version == 1:
            gfn = int.from_bytes(mem[off + 4 : off + 8], "little")
        else:
            gfn = int.from_bytes(mem[off + 8 : off + 16], "little")
        if gfn in e.p2m:
            machine.disown(mfn)
            return GNTST_general_error, f"guest_physmap_add_page: d{domid} gfn {gfn:#x} in use"
        e.p2m[gfn] = (mfn, P2M_RAM_RW)
    machine.transfer(mfn, e.domid)
    e.tot_pages += 1
    wmb()
    fetch_or16(mem, off, GTF_transfer_completed)
    return GNTST_okay, ""


def transfer_batch(hv: Hypervisor, d: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_transfer over ``count`` ops; statuses written in place."""
    if not hv.grant_transfer:
        return -errno.EOPNOTSUPP
    unpack, size = TRANSFER_OP.unpack_from, TRANSFER_OP.size
    log = hv.log
    fault = efault(hv, "transfer", d.domid)
    for i in range(count):
        if fault is not None and fault():
            return -errno.EFAULT  # gnttab_transfer: "error reading req"
        frame, domid, ref, _st = unpack(uop, i * size)
        st, why = transfer_one(hv, d, frame, domid, ref)
        if st != GNTST_okay and log is not None:
            log(d.domid, "transfer", st, why)
        struct.pack_into("<h", uop, i * size + _STATUS_OFF, st)
    return 0
