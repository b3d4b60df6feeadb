"""Real-Xen benchmark (run in dom0 by xenlab/run.sh): xengrant.linux vs Debian's libxengnttab.

Per page: share + map + unmap + unshare, dom0 granting to itself, through
(a) xengrant's portable layer over gntalloc/gntdev and (b) the C libraries
libxengntshr/libxengnttab (Debian's libxengnttab1, called with ctypes), in the
same run, interleaved round by round.  Also a 16-page batch (share 16, map
them contiguously, unmap, unshare) per page, and a 16-segment GRANT_COPY.
Under QEMU TCG only the ratio means anything.

    python3 benchmarks/bench_xen.py [--rounds 9] [--iters 25]

Prints a Markdown table (median of the rounds, microseconds per page).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

PROT_READ, PROT_WRITE = 1, 2


class CLib:
    """libxengntshr + libxengnttab (one .so in Debian's libxengnttab1) via ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libxengnttab.so.1", use_errno=True)
        vp, u32, i = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
        for name, res, args in [
            ("xengntshr_open", vp, [vp, ctypes.c_uint]),
            ("xengntshr_close", i, [vp]),
            ("xengntshr_share_pages", vp, [vp, u32, i, ctypes.POINTER(u32), i]),
            ("xengntshr_unshare", i, [vp, vp, u32]),
            ("xengnttab_open", vp, [vp, ctypes.c_uint]),
            ("xengnttab_close", i, [vp]),
            ("xengnttab_map_grant_ref", vp, [vp, u32, u32, i]),
            ("xengnttab_map_domain_grant_refs", vp, [vp, u32, u32, ctypes.POINTER(u32), i]),
            ("xengnttab_unmap", i, [vp, vp, u32]),
            ("xengnttab_grant_copy", i, [vp, u32, vp]),
        ]:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        self.lib = lib
        self.shr = lib.xengntshr_open(None, 0)
        self.tab = lib.xengnttab_open(None, 0)
        if not self.shr or not self.tab:
            raise OSError(ctypes.get_errno(), "xengntshr_open/xengnttab_open failed")
        self.refs = (u32 * 1024)()

    def cycle(self, n: int) -> None:
        lib = self.lib
        addr = lib.xengntshr_share_pages(self.shr, 0, n, self.refs, 1)
        if not addr:
            raise OSError(ctypes.get_errno(), "xengntshr_share_pages")
        if n == 1:
            m = lib.xengnttab_map_grant_ref(self.tab, 0, self.refs[0], PROT_READ | PROT_WRITE)
        else:
            m = lib.xengnttab_map_domain_grant_refs(
                self.tab, n, 0, self.refs, PROT_READ | PROT_WRITE
            )
        if not m:
            raise OSError(ctypes.get_errno(), "xengnttab_map")
        ctypes.memmove(m, b"C", 1)
        lib.xengnttab_unmap(self.tab, m, n)
        lib.xengntshr_unshare(self.shr, addr, n)

    def close(self) -> None:
        self.lib.xengnttab_close(self.tab)
        self.lib.xengntshr_close(self.shr)


def py_cycle(backend: Any, n: int) -> None:
    share = backend.gntshr.share_pages(0, n)
    if n == 1:
        m = backend.gnttab.map_grant_ref(0, share.refs[0])
    else:
        m = backend.gnttab.map_domain_grant_refs(0, share.refs)
    m.mem[0:1] = b"P"
    m.unmap()
    backend.gntshr.unshare(share)


def measure(fn: Callable[[], None], iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=25)
    args = ap.parse_args(argv)

    from xengrant.linux import available, open_backend, portable_backend
    from xengrant.portable import CopySegment, GrantRef

    if not available():
        print("bench_xen: not on Xen (no /dev/xen/gntdev); nothing measured")
        return 0
    py = open_backend()
    c = CLib()
    emu = portable_backend("emulated", domid=0)

    # GRANT_COPY: 16 segments of 256 bytes from a shared page to local memory
    src = py.gntshr.share_pages(0, 1)
    segs = [CopySegment(GrantRef(0, src.refs[0], 256 * k), bytearray(256), 256) for k in range(16)]
    # xengnttab_grant_copy_segment_t has gntdev_grant_copy_segment's layout
    from xengrant import abi

    csegs = (abi.gntdev_grant_copy_segment * 16)()
    dst = ctypes.create_string_buffer(4096)
    for k, cs in enumerate(csegs):
        cs.source.foreign.ref, cs.source.foreign.offset = src.refs[0], 256 * k
        cs.source.foreign.domid = 0
        cs.dest.virt = ctypes.addressof(dst) + 256 * k
        cs.len, cs.flags = 256, abi.GNTCOPY_source_gref

    def c_copy() -> None:
        if c.lib.xengnttab_grant_copy(c.tab, 16, csegs) != 0:
            raise OSError(ctypes.get_errno(), "xengnttab_grant_copy")
        if any(cs.status for cs in csegs):
            raise RuntimeError(f"copy statuses {[cs.status for cs in csegs]}")

    def py_copy() -> None:
        py.gnttab.grant_copy(segs)

    cases: list[tuple[str, int, Callable[[], None], Callable[[], None], Callable[[], None]]] = [
        (
            "share+map+unmap+unshare, 1 page",
            1,
            lambda: py_cycle(py, 1),
            lambda: c.cycle(1),
            lambda: py_cycle(emu, 1),
        ),
        (
            "the same, 16 pages at once (per page)",
            16,
            lambda: py_cycle(py, 16),
            lambda: c.cycle(16),
            lambda: py_cycle(emu, 16),
        ),
        ("GRANT_COPY, 16 x 256 B segments (per segment)", 16, py_copy, c_copy, lambda: None),
    ]
    rows = []
    for name, per, pyf, cf, emuf in cases:
        per_emu = not name.startswith("GRANT_COPY")
        pyf()
        cf()  # warm up
        pts, cts, ratios = [], [], []
        for _ in range(args.rounds):
            # ABBA order in every round, so a load change on the host hits both sides
            p1 = measure(pyf, args.iters)
            c1 = measure(cf, args.iters)
            c2 = measure(cf, args.iters)
            p2 = measure(pyf, args.iters)
            pts.append((p1 + p2) / 2 / per)
            cts.append((c1 + c2) / 2 / per)
            ratios.append((p1 + p2) / (c1 + c2))
        e = None
        if per_emu:
            e = statistics.median(measure(emuf, args.iters) / per for _ in range(3))
        rows.append(
            (name, statistics.median(pts), statistics.median(cts), statistics.median(ratios), e)
        )
    src.unshare()
    emu.close()
    c.close()
    py.close()

    print(f"Real Xen 4.17, Linux {_uname()} PV dom0 under QEMU TCG; dom0 grants to itself.")
    print(
        f"{args.rounds} rounds, each xengrant, C, C, xengrant x {args.iters} iterations; "
        "medians, microseconds per page; ratio = median of the rounds' ratios.\n"
    )
    print("| operation | xengrant.linux | libxengnttab (C) | ratio | emulator (same ops) |")
    print("|---|---:|---:|---:|---:|")
    for name, p, cc, ratio, e in rows:
        emu_s = f"{e * 1e6:.1f}" if e is not None else "-"
        print(f"| {name} | {p * 1e6:.1f} | {cc * 1e6:.1f} | {ratio:.2f}x | {emu_s} |")
    return 0


def _uname() -> str:
    import os

    return os.uname().release


if __name__ == "__main__":
    sys.exit(main())
