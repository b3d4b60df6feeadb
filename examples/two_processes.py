"""Two domains in two processes over `xengrant hypervisor`: one shares a page, the other maps it,
writes, and the first reads it -- the same frames, no copy, across processes.

Run: python examples/two_processes.py
It starts a private service on a socket in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection

from xengrant.service import connect


def frontend(path: str, domid: int, secret: bytes, backend: int, pipe: Connection) -> None:
    with connect(path, domid, secret=secret) as d, d.gntshr.share_pages(backend, 1) as share:
        pipe.send(share.refs[0])  # in a real driver: through xenstore
        assert pipe.recv() == "written"
        assert bytes(share.mem[:5]) == b"hello"
        pipe.send("read")
        assert pipe.recv() == "unmapped"  # then the share ends at once


def backend(path: str, domid: int, secret: bytes, frontend: int, pipe: Connection) -> None:
    with connect(path, domid, secret=secret) as d:
        ref = pipe.recv()
        with d.gnttab.map_grant_ref(frontend, ref) as m:
            m.mem[:5] = b"hello"
            pipe.send("written")
            assert pipe.recv() == "read"
        pipe.send("unmapped")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xengrant-example-") as tmp:
        path = os.path.join(tmp, "xengrant.sock")
        r, w = os.pipe()
        svc = subprocess.Popen(
            [sys.executable, "-m", "xengrant", "hypervisor", "--socket", path, "--memory", "64",
             "--quiet", "--ready-fd", str(w)],
            pass_fds=(w,),
        )
        os.close(w)
        try:
            with os.fdopen(r) as ready:
                assert ready.readline().strip() == path, "the service did not start"
            ctx = mp.get_context("spawn")
            with connect(path, 0) as dom0:  # the toolstack: creates the two domains
                fe, be = dom0.create_domain(), dom0.create_domain()
                a, b = ctx.Pipe()
                procs = [
                    ctx.Process(target=frontend, args=(path, fe, dom0.domain_secret(fe), be, a)),
                    ctx.Process(target=backend, args=(path, be, dom0.domain_secret(be), fe, b)),
                ]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join(60)
                codes = [p.exitcode for p in procs]
                a.close()
                b.close()
        finally:
            svc.terminate()
            svc.wait(60)
    print(f"two processes: exit codes {codes}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
