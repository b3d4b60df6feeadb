#!/usr/bin/env python3
"""Cross-process grant mapping through ``xengrant hypervisor`` (issue 4).

Run from the repository root::

    python benchmarks/bench_service.py             # full run (~30 s)
    python benchmarks/bench_service.py --quick     # smoke run
    python benchmarks/bench_service.py --markdown  # also print Markdown tables

Three processes: the service, a granter domain that shares 1024 pages with the
mapper, and this process, the mapper.  Measured in the mapper:

- a bare socket round trip to the service *process* (16 bytes to an echo
  thread there, ``sendall`` + ``recv``: no framing, no hypervisor) -- the
  target's baseline -- and the same with both ends polling first (the
  client for up to ``Channel.SPIN``, a second echo thread for the service's
  ``DEFAULT_SPIN``), as the service client and the service do;
- a framed PING round trip through the service's loop (``Channel.call``),
  also with the client sleeping at once (``spin`` 0);
- ``gnttab.map_grant_ref`` + ``Mapping.unmap`` of one page (the unmap is
  posted: its reply comes with the next map's), also with ``spin`` 0;
- ``gnttab.map_domain_grant_refs`` + ``Mapping.unmap`` of 1024 refs (one
  message each way per call), with the map and the unmap also timed apart;
- where the one-page time goes: the two GNTTAB_OP messages alone (raw
  hypercalls, no guest layer, no mmap), and the service's handlers for them
  called directly in this process (no socket);
- the same two through :class:`xengrant.EmbeddedXen` in this process, to show
  what the emulator itself costs.

Targets (issue 4): one page <= 2x the bare round trip; the 1024 batch <= 3 ms.

Each figure is the median over interleaved rounds of a timed loop's mean
(``perf_counter_ns``, GC off during the loop); "noise" is the median absolute
deviation of the rounds.  Every round runs every case, so load from other
processes lands on the baselines too.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:
    import xengrant
except ImportError:  # a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import xengrant
from xengrant import abi
from xengrant.service import connect, serve
from xengrant.service import protocol as proto
from xengrant.service._io import spin_recv
from xengrant.service.server import DEFAULT_SPIN, Connection, Server

BATCH = 1024
TARGET_ONE_PAGE_RATIO = 2.0
TARGET_BATCH_NS = 3_000_000

BARE = "bare socket round trip to the service process (16 B)"
BARE_SPIN = "  the same, both ends polling first, as the service and its client do"
PING = "framed PING round trip through the service loop"
ONE = "map+unmap 1 page, cross-process"
ONE_SLEEP = "  the same, the mapper sleeping at once for each reply (spin 0)"
PING_SLEEP = "  framed PING, the client sleeping at once (spin 0)"
BIG = f"map+unmap {BATCH} refs, cross-process"
BIG_MAP = f"  of which map {BATCH}"
BIG_UNMAP = f"  of which unmap {BATCH}"
RAW = "2 raw GNTTAB_OP messages: 1 map op, 1 unmap op"
HANDLERS = "service handlers of those 2 messages, no socket"
EMB_ONE = "map+unmap 1 page, EmbeddedXen (one process)"
EMB_BIG = f"map+unmap {BATCH} refs, EmbeddedXen (one process)"


# ------------------------------------------------------------- processes
def _echo(sock: socket.socket, spin: float) -> None:
    conn, _ = sock.accept()
    buf = bytearray(4096)
    view = memoryview(buf)
    while True:
        n = spin_recv(conn, view, spin) if spin else -1
        if n < 0:
            n = conn.recv_into(buf)
        if not n:
            return
        conn.sendall(buf[:n])


def _service_main(path: str, echo_path: str, memory: int, conn: Any) -> None:
    for where, spin in ((echo_path, 0.0), (echo_path + ".poll", DEFAULT_SPIN)):
        es = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        es.bind(where)
        es.listen(1)
        threading.Thread(target=_echo, args=(es, spin), daemon=True).start()
    serve(path, memory, ready=lambda p: conn.send(p), log=lambda s: None)


def _granter_main(path: str, conn: Any) -> None:
    d = connect(path)
    peer = conn.recv()
    share = d.grant_table.share_pages(peer, BATCH)
    share.mem[:5] = b"first"
    conn.send((d.domid, share.refs))
    conn.recv()
    share.unshare()
    d.close()


class _NullSocket:
    """Stands in for a client socket when the handlers are timed alone."""

    last = b""

    def fileno(self) -> int:
        return -1

    def send(self, data: bytes, flags: int = 0) -> int:
        self.last = data
        return len(data)

    def sendmsg(self, bufs: list[bytes], anc: Any, flags: int = 0) -> int:
        return sum(len(b) for b in bufs)

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ timing
@dataclass
class Case:
    name: str
    n: int
    run: Callable[[int], list[float] | None]
    samples: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)


def _timed(loop: Callable[[int], Any], n: int) -> float:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        loop(n)
        return (time.perf_counter_ns() - t0) / n
    finally:
        gc.enable()


def run_rounds(cases: list[Case], rounds: int) -> None:
    for _ in range(rounds):
        for c in cases:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter_ns()
                parts = c.run(c.n)
                c.samples.append((time.perf_counter_ns() - t0) / c.n)
            finally:
                gc.enable()
            if parts:
                for name, v in zip((BIG_MAP, BIG_UNMAP), parts):
                    c.parts.setdefault(name, []).append(v)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def mad(xs: list[float]) -> float:
    m = median(xs)
    return statistics.median(abs(x - m) for x in xs)


def fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "python": platform.python_implementation() + " " + platform.python_version(),
        "platform": platform.platform(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "xengrant": xengrant.__version__,
    }


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    ap.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 11)
    scale = 0.2 if args.quick else 1.0
    info = machine()

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="xg-bench-")
    path, echo_path = os.path.join(tmp, "hv.sock"), os.path.join(tmp, "echo.sock")
    r, w = ctx.Pipe(duplex=False)
    svc = ctx.Process(target=_service_main, args=(path, echo_path, 256 << 20, w), daemon=True)
    svc.start()
    w.close()
    if not r.poll(60):
        print("the service did not start", file=sys.stderr)
        return 1
    r.recv()
    me = connect(path)
    gconn, child = ctx.Pipe()
    granter = ctx.Process(target=_granter_main, args=(path, child), daemon=True)
    granter.start()
    gconn.send(me.domid)
    gdom, refs = gconn.recv()
    echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    echo.connect(echo_path)
    echo_poll = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    echo_poll.connect(echo_path + ".poll")

    xen = xengrant.EmbeddedXen(memory=64 << 20)
    ea, eb = xen.create_domain(), xen.create_domain()
    eshare = ea.grant_table.share_pages(eb.domid, BATCH)
    erefs = eshare.refs

    gnt = me.gnttab
    chan = me.channel
    msg = b"x" * 16
    rbuf = bytearray(64)

    def bare_spin(n: int) -> None:
        s = echo_poll
        view = memoryview(rbuf)
        for _ in range(n):
            s.sendall(msg)
            if spin_recv(s, view, chan.spin) < 0:
                s.recv_into(rbuf)

    def bare(n: int) -> None:
        s = echo
        for _ in range(n):
            s.sendall(msg)
            s.recv_into(rbuf)

    def ping(n: int) -> None:
        for _ in range(n):
            chan.call(proto.MSG_PING, msg)

    spin = chan.spin

    def ping_sleep(n: int) -> None:
        chan.spin = 0.0
        try:
            ping(n)
        finally:
            chan.spin = spin

    def one_sleep(n: int) -> None:
        chan.spin = 0.0
        try:
            one(n)
        finally:
            chan.spin = spin

    def one(n: int) -> None:
        for _ in range(n):
            gnt.map_grant_ref(gdom, refs[0]).unmap()

    def big(n: int) -> list[float]:
        tm = tu = 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            m = gnt.map_domain_grant_refs(gdom, refs)
            t1 = time.perf_counter_ns()
            m.unmap()
            tu += time.perf_counter_ns() - t1
            tm += t1 - t0
        return [tm / n, tu / n]

    hc = me.hypercalls
    map_op, unmap_op = struct.Struct("<QIIHhIQ"), struct.Struct("<QQIh2x")
    hole = me.get_pages(1)[0]

    def raw(n: int) -> None:
        for _ in range(n):
            buf = bytearray(map_op.pack(hole << 12, abi.GNTMAP_host_map, refs[0], gdom, 0, 0, 0))
            hc.grant_table_op(abi.GNTTABOP_map_grant_ref, memoryview(buf), 1)
            _st, handle = struct.unpack_from("<hI", buf, 18)
            ub = bytearray(unmap_op.pack(hole << 12, 0, handle, 0))
            hc.grant_table_op(abi.GNTTABOP_unmap_grant_ref, memoryview(ub), 1)

    hsrv = Server(os.path.join(tmp, "handlers.sock"), 64 << 20, log=lambda s: None)
    hgranter = hsrv.xen.create_domain()
    hshare = hgranter.grant_table.share_pages(hgranter.domid + 1, 1)
    hsock = _NullSocket()
    hconn = Connection(hsock, 1)  # type: ignore[arg-type]
    hsrv._create(hconn, proto.CREATE_REQ.pack(proto.PROTOCOL_VERSION, -1, 0, -1, -1, -1))
    hmap = proto.GNTTAB_REQ.pack(abi.GNTTABOP_map_grant_ref, 1)

    def handlers(n: int) -> None:
        for _ in range(n):
            req = hmap + map_op.pack(hole << 12, abi.GNTMAP_host_map, hshare.refs[0],
                                     hgranter.domid, 0, 0, 0)
            hsrv._handle(hconn, proto.Frame(proto.MSG_GNTTAB_OP, 0, 1, req, len(req)))
            # reply: header, status, rc, length, then the op (handle at +20)
            (handle,) = struct.unpack_from("<I", hsock.last, 12 + 12 + 20)
            req = proto.GNTTAB_REQ.pack(abi.GNTTABOP_unmap_grant_ref, 1) + unmap_op.pack(
                hole << 12, 0, handle, 0)
            hsrv._handle(hconn, proto.Frame(proto.MSG_GNTTAB_OP, 0, 2, req, len(req)))

    def emb_one(n: int) -> None:
        for _ in range(n):
            eb.gnttab.map_grant_ref(ea.domid, erefs[0]).unmap()

    def emb_big(n: int) -> None:
        for _ in range(n):
            eb.gnttab.map_domain_grant_refs(ea.domid, erefs).unmap()

    # correctness before timing: the mapping is the granter's page, zero-copy
    with gnt.map_grant_ref(gdom, refs[0]) as m:
        assert bytes(m.mem[:5]) == b"first"
    cases = [
        Case(BARE, max(50, int(2000 * scale)), bare),
        Case(BARE_SPIN, max(50, int(2000 * scale)), bare_spin),
        Case(PING, max(50, int(2000 * scale)), ping),
        Case(PING_SLEEP, max(50, int(2000 * scale)), ping_sleep),
        Case(ONE, max(20, int(1000 * scale)), one),
        Case(ONE_SLEEP, max(20, int(1000 * scale)), one_sleep),
        Case(BIG, max(2, int(10 * scale)), big),
        Case(RAW, max(20, int(1000 * scale)), raw),
        Case(HANDLERS, max(20, int(1000 * scale)), handlers),
        Case(EMB_ONE, max(20, int(1000 * scale)), emb_one),
        Case(EMB_BIG, max(2, int(10 * scale)), emb_big),
    ]
    for c in cases:  # warm-up
        c.run(max(1, c.n // 10))
    run_rounds(cases, rounds)

    free_before = xen.free_frames
    gconn.send("done")
    granter.join(60)
    echo.close()
    echo_poll.close()
    me.close()
    svc.terminate()
    svc.join(60)
    eshare.unshare()
    xen.close()
    del free_before
    hshare.unshare()
    hsrv.close()
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)

    res = {c.name: (median(c.samples), mad(c.samples), c.n) for c in cases}
    for c in cases:
        for name, xs in c.parts.items():
            res[name] = (median(xs), mad(xs), c.n)
    order = [BARE, BARE_SPIN, PING, PING_SLEEP, ONE, ONE_SLEEP, RAW, HANDLERS, BIG, BIG_MAP,
             BIG_UNMAP, EMB_ONE, EMB_BIG]
    bare_ns = res[BARE][0]
    rows = []
    for name in order:
        med, noise, n = res[name]
        rel = f"{med / bare_ns:.1f}x bare RT" if name != BARE else "1.0x"
        rows.append((name, fmt(med), fmt(noise), str(n), rel))
    one_ratio = res[ONE][0] / bare_ns
    targets = [
        ("map+unmap 1 page <= 2x bare round trip", f"{one_ratio:.1f}x",
         "met" if one_ratio <= TARGET_ONE_PAGE_RATIO else "missed"),
        (f"map+unmap {BATCH} refs <= 3 ms", fmt(res[BIG][0]),
         "met" if res[BIG][0] <= TARGET_BATCH_NS else "missed"),
    ]
    # like for like, not targets: both ends polling, both ends sleeping
    context = [
        ("map+unmap 1 page / bare round trip, both ends polling",
         f"{res[ONE][0] / res[BARE_SPIN][0]:.1f}x"),
        ("map+unmap 1 page / bare round trip, both sleeping at once",
         f"{res[ONE_SLEEP][0] / bare_ns:.1f}x"),
    ]

    print(f"rounds: {rounds}; machine: {info}")
    w0 = max(len(r[0]) for r in rows)
    print(f"{'case':<{w0}}  {'median':>10}  {'noise':>9}  {'loop n':>6}  vs")
    for name, med_s, noise_s, n_s, rel in rows:
        print(f"{name:<{w0}}  {med_s:>10}  {noise_s:>9}  {n_s:>6}  {rel}")
    for t, got, verdict in targets:
        print(f"target: {t}: {got} -> {verdict}")
    for t, got in context:
        print(f"like for like: {t}: {got}")
    if args.markdown:
        print("\n| machine | |\n|---|---|")
        for k, v in info.items():
            print(f"| {k} | {v} |")
        print("\n| case | median | noise | loop n | vs bare round trip |\n|---|---|---|---|---|")
        for name, med_s, noise_s, n_s, rel in rows:
            print(f"| {name.strip()} | {med_s} | {noise_s} | {n_s} | {rel} |")
        print("\n| target | measured | verdict |\n|---|---|---|")
        for t, got, verdict in targets:
            print(f"| {t} | {got} | {verdict} |")
        for t, got in context:
            print(f"| {t} (like for like, not a target) | {got} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
