"""xengrant.linux.xenstore: the xs_wire.h client, without Xen.

The message numbers and header layout are checked against
``/usr/include/xen/io/xs_wire.h`` by compiling C.  The client talks to a fake
xenstored on a Unix socket: a thread answering ``xs_wire`` messages from the
service's xenstore tree (:class:`xengrant.service.xenstore.XenStore`, Xen's
permission rules), as one domain, so relative paths, errors, watches and the
xenbus handshake helpers run as they would against xenstored.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xengrant.errors import XenStoreError
from xengrant.linux import xenstore as lx
from xengrant.service import xenbus
from xengrant.service.xenstore import XenStore

NAMES = [n for n in dir(lx) if n.startswith("XS_") and isinstance(getattr(lx, n), int)]


def test_message_numbers_match_xs_wire_h(tmp_path: Path) -> None:
    header = Path("/usr/include/xen/io/xs_wire.h")
    cc = shutil.which("cc") or shutil.which("gcc")
    if not header.exists() or cc is None:
        pytest.skip("no xs_wire.h (apt-get install libxen-dev) or no C compiler")
    lines = [f'printf("{n} %d\\n", (int){n});' for n in NAMES]
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdio.h>\n#include <stdint.h>\n#include <stddef.h>\n"
        "#include <xen/io/xs_wire.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\n"
        'printf("XENSTORE_PAYLOAD_MAX %d\\n", (int)XENSTORE_PAYLOAD_MAX);\n'
        'printf("sizeof %d\\n", (int)sizeof(struct xsd_sockmsg));\n'
        'printf("len %d\\n", (int)offsetof(struct xsd_sockmsg, len));\n'
        "return 0; }\n"
    )
    exe = tmp_path / "probe"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    got = dict(line.split() for line in subprocess.check_output([str(exe)], text=True).splitlines())
    for n in NAMES:
        assert int(got[n]) == getattr(lx, n), n
    assert int(got["XENSTORE_PAYLOAD_MAX"]) == lx.XENSTORE_PAYLOAD_MAX
    assert int(got["sizeof"]) == lx.HEADER.size and int(got["len"]) == 12


class FakeXenstored:
    """xs_wire over a Unix socket, answered from a service XenStore as domain ``domid``."""

    def __init__(self, path: str, domid: int) -> None:
        self.store = XenStore()
        self.store.make_domain_home(domid, "guest")
        self.domid = domid
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.hold = threading.Event()  # set: read requests but answer none
        self.garbage: bytes | None = None  # sent instead of the next reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 16:
                    mtype, rid, _tx, n = struct.unpack_from("=IIII", buf)
                    if len(buf) < 16 + n:
                        break
                    body, buf = buf[16 : 16 + n], buf[16 + n :]
                    if self.hold.is_set():
                        continue
                    if self.garbage is not None:
                        conn.sendall(self.garbage)
                        self.garbage = None
                        continue
                    conn.sendall(self._answer(conn, mtype, rid, body))

    def _answer(self, conn: object, mtype: int, rid: int, body: bytes) -> bytes:
        s, d = self.store, self.domid
        args = body.split(b"\0")
        path = args[0].decode()
        try:
            if mtype == lx.XS_READ:
                out = s.read(d, path)
            elif mtype == lx.XS_WRITE:
                s.write(d, path, body[len(args[0]) + 1 :])
                out = b"OK\0"
            elif mtype == lx.XS_MKDIR:
                s.mkdir(d, path)
                out = b"OK\0"
            elif mtype == lx.XS_RM:
                s.rm(d, path)
                out = b"OK\0"
            elif mtype == lx.XS_DIRECTORY:
                out = b"".join(c.encode() + b"\0" for c in s.directory(d, path))
            elif mtype == lx.XS_GET_PERMS:
                out = b"".join(c.encode() + b"\0" for c in s.get_perms(d, path))
            elif mtype == lx.XS_SET_PERMS:
                s.set_perms(d, path, [a.decode() for a in args[1:] if a])
                out = b"OK\0"
            elif mtype == lx.XS_WATCH:
                s.watch(conn, d, path, args[1].decode())
                out = b"OK\0"
            elif mtype == lx.XS_UNWATCH:
                s.unwatch(conn, d, path, args[1].decode())
                out = b"OK\0"
            elif mtype == lx.XS_GET_DOMAIN_PATH:
                out = f"/local/domain/{path}\0".encode()
            else:
                raise XenStoreError(errno.EINVAL, "unknown")
            reply = struct.pack("=IIII", mtype, rid, 0, len(out)) + out
        except XenStoreError as e:
            name = errno.errorcode[e.errno].encode() + b"\0"
            reply = struct.pack("=IIII", lx.XS_ERROR, rid, 0, len(name)) + name
        for ev in s.drain_events():  # events after the reply, as xenstored queues them
            p = ev.path.encode() + b"\0" + ev.token.encode() + b"\0"
            reply += struct.pack("=IIII", lx.XS_WATCH_EVENT, 0, 0, len(p)) + p
        return reply

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def xs(tmp_path: Path) -> Iterator[tuple[lx.LinuxXenStore, FakeXenstored]]:
    path = str(tmp_path / "socket")
    server = FakeXenstored(path, 7)
    client = lx.LinuxXenStore(path, timeout=5.0)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def test_read_write_directory_rm_and_relative_paths(
    xs: tuple[lx.LinuxXenStore, FakeXenstored],
) -> None:
    c, _server = xs
    assert c.domid() == 7
    c.write("data/a", "1")
    c.write("/local/domain/7/data/b", b"\x00\xffraw")
    assert c.read("data/a") == b"1" and c.read("data/b") == b"\x00\xffraw"
    assert c.directory("data") == ["a", "b"]
    c.mkdir("data/dir")
    assert c.read("data/dir") == b""
    c.rm("data/a")
    with pytest.raises(XenStoreError) as ei:
        c.read("data/a")
    assert ei.value.errno == errno.ENOENT and "ENOENT" in str(ei.value)
    assert c.get_domain_path(7) == "/local/domain/7"


def test_permissions_are_xenstoreds(xs: tuple[lx.LinuxXenStore, FakeXenstored]) -> None:
    c, _server = xs
    with pytest.raises(XenStoreError) as ei:  # dom0's node, not readable by d7
        c.read("/tool/xenstored")
    assert ei.value.errno == errno.EACCES
    c.write("data/p", "x")
    c.set_perms("data/p", ["n7", "r3"])
    assert c.get_perms("data/p") == ["n7", "r3"]
    with pytest.raises(XenStoreError) as ei:  # an unprivileged owner cannot give it away
        c.set_perms("data/p", ["n3"])
    assert ei.value.errno == errno.EPERM


def test_watches_fire_and_are_kept_apart_by_token(
    xs: tuple[lx.LinuxXenStore, FakeXenstored],
) -> None:
    c, _ = xs
    c.watch("data/w", "tok1")
    assert c.read_watch(1.0) == ("data/w", "tok1")  # registering fires once
    c.watch("data/v", "tok2")
    c.write("data/v", "1")
    c.write("data/w/child", "2")
    assert c.read_watch_token("tok1", 1.0) == ("data/w/child", "tok1")
    assert c.read_watch_token("tok2", 1.0) == ("data/v", "tok2")  # queued meanwhile
    with contextlib.suppress(TimeoutError):
        assert c.read_watch(0.05) == ("data/v", "tok2")  # a second event, if the fake sent one
    c.unwatch("data/w", "tok1")
    c.write("data/w", "3")
    c.drop_watch_events("tok2")
    with pytest.raises(TimeoutError):
        c.read_watch(0.05)


def test_wait_for_value_and_the_xenbus_handshake(
    xs: tuple[lx.LinuxXenStore, FakeXenstored],
) -> None:
    c, _server = xs
    with pytest.raises(TimeoutError):
        c.wait_for_value("data/ready", [b"1"], timeout=0.1)
    c.write("data/ready", "1")
    assert c.wait_for_value("data/ready", [b"1"], timeout=1.0) == b"1"
    dev = "data/dev"
    xenbus.switch_state(c, dev, xenbus.XenbusStateInitialised)
    assert xenbus.wait_state(c, dev, [xenbus.XenbusStateInitialised], timeout=1.0) == 3
    with pytest.raises(TimeoutError):
        xenbus.wait_state(c, dev, [xenbus.XenbusStateConnected], timeout=0.1)


def test_every_wait_is_bounded(xs: tuple[lx.LinuxXenStore, FakeXenstored]) -> None:
    c, server = xs
    server.hold.set()
    with pytest.raises(TimeoutError):
        c.read("data", timeout=0.1)
    server.hold.clear()
    c.write("data/after", "ok")  # the stream stays whole: replies are matched by req_id
    assert c.read("data/after") == b"ok"


def test_oversized_and_closed_streams_raise(xs: tuple[lx.LinuxXenStore, FakeXenstored]) -> None:
    c, server = xs
    with pytest.raises(XenStoreError) as ei:
        c.write("data/big", b"x" * 5000)
    assert ei.value.errno == errno.E2BIG
    server.garbage = struct.pack("=IIII", lx.XS_READ, 1, 0, 1 << 30)
    with pytest.raises(XenStoreError) as ei:
        c.read("data")
    assert ei.value.errno == errno.EPROTO


def test_own_domid_from_xenbus_is_none_without_xen(tmp_path: Path) -> None:
    from xengrant.linux import own_domid

    assert own_domid(str(tmp_path / "caps"), str(tmp_path / "xenbus")) is None
    assert lx.xenstore_domid(str(tmp_path / "nothing"), timeout=0.1) is None
