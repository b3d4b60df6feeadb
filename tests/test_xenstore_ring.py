"""The xenstore ring page (xengrant.xenstore.ring): a session served over xenstore_domain_interface.

The page's layout is checked against xs_wire.h in test_xenstore_wire.py; here
both ends run over one bytearray, with messages bigger than the ring, index
wrap-around at 2**32, watch events, and a domain that lies about its indexes.
"""

from __future__ import annotations

import errno

import pytest

from xengrant.xenstore import ClientCodec, Session, XenStore
from xengrant.xenstore import wire as w
from xengrant.xenstore.client import result
from xengrant.xenstore.ring import SERVER_FEATURES, RingEnd, RingServer


def _pair(start: int = 0) -> tuple[bytearray, RingEnd, RingServer, ClientCodec]:
    page = bytearray(4096)
    for off in (w.RING_REQ_CONS, w.RING_REQ_PROD, w.RING_RSP_CONS, w.RING_RSP_PROD):
        page[off : off + 4] = start.to_bytes(4, "little")
    store = XenStore()
    store.make_domain_home(3)
    server_end = RingEnd(page, server=True)
    server_end.init_server()
    return page, RingEnd(page, server=False), RingServer(server_end, Session(store, 3)), \
        ClientCodec()


def _call(client: RingEnd, server: RingServer, codec: ClientCodec, mtype: int,
          payload: bytes, tx: int = 0) -> bytes:
    req_id, data = codec.request(mtype, payload, tx)
    view = memoryview(data)
    for _ in range(100):  # each turn moves at least one byte while anything is left
        if view:
            view = view[client.write(view):]
        server.pump()
        codec.feed(client.read())
        msg = codec.reply(req_id)
        if msg is not None:
            return result(msg)
    raise AssertionError("no reply")


@pytest.mark.parametrize("start", [0, 0xFFFFFF00])
def test_requests_and_replies_bigger_than_the_ring(start: int) -> None:
    page, client, server, codec = _pair(start)
    assert int.from_bytes(page[w.RING_SERVER_FEATURES : w.RING_SERVER_FEATURES + 4],
                          "little") == SERVER_FEATURES == 3
    big = bytes(range(256)) * 7  # 1792 bytes: a message spans the 1024-byte ring twice
    assert _call(client, server, codec, w.XS_WRITE, b"data/big\0" + big) == b"OK\0"
    assert _call(client, server, codec, w.XS_READ, b"data/big\0") == big
    for i in range(40):  # the indexes run past 2**32 when started near it
        assert _call(client, server, codec, w.XS_WRITE, f"data/k{i}\0{i}".encode()) == b"OK\0"
    assert _call(client, server, codec, w.XS_DIRECTORY, b"data\0").count(b"\0") == 41
    with pytest.raises(OSError) as e:
        _call(client, server, codec, w.XS_READ, b"/local/domain/0\0")
    assert e.value.errno == errno.EACCES


def test_watch_events_come_through_the_ring() -> None:
    _page, client, server, codec = _pair()
    assert _call(client, server, codec, w.XS_WATCH, b"data\0tok\0") == b"OK\0"
    assert codec.take_event("tok") == ("data", "tok")
    server.session.store.write(0, "/local/domain/3/data/x", b"1")
    assert server.pump()
    codec.feed(client.read())
    assert codec.take_event("tok") == ("data/x", "tok")


def test_a_full_ring_holds_replies_and_reads_no_more() -> None:
    _page, client, server, codec = _pair()
    store = server.session.store
    store.write(3, "data/v", b"x" * 1000)
    reqs = b"".join(codec.request(w.XS_READ, b"data/v\0")[1] for _ in range(20))
    assert client.write(reqs) == len(reqs)  # 20 * 23 bytes fit
    server.pump()
    assert client.readable() == w.XENSTORE_RING_SIZE  # the ring is full ...
    assert server.backlog and len(server.backlog) < 20 * 1016  # ... the rest waits, bounded
    got = bytearray()
    while client.readable() or server.backlog:
        got += client.read()
        server.pump()
    msgs = w.Decoder().feed(bytes(got))
    assert len(msgs) == 20 and all(m.payload == b"x" * 1000 for m in msgs)


def test_bad_indexes_are_a_violation_and_set_error() -> None:
    page, _client, server, _codec = _pair()
    page[w.RING_REQ_PROD : w.RING_REQ_PROD + 4] = (2000).to_bytes(4, "little")
    with pytest.raises(w.ProtocolViolation) as e:
        server.pump()
    assert e.value.error == w.XENSTORE_ERROR_RINGIDX
    assert page[w.RING_ERROR] == w.XENSTORE_ERROR_RINGIDX


def test_an_oversized_message_is_a_violation() -> None:
    _page, client, server, _codec = _pair()
    client.write(w.HEADER.pack(w.XS_WRITE, 1, 0, 5000))
    with pytest.raises(w.ProtocolViolation):
        server.pump()
