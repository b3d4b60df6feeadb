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
"""

from __future__ import annotations

import os
from typing import Any

import domu
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
    # Not in the CI stage yet: across domains a stream's CRC-32 differs now and then (the
    # byte count right), in either direction, and once the domU's agent died of SIGSEGV;
    # see docs/real-xen.md.  About 3 min under TCG.  Run with XENGRANT_VCHAN_DOMU=1.
    pytest.mark.skipif(
        os.environ.get("XENGRANT_VCHAN_DOMU") != "1",
        reason="cross-domain vchan interop runs only with XENGRANT_VCHAN_DOMU=1 "
        "(an intermittent data corruption across domains is open; docs/real-xen.md)",
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
    assert sent["error"] == "BrokenPipeError" and mib <= sent["bytes"] < 64 * mib
    assert finish(proc)[0] == mib

    proc = c_peer("server", agent.domid, path, RING, RING, "recv", 64 * mib, 0)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    h = agent.call("vchan_client", peer=0, path=path)
    sent = agent.call("vchan_send", h=h, total=mib, seed=34, timeout=TIMEOUT)
    agent.call("close", h=h)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, (out, err)  # fewer bytes than asked: the peer closed
    assert sent["error"] is None and out.split()[-3:] == [str(mib), "crc", sent["crc"]]
