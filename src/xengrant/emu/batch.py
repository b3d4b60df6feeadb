"""How a batch hypercall walks its ops (``do_grant_table_op``'s per-op loop).

Xen copies each op in when it reaches it, runs it, and copies the result
back before the next one.  Here the common success case of consecutive ops
may run in C (a ``_cext`` run, which stops at the first op it does not take),
and every other op runs through the Python rule, so the ops still complete
one at a time, in order, whichever code ran them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

#: Whether the C runs start switched on (``gnttab_map.FASTPATH``,
#: ``gnttab_copy.FASTPATH``, and with the first the service's C serving).
#: ``XENGRANT_FASTPATH=0`` in the environment switches them off, in this
#: process and in the services it starts, so that every op runs the Python
#: rules (scripts/mutation.sh mutates those).
FASTPATH_DEFAULT = os.environ.get("XENGRANT_FASTPATH", "1") != "0"


def efault(hv: Hypervisor, op: str, domid: int) -> Callable[[], bool] | None:
    """The ``fault`` argument of :func:`run_batch` for ``op`` by ``domid``:
    None (and the fast path may run) unless faults are planned."""
    faults = hv.faults
    if not faults:
        return None
    return lambda: faults.fire("efault", op, domid)


def run_batch(
    count: int,
    one: Callable[[int], None],
    fast: Callable[[int], int] | None,
    fault: Callable[[], bool] | None = None,
) -> int:
    """Run ops ``0 .. count-1``.

    Args:
        count: how many ops.
        one: runs op ``i`` by the Python rules (reads it, writes its result).
        fast: runs ops from ``i`` while it can and returns the index of the
            first op it did not run; None to run every op through ``one``.
        fault: asked before each op is read; True means the guest buffer
            faulted there (an injected ``copy_from_guest`` failure).  Given, the
            fast path stands aside.

    Returns:
        0, or -EFAULT when ``fault`` stopped the batch (the ops before done,
        as ``gnttab_map_grant_ref`` and the other batch loops return).
    """
    if fault is not None:
        for i in range(count):
            if fault():
                return -errno.EFAULT
            one(i)
        return 0
    i = 0
    while i < count:
        if fast is not None:
            i = fast(i)
            if i >= count:
                return 0
        one(i)
        i += 1
    return 0
