"""Last of the real-Xen suite (files run in name order): nothing is left allocated or mapped.

Every test's fixture already checks that no mapping is live and no gntdev or
gntalloc range is left in /proc/self/maps; this checks the drivers' own state
after the whole run: gntalloc can hand out its whole ``limit`` again (every
page the run shared was given back, whichever file shared it) and no earlier
backend left a gntalloc or gntdev file open.
"""

from __future__ import annotations

import os

import domu

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


def test_domus_leave_nothing_behind(domus: tuple[domu.DomU, domu.DomU], free_before: int) -> None:
    """The session's domUs destroyed, every domain is gone and Xen has its memory back.

    ``free_before`` was read before the first domU; dom0's own grant-table
    growth (maptrack frames for its 1024-page maps) stays, hence the MiB of slack.
    """
    ids = [d.domid for d in domus]
    for d in domus:
        d.destroy()
    for i in ids:
        assert domu.wait_gone(i, 60.0), f"d{i} is still listed: {domu.xl('list')}"
    assert set(domu.listed_domids()) == {0}, domu.xl("list")
    free = domu.free_memory_mib()
    print(f"Xen free memory: {free_before} MiB before the domUs, {free} MiB after")
    assert free_before - 2 <= free <= free_before + 2
