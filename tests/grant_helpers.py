"""Helpers the grant-table tests share.

- **Raw GNTTABOPs**: ops are the ctypes structs of :mod:`xengrant.abi`, issued
  with ``Domain.grant_table_op(cmd, ops)``; each helper asserts the hypercall
  itself returned 0 and hands back the ops (or their statuses) for the test
  to check.
- **Frames**: RAM populated without a ``Pages`` object, read and written
  through the guest's own view of them.
- **The hypervisor's side**: entries as they are in machine memory, pins and
  maptrack handles in use, as the emulator keeps them.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import xengrant
from xengrant import abi
from xengrant.errors import Busy, HypercallError

PAGE = 4096
HOST = abi.GNTMAP_host_map

Xen = xengrant.EmbeddedXen
Dom = xengrant.Domain
MakeDomain = Callable[..., Dom]

_gfns = itertools.count(0x40000)  # RAM gfns for raw populate (below the table gfns)


# ------------------------------------------------------------------ frames
def fresh_gfn() -> int:
    """A gfn no helper has populated yet."""
    return next(_gfns)


def ram(dom: Dom, n: int = 1) -> list[int]:
    """Populate ``n`` pages of RAM without a Pages object (PV: returns mfns)."""
    want = [0] * n if dom.pv else [fresh_gfn() for _ in range(n)]
    got = dom.hypercalls.populate_physmap(want)
    assert len(got) == n
    return got


def free_ram(dom: Dom, gfns: Sequence[int]) -> None:
    assert dom.hypercalls.decrease_reservation(list(gfns)) == len(gfns)


def write(dom: Dom, gfn: int, data: bytes, off: int = 0) -> None:
    view = dom.view([gfn], True)
    mv = memoryview(view)
    mv[off : off + len(data)] = data
    mv.release()
    view.close()


def read(dom: Dom, gfn: int, n: int = PAGE, off: int = 0) -> bytes:
    view = dom.view([gfn], False)
    mv = memoryview(view)
    out = bytes(mv[off : off + n])
    mv.release()
    view.close()
    return out


# --------------------------------------------------- the hypervisor's side
def raw_entry(xen: Xen, domid: int, ref: int) -> bytes:
    """The shared entry as it is in machine memory (8 bytes v1, 16 bytes v2)."""
    g = xen.domain_state(domid).gt
    off = g.entry_offset(ref)
    return bytes(xen.mem[off : off + g.entry_size])


def flags_of(xen: Xen, domid: int, ref: int) -> int:
    """Entry flags of ``ref`` (v2: the header flags) from machine memory."""
    return int.from_bytes(raw_entry(xen, domid, ref)[:2], "little")


def status_of(xen: Xen, domid: int, ref: int) -> int:
    """The v2 status word of ``ref``."""
    g = xen.domain_state(domid).gt
    off = g.status_offset(ref)
    return int.from_bytes(xen.mem[off : off + 2], "little")


def active(xen: Xen, domid: int) -> int:
    """How many of the domain's entries are pinned (active)."""
    return len(xen.domain_state(domid).gt.active)


def in_use(xen: Xen, domid: int) -> int:
    """How many maptrack handles the domain has in use."""
    return int(xen.domain_state(domid).maptrack.in_use)


def flags(dom: Dom, ref: int) -> int:
    """Entry flags of ``ref`` as the guest reads its own table."""
    return dom.grant_table.entry(ref).flags


def granted_page(granter: Dom, to: int, writable: bool = True) -> tuple[Any, int]:
    """A new page of ``granter``'s granted to ``to`` under a new ref: ``(pages, ref)``."""
    page = granter.alloc_pages(1)
    ref = granter.grant_table.get()
    granter.grant_table.grant_access(ref, to, page.gfns[0], writable)
    return page, ref


# ------------------------------------------------------------ raw GNTTABOPs
def errno_of(fn: Callable[[], object]) -> int:
    """The errno of the HypercallError ``fn()`` must raise."""
    with pytest.raises(HypercallError) as ei:
        fn()
    return ei.value.errno


def grant(
    granter: Dom, to: int, *, writable: bool = True, data: bytes = b"", gfn: int | None = None
) -> tuple[int, int]:
    """A page of RAM (or ``gfn``) granted to ``to``: ``(ref, gfn)``."""
    if gfn is None:
        gfn = ram(granter)[0]
        if data:
            write(granter, gfn, data)
    ref = granter.grant_table.get()
    granter.grant_table.grant_access(ref, to, gfn, writable)
    return ref, gfn


def map_grants(mapper: Dom, specs: Sequence[tuple[int, ...]]) -> Any:
    """One GNTTABOP_map_grant_ref batch of ``(dom, ref, flags[, gfn])``.

    Without a gfn, the op maps at a fresh hole of the mapper (``get_pages``).
    """
    ops = (abi.gnttab_map_grant_ref * len(specs))()
    for op, (dom, ref, flags, *gfn) in zip(ops, specs):
        op.host_addr = (gfn[0] if gfn else mapper.get_pages(1)[0]) << 12
        op.flags, op.ref, op.dom = flags, ref, dom
    assert mapper.grant_table_op(abi.GNTTABOP_map_grant_ref, ops) == 0
    return ops


def map1(mapper: Dom, dom: int, ref: int, flags: int = HOST, gfn: int | None = None) -> Any:
    """One map op (its status unchecked)."""
    spec = (dom, ref, flags) if gfn is None else (dom, ref, flags, gfn)
    return map_grants(mapper, [spec])[0]


def unmap(mapper: Dom, specs: Sequence[tuple[int, ...]]) -> list[int]:
    """One GNTTABOP_unmap_grant_ref batch of ``(host_addr, handle[, dev_bus_addr])``."""
    ops = (abi.gnttab_unmap_grant_ref * len(specs))()
    for op, (host_addr, handle, *dba) in zip(ops, specs):
        op.host_addr, op.handle = host_addr, handle
        op.dev_bus_addr = dba[0] if dba else 0
    assert mapper.grant_table_op(abi.GNTTABOP_unmap_grant_ref, ops) == 0
    return [op.status for op in ops]


def unmap1(mapper: Dom, mop: Any) -> int:
    """Unmap what the map op ``mop`` mapped; its status."""
    return unmap(mapper, [(mop.host_addr, mop.handle)])[0]


def copy_ops(specs: Sequence[tuple[tuple[int, int, int], tuple[int, int, int], int, int]]) -> Any:
    """``((u, domid, offset), (u, domid, offset), len, flags)`` -> gnttab_copy array."""
    ops = (abi.gnttab_copy * len(specs))()
    for op, ((su, sd, so), (du, dd, do), length, flags) in zip(ops, specs):
        op.source.u.gmfn, op.source.domid, op.source.offset = su, sd, so
        op.dest.u.gmfn, op.dest.domid, op.dest.offset = du, dd, do
        op.len, op.flags = length, flags
    return ops


def copy(dom: Dom, *specs: Any) -> list[int]:
    """``copy_ops(specs)`` in one GNTTABOP_copy batch; the statuses."""
    ops = copy_ops(specs)
    assert dom.grant_table_op(abi.GNTTABOP_copy, ops) == 0
    return [op.status for op in ops]


def set_version(dom: Dom, version: int) -> tuple[int, int]:
    """GNTTABOP_set_version: ``(errno or 0, version field after the call)``."""
    op = abi.gnttab_set_version(version=version)
    try:
        dom.grant_table_op(abi.GNTTABOP_set_version, op)
    except HypercallError as e:
        return e.errno, int(op.version)
    return 0, int(op.version)


# ---------------------------------------------------------------- waiting
def wait_hook(table: xengrant.GrantTable, monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """A semaphore released each time a thread starts waiting in ``get``/``get_n``.

    The hook runs with the table's lock held, just before ``wait`` releases it,
    so a ``put`` issued after acquiring the semaphore can only run once the
    waiter is really waiting: the wake-up cannot be missed or pre-empted.
    """
    sem = threading.Semaphore(0)
    real_wait = table._lock.wait

    def wait(timeout: float | None = None) -> bool:
        sem.release()
        return real_wait(timeout)

    monkeypatch.setattr(table._lock, "wait", wait)
    return sem


def busy_spy(
    monkeypatch: pytest.MonkeyPatch, table: xengrant.GrantTable, name: str, busy: Any
) -> list[bool]:
    """Wrap ``table.<name>``: the list gets each call's outcome (False: it raised
    Busy, True: it returned), and ``busy.set()`` runs (a threading or asyncio
    Event) whenever it meets Busy."""
    outcomes: list[bool] = []
    real = getattr(table, name)

    def spy(*args: Any, **kw: Any) -> Any:
        try:
            result = real(*args, **kw)
        except Busy:
            outcomes.append(False)
            busy.set()
            raise
        outcomes.append(True)
        return result

    monkeypatch.setattr(table, name, spy)
    return outcomes


def hv_state(hv: Any) -> tuple[Any, ...]:
    """Everything an emulated hypervisor holds, for comparing two of them.

    Machine memory (every page, every grant entry's flags), refcounts,
    owners and free frames, and per domain: dying, pages, p2m, active
    entries, maptrack entries and free-handle order.
    """
    doms = []
    for domid in sorted(hv.domains):
        ds = hv.domains[domid]
        active = {
            ref: (act.pin, act.domid, act.mfn, act.start, act.length, act.is_sub_page)
            for ref, act in ds.gt.active.items()
        }
        mt = ds.maptrack
        entries = [
            None if m is None else (m.flags, m.domid, m.ref, m.mfn, m.host_gfn)
            for m in mt.entries
        ]
        doms.append(
            (domid, ds.is_dying, ds.tot_pages, dict(ds.p2m), active, entries, list(mt._free))
        )
    m = hv.machine
    return (bytes(hv.mem), doms, list(m.refcount), list(m.owner), m.free_frames)
