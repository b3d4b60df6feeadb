"""The service's xenstored socket: xs_wire for dom0's own tools (libxenstore, xenstore-utils).

xenstored listens on ``/var/run/xenstored/socket``; libxenstore connects
there (or to ``$XENSTORED_PATH``) and every ``xs_*`` call is one
``xsd_sockmsg`` each way.  This socket does the same over the service's
store: each connection is a :class:`~xengrant.xenstore.session.Session`
acting as dom0, so ``xenstore-ls``, ``xenstore-write`` ... and any program
linked with libxenstore work against the service unchanged::

    XENSTORED_PATH=/run/user/1000/xengrant/xenstored xenstore-ls /local/domain

Who may connect: dom0 belongs to whoever started the service
(:mod:`xengrant.service.identity`), so only a peer running as the
service's uid is served (``SO_PEERCRED``); the socket is created 0600 as
xenstored's is.  Anyone else is closed at once.

Bounds: at most :data:`MAX_CONNECTIONS` connections; a message whose ``len``
is over XENSTORE_PAYLOAD_MAX closes its connection (xenstored's
``ignore_connection``); a connection that does not read what it is sent
(watch events pile up past :data:`OUT_MAX` bytes) is closed.  Each
connection has its own thread; requests run under the service's lock.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import threading
from collections.abc import Callable

from ..xenstore.session import Domains, Session, event_message
from ..xenstore.store import XenStore
from ..xenstore.wire import ProtocolViolation
from .paths import peer_cred

#: connections served at once
MAX_CONNECTIONS = 64
#: bytes waiting to be sent to one connection before it is dropped
OUT_MAX = 1 << 20

_ids = itertools.count(1)


class _Conn:
    """One client of the socket."""

    def __init__(self, owner: XenstoredSocket, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self.ident = ("xenstored", next(_ids))
        self.session = Session(owner.store, 0, self.ident, domains=owner.domains)
        self.out = bytearray()
        self.dead = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._run, name=f"xenstored-{self.ident[1]}",
                                       daemon=True)

    def push(self, data: bytes) -> None:
        """Queue bytes to send (caller holds the service's lock)."""
        if self.dead:
            return
        self.out += data
        if len(self.out) > OUT_MAX:
            self.owner.log(f"xenstored socket: a client left {len(self.out)} bytes unread: closed")
            self._kill()
            return
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _kill(self) -> None:
        self.dead = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _run(self) -> None:
        lock = self.owner.lock
        try:
            while not self.dead:
                with lock:
                    data = bytes(self.out)
                    self.out.clear()
                if data:
                    self.sock.sendall(data)
                    continue
                fd = self.sock.fileno()
                r, _, _ = select.select([fd, self.wake_r], [], [])
                if self.wake_r in r:
                    os.read(self.wake_r, 4096)
                if fd not in r:
                    continue
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with lock:
                    try:
                        self.out += self.session.feed(chunk)
                    except ProtocolViolation as e:
                        self.owner.log(f"xenstored socket: {e}: connection closed")
                        break
                    finally:
                        self.owner.after_request()
        except OSError:
            pass
        finally:
            self.dead = True
            with lock:
                self.session.close()
                self.owner.conns.pop(self.ident, None)
            self.sock.close()
            os.close(self.wake_r)
            os.close(self.wake_w)


class XenstoredSocket:
    """A listening xenstored socket over a store.

    Args:
        path: where to listen (an existing socket file there is replaced).
        store: the store.
        lock: the lock every access to ``store`` holds.
        domains: the introduced domains (shared with the service's sessions).
        after_request: called under ``lock`` after each batch of requests
            (the service sends the watch events they fired).
        log: where to report misbehaving clients.
        uid: the only peer uid served (default: this process's).

    Raises:
        OSError: the socket cannot be made.
    """

    def __init__(
        self,
        path: str,
        store: XenStore,
        lock: threading.Lock,
        domains: Domains,
        after_request: Callable[[], None],
        log: Callable[[str], None],
        uid: int | None = None,
    ) -> None:
        self.path = path
        self.store = store
        self.lock = lock
        self.domains = domains
        self.after_request = after_request
        self.log = log
        self.uid = os.getuid() if uid is None else uid
        self.conns: dict[tuple[str, int], _Conn] = {}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(16)
        self._stop_r, self._stop_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="xenstored-accept",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<XenstoredSocket {self.path} {len(self.conns)} connections>"

    def owns(self, conn: object) -> bool:
        """Whether a watch's connection id is one of this socket's."""
        return isinstance(conn, tuple) and conn in self.conns

    def deliver(self, conn: object, path: str, token: str) -> None:
        """Send a watch event to one of this socket's connections (caller holds the lock)."""
        target = self.conns.get(conn) if isinstance(conn, tuple) else None
        if target is not None:
            target.push(event_message(path, token))

    def _accept_loop(self) -> None:
        while True:
            r, _, _ = select.select([self.listener.fileno(), self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            try:
                cred = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            if cred.uid != self.uid:
                self.log(f"xenstored socket: uid {cred.uid} is not dom0's ({self.uid}): refused")
                sock.close()
                continue
            with self.lock:
                if len(self.conns) >= MAX_CONNECTIONS:
                    self.log(f"xenstored socket: {MAX_CONNECTIONS} connections: one refused")
                    sock.close()
                    continue
                conn = _Conn(self, sock)
                self.conns[conn.ident] = conn
            conn.thread.start()

    def close(self) -> None:
        """Stop listening and close every connection (their watches go). Idempotent."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        self._thread.join(5.0)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self.lock:
            conns = list(self.conns.values())
            for c in conns:
                c._kill()
        for c in conns:
            c.thread.join(5.0)
        os.close(self._stop_r)
        os.close(self._stop_w)
