"""Last of the real-Xen suite (files run in name order): nothing is left allocated or mapped.

Every test's fixture already checks that no mapping is live and no gntdev or
gntalloc range is left in /proc/self/maps; this checks the drivers' own state
after the whole run: gntalloc can hand out its whole ``limit`` again (every
page the run shared was given back, whichever file shared it) and no earlier
backend left a gntalloc or gntdev file open.
"""

from __future__ import annotations

import os

from xengrant.linux import Backend


def test_nothing_left_allocated(xen: Backend, limit: int) -> None:
    """Every page of the run was given back: gntalloc can hand out its whole limit."""
    share = xen.gntshr.share_pages(0, limit)
    with xen.gnttab.map_domain_grant_refs(0, share.refs[:64]) as m:
        m.mem[:2] = b"ok"
    xen.gntshr.unshare(share)
    # no device left open by an earlier backend (gntdev/gntalloc free a file's
    # grants and mappings when it closes), only this test's two
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/xen/gnt"):
            fds.append(target)
    assert sorted(fds) == ["/dev/xen/gntalloc", "/dev/xen/gntdev"]
