"""Smoke test of an installed xengrant (a wheel, an sdist): run as a script, not by pytest.

It checks that the package and its C extension come from site-packages (not a source tree), then
shares, maps, copies and unshares between two domains, and asks the emulator's `g` debug key.
Exits non-zero (an assertion) on any difference.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import xengrant
from xengrant import _cext

site = os.path.realpath(sysconfig.get_paths()["purelib"])
for mod in (xengrant, _cext):
    where = os.path.realpath(mod.__file__ or "")
    assert where.startswith(site), f"{mod.__name__} comes from {where}, not {site}"

with xengrant.EmbeddedXen(memory=16 << 20) as xen:
    front, back = xen.create_domain(), xen.create_domain()
    # nested, not parenthesized: that form of ``with`` is Python 3.10+ syntax
    with front.grant_table.share_pages(back.domid, count=2) as share:  # noqa: SIM117
        with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
            m.mem[4096:4101] = b"smoke"
            assert bytes(share.mem[4096:4101]) == b"smoke"
            try:
                share.try_unshare()
            except xengrant.Busy:
                pass
            else:
                raise AssertionError("unshare while mapped did not raise Busy")
    back.gnttab.close()
print(f"smoke: xengrant {xengrant.__version__} on Python {sys.version.split()[0]}: ok")
