"""EmbeddedXen's and the service's event channels and xenstore, driven in lockstep.

A Hypothesis state machine makes the same calls on both backends (two
domains each) and asserts that they answer the same: the same port numbers
(both allocate the lowest free port, ``get_free_port``), the same errnos,
the same events, the same xenstore values, directories and errors.  The
events a model says must come are waited for with a long deadline; a port
the model says is quiet is looked at only on EmbeddedXen (the service's
``pending(0)`` sees only what already reached its socket, which proves nothing).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import xengrant

TIMEOUT = 30.0


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", value)`` or ``("err", errno)``."""
    try:
        return "ok", fn()
    except OSError as e:
        return "err", e.errno


class Lockstep(RuleBasedStateMachine):
    """The calls, on both backends at once."""

    path: str = ""

    def __init__(self) -> None:
        super().__init__()
        from xengrant.service import connect

        self.xen = xengrant.EmbeddedXen(memory=8 << 20)
        ea, eb = self.xen.create_domain(), self.xen.create_domain()
        self.sa, self.sb = connect(self.path), connect(self.path)
        # [backend][side] -> (evtchn, xs, domid)
        self.sides = [
            [(ea.evtchn, ea.xs, ea.domid), (eb.evtchn, eb.xs, eb.domid)],
            [(self.sa.evtchn, self.sa.xs, self.sa.domid),
             (self.sb.evtchn, self.sb.xs, self.sb.domid)],
        ]
        #: per side: ports bound (the same numbers on both backends)
        self.ports: list[set[int]] = [set(), set()]
        #: per side: ports offered to the other side, not yet bound
        self.offered: list[set[int]] = [set(), set()]
        #: (side, port) -> (side, port) of the peer, for connected ports
        self.peer: dict[tuple[int, int], tuple[int, int]] = {}

    steps = 0

    def teardown(self) -> None:
        Lockstep.steps += 1
        self.sa.close()
        self.sb.close()
        self.xen.close()

    def dom(self, b: int, side: int) -> int:
        """The domid of ``side`` on backend ``b``."""
        return int(self.sides[b][side][2])

    def both(self, side: int, fn: Callable[[int, Any, Any], Any]) -> Any:
        """``fn(backend, evtchn, xs)`` on both backends: the same outcome."""
        got = [outcome(lambda b=b: fn(b, *self.sides[b][side][:2])) for b in (0, 1)]
        assert got[0] == got[1], f"embedded {got[0]} != service {got[1]}"
        return got[0]

    # ------------------------------------------------------------ evtchn
    @rule(side=st.integers(0, 1))
    def offer(self, side: int) -> None:
        kind, port = self.both(side, lambda b, ev, xs: ev.bind_unbound_port(
            self.dom(b, 1 - side)))
        assert kind == "ok"
        self.ports[side].add(port)
        self.offered[side].add(port)

    @rule(side=st.integers(0, 1), pick=st.integers(0, 7))
    def bind(self, side: int, pick: int) -> None:
        choices = [*sorted(self.offered[1 - side]), 4000]
        rport = choices[pick % len(choices)]
        kind, port = self.both(side, lambda b, ev, xs: ev.bind_interdomain(
            self.dom(b, 1 - side), rport))
        if kind == "err":
            assert port == errno.EINVAL and rport not in self.offered[1 - side]
            return
        self.offered[1 - side].discard(rport)
        self.ports[side].add(port)
        self.peer[(side, port)] = (1 - side, rport)
        self.peer[(1 - side, rport)] = (side, port)
        self.expect(side, port)  # the bind's own event

    def expect(self, side: int, port: int) -> None:
        """An event must come on ``port``: take it (and unmask) on both."""
        self.both(side, lambda b, ev, xs: ev.wait(port, TIMEOUT))

    @rule(side=st.integers(0, 1), pick=st.integers(0, 7))
    def notify(self, side: int, pick: int) -> None:
        choices = [*sorted(self.ports[side]), 3999]
        port = choices[pick % len(choices)]
        kind, err = self.both(side, lambda b, ev, xs: ev.notify(port))
        if port not in self.ports[side]:
            assert (kind, err) == ("err", errno.ENOTCONN)
            return
        assert kind == "ok"
        if (side, port) in self.peer:
            self.expect(*self.peer[(side, port)])

    @rule(side=st.integers(0, 1), pick=st.integers(0, 7))
    def unbind(self, side: int, pick: int) -> None:
        if not self.ports[side]:
            return
        port = sorted(self.ports[side])[pick % len(self.ports[side])]
        assert self.both(side, lambda b, ev, xs: ev.unbind(port))[0] == "ok"
        self.ports[side].discard(port)
        self.offered[side].discard(port)
        peer = self.peer.pop((side, port), None)
        if peer is not None:
            del self.peer[peer]
            self.offered[peer[0]].add(peer[1])  # back to unbound, offered to us

    @invariant()
    def embedded_is_quiet(self) -> None:
        for side in (0, 1):
            with pytest.raises(TimeoutError):
                self.sides[0][side][0].pending(0)

    # ------------------------------------------------------------- xenstore
    @rule(side=st.integers(0, 1), key=st.sampled_from(["a", "a/b", "c", "bad key"]),
          value=st.binary(max_size=8))
    def write(self, side: int, key: str, value: bytes) -> None:
        self.both(side, lambda b, ev, xs: xs.write(f"data/{key}", value))

    @rule(side=st.integers(0, 1), key=st.sampled_from(["a", "a/b", "c", "nothing"]))
    def read(self, side: int, key: str) -> None:
        self.both(side, lambda b, ev, xs: xs.read(f"data/{key}"))

    @rule(side=st.integers(0, 1), key=st.sampled_from(["a", "c", ""]))
    def rm(self, side: int, key: str) -> None:
        self.both(side, lambda b, ev, xs: xs.rm(f"data/{key}".rstrip("/")))

    @rule(side=st.integers(0, 1))
    def directory(self, side: int) -> None:
        self.both(side, lambda b, ev, xs: sorted(xs.directory("data")))

    @rule(side=st.integers(0, 1))
    def cross_read(self, side: int) -> None:
        """The other domain's node: EACCES unless made readable (both alike)."""
        self.both(side, lambda b, ev, xs: xs.read(f"/local/domain/{self.dom(b, 1 - side)}/data/a"))


@pytest.fixture(scope="module")
def service_path() -> Iterator[str]:
    from service_helpers import Service

    svc = Service()
    try:
        yield svc.path
    finally:
        svc.stop()


def test_embedded_and_service_agree(service_path: str) -> None:
    Lockstep.path = service_path
    run = Lockstep.TestCase
    run.settings = settings(max_examples=15, stateful_step_count=25, deadline=None,
                            suppress_health_check=list(HealthCheck))
    Lockstep.steps = 0
    run().runTest()
    assert Lockstep.steps >= 10  # the machine ran (one teardown per example)

