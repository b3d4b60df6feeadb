"""Benchmark: a page-directory shared buffer's whole life, next to a memcpy.

One cycle, for each allocation mode, on the embedded emulator:

- fe_alloc: frontend alloc (share directory + buffer, fill the directory),
  backend map (walk the chain, map the buffer contiguously), backend unmap,
  frontend free.
- be_alloc: frontend alloc (share the directory), backend alloc (walk the
  chain, share its buffer, write its grefs), frontend map, frontend unmap,
  backend free, frontend free.

Alongside, in the same rounds, a plain memcpy of the same size (bytearray to
bytearray, both already touched), as the yardstick.  The modes and the memcpy
run interleaved, one cycle each per round, so load from other jobs lands on
all of them alike.

With ``--processes``, the same rounds also run fe_alloc across two processes
through ``xengrant hypervisor`` (a service in a child process): this process
is the frontend, a child process the backend, each a domain of the service.
The backend's map reaches the buffer's pages through the files the service
sends it (the buffer is one share, so one file), as issue 14 asks; the
handshake between the two (the directory's first ref) is a pipe message,
counted in the total.

Usage::

    python benchmarks/bench_pgdir.py [--mib 64] [--repeat 7] [--profile] [--processes]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import multiprocessing as mp
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import xengrant
from xengrant.pgdir import PgdirBackend, PgdirFrontend


def cycle(
    front: xengrant.Domain, back: xengrant.Domain, n: int, be_alloc: bool
) -> dict[str, float]:
    """One buffer life; returns the ms each phase took."""
    marks: list[tuple[str, float]] = [("", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    fe = PgdirFrontend(front, back.domid, n, be_alloc=be_alloc)
    mark("frontend alloc")
    be = PgdirBackend(back, front.domid, fe.get_dir_start(), fe.buffer_sz, be_alloc=be_alloc)
    mark("backend alloc+write dir" if be_alloc else "backend map")
    if be_alloc:
        fe.map()
        mark("frontend map")
        fe.unmap()
        mark("frontend unmap")
        be.free()
        mark("backend free")
    else:
        be.free()
        mark("backend unmap")
    fe.free()
    mark("frontend free")
    out = {name: (t - marks[i][1]) * 1e3 for i, (name, t) in enumerate(marks[1:])}
    out["total"] = (marks[-1][1] - marks[0][1]) * 1e3
    return out


def raw_cycle(
    front: xengrant.Domain, back: xengrant.Domain, n: int, be_alloc: bool
) -> dict[str, float]:
    """The grant operations a fe_alloc cycle needs, without pgdir: the floor."""
    t0 = time.perf_counter()
    share = front.gntshr.share_pages(back.domid, n)
    t1 = time.perf_counter()
    m = back.gnttab.map_domain_grant_refs(front.domid, share.refs)
    t2 = time.perf_counter()
    m.unmap()
    t3 = time.perf_counter()
    front.gntshr.unshare(share)
    t4 = time.perf_counter()
    return {
        "share_pages": (t1 - t0) * 1e3,
        "map_domain_grant_refs": (t2 - t1) * 1e3,
        "unmap": (t3 - t2) * 1e3,
        "unshare": (t4 - t3) * 1e3,
        "total": (t4 - t0) * 1e3,
    }


Cycle = Callable[[xengrant.Domain, xengrant.Domain, int, bool], dict[str, float]]


def _service_main(path: str, memory: int, ready: Any) -> None:
    from xengrant.service import serve

    serve(path, memory, ready=lambda p: ready.send(p), log=lambda s: None)


def _backend_main(path: str, conn: Any) -> None:
    """The backend domain process: map each buffer it is told of, then unmap it."""
    from xengrant.service import connect

    back = connect(path)
    conn.send(back.domid)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        front_domid, dir_start, buffer_sz = msg
        t0 = time.perf_counter()
        be = PgdirBackend(back, front_domid, dir_start, buffer_sz, be_alloc=False)
        t1 = time.perf_counter()
        assert bytes(be.mem[:4]) == b"pgdr"
        t2 = time.perf_counter()
        be.free()
        t3 = time.perf_counter()
        conn.send({"backend map": (t1 - t0) * 1e3, "backend unmap": (t3 - t2) * 1e3})
    back.close()


class CrossProcess:
    """A service and a backend process; this process is the frontend domain."""

    def __init__(self, mib: int) -> None:
        ctx = mp.get_context("spawn")
        self.dir = tempfile.mkdtemp(prefix="xg-bench-pgdir-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        r, w = ctx.Pipe(duplex=False)
        self.service = ctx.Process(
            # eight times the buffer: a domain may hold a quarter of the machine
            target=_service_main, args=(self.path, (mib * 8) << 20, w), daemon=True
        )
        self.service.start()
        assert r.recv() == self.path
        from xengrant.service import connect

        self.front = connect(self.path)
        self.conn, child = ctx.Pipe()
        self.backend = ctx.Process(target=_backend_main, args=(self.path, child), daemon=True)
        self.backend.start()
        self.back_domid = self.conn.recv()

    def cycle(self, n: int) -> dict[str, float]:
        """One fe_alloc buffer life across the two processes (ms per phase)."""
        t0 = time.perf_counter()
        fe = PgdirFrontend(self.front, self.back_domid, n, be_alloc=False)
        fe.mem[:4] = b"pgdr"
        t1 = time.perf_counter()
        self.conn.send((self.front.domid, fe.get_dir_start(), fe.buffer_sz))
        back = self.conn.recv()
        t2 = time.perf_counter()
        fe.free()
        t3 = time.perf_counter()
        return {
            "frontend alloc": (t1 - t0) * 1e3,
            **back,
            "handshake + backend (in the frontend)": (t2 - t1) * 1e3,
            "frontend free": (t3 - t2) * 1e3,
            "total": (t3 - t0) * 1e3,
        }

    def close(self) -> None:
        self.conn.send(None)
        self.backend.join(30)
        self.front.close()
        self.service.terminate()
        self.service.join(30)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def run_all(
    mib: int, repeat: int, modes: list[tuple[str, bool, Cycle]], processes: bool = False
) -> tuple[dict[str, dict[str, tuple[float, float]]], tuple[float, float]]:
    """Every mode's ``phase -> (median ms, best ms)`` and memcpy's (median, best).

    The modes run interleaved, one cycle of each (and one memcpy) per round,
    each on its own emulator, so a burst of load from other jobs lands on all
    of them and on the baseline alike.
    """
    n = (mib << 20) // 4096
    nbytes = mib << 20
    src = bytearray(b"\x5a") * nbytes
    dst = bytearray(nbytes)
    dst[:] = src  # touch both
    xens = [xengrant.EmbeddedXen(memory=(mib * 4) << 20) for _ in modes]
    cross = CrossProcess(mib) if processes else None
    cross_runs: list[dict[str, float]] = []
    try:
        doms = [(x.create_domain(), x.create_domain()) for x in xens]
        for (_, be_alloc, fn), (front, back) in zip(modes, doms):
            fn(front, back, n, be_alloc)  # warm up: grant tables grown, frames touched
        if cross is not None:
            cross.cycle(n)
        runs: list[list[dict[str, float]]] = [[] for _ in modes]
        copies: list[float] = []
        gc.disable()
        try:
            for _ in range(repeat):
                for i, ((_, be_alloc, fn), (front, back)) in enumerate(zip(modes, doms)):
                    runs[i].append(fn(front, back, n, be_alloc))
                if cross is not None:
                    cross_runs.append(cross.cycle(n))
                t = time.perf_counter()
                dst[:] = src
                copies.append((time.perf_counter() - t) * 1e3)
        finally:
            gc.enable()
    finally:
        for x in xens:
            x.close()
        if cross is not None:
            cross.close()
    named = [(name, rs) for (name, _, _), rs in zip(modes, runs)]
    if cross_runs:
        named.append(("fe_alloc, two processes (service)", cross_runs))
    out = {
        name: {k: (statistics.median(r[k] for r in rs), min(r[k] for r in rs)) for k in rs[0]}
        for name, rs in named
    }
    return out, (statistics.median(copies), min(copies))


def profile(mib: int, be_alloc: bool) -> str:
    n = (mib << 20) // 4096
    with xengrant.EmbeddedXen(memory=(mib * 4) << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        cycle(front, back, n, be_alloc)
        prof = cProfile.Profile()
        prof.enable()
        cycle(front, back, n, be_alloc)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    return s.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="cProfile one cycle per mode")
    ap.add_argument("--processes", action="store_true",
                    help="also fe_alloc across two processes through the service")
    args = ap.parse_args(argv)
    nbytes = args.mib << 20
    modes: list[tuple[str, bool, Cycle]] = [
        ("fe_alloc", False, cycle),
        ("be_alloc", True, cycle),
        ("raw grant ops, no pgdir", False, raw_cycle),
    ]
    print(f"{args.mib} MiB buffer = {nbytes // 4096} pages, {args.repeat} rounds\n")
    results, (copy_med, copy_best) = run_all(args.mib, args.repeat, modes, args.processes)
    print("| mode | phase | median ms | best ms |")
    print("|---|---|---:|---:|")
    for mode, res in results.items():
        for phase, (med, best) in res.items():
            print(f"| {mode} | {phase} | {med:.1f} | {best:.1f} |")
    print(f"| memcpy {args.mib} MiB | same rounds | {copy_med:.1f} | {copy_best:.1f} |")
    if args.profile:
        for mode, be_alloc in (("fe_alloc", False), ("be_alloc", True)):
            print(f"\n## profile {mode}\n")
            print(profile(args.mib, be_alloc))


if __name__ == "__main__":
    main()
