"""The portable layer on real Xen: dom0 shares pages with itself through /dev/xen/gntalloc and
maps them through /dev/xen/gntdev.

Run (in dom0 of a Xen host, as root): python examples/real_xen.py
Elsewhere it says so and exits 0 unless --require is given (then 1).
"""

from __future__ import annotations

import os
import sys

from xengrant import portable_backend


def main(require: bool) -> int:
    if not os.path.exists("/dev/xen/gntdev"):
        print("real Xen: no /dev/xen/gntdev here (not a Xen host)")
        return 1 if require else 0
    with portable_backend("linux") as b:
        if b.domid is None:
            print("real Xen: this domain's id is unknown (a domU); run it in dom0")
            return 1 if require else 0
        share = b.gntshr.share_pages(b.domid, count=4)
        with b.gnttab.map_domain_grant_refs(b.domid, share.refs) as m:
            m.mem[:5] = b"hello"
            assert bytes(share.mem[:5]) == b"hello"
        b.gntshr.unshare(share)
    print(f"real Xen: d{b.domid} shared 4 pages with itself, mapped, wrote and read: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main("--require" in sys.argv[1:]))
