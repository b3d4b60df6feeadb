"""The service lock's handoff at preemption points (service/server/preempt.py).

Deterministic: threads are placed with :meth:`HandoffLock.wait_for_waiters`
(a condition), never with sleeps; what is checked is the order of events.
"""

from __future__ import annotations

import threading

from xengrant.service.server.preempt import HandoffLock


def _waiter(lock: HandoffLock, log: list[str], name: str) -> threading.Thread:
    def run() -> None:
        with lock:
            log.append(name)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_nobody_waiting_keeps_the_lock() -> None:
    lock = HandoffLock()
    with lock:
        assert lock.waiting == 0
        assert lock.handoff() is False
        assert lock.locked()
        # the plain lock never went: a non-blocking try from here fails
        assert lock.acquire(False) is False
    assert not lock.locked()


def test_a_waiter_gets_the_lock_before_the_worker_goes_on() -> None:
    lock = HandoffLock()
    log: list[str] = []
    with lock:
        t = _waiter(lock, log, "bystander")
        assert lock.wait_for_waiters(1, 60)
        log.append("chunk 1")
        assert lock.handoff() is True
        log.append("chunk 2")
        assert lock.handoff() is False  # nobody waits any more
        log.append("chunk 3")
    t.join(60)
    assert log == ["chunk 1", "bystander", "chunk 2", "chunk 3"]


def test_every_waiter_at_a_point_is_let_in_before_the_worker_needs_them_all() -> None:
    """Two waiters: each handoff lets at least one in; two handoffs let both in."""
    lock = HandoffLock()
    log: list[str] = []
    with lock:
        ts = [_waiter(lock, log, f"w{i}") for i in range(2)]
        assert lock.wait_for_waiters(2, 60)
        assert lock.handoff() is True
        first = len(log)
        assert first >= 1
        if lock.waiting:
            assert lock.handoff() is True
        log.append("worker")
    for t in ts:
        t.join(60)
    assert sorted(log[:2]) == ["w0", "w1"] and log[2] == "worker"


def test_a_waiter_that_gives_up_does_not_stall_the_worker() -> None:
    lock = HandoffLock()
    gave_up = threading.Event()
    timed_out: list[bool] = []

    def impatient() -> None:
        timed_out.append(not lock.acquire(True, 0.01))
        gave_up.set()

    with lock:
        t = threading.Thread(target=impatient)
        t.start()
        gave_up.wait(60)  # it timed out while the worker held the lock
        assert lock.handoff() is False  # nobody waits now
    t.join(60)
    assert timed_out == [True]


def test_a_condition_works_over_it() -> None:
    """The throttle waits on a Condition over the service lock."""
    lock = HandoffLock()
    cond = threading.Condition(lock)  # type: ignore[arg-type]
    ready: list[int] = []

    def producer() -> None:
        with lock:
            ready.append(1)
            cond.notify_all()

    with lock:
        t = threading.Thread(target=producer)
        t.start()
        assert cond.wait_for(lambda: ready, 60)
    t.join(60)
    assert ready == [1]
