"""Fault injection: make the emulated hypervisor answer what real Xen can,
on demand, for users' tests.

Real Xen answers some things a test cannot easily provoke: a granted frame
paged out (``GNTST_eagain`` from ``get_paged_frame``), the mapper's maptrack
exhausted (``GNTST_no_space`` from ``get_maptrack_handle``), a shared entry
the guest keeps rewriting (``_set_status_v1`` gives up after 5 cmpxchg
tries: ``GNTST_general_error``, "Shared grant entry is unstable"), and a
guest buffer that cannot be read (``copy_from_guest`` fails: the hypercall
returns ``-EFAULT`` at that op, the ops before it done).  A :class:`Faults`
plan makes the rules answer exactly that at the point where Xen would, for
the next ``count`` chances or with a ``probability`` drawn from its own
seeded generator, so a run is reproducible.

Kinds and where they fire (each where the Xen function named decides):

- ``"eagain"``: a map's first pin of a grant, a copy's first pin of a grant
  or its gfn side (``get_paged_frame``); ops ``map_grant_ref``, ``copy``.
- ``"no_maptrack"``: a map (``get_maptrack_handle``); op ``map_grant_ref``.
- ``"unstable"``: a pin that writes the shared entry (``_set_status``) or a
  transfer committing it (``gnttab_prepare_for_transfer``); ops
  ``map_grant_ref``, ``copy``, ``transfer``.
- ``"efault"``: before any op of a hypercall is read (``copy_from_guest``);
  any op name (``map_grant_ref``, ``unmap_grant_ref``, ``unmap_and_replace``,
  ``copy``, ``transfer``, ``setup_table``, ``query_size``, ``set_version``,
  ``get_status_frames``, ``get_version``, ``swap_grant_ref``, ``cache_flush``).

While any fault is planned the C fast paths stand aside, so every op goes
through the Python rules that consult the plan, in order.  Sans-IO: no lock;
:class:`xengrant.EmbeddedXen` consults it under its hypercall lock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: The fault kinds, and the ops each can hit.
KINDS: dict[str, frozenset[str]] = {
    "eagain": frozenset({"map_grant_ref", "copy"}),
    "no_maptrack": frozenset({"map_grant_ref"}),
    "unstable": frozenset({"map_grant_ref", "copy", "transfer"}),
    "efault": frozenset(
        {
            "map_grant_ref",
            "unmap_grant_ref",
            "unmap_and_replace",
            "copy",
            "transfer",
            "setup_table",
            "query_size",
            "set_version",
            "get_status_frames",
            "get_version",
            "swap_grant_ref",
            "cache_flush",
        }
    ),
}


@dataclass(eq=False)
class Fault:
    """One planned fault.  Use it as a context manager to remove it on exit.

    Attributes:
        kind: ``"eagain"``, ``"no_maptrack"``, ``"unstable"`` or ``"efault"``.
        op: the op name it hits, or None for every op its kind can hit.
        domid: the calling domain it hits, or None for any.
        remaining: fires left (None: no limit).
        probability: the chance each opportunity fires (1.0: always).
        seed: the seed of its generator.
        skip: chances still to let pass before it may fire.
        fired: how many times it fired so far.
    """

    kind: str
    op: str | None
    domid: int | None
    remaining: int | None
    probability: float
    seed: int
    skip: int = 0
    fired: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _plan: Faults | None = field(default=None, repr=False)

    def remove(self) -> None:
        """Take this fault out of its plan (it fires no more)."""
        if self._plan is not None:
            self._plan.remove(self)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Faults:
    """The faults planned for one hypervisor (``xen.faults``)."""

    def __init__(self) -> None:
        self._plan: tuple[Fault, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def inject(
        self,
        kind: str,
        *,
        op: str | None = None,
        domid: int | None = None,
        count: int | None = 1,
        probability: float | None = None,
        seed: int = 0,
        after: int = 0,
    ) -> Fault:
        """Plan a fault.

        Args:
            kind: ``"eagain"``, ``"no_maptrack"``, ``"unstable"`` or ``"efault"``.
            op: the op it hits (see the module docstring), None for all of its kind.
            domid: only calls by this domain, None for any.
            count: how many times it fires, None for no limit (with
                ``probability``, the fires are counted, not the chances).
            probability: fire at each chance with this probability, drawn
                from ``random.Random(seed)``; None to fire at every chance.
            seed: the generator's seed, so a run is reproducible.
            after: let this many chances pass first (``after=2`` with
                ``kind="efault"`` faults the third op of a batch).

        Returns:
            The :class:`Fault` (a context manager that removes it).

        Raises:
            ValueError: an unknown kind, an op the kind cannot hit, a
                negative count or a probability outside [0, 1].
        """
        ops = KINDS.get(kind)
        if ops is None:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
        if op is not None and op not in ops:
            raise ValueError(f"a {kind!r} fault cannot hit {op!r} (only {', '.join(sorted(ops))})")
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0 or None, not {count}")
        if after < 0:
            raise ValueError(f"after must be >= 0, not {after}")
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], not {probability}")
        fault = Fault(
            kind,
            op,
            domid,
            count,
            1.0 if probability is None else probability,
            seed,
            after,
            _rng=random.Random(seed),
            _plan=self,
        )
        self._plan = (*self._plan, fault)
        return fault

    def remove(self, fault: Fault) -> None:
        """Take ``fault`` out of the plan (no error if it is not in it)."""
        self._plan = tuple(f for f in self._plan if f is not fault)

    def clear(self) -> None:
        """Remove every planned fault."""
        self._plan = ()

    def fire(self, kind: str, op: str, domid: int) -> bool:
        """Called by a rule at its decision point: does a planned fault hit here?

        The first matching fault with chances left decides (its generator
        draws once per chance when it has a probability below 1).
        """
        for f in self._plan:
            if f.kind != kind or (f.op is not None and f.op != op):
                continue
            if (f.domid is not None and f.domid != domid) or f.remaining == 0:
                continue
            if f.skip:
                f.skip -= 1
                continue
            if f.probability < 1.0 and f._rng.random() >= f.probability:
                continue
            if f.remaining is not None:
                f.remaining -= 1
            f.fired += 1
            return True
        return False


__all__ = ["KINDS", "Fault", "Faults"]
