"""Shared rings as ``xen/include/public/io/ring.h`` defines them, over granted pages.

A PV protocol (blkif, netif, 9pfs, pvcalls, your own) shares one page -- or
``2**ring-page-order`` pages -- laid out by ``DEFINE_RING_TYPES(name, req_t,
rsp_t)``: four 32-bit indices, 48 bytes of ``pvt``/``__pad``, then slots, each
a ``union { req_t req; rsp_t rsp; }``.  The front end puts requests and takes
responses (:class:`FrontRing`), the back end takes requests and puts responses
(:class:`BackRing`); each keeps its private indices (``req_prod_pvt`` and
``rsp_cons``, ``rsp_prod_pvt`` and ``req_cons``) and publishes them with a
write barrier.  Give the request and response layouts as ctypes structures::

    class Req(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint64), ("op", ctypes.c_uint8), ...]

    front = FrontRing(share.mem, Req, Rsp)                 # SHARED_RING_INIT + FRONT_RING_INIT
    back = BackRing(mapping.mem, Req, Rsp)                 # BACK_RING_INIT (attach)
    front.put_request(Req(id=1))
    if front.push_requests_and_check_notify():             # RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
        port.notify()

The macros and what they become here:

- ``RING_SIZE``, ``__CONST_RING_SIZE``: :attr:`nr_ents`, :func:`ring_size`
- ``RING_FREE_REQUESTS``, ``RING_FULL``: :meth:`FrontRing.free_requests`, ``full``
- ``RING_GET_REQUEST`` / ``_RESPONSE`` (zero-copy views): :meth:`FrontRing.next_request`,
  :meth:`BackRing.next_response`, :meth:`BackRing.peek_request`
- ``RING_COPY_REQUEST`` / ``_RESPONSE``: :meth:`BackRing.get_request`,
  :meth:`BackRing.requests`, :meth:`FrontRing.get_response`, :meth:`FrontRing.responses`
- ``RING_HAS_UNCONSUMED_*``: :meth:`BackRing.unconsumed_requests`,
  :meth:`FrontRing.unconsumed_responses`
- ``RING_PUSH_*_AND_CHECK_NOTIFY``: :meth:`~FrontRing.push_requests_and_check_notify`,
  :meth:`~BackRing.push_responses_and_check_notify`
- ``RING_FINAL_CHECK_FOR_*``: :meth:`~BackRing.final_check_for_requests`,
  :meth:`~FrontRing.final_check_for_responses`
- ``RING_REQUEST_PROD_OVERFLOW``, ``RING_RESPONSE_PROD_OVERFLOW``: checked on every
  read of the peer's producer index (:class:`RingError`)
- ``RING_REQUEST_CONS_OVERFLOW``: ends :meth:`BackRing.requests` (blkback's loop)

Trust: the other end is another domain.  Its producer index is read once per
look (an atomic 32-bit load), checked against the ring size before anything
is read from a slot (a bad one raises :class:`RingError` naming the indices,
and the ring stays broken, as blkback halts a ring whose front end
"provided bogus ring requests"); slots are found by ``idx & (RING_SIZE - 1)``,
so no index can reach outside the ring; requests and responses are copied out
(``RING_COPY_*``) before the caller looks at them.  Our own indices are kept
privately: what the peer writes into them changes nothing we do.

Barriers: a slot is written with an ordinary copy, then the producer index
with a sequentially consistent 32-bit store (``xen_wmb`` then the store,
then ``xen_mb`` before reading the event index); indices are read with
atomic loads and ``xen_rmb`` before the slot is read (:mod:`xengrant._cext`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar, Union

from . import _cext
from .errors import XenError

#: ``RING_IDX`` arithmetic is modulo 2**32.
_M = 0xFFFFFFFF
#: Offsets of ``struct name_sring``'s four indices.
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
PAGE_SIZE = 4096

Req = TypeVar("Req", bound=ctypes.Structure)
Rsp = TypeVar("Rsp", bound=ctypes.Structure)

#: Memory a ring lives in: the share's or mapping's ``mem``, or any writable buffer.
Buffer = Union[memoryview, bytearray]


class Waiter(Protocol):
    """What the ring waits on: an :class:`~xengrant.evtport.EventPort`, or
    anything with its ``wait``/``wait_async`` (they may return a bool or raise
    :class:`TimeoutError`; the ring looks at its indices again either way)."""

    def wait(self, timeout: float | None = None) -> object: ...

    def wait_async(self, timeout: float | None = None) -> Awaitable[object]: ...


class RingError(XenError):
    """The other end broke the ring protocol (a bogus index); the ring is halted.

    Attributes:
        index: which one (``"req_prod"``, ``"rsp_prod"``).
        value: what the peer wrote.
        detail: the check that failed, with our indices.
    """

    def __init__(self, index: str, value: int, detail: str) -> None:
        self.index, self.value, self.detail = index, value, detail
        super().__init__(f"ring: bogus {index} {value} from the other end: {detail}")


class _Pvt(ctypes.Union):
    _fields_ = [("pvt_pad", ctypes.c_uint8 * 4)]


@functools.cache
def _entry(req: type[ctypes.Structure], rsp: type[ctypes.Structure]) -> type[ctypes.Union]:
    """``union name_sring_entry { req_t req; rsp_t rsp; }``."""
    return type("sring_entry", (ctypes.Union,), {"_fields_": [("req", req), ("rsp", rsp)]})


@functools.cache
def _sring(req: type[ctypes.Structure], rsp: type[ctypes.Structure]) -> type[ctypes.Structure]:
    """``DEFINE_RING_TYPES(name, req, rsp)``'s ``struct name_sring`` as ctypes."""
    entry = _entry(req, rsp)
    fields = [("req_prod", ctypes.c_uint32), ("req_event", ctypes.c_uint32),
              ("rsp_prod", ctypes.c_uint32), ("rsp_event", ctypes.c_uint32),
              ("pvt", _Pvt), ("__pad", ctypes.c_uint8 * 44), ("ring", entry * 1)]
    return type("sring", (ctypes.Structure,), {"_fields_": fields})


def sring_type(req: type[ctypes.Structure], rsp: type[ctypes.Structure]) -> type[ctypes.Structure]:
    """The ctypes ``struct name_sring`` of ``DEFINE_RING_TYPES(name, req, rsp)``
    (``ring`` declared with one entry, as in C)."""
    return _sring(req, rsp)


def slot_size(req: type[ctypes.Structure], rsp: type[ctypes.Structure]) -> int:
    """``sizeof(union name_sring_entry)``: the larger of the two, padded to their alignment."""
    return ctypes.sizeof(_entry(req, rsp))


def ring_offset(req: type[ctypes.Structure], rsp: type[ctypes.Structure]) -> int:
    """``offsetof(struct name_sring, ring)``: 64 on every ABI Xen supports."""
    return int(_sring(req, rsp).ring.offset)


def _rd32(x: int) -> int:
    """``__RD32``: round down to a power of two (0 stays 0)."""
    return 1 << (x.bit_length() - 1) if x > 0 else 0


def ring_size(req: type[ctypes.Structure], rsp: type[ctypes.Structure], nbytes: int) -> int:
    """``__CONST_RING_SIZE(name, nbytes)``: the slots of a ring of ``nbytes``.

    Raises:
        ValueError: not even one slot fits.
    """
    n = _rd32((nbytes - ring_offset(req, rsp)) // slot_size(req, rsp))
    if n < 1:
        raise ValueError(f"ring: a {nbytes}-byte ring holds no {slot_size(req, rsp)}-byte slot")
    return n


def shared_ring_init(mem: Buffer) -> None:
    """``SHARED_RING_INIT``: producers 0, event indices 1, ``pvt`` and ``__pad`` zeroed."""
    m = memoryview(mem).cast("B")
    m[16:64] = bytes(48)
    for off, v in ((REQ_PROD, 0), (RSP_PROD, 0), (REQ_EVENT, 1), (RSP_EVENT, 1)):
        _cext.store32(m, off, v)


class _Ring(Generic[Req, Rsp]):
    """What both ends share: the memory, the layout, the slot arithmetic."""

    def __init__(self, mem: Buffer, req: type[Req], rsp: type[Rsp]) -> None:
        self.mem = memoryview(mem).cast("B")
        if self.mem.readonly:
            raise ValueError("ring: the ring's memory must be writable")
        self.req_type, self.rsp_type = req, rsp
        self.slot = slot_size(req, rsp)
        self.base = ring_offset(req, rsp)
        #: ``RING_SIZE``: slots, a power of two.
        self.nr_ents = ring_size(req, rsp, len(self.mem))
        self._mask = self.nr_ents - 1
        self.error: RingError | None = None

    def _off(self, idx: int) -> int:
        """The byte offset of slot ``idx`` (``RING_GET_*``: ``idx & (RING_SIZE - 1)``)."""
        return self.base + (idx & self._mask) * self.slot

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _broken(self, index: str, value: int, detail: str) -> RingError:
        self.error = RingError(index, value, detail)
        return self.error

    def indices(self) -> tuple[int, int, int, int]:
        """The shared ``(req_prod, req_event, rsp_prod, rsp_event)``, as they are now."""
        m = self.mem
        return (_cext.load32(m, 0), _cext.load32(m, 4), _cext.load32(m, 8), _cext.load32(m, 12))

    def release(self) -> None:
        """Drop this end's view of the memory (so the mapping or share can go)."""
        self.mem.release()


class FrontRing(_Ring[Req, Rsp]):
    """The front end: puts requests, takes responses (``name_front_ring``).

    Args:
        mem: the ring's memory (the share's ``mem``): one page or several.
        req, rsp: the ctypes request and response structures.
        init: ``XEN_FRONT_RING_INIT`` (``SHARED_RING_INIT`` first) when True,
            else ``FRONT_RING_ATTACH`` to a ring already in use at ``start``.
        start: the index to attach at.

    Raises:
        ValueError: read-only memory, or too small for one slot.
    """

    def __init__(self, mem: Buffer, req: type[Req], rsp: type[Rsp], *, init: bool = True,
                 start: int = 0) -> None:
        super().__init__(mem, req, rsp)
        if init:
            shared_ring_init(self.mem)
        self.req_prod_pvt = start & _M
        self.rsp_cons = start & _M
        self._pushed = start & _M

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``: slots this end may still fill."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _M)

    @property
    def full(self) -> bool:
        """``RING_FULL``."""
        return self.free_requests() == 0

    def next_request(self) -> Req:
        """``RING_GET_REQUEST(r, req_prod_pvt++)``: the next request slot, in place.

        The view is zero-copy (``from_buffer`` on the ring): fill it, then
        push.  Drop it before unmapping the ring.

        Raises:
            RingError: the ring is halted.
            BufferError: the ring is full.
        """
        self._check()
        if self.full:
            raise BufferError(f"ring: full ({self.nr_ents} requests not answered)")
        view = self.req_type.from_buffer(self.mem, self._off(self.req_prod_pvt))
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _M
        return view

    def put_request(self, req: Req | bytes) -> None:
        """Copy ``req`` into the next request slot (then push).

        Raises:
            BufferError: the ring is full.
            ValueError: ``req`` is larger than a request.
        """
        data = bytes(req)
        if len(data) > ctypes.sizeof(self.req_type):
            raise ValueError(f"ring: a {len(data)}-byte request does not fit "
                             f"{ctypes.sizeof(self.req_type)} bytes")
        self._check()
        if self.full:
            raise BufferError(f"ring: full ({self.nr_ents} requests not answered)")
        off = self._off(self.req_prod_pvt)
        self.mem[off : off + len(data)] = data
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _M

    def push_requests(self) -> None:
        """``RING_PUSH_REQUESTS``: publish the requests put (write barrier, then ``req_prod``)."""
        _cext.wmb()
        _cext.store32(self.mem, REQ_PROD, self.req_prod_pvt)
        self._pushed = self.req_prod_pvt

    def push_requests_and_check_notify(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish, and say whether the back
        end asked to be notified of these (the push crossed ``req_event``).

        Returns:
            True: send an event.
        """
        old, new = self._pushed, self.req_prod_pvt
        self.push_requests()  # the store is sequentially consistent: xen_mb
        event: int = _cext.load32(self.mem, REQ_EVENT)
        return ((new - event) & _M) < ((new - old) & _M)

    def unconsumed_responses(self) -> int:
        """``RING_HAS_UNCONSUMED_RESPONSES``: responses there to take.

        Raises:
            RingError: ``RING_RESPONSE_PROD_OVERFLOW`` (more than a ring of
                responses), or responses to requests never pushed.
        """
        self._check()
        prod: int = _cext.load32(self.mem, RSP_PROD)
        n = (prod - self.rsp_cons) & _M
        if n > self.nr_ents:
            raise self._broken("rsp_prod", prod, f"{n} responses after rsp_cons {self.rsp_cons} "
                               f"in a ring of {self.nr_ents} (RING_RESPONSE_PROD_OVERFLOW)")
        if n > ((self._pushed - self.rsp_cons) & _M):
            raise self._broken("rsp_prod", prod, f"{n} responses after rsp_cons {self.rsp_cons} "
                               f"but only requests up to {self._pushed} were pushed")
        return n

    def get_response(self) -> Rsp | None:
        """``RING_COPY_RESPONSE(r, rsp_cons++)``: the next response, copied out, or None.

        Raises:
            RingError: see :meth:`unconsumed_responses`.
        """
        if not self.unconsumed_responses():
            return None
        _cext.rmb()  # the slot is read after rsp_prod
        rsp = self.rsp_type.from_buffer_copy(self.mem, self._off(self.rsp_cons))
        self.rsp_cons = (self.rsp_cons + 1) & _M
        return rsp

    def responses(self) -> list[Rsp]:
        """Every response there is now, copied out and consumed.

        Raises:
            RingError: see :meth:`unconsumed_responses`.
        """
        n = self.unconsumed_responses()
        _cext.rmb()
        out = []
        for _ in range(n):
            out.append(self.rsp_type.from_buffer_copy(self.mem, self._off(self.rsp_cons)))
            self.rsp_cons = (self.rsp_cons + 1) & _M
        return out

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: before sleeping, ask for an event on the
        next response (``rsp_event = rsp_cons + 1``), then look once more.

        Returns:
            True: responses are there (do not sleep).
        """
        if self.unconsumed_responses():
            return True
        _cext.store32(self.mem, RSP_EVENT, (self.rsp_cons + 1) & _M)  # then xen_mb
        return bool(self.unconsumed_responses())

    def wait_for_responses(self, port: Waiter, timeout: float | None = None) -> None:
        """Sleep on ``port`` (an :class:`~xengrant.evtport.EventPort`) until a
        response is there (:meth:`final_check_for_responses` between sleeps).

        Args:
            port: the ring's event port.
            timeout: seconds (None: for ever; 0: only look).

        Raises:
            TimeoutError: no response came in ``timeout``.
            RingError: the back end broke the ring.
        """
        _wait(self.final_check_for_responses, port, timeout, "wait_for_responses")

    async def wait_for_responses_async(self, port: Waiter, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`wait_for_responses`.

        Raises:
            TimeoutError: no response came in ``timeout``.
            RingError: the back end broke the ring.
        """
        await _wait_async(self.final_check_for_responses, port, timeout, "wait_for_responses")


class BackRing(_Ring[Req, Rsp]):
    """The back end: takes requests, puts responses (``name_back_ring``).

    Args:
        mem: the front end's ring, mapped writable (one page or several).
        req, rsp: the ctypes request and response structures.
        start: ``BACK_RING_ATTACH`` at this index (0: ``BACK_RING_INIT``).

    Raises:
        ValueError: read-only memory, or too small for one slot.
    """

    def __init__(self, mem: Buffer, req: type[Req], rsp: type[Rsp], *, start: int = 0) -> None:
        super().__init__(mem, req, rsp)
        self.rsp_prod_pvt = start & _M
        self.req_cons = start & _M
        self._pushed = start & _M

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``: requests to take, at most the free
        response slots.

        Raises:
            RingError: ``RING_REQUEST_PROD_OVERFLOW`` -- ``req_prod`` claims more
                than a ring of requests not answered (blkback halts the ring).
        """
        self._check()
        prod: int = _cext.load32(self.mem, REQ_PROD)
        if ((prod - self.rsp_prod_pvt) & _M) > self.nr_ents:
            raise self._broken("req_prod", prod, f"{(prod - self.rsp_prod_pvt) & _M} requests "
                               f"after rsp_prod_pvt {self.rsp_prod_pvt} in a ring of "
                               f"{self.nr_ents} (RING_REQUEST_PROD_OVERFLOW)")
        req = (prod - self.req_cons) & _M
        rsp = self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & _M)
        return min(req, rsp)

    def _cons_overflow(self, cons: int) -> bool:
        """``RING_REQUEST_CONS_OVERFLOW``: would taking ``cons`` overrun the responses?"""
        return ((cons - self.rsp_prod_pvt) & _M) >= self.nr_ents

    def peek_request(self) -> Req | None:
        """``RING_GET_REQUEST(r, req_cons)`` in place (zero-copy, not consumed), or None.

        The front end may change it under you: copy what you check
        (:meth:`get_request` does).
        """
        if not self.unconsumed_requests():
            return None
        _cext.rmb()
        return self.req_type.from_buffer(self.mem, self._off(self.req_cons))

    def get_request(self) -> Req | None:
        """``RING_COPY_REQUEST(r, req_cons++)``: the next request, copied out, or None.

        Raises:
            RingError: see :meth:`unconsumed_requests`.
        """
        if not self.unconsumed_requests():
            return None
        _cext.rmb()  # the slot is read after req_prod
        req = self.req_type.from_buffer_copy(self.mem, self._off(self.req_cons))
        self.req_cons = (self.req_cons + 1) & _M
        return req

    def requests(self) -> list[Req]:
        """The requests there are now, copied out and consumed (blkback's loop:
        ``rc != rp`` and not ``RING_REQUEST_CONS_OVERFLOW``).

        Raises:
            RingError: see :meth:`unconsumed_requests`.
        """
        prod = (self.req_cons + self.unconsumed_requests()) & _M
        _cext.rmb()
        out = []
        while self.req_cons != prod and not self._cons_overflow(self.req_cons):
            out.append(self.req_type.from_buffer_copy(self.mem, self._off(self.req_cons)))
            self.req_cons = (self.req_cons + 1) & _M
        return out

    def next_response(self) -> Rsp:
        """``RING_GET_RESPONSE(r, rsp_prod_pvt++)``: the next response slot, in place.

        Raises:
            BufferError: no request is waiting for this response.
        """
        self._check()
        if self.rsp_prod_pvt == self.req_cons:
            raise BufferError("ring: every request taken is answered already")
        view = self.rsp_type.from_buffer(self.mem, self._off(self.rsp_prod_pvt))
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _M
        return view

    def put_response(self, rsp: Rsp | bytes) -> None:
        """Copy ``rsp`` into the next response slot (then push).

        Raises:
            BufferError: no request taken is waiting for a response.
            ValueError: ``rsp`` is larger than a response.
        """
        data = bytes(rsp)
        if len(data) > ctypes.sizeof(self.rsp_type):
            raise ValueError(f"ring: a {len(data)}-byte response does not fit "
                             f"{ctypes.sizeof(self.rsp_type)} bytes")
        self._check()
        if self.rsp_prod_pvt == self.req_cons:
            raise BufferError("ring: every request taken is answered already")
        off = self._off(self.rsp_prod_pvt)
        self.mem[off : off + len(data)] = data
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _M

    def push_responses(self) -> None:
        """``RING_PUSH_RESPONSES``: publish (write barrier, then ``rsp_prod``)."""
        _cext.wmb()
        _cext.store32(self.mem, RSP_PROD, self.rsp_prod_pvt)
        self._pushed = self.rsp_prod_pvt

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``.

        Returns:
            True: the front end asked for an event (the push crossed ``rsp_event``).
        """
        old, new = self._pushed, self.rsp_prod_pvt
        self.push_responses()
        event: int = _cext.load32(self.mem, RSP_EVENT)
        return ((new - event) & _M) < ((new - old) & _M)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: set ``req_event = req_cons + 1``, look again.

        Returns:
            True: requests are there (do not sleep).
        """
        if self.unconsumed_requests():
            return True
        _cext.store32(self.mem, REQ_EVENT, (self.req_cons + 1) & _M)
        return bool(self.unconsumed_requests())

    def wait_for_requests(self, port: Waiter, timeout: float | None = None) -> None:
        """Sleep on ``port`` until a request is there (:meth:`final_check_for_requests`
        between sleeps).

        Args:
            port: the ring's event port.
            timeout: seconds (None: for ever; 0: only look).

        Raises:
            TimeoutError: no request came in ``timeout``.
            RingError: the front end broke the ring.
        """
        _wait(self.final_check_for_requests, port, timeout, "wait_for_requests")

    async def wait_for_requests_async(self, port: Waiter, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`wait_for_requests`.

        Raises:
            TimeoutError: no request came in ``timeout``.
            RingError: the front end broke the ring.
        """
        await _wait_async(self.final_check_for_requests, port, timeout, "wait_for_requests")


def _timed_out(op: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"ring {op}: nothing came in {timeout} s")


def _wait(check: Callable[[], bool], port: Waiter, timeout: float | None, op: str) -> None:
    """Final check, sleep on ``port``, until ``check`` says there is work."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not check():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise _timed_out(op, timeout)
        # A port's own timeout (False or TimeoutError) is not ours: look again first.
        with contextlib.suppress(TimeoutError):
            port.wait(left)


async def _wait_async(check: Callable[[], bool], port: Waiter, timeout: float | None,
                      op: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while not check():
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            raise _timed_out(op, timeout)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await port.wait_async(left)
