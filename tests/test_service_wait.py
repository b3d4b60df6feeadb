"""Waiting for a message: ``_cext.recv_wait`` (the socket read in C: it returns
what it read), and the service client's waits (``Channel``) against a fake
service the test answers by hand: one reader at a time, the others parked; a
call is never given up -- a signal handler's exception is raised once the reply
is in, and a service that does not answer within the timeout is dead (the
connection is closed)."""

from __future__ import annotations

import array
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from xengrant import _cext
from xengrant.service import protocol as p
from xengrant.service.client import Channel, ServiceError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with closing(a), closing(b):
        yield a, b


@pytest.fixture
def packets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A SOCK_SEQPACKET pair: each recv returns one send, so a message can be
    made to arrive in pieces without timing."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with closing(a), closing(b):
        yield a, b


def reply(seq: int, payload: bytes, flags: int = p.F_REPLY, mtype: int = p.MSG_PING) -> bytes:
    return p.encode(mtype, flags, seq, payload)


# ---------------------------------------------------------------- recv_wait
@pytest.mark.parametrize("spin_ns", [0, 50_000])
def test_recv_wait_reads_what_is_there(pair: tuple[socket.socket, socket.socket],
                                       spin_ns: int) -> None:
    a, b = pair
    b.sendall(b"hello")
    buf = bytearray(16)
    assert _cext.recv_wait(a.fileno(), buf, spin_ns, -1) == 5
    assert bytes(buf[:5]) == b"hello"


@pytest.mark.parametrize("spin_ns", [0, 20_000])
def test_recv_wait_times_out_with_minus_one(pair: tuple[socket.socket, socket.socket],
                                            spin_ns: int) -> None:
    a, _b = pair
    buf = bytearray(b"untouched")
    assert _cext.recv_wait(a.fileno(), buf, spin_ns, 0) == -1
    assert buf == b"untouched"


def test_recv_wait_reads_zero_when_the_peer_closed(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    assert _cext.recv_wait(a.fileno(), bytearray(8), 10_000, -1) == 0


def test_recv_wait_fills_at_most_the_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"0123456789")
    buf = bytearray(4)
    assert _cext.recv_wait(a.fileno(), buf, 0, -1) == 4
    assert _cext.recv_wait(a.fileno(), buf, 0, -1) == 4
    assert buf == b"4567"


def test_recv_wait_raises_oserror_for_a_bad_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        _cext.recv_wait(r, bytearray(8), 0, 0)
    assert e.value.errno == errno.EBADF


def test_recv_wait_refuses_a_readonly_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    with pytest.raises(BufferError):
        _cext.recv_wait(a.fileno(), b"readonly", 0, 0)


# ---------------------------------------------------------------- recv_fill
def test_recv_fill_reads_at_fill_and_counts_it(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The bytes land at fill and fill grows by them in the same call; nothing
    read, nothing counted; a closed peer is 0."""
    a, b = pair
    buf, fill = bytearray(64), array.array("q", [3])
    b.sendall(b"hello")
    assert _cext.recv_fill(a.fileno(), buf, fill, 0, 1000) == (5, None)
    assert bytes(buf[:8]) == b"\0\0\0hello" and fill[0] == 8
    assert _cext.recv_fill(a.fileno(), buf, fill, 0, 0) == (-1, None)  # nothing within 0 ms
    assert fill[0] == 8
    b.sendall(b"x" * 100)
    assert _cext.recv_fill(a.fileno(), buf, fill, 0, 1000) == (56, None)  # up to the end
    assert fill[0] == 64
    with pytest.raises(ValueError, match="not within"):  # full: sort it first
        _cext.recv_fill(a.fileno(), buf, fill, 0, 0)
    fill[0] = 0
    assert _cext.recv_fill(a.fileno(), buf, fill, 0, 1000) == (44, None)
    b.close()
    assert _cext.recv_fill(a.fileno(), buf, fill, 50_000, 1000) == (0, None)  # closed
    assert fill[0] == 44
    with pytest.raises(ValueError):
        _cext.recv_fill(a.fileno(), buf, array.array("q", [-1]), 0, 0)


def test_recv_fill_raises_oserror_for_a_bad_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        _cext.recv_fill(r, bytearray(64), array.array("q", [0]), 0, 0)
    assert e.value.errno == errno.EBADF


# ------------------- the client's wait (a fake service: the conftest fixture)
def next_seq(ch: Channel) -> int:
    """The sequence number the channel's next request gets (one is used up here)."""
    return ch.calls.next_seq() + 1


def test_client_dispatches_earlier_replies_before_returning(
        fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    got: list[bytes] = []
    posted = ch.post(p.MSG_PING, b"a", lambda body: got.append(bytes(body)))
    seq = posted + 1  # the next request's
    srv.sendall(reply(posted, b"\0\0\0\0posted", p.F_REPLY | p.F_POSTED)
                + reply(0, p.U32.pack(11), p.F_ASYNC, p.MSG_EVENT)
                + reply(seq, b"\0\0\0\0mine")
                + reply(0, p.U32.pack(12), p.F_ASYNC, p.MSG_EVENT))
    assert ch.request(p.MSG_PING, b"b") == b"\0\0\0\0mine"
    assert got == [b"\0\0\0\0posted"]  # before the reply was handed out
    assert list(ch.events) == [11, 12]  # the one after it too
    assert not ch.calls.posted and not ch.calls.waiting and ch.calls.decoder.idle
    assert not ch._reading


def test_client_reply_larger_than_its_buffer(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    body = b"\0\0\0\0" + os.urandom(len(ch._rbuf) + 1000)  # several reads
    seq = next_seq(ch)
    # more than the socket holds: a thread sends while the client reads
    writer = threading.Thread(target=srv.sendall, args=(reply(seq, body),))
    writer.start()
    try:
        assert ch.request(p.MSG_PING) == body
    finally:
        writer.join()
    assert ch.calls.decoder.idle and not ch._reading


def test_each_waiting_thread_gets_its_own_reply(fake: tuple[Channel, socket.socket]) -> None:
    """Two threads wait on one connection: one reads, the other is parked; the
    reader sorts both replies into their records and wakes the other; each gets
    its own reply, whichever read it."""
    ch, srv = fake
    got: dict[int, bytes] = {}

    def call(n: int) -> None:
        got[n] = ch.request(p.MSG_PING, b"%d" % n)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    dec = p.Decoder()
    frames: list[p.Frame] = []
    while len(frames) < 2:  # both requests are sent before any reply comes
        frames += dec.feed(srv.recv(4096))
    srv.sendall(b"".join(reply(f.seq, b"\0\0\0\0" + (f.payload or b"")) for f in frames))
    for t in threads:
        t.join(30)
    assert got == {0: bytes(4) + b"0", 1: bytes(4) + b"1"}
    assert not ch.calls.waiting and not ch._reading and not ch._parked


def test_client_wait_times_out_and_the_connection_is_dead(
        fake: tuple[Channel, socket.socket]) -> None:
    """No reply within the timeout: ETIMEDOUT, the connection is shut (the service
    sees it close, and destroys the domain), and every later call fails at once."""
    ch, srv = fake
    ch.timeout = 0
    with pytest.raises(ServiceError) as e:
        ch.request(p.MSG_PING)
    assert e.value.errno == errno.ETIMEDOUT
    assert not ch._reading and not ch.calls.waiting
    seen = b""
    while True:  # the request, then end of file: the client shut the socket
        chunk = srv.recv(4096)
        if not chunk:
            break
        seen += chunk
    assert len(seen) == p.HEADER_SIZE
    with pytest.raises(ServiceError) as e:
        ch.request(p.MSG_PING)
    assert e.value.errno == errno.ETIMEDOUT


def test_client_sees_the_service_close(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    seq = next_seq(ch)
    srv.sendall(reply(seq, b"\0\0\0\0")[:14])  # part of the reply, then gone
    srv.close()
    with pytest.raises(ServiceError) as e:
        ch.request(p.MSG_PING)
    assert e.value.errno in (errno.ECONNRESET, errno.EPIPE)  # (the send may see it first)
    assert not ch._reading and ch.calls.error is not None
    with pytest.raises(ServiceError):  # and so does every later call
        ch.request(p.MSG_PING)
    with pytest.raises(ServiceError):  # and every wait for an event
        ch.wait_for(ch.events, None, 10)


def test_event_loop_stops_watching_while_a_thread_reads(
        fake: tuple[Channel, socket.socket]) -> None:
    """A waiter's loop that finds a thread reading stops watching the socket (it
    would spin on it); the thread's wake-up wakes the waiter, which watches it
    again and reads the event."""
    import asyncio

    ch, srv = fake
    ch._reading = True  # a thread is reading
    srv.sendall(reply(0, p.U32.pack(5), p.F_ASYNC, p.MSG_EVENT))

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(ch.wait_for_async(ch.events, 5, 10))
        for _ in range(1000):  # loop iterations, no timing: register, see it readable, park
            await asyncio.sleep(0)
            if ch._async_waiters and loop not in ch._reader_loops:
                break
        assert ch._async_waiters and loop not in ch._reader_loops  # parked
        assert not waiter.done() and not ch.events  # nothing read: the "thread" reads
        with ch._mu:  # the thread is done, with nothing for us
            ch._reading = False
            ch._wake()
        return await waiter

    assert asyncio.run(main()) == 5
    assert not ch._reading and ch.calls.decoder.idle


# ------------------------------------------- a signal while a call waits
POLL_SYSCALLS = {"7", "271"}  # x86-64 poll, ppoll


class Interrupted(Exception):
    """What the test's SIGUSR1 handler raises (as Ctrl-C raises KeyboardInterrupt)."""


def _in_poll(native: int) -> bool:
    with open(f"/proc/self/task/{native}/syscall") as f:
        return f.read().split(" ", 1)[0] in POLL_SYSCALLS


@pytest.fixture
def interrupted() -> Iterator[threading.Event]:
    """SIGUSR1's handler raises Interrupted, for the test's duration; the event
    yielded is set when it ran."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/<pid>/task/<tid>/syscall")
    ran = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        ran.set()
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield ran
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("half", [False, True])
def test_a_signal_is_raised_once_the_reply_is_in(
        fake: tuple[Channel, socket.socket], interrupted: threading.Event, half: bool
) -> None:
    """The handler raises while the call sleeps in poll (after half of its reply
    came, or before anything did): the call goes on waiting, and raises the
    handler's exception only once its reply is in; nothing is left in flight and
    the next call reads its own reply."""
    ch, srv = fake
    ch.spin = 0.0  # straight to poll()
    seq = next_seq(ch)
    first = reply(seq, b"\0\0\0\0pong")
    cut = len(first) // 2 if half else 0
    srv.sendall(first[:cut])
    me, native = threading.get_ident(), threading.get_native_id()

    def service() -> None:
        while not _in_poll(native):
            pass
        signal.pthread_kill(me, signal.SIGUSR1)
        interrupted.wait(30)  # the handler raised in the main thread ...
        while not _in_poll(native):  # ... which went back to waiting
            pass
        srv.sendall(first[cut:])

    t = threading.Thread(target=service, daemon=True)
    t.start()
    with pytest.raises(Interrupted):
        ch.request(p.MSG_PING)
    t.join(30)
    assert not ch.calls.waiting and ch.calls.decoder.idle and not ch._reading
    srv.sendall(reply(seq + 1, b"\0\0\0\0next"))
    assert ch.request(p.MSG_PING) == b"\0\0\0\0next"


def test_held_signals_let_the_caller_finish_first(
        fake: tuple[Channel, socket.socket], interrupted: threading.Event) -> None:
    """Within ``held_signals`` the call returns its reply; leaving the block raises."""
    ch, srv = fake
    ch.spin = 0.0
    seq = next_seq(ch)
    me, native = threading.get_ident(), threading.get_native_id()

    def service() -> None:
        while not _in_poll(native):
            pass
        signal.pthread_kill(me, signal.SIGUSR1)
        srv.sendall(reply(seq, b"\0\0\0\0pong"))

    t = threading.Thread(target=service, daemon=True)
    t.start()
    finished: list[bytes] = []
    with pytest.raises(Interrupted), ch.held_signals() as held:
        finished.append(ch.request(p.MSG_PING))
        assert len(held) == 1
    t.join(30)
    assert finished == [b"\0\0\0\0pong"]


def test_a_dead_connection_is_logged_once(
        fake: tuple[Channel, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    """The client says why its connection died, once, at WARNING on
    ``xengrant.service.client``; its own close is only DEBUG."""
    ch, _srv = fake
    ch.timeout = 0
    with caplog.at_level(logging.DEBUG, logger="xengrant.service.client"):
        for _ in range(3):
            with pytest.raises(ServiceError):
                ch.request(p.MSG_PING)
        ch.close()
    got = [(r.levelno, r.getMessage()) for r in caplog.records
           if r.name == "xengrant.service.client"]
    assert len(got) == 1
    level, text = got[0]
    assert level == logging.WARNING
    assert f"errno {errno.ETIMEDOUT}" in text and "its domain goes" in text


def test_closing_a_connection_logs_at_debug(
        fake: tuple[Channel, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    ch, _srv = fake
    with caplog.at_level(logging.DEBUG, logger="xengrant.service.client"):
        ch.close()
    got = [(r.levelno, r.getMessage()) for r in caplog.records
           if r.name == "xengrant.service.client"]
    assert got == [(logging.DEBUG, f"service connection closed (fd {ch._fileno})")]


# ------------------- a signal handler that raises where bytes could be lost
class _RaiseAfterRecv:
    """``_cext`` as the channel calls it, except that a signal handler "raises"
    right after ``recv_fill`` returned bytes (once): what Python does when a
    signal lands between the C call's return and the next bytecode."""

    def __init__(self) -> None:
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(_cext, name)

    def recv_fill(self, *args: Any) -> Any:
        got = _cext.recv_fill(*args)
        if got[0] > 0 and not self.fired:
            self.fired = True
            raise Interrupted()
        return got


class _SockRaiseAfterRecv:
    """The channel's socket, except that a signal handler "raises" right after
    ``recv_into`` read (once): between the read and its count, in Python."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.fired = sock, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def recv_into(self, *args: Any) -> int:
        n: int = self.sock.recv_into(*args)
        if n > 0 and not self.fired:
            self.fired = True
            raise Interrupted()
        return n


def test_c_read_keeps_what_it_read_when_a_signal_lands_right_after(
        fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """In C the read and its count are one call: a signal handler that raises as it
    returns loses nothing -- the reply and the event read with it are sorted, the
    call raises the handler's exception once its reply is in, and the stream stays
    in step (the next call gets its own reply)."""
    from xengrant.service import channel as channel_mod
    from xengrant.service import frontring

    ch, srv = fake
    monkeypatch.setattr(frontring, "C_PATHS", True)
    hook = _RaiseAfterRecv()
    monkeypatch.setattr(channel_mod, "_cext", hook)
    seq = next_seq(ch)
    srv.sendall(reply(seq, b"\0\0\0\0pong") + reply(0, p.U32.pack(7), p.F_ASYNC, p.MSG_EVENT))
    with pytest.raises(Interrupted):
        ch.request(p.MSG_PING)
    assert hook.fired and ch.calls.error is None and list(ch.events) == [7]
    assert not ch.calls.waiting and ch.calls.decoder.idle and ch._fill[0] == 0
    srv.sendall(reply(seq + 1, b"\0\0\0\0next"))
    assert ch.request(p.MSG_PING) == b"\0\0\0\0next"


def test_python_read_fails_the_connection_when_a_signal_lands_between_read_and_count(
        fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """In Python the read and its count are two steps: a signal handler's exception
    between them fails the connection cleanly -- EPROTO for the call in flight
    (the handler's exception raised on top of it), for the posted request, and
    for every later call; the socket is shut (the service sees it close)."""
    from xengrant.service import frontring

    ch, srv = fake
    monkeypatch.setattr(frontring, "C_PATHS", False)
    monkeypatch.setattr(ch, "sock", _SockRaiseAfterRecv(ch.sock))
    ch.post(p.MSG_PING, b"", lambda body: None)
    seq = next_seq(ch)
    srv.sendall(reply(seq - 1, b"\0\0\0\0", p.F_REPLY | p.F_POSTED) + reply(seq, b"\0\0\0\0pong"))
    with pytest.raises(Interrupted) as e:
        ch.request(p.MSG_PING)
    cause = e.value.__cause__
    assert isinstance(cause, ServiceError) and cause.errno == errno.EPROTO
    assert ch.calls.error is not None and ch.calls.error.errno == errno.EPROTO
    assert "interrupted the client while it read" in str(ch.calls.error)
    assert not ch.calls.waiting and not ch.calls.posted
    with pytest.raises(ServiceError) as e2:
        ch.request(p.MSG_PING)
    assert e2.value.errno == errno.EPROTO
    srv.settimeout(10)
    while srv.recv(4096):  # the requests, then end of file: the client shut the socket
        pass


@pytest.mark.parametrize("c_paths", [True, False], ids=["C", "python"])
def test_a_signal_while_the_bytes_are_sorted_fails_the_connection(
        fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch,
        c_paths: bool) -> None:
    """Either way, a signal handler's exception while what was read is sorted (the
    bytes taken, not all given to the records) fails the connection (EPROTO)
    instead of leaving the stream out of step."""
    from xengrant.service import frontring

    ch, srv = fake
    monkeypatch.setattr(frontring, "C_PATHS", c_paths)
    real = ch.calls.feed

    def feed(data: Any) -> None:
        monkeypatch.setattr(ch.calls, "feed", real)
        raise Interrupted()

    monkeypatch.setattr(ch.calls, "feed", feed)
    seq = next_seq(ch)
    srv.sendall(reply(seq, b"\0\0\0\0pong"))
    with pytest.raises(Interrupted) as e:
        ch.request(p.MSG_PING)
    assert isinstance(e.value.__cause__, ServiceError)
    assert ch.calls.error is not None and ch.calls.error.errno == errno.EPROTO
    assert "while it sorted what it read" in str(ch.calls.error)
    assert not ch.calls.waiting and ch._fill[0] == 0


@pytest.mark.parametrize("c_paths", [True, False], ids=["C", "python"])
def test_both_reads_take_replies_split_anywhere(
        fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch,
        c_paths: bool) -> None:
    """The C read and the Python read give the records the same bytes: replies cut
    at every byte, an event among them."""
    from xengrant.service import frontring

    ch, srv = fake
    monkeypatch.setattr(frontring, "C_PATHS", c_paths)
    ch.spin = 0.0
    for cut in range(1, 2 * p.HEADER_SIZE + 10):
        seq = next_seq(ch)
        data = (reply(0, p.U32.pack(cut), p.F_ASYNC, p.MSG_EVENT)
                + reply(seq, b"\0\0\0\0" + b"r" * 9))
        srv.sendall(data[:cut])
        t = threading.Thread(target=srv.sendall, args=(data[cut:],))
        t.start()
        assert ch.request(p.MSG_PING) == b"\0\0\0\0" + b"r" * 9
        t.join(10)
        assert ch.events.popleft() == cut and ch._fill[0] == 0
