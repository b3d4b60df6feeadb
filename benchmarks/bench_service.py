#!/usr/bin/env python3
"""Cross-process grant mapping through ``xengrant hypervisor`` (issue 4).

Run from the repository root::

    python benchmarks/bench_service.py             # full run (~1 min)
    python benchmarks/bench_service.py --quick     # smoke run
    python benchmarks/bench_service.py --markdown  # also print Markdown tables

Processes: a service and a granter domain (which shares 1024 pages with the
mapper) per CPU placement, and this process, the mapper.  A round trip
between two processes costs what their CPUs make it cost, so every
cross-process case runs in three placements, interleaved round by round:

- ``split``: the mapper on CPU 0, the service on CPU 1 (a frontend and a
  backend with a vCPU each);
- ``same``: both on CPU 0 (every message is a context switch, and both
  processes' work adds up on one CPU);
- ``free``: no pinning, wherever the scheduler puts them.

Measured in the mapper, in each placement:

- a bare socket round trip to the service *process* (16 bytes to an echo
  thread there, ``sendall`` + ``recv``: no framing, no hypervisor) -- the
  target's baseline -- and the same with both ends polling first (the
  client for up to ``Channel.SPIN``, a second echo thread for the service's
  ``DEFAULT_SPIN``), as the service client and the service do;
- a framed PING round trip through the service (``Channel.call``);
- ``gnttab.map_grant_ref`` + ``Mapping.unmap`` of one page on the
  connection's request ring (the unmap is posted: its response is read
  with the next map's), also with the mapper sleeping at once for each
  reply (``spin`` 0), and on the socket instead (no ring, as
  ``connect(ring=False)``);
- ``gnttab.map_domain_grant_refs`` + ``Mapping.unmap`` of 1024 refs (one
  message each way per call), with the map and the unmap also timed apart;
- the two GNTTAB_OP messages of a one-page cycle alone (raw hypercalls, no
  guest layer, no mmap, the unmap not posted), and the same messages packed
  by hand and written straight to the socket, each posted unmap in the same
  send as the next map, the replies read with a minimal parse (no guest
  layer, no ``Channel``): what the service costs a client that does nothing
  else, the floor of any Python client of this service.

And once, in this process: the service's handlers for those two messages
called directly (no socket), and the one-page and 1024-ref cycles through
:class:`xengrant.EmbeddedXen` (what the emulator itself costs).

Targets (issue 4): one page <= 2x the bare round trip; the 1024 batch <= 3 ms.

Each figure is the median over interleaved rounds of a timed loop's mean
(``perf_counter_ns``, GC off during the loop); "noise" is the median absolute
deviation of the rounds.  Every round runs every case in every placement, so
load from other processes lands on the baselines too.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
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
from _machine import machine_info

from xengrant import _cext, abi
from xengrant.guest.ops import MAP_OP as _MAP_OP
from xengrant.guest.ops import UNMAP_OP as _UNMAP_OP
from xengrant.service import connect, serve
from xengrant.service import protocol as proto
from xengrant.service.server import DEFAULT_SPIN, Connection, Server

BATCH = 1024
TARGET_ONE_PAGE_RATIO = 2.0
TARGET_BATCH_NS = 3_000_000

BARE = "bare socket round trip to the service process (16 B)"
BARE_SPIN = "  the same, both ends polling first, as the service and its client do"
PING = "framed PING round trip through the service loop"
ONE = "map+unmap 1 page, cross-process"
ONE_SLEEP = "  the same, the mapper sleeping at once for each reply (spin 0)"
ONE_SOCKET = "  the same on the socket, no request ring (connect(ring=False))"
BIG = f"map+unmap {BATCH} refs, cross-process"
BIG_MAP = f"  of which map {BATCH}"
BIG_UNMAP = f"  of which unmap {BATCH}"
RAW = "2 raw GNTTAB_OP messages: 1 map op, 1 unmap op"
RAW_POSTED = "  hand-packed on the socket, the unmap posted with the next map"
HANDLERS = "service handlers of those 2 messages, no socket"
EMB_ONE = "map+unmap 1 page, EmbeddedXen (one process)"
EMB_BIG = f"map+unmap {BATCH} refs, EmbeddedXen (one process)"


# ------------------------------------------------------------- processes
def _echo(sock: socket.socket, spin: float) -> None:
    conn, _ = sock.accept()
    buf = bytearray(4096)
    fd, spin_ns = conn.fileno(), int(spin * 1e9)
    while True:
        # polling as the service's connection threads do; else a plain recv
        n = _cext.recv_wait(fd, buf, spin_ns, -1) if spin else conn.recv_into(buf)
        if not n:
            return
        conn.sendall(buf[:n])


def _service_main(
    path: str, echo_path: str, memory: int, conn: Any, cpus: set[int] | None
) -> None:
    if cpus is not None:  # before any thread starts: they all inherit it
        os.sched_setaffinity(0, cpus)
    for where, spin in ((echo_path, 0.0), (echo_path + ".poll", DEFAULT_SPIN)):
        es = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        es.bind(where)
        es.listen(1)
        threading.Thread(target=_echo, args=(es, spin), daemon=True).start()
    serve(path, memory, ready=lambda p: conn.send(p), log=lambda s: None)


def _granter_main(path: str, conn: Any, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
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


# ------------------------------------------------------------ placements
#: name -> (the mapper's CPUs, the service's CPUs); None: not pinned
PLACEMENTS: dict[str, tuple[set[int] | None, set[int] | None]] = {
    "split": ({0}, {1}),
    "same": ({0}, {0}),
    "free": (None, None),
}

_MSG = b"x" * 16
_RBUF = bytearray(64)


class Placement:
    """A service and a granter for one placement, and the mapper's cases against them."""

    def __init__(self, name: str, ctx: Any, tmp: str, scale: float) -> None:
        self.name = name
        mine, theirs = PLACEMENTS[name]
        self.cpus = mine
        self.all_cpus = os.sched_getaffinity(0)
        d = os.path.join(tmp, name)
        os.mkdir(d)
        self.dir = d
        path, echo_path = os.path.join(d, "hv.sock"), os.path.join(d, "echo.sock")
        r, w = ctx.Pipe(duplex=False)
        self.svc = ctx.Process(
            target=_service_main, args=(path, echo_path, 256 << 20, w, theirs), daemon=True
        )
        self.svc.start()
        w.close()
        if not r.poll(60):
            raise RuntimeError(f"{name}: the service did not start")
        r.recv()
        self.me = connect(path)
        self.gconn, child = ctx.Pipe()
        self.granter = ctx.Process(target=_granter_main, args=(path, child, mine), daemon=True)
        self.granter.start()
        self.gconn.send(self.me.domid)
        self.gdom, self.refs = self.gconn.recv()
        self.echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.echo.connect(echo_path)
        self.echo_poll = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.echo_poll.connect(echo_path + ".poll")
        self.hole = self.me.get_pages(1)[0]
        n1, nb = max(50, int(2000 * scale)), max(2, int(10 * scale))
        self.cases = [
            Case(BARE, n1, self._pinned(self.bare)),
            Case(BARE_SPIN, n1, self._pinned(self.bare_spin)),
            Case(PING, n1, self._pinned(self.ping)),
            Case(ONE, n1 // 2, self._pinned(self.one)),
            Case(ONE_SLEEP, n1 // 2, self._pinned(self.one_sleep)),
            Case(ONE_SOCKET, n1 // 2, self._pinned(self.one_socket)),
            Case(RAW, n1 // 2, self._pinned(self.raw)),
            Case(RAW_POSTED, n1 // 2, self._pinned(self.raw_posted)),
            Case(BIG, nb, self._pinned(self.big)),
        ]
        # correctness before timing: the mapping is the granter's page, zero-copy
        with self.me.gnttab.map_grant_ref(self.gdom, self.refs[0]) as m:
            assert bytes(m.mem[:5]) == b"first"

    def _pinned(self, loop: Callable[[int], Any]) -> Callable[[int], Any]:
        def run(n: int) -> Any:
            os.sched_setaffinity(0, self.cpus or self.all_cpus)
            try:
                return loop(n)
            finally:
                os.sched_setaffinity(0, self.all_cpus)
        return run

    def bare(self, n: int) -> None:
        s, msg, rbuf = self.echo, _MSG, _RBUF
        for _ in range(n):
            s.sendall(msg)
            s.recv_into(rbuf)

    def bare_spin(self, n: int) -> None:
        s, msg, rbuf = self.echo_poll, _MSG, _RBUF
        fd, spin_ns = s.fileno(), int(self.me.channel.spin * 1e9)
        recv_wait = _cext.recv_wait
        for _ in range(n):
            s.sendall(msg)
            recv_wait(fd, rbuf, spin_ns, -1)

    def ping(self, n: int) -> None:
        call = self.me.channel.call
        for _ in range(n):
            call(proto.MSG_PING, _MSG)

    def one(self, n: int) -> None:
        gnt, gdom, ref = self.me.gnttab, self.gdom, self.refs[0]
        for _ in range(n):
            gnt.map_grant_ref(gdom, ref).unmap()

    def one_sleep(self, n: int) -> None:
        chan = self.me.channel
        spin, chan.spin = chan.spin, 0.0
        try:
            self.one(n)
        finally:
            chan.spin = spin

    def one_socket(self, n: int) -> None:
        chan = self.me.channel
        chan.sync()  # the ring's last posted unmap done, its response read
        ring, chan.ring = chan.ring, None  # as connect(ring=False): all on the socket
        try:
            self.one(n)
            chan.sync()
        finally:
            chan.ring = ring

    def raw(self, n: int) -> None:
        hc, hole, gdom, ref = self.me.hypercalls, self.hole, self.gdom, self.refs[0]
        for _ in range(n):
            buf = bytearray(_MAP_OP.pack(hole << 12, abi.GNTMAP_host_map, ref, gdom, 0, 0, 0))
            hc.grant_table_op(abi.GNTTABOP_map_grant_ref, memoryview(buf), 1)
            _st, handle = struct.unpack_from("<hI", buf, 18)
            ub = bytearray(_UNMAP_OP.pack(hole << 12, 0, handle, 0))
            hc.grant_table_op(abi.GNTTABOP_unmap_grant_ref, memoryview(ub), 1)

    def raw_posted(self, n: int) -> None:
        chan = self.me.channel
        chan.sync()  # the last posted unmap of an earlier case (on the ring, not drained)
        # around the Channel: it must have nothing in flight, and gets nothing back
        calls = chan.calls
        assert calls.decoder.idle and not calls.posted and not calls.waiting
        sock, hole, gdom, ref = chan.sock, self.hole, self.gdom, self.refs[0]
        rbuf = bytearray(4096)
        head, unpack, hs = proto.HEADER, proto.HEADER.unpack_from, proto.HEADER_SIZE
        hmap = proto.GNTTAB_REQ.pack(abi.GNTTABOP_map_grant_ref, 1)
        hunmap = proto.GNTTAB_REQ.pack(abi.GNTTABOP_unmap_grant_ref, 1)
        mlen, ulen = len(hmap) + _MAP_OP.size, len(hunmap) + _UNMAP_OP.size
        seq = 1 << 31  # far from the Channel's own sequence numbers
        posted = b""
        for i in range(n + 1):
            seq += 2
            if i == n:  # the last posted unmap, and a PING to get its reply
                req = posted + head.pack(0, proto.MSG_PING, 0, seq)
            else:
                req = posted + head.pack(mlen, proto.MSG_GNTTAB_OP, 0, seq) + hmap + _MAP_OP.pack(
                    hole << 12, abi.GNTMAP_host_map, ref, gdom, 0, 0, 0)
            sock.sendall(req)
            got = pos = 0
            mine = -1
            while mine < 0:  # replies in order: the posted unmap's, then ours
                got += sock.recv_into(memoryview(rbuf)[got:])
                while got - pos >= hs:
                    length, _t, _f, rseq = unpack(rbuf, pos)
                    if got - pos - hs < length:
                        break
                    # payload: status, rc, ops length (12 bytes), then the op:
                    # its status at +18 in a map op, +20 in an unmap op
                    op = pos + hs + 12
                    st = struct.unpack_from("<h", rbuf, op + (18 if rseq == seq else 20))
                    if length > 12 and st[0]:
                        raise RuntimeError(f"op failed: GNTST {st[0]}")
                    if rseq == seq:
                        mine = op
                    pos += hs + length
            if i < n:
                (handle,) = struct.unpack_from("<I", rbuf, mine + 20)  # the map op's handle
                posted = head.pack(ulen, proto.MSG_GNTTAB_OP, proto.F_POSTED, seq + 1) + hunmap + (
                    _UNMAP_OP.pack(hole << 12, 0, handle, 0))

    def big(self, n: int) -> list[float]:
        gnt, gdom, refs = self.me.gnttab, self.gdom, self.refs
        tm = tu = 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            m = gnt.map_domain_grant_refs(gdom, refs)
            t1 = time.perf_counter_ns()
            m.unmap()
            tu += time.perf_counter_ns() - t1
            tm += t1 - t0
        return [tm / n, tu / n]

    def close(self) -> None:
        self.gconn.send("done")
        self.granter.join(60)
        self.echo.close()
        self.echo_poll.close()
        self.me.close()
        self.svc.terminate()
        self.svc.join(60)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


class Local:
    """The cases that run in this process alone: the handlers and EmbeddedXen."""

    def __init__(self, tmp: str, scale: float) -> None:
        self.srv = Server(os.path.join(tmp, "handlers.sock"), 64 << 20, log=lambda s: None)
        self.hgranter = self.srv.xen.create_domain()
        self.hshare = self.hgranter.grant_table.share_pages(self.hgranter.domid + 1, 1)
        self.hsock = _NullSocket()
        self.hconn = Connection(self.hsock, 1)  # type: ignore[arg-type]
        self.srv._create(
            self.hconn, proto.CREATE_REQ.pack(proto.PROTOCOL_VERSION, -1, 0, -1, -1, -1)
        )
        self.xen = xengrant.EmbeddedXen(memory=64 << 20)
        self.ea, self.eb = self.xen.create_domain(), self.xen.create_domain()
        self.eshare = self.ea.grant_table.share_pages(self.eb.domid, BATCH)
        n1, nb = max(20, int(1000 * scale)), max(2, int(10 * scale))
        self.cases = [
            Case(HANDLERS, n1, self.handlers),
            Case(EMB_ONE, n1, self.emb_one),
            Case(EMB_BIG, nb, self.emb_big),
        ]

    def handlers(self, n: int) -> None:
        srv, conn, sock = self.srv, self.hconn, self.hsock
        gdom, ref, hole = self.hgranter.domid, self.hshare.refs[0], 0x100
        hmap = proto.GNTTAB_REQ.pack(abi.GNTTABOP_map_grant_ref, 1)
        hunmap = proto.GNTTAB_REQ.pack(abi.GNTTABOP_unmap_grant_ref, 1)
        for _ in range(n):
            req = hmap + _MAP_OP.pack(hole << 12, abi.GNTMAP_host_map, ref, gdom, 0, 0, 0)
            srv._handle(conn, proto.Frame(proto.MSG_GNTTAB_OP, 0, 1, req, len(req)))
            # reply: header, status, rc, length, then the op (handle at +20)
            (handle,) = struct.unpack_from("<I", sock.last, 12 + 12 + 20)
            req = hunmap + _UNMAP_OP.pack(hole << 12, 0, handle, 0)
            srv._handle(conn, proto.Frame(proto.MSG_GNTTAB_OP, 0, 2, req, len(req)))

    def emb_one(self, n: int) -> None:
        gnt, dom, ref = self.eb.gnttab, self.ea.domid, self.eshare.refs[0]
        for _ in range(n):
            gnt.map_grant_ref(dom, ref).unmap()

    def emb_big(self, n: int) -> None:
        gnt, dom, refs = self.eb.gnttab, self.ea.domid, self.eshare.refs
        for _ in range(n):
            gnt.map_domain_grant_refs(dom, refs).unmap()

    def close(self) -> None:
        self.eshare.unshare()
        self.xen.close()
        self.hshare.unshare()
        self.srv.close()


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    ap.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--placements", default=None,
                    help="comma-separated subset of split,same,free (default: all that fit)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 11)
    scale = 0.2 if args.quick else 1.0
    info = machine_info(xengrant=xengrant.__version__)
    cpus = os.sched_getaffinity(0)
    names = args.placements.split(",") if args.placements else list(PLACEMENTS)
    # split needs CPUs 0 and 1
    names = [n for n in names if all(c is None or c <= cpus for c in PLACEMENTS[n])]

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="xg-bench-")
    places: list[Placement] = []
    local: Local | None = None
    try:
        places.extend(Placement(n, ctx, tmp, scale) for n in names)
        local = Local(tmp, scale)
        all_cases = [c for pl in places for c in pl.cases] + local.cases
        for c in all_cases:  # warm-up
            c.run(max(1, c.n // 10))
        run_rounds(all_cases, rounds)
    finally:
        for pl in places:
            pl.close()
        if local is not None:
            local.close()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)

    def results(cases: list[Case]) -> dict[str, tuple[float, float, int]]:
        res = {c.name: (median(c.samples), mad(c.samples), c.n) for c in cases}
        for c in cases:
            for name, xs in c.parts.items():
                res[name] = (median(xs), mad(xs), c.n)
        return res

    print(f"rounds: {rounds}; machine: {info}")
    md: list[str] = []
    targets = []
    order = [BARE, BARE_SPIN, PING, ONE, ONE_SLEEP, ONE_SOCKET, RAW, RAW_POSTED, BIG, BIG_MAP,
             BIG_UNMAP]
    for pl in places:
        res = results(pl.cases)
        bare_ns = res[BARE][0]
        rows = []
        for name in order:
            med, noise, n = res[name]
            rel = f"{med / bare_ns:.1f}x bare RT" if name != BARE else "1.0x"
            rows.append((name, fmt(med), fmt(noise), str(n), rel))
        targets.append((pl.name, res[ONE][0], bare_ns, res[BIG][0], res[BARE_SPIN][0]))
        _table(f"placement {pl.name}", rows, md)
    lres = results(local.cases)
    _table("in this process (no placement)",
           [(n, fmt(lres[n][0]), fmt(lres[n][1]), str(lres[n][2]), "") for n in
            (HANDLERS, EMB_ONE, EMB_BIG)], md)
    print()
    md.append("\n| placement | map+unmap 1 page | bare round trip | ratio (target <= 2x) "
              "| 1024 batch (target <= 3 ms) | 1 page / both-polling round trip |")
    md.append("|---|---|---|---|---|---|")
    for name, one_ns, bare_ns, big_ns, polled_ns in targets:
        ratio = one_ns / bare_ns
        v1 = "met" if ratio <= TARGET_ONE_PAGE_RATIO else "missed"
        v2 = "met" if big_ns <= TARGET_BATCH_NS else "missed"
        print(f"target [{name}]: map+unmap 1 page <= 2x bare round trip: "
              f"{fmt(one_ns)} / {fmt(bare_ns)} = {ratio:.1f}x -> {v1}; "
              f"map+unmap {BATCH} refs <= 3 ms: {fmt(big_ns)} -> {v2} "
              f"(like for like, both ends polling: {one_ns / polled_ns:.1f}x)")
        md.append(f"| {name} | {fmt(one_ns)} | {fmt(bare_ns)} | {ratio:.1f}x: {v1} "
                  f"| {fmt(big_ns)}: {v2} | {one_ns / polled_ns:.1f}x |")
    if args.markdown:
        print("\n| machine | |\n|---|---|")
        for k, v in info.items():
            print(f"| {k} | {v} |")
        print("\n".join(md))
    return 0


def _table(title: str, rows: list[tuple[str, str, str, str, str]], md: list[str]) -> None:
    w0 = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print(f"{'case':<{w0}}  {'median':>10}  {'noise':>9}  {'loop n':>6}  vs")
    for name, med_s, noise_s, n_s, rel in rows:
        print(f"{name:<{w0}}  {med_s:>10}  {noise_s:>9}  {n_s:>6}  {rel}")
    md.append(f"\n{title}\n\n| case | median | noise | loop n | vs bare round trip |")
    md.append("|---|---|---|---|---|")
    for name, med_s, noise_s, n_s, rel in rows:
        md.append(f"| {name.strip()} | {med_s} | {noise_s} | {n_s} | {rel} |")


if __name__ == "__main__":
    sys.exit(main())
