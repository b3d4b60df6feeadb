"""The other end of a vchan in its own process (tests and benchmarks spawn it).

Everything is driven over a pipe: the peer connects to the service, reports
its domid, then runs one command and reports the result.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from xengrant.service import connect
from xengrant.vchan import Vchan


def peer_main(path: str, conn: Any) -> None:
    """Connect, send our domid, then obey: ("client", server_domid, xs_path, job)
    or ("server", client_domid, xs_path, left_min, right_min, job)."""
    dom = connect(path)
    try:
        conn.send(dom.domid)
        cmd = conn.recv()
        if cmd[0] == "client":
            _, peer, xs_path, job = cmd
            v = Vchan.client(dom, peer, xs_path)
        else:
            _, peer, xs_path, left_min, right_min, job = cmd
            v = Vchan.server(dom, peer, xs_path, left_min, right_min)
            conn.send("offered")
            v.wait_connected(60)
        with v:
            conn.send(run_job(v, job))
            conn.recv()  # hold the vchan open until told
    finally:
        dom.close()


def run_job(v: Vchan, job: tuple[Any, ...]) -> Any:
    """``("echo",)``: echo until EOF; ``("pingpong", n)``: answer n one-byte
    pings; ``("send", total, seed)``: stream ``total`` random-sized chunks
    and return the sha256; ``("recv",)``: read to EOF (``("recv", n)``: n
    bytes), return (bytes, sha256)."""
    kind = job[0]
    if kind == "echo":
        n = 0
        while True:
            data = v.read(65536, timeout=60)
            if not data:
                return n
            v.write(data, timeout=60)
            n += len(data)
    if kind == "pingpong":
        for _ in range(job[1]):
            b = v.recv(1, timeout=60)
            v.send(b or b"", timeout=60)
        return job[1]
    if kind == "send":
        total, seed = job[1], job[2]
        rng = random.Random(seed)
        h = hashlib.sha256()
        sent = 0
        while sent < total:
            chunk = rng.randbytes(min(total - sent, rng.randint(1, 100_000)))
            v.write(chunk, timeout=60)
            h.update(chunk)
            sent += len(chunk)
        return h.hexdigest()
    if kind == "recv":
        limit = job[1] if len(job) > 1 else None
        h = hashlib.sha256()
        n = 0
        while limit is None or n < limit:
            data = v.read(1 << 20 if limit is None else min(1 << 20, limit - n), timeout=60)
            if not data:
                break
            h.update(data)
            n += len(data)
        return n, h.hexdigest()
    raise ValueError(kind)
