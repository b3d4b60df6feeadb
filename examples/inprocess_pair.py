"""Two domains in one process: a frontend shares pages, a backend maps, writes and copies.

Run: python examples/inprocess_pair.py
"""

from __future__ import annotations

import xengrant
from xengrant import abi


def main() -> None:
    with xengrant.EmbeddedXen(memory=64 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        with front.grant_table.share_pages(back.domid, count=2) as share:
            # the backend maps both pages contiguously and writes through its mapping
            with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
                m.mem[:5] = b"hello"
                assert bytes(share.mem[:5]) == b"hello"  # same frames, no copy
                try:
                    share.try_unshare()  # still mapped: Xen has GTF_reading|GTF_writing set
                except xengrant.Busy as e:
                    print("busy while mapped:", e)
            # GNTTABOP_copy from the grant into a page of the backend's own
            local = back.alloc_pages(1)
            try:
                op = (abi.gnttab_copy * 1)()
                op[0].source.u.ref, op[0].source.domid = share.refs[0], front.domid
                op[0].dest.u.gmfn, op[0].dest.domid = local.gfns[0], abi.DOMID_SELF
                op[0].len, op[0].flags = 5, abi.GNTCOPY_source_gref
                assert back.grant_table.copy(op) == [abi.GNTST_okay]
                assert bytes(local.mem[:5]) == b"hello"
            finally:
                local.free()
        # leaving the block unshared: access ended, refs and pages given back
        back.gnttab.close()
    print("in-process pair: ok")


if __name__ == "__main__":
    main()
