#!/usr/bin/env python3
"""vchan throughput and one-byte round trips, next to a socketpair (issue 17).

Run from the repository root::

    python benchmarks/bench_vchan.py             # full run (~1 min)
    python benchmarks/bench_vchan.py --quick     # smoke run
    python benchmarks/bench_vchan.py --markdown  # also print a Markdown table

Three places, each with its own baseline measured in the same rounds:

- ``embedded``: two :class:`~xengrant.EmbeddedXen` domains of this process (no
  service: event channels and xenstore in process), the peer a thread; the
  baseline a ``socket.socketpair()`` between the same two threads;
- ``in-process``: a :class:`~xengrant.service.Server` in a thread of this
  process, two domains connected from this process, the peer a thread; the
  baseline a ``socket.socketpair()`` between the same two threads;
- ``processes``: a ``xengrant hypervisor`` process, the peer domain in a
  process of its own; the baseline a socketpair between this process and the
  peer's.

Cases (this process is the vchan server, the peer the client):

- ``throughput``: the peer streams ``--mbytes`` MiB in 64 KiB writes, we read
  it (``Vchan.read_into`` a 64 KiB buffer, as the socket's ``recv_into``;
  libxenvchan_read copies into the caller's buffer too); rings of 64 KiB each way
  (``left_min = right_min = 65536``: 16 granted pages each) and the
  default in-page rings (1024/2048 bytes; at most 2 MiB streamed) -- MB/s;
- ``round trip``: we send one byte, the peer echoes it (``recv(1)`` then
  ``send``), we ``recv(1)`` it -- microseconds per round trip; and ``events
  only``: the same ping-pong on a bare event channel between the two domains
  (``EventPort.notify`` then ``wait``, no vchan), the floor the vchan's round
  trip stands on (a blocked reader and writer notify each other once each);
  ``64K, spin 200us``: 64 KiB rings with ``Vchan.spin`` 200 us at both ends
  (a blocked call polls the ring that long before it asks for an event);
  ``64K, unmask at once``: 64 KiB rings with the service client's unmask
  sent at once instead of riding the next message (how it went before), in
  the same rounds (the service places only).

Every figure is the median over interleaved rounds (every round runs every
case and its baseline); "noise" is the median absolute deviation.  The
script checks the bytes (a sha256 of the stream; each echoed byte) and makes
no timing assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import statistics
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

from xengrant.evtport import EventPort
from xengrant.service import Server, connect, serve
from xengrant.vchan import Vchan

CHUNK = 64 << 10
TIMEOUT = 120.0
RINGS = {"64K rings": (65536, 65536), "in-page rings": (1024, 2048),
         "64K, spin 200us": (65536, 65536)}
#: Vchan.spin of both ends, per case (0 elsewhere: libxenvchan's way)
SPIN = {"64K, spin 200us": 200e-6}
#: the round trip of a bare event channel through the service (no vchan): the floor
EVENTS = "events only"
#: the 64K rings' round trip with the service client's unmask sent at once (as
#: before it rode the next message): the same rounds, the service places only
AT_ONCE = "64K, unmask at once"


def _at_once(dom: Any, on: bool) -> None:
    ev = dom.evtchn
    if hasattr(ev, "_at_once"):  # the service's client (EmbeddedXen has no unmask message)
        ev._at_once = on
        ev.channel.send_owed()


# ------------------------------------------------------------------ the peer
def _pattern(total: int) -> bytes:
    return (bytes(range(256)) * (CHUNK // 256 + 1))[:CHUNK] * (total // CHUNK + 1)


def _peer_loop(dom: Any, sock: socket.socket, ctl: Any) -> None:
    """Obey ``ctl``: connect to vchans, stream, echo, on vchans, the socket or a
    bare event channel."""
    vchans: dict[str, Vchan] = {}
    port: EventPort | None = None
    while True:
        cmd = ctl.recv()
        kind = cmd[0]
        if kind == "quit":
            break
        if kind == "bind":  # the events-only case: a port of our own, bound to the server's
            _, server, remote = cmd
            port = EventPort.bind(dom.evtchn, server, remote)
            with contextlib.suppress(TimeoutError):
                port.wait(TIMEOUT)  # Xen marks a freshly bound port pending
            ctl.send("ok")
            continue
        if kind == "at_once":
            _at_once(dom, cmd[1])
            ctl.send("ok")
            continue
        if kind == "echo" and cmd[1] == EVENTS:
            assert port is not None
            for _ in range(cmd[2]):
                with contextlib.suppress(TimeoutError):
                    port.wait(TIMEOUT)
                port.notify()
            ctl.send("ok")
            continue
        if kind == "connect":
            _, name, server, path = cmd
            vchans[name] = Vchan.client(dom, server, path)
            vchans[name].spin = SPIN.get(name, 0.0)
            ctl.send("ok")
        elif kind == "source":
            _, name, total = cmd
            data = memoryview(_pattern(total))
            for off in range(0, total, CHUNK):
                if name == "socket":
                    sock.sendall(data[off : off + CHUNK])
                else:
                    vchans[name].write(data[off : off + CHUNK], timeout=TIMEOUT)
            ctl.send("ok")
        elif kind == "echo":
            _, name, n = cmd
            if name == "socket":
                for _ in range(n):
                    sock.sendall(sock.recv(1))
            else:
                v = vchans[name]
                for _ in range(n):
                    v.send(v.recv(1, timeout=TIMEOUT) or b"", timeout=TIMEOUT)
            ctl.send("ok")
    for v in vchans.values():
        v.close()
    if port is not None:
        port.close()
    sock.close()
    ctl.send("ok")


def _peer_process(path: str, sock: socket.socket, ctl: Any) -> None:
    dom = connect(path)
    try:
        ctl.send(dom.domid)
        _peer_loop(dom, sock, ctl)
    finally:
        dom.close()


def _service_process(path: str, ready: Any) -> None:
    serve(path, 256 << 20, ready=lambda p: ready.send(p), log=lambda s: None)


class _ThreadPipe:
    """The ``ctl`` end of an in-process peer: two queues."""

    def __init__(self, rx: Any, tx: Any) -> None:
        self.rx, self.tx = rx, tx

    def send(self, obj: Any) -> None:
        self.tx.put(obj)

    def recv(self) -> Any:
        return self.rx.get(timeout=TIMEOUT)


# ------------------------------------------------------------------ a place
class Place:
    """This process's domain, its peer (thread or process) and a socketpair."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix="xg-bench-vchan-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        self.server: Server | None = None
        self.procs: list[Any] = []
        mine, theirs = socket.socketpair()
        self.sock = mine
        self.xen: xengrant.EmbeddedXen | None = None
        if kind in ("in-process", "embedded"):
            import queue

            if kind == "embedded":  # no service: EmbeddedXen's domains, in this process
                self.xen = xengrant.EmbeddedXen(memory=256 << 20)
                self.me: Any = self.xen.create_domain()
                self.peer_dom: Any = self.xen.create_domain()
            else:
                self.server = Server(self.path, 256 << 20, log=lambda s: None)
                threading.Thread(target=self.server.serve_forever, kwargs={"close": False},
                                 daemon=True).start()
                self.me = connect(self.path)
                self.peer_dom = connect(self.path)
            a: queue.Queue[Any] = queue.Queue()
            b: queue.Queue[Any] = queue.Queue()
            self.ctl: Any = _ThreadPipe(b, a)
            peer_ctl = _ThreadPipe(a, b)
            threading.Thread(target=_peer_loop, args=(self.peer_dom, theirs, peer_ctl),
                             daemon=True).start()
            self.peer = self.peer_dom.domid
        else:
            ctx = mp.get_context("spawn")
            r, w = ctx.Pipe(duplex=False)
            svc = ctx.Process(target=_service_process, args=(self.path, w), daemon=True)
            svc.start()
            if not r.poll(TIMEOUT):
                raise RuntimeError("the service did not start")
            r.recv()
            self.procs.append(svc)
            self.me = connect(self.path)
            self.ctl, child = ctx.Pipe()
            proc = ctx.Process(target=_peer_process, args=(self.path, theirs, child), daemon=True)
            proc.start()
            self.procs.append(proc)
            theirs.close()
            self.peer = self.ctl.recv()
        self.vchans: dict[str, Vchan] = {}
        for i, (name, (left, right)) in enumerate(RINGS.items()):
            base = f"/local/domain/{self.me.domid}/data/vchan/bench{i}"
            self.vchans[name] = Vchan.server(self.me, self.peer, base, left, right)
            self.vchans[name].spin = SPIN.get(name, 0.0)
            self._call("connect", name, self.me.domid, base)
            self._done()
            self.vchans[name].wait_connected(TIMEOUT)
        self.port = EventPort.offer(self.me.evtchn, self.peer)
        self._call("bind", self.me.domid, self.port.port)
        self._done()

    def _call(self, *cmd: Any) -> None:
        self.ctl.send(cmd)

    def _done(self) -> None:
        assert self.ctl.recv() == "ok"

    def throughput(self, name: str, total: int) -> float:
        """MB/s of ``total`` bytes streamed by the peer to us."""
        want = hashlib.sha256(_pattern(total)[:total]).digest()
        h = hashlib.sha256()
        t0 = time.perf_counter()
        self._call("source", name, total)
        got = 0
        if name == "socket":
            buf = bytearray(CHUNK)
            while got < total:
                n = self.sock.recv_into(buf, min(CHUNK, total - got))
                h.update(memoryview(buf)[:n])
                got += n
        else:  # libxenvchan_read into our buffer, as the socket's recv_into
            v = self.vchans[name]
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while got < total:
                n = v.read_into(view[: min(CHUNK, total - got)], timeout=TIMEOUT)
                assert n
                h.update(view[:n])
                got += n
        dt = time.perf_counter() - t0
        self._done()
        assert h.digest() == want, "the stream came out different"
        return total / dt / 1e6

    def round_trip(self, name: str, n: int) -> float:
        """Microseconds per one-byte round trip."""
        if name == AT_ONCE:
            self._call("at_once", True)
            self._done()
            _at_once(self.me, True)
            try:
                return self.round_trip("64K rings", n)
            finally:
                self._call("at_once", False)
                self._done()
                _at_once(self.me, False)
        self._call("echo", name, n)
        t0 = time.perf_counter()
        if name == "socket":
            for i in range(n):
                b = bytes([i & 0xFF])
                self.sock.sendall(b)
                assert self.sock.recv(1) == b
        elif name == EVENTS:
            port = self.port
            for _ in range(n):
                port.notify()
                port.wait(TIMEOUT)
        else:
            v = self.vchans[name]
            for i in range(n):
                b = bytes([i & 0xFF])
                v.send(b, timeout=TIMEOUT)
                assert v.recv(1, timeout=TIMEOUT) == b
        dt = time.perf_counter() - t0
        self._done()
        return dt / n * 1e6

    def close(self) -> None:
        for v in self.vchans.values():
            v.close()
        self.port.close()
        self._call("quit")
        self._done()
        if self.xen is not None:
            self.xen.close()
        else:
            if self.kind == "in-process":
                self.peer_dom.close()
            self.me.close()
        for proc in reversed(self.procs):
            if proc.is_alive():
                proc.terminate()
            proc.join(30)
        if self.server is not None:
            self.server.stop()
            self.server.close()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _mad(xs: list[float]) -> float:
    m = statistics.median(xs)
    return statistics.median(abs(x - m) for x in xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mbytes", type=int, default=None, help="MiB per throughput run")
    ap.add_argument("--pings", type=int, default=None, help="round trips per run")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    total = (args.mbytes or (2 if args.quick else 16)) << 20
    pings = args.pings or (200 if args.quick else 2000)
    info = machine_info(xengrant=xengrant.__version__)
    for k, v in info.items():
        print(f"{k}: {v}")
    print(f"rounds {rounds}, {total >> 20} MiB per throughput run, {pings} round trips per run")
    results: dict[tuple[str, str, str], list[float]] = {}
    places = [Place("embedded"), Place("in-process"), Place("processes")]
    try:
        for r in range(rounds):
            for place in places:
                for name in ("socket", *RINGS):
                    # in-page rings move 1-2 KiB per wake-up: a smaller stream
                    n = min(total, 2 << 20) if name == "in-page rings" else total
                    results.setdefault((place.kind, "throughput", name), []).append(
                        place.throughput(name, n))
                for name in ("socket", EVENTS, *RINGS, AT_ONCE):
                    if name == AT_ONCE and place.kind == "embedded":
                        continue
                    results.setdefault((place.kind, "round trip", name), []).append(
                        place.round_trip(name, pings))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for place in places:
            place.close()
    rows = []
    for (kind, case, name), xs in results.items():
        base = statistics.median(results[(kind, case, "socket")])
        med = statistics.median(xs)
        unit = "MB/s" if case == "throughput" else "us"
        # The ratio says how many times worse than the socketpair: slower or longer.
        ratio = base / med if case == "throughput" else med / base
        rows.append((kind, case, name, med, _mad(xs), unit, ratio))
    print(f"\n{'place':<11} {'case':<11} {'channel':<14} {'median':>10} {'noise':>8}  "
          f"{'unit':<5} {'x socketpair':>12}")
    for kind, case, name, med, mad, unit, ratio in rows:
        print(f"{kind:<11} {case:<11} {name:<14} {med:>10.1f} {mad:>8.1f}  {unit:<5} "
              f"{ratio:>11.1f}x")
    if args.markdown:
        print("\n| place | case | channel | median | noise | unit | cost vs socketpair |")
        print("|---|---|---|---:|---:|---|---:|")
        for kind, case, name, med, mad, unit, ratio in rows:
            print(f"| {kind} | {case} | {name} | {med:.1f} | {mad:.1f} | {unit} | "
                  f"{ratio:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
