"""The package as users get it: Python-version fallbacks, the command line's manners."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import xengrant
from service_helpers import dies_with_this_process, start_hypervisor
from xengrant.errors import XenStoreError
from xengrant.service import connect, ping, ring
from xengrant.service.evtchn import EVTCHNSTAT_closed, EVTCHNSTAT_unbound


def test_eventfd_without_os_eventfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.9 (no os.eventfd) the ring's eventfds come from libc, with the same flags."""
    monkeypatch.delattr(os, "eventfd", raising=False)
    fd = ring._eventfd()
    try:
        assert not os.get_inheritable(fd)  # EFD_CLOEXEC
        assert not os.get_blocking(fd)  # EFD_NONBLOCK
        with pytest.raises(BlockingIOError):
            os.read(fd, 8)  # the counter starts at 0
        os.write(fd, (3).to_bytes(8, "little"))
        assert int.from_bytes(os.read(fd, 8), "little") == 3
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the command line
TIMEOUT = 120


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xengrant", *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env,
        preexec_fn=dies_with_this_process(),
    )


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout == f"xengrant {xengrant.__version__}\n"
    assert xengrant.__version__ == importlib.metadata.version("xengrant")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hypervisor", "--memory", "0"), "argument --memory: must be positive, not 0"),
        (("hypervisor", "--memory", "x"), "argument --memory: not an integer: 'x'"),
        (("hypervisor", "--max-grant-frames", "-1"), "must be positive, not -1"),
        (("inspect", "--interval", "0"), "argument --interval: must be positive"),
        (("inspect", "--follow"), "inspect: --follow needs --socket"),
        (("nosuch",), "invalid choice: 'nosuch'"),
        ((), "the following arguments are required: command"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    out = _run(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xengrant") and ": error: " in lines[0]
    assert message in lines[0]
    assert lines[0].endswith("--help)")


def test_hypervisor_memory_it_cannot_have_is_one_line() -> None:
    out = _run("hypervisor", "--socket", "/nonexistent-dir/x.sock", "--memory", "1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize("args", [("demo",), ("inspect",), ("demo", "--dump")])
def test_closed_stdout_is_no_traceback(args: tuple[str, ...]) -> None:
    """``xengrant demo | head -0``: the reader is gone before the first line."""
    r, w = os.pipe()
    os.close(r)  # every write to w is EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "xengrant", *args], stdout=w, stderr=subprocess.PIPE,
            text=True, timeout=TIMEOUT, check=False, preexec_fn=dies_with_this_process(),
        )
    finally:
        os.close(w)
    assert proc.stderr == ""
    assert proc.returncode == 0


def _hypervisor(tmp: str) -> tuple[subprocess.Popen[str], str]:
    path = os.path.join(tmp, "hv.sock")
    return start_hypervisor(path, "--memory", "32", "--quiet"), path


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    if proc.stderr:
        proc.stderr.close()


def test_inspect_follow_refreshes_and_ends_when_the_service_goes(tmp_path: Path) -> None:
    proc, path = _hypervisor(str(tmp_path))
    try:
        with connect(path) as a, connect(path) as b:
            share = a.grant_table.share_pages(b.domid, 1)
            out = _run("inspect", "--socket", path, "--follow", "--interval", "0.01",
                       "--count", "3")
            assert out.returncode == 0, out.stderr
            assert [ln for ln in out.stdout.splitlines() if ln.startswith("--- refresh")] == [
                "--- refresh 1", "--- refresh 2", "--- refresh 3"]
            assert out.stdout.count(f"grant-table for remote d{a.domid}") == 3
            share.unshare()
    finally:
        _stop(proc)
    gone = _run("inspect", "--socket", path, "--follow", "--interval", "0.01")
    assert gone.returncode == 1
    assert len(gone.stderr.splitlines()) == 1 and path in gone.stderr


def test_demo_processes_uses_a_running_service(tmp_path: Path) -> None:
    proc, path = _hypervisor(str(tmp_path))
    try:
        env = dict(os.environ, XENGRANT_SOCKET=path)
        out = _run("demo", "--processes", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"[  found] the running xengrant hypervisor on {path}" in out.stdout
        assert "got 'pong 3 from d2" in out.stdout
        assert "the demo's domains left: []" in out.stdout
        assert "this process is its toolstack (dom0)" in out.stdout
        # dom0 is claimed once per service: a second demo says so and still runs on it,
        # each process making its own domain
        again = _run("demo", "--processes", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "its dom0 is claimed already" in again.stdout
        assert "the frontend and backend make their own domains" in again.stdout
        assert "starting a private service" not in again.stdout
        assert "[  start] xengrant hypervisor pid" not in again.stdout
        assert "got 'pong 3 from d" in again.stdout
        assert "the demo's domains left: []" in again.stdout
        assert ping(path)  # the running service was left running
    finally:
        _stop(proc)


# ------------------------------------------------------------------ logging
def test_xens_debug_reasons_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        with caplog.at_level(logging.DEBUG, logger="xengrant"), pytest.raises(
            xengrant.GrantError
        ):
            back.gnttab.map_grant_ref(front.domid, 300)
        back.gnttab.close()
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        "xengrant.emu", logging.DEBUG,
        f"d{back.domid} map_grant_ref: GNTST_general_error (-1): "
        f"Bad flags (0x0) or dom (0); expected d{back.domid}",
    ) in got, got


def test_deferred_end_of_access_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        page = front.alloc_pages(1)
        ref = front.grant_table.get()
        front.grant_table.grant_access(ref, back.domid, page.gfns[0])
        m = back.gnttab.map_grant_ref(front.domid, ref)
        with caplog.at_level(logging.DEBUG, logger="xengrant.guest"):
            assert not front.grant_table.end_access_deferred(ref, page)  # page freed later
            m.unmap()
            assert front.grant_table.reap_deferred() == 0
        assert page.freed
        back.gnttab.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "xengrant.guest"]
    assert msgs == [
        f"d{front.domid}: deferring the end of access to ref {ref} (still in use)",
        f"d{front.domid}: deferred end of access to ref {ref} done",
    ]


def test_the_service_logs_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    from xengrant.service import server

    with caplog.at_level(logging.WARNING, logger="xengrant.service"):
        server._stderr("<conn 1 d1>: a bad request")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("xengrant.service", logging.WARNING, "<conn 1 d1>: a bad request")
    ]


# ------------------------------------------------------------------ one way to time out
def test_busy_is_a_timeout() -> None:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        share = front.grant_table.share_pages(back.domid, 1)
        m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
        with pytest.raises(TimeoutError) as got:
            share.unshare(timeout=0.01)
        assert isinstance(got.value, xengrant.Busy) and got.value.refs == share.refs
        with pytest.raises(TimeoutError):
            share.try_unshare()  # a zero timeout
        m.unmap()
        share.unshare(timeout=0)
        back.gnttab.close()


def test_waiting_for_refs_times_out_with_grant_table_timeout() -> None:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        d = xen.create_domain(max_grant_frames=1)
        table = d.grant_table
        held = table.get_n_nonblock(512 - 8)  # one frame of v1 entries, less the reserved
        assert len(held) == 504 and table.get_nonblock() is None
        for call in (lambda: table.get(timeout=0.01), lambda: table.get_n(2, timeout=0)):
            with pytest.raises(TimeoutError) as got:
                call()
            assert isinstance(got.value, xengrant.GrantTableTimeout)
            assert isinstance(got.value, xengrant.GrantTableFull)  # as documented before
        with pytest.raises(xengrant.GrantTableTimeout):
            asyncio.run(table.get_n_async(1, timeout=0.01))
        with pytest.raises(xengrant.GrantTableTimeout), table.with_refs(1, timeout=0):
            pass
        # a count the table can never hold is no timeout
        with pytest.raises(xengrant.GrantTableFull) as never:
            table.get_n(10_000, timeout=0)
        assert not isinstance(never.value, TimeoutError)
        table.put_n(held)
        assert asyncio.run(table.get_async(timeout=0.01)) >= 8


# ------------------------------------------------------------------ context managers
def test_pages_are_a_context_manager() -> None:
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        d = xen.create_domain()
        free = xen.free_frames
        with d.alloc_pages(3) as pages:
            assert xen.free_frames == free - 3
            pages.mem[:2] = b"ok"
        assert pages.freed and xen.free_frames == free


def test_server_watch_and_port_are_context_managers(tmp_path: Path) -> None:
    from xengrant.evtport import EventPort
    from xengrant.service import Server, XenStoreWatch

    path = str(tmp_path / "s.sock")
    with Server(path, 32 << 20) as srv:
        loop = threading.Thread(target=srv.serve_forever, kwargs={"close": False})
        loop.start()
        with connect(path) as a, connect(path) as b:
            with a.xs.watching("data", "tok") as w:
                assert isinstance(w, XenStoreWatch)
                assert w.read(30) == ("data", "tok")  # registering fires once
                a.xs.write("data/x", "1")
            assert w.closed
            with pytest.raises(XenStoreError):
                a.xs.unwatch("data", "tok")  # already gone
            with EventPort.offer(a.evtchn, b.domid) as port:
                assert a.evtchn.status(port.port)[0] == EVTCHNSTAT_unbound
            assert port.closed
            assert a.evtchn.status(port.port)[0] == EVTCHNSTAT_closed
    loop.join(30)
    assert not loop.is_alive() and not os.path.exists(path)
