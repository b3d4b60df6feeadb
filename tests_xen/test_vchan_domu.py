"""xengrant.vchan against Debian's C libxenvchan on real Xen, across domains (dom0 <-> a PV domU).

Every pairing of server and client, each in the other domain:

- the C server in dom0, xengrant's client in the domU (the agent, tests_xen/domu_agent.py);
- xengrant's server in the domU, the C client in dom0;
- xengrant's server in dom0, the C client in the domU (``/opt/vchan_c_peer``: the same
  static program as dom0's, reaching xenstore through ``/dev/xen/xenbus``);
- the C server in the domU, xengrant's client in dom0.

Each moves bytes each way -- 64 MiB (:data:`TOTAL`) between the C server in dom0 and
xengrant's client in the domU, 8 MiB (:data:`OTHER`) in the other pairings, under TCG;
``XENGRANT_VCHAN_MIB`` sets both -- in random chunks of 1..65536 bytes, checked by CRC-32
computed on both sides, through 64 KiB rings (libxenvchan's multi-page rings, granted
across domains); and closing from either side: a client in the other domain that goes
mid-stream ends our blocking write with BrokenPipeError, a server that goes is EOF for the
client, never a hang.
The C side is tests_xen/vchan_c_peer.c (see test_vchan_xen.py, its dom0-to-dom0 twin).
The domU is this module's own, destroyed at its end.

These streams once broke now and then (a wrong CRC, a stall, the agent's SIGSEGV) in C and
Python alike: Xen's lazy FPU switching under QEMU's TCG leaked vector registers between
domains mid-``memcpy``; the lab boots Xen with ``spec-ctrl=eager-fpu`` (test_fpu_xen.py,
docs/real-xen.md).  :func:`test_vchan_stress_across_domains` (``XENGRANT_VCHAN_STRESS=N``
rounds) runs many vchans in every pairing, C to C as the control, with bytes that say their
own offset, and reports every wrong run of bytes with what was read instead.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import domu
import domu_agent
import pytest
from domu import DomU
from test_vchan_xen import PEER, XENSTORED, Dom0, c_peer, finish, recv_all, send_random

from xengrant import Vchan

#: bytes each way between the C server in dom0 and xengrant's client in the domU (the issue
#: asks for at least 64 MiB; ~40 s a direction under TCG on a loaded host)
TOTAL = int(os.environ.get("XENGRANT_VCHAN_MIB", "64")) << 20
#: bytes each way in the other pairings (XENGRANT_VCHAN_MIB sets them too)
OTHER = int(os.environ.get("XENGRANT_VCHAN_MIB", "8")) << 20
#: seconds for one stream (TCG moves a few MB/s through a vchan across domains)
TIMEOUT = 300.0
RING = 65536

pytestmark = [
    pytest.mark.skipif(
        not (os.path.exists(XENSTORED) and PEER.exists()),
        reason="needs xenstored (the lab starts it) and tests_xen/bin/vchan_c_peer",
    ),
]


@pytest.fixture
def dom0() -> Any:
    d = Dom0()
    try:
        yield d
    finally:
        d.close()


class _Holder:
    """The module's domU, booted again when a test left it dead."""

    def __init__(self, xs: Any) -> None:
        self.xs, self.d, self.boots = xs, None, 0

    def get(self) -> DomU:
        if self.d is None or self.d.destroyed or not self.d.exists():
            if self.d is not None:
                self.d.destroy()
            self.boots += 1
            self.d = domu.create(self.xs, f"xg-vchan{self.boots}")
        return self.d


@pytest.fixture(scope="module")
def vchan_domus(dom0_xs: Any) -> Any:
    """This module's domU (not the session's: a vchan gone wrong cannot touch those); a
    test that left it dead gets a new one for the next (see docs/real-xen.md: a domU's
    agent died of SIGSEGV in a vchan after an earlier one of 64 MiB)."""
    h = _Holder(dom0_xs)
    try:
        yield h
    finally:
        if h.d is not None:
            h.d.destroy()
            assert domu.wait_gone(h.d.domid, 60.0), domu.xl("list")


@pytest.fixture
def agent(vchan_domus: _Holder) -> Any:
    """The module's domU; after the test it holds no vchan, C peer, share, mapping or port."""
    d = vchan_domus.get()
    yield d
    state = d.call("state")
    for h in state["handles"]:  # a vchan's close unbinds its port too
        d.call("close", h=h)
    for port in d.call("state")["ports"]:
        d.call("unbind", port=port)
    assert state["handles"] == [] and state["live_maps"] == 0, state
    assert state["ports"] == [], state


def _c_result(res: dict[str, Any]) -> tuple[int, str]:
    """``(bytes, crc)`` of a C peer that ran in the domU (its ``bytes N crc HEX`` line)."""
    assert res["rc"] == 0, res
    words = res["out"].split()
    return int(words[-3]), words[-1]


@pytest.mark.timeout(900)  # 64 MiB each way at 2-3 MB/s under TCG
def test_c_server_in_dom0_xengrant_client_in_domu(dom0: Dom0, agent: DomU) -> None:
    """libxenvchan_server_init in dom0 for the domU; Vchan.client in the domU reads
    TOTAL from it, then (a second vchan) writes TOTAL to it."""
    path = f"/local/domain/0/data/vchan/to-d{agent.domid}"
    proc = c_peer("server", agent.domid, path, RING, RING, "send", TOTAL, 21)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    h = agent.call("vchan_client", peer=0, path=path)
    got = agent.call("vchan_recv", h=h, total=TOTAL, timeout=TIMEOUT)
    agent.call("close", h=h)
    assert (got["bytes"], got["crc"]) == finish(proc) and got["bytes"] == TOTAL

    proc = c_peer("server", agent.domid, path, RING, RING, "recv", TOTAL, 0)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    h = agent.call("vchan_client", peer=0, path=path)
    sent = agent.call("vchan_send", h=h, total=TOTAL, seed=22, timeout=TIMEOUT)
    n, crc = finish(proc)  # the C server read everything before the domU closes
    agent.call("close", h=h)
    assert sent["error"] is None and (n, crc) == (TOTAL, sent["crc"])


def test_xengrant_server_in_domu_c_client_in_dom0(dom0: Dom0, agent: DomU) -> None:
    """Vchan.server in the domU (its xenstore nodes under its own home, readable by dom0);
    libxenvchan_client_init in dom0 reads OTHER from it, then writes OTHER to it."""
    path = f"/local/domain/{agent.domid}/data/vchan/to-d0"
    h = agent.call("vchan_server", peer=0, path=path, left_min=RING, right_min=RING)
    proc = c_peer("client", agent.domid, path, "recv", OTHER, 0)
    sent = agent.call("vchan_send", h=h, total=OTHER, seed=23, timeout=TIMEOUT)
    assert sent["error"] is None and finish(proc) == (OTHER, sent["crc"])
    agent.call("close", h=h)

    h = agent.call("vchan_server", peer=0, path=path, left_min=RING, right_min=RING)
    proc = c_peer("client", agent.domid, path, "send", OTHER, 24)
    got = agent.call("vchan_recv", h=h, total=OTHER, timeout=TIMEOUT)
    assert (got["bytes"], got["crc"]) == finish(proc) and got["bytes"] == OTHER
    tail = agent.call("vchan_recv", h=h, total=1, timeout=30.0)  # the C client closed: EOF
    assert tail["bytes"] == 0 and not tail["open"]
    agent.call("close", h=h)


def test_xengrant_server_in_dom0_c_client_in_domu(dom0: Dom0, agent: DomU) -> None:
    """Vchan.server in dom0 for the domU; libxenvchan_client_init in the domU (the static
    C peer there) reads OTHER from it, then writes OTHER to it."""
    path = f"/local/domain/0/data/vchan/py-to-d{agent.domid}"
    with Vchan.server(dom0, agent.domid, path, RING, RING) as v:
        h = agent.call("vchan_c_peer", args=["client", 0, path, "recv", OTHER, 0])
        crc = send_random(v, OTHER, 25)
        res = agent.call("c_peer_finish", h=h, timeout=TIMEOUT)
        assert _c_result(res) == (OTHER, crc)
    with Vchan.server(dom0, agent.domid, path, RING, RING) as v:
        h = agent.call("vchan_c_peer", args=["client", 0, path, "send", OTHER, 26])
        got = recv_all(v, OTHER)
        res = agent.call("c_peer_finish", h=h, timeout=TIMEOUT)
        assert got == _c_result(res) and got[0] == OTHER
        assert v.read(1, timeout=30.0) == b""  # the C client closed: EOF


def test_c_server_in_domu_xengrant_client_in_dom0(dom0: Dom0, agent: DomU) -> None:
    """libxenvchan_server_init in the domU (nodes under its home); Vchan.client in dom0
    reads OTHER from it, then writes OTHER to it."""
    path = f"/local/domain/{agent.domid}/data/vchan/c-to-d0"
    h = agent.call("vchan_c_peer", args=["server", 0, path, RING, RING, "send", OTHER, 27],
                   ready=True)
    with Vchan.client(dom0, agent.domid, path) as v:
        got = recv_all(v, OTHER)
    res = agent.call("c_peer_finish", h=h, timeout=TIMEOUT)
    assert got == _c_result(res) and got[0] == OTHER

    h = agent.call("vchan_c_peer", args=["server", 0, path, RING, RING, "recv", OTHER, 0],
                   ready=True)
    with Vchan.client(dom0, agent.domid, path) as v:
        crc = send_random(v, OTHER, 28)
        res = agent.call("c_peer_finish", h=h, timeout=TIMEOUT)
    assert _c_result(res) == (OTHER, crc)


def test_close_from_either_side_across_domains(dom0: Dom0, agent: DomU) -> None:
    """A C client in the domU goes after 1 MiB of a longer stream: dom0's blocking write
    ends with BrokenPipeError.  A C server in dom0 goes after 1 MiB: the domU's client
    reads to EOF and sees it closed.  A C client in dom0 goes: the domU server's write
    ends with BrokenPipeError.  The domU's xengrant client goes: the C server in dom0
    reads what was sent, then EOF (exit 1: fewer bytes than it asked for)."""
    mib = 1 << 20
    path = f"/local/domain/0/data/vchan/close-d{agent.domid}"
    with Vchan.server(dom0, agent.domid, path, RING, RING) as v:
        h = agent.call("vchan_c_peer", args=["client", 0, path, "recv", mib, 0])
        with pytest.raises(BrokenPipeError):
            send_random(v, 64 * mib, 31)
        assert _c_result(agent.call("c_peer_finish", h=h, timeout=TIMEOUT))[0] == mib

    proc = c_peer("server", agent.domid, path, RING, RING, "send", mib, 32)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    h = agent.call("vchan_client", peer=0, path=path)
    got = agent.call("vchan_recv", h=h, total=64 * mib, timeout=TIMEOUT)
    agent.call("close", h=h)
    assert got["bytes"] == mib and not got["open"]
    assert finish(proc)[0] == mib

    upath = f"/local/domain/{agent.domid}/data/vchan/close"
    h = agent.call("vchan_server", peer=0, path=upath, left_min=RING, right_min=RING)
    proc = c_peer("client", agent.domid, upath, "recv", mib, 0)
    sent = agent.call("vchan_send", h=h, total=64 * mib, seed=33, timeout=TIMEOUT)
    agent.call("close", h=h)
    # "bytes" counts whole chunks: the one the close broke (<= 64 KiB) may have begun before
    # the C client's last byte, so what went can be a little under the 1 MiB it read
    assert sent["error"] == "BrokenPipeError" and mib - 65536 < sent["bytes"] < 64 * mib
    assert finish(proc)[0] == mib

    proc = c_peer("server", agent.domid, path, RING, RING, "recv", 64 * mib, 0)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    h = agent.call("vchan_client", peer=0, path=path)
    sent = agent.call("vchan_send", h=h, total=mib, seed=34, timeout=TIMEOUT)
    agent.call("close", h=h)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, (out, err)  # fewer bytes than asked: the peer closed
    assert sent["error"] is None and out.split()[-3:] == [str(mib), "crc", sent["crc"]]


# ------------------------------------------------------------------ stress (opt-in)
#: rounds of :func:`test_vchan_stress_across_domains` (0: skipped); XENGRANT_VCHAN_STRESS
STRESS = int(os.environ.get("XENGRANT_VCHAN_STRESS", "0"))


def _send_pattern(v: Vchan, total: int, tag: int, seed: int) -> int:
    import random

    rng, sent = random.Random(seed), 0
    while sent < total:
        n = min(total - sent, rng.randint(1, 65536))
        v.write(domu_agent.pattern(sent, n, tag), timeout=TIMEOUT)
        sent += n
    return sent


def _recv_pattern(v: Vchan, total: int, tag: int) -> dict[str, Any]:
    check, got = domu_agent.PatternCheck(tag), 0
    while got < total:
        data = v.read(min(1 << 20, total - got), timeout=TIMEOUT)
        if not data:
            break
        check.feed(data)
        got += len(data)
    return {"bytes": got, **check.result()}


def _c_diag(out: str) -> dict[str, Any]:
    """A C peer's precv output as ``{"bytes", "bad", "runs"}``."""
    runs, bad, n = [], 0, 0
    for line in out.splitlines():
        w = line.split()
        if w[:1] == ["run"]:
            runs.append([int(w[1]), int(w[2]), w[4], w[5]])
        elif w[:2] == ["diag", "bad"]:
            bad = int(w[2])
        elif w[:1] == ["bytes"]:
            n = int(w[1])
    return {"bytes": n, "bad": bad, "runs": runs}


class _Stress:
    """One round's pairings, each bounded: a stream that goes wrong or stalls is recorded
    with what both processes' grant mappings hold (their /proc/PID/mem), and the round goes
    on with the next pairing."""

    def __init__(self, dom0: Dom0, agent: DomU, size: int, rnd: int) -> None:
        self.dom0, self.agent, self.size, self.rnd = dom0, agent, size, rnd
        self.bound = 60.0 + size / 100e3  # a stream moves >= 0.3 MB/s even under load
        self.res: dict[str, Any] = {}
        self.procs: list[Any] = []  # dom0's C peers of the pairing running
        self.uh: list[int] = []  # the agent's handles of the pairing

    def tag(self, k: int) -> int:
        return (self.rnd * 16 + k) & 0xFFFF

    def c0(self, *args: Any) -> Any:
        proc = c_peer(*args)
        self.procs.append(proc)
        if args[0] == "server":
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def call(self, op: str, **args: Any) -> Any:
        got = self.agent.call(op, **args)
        if op in ("vchan_client", "vchan_server", "vchan_c_peer"):
            self.uh.append(got)
        return got

    def c0_out(self, proc: Any) -> str:
        out, _ = proc.communicate(timeout=self.bound)
        return str(out)

    def cu_out(self, h: int) -> str:
        res = self.agent.call("c_peer_poll", h=h, timeout=self.bound)
        if res is None:
            raise TimeoutError(f"the domU's C peer {h} still runs after {self.bound} s")
        self.uh.remove(h)
        return str(res["out"])

    def run(self, name: str, fn: Any) -> None:
        try:
            self.res[name] = fn(self)
        except Exception as e:  # a stall or a dead peer: what each side's pages hold
            info: dict[str, Any] = {"bad": -1, "bytes": -1, "error": repr(e)[:300]}
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(Exception):
                        info[f"dom0 pid {proc.pid}"] = domu_agent.peek_grant_maps(proc.pid)
            for h in self.uh:
                with contextlib.suppress(Exception):
                    info[f"domU h{h}"] = self.agent.call("peek", h=h)
            with contextlib.suppress(Exception):
                info["domU agent"] = self.agent.call("peek")
            self.res[name] = info
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(Exception):
                    proc.communicate(timeout=30)
            for h in self.uh:
                with contextlib.suppress(Exception):
                    self.agent.call("close", h=h)
            self.procs, self.uh = [], []


@pytest.mark.skipif(STRESS <= 0, reason="XENGRANT_VCHAN_STRESS=N rounds (a diagnosis aid)")
@pytest.mark.timeout(3000)
def test_vchan_stress_across_domains(dom0: Dom0, agent: DomU) -> None:
    """Many vchans of several sizes in every pairing, C to C across domains as the control,
    the bytes saying their own offset: every wrong byte is reported with what was read,
    every stall with what each side's grant mappings hold."""
    sizes = [256 << 10, 1 << 20, 4 << 20]
    bad: list[Any] = []
    d0 = f"/local/domain/0/data/vchan/st-d{agent.domid}"
    du = f"/local/domain/{agent.domid}/data/vchan/st"
    for rnd in range(STRESS):
        size = sizes[rnd % len(sizes)]
        s = _Stress(dom0, agent, size, rnd)

        def a_c0_pyu(s: _Stress) -> Any:  # C server in dom0 sends, the domU's client reads
            proc = s.c0("server", agent.domid, d0, RING, RING, "psend", s.size, s.tag(1))
            h = s.call("vchan_client", peer=0, path=d0)
            got = agent.call("vchan_recv", h=h, total=s.size, timeout=s.bound, pat=s.tag(1))
            s.c0_out(proc)
            return got

        def b_pyu_c0(s: _Stress) -> Any:  # the domU's client sends, C server in dom0 reads
            proc = s.c0("server", agent.domid, d0, RING, RING, "precv", s.size, s.tag(2))
            h = s.call("vchan_client", peer=0, path=d0)
            agent.call("vchan_send", h=h, total=s.size, seed=s.tag(2), timeout=s.bound, pat=True)
            return _c_diag(s.c0_out(proc))

        def c_pyus_c0(s: _Stress) -> Any:  # the domU's server sends, C client in dom0 reads
            h = s.call("vchan_server", peer=0, path=du, left_min=RING, right_min=RING)
            proc = s.c0("client", agent.domid, du, "precv", s.size, s.tag(3))
            agent.call("vchan_send", h=h, total=s.size, seed=s.tag(3), timeout=s.bound, pat=True)
            return _c_diag(s.c0_out(proc))

        def d_c0_pyus(s: _Stress) -> Any:  # C client in dom0 sends, the domU's server reads
            h = s.call("vchan_server", peer=0, path=du, left_min=RING, right_min=RING)
            proc = s.c0("client", agent.domid, du, "psend", s.size, s.tag(4))
            got = agent.call("vchan_recv", h=h, total=s.size, timeout=s.bound, pat=s.tag(4))
            s.c0_out(proc)
            return got

        def e_py0_cu(s: _Stress) -> Any:  # dom0's server sends, C client in the domU reads
            with Vchan.server(dom0, agent.domid, d0, RING, RING) as v:
                h = s.call("vchan_c_peer", args=["client", 0, d0, "precv", s.size, s.tag(5)])
                _send_pattern(v, s.size, s.tag(5), s.rnd)
                return _c_diag(s.cu_out(h))

        def f_cu_py0(s: _Stress) -> Any:  # C client in the domU sends, dom0's server reads
            with Vchan.server(dom0, agent.domid, d0, RING, RING) as v:
                h = s.call("vchan_c_peer", args=["client", 0, d0, "psend", s.size, s.tag(6)])
                got = _recv_pattern(v, s.size, s.tag(6))
                s.cu_out(h)
                return got

        def g_c0_cu(s: _Stress) -> Any:  # the control, C to C: C server in dom0 sends
            proc = s.c0("server", agent.domid, d0, RING, RING, "psend", s.size, s.tag(7))
            h = s.call("vchan_c_peer", args=["client", 0, d0, "precv", s.size, s.tag(7)])
            got = _c_diag(s.cu_out(h))
            s.c0_out(proc)
            return got

        def h_cu_c0(s: _Stress) -> Any:  # the control, C to C: C client in the domU sends
            proc = s.c0("server", agent.domid, d0, RING, RING, "precv", s.size, s.tag(8))
            h = s.call("vchan_c_peer", args=["client", 0, d0, "psend", s.size, s.tag(8)])
            s.cu_out(h)
            return _c_diag(s.c0_out(proc))

        for name, fn in (("A c0->pyU", a_c0_pyu), ("B pyU->c0", b_pyu_c0),
                         ("C pyUs->c0", c_pyus_c0), ("D c0->pyUs", d_c0_pyus),
                         ("E py0s->cU", e_py0_cu), ("F cU->py0s", f_cu_py0),
                         ("G c0s->cU", g_c0_cu), ("H cU->c0s", h_cu_c0)):
            s.run(name, fn)
        for name, r in s.res.items():
            if r["bad"] or r["bytes"] != size:
                bad.append((rnd, size, name, r))
                print(f"STRESS round {rnd} size {size} {name}: {r}", flush=True)
        print(f"STRESS round {rnd} size {size}: {sum(1 for b in bad if b[0] == rnd)} bad",
              flush=True)
    if bad:
        print("STRESS domU dmesg:", *agent.call("dmesg"), sep="\n  ")
    assert not bad, bad


def test_figures_across_domains(dom0: Dom0, agent: DomU, request: pytest.FixtureRequest
                                ) -> None:
    """Not a check of speed: BENCHMARKS.md's cross-domain vchan figures.  A C libxenvchan
    server in dom0 streams 16 MiB through 64 KiB rings to a client in the domU -- C
    (vchan_c_peer) or xengrant's -- and echoes 300 one-byte pings of each (in-page rings);
    four rounds, ABBA.  Each side's time is taken in the domU around the stream alone (C:
    its ``secs`` line; xengrant: the agent's).  About 2 min under TCG, so it runs only when
    asked for: ``-k figures -s``."""
    if "figures" not in (request.config.getoption("keyword") or ""):
        pytest.skip("the figures run only when asked for: -k figures -s")
    import statistics

    path = f"/local/domain/0/data/vchan/fig-d{agent.domid}"
    n, pings = 16 << 20, 300
    rows: dict[str, list[float]] = {}

    def server(*args: Any) -> Any:
        proc = c_peer("server", agent.domid, path, *args)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def c_stream() -> float:
        srv = server(RING, RING, "send", n, 1)
        res = agent.call("c_peer_finish", timeout=TIMEOUT,
                         h=agent.call("vchan_c_peer", args=["client", 0, path, "recv", n, 0]))
        assert _c_result(res) == finish(srv)
        return float(res["out"].split("secs")[1].split()[0])

    def py_stream() -> float:
        srv = server(RING, RING, "send", n, 1)
        h = agent.call("vchan_client", peer=0, path=path)
        got = agent.call("vchan_recv", h=h, total=n, timeout=TIMEOUT)
        agent.call("close", h=h)
        assert (got["bytes"], got["crc"]) == finish(srv)
        return float(got["seconds"])

    def c_ping() -> float:
        srv = server(1024, 2048, "echo", pings, 0)
        res = agent.call("c_peer_finish", timeout=TIMEOUT,
                         h=agent.call("vchan_c_peer", args=["client", 0, path, "ping", pings, 0]))
        finish(srv)
        assert res["rc"] == 0, res
        return float(res["out"].split()[1])

    def py_ping() -> float:
        srv = server(1024, 2048, "echo", pings, 0)
        h = agent.call("vchan_client", peer=0, path=path)
        us = float(agent.call("vchan_ping", h=h, count=pings, timeout=TIMEOUT))
        agent.call("close", h=h)
        finish(srv)
        return us

    for order in ("cp", "pc", "pc", "cp"):
        for who in order:
            if who == "c":
                rows.setdefault("stream MB/s, C client", []).append(n / c_stream() / 1e6)
                rows.setdefault("round trip us, C client", []).append(c_ping())
            else:
                rows.setdefault("stream MB/s, xengrant client", []).append(n / py_stream() / 1e6)
                rows.setdefault("round trip us, xengrant client", []).append(py_ping())
    print(f"\nvchan across domains (C libxenvchan server in dom0, client in PV domU "
          f"d{agent.domid}), medians of 4:")
    for name, xs in rows.items():
        print(f"  {name}: {statistics.median(xs):.1f}  ({', '.join(f'{x:.1f}' for x in xs)})")
