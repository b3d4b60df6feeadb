"""The examples on real Xen: examples/real_xen.py in dom0, and examples/split_driver across domains.

The split driver's two halves run unchanged: the backend (``run_backend``) in a
thread of dom0's pytest, on dom0's real gntdev, /dev/xen/evtchn and xenstored's
socket; the frontend (``run_frontend``) in a PV domU (the agent imports it from
/opt/split_driver, built in by xenlab/build-domu.sh), on the domU's gntalloc,
evtchn and /dev/xen/xenbus.  This test plays the toolstack: it writes the
device's two directories as libxl does (``xenbus.add_device``), then the halves
meet through the real xenstored (the XenBus state handshake), share a two-page
ring and an event channel, and 100 requests and answers go through.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from domu import DomU
from test_vchan_xen import Dom0

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TEXTS = [f"hello {i} from the frontend in a domU" for i in range(100)]


def test_real_xen_example_runs_in_dom0() -> None:
    """examples/real_xen.py --require: dom0 shares 4 pages with itself and maps them."""
    r = subprocess.run([sys.executable, str(EXAMPLES / "real_xen.py"), "--require"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "shared 4 pages with itself, mapped, wrote and read: ok" in r.stdout


def test_split_driver_frontend_in_a_domu_backend_in_dom0(
    dom0_xs: Any, agents_clean: tuple[DomU, DomU]
) -> None:
    """examples/split_driver across domains: the domU's frontend, dom0's backend."""
    sys.path.insert(0, str(EXAMPLES / "split_driver"))
    try:
        from backend import run_backend
        from protocol import KIND
    finally:
        sys.path.remove(str(EXAMPLES / "split_driver"))
    from xengrant.service import xenbus

    a = agents_clean[0]
    fe, be = xenbus.add_device(dom0_xs, KIND, 0, a.domid, 0)
    out: dict[str, Any] = {}
    logs: list[str] = []

    def backend() -> None:
        d = Dom0()
        try:
            out["served"] = run_backend(d, a.domid, log=logs.append)
        except BaseException as e:  # the main thread reports it
            out["error"] = e
        finally:
            d.close()

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    try:
        answers = a.call("split_frontend", backend=0, texts=TEXTS, wait=180.0)
    finally:
        t.join(120.0)
        for node in (fe, be):
            with contextlib.suppress(OSError):
                dom0_xs.rm(node)
    assert not t.is_alive(), "the backend did not finish"
    assert "error" not in out, out
    assert answers == [x.upper() for x in TEXTS]
    assert out["served"] == len(TEXTS)
    assert any("mapped 2 ring page(s)" in line for line in logs), logs
    # the backend said Closed last, through the real xenstored
    assert logs[-1].endswith("unmapped, Closed"), logs

