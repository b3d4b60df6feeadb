"""xengrant.vchan against Debian's C libxenvchan on real Xen, dom0 to dom0.

Both ends run in dom0 (domid 0 offers to itself, as libxenvchan allows):
the C side is ``vchan_c_peer`` (tests_xen/vchan_c_peer.c, linked statically
against libxenvchan by xenlab/build-payload.sh), the Python side
:class:`xengrant.Vchan` over ``/dev/xen/gntalloc``, ``gntdev``, ``evtchn``
and xenstored's socket.  64 MiB each way in random-sized chunks, checked by
CRC-32 (with 64 KiB rings; 4 MiB the other way, 256 KiB through libxenvchan's
in-page rings, which move a KiB or two per wake-up); each side serves once
and connects once; closing from either side; and the same streams and
one-byte round trips C to C next to C to Python, printed (run with ``-s``).
Skips without xenstored (the lab starts it) or without the C peer.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xengrant import Vchan
from xengrant.linux import EventChannels, open_backend, open_xenstore

HERE = Path(__file__).resolve().parent
PEER = HERE / "bin" / "vchan_c_peer"
XENSTORED = "/var/run/xenstored/socket"
#: MiB through each way with 64 KiB rings (the issue asks for at least 64)
TOTAL = int(os.environ.get("XENGRANT_VCHAN_MIB", "64")) << 20
#: the other direction of each test, and the in-page rings (1-2 KiB a wake-up under TCG)
SMALL = 4 << 20
TINY = 256 << 10
TIMEOUT = 600.0

pytestmark = pytest.mark.skipif(
    not (os.path.exists(XENSTORED) and PEER.exists()),
    reason="needs xenstored (the lab starts it) and tests_xen/bin/vchan_c_peer",
)


class Dom0:
    """What Vchan needs of a domain, on real Xen: xs, evtchn, gntshr, gnttab, domid."""

    def __init__(self) -> None:
        self.backend = open_backend()
        self.gntshr, self.gnttab = self.backend.gntshr, self.backend.gnttab
        self.evtchn = EventChannels()
        self.xs = open_xenstore()
        self.domid = 0

    def close(self) -> None:
        self.evtchn.close()
        self.backend.close()
        close = getattr(self.xs, "close", None)
        if close is not None:
            close()


@pytest.fixture
def dom0() -> Iterator[Dom0]:
    d = Dom0()
    try:
        yield d
    finally:
        d.close()


def c_peer(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([str(PEER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (out, err)
    n, crc = out.split()[-3], out.split()[-1]
    return int(n), crc


def send_random(v: Vchan, total: int, seed: int) -> str:
    rng = random.Random(seed)
    crc = 0
    sent = 0
    while sent < total:
        chunk = rng.randbytes(min(total - sent, rng.randint(1, 65536)))
        v.write(chunk, timeout=TIMEOUT)
        crc = zlib.crc32(chunk, crc)
        sent += len(chunk)
    return f"{crc:08x}"


def recv_all(v: Vchan, total: int) -> tuple[int, str]:
    crc = 0
    got = 0
    while got < total:
        data = v.read(min(1 << 20, total - got), timeout=TIMEOUT)
        if not data:
            break
        crc = zlib.crc32(data, crc)
        got += len(data)
    return got, f"{crc:08x}"


@pytest.mark.parametrize("left_min,right_min", [(65536, 65536), (1024, 2048)])
def test_c_server_python_client(dom0: Dom0, left_min: int, right_min: int) -> None:
    """libxenvchan_server_init in C, Vchan.client here: the C server streams to us,
    then (a second vchan) we stream to it."""
    big, small = (TOTAL, SMALL) if left_min > 2048 else (TINY, TINY)
    path = "/local/domain/0/data/vchan/c-server"
    proc = c_peer("server", 0, path, left_min, right_min, "send", big, 7)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    with Vchan.client(dom0, 0, path) as v:
        got = recv_all(v, big)
    assert got == finish(proc) and got[0] == big
    proc = c_peer("server", 0, path, left_min, right_min, "recv", small, 0)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    with Vchan.client(dom0, 0, path) as v:
        crc = send_random(v, small, 8)
        n, c_crc = finish(proc)  # the C server read everything before we close
    assert (n, c_crc) == (small, crc)


@pytest.mark.parametrize("left_min,right_min", [(65536, 65536), (1024, 2048)])
def test_python_server_c_client(dom0: Dom0, left_min: int, right_min: int) -> None:
    """Vchan.server here, libxenvchan_client_init in C: we stream to it, then it
    streams to us; the xenstore nodes are the ones the C client reads."""
    big, small = (TOTAL, SMALL) if left_min > 2048 else (TINY, TINY)
    path = "/local/domain/0/data/vchan/py-server"
    with Vchan.server(dom0, 0, path, left_min, right_min) as v:
        proc = c_peer("client", 0, path, "recv", big, 0)
        crc = send_random(v, big, 9)
        assert finish(proc) == (big, crc)
    with Vchan.server(dom0, 0, path, left_min, right_min) as v:
        proc = c_peer("client", 0, path, "send", small, 10)
        got = recv_all(v, small)
        assert got == finish(proc) and got[0] == small
        assert v.read(1, timeout=TIMEOUT) == b""  # the C client closed: EOF


def test_close_from_either_side(dom0: Dom0) -> None:
    """The C client goes after 1 MiB of a longer stream: our blocking write ends with
    BrokenPipeError, not a hang; a C server that goes is EOF for our client."""
    path = "/local/domain/0/data/vchan/close"
    with Vchan.server(dom0, 0, path, 65536, 65536) as v:
        proc = c_peer("client", 0, path, "recv", 1 << 20, 0)
        with pytest.raises(BrokenPipeError):
            send_random(v, 64 << 20, 11)
        assert finish(proc)[0] == 1 << 20
    proc = c_peer("server", 0, path, 65536, 65536, "send", 1 << 20, 12)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    with Vchan.client(dom0, 0, path) as v:
        n, _ = recv_all(v, 64 << 20)  # more than it sends: ends at its close
        assert n == 1 << 20 and not v.is_open()
    finish(proc)


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_figures_next_to_c(dom0: Dom0, request: pytest.FixtureRequest) -> None:
    """Not a check of speed: the figures of BENCHMARKS.md.  A C server streams
    16 MiB through 64 KiB rings to a C client and to our client, and echoes 300
    one-byte pings of a C client and of ours; two rounds, ABBA.  About a minute
    under TCG, so it runs only when asked for: ``-k figures -s``."""
    if "figures" not in (request.config.getoption("keyword") or ""):
        pytest.skip("the figures run only when asked for: -k figures -s")
    path = "/local/domain/0/data/vchan/figures"
    n, pings = 16 << 20, 300
    rows: dict[str, list[float]] = {}

    def c_stream() -> None:
        srv = c_peer("server", 0, path, 65536, 65536, "send", n, 1)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        cli = c_peer("client", 0, path, "recv", n, 0)
        assert finish(cli) == finish(srv)

    def py_stream() -> None:
        srv = c_peer("server", 0, path, 65536, 65536, "send", n, 1)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        with Vchan.client(dom0, 0, path) as v:
            got = recv_all(v, n)
        assert got == finish(srv)

    def c_ping() -> float:
        srv = c_peer("server", 0, path, 1024, 2048, "echo", pings, 0)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        cli = c_peer("client", 0, path, "ping", pings, 0)
        out, _ = cli.communicate(timeout=TIMEOUT)
        finish(srv)
        return float(out.split()[1])

    def py_ping() -> float:
        srv = c_peer("server", 0, path, 1024, 2048, "echo", pings, 0)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        with Vchan.client(dom0, 0, path) as v:
            t0 = time.perf_counter()
            for i in range(pings):
                v.send(bytes([i & 0xFF]), timeout=TIMEOUT)
                assert v.recv(1, timeout=TIMEOUT) == bytes([i & 0xFF])
            us = (time.perf_counter() - t0) / pings * 1e6
        finish(srv)
        return us

    for order in ("cp", "pc", "pc", "cp"):
        for who in order:
            if who == "c":
                rows.setdefault("stream MB/s, C client", []).append(n / _timed(c_stream) / 1e6)
                rows.setdefault("round trip us, C client", []).append(c_ping())
            else:
                rows.setdefault("stream MB/s, xengrant client", []).append(
                    n / _timed(py_stream) / 1e6)
                rows.setdefault("round trip us, xengrant client", []).append(py_ping())
    print("\nvchan on real Xen (dom0 to dom0, C libxenvchan server), medians of 4:")
    for name, xs in rows.items():
        print(f"  {name}: {statistics.median(xs):.1f}  ({', '.join(f'{x:.1f}' for x in xs)})")
