"""A xenstored for tests: xs_wire over a Unix socket, answered by xengrant.xenstore's Session.

Each accepted connection acts as the next domid of ``domids`` (dom0, then
guests), so :class:`xengrant.linux.LinuxXenStore` -- the real-Xen client --
runs the portable suite here with unprivileged domains too.  One thread
serves every connection (a selector); watch events go out after the reply
that fired them, as xenstored queues them.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from collections.abc import Sequence

from xengrant.xenstore import Session, XenStore
from xengrant.xenstore.session import Domains


class XsSocketServer:
    """Serve ``store`` on ``path``; the n-th connection is domain ``domids[n]``.

    Args:
        path: the socket path.
        domids: the domain of each connection, in accept order.
    """

    def __init__(self, path: str, domids: Sequence[int]) -> None:
        self.path = path
        self.domids = list(domids)
        self.store = XenStore()
        self.domains = Domains()
        self.store.mkdir(0, "/local/domain")
        for d in set(domids):
            if d:
                self.store.make_domain_home(d)
                self.domains.introduced.add(d)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.sessions: dict[socket.socket, Session] = {}
        self._stop_r, self._stop_w = os.pipe()
        self.sel.register(self._stop_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                if key.fileobj == self._stop_r:
                    return
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    domid = self.domids.pop(0)
                    self.sessions[conn] = Session(self.store, domid, domains=self.domains)
                    self.sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                data = conn.recv(65536)
                sess = self.sessions[conn]
                if not data:
                    self.sel.unregister(conn)
                    sess.close()
                    del self.sessions[conn]
                    conn.close()
                    continue
                conn.sendall(sess.feed(data))
                for other, s in self.sessions.items():
                    events = s.events()
                    if events:
                        other.sendall(events)

    def close(self) -> None:
        """Stop serving; close every connection and the socket."""
        os.write(self._stop_w, b"x")
        self.thread.join(10)
        for conn in self.sessions:
            conn.close()
        self.listener.close()
        self.sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        os.unlink(self.path)
