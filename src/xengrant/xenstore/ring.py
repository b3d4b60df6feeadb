"""The xenstore ring page (``struct xenstore_domain_interface``), sans-IO.

A domain and xenstored share one page: ``req[1024]`` carries requests from
the domain, ``rsp[1024]`` replies and watch events back, each a byte stream
of xs_wire messages with free-running ``uint32_t`` producer and consumer
indexes (``MASK_XENSTORE_IDX``).  :class:`RingEnd` is either end over any
writable buffer of the page's size; the caller rings the event channel when
a call says something moved.

The other end is another domain: every index is read once, then checked
(xenstored's ``check_indexes``: ``prod - cons <= XENSTORE_RING_SIZE``), and
a bad pair is a protocol violation (``readchn``/``writechn`` fail, then
``ignore_connection`` with ``XENSTORE_ERROR_RINGIDX``, which the server end
writes into the page's ``error`` field).  :class:`RingServer` runs a
:class:`~xengrant.xenstore.session.Session` over a server end; while the
domain does not read its replies, it reads no more requests, so what waits
is at most the replies to one ring's worth of requests.
"""

from __future__ import annotations

import errno
import struct

from . import wire as w
from .session import Session

_U32 = struct.Struct("=I")
_MASK = w.XENSTORE_RING_SIZE - 1
#: what a server end advertises in ``server_features``
SERVER_FEATURES = w.XENSTORE_SERVER_FEATURE_RECONNECTION | w.XENSTORE_SERVER_FEATURE_ERROR


class RingEnd:
    """One end of a xenstore ring page.

    Args:
        page: a writable buffer of at least RING_INTERFACE_SIZE bytes (the shared page).
        server: True for xenstored's end (reads ``req``, writes ``rsp``),
            False for the domain's.
    """

    def __init__(self, page: memoryview | bytearray, server: bool) -> None:
        view = memoryview(page).cast("B")
        if len(view) < w.RING_INTERFACE_SIZE:
            raise ValueError(f"a xenstore ring page needs {w.RING_INTERFACE_SIZE} bytes")
        self.page = view
        self.server = server
        if server:
            self._in, self._out = w.RING_REQ, w.RING_RSP
            self._in_cons, self._in_prod = w.RING_REQ_CONS, w.RING_REQ_PROD
            self._out_cons, self._out_prod = w.RING_RSP_CONS, w.RING_RSP_PROD
        else:
            self._in, self._out = w.RING_RSP, w.RING_REQ
            self._in_cons, self._in_prod = w.RING_RSP_CONS, w.RING_RSP_PROD
            self._out_cons, self._out_prod = w.RING_REQ_CONS, w.RING_REQ_PROD

    def _get(self, off: int) -> int:
        value: int = _U32.unpack_from(self.page, off)[0]
        return value

    def _put(self, off: int, value: int) -> None:
        _U32.pack_into(self.page, off, value & 0xFFFFFFFF)

    def _indexes(self, cons_off: int, prod_off: int) -> tuple[int, int]:
        """Read once, then check (``check_indexes``)."""
        cons, prod = self._get(cons_off), self._get(prod_off)
        if (prod - cons) & 0xFFFFFFFF > w.XENSTORE_RING_SIZE:
            if self.server:
                self._put(w.RING_ERROR, w.XENSTORE_ERROR_RINGIDX)
            raise w.ProtocolViolation(errno.EIO, f"ring indexes cons {cons} prod {prod}",
                                      w.XENSTORE_ERROR_RINGIDX)
        return cons, prod

    def init_server(self) -> None:
        """xenstored's side of a new page: features advertised, connected, no error."""
        self._put(w.RING_SERVER_FEATURES, SERVER_FEATURES)
        self._put(w.RING_CONNECTION, w.XENSTORE_CONNECTED)
        self._put(w.RING_ERROR, w.XENSTORE_ERROR_NONE)

    def readable(self) -> int:
        """Bytes waiting to be read.

        Raises:
            ProtocolViolation: the indexes are impossible.
        """
        cons, prod = self._indexes(self._in_cons, self._in_prod)
        return (prod - cons) & 0xFFFFFFFF

    def writable(self) -> int:
        """Bytes that fit now.

        Raises:
            ProtocolViolation: the indexes are impossible.
        """
        cons, prod = self._indexes(self._out_cons, self._out_prod)
        return w.XENSTORE_RING_SIZE - ((prod - cons) & 0xFFFFFFFF)

    def read(self, limit: int = w.XENSTORE_RING_SIZE) -> bytes:
        """Take up to ``limit`` bytes (``readchn``, both chunks of a wrap).

        Returns:
            The bytes (empty when none wait): notify the peer if any.

        Raises:
            ProtocolViolation: the indexes are impossible.
        """
        cons, prod = self._indexes(self._in_cons, self._in_prod)
        n = min((prod - cons) & 0xFFFFFFFF, limit)
        start = self._in + (cons & _MASK)
        first = min(n, w.XENSTORE_RING_SIZE - (cons & _MASK))
        data = bytes(self.page[start : start + first])
        data += bytes(self.page[self._in : self._in + n - first])
        self._put(self._in_cons, cons + n)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Put as much of ``data`` as fits (``writechn``, both chunks of a wrap).

        Returns:
            Bytes written (0 when full): notify the peer if any.

        Raises:
            ProtocolViolation: the indexes are impossible.
        """
        cons, prod = self._indexes(self._out_cons, self._out_prod)
        n = min(len(data), w.XENSTORE_RING_SIZE - ((prod - cons) & 0xFFFFFFFF))
        start = self._out + (prod & _MASK)
        first = min(n, w.XENSTORE_RING_SIZE - (prod & _MASK))
        src = memoryview(bytes(data[:n]))
        self.page[start : start + first] = src[:first]
        self.page[self._out : self._out + n - first] = src[first:n]
        self._put(self._out_prod, prod + n)
        return n


class RingServer:
    """A session served over a ring page's server end.

    Args:
        end: the server end.
        session: the session of the domain owning the page.
    """

    def __init__(self, end: RingEnd, session: Session) -> None:
        self.end = end
        self.session = session
        #: replies and events not yet in the ring (the domain is not reading)
        self.backlog = bytearray()

    def pump(self) -> bool:
        """Read requests, answer them, move replies and watch events into the ring.

        Returns:
            Whether anything moved (then notify the domain's event channel).

        Raises:
            ProtocolViolation: bad indexes or a message over
                XENSTORE_PAYLOAD_MAX: stop serving the page.
        """
        moved = False
        while True:
            if self.backlog:
                n = self.end.write(self.backlog)
                if n:
                    del self.backlog[:n]
                    moved = True
                if self.backlog:
                    return moved  # the ring is full: requests wait, as xenstored's do
            data = self.end.read()
            if data:
                moved = True
                self.backlog += self.session.feed(data)
            self.backlog += self.session.events()
            if not self.backlog:
                return moved
