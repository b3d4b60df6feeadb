"""The listening socket and the service's main loop: accept (admission, the
connection limits, backing off when ``accept`` fails), hang-ups, backlogs.

The main thread (``epoll``) accepts connections, writes what a connection
could not take at once, and on a hang-up waits for that connection's thread
to finish before it accepts anyone else: whoever connects after a process
died finds its domain gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from typing import cast

from ..paths import peer_cred
from .base import ServerBase
from .connection import _EPOLLIN, _EPOLLOUT, _HANGUP, Connection

#: Seconds between tries to accept when accept() fails (EMFILE...): doubled up to the max.
ACCEPT_BACKOFF = (0.01, 1.0)


class Listener(ServerBase):
    """The main thread: accept, hang-ups, writing out backlogs."""

    @property
    def wake_fd(self) -> int:
        """A non-blocking fd whose writes wake the loop (e.g. ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def stop(self) -> None:
        """Ask the loop to return (thread- and signal-safe)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self, close: bool = True) -> None:
        """Run until :meth:`stop`; then close every connection (destroying their domains).

        This thread accepts connections (each gets a reader thread) and
        writes out what a connection could not take at once.

        Args:
            close: :meth:`close` at the end (False: the caller does).
        """
        poll = self.ep.poll
        listen_fd = self.listener.fileno()
        self._loop_done.clear()
        self._serving.set()
        try:
            while not self._stopping:
                timeout = -1.0
                if self._accept_again:  # backing off: take the listener back then
                    timeout = self._accept_again - time.monotonic()
                    if timeout <= 0:
                        self._accept_again = 0.0
                        self.ep.register(listen_fd, _EPOLLIN)
                        timeout = -1.0
                for fd, mask in poll(timeout):
                    if fd == listen_fd:
                        self._accept()
                    elif fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    else:
                        with self.lock:
                            conn = self.by_fd.get(fd)
                            if conn is None or conn.dead:
                                continue
                            if mask & _EPOLLOUT:
                                self._flush(conn)
                                self._reap()
                                self.backing.flush()
                            if mask & _HANGUP and conn.throttled:
                                self._hangup_throttled(conn, mask)
                                continue
                        if mask & _HANGUP and conn.reader is not None:
                            # Its last requests and its hang-up are handled
                            # before anyone who connected after it is let in
                            # (a toolstack that saw a process die sees its
                            # domain gone) -- unless it is throttled: then
                            # its reader waits for it to read, not for us.
                            self._join_reader(conn)
        finally:
            self._serving.clear()
            self._loop_done.set()
            if close:
                self.close()

    def _hangup_throttled(self, conn: Connection, mask: int) -> None:
        """A throttled connection hung up (caller holds the lock).

        Gone for good (HUP, ERR): nothing is left to wait for, it is closed.
        Only its writing side closed (RDHUP): it may still read what waits
        for it; epoll stops reporting that, and its reader goes on once the
        output drained (then reads the end of the stream).
        """
        if mask & (select.EPOLLHUP | select.EPOLLERR):
            self._schedule_close(conn)
            self._reap()
            self.backing.flush()
            return
        conn.watch = select.EPOLLHUP | select.EPOLLERR
        self.ep.modify(conn.fd, conn.watch | (_EPOLLOUT if conn.want_write else 0))

    def _join_reader(self, conn: Connection, timeout: float = 5.0) -> None:
        """Wait (without the lock) until ``conn``'s reader ends, or is throttled,
        or ``timeout`` passed: a reader stopped for its client never stalls this thread."""
        reader = conn.reader
        assert reader is not None
        deadline = time.monotonic() + timeout
        while reader.is_alive() and not conn.throttled:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            reader.join(min(left, 0.01))

    def _accept(self) -> None:
        """Accept one connection: admitted uids only, within the connection limits.

        A failing ``accept`` (EMFILE, ENFILE, ENOBUFS, ENOMEM) or thread start
        never ends the service: the listener leaves epoll for a while
        (doubling from 10 ms to 1 s), and connections wait in the backlog.
        """
        try:
            sock, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._accept_backoff(f"accept: {e}")
            return
        self._accept_wait = ACCEPT_BACKOFF[0]
        try:
            cred = peer_cred(sock)
        except OSError:  # pragma: no cover - a Unix socket always has one
            sock.close()
            return
        lim = self.limits
        why = ""
        if not self.identity.admits(cred):
            why, counter = "not admitted", "refused_uid"
        elif len(self.conns) >= (lim.conns_total or 0):
            why, counter = f"{lim.conns_total} connections in all", "refused_conns"
        elif self._per_uid.get(cred.uid, 0) >= (lim.conns_per_uid or 0):
            why, counter = f"{lim.conns_per_uid} connections of uid {cred.uid}", "refused_conns"
        if why:
            self.counters[counter] += 1
            self._warn(("uid", cred.uid), f"refused uid {cred.uid} (pid {cred.pid}): {why}")
            sock.close()
            return
        sock.setblocking(True)  # the reader blocks in recv; sends say MSG_DONTWAIT
        with self.lock:
            conn = Connection(sock, self._next_ident, cred)
            # over the HandoffLock as over a Lock (its acquire and release)
            conn.drained = threading.Condition(cast(threading.Lock, self.lock))
            self._next_ident += 1
            self.conns[conn.ident] = conn
            self.by_fd[conn.fd] = conn
            self._per_uid[cred.uid] = self._per_uid.get(cred.uid, 0) + 1
            self.ep.register(conn.fd, _HANGUP)
            conn.reader = threading.Thread(
                target=self._read_loop, args=(conn,), name=f"xengrant-conn-{conn.ident}",
                daemon=True,
            )
        try:
            conn.reader.start()
        except RuntimeError as e:  # can't start new thread
            with self.lock:
                conn.reader = None
                self._schedule_close(conn)
                self._reap()
                self.backing.flush()
            self._accept_backoff(f"thread: {e}")

    def _accept_backoff(self, why: str) -> None:
        """Take the listener off epoll for a while (see :meth:`_accept`)."""
        self.counters["accept_errors"] += 1
        self._warn("accept", f"{why}; accepting again in {self._accept_wait * 1e3:.0f} ms")
        with contextlib.suppress(OSError):
            self.ep.unregister(self.listener.fileno())
        self._accept_again = time.monotonic() + self._accept_wait
        self._accept_wait = min(self._accept_wait * 2, ACCEPT_BACKOFF[1])


def _listen(path: str, shared: bool = False) -> socket.socket:
    """Bind and listen at ``path`` (mode 0600; 0666 when ``shared``: other uids
    are admitted, by SO_PEERCRED), replacing a stale socket file.

    Raises:
        OSError: EADDRINUSE if something answers there.
    """
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            probe.close()
            raise OSError(errno.EADDRINUSE, f"a service already listens at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if shared:
        os.chmod(path, 0o666)
    sock.listen(64)
    sock.setblocking(False)
    return sock
