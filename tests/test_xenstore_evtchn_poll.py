"""A zero timeout on the service's event channels and xenstore watches only looks.

``pending(0)``, ``wait(port, 0)``, ``read_watch(0)`` and their asyncio twins
take what is queued, else read once what the socket holds right now, without
waiting (``xenevtchn_pending`` on the non-blocking /dev/xen/evtchn reads what
is queued; it used to look at the socket for up to a millisecond).  Checked
by the reads the channel makes (never a blocking one) and by what they find,
against a channel whose service end the test plays; no timing.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from xengrant.service import protocol as p
from xengrant.service.channel import Channel
from xengrant.service.evtclient import EventChannelClient
from xengrant.service.xsclient import XenStoreClient


def event(port: int) -> bytes:
    return p.encode(p.MSG_EVENT, p.F_ASYNC, 0, p.U32.pack(port))


def record_reads(ch: Channel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, bool]]:
    """Every read the channel makes: (its timeout, whether it was non-blocking)."""
    reads: list[tuple[Any, bool]] = []
    real = ch._recv

    def recv(timeout: float | None, nonblocking: bool, spin: float) -> int:
        reads.append((timeout, nonblocking))
        return real(timeout, nonblocking, spin)

    monkeypatch.setattr(ch, "_recv", recv)
    return reads


def test_pending_zero_never_waits_and_finds_what_came(
    fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ch, srv = fake
    ev = EventChannelClient(ch, 5)
    reads = record_reads(ch, monkeypatch)
    with pytest.raises(TimeoutError):
        ev.pending(0)
    with pytest.raises(TimeoutError):
        ev.wait(7, 0.0)
    assert reads == [(0.0, True), (0.0, True)]  # one look each, never a wait
    srv.sendall(event(7) + event(9))  # in the socket before the look
    assert ev.pending(0) == 7
    assert reads[2:] == [(0.0, True)]  # one read brought both
    assert ev.wait(9, 0) == 9
    assert len(reads) == 3  # the queued one needed no read
    with pytest.raises(TimeoutError):
        ev.pending(-1.0)  # below zero is zero
    assert reads[3:] == [(0.0, True)]


def test_read_watch_zero_and_the_async_twins_only_look(
    fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ch, srv = fake
    ev, xs = EventChannelClient(ch, 5), XenStoreClient(ch, 5)
    reads = record_reads(ch, monkeypatch)
    with pytest.raises(TimeoutError):
        xs.read_watch(0)
    srv.sendall(p.encode(p.MSG_WATCH_EVENT, p.F_ASYNC, 0, b"/a\0t\0") + event(3))
    assert xs.read_watch_token("t", 0) == ("/a", "t")

    async def main() -> int:
        with pytest.raises(TimeoutError):
            await xs.read_watch_async(0)
        return await ev.pending_async(0)

    assert asyncio.run(main()) == 3  # read by the watch's look, taken from the queue
    with pytest.raises(TimeoutError):
        asyncio.run(ev.pending_async(0))
    assert all(nonblocking for _t, nonblocking in reads) and len(reads) == 4


def test_a_zero_look_while_another_thread_reads_does_not_wait(
    fake: tuple[Channel, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ch, srv = fake
    ev = EventChannelClient(ch, 5)
    reads = record_reads(ch, monkeypatch)
    with ch._mu:
        ch._reading = True  # as while a thread waits for a reply
    try:
        srv.sendall(event(4))
        with pytest.raises(TimeoutError):
            ev.pending(0)  # the reader sorts what comes: nothing queued yet
        assert reads == []
    finally:
        with ch._mu:
            ch._reading = False
    assert ev.pending(0) == 4
