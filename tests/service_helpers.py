"""Helpers for the service tests: a service process and domain "actor" processes.

Everything runs in processes started with the ``spawn`` method.  The test
drives each actor over a pipe: it sends a command, the actor runs it in its
own :class:`~xengrant.service.RemoteDomain` and answers; every wait has a
timeout and every handshake is a message, never a sleep.

Every child the tests start dies with the process that started it
(:func:`die_with_parent`): a test killed outright (SIGKILL, a CI timeout)
leaves no service or domain process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xengrant.portable import CopySegment, GrantRef
from xengrant.service import connect, serve

CTX = mp.get_context("spawn")
TIMEOUT = 60.0

PR_SET_PDEATHSIG = 1
#: libc's prctl, looked up here: a Popen child only calls it (no dlopen after fork)
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``); exit at once if it is already gone.

    ``parent`` is the pid of the process that started this one, read there.
    A parent that died before the prctl never sends the signal: this process
    was reparented already, so ``getppid()`` is no longer ``parent`` (the race
    prctl(2) describes).  The signal comes when the *thread* that started the
    child ends: start children from a thread that outlives them (the tests
    use the main thread).  Elsewhere than Linux this does nothing.
    """
    if _prctl is None:  # pragma: no cover - not Linux
        return
    if _prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(1)


def _child_main(parent: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    die_with_parent(parent)
    target(*args)


def spawn_process(target: Callable[..., Any], *args: Any, daemon: bool = True) -> Any:
    """A ``spawn`` Process (not started yet) running ``target(*args)``, killed by
    the kernel when this process dies (``daemon=False``: one that may have children)."""
    return CTX.Process(target=_child_main, args=(os.getpid(), target, args), daemon=daemon)


def dies_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess``: the child dies with this process."""
    return functools.partial(die_with_parent, os.getpid())


def _hypervisor_preexec(parent: int, nofile: int | None) -> None:
    die_with_parent(parent)
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def start_hypervisor(
    path: str, *args: str, nofile: int | None = None, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``python -m xengrant hypervisor --socket path *args`` in a child that dies
    with this process; returns once it listens (its stderr is a pipe).

    Args:
        nofile: the child's RLIMIT_NOFILE (None: inherited).
        stderr: where its stderr goes.
    """
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xengrant", "hypervisor", "--socket", path, *args,
         "--ready-fd", str(w)],
        pass_fds=(w,), stderr=stderr, text=True,
        preexec_fn=functools.partial(_hypervisor_preexec, os.getpid(), nofile),
    )
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.readline()  # blocks until listening (or EOF if it died)
    assert line.strip() == path, proc.stderr.read() if proc.stderr else ""
    return proc


def _service_main(path: str, memory: int, conn: Any) -> None:
    serve(path, memory, ready=lambda p: conn.send(p), log=lambda s: None)


class Service:
    """A ``xengrant hypervisor`` in a child process."""

    def __init__(self, memory: int = 64 << 20) -> None:
        self.dir = tempfile.mkdtemp(prefix="xg-svc-")
        self.path = os.path.join(self.dir, "xengrant.sock")
        r, w = CTX.Pipe(duplex=False)
        self.proc = spawn_process(_service_main, self.path, memory, w)
        self.proc.start()
        w.close()
        if not r.poll(TIMEOUT):
            self.proc.kill()
            raise RuntimeError("the service did not start")
        assert r.recv() == self.path
        r.close()

    def stop(self) -> int | None:
        """SIGTERM, wait, return the exit code."""
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.join(TIMEOUT)
        if self.proc.is_alive():  # pragma: no cover - a hung service
            self.proc.kill()
            self.proc.join(TIMEOUT)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        return self.proc.exitcode


class ActorError(Exception):
    """A command failed in the actor: ``kind`` is the exception class name."""

    def __init__(self, kind: str, errno: int | None, status: int | None, text: str) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind = kind
        self.errno = errno
        self.status = status


def _actor_main(path: str, conn: Any, kw: dict[str, Any]) -> None:
    d = connect(path, **kw)
    objs: dict[int, Any] = {}
    conn.send(("ready", d.domid))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            return
        if cmd == "exit":
            d.close()
            conn.send(("ok", None))
            return
        try:
            result = COMMANDS[cmd](d, objs, *args)
        except Exception as e:
            conn.send(
                ("err", (type(e).__name__, getattr(e, "errno", None), getattr(e, "status", None),
                         str(e)))
            )
        else:
            conn.send(("ok", result))


class Actor:
    """A domain process; call it with a command name and arguments."""

    def __init__(self, service: Service, **kw: Any) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = spawn_process(_actor_main, service.path, child, kw)
        self.proc.start()
        child.close()
        if not self.conn.poll(TIMEOUT):
            self.proc.kill()
            raise RuntimeError("the domain process did not start")
        tag, self.domid = self.conn.recv()
        assert tag == "ready"

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, cmd: str, *args: Any, timeout: float = TIMEOUT) -> Any:
        self.send_only(cmd, *args)
        return self.result(timeout, late=f"{cmd} took over {timeout}s")

    def send_only(self, cmd: str, *args: Any) -> None:
        """Start a command without waiting (collect with :meth:`result`)."""
        self.conn.send((cmd, args))

    def result(self, timeout: float = TIMEOUT, late: str | None = None) -> Any:
        """The answer to the command sent last; ``late``: the TimeoutError's text."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"d{self.domid}: {late or f'no answer in {timeout}s'}")
        tag, result = self.conn.recv()
        if tag == "err":
            raise ActorError(*result)
        return result

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self("exit")
            except (OSError, EOFError, TimeoutError):
                pass
        self.proc.join(TIMEOUT)
        if self.proc.is_alive():  # pragma: no cover
            self.proc.kill()
            self.proc.join(TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup in the process at all."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(TIMEOUT)
        assert self.proc.exitcode == -signal.SIGKILL

    def wait_exit(self, timeout: float = TIMEOUT) -> int | None:
        self.proc.join(timeout)
        return self.proc.exitcode


@contextmanager
def actors(service: Service, n: int, **kw: Any) -> Iterator[list[Actor]]:
    """``n`` domain processes alike, closed in order when the block ends."""
    made: list[Actor] = []
    try:
        for _ in range(n):
            made.append(Actor(service, **kw))
        yield made
    finally:
        for a in made:
            a.close()


@contextmanager
def event_channel(offers: Actor, binds: Actor) -> Iterator[tuple[int, int]]:
    """An interdomain channel: ``offers``' unbound port, bound by ``binds``.

    Yields ``(offering port, binding port)``, the bind's event already taken
    (Xen sets the new local port pending); both ends are unbound after the
    block, the binder's first.
    """
    po = offers("ev", "bind_unbound_port", binds.domid)
    pb = binds("ev", "bind_interdomain", offers.domid, po)
    assert binds("ev", "wait", pb, 30) == pb
    yield po, pb
    binds("ev", "unbind", pb)
    offers("ev", "unbind", po)


# ------------------------------------------------------------- commands
def _new(objs: dict[int, Any], obj: Any) -> int:
    key = len(objs) + 1
    while key in objs:
        key += 1
    objs[key] = obj
    return key


def cmd_share(d: Any, objs: dict[int, Any], peer: int, n: int, writable: bool = True) -> Any:
    share = d.gntshr.share_pages(peer, n, writable)
    return _new(objs, share), list(share.refs)


def cmd_share_notify(d: Any, objs: dict[int, Any], peer: int, offset: int, port: int) -> Any:
    share = d.gntshr.share_page_notify(peer, True, offset, port)
    return _new(objs, share), share.refs[0]


def cmd_write(d: Any, objs: dict[int, Any], key: int, off: int, data: bytes) -> None:
    objs[key].mem[off : off + len(data)] = data


def cmd_read(d: Any, objs: dict[int, Any], key: int, off: int, n: int) -> tuple[bytes, int]:
    """The bytes, and how many messages this process sent to read them (0: plain memory)."""
    before = d.channel.sent
    data = bytes(objs[key].mem[off : off + n])
    return data, d.channel.sent - before


def cmd_map(
    d: Any, objs: dict[int, Any], domid: int, refs: list[int], writable: bool = True
) -> Any:
    m = d.gnttab.map_domain_grant_refs(domid, refs, writable)
    return _new(objs, m), list(m.handles)


def cmd_map_notify(
    d: Any, objs: dict[int, Any], domid: int, ref: int, offset: int, port: int
) -> int:
    m = d.gnttab.map_grant_ref_notify(domid, ref, offset, port)
    return _new(objs, m)


def cmd_unmap(d: Any, objs: dict[int, Any], key: int) -> None:
    """Unmap, and wait until the service has done it (``gnttab`` unmaps are posted):
    the test looks next from another process, a signal the service cannot order."""
    objs.pop(key).unmap()
    d.sync()


def cmd_unmap_posted(d: Any, objs: dict[int, Any], key: int) -> int:
    """Unmap without waiting; returns how many requests are still unanswered."""
    objs.pop(key).unmap()
    return len(d.channel.calls.posted)


def cmd_unshare(d: Any, objs: dict[int, Any], key: int) -> None:
    d.gntshr.unshare(objs.pop(key))


def cmd_try_unshare(d: Any, objs: dict[int, Any], key: int) -> None:
    objs[key].try_unshare()
    objs.pop(key)


def cmd_copy_from(d: Any, objs: dict[int, Any], domid: int, ref: int, off: int, n: int) -> Any:
    buf = bytearray(n)
    seg = CopySegment(GrantRef(domid, ref, off), buf, n)
    return d.gnttab.grant_copy([seg]), bytes(buf)


def cmd_copy_to(d: Any, objs: dict[int, Any], domid: int, ref: int, off: int, data: bytes) -> Any:
    return d.gnttab.grant_copy([CopySegment(data, GrantRef(domid, ref, off), len(data))])


def cmd_xs(d: Any, objs: dict[int, Any], method: str, *args: Any) -> Any:
    return getattr(d.xs, method)(*args)


def cmd_ev(d: Any, objs: dict[int, Any], method: str, *args: Any) -> Any:
    return getattr(d.evtchn, method)(*args)


def cmd_dom(d: Any, objs: dict[int, Any], method: str, *args: Any) -> Any:
    return getattr(d, method)(*args)


def cmd_poke(d: Any, objs: dict[int, Any], key: int, off: int) -> None:
    """Store a byte at the mapping's address with ctypes, past Python's checks."""
    addr = objs[key]._view.address
    ctypes.memmove(addr + off, b"\xff", 1)


def cmd_nothing(d: Any, objs: dict[int, Any]) -> None:
    return None


def cmd_call(d: Any, objs: dict[int, Any], module: str, name: str, *args: Any) -> Any:
    """Run ``module.name(d, objs, *args)`` in the domain process: a test's own command."""
    return getattr(importlib.import_module(module), name)(d, objs, *args)


COMMANDS: dict[str, Callable[..., Any]] = {
    name[4:]: fn for name, fn in dict(globals()).items() if name.startswith("cmd_")
}


def cmd_ev_async(d: Any, objs: dict[int, Any], method: str, *args: Any) -> Any:
    """Run an ``*_async`` evtchn/xenstore coroutine in a fresh event loop."""
    import asyncio

    target = d.evtchn if hasattr(d.evtchn, method) else d.xs
    return asyncio.run(getattr(target, method)(*args))


COMMANDS["ev_async"] = cmd_ev_async


def cmd_reap(d: Any, objs: dict[int, Any]) -> tuple[int, int]:
    """Retry deferred ends of access; returns (still deferred, free grants)."""
    table = d.grant_table
    return table.reap_deferred(), table.num_free_grants()


COMMANDS["reap"] = cmd_reap


def cmd_wait_gone(d: Any, objs: dict[int, Any], domid: int, timeout: float = TIMEOUT) -> None:
    """(dom0) Wait until the service destroyed ``domid``: its xenstore home goes last."""
    import errno
    import time

    from xengrant.service import XenStoreError

    path = f"/local/domain/{domid}"
    token = f"gone-{domid}-{time.monotonic_ns()}"
    deadline = time.monotonic() + timeout
    d.xs.watch(path, token)
    try:
        while True:
            try:
                d.xs.read(path)
            except XenStoreError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"d{domid} was not destroyed")
            with contextlib.suppress(TimeoutError):  # the deadline above says so
                d.xs.read_watch_token(token, left)
    finally:
        d.xs.unwatch(path, token)
        d.xs.drop_watch_events(token)


COMMANDS["wait_gone"] = cmd_wait_gone


def cmd_transfer_offer(d: Any, objs: dict[int, Any], peer: int, gfn: int) -> int:
    return int(d.grant_table.grant_transfer(peer, gfn))


def cmd_transfer_give(d: Any, objs: dict[int, Any], peer: int, ref: int, data: bytes) -> int:
    """(PV) populate a page, fill it, give it away with GNTTABOP_transfer."""
    (mfn,) = d.hypercalls.populate_physmap([0])
    view = d.view([mfn])
    mem = memoryview(view)
    mem[: len(data)] = data
    mem.release()
    view.close()
    d.grant_table.transfer(mfn, peer, ref)
    return int(mfn)


def cmd_transfer_take(d: Any, objs: dict[int, Any], ref: int, n: int) -> tuple[int, bytes, int]:
    """end_transfer, then read the page: (frame, bytes, messages the view needed)."""
    frame = d.grant_table.end_transfer(ref)
    before = d.channel.sent
    view = d.view([frame])
    mem = memoryview(view)
    data = bytes(mem[:n])
    mem.release()
    view.close()
    sent = d.channel.sent - before
    assert d.hypercalls.decrease_reservation([frame]) == 1
    return frame, data, sent


def cmd_threaded_start(d: Any, objs: dict[int, Any], port: int, gdom: int, ref: int) -> int:
    """A thread waits for an event while this one maps and unmaps 50 times."""
    import threading

    box: dict[str, Any] = {}

    def waiter() -> None:
        box["port"] = d.evtchn.wait(port, TIMEOUT)

    t = threading.Thread(target=waiter)
    t.start()
    objs[-1] = (t, box)
    n = 0
    for _ in range(50):
        with d.gnttab.map_grant_ref(gdom, ref) as m:
            n += m.mem[0]
    d.sync()
    return n


def cmd_threaded_join(d: Any, objs: dict[int, Any]) -> Any:
    t, box = objs.pop(-1)
    t.join(TIMEOUT)
    return box.get("port")


COMMANDS.update(
    transfer_offer=cmd_transfer_offer,
    transfer_give=cmd_transfer_give,
    transfer_take=cmd_transfer_take,
    threaded_start=cmd_threaded_start,
    threaded_join=cmd_threaded_join,
)


def cmd_loop_map(
    d: Any, objs: dict[int, Any], gdom: int, refs: list[int], n: int, expect: bytes
) -> int:
    """Map, check, write, unmap ``n`` times; returns how many maps saw ``expect``
    (after the service has done the last, posted, unmap)."""
    ok = 0
    for i in range(n):
        with d.gnttab.map_domain_grant_refs(gdom, refs) as m:
            ok += bytes(m.mem[: len(expect)]) == expect
            m.mem[4096 * (i % len(refs)) + 100] = i & 0xFF
    d.sync()
    return ok


COMMANDS["loop_map"] = cmd_loop_map


def cmd_mirror(d: Any, objs: dict[int, Any]) -> tuple[int, bool]:
    """(entries in this process's p2m mirror, whether the service agrees with each)."""
    hc = d.hypercalls
    mirror = dict(hc.p2m)
    if not mirror:
        return 0, True
    gfns = sorted(mirror)
    theirs = hc.translate(gfns, False)
    return len(mirror), [mirror[g] for g in gfns] == theirs


def cmd_set_version(d: Any, objs: dict[int, Any], version: int) -> int:
    return int(d.grant_table.set_version(version))


def cmd_alloc(d: Any, objs: dict[int, Any], n: int) -> int:
    return _new(objs, d.alloc_pages(n))


def cmd_free(d: Any, objs: dict[int, Any], key: int) -> None:
    objs.pop(key).free()


COMMANDS.update(
    mirror=cmd_mirror, set_version=cmd_set_version, alloc=cmd_alloc, free=cmd_free
)
