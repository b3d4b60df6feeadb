"""Preemption points of long work: a huge batch, a big domain's teardown.

As Xen's ``hypercall_preempt_check`` in ``do_grant_table_op`` and
``domain_relinquish_resources`` returning ``-ERESTART``: between two chunks
the work checks whether anyone else wants to run, and only then gives the
CPU up.  Here the CPU is the service lock (:class:`HandoffLock`): at a
preemption point a thread waiting for it gets it next, and the long work
goes on once that thread let go.  Nobody waiting, nothing is given up.
"""

from __future__ import annotations

import os
import threading

from .base import ServerBase


class HandoffLock:
    """The service lock: a plain lock that long work hands to a waiting thread.

    CPython's lock is not fair: a thread that releases it and takes it again
    at once usually gets it back before a waiter even wakes.  So a thread that
    finds the lock taken says so (:attr:`waiting`) before it blocks, and long
    work at a preemption point calls :meth:`handoff`: when somebody waits, it
    lets go, waits (on a condition, no sleep) until a waiter has the lock,
    and queues for it again; when nobody waits it keeps the lock and returns
    at once.  While a handoff is under way, a thread that comes new queues as
    a waiter too instead of taking the lock first.  Uncontended, an acquire
    is one non-blocking try of the plain lock and a release is the plain
    lock's own.

    ``acquire``/``release``/``with`` as :class:`threading.Lock` (the C ring
    server calls ``acquire()`` and ``release()``; :class:`threading.Condition`
    works over it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta = threading.Lock()
        #: notified whenever a waiter comes, takes the lock or gives up
        self._turn = threading.Condition(self._meta)
        #: threads blocked on the lock now
        self.waiting = 0
        #: times a waiter took the lock
        self._taken = 0
        #: a handoff is under way: newcomers queue
        self._handing = False
        self.release = self._lock.release
        self.locked = self._lock.locked

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (see :meth:`threading.Lock.acquire`).

        Returns:
            Whether it was taken (False only when not ``blocking`` or on ``timeout``).
        """
        if not self._handing and self._lock.acquire(False):
            return True
        if not blocking:
            return False
        with self._meta:
            self.waiting += 1
            self._turn.notify_all()
        got = False
        try:
            got = self._lock.acquire(True, timeout)
        finally:
            with self._meta:
                self.waiting -= 1
                if got:
                    self._taken += 1
                self._turn.notify_all()
        return got

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def handoff(self) -> bool:
        """A preemption point (the caller holds the lock; it holds it again on return).

        Returns:
            True if a waiting thread had the lock meanwhile; False if nobody
            waited (the lock was kept throughout).
        """
        if not self.waiting:
            return False
        with self._meta:
            if not self.waiting:
                return False
            taken = self._taken
            self._handing = True
        self._lock.release()
        try:
            with self._meta:
                while self._taken == taken and self.waiting:
                    self._turn.wait()
        finally:
            with self._meta:
                self._handing = False
            self.acquire()
        return True

    def wait_for_waiters(self, n: int, timeout: float) -> bool:
        """Block until ``n`` threads wait for the lock (for tests: a bystander is
        queued at a preemption point).

        Returns:
            Whether they did within ``timeout`` seconds.
        """
        with self._meta:
            return self._turn.wait_for(lambda: self.waiting >= n, timeout)


class Preemption(ServerBase):
    """The preemption point of long work."""

    def _preempt(self, kind: str) -> None:
        """A preemption point of a long batch or a domain's teardown (the caller holds
        the service lock; it holds it again on return).

        If a thread waits for the lock, it gets it now (:meth:`HandoffLock.handoff`),
        as ``hypercall_preempt_check()`` lets the softirqs that are pending run;
        the work goes on once it let go.  If nobody waits, the work goes on at
        once, the lock kept (after one ``sched_yield`` with the GIL released, so
        that a thread on its way to the lock gets there).  ``kind``:
        ``"batch"`` or ``"teardown"`` (counted in ``<kind>_yields``;
        ``preempt_handoffs`` counts the times the lock went to a waiter).
        """
        self.counters[f"{kind}_yields"] += 1
        if self.on_preempt is not None:
            self.on_preempt(kind)
        lock = self.lock
        if not lock.waiting:
            # A connection's thread woken for a request needs the interpreter (the
            # GIL) to get as far as the lock, and would wait for it up to the
            # switch interval (5 ms): give the GIL and the CPU up once -- a
            # system call, no sleep -- and look again.
            os.sched_yield()
            if not lock.waiting:
                return
        self.backing.flush()  # frames freed so far remapped before anyone else runs
        if lock.handoff():
            self.counters["preempt_handoffs"] += 1
