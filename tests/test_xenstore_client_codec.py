"""The service's xenstore client queues watch events with the shared codec.

``xengrant.xenstore.client.ClientCodec`` is the one rule for a xenstore
client's watch events (parse ``path NUL token NUL``, drop a malformed one,
keep at most ``max_events``, take by token, drop by token).  A domain
process's connection hands the ``XS_WATCH_EVENT`` payloads of its
``MSG_WATCH_EVENT`` frames to that codec (``Calls.xs``), and ``domain.xs``
(``XenStoreClient``) numbers its requests and takes its events there: here
with bytes (``Calls``) and with a channel whose service end the test plays.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xengrant.service import protocol as p
from xengrant.service.calls import Calls
from xengrant.service.channel import Channel
from xengrant.service.errors import ServiceError
from xengrant.service.xsclient import XenStoreClient
from xengrant.xenstore import wire as w
from xengrant.xenstore.client import ClientCodec

TIMEOUT = 10.0


def watch_frame(payload: bytes) -> bytes:
    return p.encode(p.MSG_WATCH_EVENT, p.F_ASYNC, 0, payload)


def test_calls_queue_watch_events_in_the_codec() -> None:
    calls = Calls()
    assert isinstance(calls.xs, ClientCodec) and calls.watch_events is calls.xs.watch_events
    # xs_watch_msg: exactly two strings, else dropped
    calls.feed(watch_frame(b"/a\0t1\0") + watch_frame(b"only-one-string\0")
               + watch_frame(b"/b\0t2\0") + watch_frame(b"/x\0t1\0three\0")
               + watch_frame(b"/x\0t1") + watch_frame(b"") + watch_frame(b"/c\0t1\0"))
    assert list(calls.watch_events) == [("/a", "t1"), ("/b", "t2"), ("/c", "t1")]
    assert calls.xs.take_event("t2") == ("/b", "t2")
    calls.xs.drop_events("t1")
    assert calls.xs.take_event() is None and calls.error is None


def test_a_token_that_is_not_utf8_does_not_break_the_reader() -> None:
    # The token is whatever bytes XS_WATCH carried; the old queue decoded it
    # strictly, and the reader died of UnicodeDecodeError.
    calls = Calls()
    calls.feed(watch_frame(b"/a\0\xff\xfe\0") + p.encode(p.MSG_EVENT, p.F_ASYNC, 0, p.U32.pack(4)))
    assert list(calls.watch_events) == [("/a", "\ufffd\ufffd")]
    assert list(calls.events) == [4] and calls.error is None


def test_the_watch_queue_is_bounded() -> None:
    calls = Calls(max_watch_events=4)
    calls.feed(b"".join(watch_frame(f"/p{i}\0t\0".encode()) for i in range(10)))
    assert [e[0] for e in calls.watch_events] == ["/p6", "/p7", "/p8", "/p9"]


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from(["/a", "/a/b", "rel/x", "@releaseDomain"]),
                              st.sampled_from(["t0", "t1", "t2"])), max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    takes=st.lists(st.sampled_from([None, "t0", "t1", "t2", "drop-t0", "drop-t1"]), max_size=30),
)
def test_any_cut_of_the_stream_queues_what_the_codec_queues(
    events: list[tuple[str, str]], cuts: list[int], takes: list[str | None]
) -> None:
    stream = b"".join(watch_frame(w.strings(path, tok)) for path, tok in events)
    calls = Calls()
    at = 0
    for n in cuts:
        calls.feed(stream[at : at + n])
        at += n
    if at < len(stream):
        calls.feed(stream[at:])
    model = list(events)
    for op in takes:  # the model: a list taken from by token, oldest first
        if op is not None and op.startswith("drop-"):
            calls.xs.drop_events(op[5:])
            model = [e for e in model if e[1] != op[5:]]
            continue
        want = next((e for e in model if op is None or e[1] == op), None)
        if want is not None:
            model.remove(want)
        assert calls.xs.take_event(op) == want
    assert list(calls.watch_events) == model


# --------------------------------------------- domain.xs over a channel
def _serve_one(srv: socket.socket, reply_payload: bytes, mtype: int = w.XS_READ) -> w.Message:
    """Read one MSG_XS_WIRE request and answer it; the xs_wire message it carried."""
    buf = b""
    dec = p.Decoder()
    frames: list[p.Frame] = []
    while not frames:
        buf = srv.recv(65536)
        assert buf, "the client closed"
        frames = list(dec.feed(buf))
    (fr,) = frames
    assert fr.type == p.MSG_XS_WIRE and fr.payload is not None
    (msg,) = w.Decoder().feed(fr.payload)
    answer = w.pack(mtype, msg.req_id, msg.tx_id, reply_payload)
    srv.sendall(p.encode(p.MSG_XS_WIRE, p.F_REPLY, fr.seq, p.STATUS.pack(0) + answer))
    return msg


def test_domain_xs_numbers_requests_and_takes_events_from_the_connection_codec(
    fake: tuple[Channel, socket.socket],
) -> None:
    ch, srv = fake
    xs = XenStoreClient(ch, 5)
    assert xs.codec is ch.calls.xs
    srv.sendall(watch_frame(b"data\0a\0") + watch_frame(b"data/x\0b\0")
                + watch_frame(b"data/y\0a\0"))
    got: list[w.Message] = []
    t = threading.Thread(target=lambda: got.append(_serve_one(srv, b"v")))
    t.start()
    assert xs.read("data/x") == b"v"
    t.join(TIMEOUT)
    assert got[0].req_id == 1 and got[0].payload == b"data/x\0"
    assert not xs.codec._pending  # matched by the call, nothing left waiting in the codec
    # the reply's read brought the events in; they wait in the codec, by token
    assert xs.read_watch_token("b", TIMEOUT) == ("data/x", "b")
    assert xs.read_watch(TIMEOUT) == ("data", "a")
    xs.drop_watch_events("a")
    assert list(ch.calls.watch_events) == []
    with pytest.raises(TimeoutError):
        xs.read_watch_token("a", 0.01)


def test_domain_xs_async_twin_reads_from_the_codec(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    xs = XenStoreClient(ch, 5)

    async def main() -> tuple[tuple[str, str], tuple[str, str]]:
        srv.sendall(watch_frame(b"/x\0one\0") + watch_frame(b"/y\0two\0"))
        two = await xs.read_watch_token_async("two", TIMEOUT)
        one = await xs.read_watch_async(TIMEOUT)
        return two, one

    assert asyncio.run(main()) == (("/y", "two"), ("/x", "one"))
    with pytest.raises(TimeoutError):
        asyncio.run(xs.read_watch_async(0.01))


def test_a_watch_wait_fails_with_the_connection(fake: tuple[Channel, socket.socket]) -> None:
    ch, srv = fake
    xs = XenStoreClient(ch, 5)
    srv.sendall(watch_frame(b"/x\0t\0"))
    srv.shutdown(socket.SHUT_RDWR)
    assert xs.read_watch(TIMEOUT) == ("/x", "t")  # what came before the end is kept
    with pytest.raises(ServiceError):
        xs.read_watch(TIMEOUT)
