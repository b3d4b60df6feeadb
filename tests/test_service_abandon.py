"""A service client whose wait is given up: a timeout, or a signal handler that
raises (Ctrl-C) while it waits.

- the reply that comes later is dropped, not kept for good;
- bytes the interrupted wait had already read are decoded, not lost, so the
  stream stays whole: the next request gets its own reply.

Against a fake service (``conftest.fake``): the test writes the replies. The
signal is sent once the waiting thread is seen asleep in ``poll`` (read from
``/proc/self/task/<tid>/syscall``): no sleep, no timing.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from test_service_lane import DOM, GFN, REF, RW, map_reply, next_seq
from xengrant.service import protocol as p
from xengrant.service.client import Channel, ServiceError

POLL_SYSCALLS = {"7", "271"}  # x86-64 poll, ppoll


class Interrupted(Exception):
    """What the test's SIGUSR1 handler raises (as Ctrl-C raises KeyboardInterrupt)."""


@pytest.fixture
def interrupt_when_polling() -> Iterator[threading.Thread]:
    """A thread that sends SIGUSR1 to this thread once it sleeps in poll(), whose
    handler raises Interrupted."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/<pid>/task/<tid>/syscall")
    me, native = threading.get_ident(), threading.get_native_id()

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)

    def watch() -> None:
        path = f"/proc/self/task/{native}/syscall"
        while True:
            with open(path) as f:
                if f.read().split(" ", 1)[0] in POLL_SYSCALLS:
                    break
        signal.pthread_kill(me, signal.SIGUSR1)

    t = threading.Thread(target=watch, daemon=True)
    try:
        yield t
    finally:
        t.join(30)
        signal.signal(signal.SIGUSR1, old)


def ping_reply(seq: int) -> bytes:
    return p.encode(p.MSG_PING, p.F_REPLY, seq, p.STATUS.pack(0) + b"pong")


def test_a_reply_that_comes_after_a_timeout_is_dropped(
        fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    ch.timeout, ch.spin = 0.0, 0.0
    seq = next_seq(ch)
    with pytest.raises(ServiceError) as ei:
        ch.call(p.MSG_PING)
    assert ei.value.errno == errno.ETIMEDOUT
    assert ch._abandoned == {seq}
    ch.timeout = 10.0
    srv.sendall(ping_reply(seq) + ping_reply(seq + 1))
    assert ch.call(p.MSG_PING) == (0, b"pong")
    assert ch._replies == {} and ch._abandoned == set()


@pytest.mark.parametrize("how", ["request", "map_one"])
def test_an_interrupted_wait_keeps_what_it_read(
    fake: tuple[Channel, socket.socket], interrupt_when_polling: threading.Thread, how: str
) -> None:
    """Half of the reply came, then the handler raised: the half is kept (the
    decoder holds it), the request is abandoned, and the next request reads its
    own reply after the rest of the first."""
    ch, srv = fake
    ch.spin = 0.0  # straight to poll()
    seq = next_seq(ch)
    first = ping_reply(seq) if how == "request" else map_reply(seq)
    half = len(first) // 2
    srv.sendall(first[:half])  # before the call: read at once, then it polls for the rest
    interrupt_when_polling.start()
    with pytest.raises(Interrupted):
        if how == "request":
            ch.call(p.MSG_PING)
        else:
            ch.map_one(DOM, REF, GFN, RW, {})
    assert not ch._decoder.idle  # the half it had read is held
    assert ch._abandoned == {seq} and not ch._leader
    srv.sendall(first[half:] + ping_reply(seq + 1))
    assert ch.call(p.MSG_PING) == (0, b"pong")
    assert ch._replies == {} and ch._abandoned == set() and ch._decoder.idle


def test_an_interrupted_wait_that_read_nothing_raises_as_before(
    fake: tuple[Channel, socket.socket], interrupt_when_polling: threading.Thread
) -> None:
    ch, srv = fake
    ch.spin = 0.0
    seq = next_seq(ch)
    interrupt_when_polling.start()
    with pytest.raises(Interrupted):
        ch.call(p.MSG_PING)
    assert ch._abandoned == {seq} and ch._decoder.idle
    srv.sendall(ping_reply(seq) + ping_reply(seq + 1))
    assert ch.call(p.MSG_PING) == (0, b"pong")
    assert ch._replies == {} and ch._abandoned == set()
