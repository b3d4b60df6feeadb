"""The :class:`Vchan` itself: setup as ``libxenvchan_server_init``/``client_init``
(``tools/libs/vchan/init.c``), reads and writes as ``io.c``, blocking with a timeout and
asyncio twins.  See :mod:`xengrant.vchan` for the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .. import _cext
from ..evtport import EventPort
from .init import client_init, server_init
from .layout import (
    _CAS_TRIES,
    _M,
    CLI_LIVE,
    CLI_NOTIFY,
    SRV_LIVE,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    VchanError,
    server_orders,
)


class VchanDomain(Protocol):
    """What a vchan needs of a domain: ``domain`` of :func:`xengrant.service.connect`,
    or on real Xen an object holding ``xengrant.linux.open_xenstore()``,
    ``EventChannels()`` and ``open_backend()``'s ``gntshr``/``gnttab``.

    ``xs`` is used for ``read``/``write``/``set_perms``/``rm``, ``evtchn`` through
    :class:`~xengrant.evtport.EventPort`, ``gntshr`` (a server) to share and
    ``gnttab`` (a client) to map; ``domid`` when xenstore cannot say it.
    """

    @property
    def domid(self) -> int: ...

    @property
    def xs(self) -> object: ...

    @property
    def evtchn(self) -> object: ...

    @property
    def gntshr(self) -> object: ...

    @property
    def gnttab(self) -> object: ...


class VchanTimeout(TimeoutError):
    """A blocking vchan call's ``timeout`` passed.

    Attributes:
        op: the call (``"read"``, ``"write"``, ``"wait"`` ...).
        written: bytes a stream :meth:`Vchan.write` moved before it timed out
            (0 for every other call).
    """

    def __init__(self, op: str, timeout: float | None) -> None:
        self.op = op
        self.written = 0
        after = "" if timeout is None else f" after {timeout} s"
        super().__init__(f"vchan {op}: timed out{after}")


class _Again:
    """A step's answer "nothing moved yet: sleep, then try again"."""


_AGAIN = _Again()
_T = TypeVar("_T")
_R = TypeVar("_R", bytes, int)


class _WriteStep:
    """``libxenvchan_write``'s loop body, keeping how much went (``pos``)."""

    def __init__(self, vchan: Vchan, view: memoryview) -> None:
        self.v, self.view, self.pos = vchan, view, 0

    def __call__(self) -> int | _Again:
        v, view = self.v, self.view
        size = len(view)
        if not v.is_open():
            after = f" after {self.pos} of {size} bytes" if self.pos else ""
            raise BrokenPipeError(errno.EPIPE, f"vchan write: the peer closed{after}")
        avail = min(v._fast_buffer_space(size - self.pos), size - self.pos)
        if avail:
            self.pos += v._do_send(view[self.pos : self.pos + avail])
        if self.pos == size or not v.blocking:
            return self.pos
        return _AGAIN


class Vchan:
    """One end of a vchan.  Make it with :meth:`server` or :meth:`client`.

    Attributes:
        is_server: which end.
        blocking: whether reads and writes wait (``ctrl->blocking``; default True).
        spin: seconds a blocking call polls the ring before it asks the peer for
            an event and sleeps (default 0, as libxenvchan).  A peer that answers
            within it sends no event, which saves the event's trip (through the
            service: most of a round trip) for the CPU the polling takes; the
            asyncio calls never poll.
        server_persist: the server stays open when the client goes.
        peer: the other domain.
        port: the :class:`~xengrant.evtport.EventPort`.
        read_size, write_size: the rings' sizes in bytes.
    """

    def __init__(self) -> None:
        self.is_server = False
        self.blocking = True
        self.server_persist = False
        self.closed = False
        self.peer = -1
        self.xs_path = ""
        self._dom: Any = None
        self.port: EventPort | None = None
        self._ring: Any = None  # the Share (server) or Mapping (client) of the page
        self._bufs: list[Any] = []  # shares or mappings of ring pages
        self._hdr: memoryview = memoryview(b"")
        self._rd: memoryview = memoryview(b"")
        self._wr: memoryview = memoryview(b"")
        self.read_size = self.write_size = 0
        self._rd_shr = self._wr_shr = 0
        self._rd_cons = self._wr_prod = 0
        # Bytes in the 16-bit word at CLI_NOTIFY: ours to set, the peer's to clear.
        self._ask_shift = self._tell_shift = 0
        self._live = 0
        self._cv = threading.Condition()
        self._waiting = False
        self._gen = 0
        self._waiter: asyncio.Task[None] | None = None  # the asyncio side's wait on the port
        self.spin = 0.0

    # ---------------------------------------------------------------- setup
    @classmethod
    def server(
        cls, dom: VchanDomain, peer: int, xs_path: str, left_min: int = 1024, right_min: int = 2048
    ) -> Vchan:
        """``libxenvchan_server_init``: offer a vchan to ``peer`` at ``xs_path``.

        Args:
            dom: this domain: ``.xs``, ``.evtchn``, ``.gntshr`` (``domain`` of
                :func:`xengrant.service.connect`, or an object with those).
            peer: the client's domain id.
            xs_path: where ``ring-ref`` and ``event-channel`` go.
            left_min: bytes at least in the ring the client writes (we read).
            right_min: bytes at least in the ring we write.

        Raises:
            ValueError: a size over 1 MiB.
            VchanError, GrantError, XenStoreError, EvtchnError: setup failed
                (nothing stays shared, bound or written).
        """
        read_order, write_order = server_orders(left_min, right_min)
        self = cls()
        try:
            server_init(self, dom, peer, xs_path, read_order, write_order)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def client(cls, dom: VchanDomain, peer: int, xs_path: str) -> Vchan:
        """``libxenvchan_client_init``: connect to the server ``peer`` offers at ``xs_path``.

        Args:
            dom: this domain: ``.xs``, ``.evtchn``, ``.gnttab``.
            peer: the server's domain id.
            xs_path: the server's path.

        Raises:
            VchanError: ENOENT (no such nodes), EPROTO (bad values or orders).
            GrantError, EvtchnError: the grant or port does not map/bind.
        """
        self = cls()
        try:
            client_init(self, dom, peer, xs_path)
        except BaseException:
            self.close()
            raise
        return self

    # ---------------------------------------------------------------- bytes
    def _fetch_or(self, shift: int, bit: int) -> int:
        return int(_cext.fetch_or16(self._hdr, CLI_NOTIFY, bit << shift)) >> shift & 0xFF

    def _set_byte(self, off: int, value: int) -> None:
        """Store one byte of the u16 at ``off & ~1`` (the other byte kept, atomically)."""
        word, shift = off & ~1, (off & 1) * 8
        for _ in range(_CAS_TRIES):  # bounded: the peer may change its byte all the time
            old = _cext.load16(self._hdr, word)
            new = (old & ~(0xFF << shift) & 0xFFFF) | (value << shift)
            if _cext.cmpxchg16(self._hdr, word, old, new) == old:
                return
        raise VchanError("set_flag", f"the peer kept changing the header's word at {word}")

    def _byte(self, off: int) -> int:
        return int(_cext.load16(self._hdr, off & ~1)) >> ((off & 1) * 8) & 0xFF

    def _request_notify(self, bit: int) -> None:
        """``request_notify``: ask the peer for an event (then ``xen_mb``)."""
        self._fetch_or(self._ask_shift, bit)

    def _send_notify(self, bit: int) -> None:
        """``send_notify``: clear the peer's request; notify if it was set."""
        prev = _cext.fetch_and16(self._hdr, CLI_NOTIFY, ~(bit << self._tell_shift) & 0xFFFF)
        if prev >> self._tell_shift & bit:
            assert self.port is not None
            self.port.notify()

    def _live_check(self, op: str) -> None:
        if self.closed:
            raise ValueError(f"vchan {op}: the vchan is closed")

    def _raw_data_ready(self) -> int:
        prod: int = _cext.load32(self._hdr, self._rd_shr + 4)
        ready = (prod - self._rd_cons) & _M
        if ready > self.read_size:
            raise VchanError(
                "read",
                f"the peer's prod {prod} is {ready} bytes past our cons "
                f"{self._rd_cons} in a {self.read_size}-byte ring",
            )
        return ready

    def _raw_buffer_space(self) -> int:
        cons: int = _cext.load32(self._hdr, self._wr_shr)
        used = (self._wr_prod - cons) & _M
        if used > self.write_size:
            raise VchanError(
                "write",
                f"the peer's cons {cons} is {(-used) & _M} bytes past "
                f"our prod {self._wr_prod} in a {self.write_size}-byte ring",
            )
        return self.write_size - used

    def _fast_data_ready(self, request: int) -> int:
        ready = self._raw_data_ready()
        if ready >= request:
            return ready
        self._request_notify(VCHAN_NOTIFY_WRITE)
        return self._raw_data_ready()

    def _fast_buffer_space(self, request: int) -> int:
        ready = self._raw_buffer_space()
        if ready >= request:
            return ready
        self._request_notify(VCHAN_NOTIFY_READ)
        return self._raw_buffer_space()

    def data_ready(self) -> int:
        """``libxenvchan_data_ready``: bytes there to read (and ask for an event
        when more come).

        Raises:
            VchanError: the peer's index is bogus.
        """
        self._live_check("data_ready")
        self._request_notify(VCHAN_NOTIFY_WRITE)
        return self._raw_data_ready()

    def buffer_space(self) -> int:
        """``libxenvchan_buffer_space``: bytes that can be written now."""
        self._live_check("buffer_space")
        self._request_notify(VCHAN_NOTIFY_READ)
        return self._raw_buffer_space()

    def is_open(self) -> bool:
        """``libxenvchan_is_open``: the peer has not closed (a server: also before
        the client came, ``cli_live`` 2)."""
        if self.closed:
            return False
        if self.is_server and self.server_persist:
            return True
        return self._byte(self._live) != 0

    @property
    def connected(self) -> bool:
        """A server's client has come (``cli_live`` is not 2); always True for a client."""
        return not self.is_server or self._byte(CLI_LIVE) != 2

    def wait(self, timeout: float | None = None) -> None:
        """``libxenvchan_wait``: wait for an event from the peer.

        Args:
            timeout: seconds (None: for ever; 0: take an event already there).

        Raises:
            VchanTimeout: no event came in ``timeout``.
            ValueError: the vchan is closed.
        """
        self._live_check("wait")
        assert self.port is not None
        try:
            self.port.wait(timeout)  # EventPort.wait raises TimeoutError
        except TimeoutError:
            raise VchanTimeout("wait", timeout) from None

    async def wait_async(self, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`wait`.

        Raises:
            VchanTimeout: no event came in ``timeout``.
            ValueError: the vchan is closed.
        """
        self._live_check("wait")
        assert self.port is not None
        try:
            await self.port.wait_async(timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise VchanTimeout("wait", timeout) from None

    def fileno(self) -> int:
        """``libxenvchan_fd_for_select``: readable when an event may have come
        (see :meth:`~xengrant.evtport.EventPort.fileno`)."""
        assert self.port is not None
        return self.port.fileno()

    def _do_send(self, data: memoryview) -> int:
        size = len(data)
        idx = self._wr_prod & (self.write_size - 1)
        contig = min(self.write_size - idx, size)
        _cext.mb()  # read indexes /then/ write data
        self._wr[idx : idx + contig] = data[:contig]
        if contig < size:
            self._wr[: size - contig] = data[contig:]
        _cext.wmb()  # write data /then/ publish
        self._wr_prod = (self._wr_prod + size) & _M
        _cext.store32(self._hdr, self._wr_shr + 4, self._wr_prod)
        self._send_notify(VCHAN_NOTIFY_WRITE)
        return size

    def _do_recv(self, size: int) -> bytes:
        """``do_recv``: ``size`` bytes out of the ring, as bytes (one copy)."""
        rd = self._rd
        idx = self._rd_cons & (self.read_size - 1)
        contig = min(self.read_size - idx, size)
        _cext.rmb()  # data read /after/ prod read
        if contig == size:
            out = bytes(rd[idx : idx + size])
        else:  # the ring wraps: one copy of both parts
            out = b"".join((rd[idx:], rd[: size - contig]))
        self._consumed(size)
        return out

    def _do_recv_into(self, dst: memoryview, size: int) -> int:
        """``do_recv`` into the caller's buffer (``libxenvchan_read``'s ``data``)."""
        rd = self._rd
        idx = self._rd_cons & (self.read_size - 1)
        contig = min(self.read_size - idx, size)
        _cext.rmb()  # data read /after/ prod read
        dst[:contig] = rd[idx : idx + contig]
        if contig < size:
            dst[contig:size] = rd[: size - contig]
        self._consumed(size)
        return size

    def _consumed(self, size: int) -> None:
        """Publish ``cons`` after a read, then tell a writer that asked."""
        _cext.mb()  # consume /then/ notify
        self._rd_cons = cons = (self._rd_cons + size) & _M
        _cext.store32(self._hdr, self._rd_shr, cons)
        self._send_notify(VCHAN_NOTIFY_READ)

    # ------------------------------------------------------ blocking calls
    # Each call is one step -- look at the ring, move what can move, answer or
    # say "again" -- and one of two drivers that sleep on the event port between
    # steps until the step answers or the deadline passes: the blocking calls
    # (read, recv, write, send, wait_connected) and their asyncio twins share
    # the steps, so io.c's rules are written once.

    def _sleep(self, deadline: float | None, op: str, gen: int) -> None:
        """Wait for the peer's next event after ``gen`` (read before the caller
        last looked at the ring).

        Threads may share a vchan (one reads while another writes): one of
        them waits on the port, the others for it to come back; every event
        taken bumps the generation and wakes them all, and each looks at its
        own ring again.  An event taken by another thread since the caller
        looked ends the wait at once, so none is lost.

        Raises:
            VchanTimeout: ``deadline`` has passed.
        """
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise VchanTimeout(op, None)
        assert self.port is not None
        with self._cv:
            if self._gen != gen:
                return
            if self._waiting:
                self._cv.wait_for(lambda: self._gen != gen or not self._waiting, left)
                return
            self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):  # the caller looks, then times out
                self.port.wait(left)
        finally:
            with self._cv:
                self._waiting = False
                self._gen += 1
                self._cv.notify_all()

    async def _sleep_async(self, deadline: float | None, op: str, gen: int) -> None:
        """asyncio twin of :meth:`_sleep`: tasks of one loop share one wait on
        the port (a second reader on the same descriptor would replace the first)."""
        loop = asyncio.get_running_loop()
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            raise VchanTimeout(op, None)
        if self._gen != gen:
            return
        task = self._waiter
        if task is None or task.done():
            task = self._waiter = loop.create_task(self._port_wait_async(left))
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), left)

    async def _port_wait_async(self, left: float | None) -> None:
        assert self.port is not None
        try:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await self.port.wait_async(left)
        finally:
            self._gen += 1

    def _drive(
        self,
        op: str,
        step: Callable[[], _T | _Again],
        timeout: float | None,
        ready: Callable[[], bool] | None = None,
    ) -> _T:
        """Run ``step`` until it answers, sleeping on the port between tries
        (polling ``ready`` for :attr:`spin` seconds first, when set)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if ready is not None and self.spin > 0 and self.blocking:
                self._spin(ready, deadline)
            gen = self._gen
            got = step()
            if not isinstance(got, _Again):
                return got
            self._sleep(deadline, op, gen)

    def _spin(self, ready: Callable[[], bool], deadline: float | None) -> None:
        """Poll ``ready`` -- the ring alone, asking the peer for nothing -- for up to
        :attr:`spin` seconds, giving the CPU (and the GIL) away between looks.

        A peer that moves the ring meanwhile finds no ``VCHAN_NOTIFY_*`` bit set
        and sends no event: the event's trip (through the service, or Xen) is
        saved, at the cost of this CPU while polling.
        """
        end = time.monotonic() + self.spin
        if deadline is not None:
            end = min(end, deadline)
        while not ready():
            if time.monotonic() >= end:
                return
            os.sched_yield()

    async def _drive_async(
        self, op: str, step: Callable[[], _T | _Again], timeout: float | None
    ) -> _T:
        """asyncio twin of :meth:`_drive`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            gen = self._gen
            got = step()
            if not isinstance(got, _Again):
                return got
            await self._sleep_async(deadline, op, gen)

    def _send_step(self, data: bytes | bytearray | memoryview) -> Callable[[], int | _Again]:
        """``libxenvchan_send``'s loop body: all of ``data``, or nothing."""
        view = memoryview(data).cast("B")

        def step() -> int | _Again:
            if not self.is_open():
                raise BrokenPipeError(errno.EPIPE, "vchan send: the peer closed")
            if len(view) <= self._fast_buffer_space(len(view)):
                return self._do_send(view)
            if not self.blocking:
                return 0
            if len(view) > self.write_size:
                raise ValueError(
                    f"vchan send: {len(view)} bytes do not fit a {self.write_size}-byte ring"
                )
            return _AGAIN

        return step

    def _write_step(self, data: bytes | bytearray | memoryview) -> _WriteStep:
        """``libxenvchan_write``'s loop body: blocking, all of ``data``; not, what fits."""
        return _WriteStep(self, memoryview(data).cast("B"))

    def _recv_step(
        self, size: int, take: Callable[[int], _R], eof: _R
    ) -> Callable[[], _R | _Again | None]:
        """``libxenvchan_recv``'s loop body: exactly ``size`` bytes, ``take``-n out
        (as bytes, or into a buffer); ``eof`` when the peer closed with fewer."""

        def step() -> _R | _Again | None:
            if size <= self._fast_data_ready(size):
                return take(size)
            if not self.is_open():
                return eof
            if not self.blocking:
                return None
            if size > self.read_size:
                raise ValueError(
                    f"vchan recv: {size} bytes do not fit a {self.read_size}-byte ring"
                )
            return _AGAIN

        return step

    def _read_step(
        self, size: int, take: Callable[[int], _R], eof: _R
    ) -> Callable[[], _R | _Again | None]:
        """``libxenvchan_read``'s loop body: what is there, up to ``size``."""

        def step() -> _R | _Again | None:
            avail = self._fast_data_ready(size)
            if avail:
                return take(min(size, avail))
            if not self.is_open():
                return eof
            if not self.blocking:
                return None
            return _AGAIN

        return step

    def _into(self, buf: bytearray | memoryview) -> tuple[memoryview, Callable[[int], int]]:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("vchan: the buffer to read into is read-only")
        return view, functools.partial(self._do_recv_into, view)

    def _has(self, size: int) -> Callable[[], bool]:
        """For :meth:`_spin`: ``size`` bytes are there to read, or the peer closed."""
        return lambda: self._raw_data_ready() >= size or not self.is_open()

    def _connected_step(self) -> _Again | None:
        return None if self.connected else _AGAIN

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> int:
        """``libxenvchan_send``: write all of ``data`` as one packet, or nothing.

        Args:
            data: the packet.
            timeout: seconds to wait for room (blocking; None: for ever).

        Returns:
            ``len(data)``, or 0 when non-blocking and there is no room.

        Raises:
            BrokenPipeError: the peer closed.
            ValueError: ``data`` is larger than the ring (it could never fit).
            VchanTimeout: blocking, and ``timeout`` passed (nothing was written).
            VchanError: the peer's index is bogus.
        """
        self._live_check("send")
        need = memoryview(data).nbytes
        return self._drive(
            "send",
            self._send_step(data),
            timeout,
            lambda: self._raw_buffer_space() >= need or not self.is_open(),
        )

    async def send_async(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> int:
        """asyncio twin of :meth:`send` (waits without blocking the loop).

        Raises:
            BrokenPipeError, ValueError, VchanTimeout, VchanError: as :meth:`send`.
        """
        self._live_check("send")
        return await self._drive_async("send", self._send_step(data), timeout)

    def write(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> int:
        """``libxenvchan_write``: stream ``data`` (blocking: all of it; non-blocking:
        what fits now).

        Args:
            data: the bytes.
            timeout: seconds to wait for room (blocking; None: for ever).

        Returns:
            Bytes written.

        Raises:
            BrokenPipeError: the peer closed (blocking: before all was written).
            VchanTimeout: blocking, and ``timeout`` passed (its ``written`` says
                how much went).
            VchanError: the peer's index is bogus.
        """
        self._live_check("write")
        step = self._write_step(data)
        try:
            return self._drive(
                "write", step, timeout, lambda: self._raw_buffer_space() > 0 or not self.is_open()
            )
        except VchanTimeout as e:
            e.written = step.pos
            raise

    async def write_async(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> int:
        """asyncio twin of :meth:`write`.

        Raises:
            BrokenPipeError, VchanTimeout, VchanError: as :meth:`write`.
        """
        self._live_check("write")
        step = self._write_step(data)
        try:
            return await self._drive_async("write", step, timeout)
        except VchanTimeout as e:
            e.written = step.pos
            raise

    def recv(self, size: int, timeout: float | None = None) -> bytes | None:
        """``libxenvchan_recv``: read exactly ``size`` bytes (a packet).

        Args:
            size: bytes.
            timeout: seconds to wait for them (blocking; None: for ever).

        Returns:
            The bytes; ``None`` when non-blocking and fewer are there; ``b""``
            when the peer closed with fewer there.

        Raises:
            ValueError: ``size`` is larger than the ring (blocking).
            VchanTimeout: blocking, and ``timeout`` passed (nothing was read).
            VchanError: the peer's index is bogus.
        """
        self._live_check("recv")
        return self._drive(
            "recv", self._recv_step(size, self._do_recv, b""), timeout, self._has(size)
        )

    async def recv_async(self, size: int, timeout: float | None = None) -> bytes | None:
        """asyncio twin of :meth:`recv`.

        Raises:
            ValueError, VchanTimeout, VchanError: as :meth:`recv`.
        """
        self._live_check("recv")
        return await self._drive_async("recv", self._recv_step(size, self._do_recv, b""), timeout)

    def read(self, size: int, timeout: float | None = None) -> bytes | None:
        """``libxenvchan_read``: read up to ``size`` bytes (a stream).

        Args:
            size: bytes at most.
            timeout: seconds to wait for one (blocking; None: for ever).

        Returns:
            What was there (at least one byte); ``None`` when non-blocking and
            nothing is there; ``b""`` when the peer closed and nothing is left.

        Raises:
            VchanTimeout: blocking, and ``timeout`` passed.
            VchanError: the peer's index is bogus.
        """
        self._live_check("read")
        return self._drive("read", self._read_step(size, self._do_recv, b""), timeout, self._has(1))

    async def read_async(self, size: int, timeout: float | None = None) -> bytes | None:
        """asyncio twin of :meth:`read`.

        Raises:
            VchanTimeout, VchanError: as :meth:`read`.
        """
        self._live_check("read")
        return await self._drive_async("read", self._read_step(size, self._do_recv, b""), timeout)

    def read_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int | None:
        """``libxenvchan_read`` into ``buf``: up to ``len(buf)`` bytes, copied once,
        from the ring into the caller's buffer (no bytes object made).

        Args:
            buf: a writable buffer.
            timeout: seconds to wait for one byte (blocking; None: for ever).

        Returns:
            Bytes read (at least one); ``None`` when non-blocking and nothing
            is there; 0 when the peer closed and nothing is left.

        Raises:
            TypeError: ``buf`` is read-only.
            VchanTimeout, VchanError: as :meth:`read`.
        """
        self._live_check("read_into")
        view, take = self._into(buf)
        return self._drive("read_into", self._read_step(len(view), take, 0), timeout, self._has(1))

    async def read_into_async(
        self, buf: bytearray | memoryview, timeout: float | None = None
    ) -> int | None:
        """asyncio twin of :meth:`read_into`.

        Raises:
            TypeError, VchanTimeout, VchanError: as :meth:`read_into`.
        """
        self._live_check("read_into")
        view, take = self._into(buf)
        return await self._drive_async("read_into", self._read_step(len(view), take, 0), timeout)

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int | None:
        """``libxenvchan_recv`` into ``buf``: exactly ``len(buf)`` bytes (a packet).

        Returns:
            ``len(buf)``; ``None`` when non-blocking and fewer are there; 0 when
            the peer closed with fewer there.

        Raises:
            TypeError: ``buf`` is read-only.
            ValueError, VchanTimeout, VchanError: as :meth:`recv`.
        """
        self._live_check("recv_into")
        view, take = self._into(buf)
        return self._drive(
            "recv_into", self._recv_step(len(view), take, 0), timeout, self._has(len(view))
        )

    async def recv_into_async(
        self, buf: bytearray | memoryview, timeout: float | None = None
    ) -> int | None:
        """asyncio twin of :meth:`recv_into`.

        Raises:
            TypeError, ValueError, VchanTimeout, VchanError: as :meth:`recv_into`.
        """
        self._live_check("recv_into")
        view, take = self._into(buf)
        return await self._drive_async("recv_into", self._recv_step(len(view), take, 0), timeout)

    def wait_connected(self, timeout: float | None = None) -> None:
        """A server: wait until the client has come (``cli_live`` no longer 2).

        Args:
            timeout: seconds (None: for ever).

        Raises:
            VchanTimeout: it did not come in time.
        """
        self._drive("wait_connected", self._connected_step, timeout, lambda: self.connected)

    async def wait_connected_async(self, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`wait_connected`.

        Raises:
            VchanTimeout: it did not come in time.
        """
        await self._drive_async("wait_connected", self._connected_step, timeout)

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """``libxenvchan_close``: mark our end closed, release the pages, notify
        the peer, unbind the port; a server removes its xenstore path.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing to cancel
                waiter.get_loop().call_soon_threadsafe(waiter.cancel)
        dom = self._dom
        self._rd = self._wr = memoryview(b"")
        for buf in self._bufs:
            with contextlib.suppress(Exception):
                if self.is_server:
                    dom.gntshr.unshare(buf)
                else:
                    dom.gnttab.unmap(buf)
        self._bufs = []
        if self._ring is not None:
            with contextlib.suppress(Exception):
                self._set_byte(SRV_LIVE if self.is_server else CLI_LIVE, 0)
            self._hdr.release()
            self._hdr = memoryview(b"")
            with contextlib.suppress(Exception):
                if self.is_server:
                    dom.gntshr.unshare(self._ring)
                else:
                    dom.gnttab.unmap(self._ring)
        if self.port is not None:
            with contextlib.suppress(Exception):
                if self._ring is not None:
                    self.port.notify()
            with contextlib.suppress(Exception):
                self.port.close()
        self._ring = None
        if self.is_server and self.xs_path:
            with contextlib.suppress(Exception):
                dom.xs.rm(self.xs_path)

    def __enter__(self) -> Vchan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        side = "server" if self.is_server else "client"
        return (
            f"<Vchan {side} peer d{self.peer} {self.xs_path or ''} "
            f"r{self.read_size}/w{self.write_size}{' closed' if self.closed else ''}>"
        )
