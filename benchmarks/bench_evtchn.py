#!/usr/bin/env python3
"""Event-channel notify -> wake latency, next to a bare socket round trip (issue 16).

Run from the repository root::

    python benchmarks/bench_evtchn.py             # full run
    python benchmarks/bench_evtchn.py --quick     # smoke run
    python benchmarks/bench_evtchn.py --markdown  # also print a Markdown table

One case is a ping-pong: this side notifies its port, the peer's ``wait``
wakes, the peer notifies back, this side's ``wait`` wakes -- two
notify->wake latencies per round trip.  Places, each with its baseline in
the same rounds (one byte echoed over a ``socket.socketpair()`` between the
same two parties):

- ``in-process``: two :class:`~xengrant.EmbeddedXen` domains of this
  process, the peer a thread (no service, no socket: a pipe per handle);
- ``processes``: two domains of a ``xengrant hypervisor`` process, the peer
  a process of its own; also with the service client's unmask sent at once
  (``evtchn, unmask at once``: how it went before the unmask rode the next
  message), in the same rounds.

Every figure is the median over interleaved rounds (each round runs the case
and its baseline); "noise" is the median absolute deviation.  The script
checks that every wake is the port it waited for and asserts no timing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

try:
    import xengrant
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    import xengrant

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine_info

TIMEOUT = 60.0


def _pingpong(ev: Any, port: int, n: int) -> float:
    """n round trips from this side; seconds each."""
    t = time.perf_counter()
    for _ in range(n):
        ev.notify(port)
        got = ev.wait(port, TIMEOUT)
        assert got == port
    return (time.perf_counter() - t) / n


def _echo_events(ev: Any, port: int, n: int) -> None:
    for _ in range(n):
        got = ev.wait(port, TIMEOUT)
        assert got == port
        ev.notify(port)


def _sock_pingpong(s: socket.socket, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        s.send(b"x")
        assert s.recv(1) == b"x"
    return (time.perf_counter() - t) / n


def _sock_echo(s: socket.socket, n: int) -> None:
    for _ in range(n):
        s.send(s.recv(1))


# ------------------------------------------------------------- in-process
def in_process(rounds: int, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"evtchn": [], "socket": []}
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        a, b = xen.create_domain(), xen.create_domain()
        pa = a.evtchn.bind_unbound_port(b.domid)
        pb = b.evtchn.bind_interdomain(a.domid, pa)
        b.evtchn.wait(pb, TIMEOUT)  # the bind's own event
        sa, sb = socket.socketpair()
        with sa, sb:
            for _ in range(rounds):
                t = threading.Thread(target=_echo_events, args=(b.evtchn, pb, n))
                t.start()
                out["evtchn"].append(_pingpong(a.evtchn, pa, n))
                t.join()
                t = threading.Thread(target=_sock_echo, args=(sb, n))
                t.start()
                out["socket"].append(_sock_pingpong(sa, n))
                t.join()
        a.evtchn.unbind(pa)
        b.evtchn.unbind(pb)
    return out


# --------------------------------------------------------------- processes
def _at_once(ev: Any, on: bool) -> None:
    """The service client's unmask sent at once (as before the unmask rode the
    next message) or owed (now); what is owed goes out first."""
    ev._at_once = on
    ev.channel.send_owed()


def processes(rounds: int, n: int) -> dict[str, list[float]]:
    from xengrant.service import connect

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from service_helpers import Service

    out: dict[str, list[float]] = {"evtchn": [], "evtchn, unmask at once": [], "socket": []}
    svc = Service()
    ctx = mp.get_context("spawn")
    try:
        with connect(svc.path) as a:
            mine, theirs = ctx.Pipe()
            sa, sb = socket.socketpair()
            # the peer's domain id is known once it connects: the port is offered then
            proc = ctx.Process(target=_peer_wrapper, args=(svc.path, a.domid, mine, theirs,
                                                           sb, rounds, n))
            proc.start()
            b_dom = mine.recv()
            pa = a.evtchn.bind_unbound_port(b_dom)
            mine.send(pa)
            assert mine.recv() == "bound"
            for _ in range(rounds):
                for case in ("evtchn", "evtchn, unmask at once", "socket"):
                    mine.send(case)
                    if case == "socket":
                        out[case].append(_sock_pingpong(sa, n))
                    else:
                        _at_once(a.evtchn, case != "evtchn")
                        out[case].append(_pingpong(a.evtchn, pa, n))
                    assert mine.recv() == "ok"
            mine.send("done")
            proc.join(TIMEOUT)
            a.evtchn.unbind(pa)
            sa.close()
            sb.close()
    finally:
        svc.stop()
    return out


def _peer_wrapper(path: str, a_dom: int, _mine: Any, conn: Any, sock: socket.socket,
                  rounds: int, n: int) -> None:
    from xengrant.service import connect

    with connect(path) as b:
        conn.send(b.domid)
        pa = conn.recv()
        pb = b.evtchn.bind_interdomain(a_dom, pa)
        b.evtchn.wait(pb, TIMEOUT)  # the bind's own event
        conn.send("bound")
        while True:
            case = conn.recv()
            if case == "done":
                break
            if case == "socket":
                _sock_echo(sock, n)
            else:
                _at_once(b.evtchn, case != "evtchn")
                _echo_events(b.evtchn, pb, n)
            conn.send("ok")


def _summary(xs: list[float]) -> tuple[float, float]:
    med = statistics.median(xs)
    return med, statistics.median(abs(x - med) for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()
    rounds, n = (3, 200) if args.quick else (7, 2000)
    for k, v in machine_info(xengrant=xengrant.__version__).items():
        print(f"{k}: {v}")
    rows = []
    for place, fn in (("in-process", in_process), ("processes", processes)):
        got = fn(rounds, n)
        base, _ = _summary(got["socket"])
        for what, xs in got.items():
            med, mad = _summary(xs)
            rows.append((place, what, med * 1e6, mad * 1e6, med / base))
            print(f"{place:10} {what:24} round trip {med * 1e6:8.1f} us "
                  f"(noise {mad * 1e6:.1f}; {med / base:.1f}x the socketpair)")
    if args.markdown:
        print("\n| place | round trip via | µs per round trip | noise | x socketpair |")
        print("|---|---|---:|---:|---:|")
        for place, what, med, mad, ratio in rows:
            label = {"evtchn": "event channel", "socket": "socketpair, 1 byte"}.get(what, what)
            print(f"| {place} | {label} | {med:.1f} | {mad:.1f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
