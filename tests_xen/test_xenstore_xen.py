"""Debian's xenstore tools against the real xenstored and against the service, in dom0.

The same commands run twice: with ``XENSTORED_PATH`` at the C xenstored the
harness started (``/var/run/xenstored/socket``) and at the xenstored socket
of a :class:`~xengrant.service.server.Server` started here
(``xenstored_path=``).  Every command's exit status, stdout and stderr must
be the same.  Everything happens under a scratch node that is removed after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REAL = "/var/run/xenstored/socket"
TIMEOUT = 120
BASE = "/xengrant-xstest"

#: (argv...) run in order against each xenstored
SCRIPT: list[tuple[str, ...]] = [
    ("xenstore-rm", BASE),
    ("xenstore-write", f"{BASE}/a/name", "one", f"{BASE}/a/uuid", "1234", f"{BASE}/b", ""),
    ("xenstore-read", f"{BASE}/a/name"),
    ("xenstore-read", "-p", f"{BASE}/a/uuid"),
    ("xenstore-read", f"{BASE}/missing"),
    ("xenstore-ls", BASE),
    ("xenstore-ls", "-f", BASE),
    ("xenstore-list", BASE),
    ("xenstore-exists", f"{BASE}/a"),
    ("xenstore-exists", f"{BASE}/c"),
    ("xenstore-chmod", f"{BASE}/a/name", "n0", "r5", "b7"),
    ("xenstore-ls", "-p", f"{BASE}/a"),
    ("xenstore-chmod", "-r", f"{BASE}/a", "n0", "w3"),
    ("xenstore-ls", "-p", BASE),
    ("xenstore-write", f"{BASE}/bad path!", "x"),
    ("xenstore-read", "/local/domain/0/this-is-not-there"),
    ("xenstore-rm", f"{BASE}/a"),
    ("xenstore-rm", f"{BASE}/a"),
    ("xenstore-rm", f"{BASE}/x/y"),
    ("xenstore-list", BASE),
    ("xenstore-rm", BASE),
]


def _tools() -> bool:
    return all(shutil.which(t) for t in ("xenstore-ls", "xenstore-watch")) and os.path.exists(REAL)


pytestmark = pytest.mark.skipif(not _tools(), reason="no xenstored socket or xenstore-utils here")


@pytest.fixture(scope="module")
def service_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from xengrant.service.server import Server

    d = tmp_path_factory.mktemp("xs")
    path = str(d / "xenstored")
    server = Server(str(d / "sock"), 32 << 20, xenstored_path=path, token_file=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.stop()
        thread.join(TIMEOUT)


def _run(socket_path: str, argv: tuple[str, ...]) -> tuple[int, str, str]:
    env = dict(os.environ, XENSTORED_PATH=socket_path)
    r = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, r.stdout, r.stderr


def test_tools_answer_alike(service_socket: str) -> None:
    real = [_run(REAL, argv) for argv in SCRIPT]
    ours = [_run(service_socket, argv) for argv in SCRIPT]
    for argv, a, b in zip(SCRIPT, real, ours, strict=True):
        print(" ".join(argv), "->", a, "" if a == b else f"but ours: {b}")
    assert ours == real


def test_watch_answers_alike(service_socket: str) -> None:
    def watch(path: str) -> list[str]:
        env = dict(os.environ, XENSTORED_PATH=path)
        proc = subprocess.Popen(["xenstore-watch", "-n", "3", BASE], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline()]  # fired once when set
            subprocess.run(["xenstore-write", f"{BASE}/w", "1"], env=env, check=True,
                           timeout=TIMEOUT)
            lines.append(proc.stdout.readline())
            subprocess.run(["xenstore-rm", BASE], env=env, check=True, timeout=TIMEOUT)
            lines.append(proc.stdout.readline())
            assert proc.wait(TIMEOUT) == 0
            return lines
        finally:
            proc.kill()
            proc.wait()

    real = watch(REAL)
    assert real == [f"{BASE}\n", f"{BASE}/w\n", f"{BASE}\n"]
    assert watch(service_socket) == real


def test_scratch_is_gone() -> None:
    assert _run(REAL, ("xenstore-exists", BASE))[0] == 1
    assert Path(REAL).exists()
