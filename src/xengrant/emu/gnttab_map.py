"""GNTTABOP_map_grant_ref, unmap_grant_ref, unmap_and_replace, and the
release of a dying domain's mappings.

Mirrors ``map_grant_ref``, ``unmap_common``/``unmap_common_complete`` and
``gnttab_release_mappings`` of xen/common/grant_table.c (Xen 4.17).  Each op's
status is the GNTST code Xen answers; the debug reason Xen would print
(``gdprintk``) is kept in ``detail`` for errors that explain.

A host mapping of a translated guest is a p2m entry: ``host_addr >> 12`` is the
mapper's gfn (``create_grant_p2m_mapping``).  The gfn must be a hole; Xen would
drop RAM found there, the emulator refuses with ``GNTST_general_error`` so no
page is lost silently.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .._cext import load32, map_run, unmap_run
from ..abi.grant_table import (
    GNTMAP_application_map,
    GNTMAP_contains_pte,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GTF_reading,
    GTF_writing,
)
from .batch import FASTPATH_DEFAULT, efault, run_batch
from .domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW, DomainState
from .entry import clear_flags, get_paged_frame, set_status
from .grant_table import (
    GNTPIN_WRITE_MASK,
    ActiveGrant,
    GNTPIN_devr_inc,
    GNTPIN_devw_inc,
    GNTPIN_hstr_inc,
    GNTPIN_hstw_inc,
    GNTPIN_incr2oflow_mask,
    GrantTableState,
)
from .maptrack import Mapping

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: struct gnttab_map_grant_ref: host_addr, flags, ref, dom, status, handle, dev_bus_addr
MAP_OP = struct.Struct("<QIIHhIQ")
#: struct gnttab_unmap_grant_ref: host_addr, dev_bus_addr, handle, status
UNMAP_OP = struct.Struct("<QQIh2x")
#: struct gnttab_unmap_and_replace: host_addr, new_addr, handle, status
REPLACE_OP = struct.Struct("<QQIh2x")

_MAP_OUT = struct.Struct("<hIQ")  # status, handle, dev_bus_addr at offset 18
_MAP_OUT_OFF = 18
_UNMAP_STATUS_OFF = 20
_STATUS = struct.Struct("<h")

_MAP_KINDS = GNTMAP_host_map | GNTMAP_device_map

#: Run the common success case of consecutive map ops (first host-only pin of
#: a v1 grant by an HVM caller, handle from the free list) in C
#: (``_cext.map_run``), and of consecutive unmap ops (a host-only mapping of
#: a v1 grant whose frame keeps a reference) in C (``_cext.unmap_run``); any
#: op they do not take runs through :func:`map_grant_ref` /
#: :func:`unmap_grant_ref`.  Tests switch it off;
#: ``XENGRANT_FASTPATH=0`` starts it off (:data:`.batch.FASTPATH_DEFAULT`).
FASTPATH = FASTPATH_DEFAULT


def _undo_pin(mem: memoryview, g: GrantTableState, ref: int, act: ActiveGrant, ro: bool) -> None:
    """``unlock_out_clear``: drop in-use flags no pin needs any more."""
    if not ro and not act.pin & GNTPIN_WRITE_MASK:
        clear_flags(mem, g, ref, GTF_writing)
    if not act.pin:
        clear_flags(mem, g, ref, GTF_reading)
        g.active.pop(ref, None)


def _refused(status: int, why: str) -> tuple[int, int, int, str]:
    """A map op that failed: ``(status, 0, 0, why)``.

    Only ``op->status`` is set on failure: the batch gives the op back the
    handle and dev_bus_addr the caller passed in (``map_grant_ref_batch``).
    """
    # mutation: equivalent — the two zeros are never read (see the docstring)
    return status, 0, 0, why


def map_grant_ref(
    hv: Hypervisor, ld: DomainState, host_addr: int, flags: int, ref: int, dom: int
) -> tuple[int, int, int, str]:
    """One ``GNTTABOP_map_grant_ref`` op.

    Returns:
        ``(status, handle, dev_bus_addr, detail)``.
    """
    readonly = bool(flags & GNTMAP_readonly)
    # map_grant_ref's pin_incr: the counters this map will increment.
    pin_incr = 0
    if flags & GNTMAP_device_map:
        pin_incr += GNTPIN_devr_inc if readonly else GNTPIN_devw_inc
    if flags & GNTMAP_host_map:
        pin_incr += GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    # 1. "Bad flags in grant map op": neither host nor device mapping.
    if not pin_incr:
        return _refused(GNTST_bad_gntref, f"Bad flags in grant map op: {flags:#x}")
    # 2. A translated guest cannot ask for device/application/PTE maps.
    if not ld.pv and flags & (GNTMAP_device_map | GNTMAP_application_map | GNTMAP_contains_pte):
        return _refused(GNTST_general_error, "No device mapping in HVM domain")
    # 3. rcu_lock_domain_by_id(op->dom)
    rd = hv.domains.get(dom)
    if rd is None:
        return _refused(GNTST_bad_domain, f"Could not find domain {dom}")
    # 4. get_maptrack_handle
    maptrack = ld.maptrack
    faults = hv.faults
    if faults and faults.fire("no_maptrack", "map_grant_ref", ld.domid):
        return _refused(GNTST_no_space, "Failed to obtain maptrack handle (injected)")
    placeholder = Mapping(0, dom, ref, -1, -1)
    handle = maptrack.get(placeholder)
    if handle < 0:
        return _refused(
            GNTST_no_space, f"Failed to obtain maptrack handle (limit {maptrack.limit})"
        )
    g = rd.gt
    mem = hv.mem
    # 5. "Bad ref %#x for d%d"
    if ref >= g.nr_grant_entries:
        maptrack.put(handle)
        return _refused(GNTST_bad_gntref, f"Bad ref {ref:#x} for d{dom}")
    act = g.active.get(ref)
    pinned = act is not None and act.pin != 0
    # 6. Pinned for another domain, about to overflow, or a sub-page grant.
    # Only the counters this map increments are checked (Xen 4.17
    # ``act->pin & GNTPIN_incr2oflow_mask(pin_incr)``): the 129th writable
    # host pin is refused, a read-only map next to 128 writable ones is not.
    if (
        act is not None
        and pinned
        and (act.domid != ld.domid or act.pin & GNTPIN_incr2oflow_mask(pin_incr) or act.is_sub_page)
    ):
        maptrack.put(handle)
        return _refused(
            GNTST_general_error,
            f"Bad domain ({act.domid} != {ld.domid}), or risk of counter overflow "
            f"{act.pin:08x}, or subpage {int(act.is_sub_page)}",
        )
    # 7. First pin, or first writable pin: mark the shared entry in use.
    if act is None or not pinned or (not readonly and not act.pin & GNTPIN_WRITE_MASK):
        if faults and faults.fire("unstable", "map_grant_ref", ld.domid):
            # _set_status_v1 lost its 5 cmpxchg tries to a guest rewriting the entry
            rc, why = GNTST_general_error, "Shared grant entry is unstable (injected)"
        else:
            rc, why = set_status(mem, g, ref, pinned, readonly, True, ld.domid)
        if rc != GNTST_okay:
            maptrack.put(handle)
            return _refused(rc, why)
        if act is None or not pinned:
            # 8. First pin: find the frame behind the entry.
            off = g.entry_offset(ref)
            if g.version == 1:
                frame = load32(mem, off + 4)  # the aligned 32-bit frame, no slice
            else:
                frame = int.from_bytes(mem[off + 8 : off + 16], "little")
            rc, mfn = get_paged_frame(rd, frame)
            if rc == GNTST_okay and faults and faults.fire("eagain", "map_grant_ref", ld.domid):
                rc = GNTST_eagain  # get_paged_frame: the frame is paged out (injected)
            if rc != GNTST_okay:
                act = ActiveGrant(ld.domid, -1, 0, 4096, False)
                g.active[ref] = act
                _undo_pin(mem, g, ref, act, readonly)
                maptrack.put(handle)
                return _refused(rc, f"Could not get page {frame:#x} of d{dom}")
            act = ActiveGrant(ld.domid, mfn, 0, 4096, False)
            g.active[ref] = act
    assert act is not None
    mfn = act.mfn
    host_gfn = -1
    if flags & GNTMAP_host_map:
        if flags & GNTMAP_contains_pte:
            # x86 create_grant_pv_mapping: host_addr is the machine address of
            # an L1 entry; it must be 8-byte aligned and its frame an L1 page
            # table of the caller.  The emulator models no guest page tables, so
            # no frame is one: GNTST_general_error, the pin undone (undo_out).
            _undo_pin(mem, g, ref, act, readonly)
            maptrack.put(handle)
            if host_addr & 7:
                return _refused(GNTST_general_error, f"Misaligned PTE address {host_addr:#x}")
            return _refused(
                GNTST_general_error,
                f"host_addr {host_addr:#x}: frame {host_addr >> 12:#x} is not an L1 page "
                f"table of d{ld.domid}",
            )
        host_gfn = host_addr >> 12
        if host_gfn in ld.p2m:
            _undo_pin(mem, g, ref, act, readonly)
            maptrack.put(handle)
            return _refused(
                GNTST_general_error,
                f"host_addr {host_addr:#x}: gfn {host_gfn:#x} of d{ld.domid} is not a hole",
            )
        ld.p2m[host_gfn] = (mfn, P2M_GRANT_MAP_RO if readonly else P2M_GRANT_MAP_RW)
        act.pin += GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
        hv.machine.get(mfn)
    if flags & GNTMAP_device_map:
        act.pin += GNTPIN_devr_inc if readonly else GNTPIN_devw_inc
        hv.machine.get(mfn)
    placeholder.flags = flags & (_MAP_KINDS | GNTMAP_readonly)
    placeholder.mfn = mfn
    placeholder.host_gfn = host_gfn
    return GNTST_okay, handle, mfn << 12, ""


def _complete_unmap(hv: Hypervisor, rd: DomainState, m: Mapping, done: int) -> None:
    """``unmap_common_complete``: drop pins and page refs, clear flags."""
    g = rd.gt
    act = g.active.get(m.ref)
    if act is None:  # pragma: no cover - accounting bug
        raise AssertionError(f"unmap of unpinned ref {m.ref} of d{rd.domid}")
    ro = bool(m.flags & GNTMAP_readonly)
    if done & GNTMAP_device_map:
        act.pin -= GNTPIN_devr_inc if ro else GNTPIN_devw_inc
        hv.machine.put(m.mfn)
    if done & GNTMAP_host_map:
        act.pin -= GNTPIN_hstr_inc if ro else GNTPIN_hstw_inc
        hv.machine.put(m.mfn)
    _undo_pin(hv.mem, g, m.ref, act, ro)
    if rd.is_dying:
        hv.maybe_complete_destroy(rd)


def _replace_pv(ld: DomainState, gfn: int, new_gfn: int) -> str:
    """``GNTTABOP_unmap_and_replace`` with ``new_addr`` for a PV mapper.

    x86 ``replace_grant_pv_mapping``: the entry at ``new_gfn`` is zapped
    (``steal_linear_address``) and moved to ``gfn``, replacing the grant's; an
    empty one leaves ``gfn`` empty.  A grant mapping moved this way keeps its
    handle (its maptrack entry now names ``gfn``).  Only the linear mappings
    the emulator models can move: a grant mapping or nothing.  A PV guest's
    RAM and table frames are its identity physmap, not a page-table entry
    here, so naming one is refused (``GNTST_general_error``, nothing moved; Xen
    would move the PTE).  Xen checks the old mapping after stealing and, if
    it fails, drops the stolen entry; the emulator checks first and moves
    nothing.

    Returns:
        "" when done, else why not.
    """
    stolen = ld.p2m.get(new_gfn)
    if new_gfn == gfn:
        return f"new_addr names the grant's own gfn {gfn:#x}"
    if stolen is not None and stolen[1] not in (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO):
        return f"steal_linear_address: gfn {new_gfn:#x} of d{ld.domid} is not a linear mapping"
    if stolen is None:
        del ld.p2m[gfn]
        return ""
    ld.p2m[gfn] = stolen
    del ld.p2m[new_gfn]
    for _handle, m in ld.maptrack.live():
        if m.host_gfn == new_gfn:
            m.host_gfn = gfn
    return ""


def unmap_grant_ref(
    hv: Hypervisor, ld: DomainState, host_addr: int, dev_bus_addr: int, handle: int, new_addr: int
) -> tuple[int, str]:
    """One ``GNTTABOP_unmap_grant_ref`` (or ``unmap_and_replace``) op.

    Returns:
        ``(status, detail)``.
    """
    maptrack = ld.maptrack
    # unmap_common: "handle >= lgt->maptrack_limit", the handles allocated so far.
    if handle >= len(maptrack.entries):
        return GNTST_bad_handle, f"Bad d{ld.domid} handle {handle:#x}"
    m = maptrack.lookup(handle)
    if m is None or not m.flags:
        return GNTST_bad_handle, f"Zero flags for d{ld.domid} handle {handle:#x}"
    rd = hv.domains.get(m.domid)
    if rd is None:  # pragma: no cover - a zombie outlives every mapping of it
        return GNTST_bad_domain, f"Granting domain d{m.domid} could not be found"
    act = rd.gt.active.get(m.ref)
    mfn = act.mfn if act is not None else -1
    # Checked only for device mappings (Xen 4.17, after Beulich's Aug 2021 fix).
    if dev_bus_addr and m.flags & GNTMAP_device_map and dev_bus_addr != mfn << 12:
        return GNTST_bad_dev_addr, (
            f"Bus address doesn't match gntref ({dev_bus_addr:#x} != {mfn << 12:#x})"
        )
    done = 0
    if host_addr and m.flags & GNTMAP_host_map:
        gfn = host_addr >> 12
        ent = ld.p2m.get(gfn)
        # replace_grant_p2m_mapping: HVM cannot replace; the p2m must hold this grant.
        if new_addr != 0 and not ld.pv:
            return GNTST_general_error, "replace_grant_host_mapping: new_addr unsupported (HVM)"
        if ent is None or ent[1] not in (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO) or ent[0] != mfn:
            return GNTST_general_error, (
                f"replace_grant_p2m_mapping: old mapping invalid at gfn {gfn:#x}"
            )
        if new_addr != 0:
            # x86 replace_grant_pv_mapping: steal the entry at new_addr
            # (steal_linear_address) and put it where the grant was.
            why = _replace_pv(ld, gfn, new_addr >> 12)
            if why:
                return GNTST_general_error, why
        else:
            del ld.p2m[gfn]
        m.flags &= ~GNTMAP_host_map
        m.host_gfn = -1  # the gfn is no longer this mapping's
        done |= GNTMAP_host_map
    if dev_bus_addr and m.flags & GNTMAP_device_map:
        m.flags &= ~GNTMAP_device_map
        done |= GNTMAP_device_map
    if done:
        ro = m.flags & GNTMAP_readonly
        saved = m.flags
        m.flags = (m.flags & _MAP_KINDS) | ro
        _complete_unmap(hv, rd, m, done)
        m.flags = saved
    if not m.flags & _MAP_KINDS:
        maptrack.put(handle)
    return GNTST_okay, ""


def release_mappings(
    hv: Hypervisor, d: DomainState, top: int | None = None, budget: int | None = None
) -> int:
    """``gnttab_release_mappings``: undo the mappings a dying domain holds.

    As Xen's since "gnttab: add preemption check to gnttab_release_mappings()"
    (XSA-380 era), the maptrack table is walked down from the top handle, and
    the walk can stop after ``budget`` handles to be continued later (Xen
    returns ``-ERESTART`` on ``hypercall_preempt_check``).

    Args:
        hv: the hypervisor.
        d: the dying domain.
        top: handles below this one are left to walk (None: all of them).
        budget: handles to look at in this call (None: no limit).

    Returns:
        Handles still to walk (0: done).
    """
    entries = d.maptrack.entries
    handle = len(entries) if top is None else min(top, len(entries))
    stop = 0 if budget is None else max(handle - budget, 0)
    while handle > stop:
        handle -= 1
        m = entries[handle]
        if m is None:
            continue
        rd = hv.domains.get(m.domid)
        done = m.flags & _MAP_KINDS
        if m.host_gfn >= 0:
            d.p2m.pop(m.host_gfn, None)
        maptrack_ro = m.flags & GNTMAP_readonly
        m.flags = done | maptrack_ro
        if rd is not None and done:
            _complete_unmap(hv, rd, m, done)
        d.maptrack.put(handle)
    return handle


def map_grant_ref_batch(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_map_grant_ref over ``count`` ops; statuses written in place."""
    size = MAP_OP.size
    log = hv.log

    def one(i: int) -> None:
        host_addr, flags, ref, dom, _st, handle_in, dba_in = MAP_OP.unpack_from(uop, i * size)
        st, handle, dba, why = map_grant_ref(hv, ld, host_addr, flags, ref, dom)
        if st != GNTST_okay:
            # map_grant_ref sets only op->status on failure and
            # gnttab_map_grant_ref copies the whole op back: handle and
            # dev_bus_addr keep what the caller passed in.
            handle, dba = handle_in, dba_in
            if log is not None:
                log(ld.domid, "map_grant_ref", st, why)
        _MAP_OUT.pack_into(uop, i * size + _MAP_OUT_OFF, st, handle, dba)

    mem, domains, refcount = hv.mem, hv.domains, hv.machine.refcount
    return run_batch(
        count,
        one,
        (lambda i: map_run(mem, uop, i, count, ld, domains, refcount)) if FASTPATH else None,
        efault(hv, "map_grant_ref", ld.domid),
    )


def _unmap_batch(
    hv: Hypervisor, ld: DomainState, uop: memoryview, count: int, replace: bool
) -> int:
    """Both unmap ops: their structs share a layout (host_addr, dev_bus_addr or new_addr,
    handle, status), and unmap_common serves both in Xen."""
    size = UNMAP_OP.size
    log = hv.log
    name = "unmap_and_replace" if replace else "unmap_grant_ref"

    def one(i: int) -> None:
        host_addr, second, handle, _st = UNMAP_OP.unpack_from(uop, i * size)
        if replace:
            st, why = unmap_grant_ref(hv, ld, host_addr, 0, handle, second)
        else:
            st, why = unmap_grant_ref(hv, ld, host_addr, second, handle, 0)
        if st != GNTST_okay and log is not None:
            log(ld.domid, name, st, why)
        _STATUS.pack_into(uop, i * size + _UNMAP_STATUS_OFF, st)

    mem, domains, refcount = hv.mem, hv.domains, hv.machine.refcount
    return run_batch(
        count,
        one,
        (lambda i: unmap_run(mem, uop, i, count, ld, domains, refcount))
        # mutation: equivalent — with the fast paths off (as scripts/mutation.sh runs)
        # dropping `not` leaves it False, and `or` runs unmap_run, which
        # test_fastpath_map holds to the Python rule.
        if FASTPATH and not replace
        else None,
        efault(hv, name, ld.domid),
    )


def unmap_grant_ref_batch(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_unmap_grant_ref over ``count`` ops; statuses written in place."""
    return _unmap_batch(hv, ld, uop, count, replace=False)


def unmap_and_replace_batch(hv: Hypervisor, ld: DomainState, uop: memoryview, count: int) -> int:
    """GNTTABOP_unmap_and_replace: on a translated guest new_addr must be 0."""
    return _unmap_batch(hv, ld, uop, count, replace=True)
