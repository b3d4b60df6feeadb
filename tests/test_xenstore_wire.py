"""xengrant.xenstore.wire against /usr/include/xen/io/xs_wire.h, and the decoders' bounds.

One C program includes the header and prints every enum value, the
``xsd_errors`` table in order, the limits and the layouts of ``struct
xsd_sockmsg`` and ``struct xenstore_domain_interface``; each is compared with
the Python module.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xengrant.errors import XenStoreError
from xengrant.xenstore import wire as w
from xengrant.xenstore.client import ClientCodec, result

HEADER_H = Path("/usr/include/xen/io/xs_wire.h")

ENUM = [n for n in dir(w) if n.startswith("XS_") and isinstance(getattr(w, n), int)
        and n not in ("XS_WATCH_PATH", "XS_WATCH_TOKEN")]
DEFINES = [
    "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX", "XENSTORE_REL_PATH_MAX",
    "XENSTORE_RING_SIZE", "XENSTORE_SERVER_FEATURE_RECONNECTION",
    "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED", "XENSTORE_RECONNECT",
    "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_ERROR_PROTO", "XS_WATCH_PATH", "XS_WATCH_TOKEN",
]
RING_FIELDS = {
    "req": "RING_REQ", "rsp": "RING_RSP", "req_cons": "RING_REQ_CONS",
    "req_prod": "RING_REQ_PROD", "rsp_cons": "RING_RSP_CONS", "rsp_prod": "RING_RSP_PROD",
    "server_features": "RING_SERVER_FEATURES", "connection": "RING_CONNECTION",
    "error": "RING_ERROR",
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not HEADER_H.exists() or cc is None:
        pytest.skip("no xs_wire.h (apt-get install libxen-dev) or no C compiler")
    d = tmp_path_factory.mktemp("xswire")
    lines = [f'printf("{n} %d\\n", (int){n});' for n in ENUM + DEFINES]
    lines += [f'printf("off_{f} %d\\n", (int)offsetof(struct xenstore_domain_interface, {f}));'
              for f in RING_FIELDS]
    lines += [f'printf("msg_{f} %d\\n", (int)offsetof(struct xsd_sockmsg, {f}));'
              for f in ("type", "req_id", "tx_id", "len")]
    src = d / "probe.c"
    src.write_text(
        "#include <errno.h>\n#include <stdio.h>\n#include <stdint.h>\n#include <stddef.h>\n"
        '#include <string.h>\n#include <xen/io/xs_wire.h>\n'
        "int main(void) {\n" + "\n".join(lines) + "\n"
        'printf("sizeof_msg %d\\n", (int)sizeof(struct xsd_sockmsg));\n'
        'printf("sizeof_ring %d\\n", (int)sizeof(struct xenstore_domain_interface));\n'
        "for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)\n"
        '  printf("err%d %d:%s\\n", (int)i, xsd_errors[i].errnum, xsd_errors[i].errstring);\n'
        'printf("XS_WRITE_CREATE_EXCL_S %s\\n", XS_WRITE_CREATE_EXCL);\n'
        "return 0; }\n"
    )
    exe = d / "probe"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.check_output([str(exe)], text=True)
    return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.mark.parametrize("name", ENUM + DEFINES)
def test_constant_matches_header(header_values: dict[str, str], name: str) -> None:
    assert int(header_values[name]) == getattr(w, name)


def test_layouts_match_header(header_values: dict[str, str]) -> None:
    assert int(header_values["sizeof_msg"]) == w.HEADER_SIZE == 16
    for i, f in enumerate(("type", "req_id", "tx_id", "len")):
        assert int(header_values[f"msg_{f}"]) == 4 * i
    for f, attr in RING_FIELDS.items():
        assert int(header_values[f"off_{f}"]) == getattr(w, attr), f
    assert int(header_values["sizeof_ring"]) == w.RING_INTERFACE_SIZE
    assert header_values["XS_WRITE_CREATE_EXCL_S"] == w.XS_WRITE_CREATE_EXCL


def test_error_table_matches_header(header_values: dict[str, str]) -> None:
    table = [header_values[k] for k in sorted(
        (k for k in header_values if k.startswith("err")), key=lambda k: int(k[3:]))]
    assert table == [f"{num}:{name}" for num, name in w.XSD_ERRORS]


def test_error_strings() -> None:
    assert w.error_payload(errno.ENOENT) == b"ENOENT\0"
    assert w.error_payload(errno.ENOTDIR) == b"EINVAL\0"  # send_error: untranslatable
    assert w.errno_of(b"EAGAIN\0") == errno.EAGAIN
    assert w.errno_of(b"EBOGUS\0") == errno.EINVAL


def test_pack_and_decode_any_split() -> None:
    msgs = [w.Message(w.XS_READ, 7, 0, b"/a\0"), w.Message(w.XS_WRITE, 8, 3, b"/b\0xyz"),
            w.Message(w.XS_TRANSACTION_START, 9, 0, b"")]
    data = b"".join(m.pack() for m in msgs)
    assert data[:16] == bytes.fromhex("02000000" "07000000" "00000000" "03000000")
    for cut in range(len(data) + 1):
        d = w.Decoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert got == msgs
        assert d.buffered == 0


def test_oversized_header_breaks_without_buffering() -> None:
    d = w.Decoder()
    assert d.feed(w.Message(w.XS_READ, 1, 0, b"/\0").pack()) == [w.Message(w.XS_READ, 1, 0, b"/\0")]
    with pytest.raises(w.ProtocolViolation) as e:
        d.feed(w.HEADER.pack(w.XS_WRITE, 2, 0, 4097))
    assert e.value.errno == errno.EPROTO and e.value.error == w.XENSTORE_ERROR_PROTO
    assert d.buffered == 0
    with pytest.raises(w.ProtocolViolation):
        d.feed(b"x")  # stays broken, as xenstored ignores the connection
    with pytest.raises(XenStoreError) as e2:
        w.pack(w.XS_WRITE, 1, 0, b"x" * 4097)
    assert e2.value.errno == errno.E2BIG
    assert len(w.pack(w.XS_WRITE, 1, 0, b"x" * 4096)) == 4096 + 16


@given(st.binary(max_size=200), st.integers(1, 50))
def test_decoder_never_holds_more_than_a_message(data: bytes, step: int) -> None:
    d = w.Decoder()
    try:
        for i in range(0, len(data), step):
            for m in d.feed(data[i : i + step]):
                assert len(m.payload) <= w.XENSTORE_PAYLOAD_MAX
            assert d.buffered < w.HEADER_SIZE + w.XENSTORE_PAYLOAD_MAX + step
    except w.ProtocolViolation:
        assert d.broken


def test_client_codec_matches_replies_and_queues_events() -> None:
    c = ClientCodec(max_events=3)
    r1, _b1 = c.request(w.XS_READ, b"/a\0")
    r2, b2 = c.request(w.XS_READ, b"/b\0", tx_id=5)
    assert b2 == w.HEADER.pack(w.XS_READ, r2, 5, 3) + b"/b\0"
    c.forget(r1)  # given up: its reply is dropped
    c.feed(w.pack(w.XS_WATCH_EVENT, 0, 0, b"/x\0tok\0") + w.pack(w.XS_READ, r1, 0, b"late")
           + w.pack(w.XS_ERROR, r2, 5, b"ENOENT\0"))
    assert c.reply(r1) is None
    msg = c.reply(r2)
    assert msg is not None and msg.type == w.XS_ERROR
    with pytest.raises(XenStoreError) as e:
        result(msg)
    assert e.value.errno == errno.ENOENT
    for i in range(5):
        c.feed(w.pack(w.XS_WATCH_EVENT, 0, 0, f"/p{i}\0t{i % 2}\0".encode()))
    assert len(c.watch_events) == 3  # bounded: the oldest went
    assert c.take_event("t1") == ("/p3", "t1")
    c.drop_events("t0")
    assert c.take_event() is None
