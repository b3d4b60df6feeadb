"""How a batch hypercall walks its ops (``do_grant_table_op``'s per-op loop).

Xen copies each op in when it reaches it, runs it, and copies the result
back before the next one.  Here the common success case of consecutive ops
may run in C (a ``_cext`` run, which stops at the first op it does not take),
and every other op runs through the Python rule, so the ops still complete
one at a time, in order, whichever code ran them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: Whether the C runs start switched on (``gnttab_map.FASTPATH``,
#: ``gnttab_copy.FASTPATH``, and with the first the service's C serving).
#: ``XENGRANT_FASTPATH=0`` in the environment switches them off, in this
#: process and in the services it starts, so that every op runs the Python
#: rules (scripts/mutation.sh mutates those).
FASTPATH_DEFAULT = os.environ.get("XENGRANT_FASTPATH", "1") != "0"


def run_batch(count: int, one: Callable[[int], None], fast: Callable[[int], int] | None) -> None:
    """Run ops ``0 .. count-1``.

    Args:
        count: how many ops.
        one: runs op ``i`` by the Python rules (reads it, writes its result).
        fast: runs ops from ``i`` while it can and returns the index of the
            first op it did not run; None to run every op through ``one``.
    """
    i = 0
    while i < count:
        if fast is not None:
            i = fast(i)
            if i >= count:
                return
        one(i)
        i += 1
