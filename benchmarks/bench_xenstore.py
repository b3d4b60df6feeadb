#!/usr/bin/env python3
"""xenstore round trips: in-process, across processes, next to a bare socket round trip.

Run from the repository root::

    python benchmarks/bench_xenstore.py             # full run (~30 s)
    python benchmarks/bench_xenstore.py --quick     # smoke run
    python benchmarks/bench_xenstore.py --markdown  # also print a Markdown table

Measured, each as one call of the API a client uses:

- in this process: ``XenStore.read`` / ``write`` on the store itself, and the
  same as xs_wire bytes through a :class:`~xengrant.xenstore.session.Session`
  (``feed`` a packed request, decode the reply), and a transaction
  (TRANSACTION_START, one write, TRANSACTION_END "T": three messages);
- across processes, the service in a child process:

  - a bare Unix socket round trip to an echo thread in that process (16
    bytes each way, ``sendall`` + ``recv``): the baseline;
  - read / write / transaction from a domain process (``connect(path).xs``:
    xs_wire in MSG_XS_WIRE over the domain's connection);
  - the same through the service's xenstored socket with
    :class:`xengrant.linux.LinuxXenStore` (what libxenstore's socket
    connection does).

Each figure is the median over interleaved rounds of a timed loop's mean
(``perf_counter_ns``, GC off); "ratio" is that figure over the bare socket
round trip of the same run.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xengrant.linux.xenstore import LinuxXenStore
from xengrant.service import connect
from xengrant.xenstore import Session, XenStore
from xengrant.xenstore import wire as w


def _service_main(path: str, xs_path: str, echo_path: str, ready: mp.synchronize.Event) -> None:
    from xengrant.service.server import Server

    srv = Server(path, 64 << 20, xenstored_path=xs_path, token_file=False, log=lambda s: None)
    echo = socket.socket(socket.AF_UNIX)
    echo.bind(echo_path)
    echo.listen(1)

    def serve_echo() -> None:
        conn, _ = echo.accept()
        while True:
            data = conn.recv(64)
            if not data:
                return
            conn.sendall(data)

    threading.Thread(target=serve_echo, daemon=True).start()
    ready.set()
    srv.serve_forever()


def timed(fn: Callable[[], object], loops: int) -> float:
    """Mean ns per call over ``loops`` calls, GC off."""
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        return (time.perf_counter_ns() - t0) / loops
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, short loops")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()
    rounds, loops = (3, 200) if args.quick else (7, 2000)

    d = tempfile.mkdtemp(prefix="xgbench-xs-")
    path, xs_path, echo_path = (os.path.join(d, n) for n in ("sock", "xenstored", "echo"))
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_service_main, args=(path, xs_path, echo_path, ready), daemon=True)
    proc.start()
    if not ready.wait(60):
        raise SystemExit("the service did not start")

    # in this process
    store = XenStore()
    store.make_domain_home(1)
    sess = Session(store, 1)
    store.write(1, "data/k", b"value")
    req_read = w.pack(w.XS_READ, 1, 0, b"data/k\0")
    req_write = w.pack(w.XS_WRITE, 1, 0, b"data/k\0value")
    dec = w.Decoder()

    def sess_call(data: bytes) -> w.Message:
        return dec.feed(sess.feed(data))[0]

    def sess_tx() -> None:
        tx = int(sess_call(w.pack(w.XS_TRANSACTION_START, 1, 0, b"\0")).payload[:-1])
        sess_call(w.pack(w.XS_WRITE, 2, tx, b"data/k\0value"))
        sess_call(w.pack(w.XS_TRANSACTION_END, 3, tx, b"T\0"))

    # across processes
    bare = socket.socket(socket.AF_UNIX)
    bare.connect(echo_path)
    ping = b"x" * 16

    def bare_rt() -> None:
        bare.sendall(ping)
        got = 0
        while got < 16:
            got += len(bare.recv(64))

    dom = connect(path)
    dom.xs.write("data/k", "value")

    def dom_tx() -> None:
        tx = int(dom.xs.call(w.XS_TRANSACTION_START, b"\0")[:-1])
        dom.xs.write("data/k", "value", tx=tx)
        dom.xs.call(w.XS_TRANSACTION_END, b"T\0", tx=tx)

    lxs = LinuxXenStore(xs_path)
    lxs.write("/bench/k", "value")

    def lxs_tx() -> None:
        tx = int(lxs._call(w.XS_TRANSACTION_START, b"\0")[:-1])
        lxs._call(w.XS_WRITE, b"/bench/k\0value", tx=tx)
        lxs._call(w.XS_TRANSACTION_END, b"T\0", tx=tx)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("bare unix socket round trip (baseline)", bare_rt),
        ("in-process store: read", lambda: store.read(1, "data/k")),
        ("in-process store: write", lambda: store.write(1, "data/k", b"value")),
        ("in-process session (xs_wire bytes): read", lambda: sess_call(req_read)),
        ("in-process session (xs_wire bytes): write", lambda: sess_call(req_write)),
        ("in-process session: transaction (start, write, end)", sess_tx),
        ("domain process -> service: read", lambda: dom.xs.read("data/k")),
        ("domain process -> service: write", lambda: dom.xs.write("data/k", "value")),
        ("domain process -> service: transaction", dom_tx),
        ("xenstored socket (LinuxXenStore): read", lambda: lxs.read("/bench/k")),
        ("xenstored socket (LinuxXenStore): write", lambda: lxs.write("/bench/k", "value")),
        ("xenstored socket (LinuxXenStore): transaction", lxs_tx),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, fn in cases:
            n = loops if "in-process" in name else max(loops // 4, 50)
            timed(fn, max(n // 10, 5))  # warm up
            results[name].append(timed(fn, n))
    base = statistics.median(results[cases[0][0]])
    print(f"xenstore round trips, {rounds} rounds (median of per-round means; "
          f"ratio: over the bare socket round trip of {base / 1000:.1f} us)")
    rows = []
    for name, _ in cases:
        vals = results[name]
        med = statistics.median(vals)
        noise = statistics.median(abs(v - med) for v in vals)
        rows.append((name, med / 1000, noise / 1000, med / base))
        print(f"  {name:<55} {med / 1000:9.2f} us  +-{noise / 1000:6.2f}  x{med / base:6.2f}")
    if args.markdown:
        print("\n| case | median (us) | noise (us) | / bare socket |\n|---|---:|---:|---:|")
        for name, med, noise, ratio in rows:
            print(f"| {name} | {med:.2f} | {noise:.2f} | {ratio:.2f} |")
    lxs.close()
    dom.close()
    bare.close()
    proc.terminate()
    proc.join(30)


if __name__ == "__main__":
    main()
