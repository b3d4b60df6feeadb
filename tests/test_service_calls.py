"""The requests of a service connection in flight (``service/calls.py``), driven
with bytes: no socket, no thread.

Each request waited for is one record, ``sent`` -> ``answered`` -> ``done``, or
``failed`` with the connection; a posted request's reply runs its ``on_reply``
in stream order; events and watch events are queued; a stream the service
never sends (a reply to nothing, an oversized reply) fails the connection.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xengrant.service import protocol as p
from xengrant.service.calls import Calls, State
from xengrant.service.errors import ServiceError


def reply(seq: int, body: bytes = b"", flags: int = p.F_REPLY) -> bytes:
    return p.encode(p.MSG_PING, flags, seq, p.STATUS.pack(0) + body)


def event(port: int) -> bytes:
    return p.encode(p.MSG_EVENT, p.F_ASYNC, 0, p.U32.pack(port))


def test_a_call_goes_sent_answered_done() -> None:
    calls = Calls()
    c = calls.call(p.MSG_PING)
    assert c.state is State.SENT and calls.take(c) is None
    calls.feed(reply(c.seq, b"pong"))
    assert c.state is State.ANSWERED
    assert calls.take(c) == p.STATUS.pack(0) + b"pong"
    assert c.state is State.DONE and not calls.waiting
    with pytest.raises(ValueError):  # taken once
        calls.take(c)


def test_replies_go_to_their_own_calls_in_any_order() -> None:
    calls = Calls()
    one, two = calls.call(p.MSG_PING), calls.call(p.MSG_PING)
    calls.feed(reply(two.seq, b"2") + reply(one.seq, b"1"))
    assert calls.take(one) == p.STATUS.pack(0) + b"1"
    assert calls.take(two) == p.STATUS.pack(0) + b"2"


def test_a_reply_in_pieces() -> None:
    calls = Calls()
    c = calls.call(p.MSG_PING)
    data = event(3) + reply(c.seq, b"x" * 100)
    for i in range(len(data)):
        calls.feed(data[i : i + 1])
    assert list(calls.events) == [3] and calls.take(c) == p.STATUS.pack(0) + b"x" * 100


def test_posted_replies_run_in_stream_order_and_keep_failures() -> None:
    calls = Calls()
    order: list[str] = []

    def ok(body: bytes) -> BaseException | None:
        order.append("ok")
        return None

    def bad(body: bytes) -> BaseException | None:
        order.append("bad")
        return RuntimeError("unmap failed")

    def raises(body: bytes) -> BaseException | None:
        order.append("raises")
        raise KeyError("boom")

    s1, s2, s3 = calls.post(ok), calls.post(bad), calls.post((7, raises))
    c = calls.call(p.MSG_PING)
    calls.feed(reply(s1, flags=p.F_REPLY | p.F_POSTED) + reply(s2) + reply(s3) + reply(c.seq))
    assert order == ["ok", "bad", "raises"] and not calls.posted
    assert [type(e) for e in calls.deferred] == [RuntimeError, KeyError]
    assert calls.take(c) is not None


def test_events_and_watch_events_are_queued() -> None:
    calls = Calls()
    watch = p.encode(p.MSG_WATCH_EVENT, p.F_ASYNC, 0, p.pack_strings("/a/b", "tok"))
    short = p.encode(p.MSG_EVENT, p.F_ASYNC, 0, b"\1")  # not a port: ignored
    calls.feed(event(5) + watch + short + event(6))
    assert list(calls.events) == [5, 6]
    assert list(calls.watch_events) == [("/a/b", "tok")]
    assert calls.error is None


@pytest.mark.parametrize("how", ["eof", "stranger", "oversized"])
def test_a_failed_connection_fails_every_call_now_and_later(how: str) -> None:
    calls = Calls(max_payload=64)
    c = calls.call(p.MSG_PING)
    calls.post(lambda body: None)
    if how == "eof":
        calls.feed(b"")
        want = errno.ECONNRESET
    elif how == "stranger":
        calls.feed(reply(c.seq + 100))  # a reply to no request
        want = errno.EBADMSG
    else:
        calls.feed(reply(c.seq, b"x" * 100))  # over max_payload
        want = errno.EBADMSG
    assert c.state is State.FAILED and calls.error is not None
    assert calls.error.errno == want
    with pytest.raises(ServiceError) as ei:
        calls.take(c)
    assert ei.value.errno == want
    assert not calls.waiting and not calls.posted
    later = calls.call(p.MSG_PING)
    assert later.state is State.FAILED and later.error is calls.error
    calls.feed(reply(later.seq))  # nothing more is taken
    with pytest.raises(ServiceError):
        calls.take(later)


def test_unsent_forgets_the_request() -> None:
    calls = Calls()
    c = calls.call(p.MSG_PING)
    s = calls.post(lambda body: None)
    calls.unsent(c.seq)
    calls.unsent(s)
    assert not calls.waiting and not calls.posted
    calls.feed(reply(c.seq))  # its reply would be a stranger's now
    assert calls.error is not None and calls.error.errno == errno.EBADMSG


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["call", "post", "event"]), st.binary(max_size=40)),
                max_size=20),
       st.lists(st.integers(1, 64), max_size=30))
def test_any_split_of_any_stream_sorts_alike(ops: list[tuple[str, bytes]],
                                             cuts: list[int]) -> None:
    """Whatever the reads' sizes, every call gets its own body, every posted reply
    runs once in order, every event is queued in order."""
    calls = Calls()
    stream = b""
    want: dict[int, bytes] = {}
    ran: list[int] = []
    want_ran: list[int] = []
    want_events: list[int] = []
    records = []
    for i, (kind, body) in enumerate(ops):
        if kind == "call":
            c = calls.call(p.MSG_PING)
            records.append(c)
            want[c.seq] = p.STATUS.pack(0) + body
            stream += reply(c.seq, body)
        elif kind == "post":
            s = calls.post(lambda b, i=i: ran.append(i))  # type: ignore[misc]
            want_ran.append(i)
            stream += reply(s, body, p.F_REPLY | p.F_POSTED)
        else:
            want_events.append(i)
            stream += event(i)
    pos = 0
    for n in cuts:
        if stream[pos : pos + n]:  # (b"" is the end of the stream)
            calls.feed(stream[pos : pos + n])
        pos += n
    if pos < len(stream):
        calls.feed(stream[pos:])
    assert calls.error is None
    assert {c.seq: calls.take(c) for c in records} == want
    assert ran == want_ran and list(calls.events) == want_events
    assert not calls.waiting and not calls.posted and calls.decoder.idle
