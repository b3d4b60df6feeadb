"""``xengrant hypervisor``, ``xengrant demo --processes``, ``xengrant inspect --socket``."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from service_helpers import dies_with_this_process, start_hypervisor
from xengrant.service import ServiceError, connect, default_socket_path

TIMEOUT = 120


def _xengrant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xengrant", *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
        preexec_fn=dies_with_this_process(),
    )


@pytest.fixture
def hypervisor() -> Iterator[tuple[subprocess.Popen[str], str]]:
    tmp = tempfile.mkdtemp(prefix="xg-cli-")
    path = os.path.join(tmp, "hv.sock")
    proc = start_hypervisor(path, "--memory", "32", "--quiet")
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        if proc.stderr:
            proc.stderr.close()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def test_demo_processes() -> None:
    out = _xengrant("demo", "--processes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "got 'pong 3 from d2" in out.stdout
    assert "the demo's domains left: []" in out.stdout


def test_hypervisor_serves_inspects_and_stops(
    hypervisor: tuple[subprocess.Popen[str], str],
) -> None:
    proc, path = hypervisor
    with connect(path) as a, connect(path) as b:
        share = a.grant_table.share_pages(b.domid, 1)
        with b.gnttab.map_grant_ref(a.domid, share.refs[0]):
            out = _xengrant("inspect", "--socket", path)
            assert out.returncode == 0, out.stderr
            assert f"grant-table for remote d{a.domid}" in out.stdout
            assert "permit_access|reading|writing" in out.stdout
            assert f"/local/domain/{b.domid}/data = ''" in out.stdout
            # the map went on b's ring: one request, consumed and answered
            assert f"  d{b.domid}: req_prod=1 req_cons=1 req_event=" in out.stdout
            assert "rsp_prod_pvt=1 rsp_prod=1 rsp_event=" in out.stdout
        share.unshare()
    # a second service on the same socket refuses to start
    again = _xengrant("hypervisor", "--socket", path)
    assert again.returncode == 1 and "already listens" in again.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert not os.path.exists(path)


def test_inspect_without_service() -> None:
    out = _xengrant("inspect", "--socket", "/nonexistent/xengrant.sock")
    assert out.returncode == 1


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XENGRANT_SOCKET", "/x/y.sock")
    assert default_socket_path() == "/x/y.sock"
    monkeypatch.delenv("XENGRANT_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == os.path.join(str(tmp_path), "xengrant.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = os.path.join(str(tmp_path), f"xengrant-{os.getuid()}")
    assert default_socket_path() == os.path.join(private, "xengrant.sock")
    assert not os.path.exists(private)  # a client makes nothing
    assert default_socket_path(create=True) == os.path.join(private, "xengrant.sock")
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    os.chmod(private, 0o755)  # open to others: refused by the service and its clients
    with pytest.raises(PermissionError, match="mode 0755"):
        default_socket_path()
    os.rmdir(private)
    os.symlink(str(tmp_path), private)  # a symlink squatted in its place
    with pytest.raises(PermissionError, match="symlink"):
        default_socket_path(create=True)
    os.unlink(private)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    os.chmod(str(tmp_path), 0o777)
    try:
        with pytest.raises(PermissionError, match="not a private directory"):
            default_socket_path()
    finally:
        os.chmod(str(tmp_path), 0o700)


def test_clients_see_the_service_die(hypervisor: tuple[subprocess.Popen[str], str]) -> None:
    proc, path = hypervisor
    d = connect(path, timeout=30)
    pages = d.alloc_pages(1)
    pages.mem[:4] = b"kept"
    proc.kill()
    proc.wait(TIMEOUT)
    with pytest.raises(ServiceError):
        d.grant_table.share_pages(0, 1)
    assert bytes(pages.mem[:4]) == b"kept"  # the memfd mapping outlives the service
    pages.mem.release()
    pages._view.close()
    pages.freed = True
    d.close()


def test_demo_says_why_it_starts_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who cannot read the service's dom0 token is not its owner: the demo
    says so, and that it starts a private service."""
    from xengrant.service import cli as service_cli

    def no_token(path: str, domid: int | None = None, **kw: object) -> object:
        raise PermissionError(13, "Permission denied", f"{path}.token")

    monkeypatch.setattr(service_cli, "connect", no_token)
    dom0, own, why = service_cli._claim_or_why("/run/x/xengrant.sock")
    assert dom0 is None and not own
    assert f"this user (uid {os.getuid()}) cannot read its dom0 token" in why
    assert "only the uid that started the service may be its toolstack" in why
