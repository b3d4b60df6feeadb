"""The request ring's client I/O in Python: what ``_ring_client.c`` does, the reference.

Four calls with the signatures and results of ``_cext``'s (:data:`RingIO`):
write a one-op request on the ring, and read responses -- copy each
response slot out as it is consumed and return the bytes, in order.  They
decide nothing about what a response means; that is
:mod:`xengrant.service.frontring`'s, for whichever of the two ran
(:data:`xengrant.service.frontring.C_PATHS` picks one, in one place).
``tests/test_ring_client_diff.py`` drives both through the same operations
against the same service behaviour, hostile included, and compares the
page, the results and the client's state.

The rules (``xen/include/public/io/ring.h``): a producer writes the slot,
then the producer index, then (full barrier) reads the peer's event index
and notifies only when its push crossed it
(``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``); a consumer about to sleep sets
its event index one past what it consumed and looks once more
(``RING_FINAL_CHECK_FOR_RESPONSES``).  A service whose ``rsp_prod`` claims
more responses than the requests made is bogus (stricter than
``RING_RESPONSE_PROD_OVERFLOW``): nothing is read then.

Python has no fence: the page's indices are read and written as aligned
32-bit words through a memoryview, which x86 (the machines this runs on)
keeps in order; the C is the path that runs by default.
"""

from __future__ import annotations

import os
import select
import struct
import time
from typing import Any, Protocol

from .ring import RING_HDR, RING_SIZE, RING_SLOT

_M32 = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_SLOT_HEAD = struct.Struct("<IHH")
_MAP_IN = struct.Struct("<QIIH")  # host_addr, flags, ref, dom (gnttab_map_grant_ref)
_UNMAP_IN = struct.Struct("<QQI")  # host_addr, dev_bus_addr, handle (gnttab_unmap_grant_ref)
_GNTTABOP_map_grant_ref = 0
_GNTTABOP_unmap_grant_ref = 1
_F_POSTED = 0x4
#: what each value of a one-op request may be (``_ring_client.c``'s xg_*_one_max)
_MAP_MAX = (_M32, (1 << 52) - 1, _M32, _M32, 0xFFFF)
_UNMAP_MAX = (_M32, (1 << 52) - 1, _M32)
#: ``ring_map_one``'s statuses
TAKEN, NOT_SENT, HUNG_UP, TIMED_OUT, BOGUS = 0, 5, -2, -3, -4


class RingIO(Protocol):
    """The four calls, as ``_cext`` and this module both provide them."""

    def ring_post_map(self, ring: Any, state: Any, lock: Any, kick_fd: int, seq: int, gfn: int,
                      flags: int, ref: int, dom: int) -> int: ...

    def ring_post_unmap(self, ring: Any, state: Any, lock: Any, kick_fd: int, seq: int,
                        gfn: int, handle: int) -> int: ...

    def ring_collect(self, ring: Any, state: Any) -> bytes | None: ...

    def ring_map_one(self, ring: Any, state: Any, lock: Any, kick_fd: int, seq: int, gfn: int,
                     flags: int, ref: int, dom: int, spin_ns: int, timeout_ms: int,
                     wait_fd: int, sock_fd: int) -> tuple[int, bytes, BaseException | None]: ...


def _fits(values: tuple[Any, ...], limits: tuple[int, ...]) -> bool:
    """Every value an int within its field (``xg_fit_all``)."""
    return all(isinstance(v, int) and 0 <= v <= m for v, m in zip(values, limits))


def _ld(buf: Any, off: int) -> int:
    v: int = _U32.unpack_from(buf, off)[0]
    return v


def _st(buf: Any, off: int, v: int) -> None:
    _U32.pack_into(buf, off, v & _M32)


def _slot_off(idx: int) -> int:
    return RING_HDR + (idx & (RING_SIZE - 1)) * RING_SLOT


def _kick(fd: int) -> None:
    """Event channel "notify": one increment of the eventfd (-1: none)."""
    if fd >= 0:
        try:
            os.write(fd, (1).to_bytes(8, "little"))
        except BlockingIOError:  # the counter is full: the peer is woken anyway
            pass


def _unkick(fd: int) -> None:
    """Drain an eventfd (a kick)."""
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass


def _push(ring: Any, old: int, new: int) -> bool:
    """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish ``req_prod`` ``new``; notify?"""
    _st(ring, 0, new)
    event = _ld(ring, 4)
    return (new - event) & _M32 < (new - old) & _M32


def _post(ring: Any, state: Any, lock: Any, kick_fd: int, slot: bytes) -> int:
    """Write ``slot`` at ``req_prod_pvt`` under ``lock`` and push it: 1 sent, -1 full."""
    with lock if lock is not None else _NOLOCK:
        pvt, cons = _ld(state, 0), _ld(state, 4)
        if (pvt - cons) & _M32 >= RING_SIZE:  # RING_FULL
            return -1
        off = _slot_off(pvt)
        ring[off : off + RING_SLOT] = slot
        _st(state, 0, pvt + 1)
        if _push(ring, pvt, (pvt + 1) & _M32):
            _kick(kick_fd)
        return 1


def _slot(seq: int, cmd: int, op: bytes) -> bytes:
    flags = _F_POSTED if cmd == _GNTTABOP_unmap_grant_ref else 0
    return (_SLOT_HEAD.pack(seq, cmd, flags) + op).ljust(RING_SLOT, b"\0")


def _map_slot(seq: int, gfn: int, flags: int, ref: int, dom: int) -> bytes:
    return _slot(seq, _GNTTABOP_map_grant_ref, _MAP_IN.pack(gfn << 12, flags, ref, dom))


def ring_post_map(ring: Any, state: Any, lock: Any, kick_fd: int, seq: int, gfn: int,
                  flags: int, ref: int, dom: int) -> int:
    """Request ``seq``, a one-op ``GNTTABOP_map_grant_ref`` (``host_addr`` ``gfn << 12``).

    Returns:
        1 sent; 0 a value does not fit the op; -1 the ring is full (nothing sent).
    """
    if not _fits((seq, gfn, flags, ref, dom), _MAP_MAX):
        return 0
    return _post(ring, state, lock, kick_fd, _map_slot(seq, gfn, flags, ref, dom))


def ring_post_unmap(ring: Any, state: Any, lock: Any, kick_fd: int, seq: int, gfn: int,
                    handle: int) -> int:
    """As :func:`ring_post_map`, for a posted one-op ``GNTTABOP_unmap_grant_ref``."""
    if not _fits((seq, gfn, handle), _UNMAP_MAX):
        return 0
    op = _UNMAP_IN.pack(gfn << 12, 0, handle)
    return _post(ring, state, lock, kick_fd, _slot(seq, _GNTTABOP_unmap_grant_ref, op))


def _consume(ring: Any, state: Any, seq: int, out: bytearray) -> int:
    """Copy responses out from ``rsp_cons`` up to and including ``seq``'s (-1: all).

    Returns:
        1 ``seq``'s was taken (the last added); 0 not yet; -4 ``rsp_prod`` is
        bogus (more responses than requests made): nothing taken.
    """
    cons, prod = _ld(state, 4), _ld(ring, 8)
    if (prod - cons) & _M32 > (_ld(state, 0) - cons) & _M32:
        return BOGUS
    while cons != prod:
        off = _slot_off(cons)
        rsp = bytes(ring[off : off + RING_SLOT])
        cons = (cons + 1) & _M32
        _st(state, 4, cons)  # the slot is free again
        out += rsp
        if seq >= 0 and _ld(rsp, 0) == seq:
            return 1
    return 0


def ring_collect(ring: Any, state: Any) -> bytes | None:
    """The responses there are, consumed without waiting: their slots, in order.

    Returns:
        The slots (b"" if none); None if ``rsp_prod`` is bogus (nothing consumed).
    """
    out = bytearray()
    return None if _consume(ring, state, -1, out) == BOGUS else bytes(out)


def _wait_rsp(ring: Any, state: Any, spin_ns: int, deadline: float, wait_fd: int,
              sock_fd: int) -> int:
    """Wait for a response (``xg_ring_wait_rsp``): 0 there is one, -2 the socket hung
    up, -3 timed out.  A signal handler's exception propagates (from ``poll``)."""
    cons = _ld(state, 4)
    if spin_ns > 0:
        end = time.monotonic_ns() + spin_ns
        while True:
            os.sched_yield()
            if _ld(ring, 8) != cons:
                return 0
            if time.monotonic_ns() >= end:
                break
    poller = select.poll()
    poller.register(wait_fd, select.POLLIN)
    poller.register(sock_fd, 0)
    while True:
        _st(ring, 12, cons + 1)  # RING_FINAL_CHECK_FOR_RESPONSES
        if _ld(ring, 8) != cons:
            return 0
        ms = -1
        if deadline > 0:
            left = (deadline - time.monotonic_ns()) / 1e6
            if left <= 0:
                return TIMED_OUT
            ms = int(left) + 1
        got = dict(poller.poll(ms))
        if got.get(wait_fd, 0) & select.POLLIN:
            _unkick(wait_fd)
        if _ld(ring, 8) != cons:
            return 0
        if got.get(sock_fd, 0) & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return HUNG_UP


def ring_map_one(ring: Any, state: Any, lock: Any, kick_fd: int, seq: int, gfn: int,
                 flags: int, ref: int, dom: int, spin_ns: int, timeout_ms: int, wait_fd: int,
                 sock_fd: int) -> tuple[int, bytes, BaseException | None]:
    """The one-page map on the ring: post it, then consume responses until its own.

    Returns:
        ``(status, rsps, signalled)`` as ``_cext.ring_map_one``: status 0
        (``seq``'s response is the last of ``rsps``), 5 (nothing sent), -2
        (the socket hung up), -3 (timed out), -4 (``rsp_prod`` is bogus);
        ``rsps`` every response slot consumed, in order; ``signalled`` what
        a signal handler raised while it waited (the wait went on).
    """
    if not _fits((seq, gfn, flags, ref, dom), _MAP_MAX):
        return NOT_SENT, b"", None
    slot = _map_slot(seq, gfn, flags, ref, dom)
    out = bytearray()
    status = NOT_SENT
    signalled: BaseException | None = None
    sent = _post(ring, state, lock, kick_fd, slot)
    if sent == -1:  # full: what is there first
        if _consume(ring, state, -1, out) == BOGUS:
            status = BOGUS
        else:
            sent = _post(ring, state, lock, kick_fd, slot)
    if sent == 1:
        deadline = 0.0 if timeout_ms < 0 else time.monotonic_ns() + timeout_ms * 1e6
        while True:
            got = _consume(ring, state, seq, out)
            if got:
                status = TAKEN if got == 1 else got
                break
            try:
                w = _wait_rsp(ring, state, spin_ns, deadline, wait_fd, sock_fd)
            except BaseException as e:  # a signal handler raised: the wait goes on
                signalled = signalled or e
                w = 1
            spin_ns = 0
            if w < 0:
                status = w
                break
    return status, bytes(out), signalled


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOLOCK = _NoLock()
