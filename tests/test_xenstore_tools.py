"""Real xenstore clients no one here wrote, against the service's xenstored socket.

Debian's xenstore-utils (xenstore-ls, -read, -write, -rm, -chmod, -watch,
-list, -exists) and a C program linked with libxenstore
(transactions with the EAGAIN retry, watches, a directory too big for one
reply, permissions) talk to ``Server(xenstored_path=...)`` through
``XENSTORED_PATH``, as they would to xenstored; each output is asserted
exactly.

Missing tools: ``apt-get install xenstore-utils libxen-dev`` (scripts/test.sh
does it as root); otherwise skip, or fail when ``$CI`` is set.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xengrant.service.server import Server
from xengrant.xenstore import wire as w

TIMEOUT = 60


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} missing (apt-get install xenstore-utils)")
        pytest.skip(f"{tool} missing (apt-get install xenstore-utils)")
    return path


class Service:
    """An in-process service with its xenstored socket, and the tools' environment."""

    def __init__(self, tmp: Path) -> None:
        self.xs_path = str(tmp / "xenstored")
        self.server = Server(str(tmp / "sock"), xenstored_path=self.xs_path, token_file=False)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.env = dict(os.environ, XENSTORED_PATH=self.xs_path)

    def run(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([_need(argv[0]), *argv[1:]], env=self.env, capture_output=True,
                           text=True, timeout=TIMEOUT)
        if ok:
            assert r.returncode == 0, r
        return r

    def close(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_write_read_ls_list_exists_rm(svc: Service) -> None:
    svc.run("xenstore-write", "/vm/a/name", "one", "/vm/a/uuid", "1234", "/vm/b", "")
    assert svc.run("xenstore-read", "/vm/a/name").stdout == "one\n"
    assert svc.run("xenstore-read", "-p", "/vm/a/uuid").stdout == "/vm/a/uuid: 1234\n"
    assert svc.run("xenstore-ls", "/vm").stdout == (
        'a = ""\n name = "one"\n uuid = "1234"\nb = ""\n'
    )
    assert svc.run("xenstore-ls", "-f", "/vm").stdout == (
        '/vm/a = ""\n/vm/a/name = "one"\n/vm/a/uuid = "1234"\n/vm/b = ""\n'
    )
    assert svc.run("xenstore-list", "/vm").stdout == "a\nb\n"
    assert svc.run("xenstore-exists", "/vm/a").returncode == 0
    r = svc.run("xenstore-exists", "/vm/c", ok=False)
    assert r.returncode == 1 and r.stdout == ""
    r = svc.run("xenstore-read", "/vm/c", ok=False)
    assert r.returncode == 1 and r.stderr == "xenstore-read: couldn't read path /vm/c\n"
    svc.run("xenstore-rm", "/vm/a")
    assert svc.run("xenstore-list", "/vm").stdout == "b\n"
    svc.run("xenstore-rm", "/vm/a")  # absent, parent there: fine, as xenstored
    # a domain made by the service is there too, with libxl's layout
    assert "local" in svc.run("xenstore-list", "/").stdout.split()


def test_chmod_and_permissions_listing(svc: Service) -> None:
    svc.run("xenstore-write", "/perm/x", "v")
    svc.run("xenstore-chmod", "/perm/x", "n0", "r5", "b7")
    out = svc.run("xenstore-ls", "-p", "/perm").stdout
    assert out.startswith('x = "v"  .') and out.endswith("  (n0,r5,b7)\n")
    svc.run("xenstore-chmod", "-r", "/perm", "n0", "w3")
    assert svc.run("xenstore-ls", "-p", "/perm").stdout.endswith("  (n0,w3)\n")


def test_watch_sees_the_first_event_then_a_write(svc: Service) -> None:
    watch = subprocess.Popen([_need("xenstore-watch"), "-n", "2", "/watched"], env=svc.env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline() == "/watched\n"  # fired once when set
        svc.run("xenstore-write", "/watched/leaf", "1")
        assert watch.stdout.readline() == "/watched/leaf\n"
        assert watch.wait(TIMEOUT) == 0
    finally:
        watch.kill()
        watch.wait()


LIBXS_PROGRAM = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenstore.h>

static int incr(struct xs_handle *h, struct xs_handle *other, int meddle)
{
    /* the usual read-modify-write, retried on EAGAIN */
    for (int tries = 0; tries < 10; tries++) {
        unsigned int len;
        xs_transaction_t t = xs_transaction_start(h);
        if (t == XBT_NULL) return -1;
        char *v = xs_read(h, t, "/c/n", &len);
        int n = v ? atoi(v) : 0;
        free(v);
        if (meddle && tries == 0)
            xs_write(other, XBT_NULL, "/c/n", "100", 3);  /* someone else wins */
        char buf[16];
        snprintf(buf, sizeof buf, "%d", n + 1);
        xs_write(h, t, "/c/n", buf, strlen(buf));
        if (xs_transaction_end(h, t, false)) return tries;
        if (errno != EAGAIN) return -1;
        printf("EAGAIN\n");
    }
    return -1;
}

int main(void)
{
    struct xs_handle *h = xs_open(0), *h2 = xs_open(0);
    unsigned int num, len;
    if (!h || !h2) { perror("xs_open"); return 2; }

    xs_write(h, XBT_NULL, "/c/n", "1", 1);
    printf("retries %d\n", incr(h, h2, 1));
    char *v = xs_read(h, XBT_NULL, "/c/n", &len);
    printf("n %s\n", v);
    free(v);

    xs_transaction_t t = xs_transaction_start(h);
    xs_write(h, t, "/c/dropped", "x", 1);
    xs_transaction_end(h, t, true);  /* abort */
    v = xs_read(h, XBT_NULL, "/c/dropped", &len);
    printf("dropped %s %s\n", v ? v : "NULL", errno == ENOENT ? "ENOENT" : "?");

    if (!xs_watch(h, "/w", "tok")) return 3;
    char **ev = xs_read_watch(h, &num);
    printf("watch %s %s\n", ev[XS_WATCH_PATH], ev[XS_WATCH_TOKEN]);
    free(ev);
    xs_write(h2, XBT_NULL, "/w/x", "1", 1);
    ev = xs_read_watch(h, &num);
    printf("watch %s %s\n", ev[XS_WATCH_PATH], ev[XS_WATCH_TOKEN]);
    free(ev);
    xs_unwatch(h, "/w", "tok");

    char path[64];
    for (int i = 0; i < 300; i++) {
        snprintf(path, sizeof path, "/big/child-%03d-xxxxxxxxxxxxxxxxxxxx", i);
        xs_mkdir(h, XBT_NULL, path);
    }
    char **names = xs_directory(h, XBT_NULL, "/big", &num);  /* past 4096 bytes: DIRECTORY_PART */
    printf("directory %u %s %s\n", num, names[0], names[num - 1]);
    free(names);

    struct xs_permissions set[2] = {{5, XS_PERM_NONE}, {7, XS_PERM_READ}};
    xs_set_permissions(h, XBT_NULL, "/c/n", set, 2);
    struct xs_permissions *perms = xs_get_permissions(h, XBT_NULL, "/c/n", &num);
    printf("perms %u %u:%d %u:%d\n", num, perms[0].id, perms[0].perms, perms[1].id,
           perms[1].perms);
    free(perms);

    char *dp = xs_get_domain_path(h, 7);
    printf("domain path %s\n", dp);
    free(dp);
    printf("introduced %d\n", xs_is_domain_introduced(h, 0));
    xs_close(h2);
    xs_close(h);
    return 0;
}
"""


def test_a_libxenstore_program(svc: Service, tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/xenstore.h").exists():
        if os.environ.get("CI"):
            pytest.fail("no C compiler or xenstore.h (apt-get install libxen-dev)")
        pytest.skip("no C compiler or xenstore.h (apt-get install libxen-dev)")
    src = tmp_path / "prog.c"
    src.write_text(LIBXS_PROGRAM)
    exe = tmp_path / "prog"
    subprocess.run([cc, "-std=gnu99", "-o", str(exe), str(src), "-lxenstore"], check=True,
                   capture_output=True)
    r = subprocess.run([str(exe)], env=svc.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r
    assert r.stdout.splitlines() == [
        "EAGAIN",
        "retries 1",
        "n 101",
        "dropped NULL ENOENT",
        "watch /w tok",
        "watch /w/x tok",
        "directory 300 child-000-xxxxxxxxxxxxxxxxxxxx child-299-xxxxxxxxxxxxxxxxxxxx",
        "perms 2 5:0 7:1",
        "domain path /local/domain/7",
        "introduced 1",
    ]


def test_bad_clients_do_not_hurt_others(svc: Service) -> None:
    good = socket.socket(socket.AF_UNIX)
    good.connect(svc.xs_path)
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(svc.xs_path)

    def call(s: socket.socket, msg: bytes) -> w.Message:
        s.sendall(msg)
        d = w.Decoder()
        while True:
            got = d.feed(s.recv(65536))
            if got:
                return got[0]

    # unknown type, malformed payload: answered, the connection stays
    assert call(bad, w.pack(99, 1, 0, b"")) == w.Message(w.XS_ERROR, 1, 0, b"ENOSYS\0")
    assert call(bad, w.pack(w.XS_READ, 2, 0, b"/a")) == w.Message(w.XS_ERROR, 2, 0, b"EINVAL\0")
    assert call(bad, w.pack(w.XS_READ, 3, 9, b"/\0")) == w.Message(w.XS_ERROR, 3, 9, b"ENOENT\0")
    # a len over XENSTORE_PAYLOAD_MAX: xenstored drops the connection
    bad.sendall(w.HEADER.pack(w.XS_WRITE, 4, 0, 4097))
    assert bad.recv(100) == b""
    bad.close()
    assert call(good, w.pack(w.XS_WRITE, 5, 0, b"/ok\0yes")) == w.Message(w.XS_WRITE, 5, 0,
                                                                           b"OK\0")
    good.close()
    assert svc.run("xenstore-read", "/ok").stdout == "yes\n"


def test_a_domain_process_and_the_tools_share_one_store(svc: Service) -> None:
    """A domain's xs (xs_wire in MSG_XS_WIRE) and dom0's tools see each other's writes."""
    from xengrant.service import connect

    with connect(svc.server.path) as dom:
        home = f"/local/domain/{dom.domid}"
        assert svc.run("xenstore-read", f"{home}/domid").stdout == f"{dom.domid}\n"
        with dom.xs.watching("data", "fe") as watch:
            assert watch.read(TIMEOUT) == ("data", "fe")
            svc.run("xenstore-write", f"{home}/data/from-dom0", "hi")
            assert watch.read(TIMEOUT) == ("data/from-dom0", "fe")  # relative, as set
        # a transaction: ring-ref and event-channel published together
        tx = int(dom.xs.call(w.XS_TRANSACTION_START, b"\0")[:-1])
        dom.xs.write("data/ring-ref", "8", tx=tx)
        dom.xs.write("data/event-channel", "3", tx=tx)
        r = svc.run("xenstore-read", f"{home}/data/ring-ref", ok=False)
        assert r.returncode == 1  # not visible before the commit
        assert dom.xs.call(w.XS_TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"
        assert svc.run("xenstore-ls", f"{home}/data").stdout == (
            'from-dom0 = "hi"\nring-ref = "8"\nevent-channel = "3"\n'
        )
        # a domU may not read dom0's nodes nor use dom0's requests
        svc.run("xenstore-write", "/secret", "x")
        with pytest.raises(OSError) as e:
            dom.xs.read("/secret")
        assert e.value.errno == errno.EACCES
        with pytest.raises(OSError) as e:
            dom.xs.call(w.XS_INTRODUCE, w.strings("9", "1", "2"))
        assert e.value.errno == errno.EACCES


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to connect as another uid) and /usr/bin/python3")
def test_only_the_services_uid_is_dom0() -> None:
    """The socket is 0600; even opened to all, a peer of another uid is closed unanswered."""
    d = Path(tempfile.mkdtemp(prefix="xg-xs-uid-"))
    try:
        d.chmod(0o711)  # the other uid may reach the socket, as if the operator let it
        svc = Service(d)
        try:
            assert os.stat(svc.xs_path).st_mode & 0o777 == 0o600
            os.chmod(svc.xs_path, 0o666)
            probe = (
                "import socket, struct, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.connect(sys.argv[1])\n"
                "s.settimeout(60)\n"
                "try:\n"
                "    s.sendall(struct.pack('=IIII', 2, 1, 0, 2) + b'/\\0')\n"
                "    got = s.recv(100)\n"
                "except (BrokenPipeError, ConnectionResetError):\n"
                "    got = b''\n"
                "print('closed' if got == b'' else repr(got))\n"
            )
            r = subprocess.run(["/usr/bin/python3", "-c", probe, svc.xs_path],
                               capture_output=True, text=True, timeout=TIMEOUT, user=65534,
                               group=65534, cwd="/")
            assert (r.returncode, r.stdout) == (0, "closed\n"), r  # nothing of the store read
            assert svc.run("xenstore-exists", "/").returncode == 0  # dom0 still served
        finally:
            svc.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
