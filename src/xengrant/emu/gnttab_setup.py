"""Table-wide ops: setup_table, query_size, set_version, get_status_frames,
get_version, swap_grant_ref (Xen 4.17 ``gnttab_setup_table`` ...).

``count`` must be 1 for all but swap (``-EINVAL`` otherwise).  A non-control
domain naming another domain gets ``GNTST_permission_denied`` (XSM's default
``XSM_TARGET`` policy); an unknown domain ``GNTST_bad_domain`` (``-ESRCH``
for get_version).  Guest handles (``frame_list``) are guest-physical
addresses in the caller's RAM; a bad one answers ``GNTST_bad_virt_addr``.
Frame numbers reported are machine frames for PV and, for translated
guests, the gfn where the frame was placed with ``XENMEM_add_to_physmap``
(``INVALID_GFN`` if nowhere), as Xen's ``gnttab_shared_gfn`` does.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from ..abi.grant_table import (
    DOMID_SELF,
    GNTTAB_NR_RESERVED_ENTRIES,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_virt_addr,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_permit_access,
    GTF_reading,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
)
from .batch import efault
from .domain import DomainState
from .grant_table import grant_to_status_frames
from .machine import PAGE_SIZE, OutOfMemory

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: INVALID_GFN / INVALID_M2P_ENTRY as a 64-bit xen_pfn_t.
INVALID_GFN = 0xFFFF_FFFF_FFFF_FFFF

SETUP_OP = struct.Struct("<H2xIh6xQ")
QUERY_OP = struct.Struct("<H2xIIh2x")
VERSION_OP = struct.Struct("<I")
STATUS_FRAMES_OP = struct.Struct("<IHhQ")
GET_VERSION_OP = struct.Struct("<H2xI")
SWAP_OP = struct.Struct("<IIh2x")


def _target(hv: Hypervisor, ld: DomainState, dom: int) -> tuple[DomainState | None, int]:
    """The domain an op names (``rcu_lock_domain_by_any_id`` + XSM_TARGET)."""
    d = ld if dom in (DOMID_SELF, ld.domid) else hv.domains.get(dom)
    if d is None:
        return None, GNTST_bad_domain
    if d is not ld and not ld.privileged:
        return None, GNTST_permission_denied
    return d, GNTST_okay


def _frame_numbers(d: DomainState, mfns: list[int], gfns: list[int]) -> list[int]:
    if d.pv:
        return list(mfns)
    return [g if g >= 0 else INVALID_GFN for g in gfns]


def _put_frames(hv: Hypervisor, ld: DomainState, gpaddr: int, frames: list[int]) -> bool:
    data = struct.pack(f"<{len(frames)}Q", *frames)
    return hv.copy_to_guest(ld, gpaddr, data)


def setup_table(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_setup_table: grow to ``nr_frames`` and list the frames."""
    if count != 1:
        return -errno.EINVAL
    dom, nr_frames, _st, frame_list = SETUP_OP.unpack_from(uop, 0)
    d, st = _target(hv, ld, dom)
    why = ""
    if d is not None:
        g = d.gt
        if nr_frames > g.max_grant_frames:
            st = GNTST_general_error
            why = (
                f"Xen only supports up to {g.max_grant_frames} grant-table frames per domain "
                f"(requested {nr_frames})"
            )
        elif not hv.grow_table(d, nr_frames):
            st, why = GNTST_general_error, f"Expand grant table of d{d.domid} to {nr_frames} failed"
        elif nr_frames:
            frames = _frame_numbers(d, g.shared[:nr_frames], g.shared_gfn[:nr_frames])
            if not _put_frames(hv, ld, frame_list, frames):
                st, why = GNTST_bad_virt_addr, f"frame_list {frame_list:#x} is not writable RAM"
    if st != GNTST_okay and hv.log is not None:
        hv.log(ld.domid, "setup_table", st, why)
    struct.pack_into("<h", uop, 8, st)
    return 0


def query_size(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_query_size: current and maximum frames.

    On an error the sizes come back as the caller passed them (Xen copies
    its whole, partly untouched, op back).
    """
    if count != 1:
        return -errno.EINVAL
    dom, nr, mx, _st = QUERY_OP.unpack_from(uop, 0)
    d, st = _target(hv, ld, dom)
    if d is not None:
        nr, mx = d.gt.nr_grant_frames, d.gt.max_grant_frames
    QUERY_OP.pack_into(uop, 0, dom, nr, mx, st)
    return 0


def _read_reserved(hv: Hypervisor, d: DomainState) -> list[tuple[int, int, int]]:
    """(flags incl. status bits, domid, frame) of entries 0..7."""
    return [d.gt.read_entry(hv.mem, ref) for ref in range(GNTTAB_NR_RESERVED_ENTRIES)]


def set_version(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_set_version: switch between v1 and v2 entries.

    Returns:
        0, -EINVAL (not 1 or 2), -ENOSYS (v2 not allowed), -EBUSY (a ref
        past the reserved ones is pinned), -ERANGE (a reserved v2 entry that
        v1 cannot hold), -EBUSY (v2 -> v1 while another domain holds a status
        frame: ``gnttab_unpopulate_status_frames``; Xen 4.17 also crashes a
        translated caller, which is not emulated), -ENOMEM.  ``version``
        always comes back holding the version in force, errors included
        (gnttab_set_version's ``out:``).  ``count`` is ignored, as
        do_grant_table_op does not pass it.
    """
    (want,) = VERSION_OP.unpack_from(uop, 0)
    g = ld.gt
    rc = 0
    if want not in (1, 2):
        rc = -errno.EINVAL
    elif want == 2 and hv.max_grant_version < 2:
        rc = -errno.ENOSYS
    elif want != g.version:
        rc = _switch_version(hv, ld, want)
    VERSION_OP.pack_into(uop, 0, g.version)
    return rc


def _switch_version(hv: Hypervisor, d: DomainState, want: int) -> int:
    g = d.gt
    if g.pinned_beyond_reserved(GNTTAB_NR_RESERVED_ENTRIES):
        return -errno.EBUSY
    reserved = _read_reserved(hv, d)
    if want == 1:
        # gnttab_set_version: a reserved transitive entry, or a permit_access
        # one whose frame needs more than 32 bits, has no v1 form: -ERANGE.
        for flags, _domid, frame in reserved:
            kind = flags & GTF_type_mask
            if kind == GTF_transitive or (kind == GTF_permit_access and frame >> 32):
                return -errno.ERANGE
        # gnttab_unpopulate_status_frames: a status frame someone else still
        # holds (a grant of the status gfn, mapped) cannot be taken back:
        # -EBUSY, table left at v2.  Xen also crashes a translated domain
        # here (domain_crash); that is not emulated.
        if any(hv.machine.refcount[mfn] > 1 for mfn in g.status):
            return -errno.EBUSY
        # Only permit_access entries are carried over; the rest become invalid.
        reserved = [
            r if (r[0] & GTF_type_mask) == GTF_permit_access else (0, 0, 0) for r in reserved
        ]
        for i, gfn in enumerate(g.status_gfn):
            if gfn >= 0:
                d.p2m.pop(gfn, None)
            hv.machine.disown(g.status[i])
        g.status.clear()
        g.status_gfn.clear()
    else:
        need = grant_to_status_frames(g.nr_grant_frames)
        try:
            frames = hv.machine.alloc(d.domid, need)
        except OutOfMemory:
            return -errno.ENOMEM
        hv._add_table_frames(d, [], frames)
    g.version = want
    hv.machine.zero(g.shared)
    mem = hv.mem
    for ref, (flags, domid, frame) in enumerate(reserved):
        off = g.entry_offset(ref)
        if want == 1:
            mem[off : off + 8] = struct.pack("<HHI", flags, domid, frame & 0xFFFFFFFF)
        else:
            inuse = flags & (GTF_reading | GTF_writing)
            mem[off : off + 2] = struct.pack("<H", flags & ~inuse)
            mem[off + 2 : off + 4] = struct.pack("<H", domid)
            mem[off + 8 : off + 16] = struct.pack("<Q", frame)
            soff = g.status_offset(ref)
            mem[soff : soff + 2] = struct.pack("<H", inuse)
    return 0


def get_status_frames(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_get_status_frames: list a v2 table's status frames."""
    if count != 1:
        return -errno.EINVAL
    nr_frames, dom, _st, frame_list = STATUS_FRAMES_OP.unpack_from(uop, 0)
    d, st = _target(hv, ld, dom)
    if d is not None:
        g = d.gt
        if nr_frames > len(g.status):
            st = GNTST_general_error
        elif nr_frames:
            frames = _frame_numbers(d, g.status[:nr_frames], g.status_gfn[:nr_frames])
            if not _put_frames(hv, ld, frame_list, frames):
                st = GNTST_bad_virt_addr
    struct.pack_into("<h", uop, 6, st)
    return 0


def get_version(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_get_version: -ESRCH for an unknown domain, -EPERM for another's.

    ``count`` is ignored (do_grant_table_op does not pass it).
    """
    dom, _v = GET_VERSION_OP.unpack_from(uop, 0)
    d, st = _target(hv, ld, dom)
    if d is None:
        return -errno.ESRCH if st == GNTST_bad_domain else -errno.EPERM
    GET_VERSION_OP.pack_into(uop, 0, dom, d.gt.version)
    return 0


def swap_grant_ref(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_swap_grant_ref: exchange two unpinned entries (XSA-18, XSA-134 checks)."""
    g, mem = ld.gt, hv.mem
    size = SWAP_OP.size
    fault = efault(hv, "swap_grant_ref", ld.domid)
    for i in range(count):
        if fault is not None and fault():
            return -errno.EFAULT  # __copy_from_guest of op i failed (injected)
        a, b, _st = SWAP_OP.unpack_from(uop, i * size)
        nr = g.nr_grant_entries
        if a >= nr or b >= nr:
            st = GNTST_bad_gntref
        elif a == b:
            st = GNTST_okay
        elif (g.active.get(a) and g.active[a].pin) or (g.active.get(b) and g.active[b].pin):
            st = GNTST_eagain
        else:
            es = g.entry_size
            oa, ob = g.entry_offset(a), g.entry_offset(b)
            ea, eb = bytes(mem[oa : oa + es]), bytes(mem[ob : ob + es])
            mem[oa : oa + es], mem[ob : ob + es] = eb, ea
            if g.version == 2:
                sa, sb = g.status_offset(a), g.status_offset(b)
                va, vb = bytes(mem[sa : sa + 2]), bytes(mem[sb : sb + 2])
                mem[sa : sa + 2], mem[sb : sb + 2] = vb, va
            st = GNTST_okay
        struct.pack_into("<h", uop, i * size + 8, st)
    return 0


__all__ = [
    "INVALID_GFN",
    "PAGE_SIZE",
    "get_status_frames",
    "get_version",
    "query_size",
    "set_version",
    "setup_table",
    "swap_grant_ref",
]
