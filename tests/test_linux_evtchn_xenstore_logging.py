"""xengrant.linux's event channels and xenstore client log as the grant calls do.

To ``xengrant.linux``, rate-limited (``linux/_log.py``): what another domain
decides at DEBUG with the errno (a bind it refused, xenstored's error
answers), failures of our own side at WARNING (a port this handle did not
bind, a device that failed, a request given up, a connection that died --
the last once).  Here against a device and a xenstored the test plays.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from xengrant.abi import evtchn as ev
from xengrant.errors import XenStoreError
from xengrant.evtchn.core import EvtchnError
from xengrant.linux import LinuxXenStore, _log
from xengrant.linux.errors import LinuxGrantError
from xengrant.linux.evtchn import EventChannels, LinuxEvtchn
from xengrant.xenstore import wire as w

LOGGER = "xengrant.linux"
#: what each handle raises: the portable one EvtchnError, the first one LinuxGrantError
ERRORS = (EvtchnError, LinuxGrantError)


@pytest.fixture(autouse=True)
def fresh_limit(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The process's limiter, on a clock of the test's and with nothing counted."""
    clock = [0.0]
    limit = _log.ratelimited
    monkeypatch.setattr(limit, "clock", lambda: clock[0])
    monkeypatch.setattr(limit, "burst", 3)
    monkeypatch.setattr(limit, "_keys", {})
    monkeypatch.setattr(limit, "suppressed", 0)
    return clock


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


class RefusingEvtchn:
    """/dev/xen/evtchn that answers each ioctl with the errno the test set."""

    path = "/dev/xen/evtchn"

    def __init__(self) -> None:
        self.errs: dict[int, int] = {}
        self.read_err = errno.EAGAIN
        self.write_err = 0
        self.r, self.w = os.pipe()

    def ioctl(self, request: int, arg: ctypes.Structure) -> int:
        err = self.errs.get(request)
        if err:
            raise OSError(err, os.strerror(err))
        return 5

    def mmap(self, length: int, writable: bool, offset: int) -> object:
        raise OSError(errno.ENODEV, "no mmap")

    def fileno(self) -> int:
        return self.r

    def read(self, size: int) -> bytes:
        raise OSError(self.read_err, os.strerror(self.read_err))

    def write(self, data: bytes) -> int:
        if self.write_err:
            raise OSError(self.write_err, os.strerror(self.write_err))
        return len(data)

    def close(self) -> None:
        for fd in (self.r, self.w):
            os.close(fd)


@pytest.mark.parametrize("cls", [LinuxEvtchn, EventChannels])
def test_a_bind_the_peer_refuses_is_debug_ours_is_warning(
    caplog: pytest.LogCaptureFixture, cls: type[LinuxEvtchn] | type[EventChannels]
) -> None:
    dev = RefusingEvtchn()
    h = cls(device=dev)  # type: ignore[arg-type]
    dev.errs[ev.IOCTL_EVTCHN_BIND_INTERDOMAIN] = errno.EINVAL  # not unbound / not offered to us
    dev.errs[ev.IOCTL_EVTCHN_BIND_UNBOUND_PORT] = errno.ESRCH  # the domain is gone
    dev.errs[ev.IOCTL_EVTCHN_NOTIFY] = errno.ENOTCONN  # a port this handle did not bind
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        with pytest.raises(ERRORS) as e1:
            h.bind_interdomain(3, 7)
        with pytest.raises(ERRORS):
            h.bind_unbound_port(3)
        with pytest.raises(ERRORS) as e3:
            h.notify(9)
    assert getattr(e1.value, "errno", None) == errno.EINVAL
    assert getattr(e3.value, "errno", None) == errno.ENOTCONN
    assert lines(caplog) == [
        (logging.DEBUG, "evtchn bind_interdomain: IOCTL_EVTCHN_BIND_INTERDOMAIN of "
                        "/dev/xen/evtchn: EINVAL (Invalid argument)"),
        (logging.DEBUG, "evtchn bind_unbound_port: IOCTL_EVTCHN_BIND_UNBOUND_PORT of "
                        "/dev/xen/evtchn: ESRCH (No such process)"),
        (logging.WARNING, "evtchn notify: IOCTL_EVTCHN_NOTIFY of /dev/xen/evtchn: "
                          "ENOTCONN (Transport endpoint is not connected)"),
    ]
    h.close()


def test_our_own_failures_are_warnings_rate_limited(
    caplog: pytest.LogCaptureFixture, fresh_limit: list[float]
) -> None:
    dev = RefusingEvtchn()
    h = LinuxEvtchn(device=dev)  # type: ignore[arg-type]
    dev.errs[ev.IOCTL_EVTCHN_BIND_UNBOUND_PORT] = errno.ENOSPC  # this domain's ports are out
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(5):
            with pytest.raises(EvtchnError) as ei:
                h.bind_unbound_port(0)
            assert ei.value.errno == errno.ENOSPC
    got = lines(caplog)
    assert [lv for lv, _ in got] == [logging.WARNING] * 3  # then the limit: 2 left out
    assert _log.ratelimited.suppressed == 2
    caplog.clear()
    fresh_limit[0] = 6.0
    dev.write_err = errno.EBADF
    dev.read_err = errno.EIO
    os.write(dev.w, b"x")  # readable: the read fails
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        with pytest.raises(EvtchnError):
            h.bind_unbound_port(0)
        with pytest.raises(EvtchnError):
            h.pending(1.0)
    got = lines(caplog)
    assert got[0] == (logging.WARNING, "evtchn bind_unbound_port: IOCTL_EVTCHN_BIND_UNBOUND_PORT"
                      " of /dev/xen/evtchn: ENOSPC (No space left on device) (2 similar lines"
                      " left out)")
    assert got[1] == (logging.WARNING, "evtchn pending: read of /dev/xen/evtchn: EIO "
                      "(Input/output error)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(EvtchnError):
        h.bind_unbound_port(0)
    assert len(lines(caplog)) == 1
    h.close()


# ------------------------------------------------------------------ xenstore
class ScriptedXenstored:
    """A xenstored socket answering each request with the next scripted reply
    (``None``: no answer; bytes: sent as they are)."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.conn, _ = self.listener.accept()
        return self.conn

    def answer(self, mtype: int, payload: bytes) -> None:
        assert self.conn is not None
        head = self.conn.recv(w.HEADER_SIZE, socket.MSG_WAITALL)
        _t, req_id, tx, n = w.HEADER.unpack(head)
        if n:
            self.conn.recv(n, socket.MSG_WAITALL)
        self.conn.sendall(w.pack(mtype, req_id, tx, payload))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def xsd(tmp_path: Path) -> Iterator[tuple[LinuxXenStore, ScriptedXenstored]]:
    server = ScriptedXenstored(str(tmp_path / "socket"))
    client = LinuxXenStore(str(tmp_path / "socket"), timeout=5.0)
    server.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def test_xenstoreds_error_answers_are_debug(
    xsd: tuple[LinuxXenStore, ScriptedXenstored], caplog: pytest.LogCaptureFixture
) -> None:
    c, server = xsd
    import threading

    def serve() -> None:
        server.answer(w.XS_ERROR, b"EACCES\0")
        server.answer(w.XS_READ, b"v")

    t = threading.Thread(target=serve)
    t.start()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        with pytest.raises(XenStoreError) as ei:
            c.read("/local/domain/0/secret")
        assert ei.value.errno == errno.EACCES
        assert c.read("data/x") == b"v"
    t.join(10)
    assert lines(caplog) == [(logging.DEBUG, "XS_READ: xenstored answered EACCES (13)")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):  # DEBUG off: nothing said
        t = threading.Thread(target=server.answer, args=(w.XS_ERROR, b"ENOENT\0"))
        t.start()
        with pytest.raises(XenStoreError):
            c.read("data/none")
        t.join(10)
    assert lines(caplog) == []


def test_a_request_given_up_is_a_warning(
    xsd: tuple[LinuxXenStore, ScriptedXenstored], caplog: pytest.LogCaptureFixture
) -> None:
    c, _server = xsd
    with caplog.at_level(logging.DEBUG, logger=LOGGER), pytest.raises(TimeoutError):
        c.read("data/x", timeout=0.05)
    assert lines(caplog) == [
        (logging.WARNING, f"XS_READ: no reply from {c.path} in time; the request is given up")]


@pytest.mark.parametrize("how", ["closed", "oversized"])
def test_a_dead_connection_is_one_warning(
    xsd: tuple[LinuxXenStore, ScriptedXenstored], caplog: pytest.LogCaptureFixture, how: str
) -> None:
    c, server = xsd
    assert server.conn is not None
    if how == "closed":
        server.conn.close()
        wants = {errno.ECONNRESET, errno.EPIPE}  # a read or a write finds it first
    else:
        server.conn.sendall(struct.pack("=IIII", w.XS_READ, 1, 0, 1 << 30))
        wants = {errno.EPROTO}
    errs = []
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(3):  # then at once, with the same errno, and said no more
            with pytest.raises(XenStoreError) as ei:
                c.read("data/x", timeout=5.0)
            errs.append(ei.value.errno)
    assert len(set(errs)) == 1 and errs[0] in wants
    got = lines(caplog)
    assert len(got) == 1 and got[0][0] == logging.WARNING
    assert got[0][1].startswith(f"xenstore connection {c.path} failed: ")
    assert got[0][1].endswith(f"(errno {errs[0]})")
    assert c.broken is not None and c.broken.errno == errs[0]
