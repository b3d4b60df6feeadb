"""The parts of xen/include/public/memory.h a grant-table guest needs.

Only the numbers are used on the emulated hypercall interface (which takes
Python ints for memory ops); the names and values match the header, checked by
tests/test_abi_headers.py.
"""

from __future__ import annotations

XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7

XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3

#: OR'ed into ``idx`` with XENMAPSPACE_grant_table to map a status frame (v2).
XENMAPIDX_grant_table_status = 0x80000000
