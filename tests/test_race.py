"""Ending access (or going read-only) races a peer's map, on real threads.

The granter updates its shared entry with C ``__atomic`` cmpxchg outside any
lock while the hypervisor, under its lock, pins the same entry with its own
cmpxchg (``_set_status_v1``), exactly as a guest vCPU races Xen.  Each round
two threads wait on a ``threading.Barrier``, then spin until both are running
and fire at once; the switch interval is lowered so the interpreter hands the
GIL over between bytecodes and the two sides interleave inside the calls.

Only protocol outcomes are asserted, never that a race took place:

- end access vs map: either access ended and the map failed with
  ``GNTST_general_error``, or the map succeeded and ``try_end_access`` raised
  ``Busy`` -- never both, never neither; and whenever the mapper holds the
  mapping the entry still says ``permit_access`` with ``GTF_reading`` (no grant
  is revoked while mapped);
- set_readonly vs a writable map: either the entry went read-only and the map
  failed with ``GNTST_general_error`` ("Attempt to write-pin a r/o grant
  entry"), or the map succeeded and ``set_readonly`` raised ``Busy``.

v2 tables follow Linux's weaker ``gnttab_end_foreign_access_ref_v2``: the
flags are cleared first and the status word checked after a barrier, so a
round may end with both sides refused (``Busy`` and ``general_error``); never
both succeed, and a mapping always has ``GTF_reading`` in its status word.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import xengrant
from grant_helpers import flags_of, status_of
from xengrant import abi
from xengrant.errors import Busy, GrantError

ROUNDS = 2000
#: how far (busy-loop iterations) side A's start is staggered after side B's
LAG_MAX = 400
PERMIT, RO = abi.GTF_permit_access, abi.GTF_readonly
READING, WRITING = abi.GTF_reading, abi.GTF_writing

Outcome = tuple[str, Any]  # ("ok", value) or ("err", exception)


@pytest.fixture(autouse=True)
def _fast_gil_switch() -> Iterator[None]:
    """Hand the GIL over every few microseconds, so the racers interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class Racer:
    """Two worker threads that run ``side_a(ctx)`` and ``side_b(ctx)`` at once.

    Each round: the main thread sets ``ctx``, all three meet at the start
    barrier, each worker marks itself running and spins until the other has
    too, then both call their side; all three meet again at the end barrier
    and the main thread reads both outcomes.
    """

    def __init__(self, side_a: Callable[[Any], Any], side_b: Callable[[Any], Any]) -> None:
        self.sides = (side_a, side_b)
        self.barrier = threading.Barrier(3, timeout=60)
        self.running = [-1, -1]
        self.round = 0
        self.ctx: Any = None
        self.outcomes: list[Outcome] = [("ok", None), ("ok", None)]
        self.stop = False
        #: busy-loop iterations each side waits after the spin, set per round
        self.lag = [0, 0]
        self._rng = random.Random(20040824)  # deterministic staggering
        self.threads = [
            threading.Thread(target=self._work, args=(i,), name=f"racer-{'ab'[i]}", daemon=True)
            for i in (0, 1)
        ]
        for t in self.threads:
            t.start()

    def _work(self, i: int) -> None:
        side, running, other = self.sides[i], self.running, 1 - i
        while True:
            self.barrier.wait()
            if self.stop:
                return
            n = self.round
            running[i] = n
            while running[other] != n:  # spin: both are on the CPU when they fire
                pass
            for _ in range(self.lag[i]):  # stagger the start within the other's call
                pass
            try:
                self.outcomes[i] = ("ok", side(self.ctx))
            except Exception as e:  # the outcome is checked by the main thread
                self.outcomes[i] = ("err", e)
            self.barrier.wait()

    def race(self, ctx: Any) -> tuple[Outcome, Outcome]:
        """One round; returns (outcome of side A, outcome of side B)."""
        self.ctx = ctx
        self.round += 1
        # side A (the short guest op) starts at a varying point of side B's call
        self.lag = [self._rng.randrange(LAG_MAX), 0]
        self.barrier.wait()
        self.barrier.wait()
        a, b = self.outcomes
        return a, b

    def close(self) -> None:
        self.stop = True
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:  # a worker died: don't hang
            pass
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive()


@pytest.fixture
def racer_factory() -> Iterator[Callable[..., Racer]]:
    made: list[Racer] = []

    def make(side_a: Callable[[Any], Any], side_b: Callable[[Any], Any]) -> Racer:
        r = Racer(side_a, side_b)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _counts(xen: xengrant.EmbeddedXen, *doms: xengrant.Domain) -> tuple[object, ...]:
    states = [xen.domain_state(d.domid) for d in doms]
    return (
        xen.free_frames,
        [s.maptrack.in_use for s in states],
        [dict(s.gt.active) for s in states],
        [s.tot_pages for s in states],
        [d.grant_table.num_free_grants() for d in doms],
    )


def _mapper_side(
    xen: xengrant.EmbeddedXen, granter: xengrant.Domain, mapper: xengrant.Domain, writable: bool
) -> Callable[[int], tuple[xengrant.Mapping, int, int, bytes]]:
    """Map the round's ref; report the entry as seen while holding the mapping."""
    gt = mapper.grant_table
    version = granter.grant_table.version

    def side(ref: int) -> tuple[xengrant.Mapping, int, int, bytes]:
        m = gt.map_grants([(granter.domid, ref)], writable)
        flags = flags_of(xen, granter.domid, ref)
        status = status_of(xen, granter.domid, ref) if version == 2 else flags
        return m, flags, status, bytes(m.mem[:8])

    return side


def race_round(
    racer: Racer, gt: xengrant.GrantTable, pages: Any, mapper: xengrant.Domain, token: bytes
) -> tuple[int, bool, bool, Any]:
    """Grant the page, holding ``token``, to ``mapper`` under a fresh ref; race both sides.

    A side that fails must fail as Xen refuses: side A (the granter's op)
    with ``Busy``, side B (the map) with ``GNTST_general_error``.  Returns
    ``(ref, side A succeeded, side B succeeded, side B's value)``.
    """
    pages.mem[:8] = token
    ref = gt.get()
    gt.grant_access(ref, mapper.domid, pages.gfns[0], writable=True)
    (a_kind, a_val), (b_kind, b_val) = racer.race(ref)
    if a_kind == "err":
        assert isinstance(a_val, Busy), a_val
    if b_kind == "err":
        assert isinstance(b_val, GrantError), b_val
        assert b_val.status == abi.GNTST_general_error, b_val
    return ref, a_kind == "ok", b_kind == "ok", b_val


def end_round(
    xen: xengrant.EmbeddedXen, granter: xengrant.Domain, mapper: xengrant.Domain, ref: int
) -> None:
    """The entry is unused now: ending access succeeds and leaves it invalid, nothing held."""
    granter.grant_table.try_end_access(ref, release_ref=True)
    assert flags_of(xen, granter.domid, ref) == 0
    assert xen.domain_state(mapper.domid).maptrack.in_use == 0
    assert not xen.domain_state(granter.domid).gt.active


@pytest.mark.parametrize("granter_pv", [False, True], ids=["hvm", "pv"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("writable", [False, True], ids=["ro-map", "rw-map"])
def test_end_access_races_map(
    xen: xengrant.EmbeddedXen,
    make_domain: Callable[..., xengrant.Domain],
    racer_factory: Callable[..., Racer],
    granter_pv: bool,
    version: int,
    writable: bool,
) -> None:
    granter, mapper = make_domain(pv=granter_pv), make_domain()
    gt = granter.grant_table
    if version == 2:
        assert gt.set_version(2) == 2
    pages = granter.alloc_pages(1)
    before = _counts(xen, granter, mapper)
    racer = racer_factory(
        lambda ref: gt.try_end_access(ref), _mapper_side(xen, granter, mapper, writable)
    )
    rounds = ROUNDS // 8  # eight parameter sets share the budget
    wins = {"end": 0, "map": 0, "neither": 0}
    for n in range(rounds):
        token = n.to_bytes(8, "little")
        ref, ended, mapped, b_val = race_round(racer, gt, pages, mapper, token)
        assert not (ended and mapped), f"round {n}: access ended under a live mapping"
        if mapped:
            m, flags, status, seen = b_val
            # never revoked while mapped: v1 keeps permit_access with GTF_reading
            # in the entry; v2 may clear the header (the guest writes it first)
            # but the status word keeps GTF_reading
            if version == 1:
                assert flags & abi.GTF_type_mask == PERMIT, xengrant.decode_flags(flags)
                assert flags_of(xen, granter.domid, ref) & abi.GTF_type_mask == PERMIT
            assert status & READING, xengrant.decode_flags(status)
            assert bool(status & WRITING) == writable
            assert seen == token
            # and ending access is refused until the unmap
            with pytest.raises(Busy):
                gt.try_end_access(ref)
            m.unmap()
            wins["map"] += 1
        elif ended:
            wins["end"] += 1
        else:
            # v1: exactly one side wins.  v2 (Linux's end_foreign_access_ref_v2):
            # the flags were cleared, the status word was still set by Xen's
            # _set_status_v2, which then saw the cleared header and backed out.
            assert version == 2, f"round {n}: both the end and the map were refused"
            wins["neither"] += 1
        end_round(xen, granter, mapper, ref)
        if version == 2:
            assert status_of(xen, granter.domid, ref) == 0
    assert sum(wins.values()) == rounds
    assert _counts(xen, granter, mapper) == before
    pages.free()


def test_set_readonly_races_writable_map(
    xen: xengrant.EmbeddedXen,
    pair: tuple[xengrant.Domain, xengrant.Domain],
    racer_factory: Callable[..., Racer],
) -> None:
    granter, mapper = pair
    gt = granter.grant_table
    pages = granter.alloc_pages(1)
    before = _counts(xen, granter, mapper)
    racer = racer_factory(
        lambda ref: gt.set_readonly(ref), _mapper_side(xen, granter, mapper, True)
    )
    rounds = ROUNDS // 2
    for n in range(rounds):
        token = (n | 1 << 62).to_bytes(8, "little")
        ref, went_ro, mapped, b_val = race_round(racer, gt, pages, mapper, token)
        assert went_ro != mapped, (
            f"round {n}: set_readonly {'succeeded' if went_ro else 'was refused'} "
            f"and the writable map {'succeeded' if mapped else 'failed'}"
        )
        flags = flags_of(xen, granter.domid, ref)
        if mapped:
            m, seen_flags, _status_word, seen = b_val
            assert seen_flags & (PERMIT | RO | READING | WRITING) == PERMIT | READING | WRITING
            assert flags == PERMIT | READING | WRITING, xengrant.decode_flags(flags)
            assert seen == token
            m.mem[:8] = bytes(8)  # still writable through the mapping
            assert bytes(pages.mem[:8]) == bytes(8)
            m.unmap()
        else:
            assert flags == PERMIT | RO, xengrant.decode_flags(flags)
            # read-only now: a read-only map still works
            with mapper.grant_table.map_grants([(granter.domid, ref)], writable=False) as m:
                assert bytes(m.mem[:8]) == token
        end_round(xen, granter, mapper, ref)
    assert _counts(xen, granter, mapper) == before
    pages.free()
