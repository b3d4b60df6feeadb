"""set_version(1) while another domain still maps a v2 status frame.

Xen 4.17 ``gnttab_unpopulate_status_frames``: a status frame with references
beyond the owner's (a guest may grant its own status-frame gfn:
``get_paged_frame`` accepts ``p2m_grant_shared``/status frames) cannot be
taken back: ``-EBUSY`` and the table stays at v2.  Xen also ``domain_crash``es
a translated domain on that path; the emulator only returns ``-EBUSY``.
"""

from __future__ import annotations

import errno
import struct

from grant_helpers import MakeDomain, Xen, map1, set_version, unmap1
from xengrant import abi

STATUS_GFN = 0x6000
REF = 5  # a reserved ref: pins of refs 0..7 do not block set_version


def test_set_version_1_while_a_status_frame_is_mapped_is_ebusy(
    xen: Xen, make_domain: MakeDomain
) -> None:
    a, b = make_domain(), make_domain()
    frames = xen.free_frames
    assert set_version(a, 2) == (0, 2)
    st = xen.domain_state(a.domid)
    g = st.gt
    status_mfn = g.status[0]
    assert (
        a.hypercalls.add_to_physmap(
            abi.XENMAPSPACE_grant_table, abi.XENMAPIDX_grant_table_status, STATUS_GFN
        )
        == 0
    )
    # a grants its own status frame to b (raw v2 entry: domid, frame, then flags)
    off = g.entry_offset(REF)
    struct.pack_into("<HHIQ", xen.mem, off, 0, b.domid, 0, STATUS_GFN)
    struct.pack_into("<H", xen.mem, off, abi.GTF_permit_access | abi.GTF_readonly)
    mop = map1(b, a.domid, REF, abi.GNTMAP_host_map | abi.GNTMAP_readonly)
    assert mop.status == abi.GNTST_okay
    assert mop.dev_bus_addr >> 12 == status_mfn
    # b sees a's status word for REF: GTF_reading, set by its own map
    view = b.view([mop.host_addr >> 12], False)
    word = struct.unpack_from("<H", memoryview(view), REF * 2)[0]
    view.close()
    assert word == abi.GTF_reading
    entry = bytes(xen.mem[off : off + 16])

    assert set_version(a, 1) == (errno.EBUSY, 2)
    assert g.version == 2 and g.status == [status_mfn]
    assert st.p2m[STATUS_GFN][0] == status_mfn
    assert bytes(xen.mem[off : off + 16]) == entry  # nothing cleared

    assert unmap1(b, mop) == abi.GNTST_okay
    assert set_version(a, 1) == (0, 1)
    assert g.status == [] and STATUS_GFN not in st.p2m
    # the reserved entry is carried over to v1, in-use bits gone
    flags, domid, frame = struct.unpack_from("<HHI", xen.mem, g.entry_offset(REF))
    assert (flags, domid, frame) == (abi.GTF_permit_access | abi.GTF_readonly, b.domid, STATUS_GFN)
    assert xen.free_frames == frames
    assert not g.active and xen.domain_state(b.domid).maptrack.in_use == 0
