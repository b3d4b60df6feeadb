"""Preemption points of long work: a huge batch, a big domain's teardown.

As Xen's ``hypercall_preempt_check`` in ``do_grant_table_op`` and
``domain_relinquish_resources`` returning ``-ERESTART``: between two chunks
the service lock is given up so that others waiting for it run.
"""

from __future__ import annotations

import time

from .base import ServerBase

#: Seconds a long batch or teardown leaves the lock free at a preemption point.
PREEMPT_PAUSE = 100e-6


class Preemption(ServerBase):
    """The preemption point of long work."""

    def _preempt(self, kind: str) -> None:
        """Give the service lock up for a moment (the caller holds it; it is held again
        on return): a preemption point of a long batch or a domain's teardown.

        Python's lock is not fair (the releaser may take it straight back), so
        the thread pauses :data:`PREEMPT_PAUSE` seconds with it released: a
        thread waiting for the lock has been woken and takes it meanwhile.
        """
        self.counters[f"{kind}_yields"] += 1
        self.backing.flush()  # frames freed so far remapped before anyone else runs
        self.lock.release()
        try:
            if self.on_preempt is not None:
                self.on_preempt(kind)
            else:
                time.sleep(PREEMPT_PAUSE)
        finally:
            self.lock.acquire()
