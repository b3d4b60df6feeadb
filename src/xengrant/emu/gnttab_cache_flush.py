"""GNTTABOP_cache_flush: clean or invalidate the data cache over part of a frame.

Common code in Xen 4.17 (``gnttab_cache_flush`` / ``_cache_flush`` of
xen/common/grant_table.c), answered on x86 too, with x86's cache helpers
(xen/arch/x86/include/asm/flushtlb.h): ``invalidate_dcache_va_range`` is
``-EOPNOTSUPP``, a clean (alone or with invalidate) flushes and succeeds.
The op has no status field: the hypercall returns the first failing op's
errno, the ops before it done.  Each op, in Xen's order:

1. ``offset >= 4096``, ``length > 4096``, ``offset + length > 4096`` or an
   ``op`` bit other than ``GNTTAB_CACHE_CLEAN|INVAL`` (``SOURCE_GREF``
   included, so its "currently unimplemented" ``-EOPNOTSUPP`` is never
   reached): ``-EINVAL``;
2. ``length == 0`` or ``op == 0``: nothing to do, 0 -- or ``-EILSEQ`` when the
   command word carries a continuation (``cur_ref``);
3. the frame ``dev_bus_addr >> 12`` not a machine frame: ``-EINVAL``;
4. no owner, or an owner without a grant table (XSA-232): ``-EPERM``;
5. another domain's frame: the caller must map it by a grant of that domain
   (``grant_map_exists``: an active entry pinned for the caller on that
   frame, searched from ``cur_ref``), else ``-EINVAL``;
6. x86: ``GNTTAB_CACHE_INVAL`` alone ``-EOPNOTSUPP``, else 0.

The emulator has no caches: a successful flush changes nothing.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from ..abi.grant_table import GNTTAB_CACHE_CLEAN, GNTTAB_CACHE_INVAL
from .batch import efault
from .domain import DomainState
from .machine import NO_OWNER, PAGE_SIZE

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: struct gnttab_cache_flush: a (dev_bus_addr | ref), offset, length, op
CACHE_FLUSH_OP = struct.Struct("<QHHI")


def cache_flush_one(
    hv: Hypervisor,
    d: DomainState,
    dev_bus_addr: int,
    offset: int,
    length: int,
    op: int,
    cur_ref: int,
) -> int:
    """One ``_cache_flush``: 0 or a negative errno (see the module docstring)."""
    if (
        offset >= PAGE_SIZE
        or length > PAGE_SIZE
        or offset + length > PAGE_SIZE
        or op & ~(GNTTAB_CACHE_INVAL | GNTTAB_CACHE_CLEAN)
    ):
        return -errno.EINVAL
    if length == 0 or op == 0:
        return 0 if not cur_ref else -errno.EILSEQ
    machine = hv.machine
    mfn = dev_bus_addr >> 12
    if not machine.reserved <= mfn < machine.nr_frames:  # mfn_valid
        return -errno.EINVAL
    owner = machine.owner[mfn]
    if owner == NO_OWNER or owner not in hv.domains:  # page_get_owner_and_reference
        return -errno.EPERM
    if owner != d.domid:
        # grant_map_exists: the caller holds a pin of one of the owner's grants on mfn
        rgt = hv.domains[owner].gt
        if not any(
            ref >= cur_ref and act.pin and act.domid == d.domid and act.mfn == mfn
            for ref, act in rgt.active.items()
        ):
            return -errno.EINVAL
    if op & GNTTAB_CACHE_INVAL and not op & GNTTAB_CACHE_CLEAN:
        return -errno.EOPNOTSUPP  # x86 invalidate_dcache_va_range
    return 0  # x86 clean(_and_invalidate)_dcache_va_range: flush_area_local


def cache_flush(hv: Hypervisor, d: DomainState, uop: memoryview, count: int, cur_ref: int) -> int:
    """GNTTABOP_cache_flush over ``count`` ops (``gnttab_cache_flush``).

    Args:
        cur_ref: the command word's continuation bits (``cmd & ~0xfff``), where
            the first op's grant search starts; later ops start at 0.

    Returns:
        0, or the first failing op's negative errno (``-EFAULT`` for an
        injected guest-buffer fault).
    """
    fault = efault(hv, "cache_flush", d.domid)
    for i in range(count):
        if fault is not None and fault():
            return -errno.EFAULT
        dba, offset, length, op = CACHE_FLUSH_OP.unpack_from(uop, i * CACHE_FLUSH_OP.size)
        rc = cache_flush_one(hv, d, dba, offset, length, op, cur_ref)
        if rc < 0:
            return rc
        cur_ref = 0
    return 0
