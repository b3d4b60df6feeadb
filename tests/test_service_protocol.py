"""The service's wire protocol: framing, limits, field codecs (sans-IO)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xengrant import _cext
from xengrant.service import protocol as p


def test_roundtrip_byte_by_byte() -> None:
    msgs = [p.encode(p.MSG_PING, 0, i, bytes([i]) * i) for i in range(5)]
    stream = b"".join(msgs)
    dec = p.Decoder()
    frames = []
    for i in range(len(stream)):
        frames += dec.feed(stream[i : i + 1])
    assert [(f.type, f.flags, f.seq, f.payload) for f in frames] == [
        (p.MSG_PING, 0, i, bytes([i]) * i) for i in range(5)
    ]
    assert dec.buffered == 0


def test_header_layout() -> None:
    raw = p.encode(0x1234, p.F_REPLY, 0xDEADBEEF, b"abc")
    assert raw == b"\x03\x00\x00\x00\x34\x12\x01\x00\xef\xbe\xad\xde" + b"abc"
    assert p.HEADER_SIZE == 12


def test_oversized_is_reported_and_skipped_in_pieces() -> None:
    dec = p.Decoder(max_payload=16)
    big = p.HEADER.pack(1000, p.MSG_PING, 0, 7)
    frames = dec.feed(big + b"x" * 10)
    assert len(frames) == 1 and frames[0].payload is None and frames[0].length == 1000
    assert frames[0].seq == 7
    frames = dec.feed(b"y" * 500)
    assert frames == []
    frames = dec.feed(b"z" * 490 + p.encode(p.MSG_PING, 0, 8, b"ok"))
    assert [(f.seq, f.payload) for f in frames] == [(8, b"ok")]
    assert dec.buffered == 0


def test_encode_refuses_oversized() -> None:
    with pytest.raises(p.ProtocolError) as ei:
        p.encode(p.MSG_PING, 0, 1, bytes(p.MAX_PAYLOAD + 1))
    assert ei.value.errno == errno.EMSGSIZE


@pytest.mark.parametrize(
    ("frame", "err"),
    [
        (p.Frame(p.MSG_PING, 0, 1, None, 1 << 30), errno.EMSGSIZE),
        (p.Frame(p.MSG_PING, p.F_REPLY, 1, b"", 0), errno.EPROTO),
        (p.Frame(p.MSG_PING, p.F_ASYNC, 1, b"", 0), errno.EPROTO),
        (p.Frame(p.MSG_PING, 0x80, 1, b"", 0), errno.EPROTO),
        (p.Frame(999, 0, 1, b"", 0), errno.ENOSYS),
        (p.Frame(p.MSG_EVENT, 0, 1, b"", 0), errno.ENOSYS),
    ],
)
def test_check_request_header(frame: p.Frame, err: int) -> None:
    with pytest.raises(p.ProtocolError) as ei:
        p.check_request_header(frame)
    assert ei.value.errno == err


def test_check_request_header_accepts_requests() -> None:
    p.check_request_header(p.Frame(p.MSG_GNTTAB_OP, 0, 1, b"", 0))


def test_error_reply() -> None:
    (frame,) = p.Decoder().feed(p.encode_error(p.MSG_XS_READ, 9, errno.EACCES, "no"))
    assert frame.flags == p.F_REPLY and frame.seq == 9 and frame.type == p.MSG_XS_READ
    assert frame.payload is not None
    assert p.split_status(frame.payload) == (-errno.EACCES, b"no")
    with pytest.raises(p.ProtocolError):
        p.split_status(b"\x00")


def test_unpack_exact_and_i64s() -> None:
    assert p.unpack_exact(p.TWO_U32, p.TWO_U32.pack(1, 2), "x") == (1, 2)
    with pytest.raises(p.ProtocolError) as ei:
        p.unpack_exact(p.TWO_U32, b"\x00" * 7, "x")
    assert ei.value.errno == errno.EBADMSG
    assert p.unpack_i64s(p.pack_i64s([1, -1, 1 << 40]), "x") == [1, -1, 1 << 40]
    with pytest.raises(p.ProtocolError):
        p.unpack_i64s(b"\x00" * 9, "x")


def test_p2m_delta() -> None:
    """pack_p2m's columns, as the client's mirror takes them (_cext.p2m_apply)."""
    changes = [(0x100, 7, 0), (0x1000000, -1, 0), (5, 9, 2), (1 << 40, 1 << 35, 3)]
    gfns, entries = [g for g, _, _ in changes], [(m, t) for _, m, t in changes]
    blob = b"pre" + p.pack_p2m(gfns, entries) + b"post"
    mirror: dict[int, tuple[int, int]] = {0x1000000: (4, 1), 77: (78, 0)}
    end = _cext.p2m_apply(mirror, blob, 3)
    assert blob[end:] == b"post"
    assert mirror == {0x100: (7, 0), 5: (9, 2), 1 << 40: (1 << 35, 3), 77: (78, 0)}
    # the whole p2m: what the mirror had before goes
    whole = p.pack_p2m(gfns, entries, full=True)
    assert _cext.p2m_apply(mirror, whole, 0) == len(whole)
    assert mirror == {0x100: (7, 0), 5: (9, 2), 1 << 40: (1 << 35, 3)}
    # one entry, and an unmap batch (every gfn emptied): the packer's short forms
    assert _cext.p2m_apply(mirror, p.pack_p2m([5], [(11, 1)]), 0) == 4 + 24
    assert _cext.p2m_apply(mirror, p.pack_p2m([0x100, 5], [p.P2M_GONE] * 2), 0) == 4 + 48
    assert mirror == {1 << 40: (1 << 35, 3)}
    for bad in (p.pack_p2m(gfns, entries)[:-1], b"\x01"):
        with pytest.raises(ValueError, match="truncated"):
            _cext.p2m_apply(mirror, bad, 0)
    assert mirror == {1 << 40: (1 << 35, 3)}  # nothing applied
    with pytest.raises(TypeError):
        _cext.p2m_apply([], whole, 0)


def test_strings_and_reasons() -> None:
    assert p.pack_strings("a", "bc") == b"a\0bc\0"
    assert p.pack_strings("path", b"v", terminate_last=False) == b"path\0v"
    assert p.split_strings(b"a\0bc\0tail") == [b"a", b"bc"]
    blob = p.pack_reasons(["one", "two"])
    assert p.unpack_reasons(blob, 0) == ["one", "two"]
    assert p.unpack_reasons(blob[:-2], 0) == ["one", "t"]
    assert p.unpack_reasons(b"", 0) == []


def test_message_names_cover_types() -> None:
    assert p.MSG_NAMES[p.MSG_GNTTAB_OP] == "GNTTAB_OP"
    assert p.MSG_NAMES[p.MSG_WATCH_EVENT] == "WATCH_EVENT"
    assert all(isinstance(k, int) for k in p.MSG_NAMES)


P2M_ENTRY = st.tuples(st.integers(0, (1 << 52) - 1), st.integers(-(1 << 63), (1 << 63) - 1),
                      st.integers(-(1 << 63), (1 << 63) - 1))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(0, 1 << 20), st.tuples(st.integers(0, 99), st.integers(0, 4)),
                       max_size=8),
       st.lists(P2M_ENTRY, max_size=40), st.booleans(), st.integers(0, 7),
       st.one_of(st.none(), st.integers(0, 2000)), st.binary(max_size=30))
def test_p2m_apply_c_is_the_python(mirror: dict[int, tuple[int, int]],
                                   changes: list[tuple[int, int, int]], full: bool, pre: int,
                                   cut: int | None, junk: bytes) -> None:
    """``_cext.p2m_apply`` against the Python it transcribes (hypercalls.p2m_apply, which
    runs when frontring.C_PATHS is off): any columns, the whole-p2m flag, a delta cut
    anywhere or followed by junk, a bogus position -- the same mirror, the same end,
    the same error."""
    from xengrant.service.hypercalls import p2m_apply

    gfns = [g for g, _, _ in changes]
    blob = bytes(pre) + p.pack_p2m(gfns, [(m, t) for _, m, t in changes], full=full) + junk
    if cut is not None:
        blob = blob[:cut]
    for pos in (pre, pre + 1, -1, len(blob)):
        got = []
        for apply in (_cext.p2m_apply, p2m_apply):
            m = dict(mirror)
            try:
                got.append(("ok", apply(m, blob, pos), m))
            except (ValueError, TypeError) as e:
                got.append((type(e).__name__, str(e), m))
        assert got[0] == got[1]
