"""The emulated Xen hypervisor's grant-table core (sans-IO).

:class:`Hypervisor` holds the rules; :mod:`xengrant.embedded` runs it in
process over a memfd.  Module names follow xen/common/grant_table.c:
``gnttab_map`` (map/unmap), ``gnttab_copy``, ``gnttab_transfer``,
``gnttab_setup`` (setup_table, query_size, versions, swap), ``entry``
(``_set_status``), ``maptrack``, ``grant_table`` (table state), ``machine``
(frames), ``domain``.
"""

from __future__ import annotations

from .hypervisor import Hypervisor
from .machine import PAGE_SIZE, Machine, OutOfMemory

__all__ = ["PAGE_SIZE", "Hypervisor", "Machine", "OutOfMemory"]
