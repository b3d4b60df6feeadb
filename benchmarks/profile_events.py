#!/usr/bin/env python3
"""Where the time of one cross-process event round trip goes (issues 14/17).

Run from the repository root::

    python benchmarks/profile_events.py            # ~30 s
    python benchmarks/profile_events.py --quick

Three processes: a service (a :class:`~xengrant.service.Server` whose
``_on_data`` is wrapped to take timestamps), this process (domain A) and a
peer process (domain B).  A and B ping-pong on an interdomain event channel
(``EventPort.notify`` then ``wait``) and, in the same rounds, on a
socketpair (the baseline) and on the service's protocol packed by hand (the
same messages, no client library: the floor the service itself sets).

Every process stamps ``time.monotonic_ns`` (one clock for all processes) at
the points below; the script lines them up per round trip and prints the
median of each step:

- A: before its notify, after it (the client's send path), after its wait;
- service: each ``_on_data`` entered (after ``recv`` and the lock) and left
  (the handlers and the send of the EVENT to the peer included);
- B: each socket read done (its wait woke and the frame was decoded), after
  its wait returned (the unmask sent), after its notify.

It also counts, with ``strace -c -f`` when strace is there, the system calls
each process makes per round trip.  It asserts no timing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

try:
    import xengrant
except ImportError:  # a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import xengrant
from _machine import machine_info

TIMEOUT = 60.0
HDR = struct.Struct("<IHHI")  # length, type, flags, seq (service/protocol.py)


# ------------------------------------------------------------------ service
def _service_main(path: str, ctl: Any, spin: float | None) -> None:
    from xengrant.service.server import Server

    stamps: list[tuple[int, int, int]] = []
    orig = Server._on_data

    def on_data(self: Any, conn: Any, rbuf: memoryview, n: int) -> None:
        t = time.monotonic_ns()
        orig(self, conn, rbuf, n)
        mtype = HDR.unpack_from(rbuf, 0)[1] if n >= HDR.size else 0
        stamps.append((t, time.monotonic_ns(), mtype))

    Server._on_data = on_data  # type: ignore[method-assign]
    kw = {} if spin is None else {"spin": spin}
    srv = Server(path, 64 << 20, log=lambda s: None, **kw)
    threading.Thread(target=srv.serve_forever, kwargs={"close": False}, daemon=True).start()
    ctl.send(os.getpid())
    while True:
        cmd = ctl.recv()
        if cmd == "reset":
            stamps.clear()
            ctl.send("ok")
        elif cmd == "dump":
            ctl.send(list(stamps))
        else:
            break
    srv.stop()
    srv.close()


# --------------------------------------------------------------------- peer
def _peer_main(path: str, a_dom: int, ctl: Any, sock: socket.socket) -> None:
    from xengrant.evtport import EventPort
    from xengrant.service import connect
    from xengrant.service import protocol as p
    from xengrant.service.channel import Channel

    reads: list[int] = []
    orig = Channel._read

    def _read(self: Any, *a: Any, **k: Any) -> int:
        n: int = orig(self, *a, **k)
        reads.append(time.monotonic_ns())
        return n

    Channel._read = _read  # type: ignore[method-assign]
    with connect(path) as b:
        ctl.send(b.domid)
        port = EventPort.bind(b.evtchn, a_dom, ctl.recv())
        port.wait(TIMEOUT)  # the bind's own event
        ctl.send(os.getpid())
        while True:
            cmd = ctl.recv()
            if cmd[0] == "quit":
                break
            kind, n = cmd
            reads.clear()
            woke: list[int] = []
            sent: list[int] = []
            if kind == "api":
                for _ in range(n):
                    port.wait(TIMEOUT)
                    woke.append(time.monotonic_ns())
                    port.notify()
                    sent.append(time.monotonic_ns())
            elif kind == "socket":
                for _ in range(n):
                    sock.sendall(sock.recv(1))
            elif kind == "raw":
                b.channel.send_owed()  # an unmask the library still owes goes first
                _raw_echo(b.channel.sock, port.port, n, p)
            ctl.send((reads, woke, sent))
        port.close()


def _raw_echo(s: socket.socket, port: int, n: int, p: Any) -> None:
    """B's side by hand: read frames until an EVENT, answer UNMASK + SEND in one send."""
    out = (p.HEADER.pack(4, p.MSG_EVTCHN_UNMASK, 0, 0) + p.U32.pack(port)
           + p.HEADER.pack(4, p.MSG_EVTCHN_SEND, p.F_POSTED, 0) + p.U32.pack(port))
    buf = b""
    for _ in range(n):
        while True:
            got = _frame(s, buf)
            buf, mtype = got
            if mtype == p.MSG_EVENT:
                break
        s.sendall(out)
    # the last SEND's posted reply waits in the service for the next send: a PING
    # brings it (the library would take it for a reply to no request of its own)
    s.sendall(p.HEADER.pack(0, p.MSG_PING, 0, 0))
    while True:
        buf, mtype = _frame(s, buf)
        if mtype == p.MSG_PING:
            break


def _frame(s: socket.socket, buf: bytes) -> tuple[bytes, int]:
    while len(buf) < HDR.size:
        buf += s.recv(65536)
    length, mtype, _flags, _seq = HDR.unpack_from(buf, 0)
    while len(buf) < HDR.size + length:
        buf += s.recv(65536)
    return buf[HDR.size + length:], mtype


# ------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--service-spin", type=float, default=None,
                    help="the service's poll after a request, seconds (default: its own)")
    args = ap.parse_args(argv)
    rounds, n = (2, 300) if args.quick else (5, 2000)
    for k, v in machine_info(xengrant=xengrant.__version__).items():
        print(f"{k}: {v}")
    from xengrant.evtport import EventPort
    from xengrant.service import connect
    from xengrant.service import protocol as p

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="xg-prof-ev-")
    path = os.path.join(tmp, "s.sock")
    sctl, sctl_child = ctx.Pipe()
    svc = ctx.Process(target=_service_main, args=(path, sctl_child, args.service_spin),
                      daemon=True)
    svc.start()
    svc_pid = sctl.recv()
    sa, sb = socket.socketpair()
    res: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    try:
        with connect(path) as a:
            pctl, pctl_child = ctx.Pipe()
            peer = ctx.Process(target=_peer_main, args=(path, a.domid, pctl_child, sb),
                               daemon=True)
            peer.start()
            b_dom = pctl.recv()
            port = EventPort.offer(a.evtchn, b_dom)
            pctl.send(port.port)
            peer_pid = pctl.recv()
            raw_send = p.HEADER.pack(4, p.MSG_EVTCHN_UNMASK, 0, 0) + p.U32.pack(port.port) \
                + p.HEADER.pack(4, p.MSG_EVTCHN_SEND, p.F_POSTED, 0) + p.U32.pack(port.port)
            for r in range(rounds):
                # the baseline
                pctl.send(("socket", n))
                t = time.perf_counter_ns()
                for _ in range(n):
                    sa.send(b"x")
                    sa.recv(1)
                res.setdefault("socketpair", []).append((time.perf_counter_ns() - t) / n)
                pctl.recv()
                # the service's protocol by hand (both sides)
                pctl.send(("raw", n))
                a.channel.send_owed()
                s = a.channel.sock
                buf = b""
                t = time.perf_counter_ns()
                for _ in range(n):
                    s.sendall(raw_send)
                    while True:
                        buf, mtype = _frame(s, buf)
                        if mtype == p.MSG_EVENT:
                            break
                res.setdefault("raw protocol", []).append((time.perf_counter_ns() - t) / n)
                s.sendall(raw_send[:HDR.size + 4])  # the last event's unmask
                pctl.recv()
                # the library: EventPort.notify / wait
                sctl.send("reset")
                sctl.recv()
                pctl.send(("api", n))
                t0s, t1s, t6s = [], [], []
                t = time.perf_counter_ns()
                for _ in range(n):
                    t0s.append(time.monotonic_ns())
                    port.notify()
                    t1s.append(time.monotonic_ns())
                    port.wait(TIMEOUT)
                    t6s.append(time.monotonic_ns())
                res.setdefault("EventPort", []).append((time.perf_counter_ns() - t) / n)
                b_reads, b_woke, b_sent = pctl.recv()
                sctl.send("dump")
                svc_stamps = sctl.recv()
                _breakdown(steps, t0s, t1s, t6s, svc_stamps, b_reads, b_woke, b_sent,
                           p.MSG_EVTCHN_SEND, p.MSG_EVTCHN_UNMASK)
                print(f"round {r + 1}/{rounds}", file=sys.stderr)
            if not args.no_strace and shutil.which("strace"):
                _strace(pctl, sctl, svc_pid, peer_pid, port, n)
            pctl.send(("quit",))
            peer.join(TIMEOUT)
            port.close()
    finally:
        sctl.send("stop")
        svc.join(TIMEOUT)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nround trips (median of rounds, µs):")
    base = statistics.median(res["socketpair"]) / 1e3
    for k, xs in res.items():
        med = statistics.median(xs) / 1e3
        print(f"  {k:<14} {med:8.1f}   {med / base:4.1f}x socketpair")
    print("\none EventPort round trip, step by step (median µs; A = this process, B = peer):")
    print(f"  {'':<58} {'p10':>8} {'median':>8} {'p90':>8} {'p99':>8}")
    for k, xs in steps.items():
        q = statistics.quantiles(xs, n=100, method="inclusive")
        print(f"  {k:<58} {q[9] / 1e3:8.1f} {statistics.median(xs) / 1e3:8.1f} "
              f"{q[89] / 1e3:8.1f} {q[98] / 1e3:8.1f}")
    return 0


def _breakdown(steps: dict[str, list[float]], t0s: list[int], t1s: list[int], t6s: list[int],
               svc: list[tuple[int, int, int]], b_reads: list[int], b_woke: list[int],
               b_sent: list[int], send_t: int, unmask_t: int) -> None:
    """Line the stamps up: for each of A's round trips, the service read after A's
    send, B's first read after that, B's notify, the service's next read, A's wake."""
    import bisect

    svc.sort()
    s_in = [x[0] for x in svc]
    b_reads.sort()
    for i in range(len(t0s)):
        t0, t1, t6 = t0s[i], t1s[i], t6s[i]
        j = bisect.bisect_left(s_in, t0)  # the service's first read after A sent
        if j >= len(svc) or svc[j][0] > t6:
            continue
        s1_in, s1_out, _ = svc[j]
        k = bisect.bisect_left(b_reads, s1_in)
        if k >= len(b_reads) or b_reads[k] > t6:
            continue
        b_read = b_reads[k]
        m = bisect.bisect_left(b_woke, b_read)
        if m >= len(b_woke) or b_woke[m] > t6:
            continue
        bw, bs = b_woke[m], b_sent[m]
        j2 = bisect.bisect_left(s_in, bs)
        j2b = bisect.bisect_left(s_in, bw)  # B's unmask may get its own read
        if j2 >= len(svc) or svc[j2][0] > t6:
            continue
        s2_in, s2_out, _ = svc[j2]
        add = steps.setdefault
        add("A notify (EventPort.notify: post + sendall)", []).append(t1 - t0)
        add("A sent -> service read it (wake-up, recv, lock)", []).append(s1_in - t1)
        add("service handles SEND, sends EVENT to B", []).append(s1_out - s1_in)
        add("service sent -> B's read done (wake-up, recv, decode)", []).append(b_read - s1_out)
        add("B read -> B's wait returned (take, unmask sent)", []).append(bw - b_read)
        add("B notify (post + sendall)", []).append(bs - bw)
        add("service reads between B's wake and B's notify (unmasks)", []).append(j2 - j2b)
        add("B sent -> service read it", []).append(s2_in - bs)
        add("service handles B's SEND, sends EVENT to A", []).append(s2_out - s2_in)
        add("service sent -> A's wait returned", []).append(t6 - s2_out)
        add("whole round trip", []).append(t6 - t0)


def _strace(pctl: Any, sctl: Any, svc_pid: int, peer_pid: int, port: Any, n: int) -> None:
    """System calls per round trip of each process (strace -c -f)."""
    tmp = tempfile.mkdtemp(prefix="xg-strace-")
    procs = []
    for name, pid in (("service", svc_pid), ("peer B", peer_pid), ("this process A",
                                                                      os.getpid())):
        out = os.path.join(tmp, name.replace(" ", "_"))
        procs.append((name, out, subprocess.Popen(
            ["strace", "-c", "-f", "-q", "-o", out, "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # strace attaches (a measurement tool, not synchronisation of the test)
    pctl.send(("api", n))
    for _ in range(n):
        port.notify()
        port.wait(TIMEOUT)
    pctl.recv()
    for _, _, pr in procs:
        pr.terminate()
        pr.wait()
    print(f"\nsystem calls per EventPort round trip ({n} round trips under strace):")
    for name, out, _ in procs:
        counts: dict[str, int] = {}
        with open(out) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        total = sum(counts.values())
        print(f"  {name:<16} {total / n:5.1f}: " + ", ".join(f"{k} {v / n:.1f}" for k, v in top))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
