"""A service child dies with the process that started it.

A test process killed outright (SIGKILL, a CI timeout) runs no cleanup at
all: without :func:`service_helpers.die_with_parent` its ``xengrant
hypervisor`` children would serve on, orphaned, for ever.  Here a middle
process starts a service -- a ``spawn`` Process (:class:`Service`) or a
``subprocess.Popen`` of the CLI (:func:`start_hypervisor`) -- reports the
service's pid and is SIGKILLed; the service must be gone soon after.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import pytest

from service_helpers import CTX, TIMEOUT, Service, spawn_process, start_hypervisor

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"
)


def _middle(kind: str, conn: Any) -> None:
    """Start a service child, send ``(its pid, its directory)``, then wait to be killed."""
    if kind == "process":
        svc = Service()
        conn.send((svc.proc.pid, svc.dir))
    else:
        tmp = tempfile.mkdtemp(prefix="xg-orphan-")
        proc = start_hypervisor(os.path.join(tmp, "hv.sock"), "--memory", "32", "--quiet")
        conn.send((proc.pid, tmp))
    conn.recv()  # never answered: the test kills this process


def _identity(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from /proc/<pid>/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3, the state, on
    return fields[0], fields[19]  # field 22: starttime


def _running(pid: int, started: str) -> bool:
    """Whether the process first seen starting at ``started`` still runs: a zombie
    (dead, its new parent not having reaped it yet) or a reused pid does not."""
    now = _identity(pid)
    return now is not None and now[1] == started and now[0] not in ("Z", "X")


@pytest.mark.parametrize("kind", ["process", "popen"])
def test_service_dies_with_its_killed_parent(kind: str) -> None:
    conn, child = CTX.Pipe()
    middle = spawn_process(_middle, kind, child, daemon=False)  # a daemon may not have children
    middle.start()
    child.close()
    pid: int | None = None
    started: str | None = None
    directory: str | None = None
    try:
        assert conn.poll(TIMEOUT), "the middle process did not start its service"
        pid, directory = conn.recv()
        seen = _identity(pid)
        assert seen is not None and seen[0] not in ("Z", "X")
        started = seen[1]

        os.kill(middle.pid, signal.SIGKILL)  # no cleanup runs in it at all
        middle.join(TIMEOUT)
        assert middle.exitcode == -signal.SIGKILL

        deadline = time.monotonic() + TIMEOUT
        while _running(pid, started):
            assert time.monotonic() < deadline, f"service pid {pid} outlived its killed parent"
            time.sleep(0.01)  # a polling interval, not a synchronisation
    finally:
        if middle.is_alive():  # pragma: no cover - the test failed early
            middle.kill()
            middle.join(TIMEOUT)
        if pid is not None and started is not None and _running(pid, started):
            os.kill(pid, signal.SIGKILL)  # pragma: no cover - the service outlived it
        conn.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)  # its socket stays behind
