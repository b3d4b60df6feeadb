"""Waiting for a message in C: ``_cext.recv_wait``, ``_cext.recv_reply`` and the
service client's one-call wait for a reply (``Channel._wait_alone``)."""

from __future__ import annotations

import errno
import os
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


# --------------------------------------------------------------- recv_reply
def test_recv_reply_finds_a_reply_alone(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(reply(7, b"\0\0\0\0body"))
    buf = bytearray(256)
    assert _cext.recv_reply(a.fileno(), buf, 7, 0, -1) == (20, 12, 8)
    assert bytes(buf[12:20]) == b"\0\0\0\0body"


def test_recv_reply_skips_what_comes_first_and_keeps_what_follows(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    event = reply(0, p.U32.pack(3), p.F_ASYNC, p.MSG_EVENT)
    posted = reply(6, b"\0\0\0\0posted")
    # a request (no F_REPLY) with the same seq is not the reply
    request = reply(7, b"not it", 0)
    mine = reply(7, b"\0\0\0\0mine")
    after = reply(0, p.U32.pack(4), p.F_ASYNC, p.MSG_EVENT)
    b.sendall(event + posted + request + mine + after)
    buf = bytearray(1024)
    end, start, length = _cext.recv_reply(a.fileno(), buf, 7, 10_000, -1)
    head = len(event) + len(posted) + len(request)
    assert (start, length) == (head + p.HEADER_SIZE, 8)
    assert end == head + len(mine) + len(after)
    assert bytes(buf[start:start + length]) == b"\0\0\0\0mine"


def test_recv_reply_reads_a_reply_in_pieces(
        packets: tuple[socket.socket, socket.socket]) -> None:
    a, b = packets
    msg = reply(9, b"\0\0\0\0" + bytes(range(100)))
    for cut in (5, 12, 40, len(msg)):  # four recvs: a header split, then the payload
        b.send(msg[:cut])
        msg = msg[cut:]
        if not msg:
            break
    buf = bytearray(512)
    assert _cext.recv_reply(a.fileno(), buf, 9, 0, -1) == (116, 12, 104)
    assert bytes(buf[16:116]) == bytes(range(100))


def test_recv_reply_stops_at_a_message_that_does_not_fit(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    first = reply(1, b"\0\0\0\0")
    b.sendall(first + reply(2, bytes(100)))
    buf = bytearray(64)
    end, start, length = _cext.recv_reply(a.fileno(), buf, 2, 0, -1)
    assert (start, length) == (-1, 0)
    assert end == 64 and bytes(buf[:len(first)]) == first


def test_recv_reply_reports_a_close_mid_message(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(reply(3, b"\0\0\0\0abcdef")[:15])
    b.close()
    assert _cext.recv_reply(a.fileno(), bytearray(64), 3, 0, -1) == (15, -2, 0)


def test_recv_reply_keeps_what_came_before_a_failed_recv(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    # the peer closes with this unread: after the 15 bytes, a's recv fails with
    # ECONNRESET once (then reads EOF)
    a.sendall(b"unread")
    b.sendall(reply(3, b"\0\0\0\0abcdef")[:15])
    b.close()
    buf = bytearray(64)
    assert _cext.recv_reply(a.fileno(), buf, 3, 0, -1) == (15, -2, 0)
    assert bytes(buf[:15]) == reply(3, b"\0\0\0\0abcdef")[:15]
    assert _cext.recv_reply(a.fileno(), buf, 3, 0, -1) == (0, -2, 0)  # ECONNRESET went


def test_recv_reply_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(reply(4, b"\0\0\0\0"))  # a reply, but not to request 5
    assert _cext.recv_reply(a.fileno(), bytearray(64), 5, 0, 0) == (16, -3, 0)


def test_recv_reply_raises_oserror_for_a_bad_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        _cext.recv_reply(r, bytearray(64), 1, 0, 0)
    assert e.value.errno == errno.EBADF


# ------------------- the client's wait (a fake service: the conftest fixture)
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
    assert not ch._posted and not ch._replies and ch._decoder.idle and not ch._leader


def test_client_reply_larger_than_its_buffer(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    body = b"\0\0\0\0" + os.urandom(len(ch._rbuf) + 1000)  # cannot fit: the decoder's path
    seq = ch.send(p.MSG_PING)
    # more than the socket holds: a thread sends while the client reads
    writer = threading.Thread(target=srv.sendall, args=(reply(seq, body),))
    writer.start()
    try:
        assert ch._wait_alone(seq) is None  # left to wait_reply, the bytes kept
        assert ch.wait_reply(seq).payload == body
    finally:
        writer.join()
    assert ch._decoder.idle and not ch._leader


def test_client_does_not_wait_for_a_reply_another_thread_read(
        fake: tuple[Channel, socket.socket]) -> None:
    """Between a request's send and its wait, another thread reading the socket
    may have read and sorted its reply: the wait takes it from there instead of
    reading the socket for a reply that will not come again (which held every
    other thread's reply until the timeout)."""
    ch, _srv = fake
    ch.timeout = 1
    seq = ch.send(p.MSG_PING)
    ch._replies[seq] = p.Frame(p.MSG_PING, p.F_REPLY, seq, b"\0\0\0\0early", 9)
    assert ch._wait_alone(seq) is None and not ch._leader  # not read: it is there
    assert ch.wait_reply(seq).payload == b"\0\0\0\0early"


def test_client_wait_times_out(fake: tuple[Channel, socket.socket]) -> None:
    ch, _srv = fake
    ch.timeout = 0
    with pytest.raises(ServiceError) as e:
        ch.request(p.MSG_PING)
    assert e.value.errno == errno.ETIMEDOUT
    assert not ch._leader


def test_client_sees_the_service_close(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    seq = ch.send(p.MSG_PING)
    srv.sendall(reply(seq, b"\0\0\0\0")[:14])  # part of the reply, then gone
    srv.close()
    with pytest.raises(ServiceError) as e:
        ch._wait_alone(seq)
    assert e.value.errno == errno.ECONNRESET
    assert not ch._leader and ch._eof
    with pytest.raises(ServiceError):  # and so does every later wait
        ch.wait_reply(seq)


def test_event_loop_stops_watching_while_a_thread_reads(
        fake: tuple[Channel, socket.socket]) -> None:
    """A waiter's loop that finds a thread reading stops watching the socket (it
    would spin on it); the thread's dispatch wakes the waiter, which watches it
    again and reads the event."""
    import asyncio

    ch, srv = fake
    ch._leader = True  # a thread is reading
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
            ch._leader = False
            ch._dispatch([])
        return await waiter

    assert asyncio.run(main()) == 5
    assert not ch._leader and ch._decoder.idle
