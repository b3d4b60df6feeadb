"""numpy over granted memory with no copy: the backend's array and the frontend's are one buffer.

Run: python examples/numpy_zero_copy.py   (needs numpy)
"""

from __future__ import annotations

import numpy as np

import xengrant


def main() -> None:
    with xengrant.EmbeddedXen(memory=64 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        share = front.grant_table.share_pages(back.domid, count=4)
        with share, back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
            samples = np.frombuffer(m.mem, dtype=np.float32)  # 4 pages: 4096 floats
            samples[:] = np.arange(samples.size, dtype=np.float32)
            seen = np.frombuffer(share.mem, dtype=np.float32)
            assert seen[4095] == 4095.0 and float(seen.sum()) == float(samples.sum())
            # the arrays borrow the buffers: drop them before unmapping (else BufferError)
            del samples, seen
        back.gnttab.close()
    print("numpy zero-copy: ok")


if __name__ == "__main__":
    main()
