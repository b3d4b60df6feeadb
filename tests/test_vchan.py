"""xengrant.vchan: libxenvchan's protocol over the service, in one process and
in two, against the C header, and with a peer that scribbles on the header."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service_helpers import CTX, TIMEOUT, Service, spawn_process
from vchan_peer import peer_main, run_job
from xengrant import Vchan, VchanError
from xengrant.service import connect
from xengrant.service.client import RemoteDomain
from xengrant.service.server import Server
from xengrant.service.xenstore import XenStoreError
from xengrant.vchan import (
    GRANTS_OFFSET,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    VchanInterface,
    VchanTimeout,
    check_orders,
    open_vchan_connection,
    server_orders,
    start_vchan_server,
)

HEADER = Path("/usr/include/xen/io/libxenvchan.h")


# ------------------------------------------------------------------ C
C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/libxenvchan.h>
#define O(f) printf("%zu ", offsetof(struct vchan_interface, f))
int main(void)
{
    O(left.cons); O(left.prod); O(right.cons); O(right.prod); O(left_order); O(right_order);
    O(cli_live); O(srv_live); O(cli_notify); O(srv_notify); O(grants);
    printf("%zu %zu %d %d\n", sizeof(struct vchan_interface), sizeof(struct ring_shared),
           VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ);
    return 0;
}
"""


def test_interface_is_libxenvchan_h(tmp_path: Path) -> None:
    """struct vchan_interface byte for byte, as the C compiler sees libxenvchan.h."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not HEADER.exists() or cc is None:
        if os.environ.get("CI"):
            pytest.fail("xen/io/libxenvchan.h (libxen-dev) or a C compiler is missing")
        pytest.skip("xen/io/libxenvchan.h (libxen-dev) or a C compiler is missing")
    (tmp_path / "v.c").write_text(C_SOURCE)
    subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(tmp_path / "v"),
                    str(tmp_path / "v.c")], check=True)
    got = [int(x) for x in subprocess.run([str(tmp_path / "v")], check=True, capture_output=True,
                                          text=True).stdout.split()]
    vi = VchanInterface
    ours = [vi.left.offset, vi.left.offset + 4, vi.right.offset, vi.right.offset + 4,
            vi.left_order.offset, vi.right_order.offset, vi.cli_live.offset, vi.srv_live.offset,
            vi.cli_notify.offset, vi.srv_notify.offset, GRANTS_OFFSET]
    assert got == [*ours, GRANTS_OFFSET, 8, VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ]


@pytest.mark.parametrize("left_min,right_min,orders", [
    (1024, 2048, (10, 11)),      # both in the page
    (2048, 1024, (11, 10)),
    (0, 0, (10, 11)),
    (2048, 2048, (11, 12)),      # one in the page, one a page of its own
    (4096, 1000, (12, 11)),
    (1025, 1025, (11, 12)),
    (3000, 3000, (12, 12)),
    (5000, 70000, (13, 17)),
    (1 << 20, 1 << 20, (20, 20)),
])
def test_server_orders_are_libxenvchan_server_init(left_min: int, right_min: int,
                                                   orders: tuple[int, int]) -> None:
    """The orders libxenvchan_server_init picks (init.c, min_order and the
    in-page cases), worked out by hand from its source for each case."""
    assert server_orders(left_min, right_min) == orders
    check_orders(*orders)  # the client accepts what the server picks


def test_sizes_and_orders_refused() -> None:
    with pytest.raises(ValueError):
        server_orders((1 << 20) + 1, 0)
    for left, right, what in [(9, 12, "not in 10..20"), (12, 21, "not in 10..20"),
                              (10, 10, "both rings in the page"),
                              (10, 20, "grant list ends at 1048, past 1024")]:
        with pytest.raises(VchanError, match=what):
            check_orders(left, right)


# ------------------------------------------------------------ in one process
class InProcess:
    """A Server in a thread of this process, and two domains connected to it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg-vchan-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        self.server = Server(self.path, 64 << 20, log=lambda s: None)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"close": False}, daemon=True)
        self.thread.start()
        self.a = connect(self.path, timeout=TIMEOUT)
        self.b = connect(self.path, timeout=TIMEOUT)

    def close(self) -> None:
        for d in (self.a, self.b):
            d.close()
        self.server.stop()
        self.thread.join(30)
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def world() -> Iterator[InProcess]:
    w = InProcess()
    try:
        yield w
    finally:
        w.close()


def pair(w: InProcess, left_min: int = 1024, right_min: int = 2048,
         path: str = "data/vchan/test") -> tuple[Vchan, Vchan]:
    srv = Vchan.server(w.a, w.b.domid, f"/local/domain/{w.a.domid}/{path}", left_min, right_min)
    cli = Vchan.client(w.b, w.a.domid, f"/local/domain/{w.a.domid}/{path}")
    srv.wait_connected(TIMEOUT)
    return srv, cli


def test_xenstore_nodes_and_the_page(world: InProcess) -> None:
    """ring-ref and event-channel as init_xs_srv writes them (owner the server,
    read for the peer), the page as init_gnt_srv/init_gnt_cli leave it."""
    a, b = world.a, world.b
    base = f"/local/domain/{a.domid}/data/vchan/t"
    srv = Vchan.server(a, b.domid, base, 5000, 70000)
    assert srv.connected is False and srv.is_open()  # cli_live 2: not yet come
    ref = int(b.xs.read(f"{base}/ring-ref"))
    port = int(b.xs.read(f"{base}/event-channel"))
    assert ref == srv._ring.refs[0] and port == srv.port.port  # type: ignore[union-attr]
    assert b.xs.get_perms(f"{base}/ring-ref") == [f"n{a.domid}", f"r{b.domid}"]
    hdr = bytes(srv._hdr[:24])
    assert struct.unpack_from("<HHBBBB", hdr, 16) == (13, 17, 2, 1, VCHAN_NOTIFY_WRITE, 0)
    grants = struct.unpack_from("<34I", srv._hdr, GRANTS_OFFSET)
    assert list(grants) == srv._bufs[0].refs + srv._bufs[1].refs  # left (2 pages), right (32)
    cli = Vchan.client(b, a.domid, base)
    assert (cli.write_size, cli.read_size) == (8192, 131072)
    assert srv._byte(20) == 1 and srv.connected  # cli_live
    cli.close()
    assert srv._byte(20) == 0 and not srv.is_open()
    assert srv.read(10) == b""  # EOF
    srv.close()
    with pytest.raises(XenStoreError, match="ENOENT"):
        a.xs.read(base)  # the server removed its path


@pytest.mark.parametrize("left_min,right_min", [(1024, 2048), (2048, 2048), (65536, 16384)])
def test_streams_both_ways(world: InProcess, left_min: int, right_min: int) -> None:
    """1 MiB each way at once in random-sized chunks, a thread for each way on
    each side (the two threads of a side share its event port); the checksums
    match."""
    srv, cli = pair(world, left_min, right_min)
    out: dict[str, Any] = {}

    def run(name: str, v: Vchan, job: tuple[Any, ...]) -> None:
        out[name] = run_job(v, job)

    jobs = [threading.Thread(target=run, args=("srv_send", srv, ("send", 1 << 20, 1))),
            threading.Thread(target=run, args=("cli_recv", cli, ("recv", 1 << 20))),
            threading.Thread(target=run, args=("cli_send", cli, ("send", 1 << 20, 2))),
            threading.Thread(target=run, args=("srv_recv", srv, ("recv", 1 << 20)))]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(TIMEOUT)
    cli.close()
    srv.close()
    assert out["srv_recv"] == (1 << 20, out["cli_send"])
    assert out["cli_recv"] == (1 << 20, out["srv_send"])


def test_packets_and_non_blocking(world: InProcess) -> None:
    srv, cli = pair(world)  # server reads 1024, writes 2048
    with srv, cli:
        cli.blocking = srv.blocking = False
        assert srv.read(10) is None and srv.recv(4) is None  # nothing there
        assert cli.send(b"x" * 1000) == 1000
        assert cli.send(b"y" * 100) == 0  # a packet does not fit: nothing written
        assert cli.write(b"z" * 100) == 24  # a stream takes what fits
        assert cli.buffer_space() == 0
        assert srv.data_ready() == 1024
        assert srv.recv(1000) == b"x" * 1000
        assert srv.read(100) == b"z" * 24
        assert cli.buffer_space() == 1024
        srv.blocking = True
        with pytest.raises(ValueError, match="do not fit"):
            srv.recv(2000)  # larger than the ring: could never come
        with pytest.raises(VchanTimeout, match="vchan read: timed out") as e:
            srv.read(1, timeout=0.05)
        assert isinstance(e.value, TimeoutError) and e.value.written == 0
        with pytest.raises(ValueError, match="do not fit"):
            Vchan.send(srv, b"q" * 3000)  # blocking packet larger than the ring
        assert srv.write(b"hello") == 5
        assert cli.recv(5) == b"hello"


def test_close_either_side(world: InProcess) -> None:
    srv, cli = pair(world)
    cli.write(b"last words")
    cli.close()
    assert srv.read(100) == b"last words"  # what was there is still read
    assert srv.read(100) == b""
    with pytest.raises(BrokenPipeError):
        srv.write(b"anyone?")
    srv.close()
    srv, cli = pair(world, path="data/vchan/two")
    srv.close()
    assert not cli.is_open() and cli.read(5) == b""
    with pytest.raises(BrokenPipeError):
        cli.send(b"x")
    cli.close()
    with pytest.raises(ValueError, match="closed"):
        cli.read(1)


def test_client_refuses_missing_or_bad_nodes(world: InProcess) -> None:
    a, b = world.a, world.b
    base = f"/local/domain/{a.domid}/data/vchan/bad"
    with pytest.raises(VchanError) as ei:
        Vchan.client(b, a.domid, base)
    assert ei.value.errno == errno.EACCES  # not there, under a path it may not read
    for name, value in (("ring-ref", "zero"), ("event-channel", "5")):
        a.xs.write(f"{base}/{name}", value)
        a.xs.set_perms(f"{base}/{name}", [f"n{a.domid}", f"r{b.domid}"])
    with pytest.raises(VchanError, match="ring-ref is b'zero'"):
        Vchan.client(b, a.domid, base)


def test_a_server_with_bogus_orders_is_refused_before_mapping_rings(world: InProcess) -> None:
    """A server page saying left_order 10 (a ring at 1024) and right_order 20
    (256 grants from offset 24, past 1024): the client refuses before it maps
    any ring page, and keeps nothing bound or mapped."""
    srv, cli = pair(world)
    cli.close()
    struct.pack_into("<HH", srv._hdr, 16, 10, 20)
    with pytest.raises(VchanError, match="grant list ends at 1048, past 1024"):
        Vchan.client(world.b, world.a.domid, srv.xs_path)
    struct.pack_into("<HH", srv._hdr, 16, 9, 12)
    with pytest.raises(VchanError, match="left_order 9"):
        Vchan.client(world.b, world.a.domid, srv.xs_path)
    srv.close()


def test_a_peer_scribbling_on_the_indices_gets_an_error(world: InProcess) -> None:
    """The client moves the server's read ring 5000 bytes ahead (in a 1024-byte
    ring), then its write ring's cons past our prod: each side raises VchanError
    naming the values, it does not read or wait."""
    srv, cli = pair(world)
    with srv, cli:
        struct.pack_into("<I", cli._hdr, 4, 5000)  # left.prod, the server's read ring
        with pytest.raises(VchanError, match="prod 5000 is 5000 bytes past our cons 0"):
            srv.read(10)
        struct.pack_into("<I", srv._hdr, 8, 4000)  # right.cons: the client read 4000?
        with pytest.raises(VchanError, match="cons 4000"):
            srv.write(b"x")


# A peer's writes into the 24-byte header, then every call on our side.
@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 255)), min_size=1,
                       max_size=12), side=st.sampled_from(["srv", "cli"]))
def test_scribbled_header_is_an_error_or_bounded(writes: list[tuple[int, int]],
                                                 side: str) -> None:
    w = InProcess()
    try:
        srv, cli = pair(w)
        cli.write(b"abc")
        srv.write(b"defg")
        ours, theirs = (srv, cli) if side == "srv" else (cli, srv)
        ours.blocking = False
        for off, byte in writes:
            theirs._hdr[off] = byte
        for call, arg in (("read", 4096), ("recv", 3), ("write", b"x" * 5000),
                          ("send", b"y" * 10), ("data_ready", None), ("buffer_space", None)):
            try:
                got = getattr(ours, call)() if arg is None else getattr(ours, call)(arg)
            except (VchanError, BrokenPipeError):
                continue
            if isinstance(got, bytes):
                assert len(got) <= ours.read_size
            elif isinstance(got, int):
                assert 0 <= got <= max(ours.read_size, ours.write_size)
        srv.close()
        cli.close()
    finally:
        w.close()


def test_asyncio_streams(world: InProcess) -> None:
    """start_vchan_server / open_vchan_connection: an echo of 256 KiB in chunks."""
    a, b = world.a, world.b
    base = f"/local/domain/{a.domid}/data/vchan/aio"

    async def main() -> tuple[bytes, bytes]:
        done = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            done.set()

        server = await start_vchan_server(echo, a, b.domid, base, 4096, 4096)
        reader, writer = await open_vchan_connection(b, a.domid, base)
        payload = random.Random(3).randbytes(256 << 10)
        got = bytearray()

        async def consume() -> None:
            while len(got) < len(payload):
                chunk = await reader.read(65536)
                assert chunk
                got.extend(chunk)

        task = asyncio.create_task(consume())
        for i in range(0, len(payload), 10_000):
            writer.write(payload[i : i + 10_000])
            await writer.drain()
        await asyncio.wait_for(task, TIMEOUT)
        writer.close()
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert await reader.read() == b""  # the server closed: EOF
        server.close()
        return payload, bytes(got)

    sent, got = asyncio.run(main())
    assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()


# ------------------------------------------------------------ two processes
@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    s = Service()
    try:
        yield s
    finally:
        s.stop()


def start_peer(service: Service) -> tuple[Any, Any, int]:
    parent, child = CTX.Pipe()
    proc = spawn_process(peer_main, service.path, child)
    proc.start()
    child.close()
    assert parent.poll(TIMEOUT)
    return proc, parent, parent.recv()


@pytest.mark.parametrize("left_min,right_min", [(1024, 2048), (1 << 20, 1 << 20)])
def test_two_processes_both_ways(service: Service, left_min: int, right_min: int) -> None:
    """A server here, a client in another process: 4 MiB each way with a
    checksum; then the reverse roles."""
    me = connect(service.path, timeout=TIMEOUT)
    try:
        # We serve, the peer is the client and sends.
        proc, pipe, peer = start_peer(service)
        base = f"/local/domain/{me.domid}/data/vchan/two"
        srv = Vchan.server(me, peer, base, left_min, right_min)
        pipe.send(("client", me.domid, base, ("send", 4 << 20, 7)))
        n, digest = 0, hashlib.sha256()
        while n < 4 << 20:
            data = srv.read(1 << 20, timeout=TIMEOUT)
            assert data
            digest.update(data)
            n += len(data)
        assert pipe.poll(TIMEOUT)
        assert pipe.recv() == digest.hexdigest()
        pipe.send("bye")
        proc.join(TIMEOUT)
        assert srv.read(1, timeout=TIMEOUT) == b""  # the client process went: EOF
        srv.close()
        # The peer serves, we are the client and send.
        proc, pipe, peer = start_peer(service)
        base = f"/local/domain/{peer}/data/vchan/back"
        pipe.send(("server", me.domid, base, left_min, right_min, ("recv",)))
        assert pipe.poll(TIMEOUT) and pipe.recv() == "offered"
        cli = Vchan.client(me, peer, base)
        sha = run_job(cli, ("send", 4 << 20, 9))
        cli.close()
        assert pipe.poll(TIMEOUT)
        assert pipe.recv() == (4 << 20, sha)
        pipe.send("bye")
        proc.join(TIMEOUT)
    finally:
        me.close()


def test_a_killed_client_reads_as_closed(service: Service) -> None:
    """The client's process is killed: its mapping's unmap notify clears cli_live
    and signals, so the server's blocking read returns EOF, not a hang."""
    me = connect(service.path, timeout=TIMEOUT)
    try:
        proc, pipe, peer = start_peer(service)
        base = f"/local/domain/{me.domid}/data/vchan/kill"
        srv = Vchan.server(me, peer, base)
        pipe.send(("client", me.domid, base, ("echo",)))
        srv.wait_connected(TIMEOUT)
        srv.write(b"ping")
        assert srv.read(4, timeout=TIMEOUT) == b"ping"
        proc.kill()
        proc.join(TIMEOUT)
        assert srv.read(4, timeout=TIMEOUT) == b""
        assert not srv.is_open()
        srv.close()
    finally:
        me.close()


def test_vchan_is_exported() -> None:
    import xengrant

    assert xengrant.Vchan is Vchan and xengrant.VchanError is VchanError
    assert isinstance(RemoteDomain, type)


def test_fileno_for_select(world: InProcess) -> None:
    """libxenvchan_fd_for_select: the descriptor becomes readable when the peer
    notifies; wait(0) then takes the event."""
    import select

    srv, cli = pair(world)
    with srv, cli:
        srv.blocking = False
        assert srv.read(1) is None  # asks the client for an event on its next write
        cli.write(b"!")
        r, _, _ = select.select([srv.fileno()], [], [], TIMEOUT)
        assert r == [srv.fileno()]
        srv.wait(0)  # takes the event
        assert srv.read(1) == b"!"


def test_asyncio_peer_closes_with_writes_pending(world: InProcess) -> None:
    """The server goes while our writer still holds data it could never send: the
    reader gets EOF and the transport closes (the pump does not wait for ever)."""
    a, b = world.a, world.b
    base = f"/local/domain/{a.domid}/data/vchan/aio-close"

    async def main() -> bool:
        srv = Vchan.server(a, b.domid, base, 1024, 2048)
        reader, writer = await open_vchan_connection(b, a.domid, base)
        writer.write(b"x" * (1 << 20))  # far more than the 1024-byte ring holds
        srv.close()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
        return writer.is_closing()

    assert asyncio.run(main())


def test_timeouts_raise_and_keep_what_moved(world: InProcess) -> None:
    """Every blocking call takes timeout= and raises VchanTimeout (a TimeoutError)
    when it passes; a stream write says how much went before."""
    srv, cli = pair(world)  # the client writes into a 1024-byte ring
    with srv, cli:
        with pytest.raises(VchanTimeout) as e:
            cli.write(b"w" * 3000, timeout=0.05)
        assert e.value.op == "write" and e.value.written == 1024
        assert srv.recv(1024, timeout=TIMEOUT) == b"w" * 1024
        cli.write(b"k" * 1000)
        with pytest.raises(VchanTimeout, match="vchan send"):
            cli.send(b"p" * 100, timeout=0)  # 24 bytes free: a packet waits for all
        with pytest.raises(VchanTimeout, match="vchan recv"):
            srv.recv(1010, timeout=0)
        assert srv.recv(1000, timeout=TIMEOUT) == b"k" * 1000
        with pytest.raises(VchanTimeout, match="vchan read"):
            srv.read(1, timeout=0)
        for _ in range(100):  # take the events there are, then none comes
            try:
                srv.wait(0)
            except VchanTimeout as e:
                assert e.op == "wait"
                break
        else:
            pytest.fail("wait never timed out")


def test_asyncio_twins(world: InProcess) -> None:
    """read_async / recv_async / write_async / send_async / wait_connected_async:
    the same steps as the blocking calls, waiting without blocking the loop; a
    reader and a writer task share the vchan's one event port."""
    a, b = world.a, world.b
    base = f"/local/domain/{a.domid}/data/vchan/twins"

    async def main() -> tuple[bytes, bytes]:
        srv = Vchan.server(a, b.domid, base, 1024, 2048)
        cli = Vchan.client(b, a.domid, base)
        with srv, cli:
            await srv.wait_connected_async(TIMEOUT)
            payload = bytes(range(256)) * 40  # 10 KiB through a 1 KiB ring

            async def reader() -> bytes:
                got = bytearray()
                while len(got) < len(payload):
                    chunk = await srv.read_async(4096, TIMEOUT)
                    assert chunk
                    got += chunk
                return bytes(got)

            async def echo_back() -> bytes:
                assert await srv.send_async(b"pkt!", TIMEOUT) == 4
                return await cli.recv_async(4, TIMEOUT) or b""

            got, n, pkt = await asyncio.gather(reader(), cli.write_async(payload, TIMEOUT),
                                               echo_back())
            assert n == len(payload)
            with pytest.raises(VchanTimeout, match="vchan read"):
                await srv.read_async(1, timeout=0.05)
            for _ in range(100):  # take the events there are, then none comes
                try:
                    await cli.wait_async(0.01)
                except VchanTimeout as e:
                    assert e.op == "wait" and isinstance(e, TimeoutError)
                    break
            else:
                pytest.fail("wait_async never timed out")
            return got, pkt

    got, pkt = asyncio.run(main())
    assert got == bytes(range(256)) * 40 and pkt == b"pkt!"


def test_read_into_and_recv_into(world: InProcess) -> None:
    """libxenvchan_read / _recv into the caller's buffer: the bytes land in it,
    across the ring's wrap, with the same answers for EOF and non-blocking."""
    srv, cli = pair(world)  # the client writes into a 1024-byte ring
    with srv, cli:
        buf = bytearray(700)
        cli.write(b"a" * 600)
        assert srv.read_into(buf, timeout=TIMEOUT) == 600 and buf[:600] == b"a" * 600
        cli.write(bytes(range(200)) * 3)  # 600 more: wraps at 1024
        assert srv.recv_into(memoryview(buf)[:600], timeout=TIMEOUT) == 600
        assert buf[:600] == bytes(range(200)) * 3
        srv.blocking = False
        assert srv.read_into(buf) is None and srv.recv_into(buf) is None
        with pytest.raises(TypeError, match="read-only"):
            srv.read_into(memoryview(b"ro"))
        srv.blocking = True
        with pytest.raises(VchanTimeout, match="vchan read_into"):
            srv.read_into(buf, timeout=0)
        cli.write(b"end")
        cli.close()
        assert srv.recv_into(bytearray(5), timeout=TIMEOUT) == 0  # closed with 3 of 5 there
        assert srv.read_into(buf, timeout=TIMEOUT) == 3 and buf[:3] == b"end"
        assert srv.read_into(buf, timeout=TIMEOUT) == 0  # end of stream

    async def main() -> bytes:
        s2, c2 = pair(world, path="data/vchan/into-async")
        with s2, c2:
            out = bytearray(4)
            got, _ = await asyncio.gather(s2.read_into_async(out, TIMEOUT),
                                          c2.send_async(b"ping", TIMEOUT))
            assert got == 4
            assert await c2.send_async(b"pong", TIMEOUT) == 4
            assert await s2.recv_into_async(out, TIMEOUT) == 4
            return bytes(out)

    assert asyncio.run(main()) == b"pong"


def test_spin_polls_the_ring_and_saves_the_peers_event(world: InProcess) -> None:
    """With spin set, a blocked reader polls the ring before asking for an event:
    the writer finds no VCHAN_NOTIFY_WRITE bit and sends none. Without it (the
    default, libxenvchan's way) a reader short of data sets the bit and the
    writer notifies."""
    srv, cli = pair(world)
    with srv, cli:
        sent: list[int] = []
        assert srv.port is not None
        notify = srv.port.notify

        def counted() -> None:
            sent.append(1)
            notify()

        srv.port.notify = counted  # type: ignore[method-assign]
        srv.write(b"x")  # clears the bit client_init set (srv_notify = VCHAN_NOTIFY_WRITE)
        assert cli.read(1, timeout=TIMEOUT) == b"x"
        sent.clear()
        # the default: a reader short of data asks for an event (non-blocking, to see it)
        cli.blocking = False
        assert cli.read(1) is None
        srv.write(b"a")
        assert sent == [1] and cli.read(1) == b"a"
        sent.clear()
        # spinning: the reader polls; whenever the write lands, nobody asked
        cli.blocking = True
        cli.spin = TIMEOUT
        out: list[bytes | None] = []
        t = threading.Thread(target=lambda: out.append(cli.read(5, timeout=TIMEOUT)))
        t.start()
        srv.write(b"hello")
        t.join(TIMEOUT)
        assert out == [b"hello"] and sent == []
        # a spin that ends with nothing there falls back to the event
        cli.spin = 0.001
        with pytest.raises(VchanTimeout):
            cli.read(1, timeout=0.05)


# ------------------------------------------------------------ on EmbeddedXen
def test_vchan_on_embedded_xen_domains() -> None:
    """A vchan between two EmbeddedXen domains, in one process without a service:
    bytes both ways, and each side's close seen by the other through the unmap
    notification (the page's live byte cleared, the port notified)."""
    import xengrant

    with xengrant.EmbeddedXen() as xen:
        a, b = xen.create_domain(), xen.create_domain()
        base = f"/local/domain/{a.domid}/data/vchan/emb"
        srv = Vchan.server(a, b.domid, base, 4096, 4096)
        cli = Vchan.client(b, a.domid, base)
        srv.wait_connected(TIMEOUT)
        payload = bytes(range(256)) * 64  # 16 KiB through 4 KiB rings
        t = threading.Thread(target=lambda: cli.write(payload, timeout=TIMEOUT))
        t.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = srv.read(8192, timeout=TIMEOUT)
            assert chunk
            got += chunk
        t.join(TIMEOUT)
        assert bytes(got) == payload
        assert srv.send(b"back", timeout=TIMEOUT) == 4
        assert cli.recv(4, timeout=TIMEOUT) == b"back"
        cli.close()  # its mapping's notify clears cli_live and signals the server
        assert srv.read(1, timeout=TIMEOUT) == b"" and not srv.is_open()
        srv.close()
        # the other way round: the server goes, the client reads EOF
        srv = Vchan.server(a, b.domid, base)
        cli = Vchan.client(b, a.domid, base)
        srv.close()
        assert cli.read(1, timeout=TIMEOUT) == b"" and not cli.is_open()
        cli.close()
        assert a.grant_table.reap_deferred() == 0  # the page the client mapped is free now
        xen.check_leaks()


def test_embedded_unmap_notify_clears_the_byte_and_signals() -> None:
    """EmulatedGntshr.share_page_notify / EmulatedGnttab.map_grant_ref_notify:
    gntalloc's and gntdev's UNMAP_NOTIFY_CLEAR_BYTE and _SEND_EVENT, once."""
    import xengrant

    with xengrant.EmbeddedXen() as xen:
        a, b = xen.create_domain(), xen.create_domain()
        pa = a.evtchn.bind_unbound_port(b.domid)
        pb = b.evtchn.bind_interdomain(a.domid, pa)
        b.evtchn.wait(pb, TIMEOUT)  # the bind's own event
        share = a.gntshr.share_page_notify(b.domid, True, 100, pa)
        share.mem[100] = 7
        m = b.gnttab.map_grant_ref_notify(a.domid, share.refs[0], 101, pb)
        m.mem[101] = 9
        assert bytes(share.mem[100:102]) == b"\x07\x09"
        b.gnttab.unmap(m)  # the mapper goes: byte 101 cleared, a told
        assert share.mem[101] == 0 and a.evtchn.wait(pa, TIMEOUT) == pa
        a.gntshr.unshare(share)  # the sharer goes: b told
        assert b.evtchn.wait(pb, TIMEOUT) == pb
        with pytest.raises(ValueError, match="read-only"):
            b.gnttab.map_grant_ref_notify(a.domid, 1, 0, -1, writable=False)
        with pytest.raises(ValueError, match="outside the page"):
            a.gntshr.share_page_notify(b.domid, True, 4096, -1)
        a.evtchn.close()
        b.evtchn.close()
        xen.check_leaks()
