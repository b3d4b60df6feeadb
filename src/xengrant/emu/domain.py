"""A domain as the hypervisor sees it: id, physmap, grant table, maptrack.

The physmap (``p2m``) maps each guest frame number to a machine frame and a
type, as Xen's p2m does for a translated (HVM/PVH) guest.  PV domains get an
identity physmap (gfn == mfn), because a PV guest names machine frames in its
grant entries and in ``GNTTABOP_transfer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .grant_table import GrantTableState
from .maptrack import Maptrack

# p2m types (Xen's p2m_type_t, the ones the grant table needs).
#: Ordinary RAM the domain owns (``p2m_ram_rw``).
P2M_RAM_RW = 0
#: A foreign frame mapped writable by ``map_grant_ref`` (``p2m_grant_map_rw``).
P2M_GRANT_MAP_RW = 1
#: A foreign frame mapped read-only by ``map_grant_ref`` (``p2m_grant_map_ro``).
P2M_GRANT_MAP_RO = 2
#: A frame of the domain's own grant table, placed by
#: ``XENMEM_add_to_physmap(XENMAPSPACE_grant_table)`` (Xen maps it ram_rw).
P2M_GNTTAB_SHARED = 3
#: A status frame of a v2 grant table (``XENMAPIDX_grant_table_status``).
P2M_GNTTAB_STATUS = 4

P2M_NAMES = {
    P2M_RAM_RW: "ram_rw",
    P2M_GRANT_MAP_RW: "grant_map_rw",
    P2M_GRANT_MAP_RO: "grant_map_ro",
    P2M_GNTTAB_SHARED: "gnttab_shared",
    P2M_GNTTAB_STATUS: "gnttab_status",
}


@dataclass
class DomainState:
    """Everything the hypervisor keeps about one domain.

    Attributes:
        domid: the domain id.
        pv: True for a PV (untranslated) guest: identity physmap, may use
            ``GNTTABOP_transfer``; False (the default) for HVM/PVH.
        max_pages: the domain's memory reservation limit (``d->max_pages``).
        p2m: gfn -> (mfn, p2m type).
        tot_pages: frames the domain owns (RAM; ``domain_tot_pages``).
        gt: its grant table.
        maptrack: its handles for grants it mapped from others.
        is_dying: destroyed, kept as a zombie while others map its pages.
        privileged: the control domain (dom0).
    """

    domid: int
    pv: bool
    max_pages: int
    gt: GrantTableState
    maptrack: Maptrack
    p2m: dict[int, tuple[int, int]] = field(default_factory=dict)
    tot_pages: int = 0
    is_dying: bool = False
    #: The control domain (``is_control_domain``): may name other domains
    #: in setup_table, query_size, get_status_frames and get_version.
    privileged: bool = False
    #: Maptrack handles still to walk while dying (``gnttab_release_mappings``
    #: goes down from the top, preemptibly); 0: done or not dying.
    relinquish_at: int = 0
