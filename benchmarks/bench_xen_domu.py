"""Cross-domain real-Xen benchmark (run in dom0 by xenlab/run.sh): xengrant.linux vs C.

Dom0 boots one PV domU running the test agent (tests_xen/domu.py) and, in the
same run, measures each operation through xengrant.linux in dom0 and through
Debian's C libraries (benchmarks/xgbench.c, static against libxengnttab /
libxengntshr / libxenevtchn), alternating Python and C round by round:

- one-page cycle: share one page with the domU + map one of the domU's grants
  + write a byte + unmap + unshare (every grant crosses the domain boundary);
- 1024-page batch: map 1024 of the domU's grants as one contiguous range,
  touch each page, unmap;
- event-channel ping-pong: dom0 notifies, the domU answers, one round trip;
  the domU side is the agent (Python, xengrant.linux.EventChannels) against
  dom0's Python, and xgbench in the domU against xgbench in dom0.

Under QEMU TCG only the ratios mean anything.

    python3 benchmarks/bench_xen_domu.py [--rounds 3]

Prints a Markdown table (median of the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests_xen"))

import domu  # noqa: E402

from xengrant.linux import EventChannels, LinuxXenStore, open_backend  # noqa: E402

XGBENCH = os.path.join(HERE, "xgbench")


def c_run(*args: Any, timeout: float = 300.0) -> float:
    out = subprocess.run([XGBENCH, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, check=True).stdout
    return float(out.split("RESULT")[1].split()[1])


def py_cycle(b: Any, dom: int, ref: int, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        s = b.gntshr.share_pages(dom, 1)
        m = b.gnttab.map_grant_ref(dom, ref)
        m.mem[0] = 0x50
        m.unmap()
        b.gntshr.unshare(s)
    return (time.perf_counter() - t) / iters * 1e6


def py_batch(b: Any, dom: int, refs: list[int], iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        m = b.gnttab.map_domain_grant_refs(dom, refs)
        mem = m.mem
        for i in range(0, len(mem), 4096):
            mem[i] = 0x50
        m.unmap()
    return (time.perf_counter() - t) / iters * 1e6


def py_ping(ev: EventChannels, d: domu.DomU, n: int) -> float:
    port = ev.bind_unbound_port(d.domid)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=d.call("evpong", remote=0, port=port,
                                                              count=n, timeout=120.0)))
    t.start()
    ev.wait_for(port, 60.0)  # the go event (TimeoutError: the domU never bound the port)
    start = time.perf_counter()
    for _ in range(n):
        ev.notify(port)
        ev.wait_for(port, 10.0)  # TimeoutError: no pong in 10 s
    us = (time.perf_counter() - start) / n * 1e6
    t.join(60)
    ev.unbind(port)
    return us


def c_ping(d: domu.DomU, n: int) -> float:
    proc = subprocess.Popen([XGBENCH, "evping", str(d.domid), str(n)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    d.call("run_xgbench", args=["evpong", "0", str(port), str(n)], timeout=120.0)
    out, _ = proc.communicate(timeout=60)
    return float(out.split("RESULT")[1].split()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=40)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--pings", type=int, default=200)
    a = ap.parse_args()
    if not domu.available() or not os.access(XGBENCH, os.X_OK):
        print("bench_xen_domu: no xl/xenstored/domU files or xgbench; skipped")
        return 0
    xs = LinuxXenStore()
    t0 = time.monotonic()
    d = domu.create(xs, "xg-bench")
    boot = time.monotonic() - t0
    b = open_backend()
    ev = EventChannels()
    try:
        pool = d.call("share", to=0, count=1024)
        refs = pool["refs"]
        rows: dict[str, tuple[list[float], list[float]]] = {
            "one-page cycle (share to + map from the domU + unmap + unshare)": ([], []),
            "1024-page batch (map the domU's 1024 grants contiguously + unmap)": ([], []),
            "event-channel ping-pong with the domU (round trip)": ([], []),
        }
        cyc, bat, png = rows.values()
        for r in range(a.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    cyc[0].append(py_cycle(b, d.domid, refs[0], a.cycles))
                    bat[0].append(py_batch(b, d.domid, refs, a.batches))
                    png[0].append(py_ping(ev, d, a.pings))
                else:
                    cyc[1].append(c_run("cycle", d.domid, a.cycles, refs[0]))
                    bat[1].append(c_run("batch", d.domid, a.batches, *refs))
                    png[1].append(c_ping(d, a.pings))
        d.call("unshare", h=pool["h"])
        print(f"domU d{d.domid} booted in {boot:.1f} s (xl create + agent ready; "
              f"xengrant imported in {d.ready.get('import_s')} s in the domU); "
              f"{a.rounds} rounds, Python and C alternating")
        print()
        print("| cross-domain operation (us) | xengrant.linux | C (libxengnttab/libxenevtchn) "
              "| ratio |")
        print("|---|---:|---:|---:|")
        for name, (py, c) in rows.items():
            ratios = [p / q for p, q in zip(py, c)]
            print(f"| {name} | {statistics.median(py):.1f} | {statistics.median(c):.1f} | "
                  f"{statistics.median(ratios):.2f}x |")
    finally:
        ev.close()
        b.close()
        d.destroy()
        xs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
