"""The xenstore of :class:`~xengrant.EmbeddedXen` domains, in this process.

:class:`XsHub` holds one store (:mod:`xengrant.xenstore`: xenstored 4.17's
tree, permissions, quotas, watches and transactions) for every domain of one
hypervisor, under a lock.  A domain's connection, :class:`EmbeddedXenStore`
(``domain.xs``, an :class:`~xengrant.xsapi.XenStore`), speaks xs_wire to its
own server-side :class:`~xengrant.xenstore.Session` in this process -- the
same messages, the same replies and errors as the service and a real
xenstored give -- with no socket and no thread: a request is run at once, and
the watch events it fires are queued on the watchers' connections, each with
a pipe readable while its queue is not empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import weakref

from .errors import XenStoreError
from .evtchn.protocol import poll_fd_async, timed_out
from .xenstore import wire as w
from .xenstore.client import ClientCodec, result
from .xenstore.session import Domains, Session
from .xenstore.store import XenStore, home
from .xsapi import Watching, WireTransaction, XsWireOps


class XsHub:
    """The xenstore of one embedded hypervisor: the store and its connections."""

    def __init__(self) -> None:
        self.store = XenStore()
        self.domains = Domains()
        self.lock = threading.Lock()
        self.store.mkdir(0, "/local/domain")  # what the host's init scripts leave
        self._conns: weakref.WeakSet[EmbeddedXenStore] = weakref.WeakSet()
        #: sessions of connections dropped unclosed: closed at the next request
        #: (a finalizer must not take the lock: it may run inside a request)
        self.dropped: list[Session] = []

    def add_domain(self, domid: int) -> None:
        """A new domain: its home as libxl writes it, then ``@introduceDomain``."""
        with self.lock:
            self.store.make_domain_home(domid)
            self.store.introduce_domain(domid)
            self.domains.introduced.add(domid)
            self.dispatch()

    def destroy_domain(self, domid: int) -> None:
        """A domain died: its home goes, then ``@releaseDomain`` (``domain_cleanup``)."""
        with self.lock:
            with contextlib.suppress(XenStoreError):
                self.store.rm(0, home(domid))
            self.store.release_domain(domid)
            self.domains.introduced.discard(domid)
            self.dispatch()

    def open(self, domid: int) -> EmbeddedXenStore:
        """A new connection acting as ``domid`` (``xs_open``)."""
        conn = EmbeddedXenStore(self, domid)
        with self.lock:
            self._conns.add(conn)
        return conn

    def dispatch(self) -> None:
        """Hand each connection its watch events (caller holds ``lock``)."""
        while self.dropped:  # their watches and transactions go (destroy_conn)
            self.dropped.pop().close()
        if not self.store.events:
            return
        for conn in list(self._conns):
            data = conn.session.events()
            if data:
                conn._feed(data)
        self.store.events.clear()  # events of connections closed meanwhile


class EmbeddedXenStore(XsWireOps):
    """A domain's xenstore connection in this process (an :class:`~xengrant.xsapi.XenStore`).

    Args:
        hub: the hypervisor's :class:`XsHub`.
        domid: the domain the connection acts as.
    """

    def __init__(self, hub: XsHub, domid: int) -> None:
        self.hub = hub
        self.domid = domid
        self.session = Session(hub.store, domid, domains=hub.domains)
        self.codec = ClientCodec()
        self.closed = False
        self._cv = threading.Condition(threading.Lock())
        self._signalled = False
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds = weakref.finalize(self, _close_fds, self._rfd, self._wfd)
        self._dropped = weakref.finalize(self, hub.dropped.append, self.session)

    def __repr__(self) -> str:
        return f"<EmbeddedXenStore d{self.domid}{' closed' if self.closed else ''}>"

    def __enter__(self) -> EmbeddedXenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection: its watches and transactions go (``destroy_conn``)."""
        if self.closed:
            return
        self._dropped.detach()
        with self.hub.lock:
            self.session.close()
            with self._cv:
                self.closed = True
                self.codec.watch_events.clear()
                self._cv.notify_all()
        self._fds()

    # ------------------------------------------------------------ the wire
    def _call(self, mtype: int, payload: bytes, timeout: float | None = None,
              tx_id: int = 0) -> bytes:
        """One xs_wire request, answered by this connection's session at once.

        Raises:
            XenStoreError: the XS_ERROR xenstored would send; E2BIG for a
                payload over XENSTORE_PAYLOAD_MAX (``xs_talkv``).
        """
        if self.closed:
            raise XenStoreError(errno.EBADF, "the connection is closed")
        with self.hub.lock:
            with self._cv:
                req_id, data = self.codec.request(mtype, payload, tx_id)
            reply = self.session.feed(data)
            with self._cv:
                self.codec.feed(reply)
                msg = self.codec.reply(req_id)
            self.hub.dispatch()
        assert msg is not None  # the session answers every request at once
        return result(msg, _NAMES.get(mtype, f"xenstore request {mtype}"))

    def _feed(self, data: bytes) -> None:
        """Watch events for this connection (hub lock held)."""
        with self._cv:
            self.codec.feed(data)
            self._signal()
            self._cv.notify_all()

    def _signal(self) -> None:
        # the pipe holds one byte exactly while events are queued (caller holds _cv)
        want = bool(self.codec.watch_events) and not self.closed
        if want and not self._signalled:
            os.write(self._wfd, b"\1")
        elif not want and self._signalled:
            os.read(self._rfd, 1)
        self._signalled = want

    # ------------------------------------------------------------- requests
    def get_domain_path(self, domid: int) -> str:
        """``xs_get_domain_path`` (``XS_GET_DOMAIN_PATH``): ``/local/domain/<domid>``."""
        return self._call(w.XS_GET_DOMAIN_PATH, w.strings(str(domid))).rstrip(b"\0").decode()

    def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        """``xs_introduce_domain`` (``XS_INTRODUCE``, dom0 only): fires ``@introduceDomain``.

        Raises:
            XenStoreError: EACCES (not privileged), EINVAL.
        """
        self._call(w.XS_INTRODUCE, w.strings(str(domid), str(mfn), str(port)))

    def release(self, domid: int) -> None:
        """``xs_release_domain`` (``XS_RELEASE``, dom0 only): fires ``@releaseDomain``.

        Raises:
            XenStoreError: EACCES (not privileged), ENOENT (not introduced).
        """
        self._call(w.XS_RELEASE, w.strings(str(domid)))

    def set_target(self, domid: int, target: int) -> None:
        """``xs_set_target`` (``XS_SET_TARGET``, dom0 only): ``domid`` (a stub
        domain) gets ``target``'s rights over its nodes.

        Raises:
            XenStoreError: EACCES (not privileged), ENOENT (either not introduced), EINVAL.
        """
        self._call(w.XS_SET_TARGET, w.strings(str(domid), str(target)))

    def watch(self, path: str, token: str) -> None:
        """``xs_watch`` (``XS_WATCH``): an event at once, then at each change.

        Raises:
            XenStoreError: EINVAL, EEXIST (same path and token), E2BIG (quota).
        """
        self._call(w.XS_WATCH, w.strings(path, token))

    def unwatch(self, path: str, token: str) -> None:
        """``xs_unwatch`` (``XS_UNWATCH``).

        Raises:
            XenStoreError: ENOENT (no such watch).
        """
        self._call(w.XS_UNWATCH, w.strings(path, token))

    def watching(self, path: str, token: str) -> Watching:
        """:meth:`watch` as a context manager: leaving it unwatches and drops
        the watch's queued events."""
        self.watch(path, token)
        return Watching(self, path, token)

    def transaction(self) -> WireTransaction:
        """``xs_transaction_start`` (``XS_TRANSACTION_START``): a transaction."""
        return WireTransaction(lambda mtype, payload, tx: self._call(mtype, payload, None, tx))

    # ------------------------------------------------------------- events
    def _take(self, token: str | None) -> tuple[str, str] | None:
        with self._cv:
            got = self.codec.take_event(token)
            self._signal()
            return got

    def _wait(self, token: str | None, timeout: float | None) -> tuple[str, str]:
        with self._cv:
            got = self.codec.take_event(token)
            if got is None and (timeout is None or timeout > 0):
                self._cv.wait_for(
                    lambda: self.closed or any(token is None or e[1] == token
                                               for e in self.codec.watch_events), timeout)
                got = self.codec.take_event(token)
            self._signal()
        if got is None:
            if self.closed:
                raise XenStoreError(errno.EBADF, "read_watch: the connection is closed")
            raise timed_out(f"read_watch: no event of watch {token!r}", timeout)
        return got

    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """``xs_read_watch``: the next ``(path, token)``.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        return self._wait(None, timeout)

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]:
        """The next event of the watch with ``token`` (others stay queued).

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        return self._wait(token, timeout)

    async def read_watch_async(self, timeout: float | None = None) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch`."""
        return await poll_fd_async(self._rfd, lambda: self._take(None), timeout,
                                   "read_watch_async: no watch event")

    async def read_watch_token_async(
        self, token: str, timeout: float | None = None
    ) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch_token`."""
        return await poll_fd_async(self._rfd, lambda: self._take(token), timeout,
                                   f"read_watch_token_async: no event of watch {token!r}")

    def drop_watch_events(self, token: str) -> None:
        """Forget the queued events of the watch with ``token``."""
        with self._cv:
            self.codec.drop_events(token)
            self._signal()

    def fileno(self) -> int:
        """A pipe readable while a watch event is queued."""
        return self._rfd


_NAMES = {v: k for k, v in vars(w).items() if k.startswith("XS_") and isinstance(v, int)}


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
