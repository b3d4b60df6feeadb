"""A bystander's one-page maps while a domain holding N mappings is torn down.

In-process service (``Server`` in a thread); domain ``b`` maps N grants of ``a``,
then leaves; meanwhile ``c`` maps and unmaps one page of ``a`` in a loop.  Printed
for each teardown chunk size (``Limits.preempt_teardown``; a huge one is no
preemption at all, the same-run baseline): the teardown's time, its preemption
points and the handoffs of the service lock to a waiter at them, and the
bystander's map latencies during it.

    .venv/bin/python benchmarks/bench_teardown_fairness.py [N] [budget,budget,...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import warnings

from xengrant.service import Server, connect
from xengrant.service.limits import Limits


def run(n: int, budget: int) -> None:
    """One teardown of ``n`` mappings with chunks of ``budget``; prints one line."""
    d = tempfile.mkdtemp()
    path = os.path.join(d, "s.sock")
    srv = Server(path, 512 << 20, log=lambda s: None,
                 limits=Limits(max_pages=100000, preempt_teardown=budget))
    t = threading.Thread(target=srv.serve_forever, kwargs={"close": False}, daemon=True)
    t.start()
    a, c, b = (connect(path, timeout=60) for _ in range(3))
    share = a.grant_table.share_pages(b.domid, n)
    refs = list(share.refs)
    maps = [b.gnttab.map_domain_grant_refs(a.domid, refs[i : i + 4096])
            for i in range(0, n, 4096)]
    small = a.grant_table.share_pages(c.domid, 1)
    lat: list[float] = []
    stop = threading.Event()

    def bystander() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with c.gnttab.map_grant_ref(a.domid, small.refs[0]) as m:
                m.mem[0]
            lat.append(time.perf_counter() - t0)

    th = threading.Thread(target=bystander)
    th.start()
    while len(lat) < 100:  # the bystander is under way
        time.sleep(0.001)
    n0 = len(lat)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # b leaves holding its mappings
        warnings.simplefilter("ignore")
        b.close()
        del maps
    td = time.perf_counter() - t0
    during = sorted(lat[n0:])
    stop.set()
    th.join()
    yields = srv.counters["teardown_yields"]
    handoffs = srv.counters["preempt_handoffs"]
    srv.stop()
    t.join()
    srv.close()
    worst = during[-1] * 1e3 if during else float("nan")
    median = during[len(during) // 2] * 1e3 if during else float("nan")
    print(f"chunk {budget}: teardown of {n} mappings {td * 1e3:.0f} ms, {yields} preemption "
          f"points, {handoffs} handoffs; "
          f"bystander maps during it: {len(during)}, worst {worst:.2f} ms, "
          f"median {median:.3f} ms", flush=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    budgets = sys.argv[2] if len(sys.argv) > 2 else "1000000000,4096,256"
    for budget in (int(x) for x in budgets.split(",")):
        run(n, budget)


if __name__ == "__main__":
    main()
