"""Run the vupper frontend and backend: in one process, or as two processes.

    python examples/split_driver/run.py               # one process (threads)
    python examples/split_driver/run.py --processes   # a process per domain

Either way a private ``xengrant hypervisor`` runs (a thread, or a process),
this process is the toolstack (dom0): it creates the two domains and writes
their device directories (``xenbus.add_device``, as libxl does); then the
frontend and backend meet through xenstore and talk through the ring.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backend import run_backend
from frontend import run_frontend
from protocol import KIND

from xengrant.service import Server, connect, serve, xenbus

TEXTS = [f"hello {i} from the frontend".encode() for i in range(100)]


def _backend_proc(path: str, domid: int, secret: bytes, frontend: int, out: Any) -> None:
    with connect(path, domid, secret=secret) as dom:
        out.send(run_backend(dom, frontend))


def _frontend_proc(path: str, domid: int, secret: bytes, backend: int, out: Any) -> None:
    with connect(path, domid, secret=secret) as dom:
        out.send(run_frontend(dom, backend, TEXTS))


def _service_proc(path: str, ready: Any) -> None:
    serve(path, 64 << 20, ready=lambda p: ready.send(p), log=lambda s: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", action="store_true", help="a process per domain")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="vupper-")
    path = os.path.join(tmp, "xengrant.sock")
    ctx = mp.get_context("spawn")
    server: Server | None = None
    svc = None
    if args.processes:
        r, w = ctx.Pipe(duplex=False)
        svc = ctx.Process(target=_service_proc, args=(path, w), daemon=True)
        svc.start()
        if not r.poll(60):
            raise RuntimeError("the service did not start")
        r.recv()
    else:
        server = Server(path, 64 << 20, log=lambda s: None)
        threading.Thread(target=server.serve_forever, kwargs={"close": False},
                         daemon=True).start()
    try:
        dom0 = connect(path, 0)
        fe, be = dom0.create_domain(), dom0.create_domain()
        xenbus.add_device(dom0.xs, KIND, 0, fe, be)
        print(f"toolstack d0: frontend d{fe}, backend d{be}, device {KIND}/0")
        if args.processes:
            results = []
            procs = []
            for target, domid, peer in ((_backend_proc, be, fe), (_frontend_proc, fe, be)):
                rx, tx = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=target,
                                   args=(path, domid, dom0.domain_secret(domid), peer, tx))
                proc.start()
                procs.append(proc)
                results.append(rx)
            served, answers = (rx.recv() if rx.poll(120) else None for rx in results)
            for proc in procs:
                proc.join(60)
        else:
            back = connect(path, be, secret=dom0.domain_secret(be))
            front = connect(path, fe, secret=dom0.domain_secret(fe))
            out: dict[str, Any] = {}
            t = threading.Thread(target=lambda: out.update(served=run_backend(back, fe)))
            t.start()
            answers = run_frontend(front, be, TEXTS)
            t.join(60)
            served = out.get("served")
            back.close()
            front.close()
        ok = answers == [t.upper() for t in TEXTS] and served == len(TEXTS)
        print(f"answers {'all upper-cased' if ok else 'WRONG'}: {answers[0]!r} ... "
              f"{answers[-1]!r}; backend served {served}" if answers else "no answers")
        dom0.close()
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
            server.close()
        if svc is not None:
            svc.terminate()
            svc.join(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
